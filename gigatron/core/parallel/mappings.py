"""Collectives as autograd functions, each taking an explicit `Group`.

Shapes: s = sequence, b = micro-batch, h = hidden, t = group size.
    tensor-parallel region:   last dim split      [s, b, h] <-> [s, b, h/t]
    sequence-parallel region: first dim split     [s, b, h] <-> [s/t, b, h]

Each function's docstring says what it does in forward and in backward. `f` and `g` are the
conjugate operators of the Megatron-LM paper (Shoeybi et al. 2019): `f` before a column-parallel
block, `g` after a row-parallel block; `g_sp` / `f_sp` are their sequence-parallel versions
(Korthikanti et al. 2022). On a group of one member every function returns its input.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .groups import Group

__all__ = [
    "copy_to_tensor_parallel_region",
    "reduce_from_tensor_parallel_region",
    "scatter_to_tensor_parallel_region",
    "gather_from_tensor_parallel_region",
    "scatter_to_sequence_parallel_region",
    "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "all_to_all",
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "split",
]

# torch >= 2.10 names the single-tensor collectives *_single; older versions *_into_tensor/_tensor.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ---------------------------------------------------------------------------------------------
# Plain collectives (no autograd). Each returns a new tensor and leaves its input untouched.
# ---------------------------------------------------------------------------------------------


def _check_divisible(x: torch.Tensor, dim: int, group: Group, what: str) -> int:
    length = x.shape[dim]
    if length % group.size != 0:
        raise ValueError(
            f"{what}: dimension {dim} of a tensor of shape {tuple(x.shape)} ({length}) is not "
            f"divisible by the group size {group.size}; pad it or change the parallel size"
        )
    return length // group.size


def all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum of `x` over the group (a new tensor)."""
    if group.size == 1:
        return x
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group.group)
    return out


def all_gather(x: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    """Concatenation along `dim` of every member's `x`, in group-rank order."""
    if group.size == 1:
        return x
    dim = dim % x.dim()
    x = x.contiguous()
    out = torch.empty((group.size * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x, group=group.group)  # [t * n0, ...]
    if dim != 0:
        out = torch.cat(out.chunk(group.size, dim=0), dim=dim)  # [n0, ..., t * n_dim, ...]
    return out


def split(x: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    """This rank's slice of `x` along `dim` (a contiguous copy)."""
    if group.size == 1:
        return x
    length = _check_divisible(x, dim, group, "split")
    return x.narrow(dim, group.rank * length, length).contiguous()


def reduce_scatter(x: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    """Sum over the group, then keep this rank's slice along `dim`."""
    if group.size == 1:
        return x
    dim = dim % x.dim()
    _check_divisible(x, dim, group, "reduce_scatter")
    if dim != 0:
        x = torch.cat(x.chunk(group.size, dim=dim), dim=0)  # [t * n0, ..., n_dim / t, ...]
    x = x.contiguous()
    out = torch.empty((x.shape[0] // group.size,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, x, group=group.group)  # gloo has it too since torch 2.2
    return out


def _all_to_all(x: torch.Tensor, group: Group, split_dim: int, concat_dim: int) -> torch.Tensor:
    split_dim = split_dim % x.dim()
    concat_dim = concat_dim % x.dim()
    _check_divisible(x, split_dim, group, "all_to_all")
    send = x.movedim(split_dim, 0).contiguous()  # [n_split, ...rest]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group.group)  # [t * n_split/t, ...rest] from each rank
    recv = recv.movedim(0, split_dim)  # back to x's layout, split dim = chunks from ranks 0..t-1
    return torch.cat(recv.chunk(group.size, dim=split_dim), dim=concat_dim)


# ---------------------------------------------------------------------------------------------
# Autograd functions.
# ---------------------------------------------------------------------------------------------


class _CopyToTensorParallelRegion(torch.autograd.Function):
    """forward: identity, backward: all-reduce over tp (Megatron's f)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.group), None


class _ReduceFromTensorParallelRegion(torch.autograd.Function):
    """forward: all-reduce over tp, backward: identity (Megatron's g)."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTensorParallelRegion(torch.autograd.Function):
    """forward: split the last dim, keep this rank's part; backward: all-gather the last dim."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split(x, group, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.group, dim=-1), None


class _GatherFromTensorParallelRegion(torch.autograd.Function):
    """forward: all-gather the last dim; backward: split the last dim, keep this rank's part."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, group, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return split(grad, ctx.group, dim=-1), None


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    """forward: split dim 0 (sequence), keep this rank's part; backward: all-gather dim 0."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split(x, group, dim=0)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.group, dim=0), None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    """forward: all-gather dim 0 (sequence); backward: reduce-scatter dim 0 (Megatron's g_sp before
    a column-parallel block), or split dim 0 when the gradient is already complete on every rank
    (tensor_parallel_output_grad=False)."""

    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):
        ctx.group = group
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return all_gather(x, group, dim=0)

    @staticmethod
    def backward(ctx, grad):
        if ctx.tensor_parallel_output_grad:
            return reduce_scatter(grad, ctx.group, dim=0), None, None
        return split(grad, ctx.group, dim=0), None, None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """forward: reduce-scatter dim 0 (sequence) (Megatron's f_sp after a row-parallel block);
    backward: all-gather dim 0."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter(x, group, dim=0)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.group, dim=0), None


class _AllToAll(torch.autograd.Function):
    """forward: all-to-all (split `split_dim` into t parts, part i to rank i, concatenate the parts
    received along `concat_dim`); backward: the inverse all-to-all (split `concat_dim`,
    concatenate along `split_dim`)."""

    @staticmethod
    def forward(ctx, x, group, split_dim, concat_dim):
        ctx.group, ctx.split_dim, ctx.concat_dim = group, split_dim, concat_dim
        return _all_to_all(x, group, split_dim, concat_dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group, ctx.concat_dim, ctx.split_dim), None, None, None


# ---------------------------------------------------------------------------------------------
# Public wrappers.
# ---------------------------------------------------------------------------------------------


def copy_to_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """forward: identity, backward: all-reduce over the group (Megatron's f)."""
    if group.size == 1:
        return x
    return _CopyToTensorParallelRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """forward: all-reduce over the group, backward: identity (Megatron's g)."""
    if group.size == 1:
        return x
    return _ReduceFromTensorParallelRegion.apply(x, group)


def scatter_to_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """forward: keep this rank's part of the last dim [.., h] -> [.., h/t]; backward: all-gather
    the last dim."""
    if group.size == 1:
        return x
    return _ScatterToTensorParallelRegion.apply(x, group)


def gather_from_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """forward: all-gather the last dim [.., h/t] -> [.., h]; backward: keep this rank's part."""
    if group.size == 1:
        return x
    return _GatherFromTensorParallelRegion.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """forward: keep this rank's part of dim 0 [s, ..] -> [s/t, ..]; backward: all-gather dim 0."""
    if group.size == 1:
        return x
    return _ScatterToSequenceParallelRegion.apply(x, group)


def gather_from_sequence_parallel_region(
    x: torch.Tensor, group: Group, tensor_parallel_output_grad: bool = True
) -> torch.Tensor:
    """forward: all-gather dim 0 [s/t, ..] -> [s, ..]; backward: reduce-scatter dim 0 (each rank
    holds a partial gradient, as after a column-parallel layer), or keep this rank's part of dim 0
    when `tensor_parallel_output_grad` is False (the gradient is the same on every rank)."""
    if group.size == 1:
        return x
    return _GatherFromSequenceParallelRegion.apply(x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """forward: reduce-scatter dim 0 [s, ..] (partial sums) -> [s/t, ..]; backward: all-gather dim 0."""
    if group.size == 1:
        return x
    return _ReduceScatterToSequenceParallelRegion.apply(x, group)


def all_to_all(group: Group, x: torch.Tensor, split_dim: int, concat_dim: int) -> torch.Tensor:
    """forward: split `split_dim` into t equal parts, send part i to group rank i and concatenate
    the received parts (in rank order) along `concat_dim`; backward: the inverse all-to-all.
    E.g. split_dim=-1 (heads), concat_dim=0 (sequence): [s/t, b, n] -> [s, b, n/t]."""
    if group.size == 1:
        return x
    return _AllToAll.apply(x, group, split_dim, concat_dim)
