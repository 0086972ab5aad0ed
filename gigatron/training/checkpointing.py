"""Checkpoint orchestration for training: which format, which iteration, what to restore.

The formats themselves live in gigatron/core/checkpoint (one module each, behind the registry in
formats.py): `--ckpt-format torch` is Megatron's one-file-per-model-parallel-rank layout
(torch_layout.py, with a checksum manifest), `torch_dist` (the flag's default) the parallelism
independent one (dist/: loads at any tp/pp/dp), `megatron_torch_dist` Megatron-Core's own torch_dist
keys (megatron_dist.py: Megatron-LM resumes from it). This module builds the checkpoint header (the
run's flags and counters), gathers the RNG state, hands both to the format's
`save_training_state`, and on load asks the registry which format the iteration directory holds,
lets it restore the model (and optimizer), then applies the scheduler and RNG state.

    <save>/latest_checkpointed_iteration.txt           the last complete iteration (or "release")
    <save>/iter_{N:07d}/...                            the format's files

The tracker is written last (torch: after every rank's file and the checksum manifest; torch_dist:
by the save's finalize callback, after metadata.json; with --async-save at a later iteration),
so an interrupted save leaves the previous checkpoint in charge.
"""

from __future__ import annotations
import argparse
import os
import random
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from gigatron.core.checkpoint.formats import detect_format, get_format
from gigatron.core.checkpoint.header import CHECKPOINT_VERSION, checkpoint_header
from gigatron.core.checkpoint.io import CheckpointError, to_plain
from gigatron.core.checkpoint.paths import (
    TRACKER_FILENAME,
    checkpoint_dir,
    find_checkpoint_iteration,
    read_tracker,
)
from gigatron.core.checkpoint.torch_layout import checkpoint_file

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
    "check_checkpoint_paths",
    "check_save_dir",
    "check_load_dir",
    "save_checkpoint",
    "load_checkpoint",
    "load_args_from_checkpoint",
]

# The flags a BERT or T5 script adds for its model (extra_args_provider; no config dataclass owns them).
SCRIPT_MODEL_ARGS = ("bert_layernorm", "num_tokentypes", "bert_binary_head", "encoder_num_layers",
                     "decoder_num_layers", "t5_relative_attention", "relative_attention_num_buckets",
                     "relative_attention_max_distance", "encoder_seq_length", "decoder_seq_length")


def _model_shape_args() -> tuple[str, ...]:
    from gigatron.core.convert.protocol import MODEL_FLAGS, MOE_FLAGS, TOKENIZER_FLAGS
    from gigatron.core.fields import model_fields
    from gigatron.core.transformer.mamba.config import MambaConfig

    return tuple(dict.fromkeys(MODEL_FLAGS + MOE_FLAGS + model_fields(MambaConfig) + TOKENIZER_FLAGS
                               + SCRIPT_MODEL_ARGS + ("padded_vocab_size",)))


# What --use-checkpoint-args takes from a checkpoint: the model's description, derived from the config
# dataclasses' model fields (TransformerConfig, MoEConfig, MambaConfig, DataConfig's tokenizer fields) — never the
# run's parallel layout, precision or recompute settings.
MODEL_SHAPE_ARGS = _model_shape_args()

# Stored as absolute paths; a load that does not find one looks beside the checkpoint.
TOKENIZER_PATH_ARGS = ("vocab_file", "merge_file", "tokenizer_model")


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


# ------------------------------------------------------------------ the run's flags


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


# ------------------------------------------------------------------ start-up checks


def check_save_dir(save: Optional[str]) -> None:
    """--save must name a directory this process can write (it is created at the first save):
    refuse a file, or a place where nothing can be written, before any training is done."""
    if not save:
        return
    path = os.path.abspath(save)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise ValueError(f"--save {save} {what}; give a directory for the checkpoints")
    try:
        fd, probe = tempfile.mkstemp(prefix=".gigatron-write-test.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"--save {save}: cannot write in {existing} ({exc.strerror or exc}); choose a directory "
                         "you can write, or fix its permissions") from None


def check_load_dir(load: Optional[str], *, finetune: bool = False, ckpt_step: Optional[int] = None,
                   use_checkpoint_args: bool = False, pretrained_checkpoint: Optional[str] = None) -> None:
    """--load of a path that does not exist: an error where the flags say the run resumes from it
    (--ckpt-step, --use-checkpoint-args, --finetune without --pretrained-checkpoint), else Megatron's
    warning that training starts from scratch, printed so that it is seen."""
    if not load:
        return
    if os.path.exists(load) and not os.path.isdir(load):
        raise ValueError(f"--load {load} is a file; give the checkpoint directory (the one holding {TRACKER_FILENAME})")
    if os.path.exists(load):
        return
    resuming = [flag for flag, given in (("--ckpt-step", ckpt_step is not None),
                                         ("--use-checkpoint-args", use_checkpoint_args),
                                         ("--finetune", finetune and not pretrained_checkpoint)) if given]
    if resuming:
        raise ValueError(f"--load {load} does not exist, but {' and '.join(resuming)} need a checkpoint to load: "
                         "check the path")
    if int(os.environ.get("RANK", "0") or 0) == 0:
        bar = "!" * 78
        print(f"{bar}\nWARNING: no checkpoint found at {load} (the directory does not exist); "
              f"training from scratch\n{bar}", file=sys.stderr, flush=True)


def check_checkpoint_paths(args: argparse.Namespace) -> None:
    """Start-up checks of --save and --load (see check_save_dir, check_load_dir)."""
    check_save_dir(getattr(args, "save", None))
    check_load_dir(getattr(args, "load", None), finetune=bool(getattr(args, "finetune", False)),
                   ckpt_step=getattr(args, "ckpt_step", None),
                   use_checkpoint_args=bool(getattr(args, "use_checkpoint_args", False)),
                   pretrained_checkpoint=getattr(args, "pretrained_checkpoint", None))


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
    fp8_state: Optional[dict] = None,
) -> str:
    """Save this rank's share of a checkpoint of `iteration` and, once all ranks are done, update
    the tracker. Every rank must call it (it holds collectives). Returns the iteration directory.

    `ckpt_format` names a registered format (gigatron/core/checkpoint/formats.py). "torch_dist"
    with `async_saver` (an AsyncCheckpointSaver, --async-save) writes the files in the background
    and updates the tracker when `async_saver.maybe_finalize()` completes the save. `fp8_state`
    (the whole model's FP8 delayed-scaling state by linear name, gigatron.core.fp8.model) goes into
    the header's `fp8_state` entry."""
    fmt = get_format(ckpt_format)
    if async_saver is not None and ckpt_format != "torch_dist":
        raise ValueError("--async-save needs --ckpt-format torch_dist")
    header = checkpoint_header(_args_dict(args, consumed_train_samples, consumed_valid_samples), iteration,
                               num_floating_point_operations_so_far=num_floating_point_operations_so_far,
                               consumed_train_samples=consumed_train_samples,
                               consumed_valid_samples=consumed_valid_samples)
    if fp8_state:
        header["fp8_state"] = fp8_state
    extra = {"async_saver": async_saver} if async_saver is not None else {}
    return fmt.save_training_state(
        save_dir, iteration, model_chunks, optimizer, groups, header,
        scheduler_state=scheduler.state_dict() if save_optim and scheduler is not None else None,
        rng_state=get_rng_state(rng_tracker) if save_rng else None, save_optim=save_optim, **extra)


# ------------------------------------------------------------------ load


@dataclass
class LoadedCheckpoint:
    """What a load restored: where training resumes."""

    iteration: int = 0
    num_floating_point_operations_so_far: float = 0.0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    path: Optional[str] = None
    fp8_state: Optional[dict] = None
    """The checkpoint's FP8 delayed-scaling state (None: saved without it)."""


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
    """Load the checkpoint in `load_dir` (whatever its registered format) into the model (and
    optimizer, scheduler, RNG unless told not to). With no checkpoint there, returns iteration 0 —
    or raises with `exit_on_missing_checkpoint`. `finetune` loads the weights only and restarts at 0."""
    iteration, release = find_checkpoint_iteration(load_dir, ckpt_step)
    if iteration is None:
        if exit_on_missing_checkpoint:
            raise CheckpointError(f"--exit-on-missing-checkpoint: no {TRACKER_FILENAME} in {load_dir}; "
                                  "nothing to load")
        if groups.rank == 0:
            print(f"WARNING: no checkpoint found at {load_dir} (no {TRACKER_FILENAME}); training from scratch",
                  flush=True)
        return LoadedCheckpoint()
    iter_dir = checkpoint_dir(load_dir, iteration, release)
    fmt = detect_format(iter_dir)
    use_optim = load_optim and optimizer is not None and not (finetune or release)
    state = fmt.load_training_state(iter_dir, model_chunks, optimizer if use_optim else None, groups, strict=strict)
    reload = getattr(optimizer, "reload_model_params", None)
    if reload is not None and not state.optimizer_loaded:
        # The fp32 main params still hold the initial weights: refresh them from the loaded model,
        # or the first step would write the stale values back over the loaded weights.
        reload()
    if finetune or release:
        return LoadedCheckpoint(iteration=0, path=state.path)
    if use_optim and scheduler is not None and state.scheduler_state is not None:
        scheduler.load_state_dict(state.scheduler_state)
    if load_rng:
        _restore_rng(state, groups, rng_tracker)
    header = state.header
    return LoadedCheckpoint(
        iteration=int(header["iteration"]),
        num_floating_point_operations_so_far=float(header.get("num_floating_point_operations_so_far") or 0.0),
        consumed_train_samples=int(header.get("consumed_train_samples") or 0),
        consumed_valid_samples=int(header.get("consumed_valid_samples") or 0),
        path=state.path,
        fp8_state=header.get("fp8_state"),
    )


def _restore_rng(state, groups, rng_tracker) -> None:
    if state.rng_state is not None:
        set_rng_state(state.rng_state, rng_tracker)
    elif state.rng_missing_is_error:
        raise CheckpointError(f"{state.rng_missing}; load it with --no-load-rng")
    elif groups.rank == 0:
        print(f"WARNING: {state.rng_missing}", flush=True)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _saved_args(load_dir: str, ckpt_step: Optional[int]) -> tuple[dict, str]:
    """(the `args` a checkpoint recorded, its iteration directory), from tensor/pipeline rank 0's file."""
    iteration, release = find_checkpoint_iteration(load_dir, ckpt_step)
    if iteration is None:
        raise CheckpointError(f"--use-checkpoint-args: no {TRACKER_FILENAME} in {load_dir}")
    directory = checkpoint_dir(load_dir, iteration, release)
    return detect_format(directory).read_args(directory), directory  # the registry's format, files verified first


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
    if replaced and _rank() == 0:
        print(f"> --use-checkpoint-args: the checkpoint's model replaces {', '.join(replaced)}", flush=True)
    return args
