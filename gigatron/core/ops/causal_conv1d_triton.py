"""Triton kernels of the causal depthwise convolution (gigatron/core/ops/causal_conv1d.py holds
the definition and the reference). Imported only where Triton is installed.

Shape legend: b = batch, l = sequence, d = channels, W = kernel width.

Forward: one program per (batch row, block of positions, block of channels) sums the W shifted
inputs. Backward: g = dout * act'(pre) (pre recomputed), then
    dx[t] = sum_k weight[k] g[t + W - 1 - k],   dweight[k] = sum_t g[t] x[t - (W - 1) + k],   dbias = sum_t g[t]
with per-program partial sums of dweight and dbias added up in PyTorch (deterministic).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["triton_causal_conv1d", "conv_forward", "conv_backward"]

BLOCK_L = 64
BLOCK_D = 64


@triton.jit
def _preactivation(X, Wt, Bias, b, offs_l, offs_d, l, d,
                   stride_xb, stride_xl, stride_xd,
                   WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    mask_d = offs_d < d
    if HAS_BIAS:
        acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32) + tl.load(Bias + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    else:
        acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(WIDTH):
        t = offs_l - (WIDTH - 1) + k
        xv = tl.load(X + b * stride_xb + t[:, None] * stride_xl + offs_d[None, :] * stride_xd,
                     mask=(t[:, None] >= 0) & (t[:, None] < l) & mask_d[None, :], other=0.0).to(tl.float32)
        wk = tl.load(Wt + offs_d * WIDTH + k, mask=mask_d, other=0.0).to(tl.float32)
        acc += xv * wk[None, :]
    return acc


@triton.jit
def _conv_forward_kernel(X, Wt, Bias, OUT, l, d,
                         stride_xb, stride_xl, stride_xd, stride_ob, stride_ol, stride_od,
                         WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                         BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = _preactivation(X, Wt, Bias, b, offs_l, offs_d, l, d, stride_xb, stride_xl, stride_xd,
                         WIDTH, HAS_BIAS, BLOCK_L, BLOCK_D)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    mask = (offs_l[:, None] < l) & (offs_d[None, :] < d)
    tl.store(OUT + b * stride_ob + offs_l[:, None] * stride_ol + offs_d[None, :] * stride_od,
             acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _conv_grad_pre_kernel(X, Wt, Bias, DOUT, G, l, d,
                          stride_xb, stride_xl, stride_xd, stride_ob, stride_ol, stride_od,
                          WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                          BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """G[b, t, c] (fp32, contiguous [b, l, d]) = dout * act'(pre)."""
    b = tl.program_id(0).to(tl.int64)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (offs_l[:, None] < l) & (offs_d[None, :] < d)
    grad = tl.load(DOUT + b * stride_ob + offs_l[:, None] * stride_ol + offs_d[None, :] * stride_od,
                   mask=mask, other=0.0).to(tl.float32)
    if SILU:
        pre = _preactivation(X, Wt, Bias, b, offs_l, offs_d, l, d, stride_xb, stride_xl, stride_xd,
                             WIDTH, HAS_BIAS, BLOCK_L, BLOCK_D)
        sig = tl.sigmoid(pre)
        grad = grad * sig * (1.0 + pre * (1.0 - sig))
    tl.store(G + (b * l + offs_l[:, None]) * d + offs_d[None, :], grad, mask=mask)


@triton.jit
def _conv_backward_kernel(X, Wt, G, DX, DW_PART, DB_PART, l, d, nblocks_l,
                          stride_xb, stride_xl, stride_xd, stride_dxb, stride_dxl, stride_dxd,
                          WIDTH: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx for this tile, and this tile's partial sums of dweight [W, d] and dbias [d]."""
    b = tl.program_id(0).to(tl.int64)
    lb = tl.program_id(1)
    offs_l = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d
    mask = (offs_l[:, None] < l) & mask_d[None, :]
    g_own = tl.load(G + (b * l + offs_l[:, None]) * d + offs_d[None, :], mask=mask, other=0.0)
    dx = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    part = (b * nblocks_l + lb)
    for k in tl.static_range(WIDTH):
        wk = tl.load(Wt + offs_d * WIDTH + k, mask=mask_d, other=0.0).to(tl.float32)
        t_out = offs_l + (WIDTH - 1) - k  # the outputs that read x[t] through tap k
        gk = tl.load(G + (b * l + t_out[:, None]) * d + offs_d[None, :],
                     mask=(t_out[:, None] < l) & mask_d[None, :], other=0.0)
        dx += gk * wk[None, :]
        t_in = offs_l - (WIDTH - 1) + k  # the inputs that output t reads through tap k
        xv = tl.load(X + b * stride_xb + t_in[:, None] * stride_xl + offs_d[None, :] * stride_xd,
                     mask=(t_in[:, None] >= 0) & mask, other=0.0).to(tl.float32)
        tl.store(DW_PART + (part * WIDTH + k) * d + offs_d, tl.sum(g_own * xv, axis=0), mask=mask_d)
    tl.store(DB_PART + part * d + offs_d, tl.sum(g_own, axis=0), mask=mask_d)
    tl.store(DX + b * stride_dxb + offs_l[:, None] * stride_dxl + offs_d[None, :] * stride_dxd,
             dx.to(DX.dtype.element_ty), mask=mask)


def _like_layout(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty [b, l, d] tensor stored sequence-major when x is, else batch-major."""
    b, l, d = x.shape
    if x.stride(0) < x.stride(1):
        return torch.empty(l, b, d, dtype=dtype, device=x.device).transpose(0, 1)
    return torch.empty(b, l, d, dtype=dtype, device=x.device)


def _grid(b: int, l: int, d: int):
    return (b, triton.cdiv(l, BLOCK_L), triton.cdiv(d, BLOCK_D))


def conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], silu: bool) -> torch.Tensor:
    """x [b, l, d] (any strides), weight [d, W], bias [d] | None -> [b, l, d] in x's layout, no graph."""
    b, l, d = x.shape
    width = weight.shape[1]
    w = weight.contiguous()
    out = _like_layout(x, x.dtype)
    _conv_forward_kernel[_grid(b, l, d)](
        x, w, bias if bias is not None else w, out, l, d, *x.stride(), *out.stride(),
        WIDTH=width, HAS_BIAS=bias is not None, SILU=silu, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, num_warps=4)
    return out


def conv_backward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], silu: bool,
                  dout: torch.Tensor, weight_dtype: torch.dtype):
    """(dx in x's layout, dweight [d, W] in weight_dtype, dbias | None) from x, the parameters and
    dout [b, l, d] (any strides)."""
    b, l, d = x.shape
    w = weight.contiguous()
    width = w.shape[1]
    g = torch.empty(b, l, d, dtype=torch.float32, device=x.device)
    _conv_grad_pre_kernel[_grid(b, l, d)](
        x, w, bias if bias is not None else w, dout, g, l, d, *x.stride(), *dout.stride(),
        WIDTH=width, HAS_BIAS=bias is not None, SILU=silu, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, num_warps=4)
    nblocks_l = triton.cdiv(l, BLOCK_L)
    dx = _like_layout(x, x.dtype)
    dw_part = torch.empty(b * nblocks_l, width, d, dtype=torch.float32, device=x.device)
    db_part = torch.empty(b * nblocks_l, d, dtype=torch.float32, device=x.device)
    _conv_backward_kernel[_grid(b, l, d)](
        x, w, g, dx, dw_part, db_part, l, d, nblocks_l, *x.stride(), *dx.stride(),
        WIDTH=width, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, num_warps=4)
    dweight = dw_part.sum(0).t().to(weight_dtype)  # [d, W]
    dbias = db_part.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu):
        w = weight.contiguous()
        ctx.save_for_backward(x, w, bias)
        ctx.silu = silu
        ctx.weight_dtype = weight.dtype
        return conv_forward(x, w, bias, silu)

    @staticmethod
    def backward(ctx, dout):
        x, w, bias = ctx.saved_tensors
        return (*conv_backward(x, w, bias, ctx.silu, dout, ctx.weight_dtype), None)


def triton_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         silu: bool = True) -> torch.Tensor:
    """x [b, l, d] (any strides), weight [d, W], bias [d] | None -> [b, l, d] in x's dtype."""
    return _CausalConv1d.apply(x, weight, bias, silu)
