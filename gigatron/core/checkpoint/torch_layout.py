"""Megatron's `torch` checkpoint layout (`--ckpt-format torch`): one file per model-parallel rank.

    <root>/iter_{N:07d}/mp_rank_{tp:02d}/model_optim_rng.pt             pipeline size 1
    <root>/iter_{N:07d}/mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt    pipeline size > 1
                        (+ _{ep:03d} when the expert-parallel size is > 1)
    <root>/iter_{N:07d}/checksums.json     size and CRC-32 of every rank file (Gigatron's; Megatron
                                           ignores it), written after every rank file, before the tracker

Each file holds the header (gigatron/core/checkpoint/header.py: `args` as a plain dict, so the
file loads with `weights_only=True`, `checkpoint_version`, `iteration`, …), `model` (or `model0`,
`model1`, … per virtual pipeline chunk) with that rank's state dict, and, from training,
`optimizer`, `opt_param_scheduler` and `rng_state` (one entry per data-parallel rank). A file
listed in checksums.json is checked against it before it is read; a checkpoint without the
manifest (written before it existed, or by Megatron) loads unchecked.

This module is the one implementation of the layout: training saves and loads through
`save_training_state` / `load_training_state`, conversion writes through `write_rank_file` +
`finish_save` and reads through `read_model` (all ranks merged into full tensors).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from gigatron.core.checkpoint.io import (
    CheckpointError,
    CorruptCheckpointError,
    atomic_torch_save,
    atomic_write_text,
    file_record,
    safe_torch_load,
    to_plain,
    verify_file,
)
from gigatron.core.checkpoint.megatron_names import HYBRID_UNFUSED_NORMS
from gigatron.core.checkpoint.paths import checkpoint_dir, write_tracker
from gigatron.core.checkpoint.state import ModelState, TrainingState
from gigatron.core.checkpoint.tp_layout import mamba_segments, merge_from_tp

__all__ = [
    "NAME",
    "MODEL_FILENAME",
    "CHECKSUMS_FILENAME",
    "rank_dir_name",
    "checkpoint_file",
    "rank_dirs",
    "detect",
    "read_rank_file",
    "read_args",
    "read_model",
    "write_rank_file",
    "finish_save",
    "save_training_state",
    "load_training_state",
]

NAME = "torch"
MODEL_FILENAME = "model_optim_rng.pt"
CHECKSUMS_FILENAME = "checksums.json"

_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_LAYER = re.compile(r"^(decoder|encoder)\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")

# Megatron-LM's Transformer Engine layer spec fuses the norms into the following linear layer, the
# Mamba layer's norm into its input projection (megatron_names.HYBRID_UNFUSED_NORMS).
_TE_NORM_NAMES = HYBRID_UNFUSED_NORMS


# ------------------------------------------------------------------ paths


def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0, ep_size: int = 1) -> str:
    """`mp_rank_TT`, `mp_rank_TT_PPP` (pipeline), plus `_EEE` with expert parallelism."""
    name = f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name + (f"_{ep_rank:03d}" if ep_size > 1 else "")


def checkpoint_file(root: str, iteration: int, tp_rank: int, pp_rank: int, pp_size: int,
                    ep_rank: int = 0, ep_size: int = 1, release: bool = False) -> str:
    """Path of one model-parallel rank's file."""
    return os.path.join(checkpoint_dir(root, iteration, release), rank_dir_name(tp_rank, pp_rank, pp_size, ep_rank,
                                                                                ep_size), MODEL_FILENAME)


def rank_dirs(iter_dir: str) -> List[str]:
    """The `mp_rank_*` folders of `iter_dir` that hold a model file, sorted."""
    if not os.path.isdir(iter_dir):
        return []
    return sorted(d for d in os.listdir(iter_dir) if _RANK_DIR.match(d)
                  and os.path.isfile(os.path.join(iter_dir, d, MODEL_FILENAME)))


def detect(iter_dir: str) -> bool:
    """True if `iter_dir` holds `mp_rank_*/model_optim_rng.pt` files."""
    return bool(rank_dirs(iter_dir))


# ------------------------------------------------------------------ checksums


def _read_manifest(iter_dir: str) -> Optional[dict]:
    path = os.path.join(iter_dir, CHECKSUMS_FILENAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        files = manifest["files"]
        if not isinstance(files, dict):
            raise ValueError("'files' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(f"checksum manifest {path} is unreadable ({exc}); the checkpoint is corrupt. "
                                     "Load an earlier iteration with --ckpt-step") from exc
    return files


def _write_manifest(iter_dir: str, records: Dict[str, dict]) -> None:
    manifest = {"checksum": "crc32", "files": dict(sorted(records.items()))}
    atomic_write_text(os.path.join(iter_dir, CHECKSUMS_FILENAME), json.dumps(manifest, indent=1) + "\n")


def _verify_rank_file(path: str, manifest: Optional[dict]) -> None:
    if manifest is None:
        return  # written before checksums existed (or by Megatron): nothing to check against
    iter_dir = os.path.dirname(os.path.dirname(path))
    relative = os.path.relpath(path, iter_dir)
    problem = verify_file(path, manifest.get(relative))
    if problem is not None:
        raise CorruptCheckpointError(f"the checkpoint is corrupt: {problem} (according to "
                                     f"{os.path.join(iter_dir, CHECKSUMS_FILENAME)}). Load an earlier iteration "
                                     "with --ckpt-step, or restore the file.")


_READ_MANIFEST = object()


def read_rank_file(path: str, allow_namespace: bool = False, manifest: Any = _READ_MANIFEST) -> dict:
    """One rank's file, checked against the iteration's checksums.json first (when it has one),
    then loaded weights-only (`allow_namespace`: also accept Megatron-LM's argparse.Namespace args).
    `manifest`: the iteration's manifest when the caller has read it already (None: there is none)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if manifest is _READ_MANIFEST:
        manifest = _read_manifest(os.path.dirname(os.path.dirname(path)))
    _verify_rank_file(path, manifest)
    try:
        return safe_torch_load(path, allow_namespace=allow_namespace)
    except CheckpointError as exc:
        if "weights-only" not in str(exc) or allow_namespace:
            raise
        raise CheckpointError(f"{exc}. A checkpoint saved by Megatron-LM itself stores its args as an argparse "
                              "Namespace: convert it with --allow-pickle") from exc


def write_rank_file(iter_dir: str, relative: str, state: dict) -> Tuple[str, dict]:
    """Write one rank's file atomically; returns (path relative to `iter_dir`, its checksum record)."""
    path = os.path.join(iter_dir, relative)
    atomic_torch_save(state, path)
    return relative, file_record(path)


def finish_save(root: str, iter_dir: str, iteration: Optional[int], records: Dict[str, dict]) -> None:
    """After every rank file is written: the checksum manifest, then the tracker (None: `release`)."""
    _write_manifest(iter_dir, records)
    write_tracker(root, iteration)


# ------------------------------------------------------------------ reading a whole model


def _args_of(state: dict) -> dict:
    args = state.get("args") or {}
    return dict(vars(args)) if hasattr(args, "__dict__") and not isinstance(args, dict) else dict(args)


def read_args(iter_dir: str, allow_namespace: bool = False) -> dict:
    """The flags stored in tensor/pipeline rank 0's file."""
    candidates = [d for d in rank_dirs(iter_dir) if d.startswith("mp_rank_00")]
    if not candidates:
        raise CheckpointError(f"{iter_dir} holds no mp_rank_00*/{MODEL_FILENAME} file")
    return _args_of(read_rank_file(os.path.join(iter_dir, candidates[0], MODEL_FILENAME), allow_namespace))


def _parse_rank_dirs(iter_dir: str, args: dict) -> Dict[Tuple[int, int, int], str]:
    """{(tp_rank, pp_rank, ep_rank): file} for every model-parallel rank. Folder names:
    mp_rank_TT, mp_rank_TT_PPP (pipeline), mp_rank_TT_EEE (expert parallel, no pipeline),
    mp_rank_TT_PPP_EEE (both)."""
    pp_size = args.get("pipeline_model_parallel_size")  # None: the folder names tell
    ep_size = int(args.get("expert_model_parallel_size") or 1)
    files = {}
    for d in rank_dirs(iter_dir):
        tp_s, second, third = _RANK_DIR.match(d).groups()
        if third is not None:
            if ep_size == 1:
                raise CheckpointError(f"{d}: an expert-parallel rank folder, but the checkpoint's args say "
                                      "expert_model_parallel_size 1")
            pp_rank, ep_rank = int(second), int(third)
        elif second is not None and ep_size > 1 and (pp_size is None or int(pp_size) == 1):
            pp_rank, ep_rank = 0, int(second)
        elif second is not None and pp_size is not None and int(pp_size) == 1:
            raise CheckpointError(f"{d}: a pipeline or expert rank folder, but the checkpoint's args say neither")
        else:
            pp_rank, ep_rank = (int(second) if second is not None else 0), 0
        files[(int(tp_s), pp_rank, ep_rank)] = os.path.join(iter_dir, d, MODEL_FILENAME)
    return files


def _chunk_keys(state: dict) -> List[str]:
    if "model" in state:
        return ["model"]
    keys = sorted((k for k in state if re.fullmatch(r"model\d+", k)), key=lambda k: int(k[5:]))
    if not keys:
        raise CheckpointError("checkpoint file holds no 'model' entry")
    return keys


def _check_expert_layout(args: dict) -> None:
    """Experts are merged per expert (SequentialMLP) and split like the dense layers."""
    if not args.get("num_experts"):
        return
    if args.get("moe_grouped_gemm"):
        raise CheckpointError("this checkpoint stores its experts as GroupedMLP weight1/weight2 (--moe-grouped-gemm); "
                              "only SequentialMLP experts (mlp.experts.local_experts.*) are read as whole tensors: "
                              "save it without --moe-grouped-gemm first")
    etp = args.get("expert_tensor_parallel_size")
    tp = int(args.get("tensor_model_parallel_size") or 1)
    if etp is not None and int(etp) != tp:
        raise CheckpointError(f"expert tensor-parallel size {etp} differs from the tensor-parallel size {tp}; "
                              "only checkpoints whose experts are split like the dense layers are read")


def _merge_stage(states: dict, key: str, pp_rank: int, sizes: Tuple[int, int], offsets: Dict[str, int],
                 local_experts: int, args: dict, merged: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """Merge one model chunk of one pipeline rank over its tp (and ep) ranks into `merged`
    (global layer numbers of the decoder / encoder from `offsets`); returns the number of layers
    of each stack it holds."""
    tp_size, ep_size = sizes
    local_layers: Dict[str, set] = {}
    for ep_rank in range(ep_size):
        shards = [states[(t, pp_rank, ep_rank)][key] for t in range(tp_size)]
        for name in shards[0]:
            tensor_list = [s[name] for s in shards]
            if name.endswith("._extra_state") or any(not isinstance(t, torch.Tensor) for t in tensor_list):
                continue
            match = _LAYER.match(name)
            if match:
                stack, local = match.group(1), int(match.group(2))
                local_layers.setdefault(stack, set()).add(local)
                suffix = _TE_NORM_NAMES.get(match.group(3), match.group(3))
                expert = _EXPERT.match(suffix)
                if expert:  # local expert j of expert-parallel rank e is global expert e * G + j
                    suffix = f"mlp.experts.local_experts.{int(expert.group(1)) + ep_rank * local_experts}.{expert.group(2)}"
                elif ep_rank > 0:
                    continue  # everything but the experts is the same on every expert-parallel rank
                global_name = f"{stack}.layers.{local + offsets.get(stack, 0)}.{suffix}"
            elif ep_rank > 0:
                continue
            else:
                global_name = name
            if global_name in merged:
                continue  # the tied output layer's copy on the last stage
            segments = mamba_segments(global_name, args) if tp_size > 1 else None
            merged[global_name] = merge_from_tp(global_name, tensor_list, bool(args.get("swiglu")), segments)
    for stack, layers in local_layers.items():
        if sorted(layers) != list(range(len(layers))):
            raise CheckpointError(f"pipeline rank {pp_rank} ({key}) holds {stack} layers {sorted(layers)}; "
                                  "expected 0..n-1")
    return {stack: len(layers) for stack, layers in local_layers.items()}


def read_model(iter_dir: str, allow_namespace: bool = False,
               transform: Optional[Callable[[dict, str], dict]] = None) -> ModelState:
    """Every rank's file of `iter_dir` (any tp/pp/ep, virtual stages too) merged into full tensors.
    `transform(state, path)`: applied to each file's content as read (another layout's names, e.g.
    the legacy ones, mapped to ours; args made plain)."""
    found = rank_dirs(iter_dir)
    if not found:
        raise CheckpointError(f"{iter_dir} holds no mp_rank_*/{MODEL_FILENAME} files")
    manifest = _read_manifest(iter_dir)

    def read(path: str) -> dict:
        state = read_rank_file(path, allow_namespace, manifest)
        return transform(state, path) if transform is not None else state

    first_file = os.path.join(iter_dir, found[0], MODEL_FILENAME)
    first = read(first_file)
    args = _args_of(first)
    release = os.path.basename(os.path.normpath(iter_dir)) == "release"
    iteration = None if release else int(first.get("iteration") or 0)
    _check_expert_layout(args)
    files = _parse_rank_dirs(iter_dir, args)
    tp_size, pp_size, ep_size = (1 + max(k[i] for k in files) for i in range(3))
    expected = {(t, p, e) for t in range(tp_size) for p in range(pp_size) for e in range(ep_size)}
    if set(files) != expected:
        raise CheckpointError(f"{iter_dir} lacks the files of (tp, pp, ep) ranks {sorted(expected - set(files))}")
    num_experts = int(args.get("num_experts") or 0)
    if ep_size > 1 and (not num_experts or num_experts % ep_size != 0):
        raise CheckpointError(f"{iter_dir} has {ep_size} expert-parallel ranks but its args say num_experts "
                              f"{args.get('num_experts')}")
    states = {key: (first if f == first_file else read(f)) for key, f in files.items()}
    # Model chunks in global order: virtual stage first, then pipeline rank.
    num_chunks = len(_chunk_keys(states[(0, 0, 0)]))
    merged: Dict[str, torch.Tensor] = {}
    offsets: Dict[str, int] = {}
    for v in range(num_chunks):
        for pp_rank in range(pp_size):
            key = _chunk_keys(states[(0, pp_rank, 0)])[v]
            counts = _merge_stage(states, key, pp_rank, (tp_size, ep_size), offsets, num_experts // ep_size,
                                  args, merged)
            for stack, count in counts.items():
                offsets[stack] = offsets.get(stack, 0) + count
    # The layer count of a GPT (decoder) or BERT (encoder); T5's stacks carry their own counts.
    offset = offsets.get("decoder", offsets.get("encoder", 0))
    if "embedding.word_embeddings.weight" not in merged:
        raise CheckpointError(f"{iter_dir} holds no embedding.word_embeddings.weight; it is not a GPT checkpoint")
    if args.get("num_layers") is not None and int(args["num_layers"]) != offset:
        raise CheckpointError(f"the checkpoint's args say {args['num_layers']} layers but its files hold {offset}")
    dtype = merged["embedding.word_embeddings.weight"].dtype
    return ModelState(args=args, tensors=merged, iteration=iteration, path=iter_dir, dtype=dtype)


# ------------------------------------------------------------------ training save / load


def _tensors_to_bytes(obj):
    """Replace tensors by plain bytes records, so that gathering pickles no tensor storages."""
    if isinstance(obj, torch.Tensor):
        array = obj.detach().cpu().contiguous().numpy()
        return {"__tensor_bytes__": array.tobytes(), "dtype": array.dtype.str, "shape": list(array.shape)}
    if isinstance(obj, dict):
        return {k: _tensors_to_bytes(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tensors_to_bytes(v) for v in obj)
    return obj


def _bytes_to_tensors(obj):
    if isinstance(obj, dict) and "__tensor_bytes__" in obj:
        array = np.frombuffer(obj["__tensor_bytes__"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
        return torch.from_numpy(array.copy())
    if isinstance(obj, dict):
        return {k: _bytes_to_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_bytes_to_tensors(v) for v in obj)
    return obj


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather_object_in(group, obj) -> list:
    """Every member's `obj` (tensors inside travel as bytes)."""
    if group is None or group.group is None or group.size <= 1:
        return [obj]
    gathered = [None] * group.size
    dist.all_gather_object(gathered, _tensors_to_bytes(obj), group=group.group)
    return [_bytes_to_tensors(item) for item in gathered]


def _gather_world(obj) -> list:
    if not _distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank_relative(groups) -> str:
    return os.path.join(rank_dir_name(groups.tp.rank, groups.pp.rank, groups.pp.size,
                                      groups.ep.rank if groups.ep.size > 1 else 0, groups.ep.size), MODEL_FILENAME)


def _unwrap(chunk):
    """The module inside a data-parallel wrapper (state dict keys are the bare model's)."""
    return getattr(chunk, "module", chunk)


def _model_keys(num_chunks: int) -> list[str]:
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def save_training_state(root: str, iteration: int, model_chunks: Sequence[torch.nn.Module], optimizer, groups,
                        header: dict, *, scheduler_state: Optional[dict] = None, rng_state: Optional[dict] = None,
                        save_optim: bool = True) -> str:
    """Every rank: write this rank's share of iteration `iteration` under `root` (one file per
    model-parallel rank, by the first rank holding it), then rank 0 writes checksums.json and the
    tracker. Collective. Returns the iteration directory."""
    rng_states = _all_gather_object_in(groups.dp, rng_state) if rng_state is not None else None
    # The optimizer's own state dict (it may gather data-parallel shards: every rank calls it).
    optimizer_state = optimizer.state_dict() if save_optim and optimizer is not None else None
    relative = _rank_relative(groups)
    writer = groups.dp.rank == 0 and groups.cp.rank == 0
    if groups.ep.size > 1:
        # A file holds one (tp, pp, ep) combination; its ranks are not one data-parallel group
        # (experts are replicated over expt_dp, dense weights over dp): the lowest rank writes it.
        paths = _gather_world(relative)
        writer = paths.index(relative) == (dist.get_rank() if _distributed() else 0)
    iter_dir = checkpoint_dir(root, iteration)
    record = None
    if writer:
        state: dict[str, Any] = dict(header)
        for key, chunk in zip(_model_keys(len(model_chunks)), model_chunks):
            state[key] = _unwrap(chunk).state_dict()
        if optimizer_state is not None:
            state["optimizer"] = to_plain(optimizer_state)
            if scheduler_state is not None:
                state["opt_param_scheduler"] = to_plain(scheduler_state)
        if rng_states is not None:
            state["rng_state"] = to_plain(rng_states)
        record = write_rank_file(iter_dir, relative, state)
    records = dict(r for r in _gather_world(record) if r is not None)
    if groups.rank == 0:
        finish_save(root, iter_dir, iteration, records)
    _barrier()
    return iter_dir


def _describe_missing(iter_dir: str, path: str, groups) -> str:
    present = sorted(os.listdir(iter_dir)) if os.path.isdir(iter_dir) else []
    if not present:
        return f"checkpoint file {path} does not exist ({iter_dir} is missing or empty)"
    return (f"checkpoint file {path} does not exist; {iter_dir} holds {present}: the checkpoint was saved "
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

    def listed(items: list) -> str:
        return ", ".join(items[:8]) + (" …" if len(items) > 8 else "")

    problems = []
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:8]) + (" …" if len(mismatched) > 8 else ""))
    if strict and missing:
        problems.append("missing from checkpoint: " + listed(missing))
    if strict and unexpected:
        problems.append("not in model: " + listed(unexpected))
    if problems:
        raise CheckpointError(f"{path} [{key}] does not fit the model: " + " | ".join(problems)
                              + ". Check the model flags (or use --use-checkpoint-args).")
    module.load_state_dict(saved, strict=strict)


def load_training_state(iter_dir: str, model_chunks: Sequence[torch.nn.Module], optimizer, groups, *,
                        strict: bool = True) -> TrainingState:
    """Load this rank's file of `iter_dir` into the model chunks (and `optimizer` unless None);
    return the header, scheduler state and this rank's RNG state."""
    relative = _rank_relative(groups)
    path = os.path.join(iter_dir, relative)
    if not os.path.isfile(path):
        raise CheckpointError(_describe_missing(iter_dir, path, groups))
    state = read_rank_file(path)
    saved_args = state.get("args", {}) or {}
    _check_layout(saved_args, groups, path)
    for key, chunk in zip(_model_keys(len(model_chunks)), model_chunks):
        if key not in state:
            raise CheckpointError(f"{path} has no '{key}' entry (it holds {sorted(k for k in state if k.startswith('model'))}); "
                                  "the number of virtual pipeline chunks differs from this run")
        _load_model_state(_unwrap(chunk), state[key], path, key, strict)
    if optimizer is not None:
        if "optimizer" not in state:
            raise CheckpointError(f"{path} holds no optimizer state (saved with --no-save-optim); "
                                  "load it with --no-load-optim or --finetune")
        optimizer.load_state_dict(state["optimizer"])
    rng_list = state.get("rng_state")
    header = {
        "args": saved_args,
        "iteration": int(state.get("iteration") or 0),
        "num_floating_point_operations_so_far": float(state.get("num_floating_point_operations_so_far", 0.0)),
        "consumed_train_samples": int(state.get("consumed_train_samples",
                                                saved_args.get("consumed_train_samples", 0)) or 0),
        "consumed_valid_samples": int(state.get("consumed_valid_samples",
                                                saved_args.get("consumed_valid_samples", 0)) or 0),
        "fp8_state": state.get("fp8_state"),
    }
    return TrainingState(
        header=header, path=path, optimizer_loaded=optimizer is not None,
        scheduler_state=state.get("opt_param_scheduler"),
        rng_state=None if rng_list is None else rng_list[groups.dp.rank if groups.dp.rank < len(rng_list) else 0],
        rng_missing=None if rng_list is not None else f"{path} holds no RNG state (saved with --no-save-rng)")
