"""Atomic file writes, checksums and weights-only checkpoint loading.

Every file is written under a temporary name in its final directory, flushed to disk and then
renamed over the final name with `os.replace`, so a reader sees either the old file or the complete
new one, never a partial write. A written file gets the permissions an ordinary `open()` would give
it (0666 less the process umask), not the owner-only mode of a temporary file. Checkpoints are read
with `torch.load(weights_only=True)`, which refuses arbitrary pickled objects: what is saved must be
tensors and plain Python containers and scalars (`to_plain` converts the usual exceptions: numpy
arrays, dtypes, namespaces). `file_crc32` / `verify_file` check a file against a recorded size and
CRC-32 before anything reads its content.
"""

from __future__ import annotations

import argparse
import enum
import os
import pickle
import tempfile
import types
import zipfile
import zlib
from typing import Any, Callable, Optional

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "file_crc32",
    "file_record",
    "verify_file",
    "default_file_mode",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_torch_save",
    "safe_torch_load",
    "to_plain",
]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the model it is loaded into."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is missing, truncated, unsafe or does not match its recorded checksum."""


_CRC_BLOCK = 16 << 20


def file_crc32(path: str) -> tuple[int, int]:
    """(size in bytes, CRC-32) of a file."""
    crc, size = 0, 0
    with open(path, "rb") as handle:
        while True:
            block = handle.read(_CRC_BLOCK)
            if not block:
                break
            crc = zlib.crc32(block, crc)
            size += len(block)
    return size, crc & 0xFFFFFFFF


def file_record(path: str) -> dict:
    """{"size", "crc32"} of a file, as checksum manifests store it."""
    size, crc = file_crc32(path)
    return {"size": size, "crc32": crc}


def verify_file(path: str, expected: Optional[dict], checksums: bool = True) -> Optional[str]:
    """None if the file at `path` has the recorded size (and CRC-32), else what is wrong with it.
    `expected`: the file's manifest record ({"size", "crc32"}), None if the manifest lacks it."""
    if expected is None:
        return f"{path} is not listed in the checkpoint's checksum manifest"
    if not os.path.isfile(path):
        return f"{path} is missing"
    size = os.path.getsize(path)
    if size != expected["size"]:
        return f"{path} has {size} bytes, {expected['size']} were written (truncated or overwritten)"
    if checksums:
        _, crc = file_crc32(path)
        if crc != expected["crc32"]:
            return f"{path} has CRC-32 {crc:08x}, {expected['crc32']:08x} was written (corrupt data)"
    return None


def _process_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux: /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (briefly) and restoring it
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode `open(path, "w")` would create a file with: 0666 less the umask."""
    return 0o666 & ~_process_umask()


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

    The file ends with the mode a plain `open()` gives (0666 less the umask). If `write` raises,
    the temporary file is removed and `path` is left as it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), default_file_mode())  # mkstemp creates 0600
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


def safe_torch_load(path: Any, map_location: Any = "cpu", allow_namespace: bool = False) -> Any:
    """Load a checkpoint file (a path, or a binary stream) with `weights_only=True`; errors name the
    file and the likely cause.

    `allow_namespace` also accepts what Megatron-LM's own files hold besides tensors and plain data
    (gigatron/core/checkpoint/megatron_pickle.py: `argparse.Namespace` args, Megatron's enums and
    dataclasses as stand-ins, `signal.Signals`, numpy RNG arrays, Transformer Engine's `io.BytesIO`);
    anything else is still refused, so no code runs."""
    name = path if isinstance(path, (str, os.PathLike)) else getattr(path, "name", "<checkpoint bytes>")
    if isinstance(path, (str, os.PathLike)) and not os.path.exists(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        if allow_namespace:
            from gigatron.core.checkpoint.megatron_pickle import safe_globals

            with torch.serialization.safe_globals(safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint file {name} holds objects that a weights-only load refuses ({exc}); "
            "it was not written by Gigatron's torch format"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        size = os.path.getsize(path) if isinstance(path, (str, os.PathLike)) else "?"
        raise CheckpointError(
            f"checkpoint file {name} ({size} bytes) is truncated or corrupt and cannot be read: {exc}. "
            "Load an earlier iteration with --ckpt-step, or fix the tracker file."
        ) from exc


def to_plain(value: Any) -> Any:
    """Convert `value` into what a weights-only load accepts: tensors, str/int/float/bool/None and
    lists/tuples/dicts of those. numpy arrays become tensors, numpy scalars Python scalars, dtypes and
    other objects their `str`, namespaces dicts."""
    if isinstance(value, enum.Enum):  # signal.Signals in Megatron's args, for one
        return f"{type(value).__name__}.{value.name}"
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "to_plain") and not isinstance(value, torch.Tensor):  # megatron_pickle's stand-ins
        value = value.to_plain()
        if isinstance(value, str):
            return value
    if isinstance(value, (argparse.Namespace, types.SimpleNamespace)):
        value = vars(value)
    if isinstance(value, dict):
        return {(k if isinstance(k, (str, int)) else str(k)): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        converted = [to_plain(v) for v in value]
        return converted if isinstance(value, list) else tuple(converted)
    return str(value)


