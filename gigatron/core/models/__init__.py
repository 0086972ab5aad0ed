"""Models, each built one pipeline stage at a time (pre_process / post_process)."""

from .gpt import GPTModel

__all__ = ["GPTModel"]
