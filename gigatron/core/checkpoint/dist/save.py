"""torch_dist save: plan collectively, snapshot to CPU, write (in the background with
`AsyncCheckpointSaver`), then rank 0 writes `.metadata` and, last, `metadata.json` with the size and
CRC-32 of every file."""

from __future__ import annotations

import json
import math
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner, create_default_global_save_plan
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from gigatron.core.checkpoint.dist.common import (
    COMMON_FILENAME,
    DCP_METADATA_FILENAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_FILENAME,
    Comm,
    parallel_layout,
    process_rank,
    to_cpu,
)
from gigatron.core.checkpoint.dist.sharding import (
    ShardPiece,
    check_groups,
    sharded_model_state,
    sharded_optimizer_state,
)
from gigatron.core.checkpoint.io import CheckpointError, atomic_torch_save, atomic_write_text, file_crc32, to_plain

__all__ = ["AsyncCheckpointSaver", "save_torch_dist", "save_pieces", "common_state"]


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
    comm: Comm
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
            sums = list(pool.map(lambda name: file_crc32(os.path.join(path, name)), names))
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
        self._pending = self._start(path, pieces, common, layout, self._executor.submit, Comm())
        if finalize_fn is not None:
            self._pending.callbacks.append(finalize_fn)

    def _start(self, path, pieces, common, layout, submit, comm: Comm) -> _PendingSave:
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
        size, crc = file_crc32(os.path.join(pending.path, DCP_METADATA_FILENAME))
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


def common_state(extra_state: dict, optimizer_common: Optional[dict], rng_states: Optional[list],
                  layout: dict, model_keys: list) -> dict:
    return to_plain(to_cpu({
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
    check_groups(groups, model_chunks)
    layout = parallel_layout(groups)
    pieces = sharded_model_state(model_chunks, groups)
    model_keys = sorted({p.key for p in pieces})
    optimizer_common = None
    if optimizer is not None:
        opt_pieces, optimizer_common = sharded_optimizer_state(optimizer, model_chunks, groups)
        pieces += opt_pieces
    rng_states = Comm().all_gather_object(to_cpu(rng_state)) if rng_state is not None else None
    common = common_state(extra_state, optimizer_common, rng_states, layout, model_keys) if process_rank() == 0 else None
    if async_saver is not None:
        async_saver.schedule(path, pieces, common, layout, finalize_fn)
        return
    save_pieces(path, pieces, common, layout, Comm(), finalize_fn, num_io_threads)


def save_pieces(path: str, pieces: list[ShardPiece], common: Optional[dict], layout: dict, comm: Comm,
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
