"""Loading a model read as full tensors from another framework's layout (Megatron-LM's own
`torch` files, its pre-Megatron-Core "legacy" names) into a model at ANY parallel layout.

The foreign format module reads every file into full logical tensors under our global names
(state.py's ModelState); `load_full_tensors` then copies into each parameter of this rank exactly
the chunk it holds, as torch_dist's sharding describes it (dist/sharding.py: tensor-parallel
shards, SwiGLU stride blocks, pipeline layer offsets, expert-parallel expert numbers), so the
reader's tensor/pipeline/expert layout need not match the writer's. A vocabulary padded to
another multiple loads its common rows; the padding rows are zero. Megatron's RNG state is
mapped onto ours by `rng_state_from_megatron`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from gigatron.core.checkpoint.dist.common import Comm
from gigatron.core.checkpoint.dist.sharding import sharded_model_state
from gigatron.core.checkpoint.io import CheckpointError

__all__ = ["load_full_tensors", "rng_state_from_megatron"]


def _raise_everywhere(problems: list[str], what: str) -> None:
    gathered = Comm().all_gather_object(problems)
    merged = [f"rank {rank}: {p}" if len(gathered) > 1 else p for rank, ps in enumerate(gathered) for p in ps]
    if merged:
        raise CheckpointError(f"{what}: " + "; ".join(merged[:10]) + (" …" if len(merged) > 10 else ""))


@torch.no_grad()
def load_full_tensors(model_chunks: Sequence[torch.nn.Module], groups, tensors: dict, path: str,
                      strict: bool = True, ignore_unused: Sequence[str] = ()) -> None:
    """Copy this rank's chunks of the full `tensors` (global names) into the model chunks.
    Collective (the problems of every rank are agreed on, so all ranks raise together).
    `strict`: every parameter must be found, and every tensor used by some rank (except the
    names in `ignore_unused`)."""
    pieces = sharded_model_state(model_chunks, groups)
    problems, used = [], set()
    for piece in pieces:
        source = tensors.get(piece.key)
        if source is None:
            if strict:
                problems.append(f"missing from checkpoint: {piece.key}")
            continue
        used.add(piece.key)
        saved, ours = tuple(source.shape), tuple(piece.global_shape)
        target = piece.tensor
        if saved != ours:
            if not (piece.vocab and len(saved) == len(ours) and saved[1:] == ours[1:]):
                problems.append(f"{piece.key}: checkpoint shape {saved} vs model {ours}")
                continue
            target.zero_()  # vocabulary padded differently: the common rows, zero padding rows
            rows = min(target.shape[0], saved[0] - piece.global_offsets[0])
            if rows <= 0:
                continue
            target = target.narrow(0, 0, rows)
        index = tuple(slice(o, o + n) for o, n in zip(piece.global_offsets, target.shape))
        target.copy_(source[index].to(target.dtype))
    if strict:
        everywhere = set().union(*[set(keys) for keys in Comm().all_gather_object(sorted(used))])
        unused = sorted(set(tensors) - everywhere - set(ignore_unused))
        if unused and groups.rank == 0:
            problems.append(f"not in the model: {unused[:8]}")
    _raise_everywhere(problems, f"{path} does not fit this model (check the model flags, or use "
                                "--use-checkpoint-args)")


def rng_state_from_megatron(state: Optional[dict]) -> Optional[dict]:
    """One data-parallel rank's RNG state as Megatron-LM stores it, in our form (numpy's key array
    as a tensor). Megatron's model-parallel tracker holds CUDA generator states only; they are
    restored where CUDA is available and a state of the right size is given, else left out."""
    if state is None:
        return None
    name, keys, pos, has_gauss, cached = state["np_rng_state"]
    keys = torch.from_numpy(np.asarray(keys).astype(np.int64))
    version, internal, gauss = state["random_rng_state"]
    return {
        "random_rng_state": (version, tuple(internal), gauss),
        "np_rng_state": (name, keys, int(pos), int(has_gauss), float(cached)),
        "torch_rng_state": state["torch_rng_state"],
        "cuda_rng_state": state.get("cuda_rng_state"),
        "rng_tracker_states": None,
    }
