"""Fast paths; each has a plain-PyTorch reference_<op> that its test compares against."""

from .cross_entropy import chunked_output_cross_entropy, reference_output_cross_entropy

__all__ = ["chunked_output_cross_entropy", "reference_output_cross_entropy"]
