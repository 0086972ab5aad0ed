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
load at any expert-parallel size; GroupedMLP weights load only where the expert layout is the
tensor-parallel one (expert-parallel size 1, expert tensor-parallel size = tensor-parallel size). Optimizer state (fp32 main params and the optimizer's per-element states)
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
not match `metadata.json` is named in the error.
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    create_default_global_save_plan,
)
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from gigatron.core.checkpoint.io import CheckpointError, atomic_torch_save, atomic_write_text, safe_torch_load, to_plain
from gigatron.core.parallel.tags import (
    is_expert_parallel,
    is_shared_embedding,
    is_tensor_parallel,
    partition_dim,
    partition_shard,
    partition_stride,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "METADATA_FILENAME",
    "COMMON_FILENAME",
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
    "read_checkpoint_metadata",
    "verify_torch_dist_checkpoint",
    "read_full_model_tensors",
]

FORMAT_NAME = "torch_dist"
FORMAT_VERSION = 1
METADATA_FILENAME = "metadata.json"
COMMON_FILENAME = "common.pt"
DCP_METADATA_FILENAME = ".metadata"
OPTIMIZER_PREFIX = "optimizer.state."
_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
_STATE_KEYS = {"adam": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_LOCAL_EXPERT_NAME = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts)\.local_experts\.(\d+)\.(.*)$")
_CRC_BLOCK = 16 << 20


class IncompleteCheckpointError(CheckpointError):
    """The checkpoint directory has no metadata.json: its save was interrupted."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is missing, truncated or does not match its recorded checksum."""


# ---------------------------------------------------------------------------------------------
# Sharded descriptions
# ---------------------------------------------------------------------------------------------


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


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def _global_expert_name(module: torch.nn.Module, name: str) -> str:
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
    (`decoder.layers.{i + layer_offset}.…`) and, for a routed expert, its expert number made global
    (`….local_experts.{g}.…`, g in [0, num_experts))."""
    name = _global_expert_name(module, name)
    match = _LAYER_NAME.match(name)
    if match is None:
        return name
    decoder = getattr(module, "decoder", None)
    offset = int(getattr(decoder, "layer_offset", 0) or 0)
    return f"decoder.layers.{int(match.group(1)) + offset}.{match.group(2)}"


def _storage_key(module: torch.nn.Module, name: str, param: torch.Tensor) -> tuple[str, bool]:
    """(key in the checkpoint, whether this copy is written). A tied output layer on a stage
    without the embedding is the word embedding: read from its key, never written."""
    if name == "output_layer.weight" and is_shared_embedding(param):
        return "embedding.word_embeddings.weight", False
    return global_param_name(module, name), True


def _tp_layout(param: torch.Tensor) -> tuple[int, int, int, int]:
    """(partition dim, stride, shard rank, number of shards); dim -1 for a replicated tensor."""
    if not is_tensor_parallel(param):
        return -1, 1, 0, 1
    shard = partition_shard(param)
    if shard is None:
        raise ValueError("a tensor-parallel parameter has no shard rank/size (set_tensor_parallel_attributes "
                         "was called without rank= and world_size=); it cannot be checkpointed as torch_dist")
    return partition_dim(param), partition_stride(param), shard[0], shard[1]


def _global_shape(param: torch.Tensor) -> tuple:
    dim, _, _, num_shards = _tp_layout(param)
    shape = list(param.shape)
    if dim >= 0:
        shape[dim] *= num_shards
    return tuple(shape)


def _local_box_to_global(local: torch.Tensor, local_offsets: Sequence[int], param: torch.Tensor
                         ) -> list[tuple[torch.Tensor, tuple]]:
    """Split a box of the local shard (data `local` at `local_offsets`) at the stride blocks of the
    partition dim; return (data, global offsets) per piece."""
    dim, stride, rank, num_shards = _tp_layout(param)
    if dim < 0:
        return [(local, tuple(local_offsets))]
    block = param.shape[dim] // stride  # local length of one stride block
    lo, hi = local_offsets[dim], local_offsets[dim] + local.shape[dim]
    pieces = []
    if hi <= lo:
        return pieces
    for b in range(lo // block, (hi - 1) // block + 1):
        start, end = max(lo, b * block), min(hi, (b + 1) * block)
        offsets = list(local_offsets)
        offsets[dim] = (b * num_shards + rank) * block + (start - b * block)
        pieces.append((local.narrow(dim, start - lo, end - start), tuple(offsets)))
    return pieces


def _flat_range_boxes(shape: Sequence[int], start: int, end: int) -> list[tuple[tuple, tuple, int]]:
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
        for offs, sizes, flat in _flat_range_boxes(shape[1:], start - first * inner, stop - first * inner):
            boxes.append(((first, *offs), (1, *sizes), flat + first * inner))
        if stop == end:
            return boxes
        first += 1
        start = stop
    whole_end = end // inner  # slabs [first, whole_end) are complete
    if whole_end > first:
        boxes.append(((first, *([0] * (len(shape) - 1))), (whole_end - first, *shape[1:]), first * inner))
    if end % inner and whole_end >= first:
        for offs, sizes, flat in _flat_range_boxes(shape[1:], 0, end - whole_end * inner):
            boxes.append(((whole_end, *offs), (1, *sizes), flat + whole_end * inner))
    return boxes


def _pieces_of_flat_range(key: str, flat: torch.Tensor, param: torch.Tensor, start: int, write: bool,
                          vocab: bool) -> list[ShardPiece]:
    """Pieces for elements [start, start + flat.numel()) of the local shard `param`, with data `flat`
    (1-D, contiguous)."""
    pieces = []
    gshape = _global_shape(param)
    for offsets, sizes, flat_start in _flat_range_boxes(param.shape, start, start + flat.numel()):
        box = flat[flat_start - start: flat_start - start + math.prod(sizes)].view(sizes)
        for data, goffsets in _local_box_to_global(box, offsets, param):
            pieces.append(ShardPiece(key, data, gshape, goffsets, write, vocab))
    return pieces


def _check_groups(groups, model_chunks: Sequence[torch.nn.Module] = ()) -> None:
    """Refuse expert weights that are not stored per expert (GroupedMLP's weight1/weight2 hold all
    local experts in one tensor) when the expert layout is not the tensor-parallel one."""
    ep = getattr(groups, "ep", None)
    expt_tp = getattr(groups, "expt_tp", None)
    ep_size = ep.size if ep is not None else 1
    etp_size = expt_tp.size if expt_tp is not None else groups.tp.size
    if ep_size == 1 and etp_size == groups.tp.size:
        return
    for module, name, param in _named_chunk_params(model_chunks):
        if is_expert_parallel(param) and _LOCAL_EXPERT_NAME.match(name) is None:
            raise ValueError(f"--ckpt-format torch_dist stores expert weights per expert; {name} holds several "
                             f"experts (--moe-grouped-gemm) and cannot be saved at --expert-model-parallel-size "
                             f"{ep_size} / --expert-tensor-parallel-size {etp_size}. Drop --moe-grouped-gemm "
                             "or use --ckpt-format torch.")


def _is_writer(param: torch.Tensor, groups, data_sharded: bool = False) -> bool:
    """Whether this rank writes its copy of `param` (or of its optimizer state): rank 0 of the
    data-parallel replicas (data/context-parallel group; expert-data-parallel group for an expert
    weight), unless `data_sharded` (the distributed optimizer: each rank holds its own range), and
    tensor-parallel rank 0 (expert tensor-parallel for an expert weight) of a replicated tensor."""
    expert = is_expert_parallel(param) and getattr(groups, "expt_dp", None) is not None
    data_group = groups.expt_dp if expert else groups.dp_cp
    model_group = groups.expt_tp if expert else groups.tp
    return (data_sharded or data_group.rank == 0) and (is_tensor_parallel(param) or model_group.rank == 0)


def _named_chunk_params(model_chunks) -> Iterable[tuple[torch.nn.Module, str, torch.nn.Parameter]]:
    seen = set()
    for chunk in model_chunks:
        module = _unwrap(chunk)
        for name, param in module.named_parameters():
            if param in seen:
                continue
            seen.add(param)
            yield module, name, param


def sharded_model_state(model_chunks: Sequence[torch.nn.Module], groups) -> list[ShardPiece]:
    """This rank's chunks of every model parameter, keyed by global name, with global shapes and
    offsets. `write` is set on one replica of each chunk only."""
    _check_groups(groups, model_chunks)
    pieces = []
    for module, name, param in _named_chunk_params(model_chunks):
        key, written = _storage_key(module, name, param)
        replica0 = _is_writer(param, groups)
        vocab = key in _VOCAB_PARAMS
        zeros = (0,) * param.dim()
        for data, offsets in _local_box_to_global(param.detach(), zeros, param):
            pieces.append(ShardPiece(key, data, _global_shape(param), offsets, written and replica0, vocab))
    return pieces


def _optimizer_kind(optimizer) -> str:
    return "adam" if isinstance(optimizer.optimizer, torch.optim.AdamW) else "sgd"


def _optimizer_is_sharded(optimizer) -> bool:
    return bool(getattr(optimizer.config, "use_distributed_optimizer", False))


def _param_keys(model_chunks) -> dict:
    """param -> (storage key, written, vocab)."""
    out = {}
    for module, name, param in _named_chunk_params(model_chunks):
        key, written = _storage_key(module, name, param)
        out[param] = (key, written, key in _VOCAB_PARAMS)
    return out


def _optimizer_step(optimizer) -> tuple[int, bool]:
    """(Adam step count, whether optimizer state exists), agreed over all ranks."""
    step, initialized = 0, 0
    for st in optimizer.optimizer.state.values():
        initialized = max(initialized, int(bool(st)))
        if "step" in st:
            step = max(step, int(float(st["step"])))
    agreed = torch.tensor([float(step), float(initialized)], dtype=torch.float64, device=_collective_device())
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return int(agreed[0].item()), bool(agreed[1].item())


def sharded_optimizer_state(optimizer, model_chunks: Sequence[torch.nn.Module], groups
                            ) -> tuple[list[ShardPiece], dict]:
    """(pieces of the fp32 main params and per-element optimizer states, non-sharded optimizer
    state: kind, step, param group hyper-parameters, grad scaler). Collective (agrees the step)."""
    _check_groups(groups, model_chunks)
    kind = _optimizer_kind(optimizer)
    step, initialized = _optimizer_step(optimizer)
    keys = _param_keys(model_chunks)
    sharded = _optimizer_is_sharded(optimizer)
    pieces = []
    for entry in optimizer.entries:
        key, written, vocab = keys[entry.model_param]
        replica0 = _is_writer(entry.model_param, groups, data_sharded=sharded)
        # an fp32 parameter is its own main param: the model entry above already stores it
        tensors = {"fp32_param": entry.main_param} if optimizer.stores_main_copy(entry.model_param) else {}
        state = optimizer.optimizer.state.get(entry.main_param, {})
        if initialized:
            for name in _STATE_KEYS[kind]:
                if name not in state:
                    raise CheckpointError(f"optimizer state {name} of {entry.name} is missing on rank "
                                          f"{_rank()} while other parameters have state")
                tensors[name] = state[name]
        for name, tensor in tensors.items():
            pieces += _pieces_of_flat_range(f"{OPTIMIZER_PREFIX}{name}.{key}", tensor.detach().reshape(-1),
                                            entry.model_param, entry.start, written and replica0, vocab)
    common = {
        "kind": kind,
        "step": step,
        "initialized": initialized,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.optimizer.param_groups],
        "grad_scaler": optimizer.grad_scaler.state_dict() if optimizer.grad_scaler is not None else None,
    }
    return pieces, common


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _collective_device() -> torch.device:
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Comm:
    """The ranks that take part in a save or load: the default process group, or (`local`) this
    process alone (offline conversion)."""

    def __init__(self, local: bool = False) -> None:
        self.distributed = not local and dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.size = dist.get_world_size() if self.distributed else 1

    def all_gather_object(self, obj) -> list:
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def all_reduce_min(self, value: float) -> float:
        if self.size == 1:
            return value
        flag = torch.tensor([float(value)], device=_collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return float(flag.item())

    def barrier(self) -> None:
        self.all_reduce_min(0.0)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _file_crc32(path: str) -> tuple[int, int]:
    """(size in bytes, CRC-32) of a file."""
    crc, size = 0, 0
    with open(path, "rb") as handle:
        while True:
            block = handle.read(_CRC_BLOCK)
            if not block:
                break
            crc = zlib.crc32(block, crc)
            size += len(block)
    return size, crc & 0xFFFFFFFF


def _parallel_layout(groups) -> dict:
    layout = {"world_size": _world_size(), "tp": groups.tp.size, "pp": groups.pp.size, "dp": groups.dp.size,
              "cp": groups.cp.size, "vp": groups.vp_size}
    ep = getattr(groups, "ep", None)
    expt_tp = getattr(groups, "expt_tp", None)
    if ep is not None and expt_tp is not None and (ep.size > 1 or expt_tp.size != groups.tp.size):
        layout.update(ep=ep.size, etp=expt_tp.size)
    return layout


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------


class _SnapshotPlanner(DefaultSavePlanner):
    """Hands the storage writer the CPU snapshot of each planned chunk."""

    def __init__(self, snapshot: dict) -> None:
        super().__init__()
        self._snapshot = snapshot

    def lookup_object(self, index: MetadataIndex) -> Any:
        return self._snapshot[(index.fqn, tuple(index.offset))]


def _write_item(piece: ShardPiece) -> WriteItem:
    offsets = torch.Size(piece.global_offsets)
    return WriteItem(
        index=MetadataIndex(piece.key, offsets),
        type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(piece.sizes)),
            properties=TensorProperties(dtype=piece.tensor.dtype),
            size=torch.Size(piece.global_shape),
        ),
    )


def _validate_coverage(metadata: Metadata) -> None:
    """Every stored tensor is covered exactly once by its chunks (no gap, no overlap)."""
    problems = []
    for key, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            continue
        size = tuple(md.size)
        volume = 0
        for chunk in md.chunks:
            if any(o < 0 or o + s > n for o, s, n in zip(chunk.offsets, chunk.sizes, size)):
                problems.append(f"{key}: chunk at {tuple(chunk.offsets)} of size {tuple(chunk.sizes)} "
                                f"lies outside {size}")
            volume += math.prod(chunk.sizes)
        ordered = sorted(md.chunks, key=lambda c: tuple(c.offsets))
        for i, a in enumerate(ordered):
            for b in ordered[i + 1:]:
                if len(size) and b.offsets[0] >= a.offsets[0] + a.sizes[0]:
                    break
                if all(bo < ao + asz and ao < bo + bsz
                       for ao, asz, bo, bsz in zip(a.offsets, a.sizes, b.offsets, b.sizes)):
                    problems.append(f"{key}: chunks at {tuple(a.offsets)} and {tuple(b.offsets)} overlap")
        if volume != math.prod(size):
            problems.append(f"{key}: chunks cover {volume} of {math.prod(size)} elements")
    if problems:
        raise CheckpointError("torch_dist save: the ranks' shards do not tile the global tensors (a layout "
                              "or tagging bug): " + "; ".join(problems[:8]))


@dataclass
class _PendingSave:
    path: str
    writer: FileSystemWriter
    metadata: Metadata
    future: Future
    layout: dict
    comm: _Comm
    callbacks: list = field(default_factory=list)


def _snapshot(pieces: list[ShardPiece], pinned_cache: Optional[dict]) -> dict:
    """CPU copies of the chunks this rank writes. GPU tensors go to pinned buffers kept in
    `pinned_cache` for the next save (with `pinned_cache` None: plain CPU copies)."""
    snapshot = {}
    needs_sync = False
    for piece in pieces:
        src = piece.tensor
        index = (piece.key, tuple(piece.global_offsets))
        if src.device.type == "cpu":
            snapshot[index] = src.clone(memory_format=torch.contiguous_format)
            continue
        if pinned_cache is None:
            snapshot[index] = src.to("cpu", copy=True)
            continue
        buf = pinned_cache.get(index)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=True)
            pinned_cache[index] = buf
        buf.copy_(src, non_blocking=True)
        snapshot[index] = buf
        needs_sync = True
    if needs_sync:
        torch.cuda.current_stream().synchronize()
    return snapshot


def _write_job(path: str, writer: FileSystemWriter, plan: SavePlan, planner: _SnapshotPlanner,
               common: Optional[dict], rank: int) -> dict:
    """Runs in the background: write this rank's data file(s) (and common.pt on rank 0), then
    checksum them. Returns {"results": [...], "files": {name: {"size", "crc32"}}} or {"error": ...}."""
    try:
        results = writer.write_data(plan, planner).value()
        names = sorted({r.storage_data.relative_path for r in results})
        if common is not None:
            atomic_torch_save(common, os.path.join(path, COMMON_FILENAME))
            names.append(COMMON_FILENAME)
        # One thread per file: zlib.crc32 releases the GIL, so the files are checksummed in parallel.
        with ThreadPoolExecutor(max_workers=max(1, min(len(names), 16)), thread_name_prefix="crc32") as pool:
            sums = list(pool.map(lambda name: _file_crc32(os.path.join(path, name)), names))
        files = {name: {"size": size, "crc32": crc} for name, (size, crc) in zip(names, sums)}
        return {"results": results, "files": files}
    except BaseException as exc:  # reported to every rank at finalize
        return {"error": f"rank {rank}: {type(exc).__name__}: {exc}"}


class AsyncCheckpointSaver:
    """Writes torch_dist checkpoints in the background.

    `schedule(...)` (via `save_torch_dist(..., async_saver=saver)`) plans the save and copies the
    tensors to CPU memory synchronously, then returns while a background thread writes the files.
    Call `maybe_finalize()` every iteration on every rank: once every rank's write has finished
    (agreed by an all-reduce) rank 0 writes `.metadata` and `metadata.json`, and each rank runs
    the save's finalize callbacks (the training layer updates the tracker there).
    `finalize_all()` waits for and finalizes everything (call it before exit). At most one save
    is in flight: scheduling a new one finalizes the previous one first (blocking).
    The pinned CPU buffers of GPU tensors are kept for the next save.
    """

    def __init__(self, num_io_threads: int = 2, pin_memory: bool = True) -> None:
        self.num_io_threads = int(num_io_threads)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-dist-save")
        self._pending: Optional[_PendingSave] = None
        self._pinned: Optional[dict] = {} if pin_memory else None

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def schedule(self, path: str, pieces: list[ShardPiece], common: Optional[dict], layout: dict,
                 finalize_fn: Optional[Callable[[], None]] = None) -> None:
        """Plan (collective), snapshot (synchronous) and start writing `pieces` to `path`.
        `common` (rank 0's non-sharded state) is written by rank 0."""
        if self._pending is not None:
            self.finalize_all()
        self._pending = self._start(path, pieces, common, layout, self._executor.submit, _Comm())
        if finalize_fn is not None:
            self._pending.callbacks.append(finalize_fn)

    def _start(self, path, pieces, common, layout, submit, comm: _Comm) -> _PendingSave:
        rank = comm.rank
        path = os.path.abspath(path)
        if rank == 0:
            os.makedirs(path, exist_ok=True)
            _remove_stale_files(path, comm.size)
        writer = FileSystemWriter(path, single_file_per_rank=True, sync_files=True,
                                  thread_count=self.num_io_threads, per_thread_copy_ahead=0, overwrite=True)
        writer.set_up_storage_writer(rank == 0, rank=rank, use_collectives=True)
        to_write = [p for p in pieces if p.write]
        seen = set()
        for piece in to_write:
            index = (piece.key, tuple(piece.global_offsets))
            if index in seen:
                raise CheckpointError(f"torch_dist save: rank {rank} writes {piece.key} at "
                                      f"{piece.global_offsets} twice")
            seen.add(index)
        # All ranks see all plans (the gather is also the barrier after rank 0 cleared stale
        # files) and compute the same global plan, metadata and file prefixes.
        all_plans = comm.all_gather_object(SavePlan([_write_item(p) for p in to_write]))
        os.makedirs(path, exist_ok=True)
        global_plans, metadata = create_default_global_save_plan(all_plans)
        _validate_coverage(metadata)
        global_plans = writer.prepare_global_plan(global_plans)
        plan = global_plans[rank]
        planner = _SnapshotPlanner(_snapshot(to_write, self._pinned))
        future = submit(_write_job, path, writer, plan, planner, common, rank)
        return _PendingSave(path, writer, metadata, future, layout, comm)

    def maybe_finalize(self, blocking: bool = False) -> bool:
        """Finalize the save in flight if every rank has finished writing it (wait for it if
        `blocking`). Collective when a save is in flight. Returns True if a save was finalized."""
        pending = self._pending
        if pending is None:
            return False
        if blocking:
            pending.future.result()
        if pending.comm.all_reduce_min(1.0 if pending.future.done() else 0.0) < 1.0:
            return False
        self._pending = None
        _finalize(pending)
        return True

    def finalize_all(self) -> None:
        """Wait for the save in flight (if any) and finalize it."""
        self.maybe_finalize(blocking=True)

    def close(self) -> None:
        self.finalize_all()
        self._executor.shutdown(wait=True)


def _remove_stale_files(path: str, world_size: int) -> None:
    """Before a save into an existing directory: drop the completeness marker first, then the
    index and data files of ranks beyond this world (the others are overwritten)."""
    for name in (METADATA_FILENAME, DCP_METADATA_FILENAME):
        target = os.path.join(path, name)
        if os.path.exists(target):
            os.unlink(target)
    for name in os.listdir(path):
        match = re.match(r"^__(\d+)_\d+\.distcp$", name)
        if match and int(match.group(1)) >= world_size:
            os.unlink(os.path.join(path, name))


def _finalize(pending: _PendingSave) -> None:
    """All ranks: gather write results; rank 0 writes .metadata then metadata.json; callbacks."""
    outcome = pending.future.result()
    comm = pending.comm
    gathered = comm.all_gather_object(outcome)
    errors = [g["error"] for g in gathered if "error" in g]
    if errors:
        raise CheckpointError(f"torch_dist save to {pending.path} failed; the directory has no "
                              f"{METADATA_FILENAME} and will not load: " + " | ".join(errors))
    if comm.rank == 0:
        pending.writer.finish(pending.metadata, [g["results"] for g in gathered])
        files = {}
        for g in gathered:
            files.update(g["files"])
        size, crc = _file_crc32(os.path.join(pending.path, DCP_METADATA_FILENAME))
        files[DCP_METADATA_FILENAME] = {"size": size, "crc32": crc}
        record = {
            "sharded_backend": FORMAT_NAME,
            "sharded_backend_version": FORMAT_VERSION,
            "common_backend": "torch",
            "common_backend_version": 1,
            "checksum": "crc32",
            "parallel_layout": pending.layout,
            "files": dict(sorted(files.items())),
        }
        atomic_write_text(os.path.join(pending.path, METADATA_FILENAME), json.dumps(record, indent=1) + "\n")
    comm.barrier()
    for callback in pending.callbacks:
        callback()


def _common_state(extra_state: dict, optimizer_common: Optional[dict], rng_states: Optional[list],
                  layout: dict, model_keys: list) -> dict:
    return to_plain(_to_cpu({
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "extra_state": extra_state,
        "optimizer": optimizer_common,
        "rng_states": rng_states,
        "parallel_layout": layout,
        "model_keys": model_keys,
    }))


def save_torch_dist(path: str, model_chunks: Sequence[torch.nn.Module], optimizer, extra_state: dict, groups,
                    async_saver: Optional[AsyncCheckpointSaver] = None, *, rng_state: Optional[dict] = None,
                    finalize_fn: Optional[Callable[[], None]] = None, num_io_threads: int = 2) -> None:
    """Save model (and optimizer, unless None) to the directory `path` in the torch_dist format.

    Collective: every rank calls it. `extra_state` (iteration, args dict, scheduler state,
    consumed samples, …: plain data) is saved by rank 0 in common.pt; `rng_state` (this rank's)
    is gathered from every rank. Without `async_saver` the save is complete (metadata.json
    written, `finalize_fn` called) when this returns; with it, the files are written in the
    background and `async_saver.maybe_finalize()` completes the save later.
    """
    _check_groups(groups, model_chunks)
    layout = _parallel_layout(groups)
    pieces = sharded_model_state(model_chunks, groups)
    model_keys = sorted({p.key for p in pieces})
    optimizer_common = None
    if optimizer is not None:
        opt_pieces, optimizer_common = sharded_optimizer_state(optimizer, model_chunks, groups)
        pieces += opt_pieces
    rng_states = _Comm().all_gather_object(_to_cpu(rng_state)) if rng_state is not None else None
    common = _common_state(extra_state, optimizer_common, rng_states, layout, model_keys) if _rank() == 0 else None
    if async_saver is not None:
        async_saver.schedule(path, pieces, common, layout, finalize_fn)
        return
    _save_now(path, pieces, common, layout, _Comm(), finalize_fn, num_io_threads)


def _save_now(path: str, pieces: list[ShardPiece], common: Optional[dict], layout: dict, comm: _Comm,
              finalize_fn: Optional[Callable[[], None]] = None, num_io_threads: int = 2) -> None:
    """Plan, write and finalize in the calling thread."""
    saver = AsyncCheckpointSaver(num_io_threads, pin_memory=False)
    try:
        saver._pending = saver._start(path, pieces, common, layout, _run_now, comm)
        if finalize_fn is not None:
            saver._pending.callbacks.append(finalize_fn)
        saver.finalize_all()
    finally:
        saver._executor.shutdown(wait=True)


def _run_now(fn, *args) -> Future:
    future: Future = Future()
    future.set_result(fn(*args))
    return future


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------


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
        raise IncompleteCheckpointError(
            f"{path} is an incomplete torch_dist checkpoint: it has no {METADATA_FILENAME}, so the save was "
            f"interrupted before it finished (files present: {present[:10]}). Load an earlier iteration "
            "(--ckpt-step) or point the tracker file at a complete checkpoint.")
    try:
        with open(record_path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"{record_path} is unreadable: {exc}") from exc
    if record.get("sharded_backend") != FORMAT_NAME:
        raise CheckpointError(f"{path} holds sharded backend {record.get('sharded_backend')!r}, not "
                              f"{FORMAT_NAME!r}; Gigatron reads torch_dist checkpoints only")
    if int(record.get("sharded_backend_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path} is torch_dist version {record['sharded_backend_version']}; this "
                              f"Gigatron reads up to version {FORMAT_VERSION}")
    return record


def _verify_files(path: str, record: dict, names: Optional[Iterable[str]], checksums: bool) -> None:
    """Check the size (and CRC-32) of `names` (default: every recorded file) against metadata.json."""
    files = record.get("files", {})
    names = sorted(files) if names is None else sorted(set(names))
    problems = []

    def check(name: str) -> Optional[str]:
        expected = files.get(name)
        full = os.path.join(path, name)
        if expected is None:
            return f"{name} is not listed in {METADATA_FILENAME}"
        if not os.path.isfile(full):
            return f"{name} is missing"
        size = os.path.getsize(full)
        if size != expected["size"]:
            return f"{name} has {size} bytes, {expected['size']} were written (truncated or overwritten)"
        if checksums:
            _, crc = _file_crc32(full)
            if crc != expected["crc32"]:
                return f"{name} has CRC-32 {crc:08x}, {expected['crc32']:08x} was written (corrupt data)"
        return None

    with ThreadPoolExecutor(max_workers=min(8, max(1, len(names)))) as pool:
        problems = [p for p in pool.map(check, names) if p]
    if problems:
        raise CorruptCheckpointError(f"torch_dist checkpoint {path} is damaged: " + "; ".join(problems)
                                     + ". Load an earlier checkpoint (--ckpt-step) or restore the file.")


def verify_torch_dist_checkpoint(path: str, checksums: bool = True) -> dict:
    """Check that `path` is complete and every file matches its recorded size and CRC-32; return
    metadata.json. Raises IncompleteCheckpointError / CorruptCheckpointError."""
    record = read_checkpoint_metadata(path)
    _verify_files(path, record, None, checksums)
    return record


class _ViewLoadPlanner(DefaultLoadPlanner):
    """Resolves each read into a view of the destination chunk it belongs to."""

    def __init__(self, destinations: dict) -> None:
        super().__init__()
        self._destinations = destinations

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self._destinations[(index.fqn, tuple(index.offset))]


def _plan_reads(pieces: list[ShardPiece], metadata: Metadata) -> tuple[list, dict, list[str]]:
    """Read items for `pieces` (resharding over the stored chunks), destination map and problems."""
    by_key: dict[str, list[ShardPiece]] = {}
    for piece in pieces:
        by_key.setdefault(piece.key, []).append(piece)
    items, destinations, problems = [], {}, []
    for key, group in by_key.items():
        md = metadata.state_dict_metadata.get(key)
        if md is None:
            problems.append(f"missing from checkpoint: {key}")
            continue
        saved = tuple(md.size)
        chunks = []
        for piece in group:
            ours = tuple(piece.global_shape)
            data, sizes = piece.tensor, list(piece.sizes)
            if saved != ours:
                if not (piece.vocab and len(saved) == len(ours) and saved[1:] == ours[1:]):
                    problems.append(f"{key}: checkpoint shape {saved} vs model {ours}")
                    continue
                # vocabulary padded differently: load the common rows, zero the padding rows
                data.zero_()
                rows = min(sizes[0], saved[0] - piece.global_offsets[0])
                if rows <= 0:
                    continue
                data, sizes[0] = data.narrow(0, 0, rows), rows
            offsets = torch.Size(piece.global_offsets)
            if (key, tuple(offsets)) in destinations:
                problems.append(f"{key}: the chunk at {tuple(offsets)} is requested twice on this rank")
                continue
            destinations[(key, tuple(offsets))] = data
            chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(sizes)))
        items += create_read_items_for_chunk_list(key, md, chunks)
    return items, destinations, problems


def _raise_everywhere(problems: list[str], what: str, error: type = CheckpointError) -> None:
    """Agree on problems over all ranks, so that every rank raises (no rank left in a collective)."""
    gathered = _Comm().all_gather_object(problems)
    merged = []
    for rank, rank_problems in enumerate(gathered):
        merged += [f"rank {rank}: {p}" for p in rank_problems]
    if merged:
        raise error(f"{what}: " + "; ".join(merged[:10]) + (" …" if len(merged) > 10 else ""))


def _optimizer_load_pieces(optimizer, model_chunks, kind: str, initialized: bool, saved_keys
                           ) -> tuple[list[ShardPiece], list[tuple]]:
    """Destination pieces for the optimizer state and (main param, {state name: new tensor}).
    A main param is read where this run keeps a copy and the checkpoint stored one; otherwise it
    is the loaded model weight (_install_optimizer_state)."""
    keys = _param_keys(model_chunks)
    pieces, states = [], []
    for entry in optimizer.entries:
        key, _, vocab = keys[entry.model_param]
        targets = {}
        if optimizer.stores_main_copy(entry.model_param) and f"{OPTIMIZER_PREFIX}fp32_param.{key}" in saved_keys:
            targets["fp32_param"] = entry.main_param
        new_state = {"main_param_read": "fp32_param" in targets}
        if initialized:
            for name in _STATE_KEYS[kind]:
                new_state[name] = torch.zeros_like(entry.main_param, dtype=torch.float32)
                targets[name] = new_state[name]
        for name, tensor in targets.items():
            pieces += _pieces_of_flat_range(f"{OPTIMIZER_PREFIX}{name}.{key}", tensor.detach().reshape(-1),
                                            entry.model_param, entry.start, False, vocab)
        states.append((entry, new_state))
    return pieces, states


@torch.no_grad()
def _install_optimizer_state(optimizer, states: list, common: dict) -> None:
    optimizer._load_param_group_hparams(common["param_groups"])
    for entry, new_state in states:
        if not new_state.pop("main_param_read"):
            optimizer._main_param_from_model(entry)
        optimizer.optimizer.state.pop(entry.main_param, None)
        if not new_state:
            continue
        group = optimizer.optimizer.param_groups[entry.group_index]
        st: dict = {}
        if common["kind"] == "adam":
            on_device = group.get("fused") or group.get("capturable")
            st["step"] = torch.tensor(float(common["step"]), dtype=torch.float32,
                                      device=entry.main_param.device if on_device else "cpu")
        st.update(new_state)
        optimizer.optimizer.state[entry.main_param] = st
    if optimizer.grad_scaler is not None and common.get("grad_scaler"):
        optimizer.grad_scaler.load_state_dict(common["grad_scaler"])
    optimizer._copy_main_params_to_model_params()
    optimizer._after_load()


def load_torch_dist(path: str, model_chunks: Sequence[torch.nn.Module], optimizer, groups, strict: bool = True,
                    *, verify_checksums: bool = True) -> dict:
    """Load a torch_dist checkpoint into `model_chunks` (and `optimizer` unless None) at this run's
    tensor / pipeline / data parallel layout. Collective. Returns the saved extra state plus
    `rng_state` (this rank's, or None when the parallel layout differs from the saved one) and
    `parallel_layout` (the saved layout).

    `strict`: every checkpoint model tensor must be used by some rank and every model parameter
    must be in the checkpoint. `verify_checksums`: check the CRC-32 of every file this rank reads
    (sizes are always checked)."""
    _check_groups(groups, model_chunks)
    path = os.path.abspath(path)
    record = read_checkpoint_metadata(path)
    _verify_files(path, record, [DCP_METADATA_FILENAME, COMMON_FILENAME], verify_checksums)
    reader = FileSystemReader(path)
    metadata = reader.read_metadata()
    common = safe_torch_load(os.path.join(path, COMMON_FILENAME))

    pieces = sharded_model_state(model_chunks, groups)
    needed_model_keys = sorted({p.key for p in pieces})
    states = []
    problems = []
    if optimizer is not None:
        opt_common = common.get("optimizer")
        if opt_common is None:
            problems.append("the checkpoint holds no optimizer state (saved without an optimizer); "
                            "load it with --no-load-optim or --finetune")
        elif opt_common["kind"] != _optimizer_kind(optimizer):
            problems.append(f"the checkpoint holds {opt_common['kind']} optimizer state but --optimizer is "
                            f"{_optimizer_kind(optimizer)}; use the same optimizer or --no-load-optim")
        elif len(opt_common["param_groups"]) != len(optimizer.optimizer.param_groups):
            problems.append(f"the checkpoint has {len(opt_common['param_groups'])} optimizer param groups, "
                            f"this model has {len(optimizer.optimizer.param_groups)}")
        else:
            opt_pieces, states = _optimizer_load_pieces(optimizer, model_chunks, opt_common["kind"],
                                                        opt_common["initialized"], metadata.state_dict_metadata)
            pieces += opt_pieces
    items, destinations, plan_problems = _plan_reads(pieces, metadata)
    problems += plan_problems if strict else [p for p in plan_problems if not p.startswith("missing")]
    if strict:
        used = set().union(*[set(keys) for keys in _Comm().all_gather_object(needed_model_keys)])
        saved_model_keys = set(common.get("model_keys") or [])
        unexpected = sorted(saved_model_keys - used)
        if unexpected and _rank() == 0:
            problems.append(f"not in the model: {unexpected[:8]}")
    _raise_everywhere(problems, f"torch_dist checkpoint {path} does not fit this model (check the model flags, "
                                "or use --use-checkpoint-args)")

    reader.set_up_storage_reader(metadata, _rank() == 0, rank=_rank(), use_collectives=False)
    files = {reader.storage_data[item.storage_index].relative_path for item in items}
    read_problems = []
    try:
        _verify_files(path, record, files, verify_checksums)
        plan = reader.prepare_local_plan(LoadPlan(items))
        with torch.no_grad():
            reader.read_data(plan, _ViewLoadPlanner(destinations)).wait()
    except CorruptCheckpointError as exc:
        read_problems.append(str(exc))
    except Exception as exc:
        read_problems.append(f"reading files {sorted(files)} failed: {type(exc).__name__}: {exc}")
    _raise_everywhere(read_problems, f"torch_dist checkpoint {path} could not be read", CorruptCheckpointError)
    if optimizer is not None:
        _install_optimizer_state(optimizer, states, common["optimizer"])

    extra = dict(common.get("extra_state") or {})
    saved_layout = common.get("parallel_layout") or {}
    rng_states = common.get("rng_states")
    same_layout = saved_layout == _parallel_layout(groups)
    extra["rng_state"] = rng_states[_rank()] if rng_states is not None and same_layout else None
    extra["parallel_layout"] = saved_layout
    return extra


def read_full_model_tensors(path: str, verify_checksums: bool = True) -> tuple[dict, dict]:
    """(full model tensors by global name, common state) of a torch_dist checkpoint, read in one
    process (for conversion and inspection; optimizer state is left out)."""
    record = read_checkpoint_metadata(path)
    reader = FileSystemReader(os.path.abspath(path))
    metadata = reader.read_metadata()
    common = safe_torch_load(os.path.join(path, COMMON_FILENAME))
    tensors, pieces = {}, []
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith(OPTIMIZER_PREFIX) or not isinstance(md, TensorStorageMetadata):
            continue
        tensors[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        pieces.append(ShardPiece(key, tensors[key], tuple(md.size), (0,) * len(md.size), False))
    items, destinations, problems = _plan_reads(pieces, metadata)
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    reader.set_up_storage_reader(metadata, True, rank=0, use_collectives=False)
    _verify_files(path, record, {reader.storage_data[i.storage_index].relative_path for i in items}
                  | {DCP_METADATA_FILENAME, COMMON_FILENAME}, verify_checksums)
    reader.read_data(LoadPlan(items), _ViewLoadPlanner(destinations)).wait()
    return tensors, common
