"""Parameter tags: the only module that sets attributes on parameters.

Tags tell the rest of the library how a parameter is laid out and treated:

- tensor-parallel layout (`tensor_model_parallel`, `partition_dim`, `partition_stride`, Megatron's
  attribute names, read by checkpoint conversion, gradient clipping and initialization), plus which
  shard this rank holds (rank and number of shards, used by layout-independent initialization),
  and for a fused tensor split segment by segment (the Mamba mixer's in_proj [z; x; B; C; dt] and
  conv1d [x; B; C]) the sizes of its segments (`partition_segments`, read by initialization and
  checkpoint sharding);
- `sequence_parallel`: replicated over tensor-parallel ranks but its gradient is a partial sum
  (sequence-parallel norms and row-parallel biases); finalize_model_grads all-reduces it over tp;
- `shared_embedding`: the word embedding tied with the output layer (grads all-reduced over the
  embedding group);
- an init spec: the function that initializes the full logical tensor and the key that seeds it
  (see gigatron/core/parallel/init.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

__all__ = [
    "InitSpec",
    "set_tensor_parallel_attributes",
    "mark_sequence_parallel",
    "mark_shared_embedding",
    "mark_expert_parallel",
    "set_init",
    "is_tensor_parallel",
    "partition_dim",
    "partition_stride",
    "partition_segments",
    "partition_shard",
    "is_sequence_parallel",
    "is_shared_embedding",
    "is_expert_parallel",
    "init_spec",
]

_INIT_SPEC_ATTR = "gigatron_init_spec"
_SHARD_ATTR = "gigatron_partition_shard"
_SEGMENTS_ATTR = "partition_segments"


@dataclass(frozen=True)
class InitSpec:
    """How to initialize a parameter: `init_fn(full_tensor)` fills the full logical tensor in place
    using torch's default generator of its device; `key` seeds that generator (None: the
    parameter's name in the module given to initialize_parameters)."""

    init_fn: Callable[[torch.Tensor], object]
    key: Optional[str]


def set_tensor_parallel_attributes(
    param: torch.Tensor,
    is_parallel: bool,
    partition_dim: int,
    stride: int = 1,
    *,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    segments: Optional[Sequence[int]] = None,
) -> None:
    """Declare a parameter's tensor-parallel layout.

    `is_parallel`: the parameter is one of `world_size` shards of a larger logical tensor, split
    along `partition_dim`; this rank holds shard `rank`. With `stride` k the logical tensor is k
    equal blocks along `partition_dim` and each shard holds its slice of every block (Megatron's
    partition stride; SwiGLU's [gate; up] fc1 weight uses stride 2). `rank` and `world_size` are
    needed by initialize_parameters for a parallel parameter (layers of this package always pass
    them).

    `segments`: the logical tensor is the concatenation of segments of these (logical, unequal)
    sizes along `partition_dim`, and each shard holds its 1/world_size slice of every segment, in
    order (the generalization of `stride` to unequal blocks; with segments the stride must be 1).
    Concatenated shards are then not the logical tensor; initialization and checkpoints go through
    the segments.
    """
    if stride < 1:
        raise ValueError(f"partition stride must be >= 1, got {stride}")
    if segments is not None:
        segments = tuple(int(n) for n in segments)
        if not is_parallel or stride != 1:
            raise ValueError("partition segments describe a tensor-parallel parameter of stride 1")
        if not segments or any(n < 1 for n in segments):
            raise ValueError(f"partition segments must be positive sizes, got {segments}")
        if world_size is not None:
            bad = [n for n in segments if n % world_size != 0]
            if bad:
                raise ValueError(f"partition segments {segments} do not split over {world_size} shards")
            if sum(segments) != param.shape[partition_dim] * world_size:
                raise ValueError(f"partition segments {segments} sum to {sum(segments)}, but the logical "
                                 f"tensor has {param.shape[partition_dim] * world_size} entries along dim "
                                 f"{partition_dim}")
    if (rank is None) != (world_size is None):
        raise ValueError("pass both rank and world_size of the shard, or neither")
    if is_parallel and rank is not None and not 0 <= rank < world_size:
        raise ValueError(f"shard rank {rank} is outside [0, {world_size})")
    param.tensor_model_parallel = bool(is_parallel)
    param.partition_dim = int(partition_dim)
    param.partition_stride = int(stride)
    if not is_parallel:
        shard = (0, 1)
    elif rank is None:
        shard = None
    else:
        shard = (int(rank), int(world_size))
    setattr(param, _SHARD_ATTR, shard)
    setattr(param, _SEGMENTS_ATTR, segments)


def mark_sequence_parallel(param: torch.Tensor) -> None:
    """The parameter is replicated over tensor-parallel ranks but each rank sees only its part of
    the sequence, so its gradient must be all-reduced over the tensor-parallel group."""
    param.sequence_parallel = True


def mark_shared_embedding(param: torch.Tensor) -> None:
    """The parameter is the word embedding shared between the first and last pipeline stages."""
    param.shared_embedding = True
    param.shared = True


def mark_expert_parallel(param: torch.Tensor) -> None:
    """The parameter belongs to this rank's experts: its gradient is reduced over the expert
    data-parallel group (groups.expt_dp), not the dense data-parallel group. Megatron's attribute
    name (`allreduce = False`)."""
    param.allreduce = False


def set_init(param: torch.Tensor, init_fn: Callable[[torch.Tensor], object], key: Optional[str]) -> None:
    """Record how initialize_parameters creates this parameter (see InitSpec)."""
    if not callable(init_fn):
        raise ValueError(f"init_fn must be callable, got {type(init_fn).__name__}")
    setattr(param, _INIT_SPEC_ATTR, InitSpec(init_fn, key))


def is_tensor_parallel(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def partition_dim(param: torch.Tensor) -> int:
    return int(getattr(param, "partition_dim", -1))


def partition_stride(param: torch.Tensor) -> int:
    return int(getattr(param, "partition_stride", 1))


def partition_segments(param: torch.Tensor) -> Optional[tuple[int, ...]]:
    """Logical sizes of the segments a fused tensor is split by (see set_tensor_parallel_attributes);
    None where the stride describes the layout."""
    segments = getattr(param, _SEGMENTS_ATTR, None)
    return tuple(segments) if segments is not None and is_tensor_parallel(param) else None


def partition_shard(param: torch.Tensor) -> Optional[tuple[int, int]]:
    """(rank, number of shards) of a tensor-parallel parameter; (0, 1) for a replicated one;
    None for a parallel parameter whose shard was not declared."""
    if not is_tensor_parallel(param):
        return (0, 1)
    return getattr(param, _SHARD_ATTR, None)


def is_sequence_parallel(param: torch.Tensor) -> bool:
    return bool(getattr(param, "sequence_parallel", False))


def is_shared_embedding(param: torch.Tensor) -> bool:
    return bool(getattr(param, "shared_embedding", False))


def is_expert_parallel(param: torch.Tensor) -> bool:
    return getattr(param, "allreduce", True) is False


def init_spec(param: torch.Tensor) -> Optional[InitSpec]:
    return getattr(param, _INIT_SPEC_ATTR, None)
