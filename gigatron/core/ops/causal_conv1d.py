"""The short causal depthwise convolution of the Mamba mixer (over x, B and C), with SiLU.

Shape legend: b = batch, l = sequence, d = channels, W = kernel width (4 in Megatron's mixer).

    out[b, t, c] = act(bias[c] + sum_{k<W} weight[c, k] * x[b, t - (W - 1) + k, c])   (x = 0 before t = 0)

which is torch's Conv1d(d, d, W, groups=d, padding=W - 1) cut to the first l outputs (Megatron's
`conv1d` parameter: weight [d, 1, W], bias [d]). x may be any strided [b, l, d] view (the mixer
passes its [s, b, d] projection transposed); the output has the same order of dimensions in memory
(sequence-major for a sequence-major input).

reference_causal_conv1d is plain PyTorch (the CPU path and the test oracle); on CUDA with Triton
installed causal_conv1d runs the kernels of gigatron/core/ops/causal_conv1d_triton.py.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from gigatron.core.ops.ssd_recompute import keep_inputs_only

__all__ = ["reference_causal_conv1d", "causal_conv1d"]


def _check(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be [b, l, d], got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(f"causal_conv1d: weight must be [d, W] with d = {x.shape[2]}, got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (x.shape[2],):
        raise ValueError(f"causal_conv1d: bias must be [d] = {(x.shape[2],)}, got {tuple(bias.shape)}")


def reference_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                            silu: bool = True) -> torch.Tensor:
    """x [b, l, d], weight [d, W], bias [d] | None -> [b, l, d] in x's dtype (computed in fp32)."""
    _check(x, weight, bias)
    l, width = x.shape[1], weight.shape[1]
    f = torch.float64 if x.dtype == torch.float64 else torch.float32
    xt = x.to(f).transpose(1, 2)  # [b, d, l]
    out = F.conv1d(xt, weight.to(f)[:, None, :], None if bias is None else bias.to(f), padding=width - 1,
                   groups=x.shape[2])[..., :l]  # [b, d, l]
    if silu:
        out = F.silu(out)
    return out.transpose(1, 2).to(x.dtype)  # [b, l, d]


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, silu: bool = True,
                  kernel: str = "auto") -> torch.Tensor:
    """The causal depthwise convolution; kernel: "auto" (Triton on CUDA when installed, else the
    reference), "triton" or "reference". Either keeps only x, weight and bias for backward (the
    reference recomputes its fp32 intermediates there; gigatron/core/ops/ssd_recompute.py)."""
    if kernel == "auto":
        from gigatron.core.ops.ssd_base import ssd_triton_available
        kernel = "triton" if x.is_cuda and ssd_triton_available() else "reference"
    if kernel == "reference":
        # Keeps x (a view of the in_proj output in the mixer), weight and bias, as the Triton kernel
        # does, instead of fp32 copies of x and of the pre-activation; recomputed in backward.
        return keep_inputs_only(functools.partial(reference_causal_conv1d, silu=silu), x, weight, bias)
    if kernel == "triton":
        _check(x, weight, bias)
        if not x.is_cuda:
            raise ValueError("causal_conv1d: the Triton kernel needs CUDA tensors; use kernel='reference' on the CPU")
        from gigatron.core.ops.causal_conv1d_triton import triton_causal_conv1d
        return triton_causal_conv1d(x, weight, bias, silu)
    raise ValueError(f"causal_conv1d: kernel {kernel!r} is not one of auto, triton, reference")
