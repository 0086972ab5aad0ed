"""Tensor-parallel layout of the Mamba mixer's fused parameters, and their initializers.

Megatron-Core splits the mixer's fused tensors segment by segment over the tensor-parallel ranks:
rank r's `in_proj.weight` rows are [z_r; x_r; B_r; C_r; dt_r] (its slice of each segment) and its
`conv1d` weight and bias rows are [x_r; B_r; C_r]. Concatenating the rank shards (what a stride-1
partition tag describes, and what Megatron's `torch` checkpoints hold per rank) therefore gives the
*rank-major* order [z_0 x_0 B_0 C_0 dt_0 z_1 x_1 ...]; the *canonical* order is the tp=1 tensor
[z; x; B; C; dt]. The mixer therefore tags these parameters with their partition segments
(`in_proj_segments` / `conv_segments`, gigatron/core/parallel/tags.py), which initialization,
torch_dist sharding and tp_layout's merge/split honour: the logical tensor is always the canonical
one, so one seed gives the same model at every tensor-parallel size and a checkpoint loads at any.
`to_rank_major` / `from_rank_major` convert between the two orders.

The initializers here fill the full logical tensor (gigatron/core/parallel/init.py).
"""

from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import nn

__all__ = ["in_proj_segments", "conv_segments", "rank_major_order", "to_rank_major", "from_rank_major",
           "UniformInit", "LogUniformInit", "InverseSoftplusDtInit", "OnesInit"]


def in_proj_segments(d_inner: int, num_groups: int, state_dim: int, num_heads: int) -> List[int]:
    """Rows of the canonical in_proj weight: [z, x, B, C, dt]."""
    return [d_inner, d_inner, num_groups * state_dim, num_groups * state_dim, num_heads]


def conv_segments(d_inner: int, num_groups: int, state_dim: int) -> List[int]:
    """Channels of the canonical conv1d weight and bias: [x, B, C]."""
    return [d_inner, num_groups * state_dim, num_groups * state_dim]


def rank_major_order(segments: Sequence[int], tp_size: int) -> torch.Tensor:
    """index[i] = the canonical row that row i of the rank-major tensor holds."""
    starts = [sum(segments[:k]) for k in range(len(segments))]
    index = []
    for rank in range(tp_size):
        for start, size in zip(starts, segments):
            if size % tp_size != 0:
                raise ValueError(f"a segment of {size} rows does not split over {tp_size} tensor-parallel ranks")
            piece = size // tp_size
            index.extend(range(start + rank * piece, start + (rank + 1) * piece))
    return torch.tensor(index, dtype=torch.long)


def to_rank_major(canonical: torch.Tensor, segments: Sequence[int], tp_size: int, dim: int = 0) -> torch.Tensor:
    """The canonical (tp=1) tensor reordered so that its tp equal slices along `dim` are the ranks' shards."""
    return canonical.index_select(dim, rank_major_order(segments, tp_size).to(canonical.device))


def from_rank_major(rank_major: torch.Tensor, segments: Sequence[int], tp_size: int, dim: int = 0) -> torch.Tensor:
    """Inverse of to_rank_major (e.g. the concatenated rank shards -> the tp=1 tensor)."""
    order = rank_major_order(segments, tp_size).to(rank_major.device)
    out = torch.empty_like(rank_major)
    out.index_copy_(dim, order, rank_major)
    return out


class UniformInit:
    """U(-bound, bound); bound = 1/sqrt(kernel width) is torch's default Conv1d init of the depthwise
    conv's weight (kaiming uniform, a = sqrt(5)) and bias, which Megatron keeps."""

    def __init__(self, bound: float):
        self.bound = bound

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return nn.init.uniform_(t, -self.bound, self.bound)

    def __repr__(self) -> str:
        return f"uniform(+-{self.bound:g})"


class LogUniformInit:
    """A_log: log of U(low, high) (A = -exp(A_log) in [-high, -low]); Megatron's A_init_range (1, 16)."""

    def __init__(self, low: float = 1.0, high: float = 16.0):
        self.low, self.high = low, high

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t.uniform_(self.low, self.high).log_()
        return t

    def __repr__(self) -> str:
        return f"log_uniform({self.low:g}, {self.high:g})"


class InverseSoftplusDtInit:
    """dt_bias: softplus(dt_bias) is a step size dt drawn log-uniformly from [dt_min, dt_max]
    (at least dt_floor); Megatron's defaults 0.001, 0.1, 1e-4."""

    def __init__(self, dt_min: float = 0.001, dt_max: float = 0.1, dt_floor: float = 1e-4):
        self.dt_min, self.dt_max, self.dt_floor = dt_min, dt_max, dt_floor

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t.uniform_(0.0, 1.0)
            dt = torch.exp(t * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min))
            dt = dt.clamp(min=self.dt_floor)
            t.copy_(dt + torch.log(-torch.expm1(-dt)))  # the inverse of softplus
        return t

    def __repr__(self) -> str:
        return f"inverse_softplus_dt({self.dt_min:g}, {self.dt_max:g})"


class OnesInit:
    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return nn.init.ones_(t)

    def __repr__(self) -> str:
        return "ones"
