"""LayerNorm / RMSNorm fused with the residual add that precedes a pre-norm (--persist-layer-norm).

Shape legend: M = tokens (s * b), N = hidden size.

    new_residual = residual + (x + add_bias)        (the layer's bias-dropout-add, dropout off)
    y = norm(new_residual)                           (LayerNorm or RMSNorm, fp32 statistics)

`fused_add_norm` does both in one Triton kernel (one read of x and residual, one write of the new
residual and of y) and its backward in one more (d(norm input) + d(new residual), and per-program
partial dgamma/dbeta summed in PyTorch). Without a residual it is a plain norm. The kernels run on
CUDA only; `reference_add_norm` is the same computation in plain PyTorch (the test oracle).
Numerics: the kernel adds x, bias and residual in fp32 and rounds once to the residual dtype,
where the unfused path rounds after each add; the norm then uses exactly the stored residual.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["fused_add_norm", "reference_add_norm", "fused_norm_available", "MAX_FUSED_NORM_HIDDEN"]

MAX_FUSED_NORM_HIDDEN = 32768  # one row per program: the whole row lives in registers


def fused_norm_available(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on `x` (CUDA, Triton installed, not inside torch.compile,
    which fuses the add and the norm itself)."""
    if not x.is_cuda or torch.compiler.is_compiling() or x.shape[-1] > MAX_FUSED_NORM_HIDDEN or x.numel() == 0:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _residual_dtype(x: torch.Tensor, residual: Optional[torch.Tensor], add_bias: Optional[torch.Tensor]):
    dtype = x.dtype
    for t in (residual, add_bias):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class _FusedAddNorm(torch.autograd.Function):
    """forward(x, residual, add_bias, weight, bias, eps, rms, zero_centered) -> (y, new_residual)
    with x, residual [M, N]; new_residual is x when neither residual nor add_bias is given."""

    @staticmethod
    def forward(ctx, x, residual, add_bias, weight, bias, eps, rms, zero_centered):
        from gigatron.core.ops.fused_norm_triton import add_norm_forward

        residual_dtype = _residual_dtype(x, residual, add_bias)
        y, r, mean, rstd = add_norm_forward(x, residual, add_bias, weight, bias, eps, rms, zero_centered,
                                            residual_dtype)
        ctx.save_for_backward(r, weight, mean, rstd)
        ctx.flags = (rms, zero_centered, bias is not None, residual is not None, add_bias is not None)
        ctx.dtypes = (x.dtype, None if residual is None else residual.dtype,
                      None if add_bias is None else add_bias.dtype)
        ctx.adds = residual is not None or add_bias is not None
        if not ctx.adds:
            ctx.mark_non_differentiable(r)
        return y, r

    @staticmethod
    def backward(ctx, dy, dres):
        from gigatron.core.ops.fused_norm_triton import add_norm_backward

        r, weight, mean, rstd = ctx.saved_tensors
        rms, zero_centered, has_bias, has_residual, has_add_bias = ctx.flags
        x_dtype, residual_dtype, add_bias_dtype = ctx.dtypes
        dres = dres.contiguous() if (dres is not None and ctx.adds) else None
        dr, dweight, dbias = add_norm_backward(r, dy.contiguous(), dres, weight, has_bias, mean, rstd, rms,
                                               zero_centered)
        dx = dr.to(x_dtype)
        dresidual = dr.to(residual_dtype) if has_residual else None
        dadd_bias = dr.sum(0, dtype=torch.float32).to(add_bias_dtype) if has_add_bias else None
        return dx, dresidual, dadd_bias, dweight, dbias, None, None, None


def fused_add_norm(x: torch.Tensor, residual: Optional[torch.Tensor], add_bias: Optional[torch.Tensor],
                   weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float, rms: bool,
                   zero_centered_gamma: bool = False):
    """Triton: (y [..., N] in weight's dtype, new_residual [..., N]) of x, residual [..., N].
    CUDA only (see fused_norm_available)."""
    shape = x.shape
    n = shape[-1]
    x2 = x.reshape(-1, n).contiguous()  # [M, N]
    r2 = residual.reshape(-1, n).contiguous() if residual is not None else None  # [M, N]
    y, r = _FusedAddNorm.apply(x2, r2, add_bias, weight, bias, float(eps), bool(rms), bool(zero_centered_gamma))
    return y.view(shape), r.view(shape)


def reference_add_norm(x: torch.Tensor, residual: Optional[torch.Tensor], add_bias: Optional[torch.Tensor],
                       weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float, rms: bool,
                       zero_centered_gamma: bool = False):
    """Plain PyTorch of the same computation: residual + (x + add_bias) in fp32, rounded once to the
    residual dtype, then the norm in fp32 -> (y in weight's dtype, new_residual)."""
    dtype = _residual_dtype(x, residual, add_bias)
    r = x.float()
    if add_bias is not None:
        r = r + add_bias.float()
    if residual is not None:
        r = r + residual.float()
    r = r.to(dtype)
    rf = r.float()
    gamma = weight.float() + 1.0 if zero_centered_gamma else weight.float()
    if rms:
        y = rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + eps) * gamma
    else:
        y = F.layer_norm(rf, (rf.shape[-1],), gamma, None if bias is None else bias.float(), eps)
    return y.to(weight.dtype), r
