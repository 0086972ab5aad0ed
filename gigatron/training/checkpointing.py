"""Megatron's `torch` checkpoint layout: save, load and the tracker file.

    <save>/latest_checkpointed_iteration.txt           the last complete iteration (or "release")
    <save>/iter_{N:07d}/mp_rank_{tp:02d}/model_optim_rng.pt             pipeline size 1
    <save>/iter_{N:07d}/mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt    pipeline size > 1
                        (+ _{ep:03d} when expert parallel size > 1)

One file per model-parallel rank, written by its data-parallel rank 0. Keys: `args` (a plain dict,
so the file loads with `weights_only=True`), `checkpoint_version` (3.0), `iteration`, `model` (or
`model0`, `model1`, … for virtual pipeline chunks), `optimizer`, `opt_param_scheduler`,
`rng_state` (one entry per data-parallel rank), `num_floating_point_operations_so_far`,
`consumed_train_samples`, `consumed_valid_samples` (also inside `args`, where Megatron keeps them).

A save writes each file under a temporary name and renames it; after a barrier, rank 0 writes the
tracker last (atomically), so an interrupted save leaves the previous checkpoint in charge.

`--ckpt-format torch_dist` (the flag's default; `ckpt_format="torch_dist"` here) saves `iter_{N:07d}/` through
gigatron/core/checkpoint/dist.py instead (parallelism independent: loads at any tp/pp/dp); the
keys above other than `model`/`optimizer`/`rng_state` go to its common.pt, and the tracker is
written by the save's finalize callback, i.e. after metadata.json (with --async-save, at a later
iteration). A load detects the format of the directory it finds.
"""

from __future__ import annotations

import argparse
import os
import random
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from gigatron.core.checkpoint.dist import COMMON_FILENAME, is_torch_dist_checkpoint, load_torch_dist, save_torch_dist
from gigatron.core.checkpoint.io import CheckpointError, atomic_torch_save, atomic_write_text, safe_torch_load, to_plain

__all__ = [
    "CHECKPOINT_VERSION",
    "TRACKER_FILENAME",
    "MODEL_SHAPE_ARGS",
    "LoadedCheckpoint",
    "checkpoint_dir",
    "checkpoint_file",
    "read_tracker",
    "find_checkpoint_iteration",
    "get_rng_state",
    "set_rng_state",
    "save_checkpoint",
    "load_checkpoint",
    "load_args_from_checkpoint",
]

CHECKPOINT_VERSION = 3.0
TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
MODEL_FILENAME = "model_optim_rng.pt"

# The flags a BERT or T5 script adds for its model (extra_args_provider; no config dataclass owns them).
SCRIPT_MODEL_ARGS = ("bert_layernorm", "num_tokentypes", "bert_binary_head", "encoder_num_layers",
                     "decoder_num_layers", "t5_relative_attention", "relative_attention_num_buckets",
                     "relative_attention_max_distance", "encoder_seq_length", "decoder_seq_length")


def _model_shape_args() -> tuple[str, ...]:
    from gigatron.core.convert.protocol import MODEL_FLAGS, MOE_FLAGS, TOKENIZER_FLAGS

    return tuple(dict.fromkeys(MODEL_FLAGS + MOE_FLAGS + TOKENIZER_FLAGS + SCRIPT_MODEL_ARGS + ("padded_vocab_size",)))


# What --use-checkpoint-args takes from a checkpoint: the model's description, derived from the config
# dataclasses' model fields (TransformerConfig, MoEConfig, DataConfig's tokenizer fields) — never the
# run's parallel layout, precision or recompute settings.
MODEL_SHAPE_ARGS = _model_shape_args()

# Stored as absolute paths; a load that does not find one looks beside the checkpoint.
TOKENIZER_PATH_ARGS = ("vocab_file", "merge_file", "tokenizer_model")


def checkpoint_dir(root: str, iteration: int, release: bool = False) -> str:
    """`<root>/iter_{iteration:07d}` (or `<root>/release`)."""
    return os.path.join(root, "release" if release else f"iter_{iteration:07d}")


def checkpoint_file(root: str, iteration: int, tp_rank: int, pp_rank: int, pp_size: int,
                    ep_rank: int = 0, ep_size: int = 1, release: bool = False) -> str:
    """Path of one model-parallel rank's file in Megatron's `torch` layout."""
    name = f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    if ep_size > 1:
        name += f"_{ep_rank:03d}"
    return os.path.join(checkpoint_dir(root, iteration, release), name, MODEL_FILENAME)


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


def find_checkpoint_iteration(root: str, ckpt_step: Optional[int] = None) -> tuple[Optional[int], bool]:
    """The iteration to load from `root`: `ckpt_step` if given (its directory must exist), else the tracker's."""
    if ckpt_step is not None:
        if not os.path.isdir(checkpoint_dir(root, ckpt_step)):
            raise CheckpointError(f"--ckpt-step {ckpt_step}: {checkpoint_dir(root, ckpt_step)} does not exist")
        return ckpt_step, False
    return read_tracker(root)


# ------------------------------------------------------------------ RNG state


def get_rng_state(rng_tracker=None) -> dict:
    """Python, numpy, torch (CPU and CUDA) and model-parallel tracker RNG states, as plain data."""
    np_state = np.random.get_state()
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                         float(np_state[4])),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": _tracker_states_to_plain(rng_tracker) if rng_tracker is not None else None,
    }
    return state


def _tracker_states_to_plain(rng_tracker) -> dict:
    """{stream name: {"cpu": tensor, "cuda": tensor | None}} from the tracker's RNGState objects."""
    return {name: {"cpu": state.cpu, "cuda": state.cuda} for name, state in rng_tracker.get_states().items()}


def _tracker_states_from_plain(states: dict) -> dict:
    from gigatron.core.parallel.random import RNGState

    return {name: RNGState(value["cpu"], value.get("cuda")) for name, value in states.items()}


def set_rng_state(state: dict, rng_tracker=None) -> None:
    """Restore what `get_rng_state` captured."""
    version, internal, gauss = state["random_rng_state"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["np_rng_state"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch_rng_state"])
    if state.get("cuda_rng_state") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    if rng_tracker is not None and state.get("rng_tracker_states") is not None:
        rng_tracker.set_states(_tracker_states_from_plain(state["rng_tracker_states"]))


# ------------------------------------------------------------------ helpers


def _unwrap(chunk):
    """The module inside a data-parallel wrapper (state dict keys are the bare model's)."""
    return getattr(chunk, "module", chunk)


def _model_keys(num_chunks: int) -> list[str]:
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def _barrier(groups=None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


_TENSOR_TAG = "__tensor_bytes__"


def _tensors_to_bytes(obj):
    """Replace tensors by plain bytes records, so that gathering pickles no tensor storages."""
    if isinstance(obj, torch.Tensor):
        array = obj.detach().cpu().contiguous().numpy()
        return {_TENSOR_TAG: array.tobytes(), "dtype": array.dtype.str, "shape": list(array.shape)}
    if isinstance(obj, dict):
        return {k: _tensors_to_bytes(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tensors_to_bytes(v) for v in obj)
    return obj


def _bytes_to_tensors(obj):
    if isinstance(obj, dict) and _TENSOR_TAG in obj:
        array = np.frombuffer(obj[_TENSOR_TAG], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
        return torch.from_numpy(array.copy())
    if isinstance(obj, dict):
        return {k: _bytes_to_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_bytes_to_tensors(v) for v in obj)
    return obj


def _all_gather_object_in(group, obj) -> list:
    """Every member's `obj` (tensors inside travel as bytes)."""
    if group is None or group.group is None or group.size <= 1:
        return [obj]
    gathered = [None] * group.size
    dist.all_gather_object(gathered, _tensors_to_bytes(obj), group=group.group)
    return [_bytes_to_tensors(item) for item in gathered]


def _rank_file(root: str, iteration: int, groups, release: bool = False) -> str:
    return checkpoint_file(root, iteration, groups.tp.rank, groups.pp.rank, groups.pp.size,
                           groups.ep.rank if groups.ep.size > 1 else 0, groups.ep.size, release)


def _first_rank_of_file(path: str, groups) -> bool:
    """Whether this rank is the lowest global rank whose file is `path`. With expert parallelism a
    file holds one (tp, pp, ep) combination of dense and expert shards, and the ranks holding it
    are not one data-parallel group (experts are replicated over expt_dp, dense weights over dp)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return True
    paths = [None] * dist.get_world_size()
    dist.all_gather_object(paths, path)
    return paths.index(path) == dist.get_rank()


def _args_dict(args, consumed_train: int, consumed_valid: int) -> dict:
    """The `args` entry of a checkpoint: the run's flags as plain data, with the consumed-sample
    counts and tokenizer paths made absolute (so the checkpoint works from another directory)."""
    plain = {k: v for k, v in vars(args).items() if not k.startswith("_")} if isinstance(args, argparse.Namespace) \
        else dict(args)
    plain["consumed_train_samples"] = consumed_train
    plain["consumed_valid_samples"] = consumed_valid
    for name in TOKENIZER_PATH_ARGS:
        value = plain.get(name)
        if isinstance(value, str) and value and os.path.exists(value):
            plain[name] = os.path.abspath(value)
    return to_plain(plain)


# ------------------------------------------------------------------ save


def save_checkpoint(
    save_dir: str,
    iteration: int,
    model_chunks: Sequence[torch.nn.Module],
    optimizer,
    scheduler,
    args: argparse.Namespace,
    groups,
    *,
    num_floating_point_operations_so_far: float = 0.0,
    consumed_train_samples: int = 0,
    consumed_valid_samples: int = 0,
    save_optim: bool = True,
    save_rng: bool = True,
    rng_tracker=None,
    ckpt_format: str = "torch",
    async_saver=None,
) -> str:
    """Save this rank's share of a checkpoint of `iteration` and, once all ranks are done, update
    the tracker. Every rank must call it (it holds collectives). Returns the iteration directory.

    `ckpt_format` "torch_dist": the parallelism-independent format; with `async_saver` (an
    AsyncCheckpointSaver, --async-save) the files are written in the background and the tracker is
    updated when `async_saver.maybe_finalize()` completes the save."""
    if ckpt_format == "torch_dist":
        return _save_torch_dist_checkpoint(
            save_dir, iteration, model_chunks, optimizer, scheduler, args, groups,
            num_floating_point_operations_so_far=num_floating_point_operations_so_far,
            consumed_train_samples=consumed_train_samples, consumed_valid_samples=consumed_valid_samples,
            save_optim=save_optim, save_rng=save_rng, rng_tracker=rng_tracker, async_saver=async_saver)
    if ckpt_format != "torch":
        raise ValueError(f"--ckpt-format {ckpt_format} is not supported; use torch_dist or torch")
    if async_saver is not None:
        raise ValueError("--async-save needs --ckpt-format torch_dist")
    rng_states = _all_gather_object_in(groups.dp, get_rng_state(rng_tracker)) if save_rng else None
    optimizer_state = None
    if save_optim and optimizer is not None:
        # The optimizer's own state dict (it may gather data-parallel shards: every rank calls it).
        optimizer_state = optimizer.state_dict()
    writer = groups.dp.rank == 0 and groups.cp.rank == 0
    if groups.ep.size > 1:
        writer = _first_rank_of_file(_rank_file(save_dir, iteration, groups), groups)
    if writer:
        state: dict[str, Any] = {
            "args": _args_dict(args, consumed_train_samples, consumed_valid_samples),
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": iteration,
            "num_floating_point_operations_so_far": float(num_floating_point_operations_so_far),
            "consumed_train_samples": int(consumed_train_samples),
            "consumed_valid_samples": int(consumed_valid_samples),
        }
        for key, chunk in zip(_model_keys(len(model_chunks)), model_chunks):
            state[key] = _unwrap(chunk).state_dict()
        if optimizer_state is not None:
            state["optimizer"] = to_plain(optimizer_state)
            if scheduler is not None:
                state["opt_param_scheduler"] = to_plain(scheduler.state_dict())
        if rng_states is not None:
            state["rng_state"] = to_plain(rng_states)
        atomic_torch_save(state, _rank_file(save_dir, iteration, groups))
    _barrier()
    if groups.rank == 0:
        atomic_write_text(os.path.join(save_dir, TRACKER_FILENAME), str(iteration))
    _barrier()
    return checkpoint_dir(save_dir, iteration)


def _save_torch_dist_checkpoint(save_dir, iteration, model_chunks, optimizer, scheduler, args, groups, *,
                                num_floating_point_operations_so_far, consumed_train_samples, consumed_valid_samples,
                                save_optim, save_rng, rng_tracker, async_saver) -> str:
    path = checkpoint_dir(save_dir, iteration)
    extra = {
        "args": _args_dict(args, consumed_train_samples, consumed_valid_samples),
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "num_floating_point_operations_so_far": float(num_floating_point_operations_so_far),
        "consumed_train_samples": int(consumed_train_samples),
        "consumed_valid_samples": int(consumed_valid_samples),
        "opt_param_scheduler": scheduler.state_dict() if save_optim and scheduler is not None else None,
    }

    def update_tracker() -> None:  # runs on every rank after metadata.json is written
        if groups.rank == 0:
            atomic_write_text(os.path.join(save_dir, TRACKER_FILENAME), str(iteration))

    save_torch_dist(path, model_chunks, optimizer if save_optim else None, extra, groups, async_saver=async_saver,
                    rng_state=get_rng_state(rng_tracker) if save_rng else None, finalize_fn=update_tracker)
    return path


# ------------------------------------------------------------------ load


@dataclass
class LoadedCheckpoint:
    """What a load restored: where training resumes."""

    iteration: int = 0
    num_floating_point_operations_so_far: float = 0.0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    path: Optional[str] = None


def _describe_missing(root: str, iteration: int, path: str, groups) -> str:
    directory = checkpoint_dir(root, iteration)
    present = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    if not present:
        return f"checkpoint file {path} does not exist ({directory} is missing or empty)"
    return (f"checkpoint file {path} does not exist; {directory} holds {present}: the checkpoint was saved "
            f"with a different tensor/pipeline parallel layout than this run (tp={groups.tp.size}, "
            f"pp={groups.pp.size}). Run with the checkpoint's sizes or convert the checkpoint.")


def _check_layout(saved_args: dict, groups, path: str) -> None:
    for name, ours in (("tensor_model_parallel_size", groups.tp.size), ("pipeline_model_parallel_size", groups.pp.size)):
        theirs = saved_args.get(name)
        if theirs is not None and int(theirs) != ours:
            raise CheckpointError(f"{path} was saved with --{name.replace('_', '-')} {theirs} but this run uses {ours}")
    vp_saved = saved_args.get("virtual_pipeline_model_parallel_size")
    if vp_saved is not None and groups.vp_size is not None and int(vp_saved) != groups.vp_size:
        raise CheckpointError(f"{path} was saved with {vp_saved} virtual pipeline stages but this run uses {groups.vp_size}")


def _load_model_state(module: torch.nn.Module, saved: dict, path: str, key: str, strict: bool = True) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in saved and isinstance(saved[k], torch.Tensor) and saved[k].shape != own[k].shape]
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:8]) + (" …" if len(mismatched) > 8 else ""))
    if strict and missing:
        problems.append("missing from checkpoint: " + ", ".join(missing[:8]) + (" …" if len(missing) > 8 else ""))
    if strict and unexpected:
        problems.append("not in model: " + ", ".join(unexpected[:8]) + (" …" if len(unexpected) > 8 else ""))
    if problems:
        raise CheckpointError(f"{path} [{key}] does not fit the model: " + " | ".join(problems)
                              + ". Check the model flags (or use --use-checkpoint-args).")
    module.load_state_dict(saved, strict=strict)


def load_checkpoint(
    load_dir: str,
    model_chunks: Sequence[torch.nn.Module],
    optimizer,
    scheduler,
    groups,
    *,
    ckpt_step: Optional[int] = None,
    finetune: bool = False,
    load_optim: bool = True,
    load_rng: bool = True,
    exit_on_missing_checkpoint: bool = False,
    rng_tracker=None,
    strict: bool = True,
) -> LoadedCheckpoint:
    """Load this rank's file of the checkpoint in `load_dir` into the model (and optimizer,
    scheduler, RNG unless told not to). With no checkpoint there, returns iteration 0 — or raises
    with `exit_on_missing_checkpoint`. `finetune` loads the weights only and restarts at 0."""
    iteration, release = find_checkpoint_iteration(load_dir, ckpt_step)
    if iteration is None:
        if exit_on_missing_checkpoint:
            raise CheckpointError(f"--exit-on-missing-checkpoint: no {TRACKER_FILENAME} in {load_dir}; "
                                  "nothing to load")
        return LoadedCheckpoint()
    iter_dir = checkpoint_dir(load_dir, iteration, release)
    if is_torch_dist_checkpoint(iter_dir):
        return _load_torch_dist_checkpoint(iter_dir, model_chunks, optimizer, scheduler, groups, finetune=finetune,
                                           release=release, load_optim=load_optim, load_rng=load_rng,
                                           rng_tracker=rng_tracker, strict=strict)
    path = _rank_file(load_dir, iteration, groups, release)
    if not os.path.isfile(path):
        raise CheckpointError(_describe_missing(load_dir, iteration, path, groups))
    state = safe_torch_load(path)
    saved_args = state.get("args", {}) or {}
    _check_layout(saved_args, groups, path)
    keys = _model_keys(len(model_chunks))
    for key, chunk in zip(keys, model_chunks):
        if key not in state:
            raise CheckpointError(f"{path} has no '{key}' entry (it holds {sorted(k for k in state if k.startswith('model'))}); "
                                  "the number of virtual pipeline chunks differs from this run")
        _load_model_state(_unwrap(chunk), state[key], path, key, strict)
    optimizer_state_loaded = load_optim and optimizer is not None and not (finetune or release)
    reload = getattr(optimizer, "reload_model_params", None)
    if reload is not None and not optimizer_state_loaded:
        # The fp32 main params still hold the initial weights: refresh them from the loaded model,
        # or the first step would write the stale values back over the loaded weights.
        reload()
    if finetune or release:
        return LoadedCheckpoint(iteration=0, path=path)
    if load_optim and optimizer is not None:
        if "optimizer" not in state:
            raise CheckpointError(f"{path} holds no optimizer state (saved with --no-save-optim); "
                                  "load it with --no-load-optim or --finetune")
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and "opt_param_scheduler" in state:
            scheduler.load_state_dict(state["opt_param_scheduler"])
    if load_rng:
        rng_list = state.get("rng_state")
        if rng_list is None:
            raise CheckpointError(f"{path} holds no RNG state (saved with --no-save-rng); load it with --no-load-rng")
        index = groups.dp.rank if groups.dp.rank < len(rng_list) else 0
        set_rng_state(rng_list[index], rng_tracker)
    consumed_train = int(state.get("consumed_train_samples", saved_args.get("consumed_train_samples", 0)) or 0)
    consumed_valid = int(state.get("consumed_valid_samples", saved_args.get("consumed_valid_samples", 0)) or 0)
    return LoadedCheckpoint(
        iteration=int(state["iteration"]),
        num_floating_point_operations_so_far=float(state.get("num_floating_point_operations_so_far", 0.0)),
        consumed_train_samples=consumed_train,
        consumed_valid_samples=consumed_valid,
        path=path,
    )


def _load_torch_dist_checkpoint(iter_dir, model_chunks, optimizer, scheduler, groups, *, finetune, release,
                                load_optim, load_rng, rng_tracker, strict) -> LoadedCheckpoint:
    use_optim = load_optim and optimizer is not None and not (finetune or release)
    extra = load_torch_dist(iter_dir, model_chunks, optimizer if use_optim else None, groups, strict=strict)
    if optimizer is not None and not use_optim:
        optimizer.reload_model_params()
    if finetune or release:
        return LoadedCheckpoint(iteration=0, path=iter_dir)
    if use_optim and scheduler is not None and extra.get("opt_param_scheduler") is not None:
        scheduler.load_state_dict(extra["opt_param_scheduler"])
    if load_rng:
        saved_layout = extra.get("parallel_layout") or {}
        if extra.get("rng_state") is not None:
            set_rng_state(extra["rng_state"], rng_tracker)
        elif saved_layout.get("world_size") == groups.world_size and saved_layout.get("tp") == groups.tp.size \
                and saved_layout.get("pp") == groups.pp.size:
            raise CheckpointError(f"{iter_dir} holds no RNG state (saved with --no-save-rng); load it with --no-load-rng")
        elif groups.rank == 0:
            print(f"WARNING: {iter_dir} was saved with another parallel layout ({saved_layout}); the random "
                  "number generators are not restored", flush=True)
    return LoadedCheckpoint(
        iteration=int(extra["iteration"]),
        num_floating_point_operations_so_far=float(extra.get("num_floating_point_operations_so_far", 0.0)),
        consumed_train_samples=int(extra.get("consumed_train_samples", 0) or 0),
        consumed_valid_samples=int(extra.get("consumed_valid_samples", 0) or 0),
        path=iter_dir,
    )


def _saved_args(load_dir: str, ckpt_step: Optional[int]) -> tuple[dict, str]:
    """(the `args` a checkpoint recorded, its iteration directory), from tensor/pipeline rank 0's file."""
    iteration, release = find_checkpoint_iteration(load_dir, ckpt_step)
    if iteration is None:
        raise CheckpointError(f"--use-checkpoint-args: no {TRACKER_FILENAME} in {load_dir}")
    directory = checkpoint_dir(load_dir, iteration, release)
    if is_torch_dist_checkpoint(directory):
        common = safe_torch_load(os.path.join(directory, COMMON_FILENAME))
        return (common.get("extra_state") or {}).get("args") or {}, directory
    candidates = sorted(d for d in os.listdir(directory) if d.startswith("mp_rank_00")) if os.path.isdir(directory) else []
    if not candidates:
        raise CheckpointError(f"--use-checkpoint-args: {directory} holds no mp_rank_00* directory")
    return safe_torch_load(os.path.join(directory, candidates[0], MODEL_FILENAME)).get("args") or {}, directory


def resolve_tokenizer_path(name: str, value: Optional[str], load_dir: str, iteration_dir: Optional[str] = None,
                           tokenizer_type: Optional[str] = None) -> Optional[str]:
    """A tokenizer path recorded in a checkpoint (`name` is vocab_file, merge_file or
    tokenizer_model): as stored if it exists, else the file of the same name beside the checkpoint
    (in `load_dir` or its iteration directory). Raises CheckpointError naming the file when neither
    exists. A tokenizer_model that is no path (a HuggingFace model name) is returned as it is."""
    if not value or os.path.exists(value):
        return value
    looks_like_path = os.path.isabs(value) or name != "tokenizer_model" or tokenizer_type != "HuggingFaceTokenizer"
    if not looks_like_path:
        return value
    base = os.path.basename(os.path.normpath(value))
    candidates = [os.path.join(d, base) for d in (load_dir, iteration_dir) if d]
    for candidate in candidates:
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    raise CheckpointError(
        f"--use-checkpoint-args: the checkpoint's --{name.replace('_', '-')} {value} was not found, nor was "
        f"{' or '.join(candidates)}; copy the file beside the checkpoint or give --{name.replace('_', '-')}")


def load_args_from_checkpoint(args: argparse.Namespace, load_dir: Optional[str] = None,
                              names: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """--use-checkpoint-args, as Megatron: the model's description stored in the checkpoint
    (`MODEL_SHAPE_ARGS`, derived from the config dataclasses' model fields) replaces the flags; the
    tokenizer settings the user gave explicitly for this run (recorded by `parse_args`) are kept, and
    the parallel layout is always the run's. A stored tokenizer path that does not exist is looked
    for beside the checkpoint. Raises CheckpointError if there is no checkpoint or a tokenizer file
    is missing."""
    from gigatron.core.convert.protocol import TOKENIZER_FLAGS
    from gigatron.training.arguments import explicit_flags

    load_dir = load_dir or args.load
    saved, directory = _saved_args(load_dir, getattr(args, "ckpt_step", None))
    explicit = explicit_flags(args)
    replaced = []
    for name in MODEL_SHAPE_ARGS if names is None else names:
        if name not in saved or not hasattr(args, name):
            continue
        if name in explicit and name in TOKENIZER_FLAGS:
            continue  # the run's own tokenizer files
        value = saved[name]
        if name in TOKENIZER_PATH_ARGS:
            value = resolve_tokenizer_path(name, value, load_dir, directory, saved.get("tokenizer_type"))
        if name in explicit and getattr(args, name) != value:
            replaced.append(f"--{name.replace('_', '-')} {getattr(args, name)} -> {value}")
        setattr(args, name, value)
    if replaced and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"> --use-checkpoint-args: the checkpoint's model replaces {', '.join(replaced)}", flush=True)
    return args
