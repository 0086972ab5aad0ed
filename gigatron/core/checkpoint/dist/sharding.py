"""torch_dist sharding: which chunks of which global tensors this rank holds, and writes.

Every tensor is stored under its GLOBAL name (global layer number, global expert number) in its
global logical shape; a rank's tensor-parallel shard is one or more rectangular chunks of it (a
stride-k parameter, the SwiGLU fc1 `[gate_r; up_r]`, gives k chunks; a parameter with partition
segments, the Mamba mixer's in_proj `[z_r; x_r; B_r; C_r; dt_r]`, one chunk per segment, so the
stored tensor is the tp=1 one), and a distributed
optimizer's flat range of a parameter becomes the boxes that tile that range in model space.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.distributed as dist

from gigatron.core.checkpoint.dist.common import OPTIMIZER_PREFIX, VOCAB_PARAMS, collective_device, process_rank
from gigatron.core.checkpoint.io import CheckpointError
from gigatron.core.parallel.tags import (
    is_expert_parallel,
    is_shared_embedding,
    is_tensor_parallel,
    partition_dim,
    partition_segments,
    partition_shard,
    partition_stride,
)
from gigatron.core.parallel.init import partition_blocks

__all__ = [
    "STATE_KEYS", "ShardPiece", "unwrap", "global_param_name", "storage_key", "global_shape",
    "local_box_to_global", "flat_range_boxes", "pieces_of_flat_range", "check_groups", "is_writer",
    "named_chunk_params", "sharded_model_state", "optimizer_kind", "param_keys", "sharded_optimizer_state",
    "optimizer_load_pieces", "grouped_expert_layout",
]

STATE_KEYS = {"adam": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}
_LAYER_NAME = re.compile(r"^(decoder|encoder)\.layers\.(\d+)\.(.*)$")
# the experts of a decoder layer or of a multi-token prediction block's layer
_EXPERTS = r"(?:decoder\.layers\.\d+|mtp\.layers\.\d+\.transformer_layer)\.mlp\.experts"
_LOCAL_EXPERT_NAME = re.compile(rf"^({_EXPERTS})\.local_experts\.(\d+)\.(.*)$")
_GROUPED_WEIGHT_NAME = re.compile(rf"^({_EXPERTS})\.weight([12])$")


@dataclass
class ShardPiece:
    """One rectangular chunk of a global tensor that this rank holds.

    `tensor` is the local data (a view into a parameter or optimizer state, shaped like the chunk);
    `global_offsets` its position in the global tensor of shape `global_shape`. `write`: this rank
    is the replica that writes the chunk. `vocab`: dim 0 is a padded vocabulary (may differ
    between layouts on load)."""

    key: str
    tensor: torch.Tensor
    global_shape: tuple
    global_offsets: tuple
    write: bool = True
    vocab: bool = False

    @property
    def sizes(self) -> tuple:
        return tuple(self.tensor.shape)


def unwrap(chunk):
    return getattr(chunk, "module", chunk)


def global_expert_name(module: torch.nn.Module, name: str) -> str:
    """`name` with a local expert number (`….mlp.experts.local_experts.{j}.…`, j counted on this
    expert-parallel rank) replaced by the global one (the experts module's `local_expert_ids[j]`)."""
    match = _LOCAL_EXPERT_NAME.match(name)
    if match is None:
        return name
    experts = module.get_submodule(match.group(1))
    ids = getattr(experts, "local_expert_ids", None)
    if ids is None:
        return name
    return f"{match.group(1)}.local_experts.{ids[int(match.group(2))]}.{match.group(3)}"


def global_param_name(module: torch.nn.Module, name: str) -> str:
    """`name` of a parameter of one model stage with the stage's layer number made global
    (`decoder.layers.{i + layer_offset}.…`, and `encoder.layers.…` of a pipelined BERT encoder) and,
    for a routed expert, its expert number made global (`….local_experts.{g}.…`, g in [0, num_experts))."""
    name = global_expert_name(module, name)
    match = _LAYER_NAME.match(name)
    if match is None:
        return name
    stack = getattr(module, match.group(1), None)
    offset = int(getattr(stack, "layer_offset", 0) or 0)
    return f"{match.group(1)}.layers.{int(match.group(2)) + offset}.{match.group(3)}"


def storage_key(module: torch.nn.Module, name: str, param: torch.Tensor) -> tuple[str, bool]:
    """(key in the checkpoint, whether this copy is written). A tied output layer on a stage
    without the embedding, and the multi-token prediction blocks' copy of the word embedding on the
    last stage, are the word embedding: read from its key, never written."""
    if name == "output_layer.weight" and is_shared_embedding(param):
        return "embedding.word_embeddings.weight", False
    if name.startswith("embedding.") and is_shared_embedding(param) and not getattr(module, "pre_process", True):
        # the last stage's copy of the word embedding for multi-token prediction: read, never written
        return name, False
    return global_param_name(module, name), True


def tp_layout(param: torch.Tensor) -> tuple[int, int, int, int]:
    """(partition dim, stride, shard rank, number of shards); dim -1 for a replicated tensor."""
    if not is_tensor_parallel(param):
        return -1, 1, 0, 1
    shard = partition_shard(param)
    if shard is None:
        raise ValueError("a tensor-parallel parameter has no shard rank/size (set_tensor_parallel_attributes "
                         "was called without rank= and world_size=); it cannot be checkpointed as torch_dist")
    return partition_dim(param), partition_stride(param), shard[0], shard[1]


def global_shape(param: torch.Tensor) -> tuple:
    dim, _, _, num_shards = tp_layout(param)
    shape = list(param.shape)
    if dim >= 0:
        shape[dim] *= num_shards
    return tuple(shape)


def local_box_to_global(local: torch.Tensor, local_offsets: Sequence[int], param: torch.Tensor
                         ) -> list[tuple[torch.Tensor, tuple]]:
    """Split a box of the local shard (data `local` at `local_offsets`) at the blocks of the
    partition dim (stride blocks or partition segments); return (data, global offsets) per piece."""
    return _box_to_global(local, local_offsets, tuple(param.shape), tp_layout(param), partition_segments(param))


def _box_to_global(local, local_offsets, local_shape, layout, segments) -> list[tuple[torch.Tensor, tuple]]:
    dim, stride, rank, num_shards = layout
    if dim < 0:
        return [(local, tuple(local_offsets))]
    blocks = partition_blocks(local_shape[dim] * num_shards, stride, segments)
    lo, hi = local_offsets[dim], local_offsets[dim] + local.shape[dim]
    pieces = []
    local_start = global_start = 0
    for n in blocks:
        piece = n // num_shards  # this shard's length of the block
        start, end = max(lo, local_start), min(hi, local_start + piece)
        if start < end:
            offsets = list(local_offsets)
            offsets[dim] = global_start + rank * piece + (start - local_start)
            pieces.append((local.narrow(dim, start - lo, end - start), tuple(offsets)))
        local_start += piece
        global_start += n
    return pieces


def flat_range_boxes(shape: Sequence[int], start: int, end: int) -> list[tuple[tuple, tuple, int]]:
    """Decompose the flat (row-major) element range [start, end) of a tensor of `shape` into boxes
    that are each contiguous in flat order: (offsets, sizes, flat start) per box."""
    shape = tuple(int(s) for s in shape)
    if start >= end:
        return []
    if len(shape) <= 1:
        return [((start,), (end - start,), start)] if shape else [((), (), 0)]
    inner = math.prod(shape[1:])
    first, last = start // inner, (end - 1) // inner
    boxes = []
    if first == last or start % inner:
        # partial slab at the start (or the whole range inside one slab)
        stop = min(end, (first + 1) * inner)
        for offs, sizes, flat in flat_range_boxes(shape[1:], start - first * inner, stop - first * inner):
            boxes.append(((first, *offs), (1, *sizes), flat + first * inner))
        if stop == end:
            return boxes
        first += 1
        start = stop
    whole_end = end // inner  # slabs [first, whole_end) are complete
    if whole_end > first:
        boxes.append(((first, *([0] * (len(shape) - 1))), (whole_end - first, *shape[1:]), first * inner))
    if end % inner and whole_end >= first:
        for offs, sizes, flat in flat_range_boxes(shape[1:], 0, end - whole_end * inner):
            boxes.append(((whole_end, *offs), (1, *sizes), flat + whole_end * inner))
    return boxes


def grouped_expert_layout(module: torch.nn.Module, name: str):
    """For a GroupedMLP weight (`decoder.layers.{i}.mlp.experts.weight1` / `weight2`): (layer-global
    experts prefix, "fc1"/"fc2", global expert ids of the local blocks, block shape in memory,
    tensor-parallel layout of one expert's [out, in] shard); else None.

    weight1's memory is G blocks [h, fo/t], each the transpose of SequentialMLP's fc1 shard
    [fo/t, h] (rows [gate_r; up_r] with --swiglu); weight2's is G blocks [f/t, h], each the
    transpose of fc2's shard [h, f/t]. So block j is stored as the transpose under expert
    local_expert_ids[j]'s SequentialMLP key, and both implementations share one layout."""
    match = _GROUPED_WEIGHT_NAME.match(name)
    if match is None:
        return None
    experts = module.get_submodule(match.group(1))
    if not hasattr(experts, "expert_weights"):
        return None
    prefix = global_param_name(module, f"{match.group(1)}.weight{match.group(2)}").rsplit(".", 1)[0]
    param = getattr(experts, f"weight{match.group(2)}")
    g = experts.num_local_experts
    sharded = is_tensor_parallel(param)
    rank, shards = (tp_layout(param)[2], tp_layout(param)[3]) if sharded else (0, 1)
    if match.group(2) == "1":
        block = (experts.hidden, experts.fc1_local)  # [h, fo/t]
        layout = (0, 2 if experts.swiglu else 1, rank, shards) if sharded else (-1, 1, 0, 1)
        kind = "fc1"
    else:
        block = (experts.ffn_local, experts.hidden)  # [f/t, h]
        layout = (1, 1, rank, shards) if sharded else (-1, 1, 0, 1)
        kind = "fc2"
    assert g * block[0] * block[1] == param.numel()
    return prefix, kind, list(experts.local_expert_ids), block, layout


def _grouped_pieces(grouped, kind_prefix: str, flat: torch.Tensor, start: int, write: bool) -> list[ShardPiece]:
    """Pieces for elements [start, start + flat.numel()) of a GroupedMLP weight, one key per expert."""
    prefix, kind, ids, block, layout = grouped
    size = block[0] * block[1]
    shard_shape = (block[1], block[0])  # one expert's [out, in] shard (SequentialMLP's)
    gshape = list(shard_shape)
    if layout[0] >= 0:
        gshape[layout[0]] *= layout[3]
    pieces = []
    end = start + flat.numel()
    for j, expert in enumerate(ids):
        lo, hi = max(start, j * size), min(end, (j + 1) * size)
        if lo >= hi:
            continue
        key = f"{kind_prefix}{prefix}.local_experts.{expert}.linear_{kind}.weight"
        for offsets, sizes, flat_start in flat_range_boxes(block, lo - j * size, hi - j * size):
            at = j * size + flat_start - start
            box = flat[at: at + math.prod(sizes)].view(sizes).t()  # in the [out, in] shard
            for data, goffsets in _box_to_global(box, (offsets[1], offsets[0]), shard_shape, layout, None):
                pieces.append(ShardPiece(key, data, tuple(gshape), goffsets, write, False))
    return pieces


def pieces_of_flat_range(key: str, flat: torch.Tensor, param: torch.Tensor, start: int, write: bool,
                          vocab: bool, grouped=None, kind_prefix: str = "") -> list[ShardPiece]:
    """Pieces for elements [start, start + flat.numel()) of the local shard `param`, with data `flat`
    (1-D, contiguous). `grouped`: the param's `grouped_expert_layout` (keys `kind_prefix` + the
    per-expert name)."""
    if grouped is not None:
        return _grouped_pieces(grouped, kind_prefix, flat, start, write)
    pieces = []
    gshape = global_shape(param)
    for offsets, sizes, flat_start in flat_range_boxes(param.shape, start, start + flat.numel()):
        box = flat[flat_start - start: flat_start - start + math.prod(sizes)].view(sizes)
        for data, goffsets in local_box_to_global(box, offsets, param):
            pieces.append(ShardPiece(key, data, gshape, goffsets, write, vocab))
    return pieces


def check_groups(groups, model_chunks: Sequence[torch.nn.Module] = ()) -> None:
    """Every expert weight is stored per expert under its global number (GroupedMLP's weight1 /
    weight2 split into their expert blocks, see `grouped_expert_layout`), so any expert-parallel /
    expert tensor-parallel layout saves and loads; kept as the save/load entry check of the
    model's parameters: each must have a checkpoint key."""
    for module, name, param in named_chunk_params(model_chunks):
        if is_expert_parallel(param) and _LOCAL_EXPERT_NAME.match(name) is None \
                and grouped_expert_layout(module, name) is None:
            raise ValueError(f"--ckpt-format torch_dist stores expert weights per expert; {name} is neither a "
                             "SequentialMLP expert weight nor a GroupedMLP weight1/weight2, so it has no "
                             "per-expert key. Use --ckpt-format torch.")


def is_writer(param: torch.Tensor, groups, data_sharded: bool = False) -> bool:
    """Whether this rank writes its copy of `param` (or of its optimizer state): rank 0 of the
    data-parallel replicas (data/context-parallel group; expert-data-parallel group for an expert
    weight), unless `data_sharded` (the distributed optimizer: each rank holds its own range), and
    tensor-parallel rank 0 (expert tensor-parallel for an expert weight) of a replicated tensor."""
    expert = is_expert_parallel(param) and getattr(groups, "expt_dp", None) is not None
    data_group = groups.expt_dp if expert else groups.dp_cp
    model_group = groups.expt_tp if expert else groups.tp
    return (data_sharded or data_group.rank == 0) and (is_tensor_parallel(param) or model_group.rank == 0)


def named_chunk_params(model_chunks) -> Iterable[tuple[torch.nn.Module, str, torch.nn.Parameter]]:
    seen = set()
    for chunk in model_chunks:
        module = unwrap(chunk)
        for name, param in module.named_parameters():
            if param in seen:
                continue
            seen.add(param)
            yield module, name, param


def sharded_model_state(model_chunks: Sequence[torch.nn.Module], groups) -> list[ShardPiece]:
    """This rank's chunks of every model parameter, keyed by global name, with global shapes and
    offsets. `write` is set on one replica of each chunk only."""
    check_groups(groups, model_chunks)
    pieces = []
    for module, name, param in named_chunk_params(model_chunks):
        key, written = storage_key(module, name, param)
        replica0 = is_writer(param, groups)
        vocab = key in VOCAB_PARAMS
        grouped = grouped_expert_layout(module, name)
        if grouped is not None:
            pieces += pieces_of_flat_range(key, param.detach().reshape(-1), param, 0, written and replica0, False,
                                           grouped)
            continue
        zeros = (0,) * param.dim()
        for data, offsets in local_box_to_global(param.detach(), zeros, param):
            pieces.append(ShardPiece(key, data, global_shape(param), offsets, written and replica0, vocab))
    return pieces


def optimizer_kind(optimizer) -> str:
    return "adam" if isinstance(optimizer.optimizer, torch.optim.AdamW) else "sgd"


def optimizer_is_sharded(optimizer) -> bool:
    return bool(getattr(optimizer.config, "use_distributed_optimizer", False))


def param_keys(model_chunks) -> dict:
    """param -> (storage key, written, vocab, grouped_expert_layout or None)."""
    out = {}
    for module, name, param in named_chunk_params(model_chunks):
        key, written = storage_key(module, name, param)
        out[param] = (key, written, key in VOCAB_PARAMS, grouped_expert_layout(module, name))
    return out


def optimizer_step(optimizer) -> tuple[int, bool]:
    """(Adam step count, whether optimizer state exists), agreed over all ranks."""
    step, initialized = 0, 0
    for st in optimizer.optimizer.state.values():
        initialized = max(initialized, int(bool(st)))
        if "step" in st:
            step = max(step, int(float(st["step"])))
    agreed = torch.tensor([float(step), float(initialized)], dtype=torch.float64, device=collective_device())
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return int(agreed[0].item()), bool(agreed[1].item())


def sharded_optimizer_state(optimizer, model_chunks: Sequence[torch.nn.Module], groups
                            ) -> tuple[list[ShardPiece], dict]:
    """(pieces of the fp32 main params and per-element optimizer states, non-sharded optimizer
    state: kind, step, param group hyper-parameters, grad scaler). Collective (agrees the step)."""
    check_groups(groups, model_chunks)
    kind = optimizer_kind(optimizer)
    step, initialized = optimizer_step(optimizer)
    keys = param_keys(model_chunks)
    sharded = optimizer_is_sharded(optimizer)
    pieces = []
    for entry in optimizer.entries:
        key, written, vocab, grouped = keys[entry.model_param]
        replica0 = is_writer(entry.model_param, groups, data_sharded=sharded)
        # an fp32 parameter is its own main param: the model entry above already stores it
        tensors = {"fp32_param": entry.main_param} if optimizer.stores_main_copy(entry.model_param) else {}
        state = optimizer.optimizer.state.get(entry.main_param, {})
        if initialized:
            for name in STATE_KEYS[kind]:
                if name not in state:
                    raise CheckpointError(f"optimizer state {name} of {entry.name} is missing on rank "
                                          f"{process_rank()} while other parameters have state")
                tensors[name] = state[name]
        for name, tensor in tensors.items():
            pieces += pieces_of_flat_range(f"{OPTIMIZER_PREFIX}{name}.{key}", tensor.detach().reshape(-1),
                                            entry.model_param, entry.start, written and replica0, vocab,
                                            grouped, f"{OPTIMIZER_PREFIX}{name}.")
    common = {
        "kind": kind,
        "step": step,
        "initialized": initialized,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.optimizer.param_groups],
        "grad_scaler": optimizer.grad_scaler.state_dict() if optimizer.grad_scaler is not None else None,
    }
    return pieces, common


def optimizer_load_pieces(optimizer, model_chunks, kind: str, initialized: bool, saved_keys
                          ) -> tuple[list[ShardPiece], list[tuple]]:
    """Destination pieces for the optimizer state and (main param, {state name: new tensor}).
    A main param is read where this run keeps a copy and the checkpoint stored one; otherwise it
    is the loaded model weight (load.install_optimizer_state)."""
    keys = param_keys(model_chunks)
    pieces, states = [], []
    for entry in optimizer.entries:
        key, _, vocab, grouped = keys[entry.model_param]
        targets = {}
        probe = key if grouped is None else f"{grouped[0]}.local_experts.{grouped[2][0]}.linear_{grouped[1]}.weight"
        if optimizer.stores_main_copy(entry.model_param) and f"{OPTIMIZER_PREFIX}fp32_param.{probe}" in saved_keys:
            targets["fp32_param"] = entry.main_param
        new_state = {"main_param_read": "fp32_param" in targets}
        if initialized:
            for name in STATE_KEYS[kind]:
                new_state[name] = torch.zeros_like(entry.main_param, dtype=torch.float32)
                targets[name] = new_state[name]
        for name, tensor in targets.items():
            pieces += pieces_of_flat_range(f"{OPTIMIZER_PREFIX}{name}.{key}", tensor.detach().reshape(-1),
                                            entry.model_param, entry.start, False, vocab,
                                            grouped, f"{OPTIMIZER_PREFIX}{name}.")
        states.append((entry, new_state))
    return pieces, states
