"""The checkpoint-format registry: the one place that decides what a directory holds.

Every format Gigatron reads or writes in Megatron's `iter_N/` layout is one module with the same
interface, listed in `FORMATS`:

    NAME                                          the --ckpt-format value
    detect(iter_dir) -> bool                      does this iteration directory hold this format?
    read_args(iter_dir) -> dict                   the flags the checkpoint was saved with
    read_model(iter_dir) -> ModelState            the model as full tensors (any saved layout)
    save_training_state(root, iteration, model_chunks, optimizer, groups, header, *,
                        scheduler_state, rng_state, save_optim, ...) -> iteration directory
    load_training_state(iter_dir, model_chunks, optimizer, groups, *, strict) -> TrainingState

`torch` (torch_layout.py: one file per model-parallel rank), `torch_dist` (dist/: one logical
copy, loads at any parallel layout) and `megatron_torch_dist` (megatron_dist.py: Megatron-Core's own
keys, which Megatron-LM loads) are written by training; Megatron-LM's `torch` files and the legacy
layout are read only. A new layout (Megatron-Core's own torch_dist,
the pre-Megatron-Core "legacy" names) is one more module with this interface and one more entry
in `FORMATS`, placed before any format whose `detect` would also claim its directories.

Training (gigatron/training/checkpointing.py), conversion (gigatron/core/convert, tools/checkpoint),
`gigatron.from_pretrained`, the generation tools and the tasks all locate checkpoints through
`locate` / `detect_format`; a directory in a layout Gigatron does not read gets an error that
says what it looks like and what to run (`describe_unreadable`). HuggingFace folders are not an
`iter_N/` layout: `is_hf_folder` recognises them, and gigatron/core/convert/hf.py reads them.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Optional

from gigatron.core.checkpoint import dist as torch_dist
from gigatron.core.checkpoint import legacy, megatron_dist, megatron_torch
from gigatron.core.checkpoint import torch_layout
from gigatron.core.checkpoint.io import CheckpointError
from gigatron.core.checkpoint.paths import TRACKER_FILENAME, resolve_checkpoint_dir
from gigatron.core.checkpoint.state import ModelState

__all__ = [
    "FORMATS",
    "HF_WEIGHT_FILES",
    "get_format",
    "writable_formats",
    "detect_format",
    "is_hf_folder",
    "describe_unreadable",
    "locate",
    "read_args",
    "read_model",
]

FORMATS: dict[str, ModuleType] = {
    megatron_dist.NAME: megatron_dist,  # Megatron-Core's own torch_dist (ours has a checksum manifest)
    torch_dist.NAME: torch_dist,
    legacy.NAME: legacy,  # pre-Megatron-Core names, in the torch rank-file layout (checked first)
    megatron_torch.NAME: megatron_torch,  # before torch: the same rank-file layout, written by Megatron-LM
    torch_layout.NAME: torch_layout,
}

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


def writable_formats() -> list[str]:
    """The --ckpt-format values Gigatron saves (formats whose module has `WRITES = False` are read only)."""
    return [name for name, module in FORMATS.items() if getattr(module, "WRITES", True)]


def get_format(name: str) -> ModuleType:
    """The format module registered as `name` (a --ckpt-format value Gigatron saves)."""
    if name not in writable_formats():
        raise ValueError(f"--ckpt-format {name} is not supported; use one of {', '.join(writable_formats())}")
    return FORMATS[name]


def is_hf_folder(path: str) -> bool:
    """A HuggingFace model folder: config.json and HuggingFace weight files."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, name)) for name in HF_WEIGHT_FILES)


def _convert_hint(path: str, loader: str) -> str:
    return (f"python tools/checkpoint/convert.py --model-type GPT --loader {loader} --saver core "
            f"--load-dir {path} --save-dir CONVERTED")


def describe_unreadable(path: str) -> str:
    """What the directory `path` looks like, for a directory no registered format claims."""
    if not os.path.exists(path):
        return f"{path} does not exist"
    if not os.path.isdir(path):
        return f"{path} is a file, not a checkpoint directory (give the directory that holds {TRACKER_FILENAME})"
    names = sorted(os.listdir(path))
    if is_hf_folder(path):
        return (f"{path} is a HuggingFace model folder, not a Megatron checkpoint: gigatron.from_pretrained reads it "
                f"as it is; to train from it, convert it first: {_convert_hint(path, 'hf')}")
    backend = _sharded_backend(path)
    if backend is not None and backend != "torch_dist":
        return (f"{path} was written by Megatron-Core's dist_checkpointing with the {backend} backend "
                f"(--ckpt-format {backend}), which Gigatron does not read: re-save it with Megatron-LM as torch_dist "
                "(--ckpt-convert-format torch_dist --ckpt-convert-save DIR) and load DIR/torch_dist")
    if os.path.isfile(os.path.join(path, ".zarray")) or any(n.endswith(".zarr") for n in names):
        return (f"{path} looks like a zarr checkpoint (Megatron's deprecated --ckpt-format zarr), which Gigatron "
                "does not read; save it as torch or torch_dist with Megatron-LM first")
    if any(n.startswith("iter_") or n == "release" for n in names):
        return (f"{path} holds iteration directories ({', '.join(n for n in names if n.startswith('iter_') or n == 'release')[:200]}) "
                f"but no {TRACKER_FILENAME}: give one iteration directory, or the directory with the tracker file")
    if any(n.endswith((".pt", ".bin", ".safetensors", ".pth")) for n in names):
        return (f"{path} holds weight files ({', '.join(n for n in names if '.' in n)[:200]}) but neither a Megatron "
                f"layout (mp_rank_*/model_optim_rng.pt, or torch_dist's metadata.json) nor a HuggingFace "
                "config.json")
    if not names:
        return (f"{path} is an empty directory: neither a checkpoint directory with {TRACKER_FILENAME} nor an "
                "iter_NNNNNNN / release directory")
    return (f"{path} is neither a checkpoint directory with {TRACKER_FILENAME} nor an iter_NNNNNNN / release "
            f"directory of a format Gigatron reads ({', '.join(FORMATS)}); it holds {names[:10]}")


def _sharded_backend(path: str) -> Optional[str]:
    """The `sharded_backend` named by Megatron-Core's metadata.json in `path`, if any."""
    import json

    try:
        with open(os.path.join(path, "metadata.json"), encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return None
    backend = record.get("sharded_backend") if isinstance(record, dict) else None
    return backend if isinstance(backend, str) else None


def detect_format(iter_dir: str) -> ModuleType:
    """The format module whose `detect` claims the iteration directory `iter_dir`; a
    CheckpointError describing the directory when none does."""
    for module in FORMATS.values():
        if module.detect(iter_dir):
            return module
    raise CheckpointError(describe_unreadable(iter_dir))


def locate(path: str) -> tuple[str, Optional[int], ModuleType]:
    """(iteration directory, iteration or None for `release`, format module) for a save
    directory with a tracker file or an iteration directory."""
    if not os.path.isdir(path):
        raise CheckpointError(describe_unreadable(path))
    iter_dir, iteration = resolve_checkpoint_dir(path)
    if not os.path.isdir(iter_dir):
        raise CheckpointError(f"the tracker file in {path} names {os.path.basename(iter_dir)}, which does not exist")
    return iter_dir, iteration, detect_format(iter_dir)


def read_args(path: str, allow_namespace: bool = False) -> dict:
    """The flags stored in the checkpoint at `path` (save directory or iteration directory)."""
    iter_dir, _, module = locate(path)
    return module.read_args(iter_dir, allow_namespace)


def read_model(path: str, allow_namespace: bool = False) -> ModelState:
    """The model of the checkpoint at `path` as full tensors, whatever its format and layout."""
    iter_dir, iteration, module = locate(path)
    state = module.read_model(iter_dir, allow_namespace)
    if iteration is not None and state.iteration is None:
        state.iteration = iteration
    return state

