"""torch_dist load: plan reads for this rank's chunks (resharding over the stored chunks), check
every file this rank reads against metadata.json first, then read into the parameters and
optimizer state in place; `read_full_model_tensors` reads whole tensors in one process."""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from gigatron.core.checkpoint.dist.common import (
    COMMON_FILENAME,
    DCP_METADATA_FILENAME,
    OPTIMIZER_PREFIX,
    Comm,
    CorruptCheckpointError,
    parallel_layout,
    process_rank,
)
from gigatron.core.checkpoint.dist.metadata import (
    read_checkpoint_metadata,
    read_common_state,
    read_dcp_metadata,
    verify_files,
)
from gigatron.core.checkpoint.dist.sharding import (
    ShardPiece,
    check_groups,
    optimizer_kind,
    optimizer_load_pieces,
    sharded_model_state,
)
from gigatron.core.checkpoint.io import CheckpointError

__all__ = ["load_torch_dist", "read_full_model_tensors", "plan_reads", "ViewLoadPlanner"]


class ViewLoadPlanner(DefaultLoadPlanner):
    """Resolves each read into a view of the destination chunk it belongs to."""

    def __init__(self, destinations: dict) -> None:
        super().__init__()
        self._destinations = destinations

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self._destinations[(index.fqn, tuple(index.offset))]


def plan_reads(pieces: list[ShardPiece], metadata: Metadata) -> tuple[list, dict, list[str]]:
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
        if not isinstance(md, TensorStorageMetadata):
            problems.append(f"{key} is stored as {type(md).__name__}, not as a tensor")
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
    gathered = Comm().all_gather_object(problems)
    merged = []
    for rank, rank_problems in enumerate(gathered):
        merged += [f"rank {rank}: {p}" for p in rank_problems]
    if merged:
        raise error(f"{what}: " + "; ".join(merged[:10]) + (" …" if len(merged) > 10 else ""))


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
    check_groups(groups, model_chunks)
    path = os.path.abspath(path)
    record = read_checkpoint_metadata(path)
    verify_files(path, record, [DCP_METADATA_FILENAME, COMMON_FILENAME], verify_checksums)
    reader = FileSystemReader(path)
    metadata = read_dcp_metadata(path)
    common = read_common_state(path, record, verify_checksums=False)  # verified just above

    pieces = sharded_model_state(model_chunks, groups)
    needed_model_keys = sorted({p.key for p in pieces})
    states = []
    problems = []
    if optimizer is not None:
        opt_common = common.get("optimizer")
        if opt_common is None:
            problems.append("the checkpoint holds no optimizer state (saved without an optimizer); "
                            "load it with --no-load-optim or --finetune")
        elif opt_common["kind"] != optimizer_kind(optimizer):
            problems.append(f"the checkpoint holds {opt_common['kind']} optimizer state but --optimizer is "
                            f"{optimizer_kind(optimizer)}; use the same optimizer or --no-load-optim")
        elif len(opt_common["param_groups"]) != len(optimizer.optimizer.param_groups):
            problems.append(f"the checkpoint has {len(opt_common['param_groups'])} optimizer param groups, "
                            f"this model has {len(optimizer.optimizer.param_groups)}")
        else:
            opt_pieces, states = optimizer_load_pieces(optimizer, model_chunks, opt_common["kind"],
                                                       opt_common["initialized"], metadata.state_dict_metadata)
            pieces += opt_pieces
    items, destinations, plan_problems = plan_reads(pieces, metadata)
    problems += plan_problems if strict else [p for p in plan_problems if not p.startswith("missing")]
    if strict:
        used = set().union(*[set(keys) for keys in Comm().all_gather_object(needed_model_keys)])
        saved_model_keys = set(common.get("model_keys") or [])
        unexpected = sorted(saved_model_keys - used)
        if unexpected and process_rank() == 0:
            problems.append(f"not in the model: {unexpected[:8]}")
    _raise_everywhere(problems, f"torch_dist checkpoint {path} does not fit this model (check the model flags, "
                                "or use --use-checkpoint-args)")

    reader.set_up_storage_reader(metadata, process_rank() == 0, rank=process_rank(), use_collectives=False)
    files = {reader.storage_data[item.storage_index].relative_path for item in items}
    read_problems = []
    try:
        verify_files(path, record, files, verify_checksums)
        plan = reader.prepare_local_plan(LoadPlan(items))
        with torch.no_grad():
            reader.read_data(plan, ViewLoadPlanner(destinations)).wait()
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
    same_layout = saved_layout == parallel_layout(groups)
    extra["rng_state"] = rng_states[process_rank()] if rng_states is not None and same_layout else None
    extra["parallel_layout"] = saved_layout
    return extra


def read_full_model_tensors(path: str, verify_checksums: bool = True) -> tuple[dict, dict]:
    """(full model tensors by global name, common state) of a torch_dist checkpoint, read in one
    process (for conversion and inspection; optimizer state is left out)."""
    record = read_checkpoint_metadata(path)
    verify_files(path, record, [DCP_METADATA_FILENAME, COMMON_FILENAME], verify_checksums)
    reader = FileSystemReader(os.path.abspath(path))
    metadata = read_dcp_metadata(path)
    common = read_common_state(path, record, verify_checksums=False)  # verified just above
    tensors, pieces = {}, []
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith(OPTIMIZER_PREFIX) or not isinstance(md, TensorStorageMetadata):
            continue
        tensors[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        pieces.append(ShardPiece(key, tensors[key], tuple(md.size), (0,) * len(md.size), False))
    items, destinations, problems = plan_reads(pieces, metadata)
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    reader.set_up_storage_reader(metadata, True, rank=0, use_collectives=False)
    verify_files(path, record, {reader.storage_data[i.storage_index].relative_path for i in items}, verify_checksums)
    reader.read_data(LoadPlan(items), ViewLoadPlanner(destinations)).wait()
    return tensors, common
