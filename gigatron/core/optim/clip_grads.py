"""Global gradient norm, clipping and zero counting across parallel ranks.

The caller passes only the gradients that count toward the norm on this rank (each logical
element once across the job: tensor-parallel duplicates only on tp rank 0, the tied embedding only
on the first pipeline stage, distributed-optimizer shards each on their owner) and the groups over
which the partial sums are added up.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.distributed as dist

__all__ = ["get_grad_norm_fp32", "clip_grads_by_total_norm_fp32", "count_zeros_fp32"]


def _reduce(value: torch.Tensor, process_groups: Iterable, op) -> torch.Tensor:
    for group in process_groups:
        if group is not None:
            dist.all_reduce(value, op=op, group=group)
    return value


def get_grad_norm_fp32(
    grads_for_norm: Sequence[torch.Tensor],
    process_groups: Iterable = (),
    norm_type: float = 2.0,
    device: torch.device | str | None = None,
) -> float:
    """The norm of all `grads_for_norm` of all ranks of `process_groups` (computed in fp32).

    `process_groups` are torch process groups (None entries are skipped) over which partial results
    are combined one after the other (e.g. model-parallel, then data-parallel for distributed
    optimizer shards). norm_type 2 (L2) or inf."""
    norm_type = float(norm_type)
    if device is None:
        device = grads_for_norm[0].device if grads_for_norm else "cpu"
    if norm_type == math.inf:
        local = torch.zeros(1, dtype=torch.float32, device=device)
        for g in grads_for_norm:
            if g.numel():
                local = torch.maximum(local, g.detach().abs().max().float().reshape(1))
        _reduce(local, process_groups, dist.ReduceOp.MAX)
        return float(local.item())
    if norm_type != 2.0:
        raise ValueError(f"gradient norm type must be 2 or inf, got {norm_type}")
    if grads_for_norm:
        norms = torch._foreach_norm([g.detach().float() if g.dtype != torch.float32 else g.detach()
                                     for g in grads_for_norm])
        local = torch.stack([n.to(device) for n in norms]).pow(2).sum().reshape(1)
    else:
        local = torch.zeros(1, dtype=torch.float32, device=device)
    _reduce(local, process_groups, dist.ReduceOp.SUM)
    return float(local.sqrt().item())


def clip_grads_by_total_norm_fp32(grads: Sequence[torch.Tensor], max_norm: float, total_norm: float) -> None:
    """Scale `grads` in place by max_norm / (total_norm + 1e-6) when that is below 1."""
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(list(grads), clip_coeff)


def count_zeros_fp32(grads_for_norm: Sequence[torch.Tensor], process_groups: Iterable = (),
                     device: torch.device | str | None = None) -> int:
    """Number of zero elements in `grads_for_norm` summed over `process_groups`."""
    if device is None:
        device = grads_for_norm[0].device if grads_for_norm else "cpu"
    total = torch.zeros(1, dtype=torch.float64, device=device)
    for g in grads_for_norm:
        total += (g.numel() - torch.count_nonzero(g)).to(total.dtype)
    _reduce(total, process_groups, dist.ReduceOp.SUM)
    return int(total.item())
