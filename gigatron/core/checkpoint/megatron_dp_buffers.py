"""Megatron-Core's distributed-optimizer state saved "dp_reshardable" (Megatron-LM's default with
--use-distributed-optimizer unless --dist-ckpt-optim-fully-reshardable is given), read into model
space.

What megatron-core 0.16 writes in that layout (checked on files its DistributedOptimizer wrote):

    optimizer.distributed.dp_group_idx_{G}.gbuf_idx_{B}.dtype_{(param dtype, grad dtype)}.bucket_idx_{K}.{S}
        S in param (the fp32 main param), exp_avg, exp_avg_sq: one flat 1-D tensor per gradient
        bucket, of the bucket's unpadded length; each data-parallel rank writes its contiguous
        1/dp share of the bucket as one chunk per parameter piece (plus chunks of padding)
    optimizer.distributed.dp_group_idx_{G}.optimizer            ShardedObject: the torch optimizer's
        param_groups (with the Adam step in each group)
    optimizer.distributed.dp_group_idx_{G}.per_bucket_numel[_unpadded]   ShardedObjects: bucket sizes
    common.pt: optimizer.param_state_sharding_type = "dp_reshardable"

G numbers the data-parallel group by its model-parallel rank (pipeline rank * tp + tensor rank),
B the gradient buffers of its model chunks (one per parameter/gradient dtype pair; expert
parameters have their own). Each group's buckets hold that rank's tensor-parallel LOCAL
parameters: column-parallel weights (QKV, fc1, the vocabulary-parallel embedding and output
layer) split along dim 0 (SwiGLU's fc1 as [gate_r; up_r], the r-th slices of the global [gate;
up]), row-parallel weights along dim 1, the rest replicated (tensor-parallel rank 0's copy is
read). A pipeline stage holds its layers (equal counts), the embedding on the first stage, the
final norm and output layer on the last; with tied embeddings and more than one stage the last
stage keeps its own copy of the embedding (in a bucket of its own, as is the first stage's).

Where a parameter lies in its bucket is not recorded; it follows from how Megatron's gradient
buffer places parameters, which this module re-derives:

- a buffer holds its model chunk's trainable parameters in REVERSE registration order (roughly the
  order of back-propagation);
- with the distributed optimizer each parameter starts at a multiple of 64 elements of the buffer;
- a bucket closes after the parameter that brings it to --ddp-bucket-size elements (or when a
  shared embedding needs a bucket of its own); its end is then padded to a multiple of
  lcm(data-parallel size, 128) (or lcm(dp, 128, 2**16) with pad_buckets_for_high_nccl_busbw), so
  every bucket starts at a multiple of 64 and the in-bucket offsets do not depend on the
  data-parallel size. The stored tensor leaves the end padding out.

Bucket boundaries are taken from the checkpoint (each bucket's stored length) rather than from
--ddp-bucket-size, whose default depends on the data-parallel size and --overlap-grad-reduce. The
registration order is Megatron-Core's GPTModel's (embedding, the layers, the final norm, the
output layer; inside a layer the order of its layer spec, which Transformer Engine's fused
norm-linear modules change). A candidate order is accepted only when every parameter's start and
end fall on the chunk boundaries the writers recorded in `.metadata`; after reading, each
parameter's stored main param must equal the checkpoint's model weight (cast to its dtype), so a
layout guessed wrong is an error, never a silently wrong optimizer state.

Read: dense GPT writers at any tensor/pipeline/data-parallel size (equal pipeline stages, no
virtual stages), any bucket size, fp32/bf16/fp16 parameters, fp32 or bf16 gradients, into any
reader layout (each parameter is put together from its writer parts, then cut into this rank's
chunks). Other writers (experts, uneven or virtual pipeline stages) are refused with the Megatron-LM
flag that re-saves the state in model space.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from gigatron.core.checkpoint.io import CheckpointError

__all__ = ["SHARDING", "bucket_layout", "read_optimizer_object", "has_adam_buckets", "DpReshardableRead"]

SHARDING = "dp_reshardable"
_PREFIX = "optimizer.distributed.dp_group_idx_"
_BUCKET = re.compile(r"^optimizer\.distributed\.dp_group_idx_(\d+)\.gbuf_idx_(\d+)\.dtype_(.+)\.bucket_idx_(\d+)"
                     r"\.(param|exp_avg|exp_avg_sq)$")
_STATES = ("param", "exp_avg", "exp_avg_sq")
PARAM_ALIGNMENT = 64  # elements; Megatron's distributed optimizer starts every parameter here
RESAVE = ("re-save it with Megatron-LM adding --dist-ckpt-optim-fully-reshardable (model-space optimizer "
          "state), or load it with --no-load-optim")

# Megatron-Core's registration order inside a transformer layer, under our (unfused) names.
_ATTENTION_NORMS = ("self_attention.q_layernorm.weight", "self_attention.q_layernorm.bias",
                    "self_attention.k_layernorm.weight", "self_attention.k_layernorm.bias")
_PROJ = ("self_attention.linear_proj.weight", "self_attention.linear_proj.bias")
_QKV = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")
_FC1 = ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")
_FC2 = ("mlp.linear_fc2.weight", "mlp.linear_fc2.bias")
_IN_NORM = ("input_layernorm.weight", "input_layernorm.bias")
_MLP_NORM = ("pre_mlp_layernorm.weight", "pre_mlp_layernorm.bias")
LAYER_ORDERS = {
    # local spec: separate norm modules before the attention and the MLP
    "local": _IN_NORM + _PROJ + _QKV + _ATTENTION_NORMS + _MLP_NORM + _FC1 + _FC2,
    # Transformer Engine spec: the norms live inside linear_qkv / linear_fc1, before their weight
    "transformer_engine": _PROJ + _IN_NORM + _QKV + _ATTENTION_NORMS + _MLP_NORM + _FC1 + _FC2,
    # the same with the fused norm registered after the linear's own parameters
    "transformer_engine_norm_last": _PROJ + _QKV + _IN_NORM + _ATTENTION_NORMS + _FC1 + _MLP_NORM + _FC2,
}
_BEFORE_LAYERS = ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight")
_AFTER_LAYERS = ("decoder.final_layernorm.weight", "decoder.final_layernorm.bias", "output_layer.weight",
                 "output_layer.bias")
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclasses.dataclass(frozen=True)
class Bucket:
    """One stored bucket: its key without the state name, stored length, chunk boundaries, and
    the dtype of each state (exp_avg may be stored in lower precision than the main param)."""

    key: str
    size: int
    bounds: frozenset
    dtypes: tuple  # ((state, dtype), ...)

    def dtype(self, state: str) -> torch.dtype:
        return dict(self.dtypes)[state]


@dataclasses.dataclass(frozen=True)
class Part:
    """One writer rank's copy of a parameter: elements [start, start + numel) of `bucket`, of the
    rank's (tensor-parallel local) `shape`; `boxes`: (dim, local start, length, global offsets) of
    the pieces of it that make up the global tensor (two for SwiGLU's [gate; up] fc1)."""

    bucket: Bucket
    start: int
    shape: tuple
    boxes: tuple

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one parameter (our global name, the checkpoint's global `shape`) lies: the parts of
    the writer ranks that together hold it once (tensor-parallel rank 0's copy of a replicated one)."""

    shape: tuple
    parts: tuple


def _buckets(metadata) -> dict[tuple, dict]:
    """{(group, gbuf, bucket): {state: (key, metadata)}} of the stored flat buckets."""
    found: dict[tuple, dict] = {}
    for key, md in metadata.state_dict_metadata.items():
        match = _BUCKET.match(key)
        if match and isinstance(md, TensorStorageMetadata):
            group, gbuf, _, bucket, state = match.groups()
            found.setdefault((int(group), int(gbuf), int(bucket)), {})[state] = (key, md)
    return found


def has_adam_buckets(metadata) -> bool:
    return any({"exp_avg", "exp_avg_sq"} <= set(states) for states in _buckets(metadata).values())


def read_optimizer_object(iter_dir: str, metadata, read_object) -> dict:
    """The torch optimizer's state dict (param_groups with the step) Megatron stores as the
    ShardedObject `optimizer.distributed.dp_group_idx_{G}.optimizer`; `read_object(iter_dir,
    metadata, key)` reads one ShardedObject safely."""
    def objects(name: str) -> list[str]:
        return sorted(index.fqn for index in metadata.storage_data
                      if index.fqn.startswith(_PREFIX) and index.fqn.split("/")[0].endswith(f".{name}"))

    keys = objects("optimizer")
    if not keys:
        raise CheckpointError(f"its '{SHARDING}' optimizer state has no optimizer.distributed.dp_group_idx_*."
                              "optimizer object (the parameter groups and step)")
    value = read_object(iter_dir, metadata, keys[0])
    if isinstance(value, dict) and isinstance(value.get("optimizer"), dict):
        value = value["optimizer"]
    if not isinstance(value, dict) or not isinstance(value.get("param_groups"), list):
        raise CheckpointError(f"{keys[0]} does not hold the optimizer's param_groups")
    scaler = objects("grad_scaler")
    if scaler:
        value = {**value, "grad_scaler": read_object(iter_dir, metadata, scaler[0])}
    return value


_UNEVEN_PIPELINE = ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
                    "pipeline_model_parallel_layout", "account_for_embedding_in_pipeline_split",
                    "account_for_loss_in_pipeline_split", "virtual_pipeline_model_parallel_size",
                    "num_layers_per_virtual_pipeline_stage")


def pipeline_size(args: dict) -> int:
    return int(args.get("pipeline_model_parallel_size") or 1)


def tensor_size(args: dict) -> int:
    return int(args.get("tensor_model_parallel_size") or 1)


def _writer_problem(args: dict, found: dict) -> Optional[str]:
    """Why this reader cannot place the buffers of the checkpoint's writer, or None."""
    big = []
    tp, pp = tensor_size(args), pipeline_size(args)
    uneven = [f"--{name.replace('_', '-')}" for name in _UNEVEN_PIPELINE if args.get(name)]
    if pp > 1 and (uneven or int(args.get("num_layers") or 0) % pp):
        big.append(f"--pipeline-model-parallel-size {pp} with " + (", ".join(uneven) or "uneven stages"))
    if args.get("num_experts"):
        big.append(f"--num-experts {args['num_experts']}")
    groups = sorted({g for g, _, _ in found})
    if not big and groups != list(range(pp * tp)):
        big.append(f"data-parallel groups {groups} for tensor/pipeline-parallel size {tp}/{pp}")
    buffers = {(g, b) for g, b, _ in found}
    if not big and len(buffers) > len(groups):
        big.append("several gradient buffers per rank (parameters of several dtypes, or expert parameters)")
    if big:
        return (f"its distributed-optimizer state is in Megatron-Core's '{SHARDING}' layout, which Gigatron reads "
                f"from writers of dense GPT models (pipeline stages of equal layer counts, no virtual stages) with one "
                f"gradient buffer per rank; this one was saved with {', '.join(big)}: {RESAVE}")
    incomplete = sorted(key for key, states in found.items() if set(states) != set(_STATES))
    if incomplete:
        return f"its '{SHARDING}' buckets {incomplete[:4]} lack one of {_STATES}"
    return None


def _stored_buckets(found: dict, group: int) -> list[Bucket]:
    """The buckets of data-parallel group `group` (one pipeline stage), in buffer order."""
    out = []
    for (g, _, _), states in sorted(found.items()):
        if g != group:
            continue
        key, md = states["param"]
        size = int(md.size[0])
        for state in _STATES:
            if tuple(states[state][1].size) != (size,):
                raise CheckpointError(f"{states[state][0]} holds {tuple(states[state][1].size)} elements, its "
                                      f"bucket's param {size}")
        bounds = {0, size}
        for chunk in md.chunks:
            bounds.update((int(chunk.offsets[0]), int(chunk.offsets[0]) + int(chunk.sizes[0])))
        dtypes = tuple((state, states[state][1].properties.dtype) for state in _STATES)
        out.append(Bucket(key[:-len(".param")], size, frozenset(bounds), dtypes))
    return out


# Megatron-Core's tensor-parallel split of a GPT's parameters: column-parallel (dim 0: the fused
# QKV, fc1, the vocabulary-parallel embedding and output layer) and row-parallel (dim 1) weights;
# all else (norms, row-parallel biases, position embeddings) is replicated on every rank.
_COLUMN = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias", "mlp.linear_fc1.weight",
           "mlp.linear_fc1.bias", "embedding.word_embeddings.weight", "output_layer.weight")
_ROW = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def _split_dim(name: str) -> Optional[int]:
    match = _LAYER_NAME.match(name)
    suffix = match.group(2) if match else name
    return 0 if suffix in _COLUMN else 1 if suffix in _ROW else None


def _local(name: str, shape: tuple, tp: int, rank: int, swiglu: bool) -> tuple[tuple, tuple]:
    """(local shape, boxes) of tensor-parallel rank `rank`'s copy of `name` (global `shape`)."""
    dim = _split_dim(name)
    if dim is None or tp == 1:
        return tuple(shape), ((0, 0, shape[0] if shape else 1, (0,) * len(shape)),)
    if shape[dim] % tp:
        raise CheckpointError(f"{name} {tuple(shape)} does not split into {tp} tensor-parallel parts along dim {dim}")
    local = list(shape)
    local[dim] //= tp
    n = local[dim]
    if swiglu and name.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")):
        half, gates = n // 2, shape[0] // 2  # local [gate_r; up_r] of the global [gate; up]
        offsets = [(0,) * len(shape), (0,) * len(shape)]
        offsets[0] = (rank * half,) + offsets[0][1:]
        offsets[1] = (gates + rank * half,) + offsets[1][1:]
        return tuple(local), ((0, 0, half, offsets[0]), (0, half, half, offsets[1]))
    offsets = [0] * len(shape)
    offsets[dim] = rank * n
    return tuple(local), ((dim, 0, n, tuple(offsets)),)


def megatron_order(shapes: dict, layer_order: tuple) -> Optional[list[str]]:
    """Our global names in Megatron-Core's registration order, or None if a name is not in the
    table (a model this reader does not place)."""
    ranked = []
    for name in shapes:
        match = _LAYER_NAME.match(name)
        if match:
            suffix = match.group(2)
            if suffix not in layer_order:
                return None
            ranked.append(((1, int(match.group(1)), layer_order.index(suffix)), name))
        elif name in _BEFORE_LAYERS:
            ranked.append(((0, 0, _BEFORE_LAYERS.index(name)), name))
        elif name in _AFTER_LAYERS:
            ranked.append(((2, 0, _AFTER_LAYERS.index(name)), name))
        else:
            return None
    return [name for _, name in sorted(ranked)]


def _walk(order: list[str], shapes: dict, buckets: list[Bucket]) -> Optional[dict]:
    """Place the parameters (reversed registration order) into the stored buckets; None where a
    parameter would cross its bucket's end or miss the writers' chunk boundaries."""
    slots, index, cursor = {}, 0, 0
    for name in reversed(order):
        if index >= len(buckets):
            return None
        bucket = buckets[index]
        start = -(-cursor // PARAM_ALIGNMENT) * PARAM_ALIGNMENT
        end = start + math.prod(shapes[name])
        if end > bucket.size or start not in bucket.bounds or end not in bucket.bounds:
            return None
        slots[name] = (bucket, start)
        if end == bucket.size:
            index, cursor = index + 1, 0
        else:
            cursor = end
    return slots if index == len(buckets) else None


def _stage_shapes(shapes: dict, stage: int, stages: int, num_layers: int) -> dict:
    """The parameters pipeline stage `stage` registers (equal layer counts): the embedding on the
    first, the final norm and output layer on the last; with a tied output layer and more than one
    stage, the last stage's own copy of the embedding (`output_layer.weight`, read nowhere)."""
    per_stage = num_layers // stages
    out = {}
    for name, shape in shapes.items():
        match = _LAYER_NAME.match(name)
        if match:
            keep = stage * per_stage <= int(match.group(1)) < (stage + 1) * per_stage
        else:
            keep = stage == 0 if name in _BEFORE_LAYERS else stage == stages - 1
        if keep:
            out[name] = shape
    if (stages > 1 and stage == stages - 1 and "output_layer.weight" not in shapes
            and "embedding.word_embeddings.weight" in shapes):
        out["output_layer.weight"] = shapes["embedding.word_embeddings.weight"]
    return out


def bucket_layout(metadata, args: dict, shapes: dict) -> dict:
    """{our global name: Slot} for every parameter of the checkpoint (`shapes`: our global name ->
    the checkpoint's shape), or a CheckpointError naming why the buffers cannot be placed."""
    found = _buckets(metadata)
    if not found:
        raise CheckpointError(f"common.pt says its optimizer state is '{SHARDING}', but it holds no "
                              "optimizer.distributed.*.bucket_idx_* tensors: the checkpoint is incomplete")
    problem = _writer_problem(args, found)
    if problem:
        raise CheckpointError(problem)
    stages = pipeline_size(args)
    num_layers = int(args.get("num_layers") or 0)
    layers = {int(m.group(1)) for m in map(_LAYER_NAME.match, shapes) if m}
    if stages > 1 and layers != set(range(num_layers)):
        raise CheckpointError(f"its args say --num-layers {num_layers}, its model holds layers {sorted(layers)[:8]}")
    impl = str(args.get("transformer_impl") or "transformer_engine")
    names = sorted(LAYER_ORDERS, key=lambda n: (not n.startswith(impl), n != impl))
    tp, swiglu = tensor_size(args), bool(args.get("swiglu"))
    parts: dict[str, list] = {}
    for stage in range(stages):
        stage_shapes = _stage_shapes(shapes, stage, stages, num_layers) if stages > 1 else shapes
        for rank in range(tp):
            # Megatron numbers a rank's data-parallel group by its model-parallel rank (tp fastest)
            group = stage * tp + rank
            local = {name: _local(name, shape, tp, rank, swiglu) for name, shape in stage_shapes.items()}
            local_shapes = {name: shape for name, (shape, _) in local.items()}
            buckets = _stored_buckets(found, group)
            tried, placed = [], None
            for name in names:
                order = megatron_order(local_shapes, LAYER_ORDERS[name])
                if order is None:
                    unknown = sorted(n for n in local_shapes
                                     if megatron_order({n: local_shapes[n]}, LAYER_ORDERS[name]) is None)
                    raise CheckpointError(f"its '{SHARDING}' optimizer state belongs to parameters whose place in "
                                          f"Megatron's gradient buffer Gigatron does not know "
                                          f"({', '.join(unknown[:4])}): {RESAVE}")
                placed = _walk(order, local_shapes, buckets)
                if placed is not None:
                    break
                tried.append(name)
            if placed is None:
                sizes = ", ".join(str(b.size) for b in buckets)
                raise CheckpointError(f"its '{SHARDING}' buckets of pipeline stage {stage}, tensor-parallel rank "
                                      f"{rank} (lengths {sizes}) do not match this model's parameters in "
                                      f"Megatron-Core's buffer order (tried the {', '.join(tried)} layer specs): "
                                      f"{RESAVE}")
            for name, (bucket, start) in placed.items():
                if name in shapes and (rank == 0 or _split_dim(name) is not None):
                    shape, boxes = local[name]
                    parts.setdefault(name, []).append(Part(bucket, start, shape, boxes))
    return {name: Slot(tuple(shapes[name]), tuple(found_parts)) for name, found_parts in parts.items()}


class _MainSaved:
    """`optimizer.state.fp32_param.{name}` is present for every parameter with a slot (the flat
    `param` buckets hold every parameter's fp32 main param)."""

    def __init__(self, slots: dict) -> None:
        self.slots = slots

    def __contains__(self, key: str) -> bool:
        prefix = "optimizer.state.fp32_param."
        return key.startswith(prefix) and key[len(prefix):] in self.slots


class DpReshardableRead:
    """This rank's part of a dp_reshardable optimizer state: the flat segments to read (every
    writer part of each parameter it needs, into temporaries), then each parameter assembled in
    its global shape, each of our optimizer chunks copied out of it, and the stored main params
    checked against the checkpoint's weights."""

    def __init__(self, slots: dict, model_entries: dict) -> None:
        self.slots = slots
        self.entries = model_entries
        self.temps: dict[tuple, torch.Tensor] = {}  # (state, name, part) -> flat segment
        self.copies: list[tuple] = []  # (destination piece, state, name)
        self.weights: dict[str, torch.Tensor] = {}  # the checkpoint's weights, to check the main params
        self.problems: list[str] = []

    def saved_keys(self) -> _MainSaved:
        return _MainSaved(self.slots)

    def _need(self, state: str, name: str) -> None:
        for index, part in enumerate(self.slots[name].parts):
            if (state, name, index) not in self.temps:
                self.temps[(state, name, index)] = torch.empty(part.numel, dtype=part.bucket.dtype(state))

    def add(self, pieces) -> None:
        """Our optimizer pieces (`optimizer.state.{fp32_param|exp_avg|exp_avg_sq}.{global name}`)."""
        for piece in pieces:
            state, name = piece.key[len("optimizer.state."):].split(".", 1)
            state = "param" if state == "fp32_param" else state
            slot = self.slots.get(name)
            if slot is None:
                self.problems.append(f"optimizer state of {name}: not in the checkpoint's '{SHARDING}' buckets")
                continue
            saved, ours = slot.shape, tuple(piece.global_shape)
            if saved != ours and not (piece.vocab and saved[1:] == ours[1:]):
                self.problems.append(f"optimizer state of {name}: checkpoint shape {saved} vs model {ours}")
                continue
            self._need(state, name)
            self._need("param", name)  # every touched parameter's main param is checked
            self.copies.append((piece, state, name))

    def read_pieces(self, megatron_pieces) -> list:
        """The segments to read, and the model weights to check the main params against;
        megatron_pieces: the model reader's mapping of our pieces to the checkpoint's keys
        (megatron_dist.megatron_pieces, passed in by the reader that uses this module)."""
        from gigatron.core.checkpoint.dist.sharding import ShardPiece

        pieces = []
        for (state, name, index), temp in self.temps.items():
            part = self.slots[name].parts[index]
            pieces.append(ShardPiece(f"{part.bucket.key}.{state}", temp, (part.bucket.size,), (part.start,)))
        for name in sorted({name for state, name, _ in self.temps if state == "param"}):
            shape = self.slots[name].shape
            weight = torch.empty(shape, dtype=self._weight_dtype(name))
            mapped, problems = megatron_pieces([ShardPiece(name, weight, shape, (0,) * len(shape))], self.entries)
            self.problems += problems
            pieces += mapped
            self.weights[name] = weight
        return pieces

    def _weight_dtype(self, name: str) -> torch.dtype:
        from gigatron.core.checkpoint.megatron_names import split_block_name, stacked_candidates

        split = split_block_name(name)
        keys = [name] if split is None else [k for k, _ in stacked_candidates(split[2], split[0])]
        key = next((k for k in keys if k in self.entries), keys[0])
        md = self.entries.get(key)
        return md.properties.dtype if md is not None else torch.float32

    def _whole(self, state: str, name: str) -> torch.Tensor:
        """The parameter's `state` in its global shape, put together from the writer parts."""
        slot = self.slots[name]
        whole = torch.empty(slot.shape, dtype=slot.parts[0].bucket.dtype(state))
        for index, part in enumerate(slot.parts):
            local = self.temps[(state, name, index)].view(part.shape)
            for dim, start, length, offsets in part.boxes:
                box = local.narrow(dim, start, length) if local.dim() else local
                target = whole[tuple(slice(o, o + n) for o, n in zip(offsets, box.shape))]
                target.copy_(box)
        return whole

    @torch.no_grad()
    def finish(self) -> list[str]:
        """Check the main params, copy the states into our pieces; returns this rank's problems."""
        problems = []
        for name, weight in self.weights.items():
            if not torch.equal(self._whole("param", name).to(weight.dtype), weight):
                where = ", ".join(f"{p.bucket.key}[{p.start}:]" for p in self.slots[name].parts[:2])
                problems.append(f"the '{SHARDING}' main param placed at {where} is not the checkpoint's {name} "
                                f"(Megatron's buffer layout was not recognised): {RESAVE}")
        if problems:
            return problems[:4]
        wholes = {}
        for piece, state, name in self.copies:
            if (state, name) not in wholes:
                wholes[(state, name)] = self._whole(state, name)
            whole = wholes[(state, name)]
            offsets, sizes = tuple(piece.global_offsets), list(piece.sizes)
            destination = piece.tensor
            if piece.vocab and whole.shape[0] != piece.global_shape[0]:  # vocabulary padded differently
                destination.zero_()
                sizes[0] = min(sizes[0], whole.shape[0] - offsets[0])
                if sizes[0] <= 0:
                    continue
                destination = destination.narrow(0, 0, sizes[0])
            box = whole[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
            destination.copy_(box.to(destination.dtype))
        self.temps.clear()
        return []
