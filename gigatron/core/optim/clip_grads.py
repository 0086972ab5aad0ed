"""Global gradient norm, clipping and zero counting across parallel ranks.

The caller passes only the gradients that count toward the norm on this rank (each logical
element once across the job: tensor-parallel duplicates only on tp rank 0, the tied embedding only
on the first pipeline stage, distributed-optimizer shards each on their owner) and the groups over
which the partial sums are added up.

`grad_norm_fp32_tensor` and `clip_grads_by_total_norm_fp32` with a tensor norm keep the norm on the
device, so an optimizer step needs no host synchronisation; the float versions read it back.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.distributed as dist

__all__ = ["get_grad_norm_fp32", "grad_norm_fp32_tensor", "clip_grads_by_total_norm_fp32", "count_zeros_fp32",
           "count_zeros_fp32_tensor"]


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
    return float(grad_norm_fp32_tensor(grads_for_norm, process_groups, norm_type, device).item())


def grad_norm_fp32_tensor(
    grads_for_norm: Sequence[torch.Tensor],
    process_groups: Iterable = (),
    norm_type: float = 2.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """get_grad_norm_fp32 as a one-element fp32 tensor on `device` (no host synchronisation)."""
    norm_type = float(norm_type)
    if device is None:
        device = grads_for_norm[0].device if grads_for_norm else "cpu"
    if norm_type == math.inf:
        local = torch.zeros(1, dtype=torch.float32, device=device)
        for g in grads_for_norm:
            if g.numel():
                local = torch.maximum(local, g.detach().abs().max().float().reshape(1))
        _reduce(local, process_groups, dist.ReduceOp.MAX)
        return local
    if norm_type != 2.0:
        raise ValueError(f"gradient norm type must be 2 or inf, got {norm_type}")
    if grads_for_norm:
        norms = torch._foreach_norm([g.detach().float() if g.dtype != torch.float32 else g.detach()
                                     for g in grads_for_norm])
        local = torch.stack([n.to(device) for n in norms]).pow(2).sum().reshape(1)
    else:
        local = torch.zeros(1, dtype=torch.float32, device=device)
    _reduce(local, process_groups, dist.ReduceOp.SUM)
    return local.sqrt()


def clip_grads_by_total_norm_fp32(grads: Sequence[torch.Tensor], max_norm: float,
                                  total_norm: "float | torch.Tensor") -> None:
    """Scale `grads` in place by max_norm / (total_norm + 1e-6) when that is below 1.

    `total_norm` a float, or a one-element tensor (no host synchronisation: the coefficient is
    computed on the device in float64, as Python computes it for a float, and applied as 1 when it
    is not below 1, so both forms give the same bits)."""
    if not grads:
        return
    if isinstance(total_norm, torch.Tensor):
        norm = total_norm.detach().reshape(()).double()
        coeff = norm.new_tensor(float(max_norm)) / (norm + 1.0e-6)
        coeff = torch.where(coeff < 1.0, coeff, torch.ones_like(coeff)).float()
        torch._foreach_mul_(list(grads), coeff.to(grads[0].device))
        return
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(list(grads), clip_coeff)


def count_zeros_fp32(grads_for_norm: Sequence[torch.Tensor], process_groups: Iterable = (),
                     device: torch.device | str | None = None) -> int:
    """Number of zero elements in `grads_for_norm` summed over `process_groups`."""
    return int(count_zeros_fp32_tensor(grads_for_norm, process_groups, device).item())


def count_zeros_fp32_tensor(grads_for_norm: Sequence[torch.Tensor], process_groups: Iterable = (),
                            device: torch.device | str | None = None) -> torch.Tensor:
    """count_zeros_fp32 as a one-element float64 tensor on `device` (no host synchronisation)."""
    if device is None:
        device = grads_for_norm[0].device if grads_for_norm else "cpu"
    total = torch.zeros(1, dtype=torch.float64, device=device)
    for g in grads_for_norm:
        total += (g.numel() - torch.count_nonzero(g)).to(total.dtype)
    _reduce(total, process_groups, dist.ReduceOp.SUM)
    return total
