"""`--loader torch`: the same as `--loader core` (the `torch` checkpoint format)."""

from loader_core import add_arguments, load_checkpoint  # noqa: F401
