"""`--saver torch`: the same as `--saver core` (the `torch` checkpoint format)."""

from saver_core import add_arguments, save_checkpoint  # noqa: F401
