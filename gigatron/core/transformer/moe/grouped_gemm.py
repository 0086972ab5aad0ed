"""Grouped matrix multiply for the local experts: rows of x grouped by expert, one weight per group.

Shape legend: N = rows (tokens routed to this rank's experts, sorted by expert), G = local experts,
K = input features, M = output features.

    grouped_mm(x [N, K], w [G, K, M], tokens_per_expert [G]) -> [N, M]
    rows offs[g-1]:offs[g] of the output = x[those rows] @ w[g]

`torch._grouped_mm` (one kernel for all groups; CUDA bf16 on sm90+, and a CPU implementation) is
used where it supports the inputs; otherwise `reference_grouped_mm`, a loop of plain matmuls.
Empty groups and N = 0 are allowed in both.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["grouped_mm", "reference_grouped_mm", "grouped_mm_supported"]


def reference_grouped_mm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: one matmul per group (needs the counts on the host)."""
    counts = tokens_per_expert.tolist()
    if sum(counts) != x.shape[0]:
        raise ValueError(f"grouped_mm: tokens_per_expert sums to {sum(counts)} but x has {x.shape[0]} rows")
    pieces = torch.split(x, counts, dim=0)
    outs = [piece @ w[g] for g, piece in enumerate(pieces)]  # [n_g, M] each
    if not outs:
        return x.new_zeros(0, w.shape[-1])
    return torch.cat(outs, dim=0)  # [N, M]


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm can run these inputs: CUDA needs bf16, compute capability 9.0+
    and 16-byte aligned rows (K and M multiples of 8); the CPU implementation takes float/bf16 (bf16
    only under torch.compile)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (9, 0):
            return False
        return x.shape[-1] % 8 == 0 and w.shape[-1] % 8 == 0
    if x.device.type == "cpu":
        # torch.compile's shape function for _grouped_mm takes bf16 only, even where eager runs fp32.
        return x.dtype == torch.bfloat16 or (x.dtype == torch.float32 and not torch.compiler.is_compiling())
    return False


class _ContiguousGrad(torch.autograd.Function):
    """forward: identity; backward: the gradient made contiguous (torch._grouped_mm's backward
    rejects expanded gradients such as that of a sum)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor,
               use_kernel: Optional[bool] = None) -> torch.Tensor:
    """x [N, K] grouped by expert, w [G, K, M] -> [N, M]. `use_kernel`: None picks
    torch._grouped_mm when supported; False forces the loop; True requires the kernel."""
    if w.dim() != 3 or x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_mm: expected x [N, K] and w [G, K, M], got {tuple(x.shape)} and {tuple(w.shape)}")
    if tokens_per_expert.numel() != w.shape[0]:
        raise ValueError(f"grouped_mm: {tokens_per_expert.numel()} group sizes for {w.shape[0]} weights")
    supported = grouped_mm_supported(x, w)
    if use_kernel is None:
        use_kernel = supported
    elif use_kernel and not supported:
        raise ValueError(f"grouped_mm: torch._grouped_mm does not support {x.dtype} on {x.device.type} here; "
                         "use bf16 on a CUDA device of compute capability 9.0+ (or the loop)")
    if not use_kernel:
        return reference_grouped_mm(x, w, tokens_per_expert)
    offs = torch.cumsum(tokens_per_expert.to(device=x.device), dim=0).to(torch.int32)  # [G]
    return _ContiguousGrad.apply(torch._grouped_mm(x, w, offs=offs))  # [N, M]
