"""Atomic file writes and weights-only checkpoint loading.

Every file is written under a temporary name in its final directory, flushed to disk and then
renamed over the final name with `os.replace`, so a reader sees either the old file or the complete
new one, never a partial write. Checkpoints are read with `torch.load(weights_only=True)`, which
refuses arbitrary pickled objects: what is saved must be tensors and plain Python containers and
scalars (`to_plain` converts the usual exceptions: numpy arrays, dtypes, namespaces).
"""

from __future__ import annotations

import argparse

import os
import pickle
import tempfile
import zipfile
from typing import Any, Callable

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_torch_save",
    "safe_torch_load",
    "to_plain",
]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the model it is loaded into."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Call `write(binary_file)` on a temporary file next to `path`, then rename it to `path`.

    If `write` raises, the temporary file is removed and `path` is left as it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        try:
            os.unlink(tmp_path)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str) -> None:
    """`torch.save(obj)` to `path` atomically."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def safe_torch_load(path: str, map_location: Any = "cpu") -> Any:
    """Load a checkpoint file with `weights_only=True`; errors name the file and the likely cause."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint file {path} holds objects that a weights-only load refuses ({exc}); "
            "it was not written by Gigatron's torch format"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        size = os.path.getsize(path)
        raise CheckpointError(
            f"checkpoint file {path} ({size} bytes) is truncated or corrupt and cannot be read: {exc}. "
            "Load an earlier iteration with --ckpt-step, or fix the tracker file."
        ) from exc


def to_plain(value: Any) -> Any:
    """Convert `value` into what a weights-only load accepts: tensors, str/int/float/bool/None and
    lists/tuples/dicts of those. numpy arrays become tensors, numpy scalars Python scalars, dtypes and
    other objects their `str`, namespaces dicts."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {(k if isinstance(k, (str, int)) else str(k)): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        converted = [to_plain(v) for v in value]
        return converted if isinstance(value, list) else tuple(converted)
    return str(value)


