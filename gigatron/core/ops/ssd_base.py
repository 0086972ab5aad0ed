"""What the SSD scan, the causal conv1d and their Triton kernels all need, below all of them:
whether the Triton kernels can run, and the split of the mixer's convolved channels."""

from __future__ import annotations

import torch

__all__ = ["ssd_triton_available", "split_xbc"]


def ssd_triton_available() -> bool:
    """Whether the Triton kernels can be imported (Triton installed)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def split_xbc(xbc: torch.Tensor, heads: int, head_dim: int, groups: int, state_dim: int):
    """The mixer's convolved [..., H P + 2 G N] -> views x [..., H, P], B [..., G, N], C [..., G, N]."""
    x, B, C = torch.split(xbc, [heads * head_dim, groups * state_dim, groups * state_dim], dim=-1)
    return (x.unflatten(-1, (heads, head_dim)), B.unflatten(-1, (groups, state_dim)),
            C.unflatten(-1, (groups, state_dim)))
