"""torch_dist files other than the tensor data: detection, metadata.json (completeness marker and
checksum manifest), the safe reading of PyTorch's `.metadata` index and of common.pt.

Nothing here reads a file's content before its size and CRC-32 have been checked against
metadata.json, and `.metadata` (a pickle written by torch.distributed.checkpoint) is read with an
unpickler that constructs only the classes of PyTorch's checkpoint metadata: a crafted file that
names any other callable is refused before anything runs.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pathlib
import pickle
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Optional

import torch
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint import planner as dcp_planner
from torch.distributed.checkpoint.filesystem import _StorageInfo as DcpStorageInfo  # PyTorch's own record class

from gigatron.core.checkpoint.dist.common import (
    COMMON_FILENAME,
    DCP_METADATA_FILENAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_FILENAME,
    CorruptCheckpointError,
    IncompleteCheckpointError,
)
from gigatron.core.checkpoint.io import CheckpointError, safe_torch_load, verify_file

__all__ = [
    "is_torch_dist_checkpoint", "read_checkpoint_metadata", "verify_files", "verify_torch_dist_checkpoint",
    "read_dcp_metadata", "read_common_state", "looks_like_megatron_torch_dist",
]


# The classes a benign `.metadata` pickles (PyTorch 2.x): the metadata dataclasses, the storage
# records of the file-system writer, torch.Size, dtypes and layouts, and the checkpoint's path.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name)
    for name in ("Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata", "TensorProperties",
                 "BytesStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING")
    if hasattr(dcp_metadata, name)
}
_METADATA_CLASSES[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = DcpStorageInfo
_METADATA_CLASSES[("torch", "Size")] = torch.Size
# Megatron-Core's dist_checkpointing also stores its cached save plans in `.metadata`: PyTorch's
# planner records (dataclasses of names, offsets and sizes, and one enum).
_METADATA_CLASSES.update({
    ("torch.distributed.checkpoint.planner", name): getattr(dcp_planner, name)
    for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData")
    if hasattr(dcp_planner, name)
})


def _layout_by_name(name: str) -> torch.layout:
    """torch.layout from its name ('torch.strided'), as PyTorch pickles layouts."""
    for value in vars(torch).values():
        if isinstance(value, torch.layout) and str(value) == name:
            return value
    raise pickle.UnpicklingError(f"unknown tensor layout {name!r}")


_METADATA_CLASSES[("torch.serialization", "_get_layout")] = _layout_by_name
_METADATA_CLASSES.update({
    ("pathlib", "PosixPath"): pathlib.PurePosixPath, ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath, ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
    ("collections", "OrderedDict"): collections.OrderedDict,
})


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed metadata classes (and torch dtypes); refuses everything else."""

    def find_class(self, module: str, name: str):
        allowed = _METADATA_CLASSES.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a class of checkpoint metadata")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent references are not part of checkpoint metadata")


def is_torch_dist_checkpoint(path: str) -> bool:
    """True if `path` is a torch_dist checkpoint directory (complete or not)."""
    return os.path.isfile(os.path.join(path, METADATA_FILENAME)) or (
        os.path.isdir(path) and any(n.endswith(".distcp") or n == DCP_METADATA_FILENAME for n in os.listdir(path)))


def read_checkpoint_metadata(path: str) -> dict:
    """The metadata.json of a torch_dist checkpoint; IncompleteCheckpointError if it is absent."""
    record_path = os.path.join(path, METADATA_FILENAME)
    if not os.path.isdir(path):
        raise CheckpointError(f"torch_dist checkpoint directory {path} does not exist")
    if not os.path.isfile(record_path):
        present = sorted(os.listdir(path))
        plain_dcp = (DCP_METADATA_FILENAME in present and COMMON_FILENAME not in present
                     and any(n.endswith(".distcp") for n in present))
        raise IncompleteCheckpointError(
            f"{path} is an incomplete torch_dist checkpoint: it has no {METADATA_FILENAME}, so the save was "
            f"interrupted before it finished (files present: {present[:10]}). Load an earlier iteration "
            "(--ckpt-step) or point the tracker file at a complete checkpoint."
            + (" If it is a complete plain PyTorch distributed checkpoint instead (Megatron-LM's --ckpt-format "
               "torch_dcp or fsdp_dtensor, which Gigatron does not read), re-save it with Megatron-LM as torch_dist "
               "(--ckpt-convert-format torch_dist --ckpt-convert-save DIR) and load DIR/torch_dist." if plain_dcp
               else ""))
    try:
        with open(record_path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"{record_path} is unreadable: {exc}") from exc
    if not isinstance(record, dict) or record.get("sharded_backend") != FORMAT_NAME:
        raise CheckpointError(f"{path} holds sharded backend {record.get('sharded_backend')!r}, not "
                              f"{FORMAT_NAME!r}; Gigatron reads torch_dist checkpoints only")
    if int(record.get("sharded_backend_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path} is torch_dist version {record['sharded_backend_version']}; this "
                              f"Gigatron reads up to version {FORMAT_VERSION}")
    if not isinstance(record.get("files"), dict):
        raise CheckpointError(
            f"{path} is a torch_dist checkpoint written by Megatron-Core's dist_checkpointing (its "
            f"{METADATA_FILENAME} has no checksum manifest): open it through the checkpoint registry "
            "(gigatron/core/checkpoint/formats.py), which reads it with megatron_dist.py.")
    return record


def verify_files(path: str, record: dict, names: Optional[Iterable[str]], checksums: bool) -> None:
    """Check the size (and CRC-32) of `names` (default: every recorded file) against metadata.json."""
    files = record.get("files", {})
    names = sorted(files) if names is None else sorted(set(names))

    def check(name: str) -> Optional[str]:
        if os.path.basename(name) != name or name in ("", ".", ".."):
            return f"{name!r} lies outside the checkpoint directory"
        problem = verify_file(os.path.join(path, name), files.get(name), checksums)
        if problem is not None and files.get(name) is None:
            return f"{name} is not listed in {METADATA_FILENAME}"
        return problem

    with ThreadPoolExecutor(max_workers=min(8, max(1, len(names)))) as pool:
        problems = [p for p in pool.map(check, names) if p]
    if problems:
        raise CorruptCheckpointError(f"torch_dist checkpoint {path} is damaged: " + "; ".join(problems)
                                     + ". Load an earlier checkpoint (--ckpt-step) or restore the file.")


def verify_torch_dist_checkpoint(path: str, checksums: bool = True) -> dict:
    """Check that `path` is complete and every file matches its recorded size and CRC-32; return
    metadata.json. Raises IncompleteCheckpointError / CorruptCheckpointError."""
    record = read_checkpoint_metadata(path)
    verify_files(path, record, None, checksums)
    return record


def read_dcp_metadata(path: str) -> dcp_metadata.Metadata:
    """PyTorch's tensor index (`.metadata`) of the torch_dist checkpoint directory `path`, read
    with the allow-list unpickler. Raises CorruptCheckpointError naming the file when it holds
    anything but checkpoint metadata (the payload is never run)."""
    file = os.path.join(path, DCP_METADATA_FILENAME)
    try:
        with open(file, "rb") as handle:
            data = handle.read()
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except OSError as exc:
        raise CorruptCheckpointError(f"{file} cannot be read: {exc}") from exc
    except Exception as exc:  # any unpickling failure: refused, nothing was constructed beyond the allow-list
        raise CorruptCheckpointError(
            f"{file} is not a PyTorch checkpoint index and was refused ({type(exc).__name__}: {exc}); "
            "loading never runs code from a checkpoint. Do not load this checkpoint unless you know who "
            "wrote it.") from exc
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise CorruptCheckpointError(f"{file} holds a {type(metadata).__name__}, not checkpoint metadata")
    for index, info in (metadata.storage_data or {}).items():
        relative = getattr(info, "relative_path", "")
        if not isinstance(relative, str) or os.path.basename(relative) != relative or relative in ("", ".", ".."):
            raise CorruptCheckpointError(f"{file} points {index} at {relative!r}, outside the checkpoint directory")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = dcp_metadata.StorageMeta()
    return metadata


def read_common_state(path: str, record: dict, verify_checksums: bool = True) -> dict:
    """common.pt of the torch_dist checkpoint directory `path` (weights-only), after checking it
    against the metadata.json `record`."""
    verify_files(path, record, [COMMON_FILENAME], verify_checksums)
    return safe_torch_load(os.path.join(path, COMMON_FILENAME))


def looks_like_megatron_torch_dist(path: str) -> bool:
    """True for a directory Megatron-Core's dist_checkpointing wrote: metadata.json naming the
    torch_dist backend but no per-file checksum manifest (ours always has one)."""
    record_path = os.path.join(path, METADATA_FILENAME)
    if not os.path.isfile(record_path):
        return False
    try:
        with open(record_path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("sharded_backend") == FORMAT_NAME and "files" not in record
