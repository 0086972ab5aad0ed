"""Where Megatron's checkpoints live on disk, whatever their format.

    <root>/latest_checkpointed_iteration.txt     the last complete iteration, or "release"
    <root>/iter_{N:07d}/                        one iteration (or <root>/release/ for an import)

The tracker is written last, atomically, so an interrupted save leaves the previous checkpoint
in charge. What an iteration directory holds depends on its format (gigatron/core/checkpoint/formats.py).
"""

from __future__ import annotations

import os
import re
from typing import Optional

from gigatron.core.checkpoint.io import CheckpointError, atomic_write_text

__all__ = [
    "TRACKER_FILENAME",
    "checkpoint_dir",
    "read_tracker",
    "write_tracker",
    "find_checkpoint_iteration",
    "resolve_checkpoint_dir",
]

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
_ITER_DIR = re.compile(r"iter_(\d+)")


def checkpoint_dir(root: str, iteration: int, release: bool = False) -> str:
    """`<root>/iter_{iteration:07d}` (or `<root>/release`)."""
    return os.path.join(root, "release" if release else f"iter_{iteration:07d}")


def read_tracker(root: str) -> tuple[Optional[int], bool]:
    """(iteration, release) from `<root>/latest_checkpointed_iteration.txt`; (None, False) if absent."""
    path = os.path.join(root, TRACKER_FILENAME)
    if not os.path.isfile(path):
        return None, False
    with open(path, encoding="utf-8") as handle:
        text = handle.read().strip()
    if text == "release":
        return 0, True
    try:
        return int(text), False
    except ValueError:
        raise CheckpointError(f"tracker file {path} holds {text!r}; expected an iteration number or 'release'") from None


def write_tracker(root: str, iteration: Optional[int]) -> None:
    """Point the tracker at `iteration` (None: `release`), atomically."""
    atomic_write_text(os.path.join(root, TRACKER_FILENAME), "release" if iteration is None else str(int(iteration)))


def find_checkpoint_iteration(root: str, ckpt_step: Optional[int] = None) -> tuple[Optional[int], bool]:
    """The iteration to load from `root`: `ckpt_step` if given (its directory must exist), else the tracker's."""
    if ckpt_step is not None:
        if not os.path.isdir(checkpoint_dir(root, ckpt_step)):
            raise CheckpointError(f"--ckpt-step {ckpt_step}: {checkpoint_dir(root, ckpt_step)} does not exist")
        return ckpt_step, False
    return read_tracker(root)


def resolve_checkpoint_dir(path: str) -> tuple[str, Optional[int]]:
    """(iteration directory, iteration or None for `release`) for a save directory with a tracker
    file, or for an iteration directory itself (whose format the caller detects)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory")
    iteration, release = read_tracker(path)
    if iteration is not None:
        return checkpoint_dir(path, iteration, release), (None if release else iteration)
    match = _ITER_DIR.fullmatch(os.path.basename(os.path.normpath(path)))
    return path, (int(match.group(1)) if match else None)
