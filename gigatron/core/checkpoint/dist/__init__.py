"""The parallelism-independent `torch_dist` checkpoint format (Megatron's default `--ckpt-format`).

    iter_{N:07d}/__{rank}_{n}.distcp   tensor data (PyTorch distributed checkpoint files)
    iter_{N:07d}/.metadata             global tensor index: every key's global shape and chunks
    iter_{N:07d}/common.pt             non-sharded state (written by rank 0): the caller's
                                       extra state, optimizer hyper-parameters, RNG of every rank
    iter_{N:07d}/metadata.json         {"sharded_backend": "torch_dist", ...} plus the size and
                                       CRC-32 of every file; written LAST (completeness marker)

Every tensor is stored under its GLOBAL name (global layer number: `decoder.layers.{global}.…`)
in its global logical shape; each rank contributes the chunks it holds (offsets into the global
tensor). Tensor-parallel shards map to chunks along the partition dim; a stride-k parameter (the
SwiGLU fc1 `[gate_r; up_r]`) gives k chunks per rank, so the stored tensor is the tp=1 layout
`[gate; up]`. Replicated tensors are written by one replica only (tensor-parallel rank 0 of
data/context-parallel rank 0); a tied output layer on the last pipeline stage is not written: it
is the word embedding. Routed experts (SequentialMLP) are stored under their GLOBAL expert number
(`….mlp.experts.local_experts.{g}.…`), each written by expert-data-parallel rank 0 of the ranks
holding it (sharded over the expert tensor-parallel ranks like tensor-parallel weights), so they
load at any expert-parallel size; GroupedMLP weight1/weight2 are split into their expert blocks,
each stored (transposed) under that expert's SequentialMLP key and shape, so they too load at any
expert-parallel / expert tensor-parallel size and into either implementation. Optimizer state (fp32 main params and the optimizer's per-element states)
is stored the same way under `optimizer.state.{fp32_param,exp_avg,exp_avg_sq}.{global name}`
(`fp32_param` only for bf16/fp16 parameters: an fp32 parameter's main param is the model weight);
the distributed optimizer's flat ranges become rectangular chunks in model space, so a checkpoint
loads at any tensor / pipeline / data parallel size, with or without the distributed optimizer.
The word embedding and output layer may differ in vocabulary padding between layouts: the common
rows are loaded and the padding rows are zero.

A save is planned collectively, the tensors are snapshotted to CPU (pinned memory for GPU
tensors) synchronously, then written (in a background thread with `AsyncCheckpointSaver`); once
every rank has written, rank 0 writes `.metadata` and, last, `metadata.json`. A directory without
`metadata.json` is an interrupted save and is refused on load; a file whose size or CRC-32 does
not match `metadata.json` is named in the error, and no file is read before it has been checked.
`.metadata` is read with an allow-list unpickler (metadata.py), so a crafted file runs no code.

Modules: common.py (names, errors, ranks), sharding.py (which chunks a rank holds and writes),
save.py, load.py, metadata.py (detection, metadata.json, safe reads), and this package's format
functions (`detect`, `read_args`, `read_model`, `save_training_state`, `load_training_state`),
which the registry (gigatron/core/checkpoint/formats.py) calls.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from gigatron.core.checkpoint.dist.common import (
    COMMON_FILENAME,
    DCP_METADATA_FILENAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_FILENAME,
    OPTIMIZER_PREFIX,
    CorruptCheckpointError,
    IncompleteCheckpointError,
)
from gigatron.core.checkpoint.dist.load import load_torch_dist, read_full_model_tensors
from gigatron.core.checkpoint.dist.metadata import (
    is_torch_dist_checkpoint,
    looks_like_megatron_torch_dist,
    read_checkpoint_metadata,
    read_common_state,
    read_dcp_metadata,
    verify_torch_dist_checkpoint,
)
from gigatron.core.checkpoint.dist.save import AsyncCheckpointSaver, save_torch_dist
from gigatron.core.checkpoint.dist.sharding import (
    ShardPiece,
    global_param_name,
    sharded_model_state,
    sharded_optimizer_state,
)
from gigatron.core.checkpoint.paths import checkpoint_dir, write_tracker
from gigatron.core.checkpoint.state import ModelState, TrainingState

__all__ = [
    "NAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "METADATA_FILENAME",
    "COMMON_FILENAME",
    "DCP_METADATA_FILENAME",
    "OPTIMIZER_PREFIX",
    "IncompleteCheckpointError",
    "CorruptCheckpointError",
    "ShardPiece",
    "global_param_name",
    "sharded_model_state",
    "sharded_optimizer_state",
    "AsyncCheckpointSaver",
    "save_torch_dist",
    "load_torch_dist",
    "is_torch_dist_checkpoint",
    "looks_like_megatron_torch_dist",
    "read_checkpoint_metadata",
    "read_dcp_metadata",
    "verify_torch_dist_checkpoint",
    "read_full_model_tensors",
    "detect",
    "read_args",
    "read_model",
    "save_training_state",
    "load_training_state",
]

NAME = FORMAT_NAME


def detect(iter_dir: str) -> bool:
    """True if `iter_dir` is a torch_dist checkpoint directory of ours (complete or not): not
    Megatron-Core's own (megatron_dist.py) nor one of its other sharded backends (zarr)."""
    return (is_torch_dist_checkpoint(iter_dir) and not looks_like_megatron_torch_dist(iter_dir)
            and _backend_of(iter_dir) in (None, FORMAT_NAME))


def _backend_of(iter_dir: str) -> Optional[str]:
    import json

    try:
        with open(os.path.join(iter_dir, METADATA_FILENAME), encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return None  # absent (an interrupted save) or unreadable: ours, refused with that reason on load
    return record.get("sharded_backend") if isinstance(record, dict) else None


def read_args(iter_dir: str, allow_namespace: bool = False) -> dict:
    """The flags stored in common.pt (checked against metadata.json first)."""
    del allow_namespace  # common.pt always holds a plain dict
    common = read_common_state(iter_dir, read_checkpoint_metadata(iter_dir))
    return dict((common.get("extra_state") or {}).get("args") or {})


def read_model(iter_dir: str, allow_namespace: bool = False) -> ModelState:
    """The model of `iter_dir` as full tensors (read in one process)."""
    del allow_namespace
    tensors, common = read_full_model_tensors(iter_dir)
    extra = common.get("extra_state") or {}
    if "embedding.word_embeddings.weight" not in tensors:
        raise CorruptCheckpointError(f"{iter_dir} holds no embedding.word_embeddings.weight; it is not a GPT checkpoint")
    release = os.path.basename(os.path.normpath(iter_dir)) == "release"
    return ModelState(args=dict(extra.get("args") or {}), tensors=tensors,
                      iteration=None if release else int(extra.get("iteration") or 0), path=iter_dir,
                      dtype=tensors["embedding.word_embeddings.weight"].dtype)


def save_training_state(root: str, iteration: int, model_chunks: Sequence[torch.nn.Module], optimizer, groups,
                        header: dict, *, scheduler_state: Optional[dict] = None, rng_state: Optional[dict] = None,
                        save_optim: bool = True, async_saver: Optional[AsyncCheckpointSaver] = None) -> str:
    """Save iteration `iteration` under `root` (collective); the tracker is updated once
    metadata.json is written (with `async_saver`, when `async_saver.maybe_finalize()` completes it)."""
    path = checkpoint_dir(root, iteration)
    extra = dict(header, opt_param_scheduler=scheduler_state if save_optim else None)

    def update_tracker() -> None:  # runs on every rank after metadata.json is written
        if groups.rank == 0:
            write_tracker(root, iteration)

    save_torch_dist(path, model_chunks, optimizer if save_optim else None, extra, groups, async_saver=async_saver,
                    rng_state=rng_state, finalize_fn=update_tracker)
    return path


def load_training_state(iter_dir: str, model_chunks: Sequence[torch.nn.Module], optimizer, groups, *,
                        strict: bool = True) -> TrainingState:
    """Load `iter_dir` into the model chunks (and `optimizer` unless None) at this run's layout."""
    extra = load_torch_dist(iter_dir, model_chunks, optimizer, groups, strict=strict)
    saved_layout = extra.get("parallel_layout") or {}
    same_shape = (saved_layout.get("world_size") == groups.world_size and saved_layout.get("tp") == groups.tp.size
                  and saved_layout.get("pp") == groups.pp.size)
    if extra.get("rng_state") is not None:
        missing = None
    elif same_shape:
        missing = f"{iter_dir} holds no RNG state (saved with --no-save-rng)"
    else:
        missing = (f"{iter_dir} was saved with another parallel layout ({saved_layout}); the random number "
                   "generators are not restored")
    header = {key: extra.get(key) for key in ("args", "iteration", "num_floating_point_operations_so_far",
                                              "consumed_train_samples", "consumed_valid_samples", "fp8_state")}
    header.update(iteration=int(extra["iteration"]),
                  num_floating_point_operations_so_far=float(extra.get("num_floating_point_operations_so_far", 0.0)),
                  consumed_train_samples=int(extra.get("consumed_train_samples", 0) or 0),
                  consumed_valid_samples=int(extra.get("consumed_valid_samples", 0) or 0))
    return TrainingState(header=header, path=iter_dir, optimizer_loaded=optimizer is not None,
                         scheduler_state=extra.get("opt_param_scheduler"), rng_state=extra.get("rng_state"),
                         rng_missing=missing, rng_missing_is_error=same_shape,
                         extra={"parallel_layout": saved_layout})

