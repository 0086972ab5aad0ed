"""Gigatron: train transformer language models at any scale, compatible with Megatron-LM."""

__version__ = "0.1.0"

__all__ = ["from_pretrained"]


def from_pretrained(path, device="cpu", dtype=None):
    """Load one of our checkpoints (any saved layout) or a HuggingFace folder onto one device.

    Returns a module whose call on [batch, seq] token ids gives [batch, seq, vocab] logits over the
    true vocabulary. Imported lazily so that `import gigatron` does not import torch."""
    from gigatron.hub import from_pretrained as _from_pretrained

    return _from_pretrained(path, device=device, dtype=dtype)
