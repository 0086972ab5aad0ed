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
entry read directly and unpickled through the Megatron allow-list); the optimizer state is
refused with the flags to use instead. Expert tensors other than the routed experts and the router
(shared experts, for one) are refused with the Megatron-LM command that re-saves the model.

BERT and T5 (Megatron-Core's BertModel / T5Model) are read and written the same way: their
`encoder.layers.*` are stacked like the decoder's, T5's duplicate keys are skipped and written as
copies (megatron_names.py).

Writing (`write_megatron_dist`, convert.py --saver megatron_dist): a model as Megatron-Core's own
torch_dist, loadable by `megatron.core.dist_checkpointing.load` into its GPTModel (BertModel,
T5Model): stacked keys,
fused-norm names, the `_extra_state` objects its loader expects, common.pt with a Namespace `args`
and Megatron's four-key metadata.json. Training saves Gigatron's own torch_dist (dist/).
"""

from __future__ import annotations

import io
import itertools
import os
from typing import Optional, Sequence

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan

from gigatron.core.checkpoint.dist.common import COMMON_FILENAME, Comm, process_rank
from gigatron.core.checkpoint.dist.load import ViewLoadPlanner, plan_reads
from gigatron.core.checkpoint.dist.metadata import looks_like_megatron_torch_dist, read_dcp_metadata
from gigatron.core.checkpoint.dist.sharding import ShardPiece, sharded_model_state
from gigatron.core.checkpoint.foreign import rng_state_from_megatron
from gigatron.core.checkpoint.io import CheckpointError, CorruptCheckpointError, safe_torch_load
from gigatron.core.checkpoint.megatron_names import (
    EXPERTS_PREFIX,
    aliases_in,
    split_block_name,
    stacked_axes,
    stacked_candidates,
    unstacked_name,
)
from gigatron.core.checkpoint.megatron_torch import OPTIMIZER_HINT, header_of, plain_args
from gigatron.core.checkpoint.state import ModelState, TrainingState

__all__ = ["NAME", "WRITES", "detect", "read_common", "read_args", "read_model", "save_training_state",
           "load_training_state", "megatron_pieces", "megatron_state", "write_megatron_dist", "MEGATRON_RECORD"]

NAME = "megatron_torch_dist"
WRITES = False

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
    if "embedding.word_embeddings.weight" not in tensors:
        raise CheckpointError(f"{iter_dir} holds no embedding.word_embeddings.weight; it is not a GPT checkpoint")
    release = os.path.basename(os.path.normpath(iter_dir)) == "release"
    return ModelState(args=common["args"], tensors=tensors,
                      iteration=None if release else int(common.get("iteration") or 0), path=iter_dir,
                      dtype=tensors["embedding.word_embeddings.weight"].dtype)


def save_training_state(root: str, iteration: int, model_chunks, optimizer, groups, header: dict, **kwargs) -> str:
    raise CheckpointError("megatron_torch_dist is read-only here: Gigatron saves --ckpt-format torch_dist in its own "
                          "layout (gigatron/core/checkpoint/dist)")


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


def load_training_state(iter_dir: str, model_chunks: Sequence[torch.nn.Module], optimizer, groups, *,
                        strict: bool = True) -> TrainingState:
    """Load the weights into the model chunks at this run's layout (collective); header and schedule
    from common.pt. `optimizer` must be None."""
    if optimizer is not None:
        raise CheckpointError(f"{iter_dir} was written by Megatron-Core, whose optimizer state Gigatron does not "
                              f"read yet: {OPTIMIZER_HINT}")
    common = read_common(iter_dir)
    metadata = read_dcp_metadata(iter_dir)
    entries = _model_entries(metadata, iter_dir)
    pieces, problems = megatron_pieces(sharded_model_state(model_chunks, groups), entries)
    if strict:
        used = {(p.key, tuple(p.global_offsets[:stacked_axes(p.key)])) for p in pieces}
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
    header = header_of(common, common["args"])
    rng_state, missing = _rng_state(iter_dir, metadata, common["args"], groups)
    return TrainingState(header=header, path=iter_dir, optimizer_loaded=False,
                         scheduler_state=common.get("opt_param_scheduler"), rng_state=rng_state,
                         rng_missing=missing, rng_missing_is_error=False)


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


def megatron_state(tensors: dict, num_layers, tied: bool) -> dict:
    """Our full tensors (global names) as Megatron-Core's torch_dist state: layer parameters stacked
    under one key per block with the fused-norm names, a tied output layer left out, T5's aliases
    (megatron_names.ALIASES) as copies, and the `_extra_state` ShardedObjects Megatron's loader
    expects (`[None]`, stored as torch.save bytes, as it writes them). `num_layers`: the decoder's
    layer count (GPT), or {block prefix: layer count} (`encoder.layers.` / `decoder.layers.`)."""
    from gigatron.core.checkpoint.megatron_names import ALIASES, FUSED_NORMS, STACKED_PREFIX

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
                           not args.get("untie_embeddings_and_output_weights"))
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
