"""Triton kernels of the fused bias + GeLU and bias + SwiGLU (gigatron/core/ops/fused_activation.py
holds the autograd functions and the plain-PyTorch references). Imported only where Triton runs.

Shape legend: M = rows (tokens), F = the activation's output width (ffn / tp); SwiGLU's input is
[M, 2F] = [gate | up] along the last dimension.

GeLU:   y = gelu(x + b)            dx = dy * gelu'(x + b)            (erf form, or the tanh form)
SwiGLU: y = silu(g + bg) * (u + bu)
        dg = dy * (u + bu) * sigmoid(g + bg) * (1 + (g + bg) * (1 - sigmoid(g + bg)))
        du = dy * silu(g + bg)
All in fp32; the pre-activation is recomputed in backward from the saved input (no extra tensor).
The bias gradient is the row sum of dx, taken in PyTorch.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["gelu_forward", "gelu_backward", "swiglu_forward", "swiglu_backward"]

BLOCK_M = 4
BLOCK_F = 1024

_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_SQRT_2_OVER_PI = 0.7978845608028654


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _gelu_and_grad(z, TANH: tl.constexpr):
    if TANH:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = _tanh(inner)
        y = 0.5 * z * (1.0 + t)
        dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        grad = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dinner
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        y = z * cdf
        grad = cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    return y, grad


@triton.jit
def _gelu_kernel(X, B, DY, OUT, M, F, HAS_BIAS: tl.constexpr, BACKWARD: tl.constexpr, TANH: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows[:, None] < M) & (cols[None, :] < F)
    offsets = rows[:, None].to(tl.int64) * F + cols[None, :]
    z = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(B + cols, mask=cols < F, other=0.0).to(tl.float32)[None, :]
    y, grad = _gelu_and_grad(z, TANH)
    if BACKWARD:
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + offsets, (dy * grad).to(OUT.dtype.element_ty), mask=mask)
    else:
        tl.store(OUT + offsets, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_kernel(X, B, DY, OUT, DX, M, F, HAS_BIAS: tl.constexpr, BACKWARD: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows[:, None] < M) & (cols[None, :] < F)
    in_offsets = rows[:, None].to(tl.int64) * (2 * F) + cols[None, :]  # gate; up is F further
    out_offsets = rows[:, None].to(tl.int64) * F + cols[None, :]
    g = tl.load(X + in_offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + in_offsets + F, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        g += tl.load(B + cols, mask=cols < F, other=0.0).to(tl.float32)[None, :]
        u += tl.load(B + F + cols, mask=cols < F, other=0.0).to(tl.float32)[None, :]
    s = tl.sigmoid(g)
    silu = g * s
    if BACKWARD:
        dy = tl.load(DY + out_offsets, mask=mask, other=0.0).to(tl.float32)
        dg = dy * u * s * (1.0 + g * (1.0 - s))
        du = dy * silu
        tl.store(DX + in_offsets, dg.to(DX.dtype.element_ty), mask=mask)
        tl.store(DX + in_offsets + F, du.to(DX.dtype.element_ty), mask=mask)
    else:
        tl.store(OUT + out_offsets, (silu * u).to(OUT.dtype.element_ty), mask=mask)


def _grid(rows: int, width: int):
    return (triton.cdiv(rows, BLOCK_M), triton.cdiv(width, BLOCK_F))


def gelu_forward(x: torch.Tensor, bias: Optional[torch.Tensor], tanh: bool) -> torch.Tensor:
    """x [M, F] contiguous -> gelu(x + bias) [M, F] in x's dtype."""
    rows, width = x.shape
    out = torch.empty_like(x)
    _gelu_kernel[_grid(rows, width)](x, bias if bias is not None else x, x, out, rows, width,
                                     HAS_BIAS=bias is not None, BACKWARD=False, TANH=tanh,
                                     BLOCK_M=BLOCK_M, BLOCK_F=BLOCK_F, num_warps=4)
    return out


def gelu_backward(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], tanh: bool) -> torch.Tensor:
    """d(x + bias) [M, F] in x's dtype."""
    rows, width = x.shape
    dx = torch.empty_like(x)
    _gelu_kernel[_grid(rows, width)](x, bias if bias is not None else x, dy, dx, rows, width,
                                     HAS_BIAS=bias is not None, BACKWARD=True, TANH=tanh,
                                     BLOCK_M=BLOCK_M, BLOCK_F=BLOCK_F, num_warps=4)
    return dx


def swiglu_forward(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, 2F] contiguous -> silu(gate) * up [M, F] in x's dtype."""
    rows, width = x.shape[0], x.shape[1] // 2
    out = torch.empty((rows, width), dtype=x.dtype, device=x.device)
    _swiglu_kernel[_grid(rows, width)](x, bias if bias is not None else x, x, out, x, rows, width,
                                       HAS_BIAS=bias is not None, BACKWARD=False, BLOCK_M=BLOCK_M,
                                       BLOCK_F=BLOCK_F, num_warps=4)
    return out


def swiglu_backward(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """d(x + bias) [M, 2F] in x's dtype."""
    rows, width = x.shape[0], x.shape[1] // 2
    dx = torch.empty_like(x)
    _swiglu_kernel[_grid(rows, width)](x, bias if bias is not None else x, dy, dy, dx, rows, width,
                                       HAS_BIAS=bias is not None, BACKWARD=True, BLOCK_M=BLOCK_M,
                                       BLOCK_F=BLOCK_F, num_warps=4)
    return dx
