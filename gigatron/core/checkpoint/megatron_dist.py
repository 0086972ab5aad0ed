"""Megatron-Core's own `torch_dist` checkpoints (written by `megatron.core.dist_checkpointing.save`,
Megatron-LM's default --ckpt-format), read as they are.

    iter_N/metadata.json     {"sharded_backend": "torch_dist", ...} without our checksum manifest
    iter_N/.metadata         PyTorch's tensor index (plus Megatron's cached save plans)
    iter_N/__R_K.distcp      tensor data of every writing rank
    iter_N/common.pt         what is not sharded: args (a pickled Namespace), iteration,
                             checkpoint_version, opt_param_scheduler, FLOPs counter

Keys are Megatron-Core's (megatron_names.py: decoder layers stacked under one key with a leading
layer axis, routed SequentialMLP experts with a second, global-expert axis, fused-norm names). `.metadata` is read with dist/metadata.py's allow-list unpickler,
common.pt with megatron_pickle.py's allow-list, and only tensor entries of the data files are
read (weights-only) through PyTorch's reader; byte entries (Transformer Engine's `_extra_state`,
Megatron's pickled ShardedObjects) never go through it: the one byte entry used, the RNG state, is
read by offset and unpickled with the Megatron allow-list. Megatron writes no checksums, so there are none to check.

`read_model` reads the model tensors whole (from_pretrained, convert.py --loader core). `--load`
(`load_training_state`) plans, for each chunk of each parameter this rank holds (dist/sharding.py,
at ANY tensor/pipeline layout), the read of the matching box of Megatron's global tensor — the
layer number becomes an offset along the stacked axis — and reads only those. The iteration,
consumed samples (in args), FLOPs counter and learning-rate schedule come from common.pt, and at
the writer's tp/pp this rank's RNG state from Megatron's `rng_state` ShardedObject (its bytes
entry read directly and unpickled through the Megatron allow-list). Megatron's Adam state (plain
optimizer, or the distributed optimizer saved as "fully_reshardable") is model-space like the
weights: each of this rank's optimizer chunks reads its box of `optimizer.state.{exp_avg,
exp_avg_sq,fp32_param|param}.<Megatron key>`, so it too loads at any layout, into the plain or the
distributed optimizer; the step and parameter-group hyper-parameters come from common.pt. The
distributed optimizer's default "dp_reshardable" state (flat per-bucket tensors in Megatron's
gradient-buffer order) is placed back into model space by megatron_dp_buffers.py. Expert
tensors other than the routed experts and the router (shared experts, for one) are refused with
the Megatron-LM command that re-saves the model.

BERT and T5 (Megatron-Core's BertModel / T5Model) are read and written the same way: their
`encoder.layers.*` are stacked like the decoder's, T5's duplicate keys are skipped and written as
copies (megatron_names.py). Their Adam state (plain optimizer, distributed optimizer
"fully_reshardable") loads as a GPT's does; T5's state of its output bias and position embedding
may be stored under the duplicate name (`_saved_alias`). A BERT/T5 "dp_reshardable" state is
refused (megatron_dp_buffers.py knows a GPT's gradient-buffer order only) with the flag that
re-saves it in model space.

Mamba / hybrid models (Megatron-Core's MambaModel) keep every layer under its own number and
split the mixer's in_proj / conv1d into parts (megatron_names.py); `_per_layer_pieces` maps a
chunk onto them, so they load at any layout and are written the same ways as a GPT.

Writing (`write_megatron_dist`, convert.py --saver megatron_dist): a model as Megatron-Core's own
torch_dist, loadable by `megatron.core.dist_checkpointing.load` into its GPTModel (BertModel,
T5Model): stacked keys,
fused-norm names, the `_extra_state` objects its loader expects, common.pt with a Namespace `args`
and Megatron's four-key metadata.json. Training writes the same layout with --ckpt-format
megatron_torch_dist (`save_training_state`, model and Adam state from every rank: see the section
at the end); --ckpt-format torch_dist stays Gigatron's own (dist/).
"""

from __future__ import annotations

import io
import itertools
import os
import re
from typing import Optional, Sequence

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan

from gigatron.core.checkpoint.dist.common import COMMON_FILENAME, Comm, parallel_layout, process_rank
from gigatron.core.checkpoint.dist.load import ViewLoadPlanner, plan_reads
from gigatron.core.checkpoint.dist.metadata import looks_like_megatron_torch_dist, read_dcp_metadata
from gigatron.core.checkpoint.dist.sharding import ShardPiece, sharded_model_state
from gigatron.core.checkpoint.foreign import rng_state_from_megatron
from gigatron.core.checkpoint.io import CheckpointError, CorruptCheckpointError, safe_torch_load
from gigatron.core.checkpoint.megatron_names import (
    ALIASES,
    EXPERTS_PREFIX,
    aliases_in,
    holds_hybrid_layers,
    hybrid_key,
    hybrid_parts,
    hybrid_to_ours,
    split_block_name,
    stacked_axes,
    stacked_candidates,
    unstacked_name,
)
from gigatron.core.checkpoint.megatron_torch import header_of, plain_args
from gigatron.core.checkpoint.state import ModelState, TrainingState

__all__ = ["NAME", "WRITES", "detect", "read_common", "read_args", "read_model", "save_training_state",
           "load_training_state", "megatron_pieces", "megatron_state", "write_megatron_dist", "MEGATRON_RECORD"]

NAME = "megatron_torch_dist"
WRITES = True  # --ckpt-format megatron_torch_dist

_OPTIMIZER_PREFIX = "optimizer."


def detect(iter_dir: str) -> bool:
    """A directory written by Megatron-Core's dist_checkpointing (metadata.json without our manifest)."""
    return looks_like_megatron_torch_dist(iter_dir)


def read_common(iter_dir: str) -> dict:
    """common.pt (through the Megatron allow-list), its args made plain."""
    path = os.path.join(iter_dir, COMMON_FILENAME)
    if not os.path.isfile(path):
        raise CorruptCheckpointError(f"{iter_dir} has no {COMMON_FILENAME}: the Megatron-Core checkpoint is "
                                     "incomplete or was not saved by Megatron-LM's training loop")
    common = safe_torch_load(path, allow_namespace=True)
    if not isinstance(common, dict):
        raise CorruptCheckpointError(f"{path} holds a {type(common).__name__}, not Megatron's common state")
    common = dict(common)
    common["args"] = plain_args(common.get("args"))
    return common


def read_args(iter_dir: str, allow_namespace: bool = True) -> dict:
    del allow_namespace
    return read_common(iter_dir)["args"]


def _model_entries(metadata, iter_dir: str = "") -> dict:
    entries = {key: md for key, md in metadata.state_dict_metadata.items()
               if isinstance(md, TensorStorageMetadata) and not key.startswith(_OPTIMIZER_PREFIX)}
    unread = sorted(key for key in entries if ".mlp." in key and ("experts." in key or ".router." in key)
                    and not key.startswith(EXPERTS_PREFIX) and key != "decoder.layers.mlp.router.weight")
    for alias in aliases_in(entries):  # T5Model's second copy of its output bias / position embedding
        del entries[alias]
    if unread:
        raise CheckpointError(f"{iter_dir} holds mixture-of-experts tensors Gigatron does not read from Megatron-Core's "
                              f"torch_dist ({', '.join(unread[:4])}): save it with Megatron-LM as --ckpt-format torch "
                              "(--ckpt-convert-format torch --ckpt-convert-save DIR) and load DIR/torch")
    return entries


def _read(iter_dir: str, metadata, pieces: list[ShardPiece]) -> None:
    """Read the boxes `pieces` describe (keys and offsets in Megatron's global tensors) in place."""
    items, destinations, problems = plan_reads(pieces, metadata)
    if problems:
        raise CheckpointError(f"{iter_dir}: " + "; ".join(problems[:10]))
    reader = FileSystemReader(os.path.abspath(iter_dir))
    reader.set_up_storage_reader(metadata, process_rank() == 0, rank=process_rank(), use_collectives=False)
    plan = reader.prepare_local_plan(LoadPlan(items))
    try:
        with torch.no_grad():
            reader.read_data(plan, ViewLoadPlanner(destinations)).wait()
    except Exception as exc:
        files = sorted({reader.storage_data[i.storage_index].relative_path for i in items})
        raise CorruptCheckpointError(f"reading {iter_dir} ({', '.join(files[:8])}) failed: "
                                     f"{type(exc).__name__}: {exc}") from exc


def read_model(iter_dir: str, allow_namespace: bool = True) -> ModelState:
    """The model tensors, whole, under our names (stacked layers split, fused norms renamed)."""
    del allow_namespace
    common = read_common(iter_dir)
    metadata = read_dcp_metadata(iter_dir)
    whole, pieces = {}, []
    for key, md in _model_entries(metadata, iter_dir).items():
        whole[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        pieces.append(ShardPiece(key, whole[key], tuple(md.size), (0,) * len(md.size)))
    _read(iter_dir, metadata, pieces)
    tensors = {}
    for key, tensor in whole.items():
        axes = stacked_axes(key)
        for index in itertools.product(*(range(n) for n in tensor.shape[:axes])):
            tensors[unstacked_name(key, index) if axes else key] = tensor[index].clone()
    if holds_hybrid_layers(whole):  # a MambaModel: per-layer keys, fused norms, split mixer tensors
        tensors = hybrid_to_ours(tensors)
    if "embedding.word_embeddings.weight" not in tensors:
        raise CheckpointError(f"{iter_dir} holds no embedding.word_embeddings.weight; it is not a GPT checkpoint")
    release = os.path.basename(os.path.normpath(iter_dir)) == "release"
    return ModelState(args=common["args"], tensors=tensors,
                      iteration=None if release else int(common.get("iteration") or 0), path=iter_dir,
                      dtype=tensors["embedding.word_embeddings.weight"].dtype)


def megatron_pieces(pieces: list[ShardPiece], entries: dict) -> tuple[list[ShardPiece], list[str]]:
    """Our chunks (global names) as chunks of Megatron-Core's keys: a layer parameter becomes a
    [1, ...] box of the stacked key at the layer's offset (a routed expert a [1, 1, ...] box at
    (layer, global expert)). Returns (pieces, problems)."""
    mapped, problems = [], []
    for piece in pieces:
        split = split_block_name(piece.key)
        if split is None:
            mapped.append(piece)
            continue
        block, layer, suffix = split
        candidates = stacked_candidates(suffix, block)
        key, extra = next(((k, e) for k, e in candidates if k in entries), candidates[0])
        per_layer = None if key in entries else _per_layer_pieces(piece, entries)
        if per_layer is not None:  # a hybrid model (MambaStack): the layer's own keys
            mapped += per_layer[0]
            problems += per_layer[1]
            continue
        if key not in entries:
            problems.append(f"missing from checkpoint: {piece.key} (Megatron key {key})")
            continue
        index = (layer, *extra)
        stacked = tuple(int(n) for n in entries[key].size[:len(index)])
        if any(i >= n for i, n in zip(index, stacked)):
            problems.append(f"{piece.key}: the checkpoint's {key} holds {stacked} (layers, experts)")
            continue
        tensor = piece.tensor.reshape((1,) * len(index) + tuple(piece.tensor.shape))
        mapped.append(ShardPiece(key, tensor, (*stacked, *piece.global_shape), (*index, *piece.global_offsets),
                                 piece.write, piece.vocab))
    return mapped, problems


def _per_layer_pieces(piece: ShardPiece, entries: dict) -> Optional[tuple[list[ShardPiece], list[str]]]:
    """Our chunk of a layer parameter as chunks of Megatron-Core's per-layer keys of a hybrid model
    (megatron_names.hybrid_key: `decoder.layers.{i}.…`, fused norm names; a split mixer tensor's
    rows go to its parts `….z`, `….x`, … at their offsets within each part); None where the
    checkpoint has no such key. Returns (pieces, problems)."""
    import dataclasses

    key, parts = hybrid_key(piece.key), hybrid_parts(piece.key)
    if parts is None:
        return ([dataclasses.replace(piece, key=key)], []) if key in entries else None
    keys = [f"{key}.{part}" for part in parts]
    if not all(k in entries for k in keys):
        return None
    start, end = piece.global_offsets[0], piece.global_offsets[0] + piece.tensor.shape[0]
    out, part_start = [], 0
    for part_key in keys:
        rows = int(entries[part_key].size[0])
        lo, hi = max(start, part_start), min(end, part_start + rows)
        if lo < hi:
            out.append(ShardPiece(part_key, piece.tensor.narrow(0, lo - start, hi - lo),
                                  (rows, *piece.global_shape[1:]), (lo - part_start, *piece.global_offsets[1:]),
                                  piece.write, piece.vocab))
        part_start += rows
    if part_start != piece.global_shape[0]:
        return [], [f"{piece.key} has {piece.global_shape[0]} rows, the checkpoint's parts {', '.join(keys)} "
                    f"{part_start}: check the --mamba-* flags"]
    return out, []


def load_training_state(iter_dir: str, model_chunks: Sequence[torch.nn.Module], optimizer, groups, *,
                        strict: bool = True) -> TrainingState:
    """Load the weights (and, with `optimizer`, Megatron's Adam state: see `megatron_optimizer_pieces`)
    into the model chunks at this run's layout (collective); header and schedule from common.pt."""
    common = read_common(iter_dir)
    metadata = read_dcp_metadata(iter_dir)
    entries = _model_entries(metadata, iter_dir)
    pieces, problems = megatron_pieces(sharded_model_state(model_chunks, groups), entries)
    states, opt_common, buffers = [], None, None
    if optimizer is not None:
        try:
            opt_common = megatron_optimizer_common(iter_dir, common, metadata, optimizer)
            if _optimizer_record(common)[1] == "dp_reshardable":
                buffers = _dp_reshardable_read(metadata, common["args"], entries)
        except CheckpointError as exc:
            problems.append(str(exc))
        else:
            if buffers is not None:  # flat bucket segments, read apart from the model (below)
                from gigatron.core.checkpoint.dist.sharding import optimizer_load_pieces

                opt_pieces, states = optimizer_load_pieces(optimizer, model_chunks, "adam", True,
                                                           buffers.saved_keys())
                buffers.add(opt_pieces)
                buffer_pieces = buffers.read_pieces(megatron_pieces)
                problems += buffers.problems
            else:
                opt_pieces, states, opt_problems = megatron_optimizer_pieces(optimizer, model_chunks, metadata)
                pieces += opt_pieces
                problems += opt_problems
    if strict:
        used = {(p.key, tuple(p.global_offsets[:stacked_axes(p.key)])) for p in pieces if p.key in entries}
        everywhere = set().union(*[set(u) for u in Comm().all_gather_object(sorted(used))])
        unused = sorted(key for key, md in entries.items()
                        if any((key, index) not in everywhere for index in
                               itertools.product(*(range(int(n)) for n in md.size[:stacked_axes(key)]))))
        if unused and groups.rank == 0:
            problems.append(f"not in the model (or not every layer of it): {unused[:8]}")
    gathered = Comm().all_gather_object(problems)
    merged = [p for ps in gathered for p in ps]
    if merged:
        raise CheckpointError(f"Megatron-Core checkpoint {iter_dir} does not fit this model (check the model flags, "
                              "or use --use-checkpoint-args): " + "; ".join(merged[:10]))
    _read(iter_dir, metadata, pieces)
    if buffers is not None:
        _read(iter_dir, metadata, buffer_pieces)
        mismatches = [p for ps in Comm().all_gather_object(buffers.finish()) for p in ps]
        if mismatches:
            raise CheckpointError(f"Megatron-Core checkpoint {iter_dir}: " + "; ".join(mismatches[:4]))
    if optimizer is not None:
        from gigatron.core.checkpoint.dist.load import _install_optimizer_state as install_optimizer_state

        install_optimizer_state(optimizer, states, opt_common)
    header = header_of(common, common["args"])
    ours = common.get(GIGATRON_ENTRY) if isinstance(common.get(GIGATRON_ENTRY), dict) else {}
    if ours.get("fp8_state") is not None:
        header["fp8_state"] = ours["fp8_state"]
    if ours.get("rng_states") and ours.get("parallel_layout") == parallel_layout(groups):
        rng_state, missing = ours["rng_states"][process_rank()], None  # ours, the tracker's states included
    else:
        rng_state, missing = _rng_state(iter_dir, metadata, common["args"], groups)
    return TrainingState(header=header, path=iter_dir, optimizer_loaded=optimizer is not None,
                         scheduler_state=common.get("opt_param_scheduler"), rng_state=rng_state,
                         rng_missing=missing, rng_missing_is_error=False)


# ------------------------------------------------------------------ Megatron-Core's optimizer state
#
# What Megatron-Core 0.16 stores for Adam (`optimizer.sharded_state_dict`, under the state's
# "optimizer" entry): per-element states as ShardedTensors in MODEL space, keyed by the model key,
#   plain optimizer (FP32Optimizer / Float16OptimizerWithFloat16Params):
#       optimizer.state.exp_avg.<key>, optimizer.state.exp_avg_sq.<key>,
#       optimizer.state.fp32_param.<key> (bf16/fp16 parameters only);
#       common.pt: optimizer.state.common_step, optimizer.param_groups (bf16/fp16: under
#       optimizer.optimizer, with the grad scaler beside it)
#   distributed optimizer, distrib_optim_sharding_type "fully_reshardable":
#       optimizer.state.param.<key> (the fp32 main param, always), exp_avg, exp_avg_sq;
#       common.pt: optimizer.optimizer.param_groups (each with the step), param_state_sharding_type
#   distributed optimizer, "dp_reshardable" (Megatron-LM's default without
#   --dist-ckpt-optim-fully-reshardable): Megatron's internal gradient-buffer layout, one flat
#   tensor per bucket and state (optimizer.distributed.dp_group_idx_G.gbuf_idx_B.dtype_(...).
#   bucket_idx_K.{param,exp_avg,exp_avg_sq}); the param groups with the step in the ShardedObject
#   optimizer.distributed.dp_group_idx_G.optimizer; common.pt: param_state_sharding_type only.
#   megatron_dp_buffers.py re-derives each parameter's offset in its bucket and reads it into
#   model space (dense GPT writers at any tp/pp/dp with equal pipeline stages; others refused).
# "dp_zero_gather_scatter" (a pickled object gathered on data-parallel rank 0, deprecated) is
# refused, and "fully_sharded_model_space" (megatron-core's own fallback) cannot be saved by 0.16
# at all (dist_checkpointing refuses its flattened ranges); the refusal names the Megatron-LM
# flag that re-saves the state in model space.

_MAIN_PARAM_NAMES = ("fp32_param", "param")  # plain optimizer, distributed optimizer (fully_reshardable)
_ADAM_STATES = ("exp_avg", "exp_avg_sq")


def _optimizer_record(common: dict) -> tuple[dict, Optional[str]]:
    """(the torch optimizer's state dict, the distributed optimizer's sharding type or None) of
    common.pt's "optimizer" entry, for each of Megatron's nestings."""
    record = common.get("optimizer")
    if not isinstance(record, dict):
        return {}, None
    sharding = record.get("param_state_sharding_type")
    inner = record.get("optimizer") if isinstance(record.get("optimizer"), dict) else record
    return inner, sharding


def _step_of(inner: dict) -> Optional[int]:
    step = (inner.get("state") or {}).get("common_step") if isinstance(inner.get("state"), dict) else None
    if step is None:
        steps = {float(g["step"]) for g in inner.get("param_groups") or [] if isinstance(g, dict) and "step" in g}
        if len(steps) > 1:
            raise CheckpointError(f"the optimizer's parameter groups disagree on the step ({sorted(steps)})")
        step = steps.pop() if steps else None
    return None if step is None else int(float(step))


def megatron_optimizer_common(iter_dir: str, common: dict, metadata, optimizer) -> dict:
    """What `install_optimizer_state` needs (kind, step, parameter-group hyper-parameters, grad
    scaler) from common.pt, the groups matched to ours by (weight-decay multiplier, lr multiplier);
    a CheckpointError where Megatron's optimizer state cannot be read."""
    from gigatron.core.checkpoint.dist.sharding import optimizer_kind

    from gigatron.core.checkpoint import megatron_dp_buffers as dp_buffers

    inner, sharding = _optimizer_record(common)
    has_sharded_keys = any(k.startswith(_OPTIMIZER_PREFIX) for k in metadata.state_dict_metadata)
    if not inner and not has_sharded_keys:
        raise CheckpointError("it holds no optimizer state (saved with --no-save-optim): load it with "
                              "--no-load-optim or --finetune")
    if sharding is not None and sharding not in ("fully_reshardable", dp_buffers.SHARDING):
        raise CheckpointError(
            f"its distributed-optimizer state is in Megatron-Core's '{sharding}' layout (a pickled object "
            "gathered on data-parallel rank 0), which Gigatron does not read: re-save it with Megatron-LM adding "
            "--dist-ckpt-optim-fully-reshardable (model-space optimizer state), or load it with --no-load-optim")
    if optimizer_kind(optimizer) != "adam":
        raise CheckpointError("Gigatron reads Megatron-Core's Adam state only; use --optimizer adam or --no-load-optim")
    if sharding == dp_buffers.SHARDING:
        if not dp_buffers.has_adam_buckets(metadata):
            raise CheckpointError("its optimizer holds no Adam state (exp_avg, exp_avg_sq buckets): it was saved by "
                                  "another optimizer; load it with --no-load-optim")
        inner = dp_buffers.read_optimizer_object(iter_dir, metadata, _read_object)
    elif not any(k.startswith(f"{_OPTIMIZER_PREFIX}state.{name}.") for k in metadata.state_dict_metadata
                 for name in _ADAM_STATES):
        raise CheckpointError("its optimizer holds no Adam state (exp_avg, exp_avg_sq): it was saved by another "
                              "optimizer; load it with --no-load-optim")
    step = _step_of(inner)
    if step is None:
        raise CheckpointError("common.pt records no optimizer step (optimizer.state.common_step or the "
                              "parameter groups' step)")
    saved = {(float(g.get("wd_mult", 1.0)), float(g.get("lr_mult", 1.0)), bool(g.get("is_decoupled_lr"))): g
             for g in inner.get("param_groups") or [] if isinstance(g, dict)}
    groups = []
    for group in optimizer.optimizer.param_groups:
        key = (float(group.get("wd_mult", 1.0)), float(group.get("lr_mult", 1.0)), "max_lr" in group)
        match = saved.get(key)
        if match is None:
            raise CheckpointError(f"its optimizer has no parameter group with wd_mult/lr_mult/decoupled lr {key} "
                                  f"(it has {sorted(saved)}): check --weight-decay-related and --decoupled-lr flags")
        groups.append({k: match[k] for k in ("lr", "weight_decay", "betas", "eps") if k in match})
    scaler = inner.get("grad_scaler", (common.get("optimizer") or {}).get("grad_scaler"))
    return {"kind": "adam", "step": step, "initialized": True, "param_groups": groups,
            "grad_scaler": scaler if isinstance(scaler, dict) else None}


def _dp_reshardable_read(metadata, args: dict, entries: dict):
    """The reader of a "dp_reshardable" state (megatron_dp_buffers.py): every parameter of the
    checkpoint (our global names, per-layer shapes) placed in Megatron's flat buckets."""
    from gigatron.core.checkpoint.megatron_dp_buffers import DpReshardableRead, bucket_layout

    shapes = {}
    for key, md in entries.items():
        axes = stacked_axes(key)
        for index in itertools.product(*(range(int(n)) for n in md.size[:axes])):
            shapes[unstacked_name(key, index) if axes else key] = tuple(int(n) for n in md.size[axes:])
    return DpReshardableRead(bucket_layout(metadata, args, shapes), entries)


class _SavedAsOurs:
    """The checkpoint's optimizer keys answered under our names: `optimizer.state.fp32_param.{our
    name}` is present where Megatron stored the main param of that parameter (fp32_param or param)."""

    def __init__(self, metadata) -> None:
        self.names = set()
        for key, md in metadata.state_dict_metadata.items():
            for main in _MAIN_PARAM_NAMES:
                prefix = f"{_OPTIMIZER_PREFIX}state.{main}."
                if key.startswith(prefix) and isinstance(md, TensorStorageMetadata):
                    model_key = ALIASES.get(key[len(prefix):], key[len(prefix):])
                    axes = stacked_axes(model_key)
                    for index in itertools.product(*(range(int(n)) for n in md.size[:axes])):
                        self.names.add(unstacked_name(model_key, index) if axes else model_key)

    def __contains__(self, key: str) -> bool:
        prefix = f"{_OPTIMIZER_PREFIX}state.fp32_param."
        return key.startswith(prefix) and key[len(prefix):] in self.names


def megatron_optimizer_pieces(optimizer, model_chunks, metadata) -> tuple[list[ShardPiece], list, list[str]]:
    """Destination pieces (Megatron's keys) of this rank's Adam state and main params, at ANY layout
    of this run (tensor/pipeline/data parallel, distributed optimizer or not), and the new states to
    install. Returns (pieces, states, problems)."""
    import dataclasses

    from gigatron.core.checkpoint.dist.sharding import optimizer_load_pieces

    ours, states = optimizer_load_pieces(optimizer, model_chunks, "adam", True, _SavedAsOurs(metadata))
    tensor_keys = {k: md for k, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)}
    main_name = next((m for m in _MAIN_PARAM_NAMES for k in tensor_keys
                      if k.startswith(f"{_OPTIMIZER_PREFIX}state.{m}.")), "fp32_param")
    pieces, problems = [], []
    for piece in ours:
        state_name, model_key = piece.key[len(_OPTIMIZER_PREFIX) + len("state."):].split(".", 1)
        saved_name = main_name if state_name == "fp32_param" else state_name
        prefix = f"{_OPTIMIZER_PREFIX}state.{saved_name}."
        entries = {k[len(prefix):]: md for k, md in tensor_keys.items() if k.startswith(prefix)}
        model_key = _saved_alias(model_key, entries)
        mapped, missing = megatron_pieces([dataclasses.replace(piece, key=model_key)], entries)
        pieces += [dataclasses.replace(m, key=prefix + m.key) for m in mapped]
        problems += [f"optimizer state {saved_name}: {p}" for p in missing]
    return pieces, states, problems


_ALIAS_OF = {real: alias for alias, real in ALIASES.items()}


def _saved_alias(model_key: str, entries: dict) -> str:
    """The key Megatron stored `model_key`'s optimizer state under: T5Model registers its output
    bias and position embedding twice, and Megatron-Core's optimizer keys each one's state by one
    of the two names (megatron-core 0.16.1: the duplicate, `output_layer.bias` and
    `position_embeddings.weight`; megatron_names.ALIASES), so either is accepted."""
    alias = _ALIAS_OF.get(model_key)
    return alias if model_key not in entries and alias in entries else model_key


def _read_object(iter_dir: str, metadata, key: str):
    """A ShardedObject's value: its bytes entry read from the data file (checked to lie inside it),
    then unpickled through the Megatron allow-list (never PyTorch's unrestricted byte loading)."""
    index = next((i for i in metadata.storage_data if i.fqn == key), None)
    if index is None:
        return None
    info = metadata.storage_data[index]
    path = os.path.join(iter_dir, info.relative_path)
    if not os.path.isfile(path) or info.offset < 0 or info.offset + info.length > os.path.getsize(path):
        raise CorruptCheckpointError(f"{path} does not hold the {info.length} bytes of {key} at offset {info.offset}")
    with open(path, "rb") as handle:
        handle.seek(info.offset)
        data = handle.read(info.length)
    value = safe_torch_load(io.BytesIO(data), allow_namespace=True)
    if not isinstance(value, list) or len(value) != 1:  # Megatron stores [object] per entry
        raise CorruptCheckpointError(f"{path}: the entry {key} does not hold one Megatron ShardedObject")
    return value[0]


def _rng_key(metadata, saved: tuple, groups) -> Optional[str]:
    """The `rng_state/shard_{offsets}_{shape}` entry of this rank: offsets (pp rank, tp rank[, ep
    rank]) in a grid of shape (pp, tp[, ep]) (ShardedObject keys join each tuple with dots)."""
    for index in metadata.storage_data:
        name = index.fqn
        if not name.startswith("rng_state/shard_"):
            continue
        try:
            offsets_text, shape_text = name[len("rng_state/shard_"):].split("_")
            offsets = tuple(int(x) for x in offsets_text.split("."))
            shape = tuple(int(x) for x in shape_text.split("."))
        except ValueError:
            continue
        if len(offsets) < 2 or shape[:2] != saved or offsets[:2] != (groups.pp.rank, groups.tp.rank):
            continue
        if len(offsets) == 2 or (len(offsets) == 3 and offsets[2] == getattr(groups.ep, "rank", 0)):
            return name
    return None


def _rng_state(iter_dir: str, metadata, args: dict, groups):
    """(this rank's RNG state in our form, or None; why not). Megatron-LM stores each (pp, tp)
    rank's list of data-parallel RNG states as the ShardedObject `rng_state`."""
    saved = (int(args.get("pipeline_model_parallel_size") or 1), int(args.get("tensor_model_parallel_size") or 1))
    if saved != (groups.pp.size, groups.tp.size):
        return None, (f"{iter_dir} was saved at tensor/pipeline parallel size {saved[1]}/{saved[0]}, this run uses "
                      f"{groups.tp.size}/{groups.pp.size}: the random number generators are not restored")
    key = _rng_key(metadata, saved, groups)
    states = _read_object(iter_dir, metadata, key) if key is not None else None
    if not states:
        return None, f"{iter_dir} holds no RNG state for this rank (saved with --no-save-rng?)"
    return rng_state_from_megatron(states[groups.dp.rank] if groups.dp.rank < len(states) else states[0]), None


# ------------------------------------------------------------------ writing Megatron-Core's layout

# Megatron-Core's layers carry one `_extra_state` entry (Transformer Engine's FP8 metadata; None
# without it) per linear module, as does the output layer; its loader expects them as ShardedObjects.
_EXTRA_STATE_MODULES = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1",
                        "mlp.linear_fc2", "cross_attention.linear_q", "cross_attention.linear_kv",
                        "cross_attention.linear_proj")
_EXTRA_STATE_TOP = ("output_layer", "lm_head.output_layer")
MEGATRON_RECORD = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                   "common_backend_version": 1}
# A hybrid model's layers (Transformer Engine linears all): under each layer's own key (shard_0_1).
_HYBRID_EXTRA_STATE_MODULES = ("mixer.in_proj", "mixer.out_proj") + _EXTRA_STATE_MODULES[:4]
_HYBRID_LAYER = re.compile(r"^(decoder\.layers\.\d+\.)(.+)\.weight(?:\.[A-Za-z]+)?$")


def is_hybrid_model(tensors) -> bool:
    """Whether our tensor names are a MambaModel's (its stack ends in decoder.final_norm)."""
    return any(name.startswith("decoder.final_norm.") or ".mixer." in name for name in tensors)


def _hybrid_extra_states(keys) -> dict:
    """The `_extra_state` ShardedObjects of a hybrid model's linear modules, one per layer."""
    objects = {}
    for key in keys:
        match = _HYBRID_LAYER.match(key)
        if match and match.group(2) in _HYBRID_EXTRA_STATE_MODULES:
            objects[f"{match.group(1)}{match.group(2)}._extra_state/shard_0_1"] = [None]
    return objects


def _hybrid_state(tensors: dict, args: dict, tied: bool) -> dict:
    """A MambaModel's full tensors as Megatron-Core's torch_dist state (megatron_names.ours_to_hybrid:
    per-layer keys, fused norm names, the mixer's in_proj and conv1d split into their parts)."""
    from gigatron.core.checkpoint.megatron_names import ours_to_hybrid
    from gigatron.core.checkpoint.tp_layout import mamba_segments

    moe = sorted(name for name in tensors if ".mlp.experts." in name or ".mlp.router." in name)
    if moe:
        raise CheckpointError(f"writing Megatron-Core's torch_dist layout of a hybrid model's mixture-of-experts "
                              f"layers is not supported ({moe[0]}, …); save it as torch (--saver core)")
    state = {key: tensor.contiguous() for key, tensor in
             ours_to_hybrid(tensors, lambda name: mamba_segments(name, args)).items()
             if not (key == "output_layer.weight" and tied)}
    state.update(_hybrid_extra_states(list(state)))
    return state


def megatron_state(tensors: dict, num_layers, tied: bool, args: Optional[dict] = None) -> dict:
    """Our full tensors (global names) as Megatron-Core's torch_dist state: layer parameters stacked
    under one key per block with the fused-norm names, a tied output layer left out, T5's aliases
    (megatron_names.ALIASES) as copies, and the `_extra_state` ShardedObjects Megatron's loader
    expects (`[None]`, stored as torch.save bytes, as it writes them). `num_layers`: the decoder's
    layer count (GPT), or {block prefix: layer count} (`encoder.layers.` / `decoder.layers.`).
    A MambaModel's layers are not stacked (`_hybrid_state`; `args`: its Mamba flags)."""
    from gigatron.core.checkpoint.megatron_names import ALIASES, FUSED_NORMS, STACKED_PREFIX

    if is_hybrid_model(tensors):
        if args is None:
            raise CheckpointError("a Mamba / hybrid model's torch_dist layout needs its --mamba-* flags (args)")
        state = _hybrid_state(tensors, args, tied)
        if "output_layer.weight" in state:
            state["output_layer._extra_state/shard_0_1"] = [None]
        return state
    counts = dict(num_layers) if isinstance(num_layers, dict) else {STACKED_PREFIX: int(num_layers)}
    per_suffix: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    state = {}
    for name, tensor in tensors.items():
        split = split_block_name(name)
        if split is None:
            if name == "output_layer.weight" and tied:
                continue
            state[name] = tensor.contiguous()
            continue
        block, layer, suffix = split
        if ".mlp.experts." in f".{suffix}" or suffix.startswith("mlp.router"):
            raise CheckpointError("writing Megatron-Core's torch_dist layout of mixture-of-experts models is not "
                                  "supported; save them as torch (--saver core)")
        per_suffix.setdefault((block, suffix), {})[layer] = tensor
    for (block, suffix), layers in per_suffix.items():
        if block not in counts:
            raise CheckpointError(f"{block}* tensors given, but no layer count for that block")
        if sorted(layers) != list(range(counts[block])):
            raise CheckpointError(f"{block}*.{suffix} is present for layers {sorted(layers)}, not for all "
                                  f"{counts[block]}")
        state[block + FUSED_NORMS.get(suffix, suffix)] = torch.stack([layers[i] for i in range(counts[block])])
    for block, count in counts.items():
        for module in _EXTRA_STATE_MODULES:
            if any(b == block and s.startswith(module + ".") for b, s in per_suffix):
                for layer in range(count):  # PyTorch's writer stores a non-tensor value with torch.save
                    state[f"{block}{module}._extra_state/shard_{layer}_{count}"] = [None]
    if "lm_head.output_layer.bias" in state:  # T5Model saves both registrations of these modules
        for alias, real in ALIASES.items():
            if real in state:
                state[alias] = state[real].clone()
    for module in _EXTRA_STATE_TOP:
        if f"{module}.weight" in state or f"{module}.bias" in state:
            state[f"{module}._extra_state/shard_0_1"] = [None]
    return state


def block_layer_counts(args: dict, tensors: dict) -> dict:
    """{block prefix: layer count} of a model from its flags: GPT's decoder (--num-layers); BERT's
    encoder (--num-layers); T5's encoder (--encoder-num-layers or --num-layers) and decoder
    (--decoder-num-layers or the encoder's)."""
    blocks = {split[0] for split in map(split_block_name, tensors) if split is not None}
    layers = int(args["num_layers"])
    if blocks == {"encoder.layers.", "decoder.layers."}:
        encoder = int(args.get("encoder_num_layers") or layers)
        return {"encoder.layers.": encoder, "decoder.layers.": int(args.get("decoder_num_layers") or encoder)}
    return {block: layers for block in blocks or {"decoder.layers."}}


def write_megatron_dist(root: str, tensors: dict, args: dict, iteration: Optional[int]) -> str:
    """Write a model (our full tensors, padded vocabulary) as Megatron-Core's torch_dist under
    `root`: iter_N/ (release/ without an iteration) with the data file and `.metadata`, common.pt
    (`args` as an argparse.Namespace of plain values, `iteration`, `checkpoint_version`), then
    Megatron's metadata.json (its completeness marker) and the tracker last. One process."""
    import argparse
    import json
    import shutil

    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    from gigatron.core.checkpoint.header import CHECKPOINT_VERSION
    from gigatron.core.checkpoint.io import atomic_torch_save, atomic_write_text
    from gigatron.core.checkpoint.paths import checkpoint_dir, write_tracker

    iter_dir = checkpoint_dir(root, int(iteration or 0), release=iteration is None)
    if os.path.exists(iter_dir) and os.listdir(iter_dir):
        raise ValueError(f"{iter_dir} already exists and is not empty; choose an empty --save-dir")
    state = megatron_state(tensors, block_layer_counts(args, tensors),
                           not args.get("untie_embeddings_and_output_weights"), args)
    staging = iter_dir + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    import warnings

    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp_save(state, storage_writer=FileSystemWriter(staging, single_file_per_rank=True), no_dist=True)
    atomic_torch_save({"args": argparse.Namespace(**args), "checkpoint_version": CHECKPOINT_VERSION,
                       "iteration": int(iteration or 0),
                       "num_floating_point_operations_so_far": 0.0}, os.path.join(staging, COMMON_FILENAME))
    atomic_write_text(os.path.join(staging, "metadata.json"), json.dumps(MEGATRON_RECORD))
    if os.path.exists(iter_dir):
        os.rmdir(iter_dir)
    os.replace(staging, iter_dir)
    write_tracker(root, iteration)
    return iter_dir


# ------------------------------------------------------------------ training saves Megatron-Core's layout
#
# `--ckpt-format megatron_torch_dist`: every rank writes its chunks of the model and optimizer state
# under Megatron-Core's keys (what `megatron_pieces` reads, mapped the other way), plus the
# ShardedObjects Megatron-LM's loader asks for (`_extra_state` of each linear, `rng_state` of each
# (pp, tp) rank); rank 0 writes common.pt as Megatron-LM's loop does (args as a Namespace,
# iteration, checkpoint_version, opt_param_scheduler, FLOPs, the optimizer's non-sharded state)
# with one more entry, "gigatron", that Megatron ignores: every rank's RNG state in our form (the
# model-parallel tracker included), the FP8 delayed-scaling state and the saved parallel layout, so
# that our own resume from it is exact. Megatron writes no checksums; neither does this layout.

GIGATRON_ENTRY = "gigatron"


class _WriteShapes:
    """Stand-in for a checkpoint's entries when writing: every stacked key holds `num_layers`
    layers (and `num_experts` experts). With `hybrid_args` (a MambaModel's flags) the keys are
    per layer instead, and a split mixer tensor's part holds its segment's rows."""

    def __init__(self, num_layers: int, num_experts: int, hybrid_args: Optional[dict] = None) -> None:
        from types import SimpleNamespace

        self._entry = SimpleNamespace(size=(num_layers, num_experts))
        self._hybrid_args = hybrid_args

    def __contains__(self, key: str) -> bool:
        from gigatron.core.checkpoint.megatron_names import is_stacked_key

        return self._hybrid_args is None or not is_stacked_key(key)

    def __getitem__(self, key: str):
        from types import SimpleNamespace

        from gigatron.core.checkpoint.megatron_names import hybrid_parts
        from gigatron.core.checkpoint.tp_layout import mamba_segments

        base, _, part = key.rpartition(".")
        parts = hybrid_parts(base) if self._hybrid_args is not None else None
        if parts is None or part not in parts:
            return self._entry
        return SimpleNamespace(size=(mamba_segments(base, self._hybrid_args)[parts.index(part)],))


def _as_megatron(pieces: list[ShardPiece], shapes: _WriteShapes, prefix: str = "") -> list[ShardPiece]:
    import dataclasses

    out = []
    for piece in pieces:
        mapped, problems = megatron_pieces([dataclasses.replace(piece, key=piece.key[len(prefix):])], shapes)
        if problems:
            raise CheckpointError("; ".join(problems))
        out += [dataclasses.replace(m, key=prefix + m.key) for m in mapped]
    return out


def _megatron_group(group: dict, step: Optional[int]) -> dict:
    """One of our optimizer's parameter groups as Megatron-Core's Adam records it in common.pt."""
    out = {"is_expert_parallel": False, "default_config": True, "wd_mult": float(group.get("wd_mult", 1.0)),
           "lr_mult": float(group.get("lr_mult", 1.0)), "is_decoupled_lr": "max_lr" in group}
    out.update({k: group[k] for k in ("max_lr", "min_lr") if k in group})
    out.update(lr=float(group["lr"]), betas=tuple(group["betas"]), eps=float(group["eps"]),
               weight_decay=float(group["weight_decay"]), amsgrad=False, maximize=False, foreach=None,
               capturable=False, differentiable=False, fused=None, decoupled_weight_decay=True)
    if step is not None:
        out["step"] = float(step)
    return out


def megatron_optimizer_state(optimizer, model_chunks, groups, model_pieces: list[ShardPiece], shapes
                             ) -> tuple[list[ShardPiece], dict]:
    """This rank's Adam state as Megatron-Core's pieces and common.pt entry: the plain optimizer's
    layout (exp_avg, exp_avg_sq, fp32_param of bf16/fp16 parameters; common_step) or, for the
    distributed optimizer, "fully_reshardable" (param = the fp32 main param of every parameter;
    the step in each parameter group). Collective."""
    import dataclasses

    from gigatron.core.checkpoint.dist.sharding import optimizer_is_sharded, optimizer_kind, sharded_optimizer_state
    from gigatron.core.optim import MixedPrecisionOptimizer

    if optimizer_kind(optimizer) != "adam":
        raise CheckpointError("--ckpt-format megatron_torch_dist writes Adam's state only (Megatron-Core's layout "
                              "for SGD is not written): use --ckpt-format torch_dist, or --no-save-optim")
    ours, common = sharded_optimizer_state(optimizer, model_chunks, groups)
    distributed = optimizer_is_sharded(optimizer)
    state = f"{_OPTIMIZER_PREFIX}state."
    if distributed:
        has_main = {p.key[len(state) + len("fp32_param."):] for p in ours if p.key.startswith(state + "fp32_param.")}
        managed = {p.key[len(state) + len("exp_avg."):] for p in ours if p.key.startswith(state + "exp_avg.")}
        ours = [dataclasses.replace(p, key=state + "param." + p.key[len(state) + len("fp32_param."):])
                if p.key.startswith(state + "fp32_param.") else p for p in ours]
        # an fp32 parameter's main param is the model weight: stored again as Megatron's `param`
        ours += [dataclasses.replace(p, key=state + "param." + p.key) for p in model_pieces
                 if p.key in managed and p.key not in has_main]
    pieces = []
    for name in ("param", "fp32_param", "exp_avg", "exp_avg_sq"):
        pieces += _as_megatron([p for p in ours if p.key.startswith(f"{state}{name}.")], shapes,
                               prefix=f"{state}{name}.")
    step = int(common["step"])
    param_groups = [_megatron_group(g, step if distributed else None) for g in optimizer.optimizer.param_groups]
    scaler = {"grad_scaler": common["grad_scaler"]} if common.get("grad_scaler") else {}
    if distributed:
        record = {"optimizer": {"param_groups": param_groups}, "param_state_sharding_type": "fully_reshardable",
                  **scaler}
    else:
        inner = {"state": {"common_step": torch.tensor(float(step))}, "param_groups": param_groups}
        record = {"optimizer": inner, **scaler} if isinstance(optimizer, MixedPrecisionOptimizer) else inner
    return pieces, record


def _megatron_rng(state: dict) -> dict:
    """Our RNG state as one data-parallel rank's entry of Megatron-LM's `rng_state` (numpy's state
    with its key array, the tracker's CUDA states by name)."""
    import numpy as np

    name, keys, pos, has_gauss, cached = state["np_rng_state"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    tracker = state.get("rng_tracker_states") or {}
    return {"random_rng_state": state["random_rng_state"],
            "np_rng_state": (name, keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)),
            "torch_rng_state": state["torch_rng_state"], "cuda_rng_state": state.get("cuda_rng_state"),
            "rng_tracker_states": {k: v["cuda"] for k, v in tracker.items() if v.get("cuda") is not None}}


def _objects(pieces: list[ShardPiece], num_layers: int, groups, rng_states: Optional[list]) -> dict:
    """The ShardedObjects this rank writes: the `_extra_state` (None) of each linear module of the
    layers (a hybrid model's: per layer) and of the output layer whose first chunk it writes, and
    its (pp, tp) `rng_state` (the list over data-parallel ranks) where it is data-parallel rank 0."""
    from gigatron.core.checkpoint.megatron_names import STACKED_PREFIX

    firsts = [p.key for p in pieces if p.write and not any(p.global_offsets)]
    objects = _hybrid_extra_states(firsts)
    objects.update({f"{module}._extra_state/shard_0_1": [None] for module in _EXTRA_STATE_TOP
                    if f"{module}.weight" in firsts})
    for piece in pieces:
        for module in _EXTRA_STATE_MODULES:
            if (piece.key == f"{STACKED_PREFIX}{module}.weight" and piece.write
                    and all(o == 0 for o in piece.global_offsets[1:])):
                objects[f"{STACKED_PREFIX}{module}._extra_state/shard_{piece.global_offsets[0]}_{num_layers}"] = [None]
    if rng_states is not None and groups.dp.rank == 0 and groups.cp.rank == 0:
        mine = (groups.pp.rank, groups.tp.rank)
        states = [_megatron_rng(state) for pp, tp, cp, dp, state in sorted(rng_states, key=lambda r: r[3])
                  if (pp, tp) == mine and cp == 0]
        objects[f"rng_state/shard_{mine[0]}.{mine[1]}_{groups.pp.size}.{groups.tp.size}"] = [states]
    return objects


class _ObjectPlanner:
    """Hands PyTorch's writer the snapshot of each tensor chunk and each ShardedObject's value."""

    def __new__(cls, snapshot: dict, objects: dict):
        from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

        class Planner(DefaultSavePlanner):
            def lookup_object(self, index):
                if index.offset is None:
                    return objects[index.fqn]
                return snapshot[(index.fqn, tuple(index.offset))]

        return Planner()


def _write_files(iter_dir: str, pieces: list[ShardPiece], objects: dict, comm: Comm) -> tuple:
    """Every rank writes its data file; returns (the global metadata, the gathered write results)
    on every rank, or raises on every rank when one failed."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType

    from gigatron.core.checkpoint.dist.save import _snapshot, _validate_coverage, _write_item

    to_write = [p for p in pieces if p.write]
    items = [_write_item(p) for p in to_write] + [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO)
                                                  for key in sorted(objects)]
    all_plans = comm.all_gather_object(SavePlan(items))
    global_plans, metadata = create_default_global_save_plan(all_plans)
    _validate_coverage(metadata)
    writer = FileSystemWriter(iter_dir, single_file_per_rank=True, sync_files=True, overwrite=True)
    writer.set_up_storage_writer(comm.rank == 0, rank=comm.rank, use_collectives=True)
    global_plans = writer.prepare_global_plan(global_plans)
    try:
        results = {"results": writer.write_data(global_plans[comm.rank],
                                                _ObjectPlanner(_snapshot(to_write, None), objects)).value()}
    except Exception as exc:  # reported on every rank
        results = {"error": f"rank {comm.rank}: {type(exc).__name__}: {exc}"}
    gathered = comm.all_gather_object(results)
    errors = [g["error"] for g in gathered if "error" in g]
    if errors:
        raise CheckpointError(f"saving {iter_dir} failed: " + " | ".join(errors))
    return writer, metadata, [g["results"] for g in gathered]


def save_training_state(root: str, iteration: int, model_chunks, optimizer, groups, header: dict, *,
                        scheduler_state: Optional[dict] = None, rng_state: Optional[dict] = None,
                        save_optim: bool = True, async_saver=None) -> str:
    """Save iteration `iteration` under `root` in Megatron-Core's torch_dist layout (collective);
    metadata.json (Megatron's completeness marker) and then the tracker are written last."""
    import argparse
    import json

    from gigatron.core.checkpoint.dist.common import METADATA_FILENAME, to_cpu
    from gigatron.core.checkpoint.dist.save import _remove_stale_files
    from gigatron.core.checkpoint.dist.sharding import check_groups
    from gigatron.core.checkpoint.header import CHECKPOINT_VERSION
    from gigatron.core.checkpoint.io import atomic_torch_save, atomic_write_text, to_plain
    from gigatron.core.checkpoint.paths import checkpoint_dir, write_tracker

    if async_saver is not None:
        raise ValueError("--async-save writes --ckpt-format torch_dist only")
    check_groups(groups, model_chunks)
    from gigatron.core.models.gpt import GPTModel
    from gigatron.core.models.mamba import MambaModel

    hybrid = False
    for chunk in model_chunks:
        module = getattr(chunk, "module", chunk)
        if not isinstance(module, (GPTModel, MambaModel)):
            raise CheckpointError(f"--ckpt-format megatron_torch_dist writes Mamba / hybrid and GPT models only, not "
                                  f"{type(module).__name__}: use --ckpt-format torch_dist")
        hybrid = hybrid or isinstance(module, MambaModel)
    args = dict(header.get("args") or {})
    num_layers = int(args.get("num_layers") or 0)
    comm = Comm()
    model = sharded_model_state(model_chunks, groups)
    moe = sorted({p.key for p in model if ".mlp.experts." in p.key or ".mlp.router." in p.key})
    if moe:
        raise CheckpointError(f"--ckpt-format megatron_torch_dist does not write mixture-of-experts models yet "
                              f"({moe[0]}, …): save them with --ckpt-format torch_dist")
    shapes = _WriteShapes(num_layers, int(args.get("num_experts") or 0), args if hybrid else None)
    pieces = _as_megatron(model, shapes)
    opt_record = None
    if optimizer is not None and save_optim:
        opt_pieces, opt_record = megatron_optimizer_state(optimizer, model_chunks, groups, model, shapes)
        pieces += opt_pieces
    me = (groups.pp.rank, groups.tp.rank, groups.cp.rank, groups.dp.rank, to_cpu(rng_state))
    rng_states = comm.all_gather_object(me) if rng_state is not None else None
    objects = _objects(pieces, num_layers, groups, rng_states)

    iter_dir = os.path.abspath(checkpoint_dir(root, iteration))
    if comm.rank == 0:
        os.makedirs(iter_dir, exist_ok=True)
        _remove_stale_files(iter_dir, comm.size)  # metadata.json first: an interrupted save is incomplete
        for name in os.listdir(iter_dir):
            if name == COMMON_FILENAME:
                os.unlink(os.path.join(iter_dir, name))
    comm.barrier()
    writer, metadata, results = _write_files(iter_dir, pieces, objects, comm)
    if comm.rank == 0:
        writer.finish(metadata, results)  # .metadata
        common = {"args": argparse.Namespace(**args), "checkpoint_version": CHECKPOINT_VERSION,
                  "iteration": int(iteration),
                  "num_floating_point_operations_so_far": float(header.get("num_floating_point_operations_so_far")
                                                                or 0.0),
                  "opt_param_scheduler": to_plain(scheduler_state) if scheduler_state is not None else None,
                  GIGATRON_ENTRY: to_plain({"fp8_state": header.get("fp8_state"),
                                            "rng_states": [r[4] for r in rng_states] if rng_states else None,
                                            "parallel_layout": parallel_layout(groups)})}
        if opt_record is not None:
            common["optimizer"] = opt_record
        atomic_torch_save(to_cpu(common), os.path.join(iter_dir, COMMON_FILENAME))
        atomic_write_text(os.path.join(iter_dir, METADATA_FILENAME), json.dumps(MEGATRON_RECORD))
    comm.barrier()
    if comm.rank == 0:
        write_tracker(root, iteration)
    comm.barrier()
    return iter_dir
