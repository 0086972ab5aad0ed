"""Triton kernels of the fused residual-add + LayerNorm / RMSNorm (gigatron/core/ops/fused_norm.py
holds the autograd functions and the plain-PyTorch reference). Imported only where Triton runs.

Shape legend: M = rows (tokens), N = hidden size, P = programs of the backward pass.

Forward, one program per row:
    r = x (+ residual) (+ bias)            stored in the residual dtype, and normalised as stored
    LayerNorm: y = (r - mean) * rstd * gamma + beta      RMSNorm: y = r * rstd * gamma
    gamma = weight (+ 1 with the zero-centered option); statistics in fp32
Backward, P programs each over a contiguous block of rows, with xhat = normalised r, g = gamma * dy:
    RMSNorm:   dr = (g - xhat * mean(xhat * g)) * rstd
    LayerNorm: dr = (g - xhat * mean(xhat * g) - mean(g)) * rstd
    dr += d(new residual);  partial dgamma = sum_rows dy * xhat, partial dbeta = sum_rows dy  -> [P, N]
and the [P, N] partials are summed in PyTorch (stage two of the reduction; deterministic).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["add_norm_forward", "add_norm_backward"]


@triton.jit
def _add_norm_fwd_kernel(X, RES, ADD_BIAS, RES_OUT, W, B, Y, MEAN, RSTD, N, eps,
                         HAS_RESIDUAL: tl.constexpr, HAS_ADD_BIAS: tl.constexpr, STORE_RESIDUAL: tl.constexpr,
                         HAS_BIAS: tl.constexpr, IS_RMS: tl.constexpr, ZERO_CENTERED: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD_BIAS:
        x += tl.load(ADD_BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(RES + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    if STORE_RESIDUAL:
        stored = x.to(RES_OUT.dtype.element_ty)
        tl.store(RES_OUT + row * N + cols, stored, mask=mask)
        x = stored.to(tl.float32)  # normalise exactly what backward will read
    if IS_RMS:
        var = tl.sum(x * x, axis=0) / N
        xc = x
    else:
        mean = tl.sum(x, axis=0) / N
        xc = tl.where(mask, x - mean, 0.0)
        var = tl.sum(xc * xc, axis=0) / N
        tl.store(MEAN + row, mean)
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if ZERO_CENTERED:
        w += 1.0
    y = xc * rstd * w
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _add_norm_bwd_kernel(R, DY, DRES, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, M, N,
                         HAS_DRES: tl.constexpr, HAS_BIAS: tl.constexpr, IS_RMS: tl.constexpr,
                         ZERO_CENTERED: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if ZERO_CENTERED:
        w += 1.0
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * ROWS_PER_PROGRAM
    for i in range(0, ROWS_PER_PROGRAM):
        row = row_start + i
        rmask = mask & (row < M)  # the last program's block may run past the rows
        offset = row.to(tl.int64) * N
        x = tl.load(R + offset + cols, mask=rmask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offset + cols, mask=rmask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row, mask=row < M, other=0.0)
        if IS_RMS:
            xhat = x * rstd
        else:
            mean = tl.load(MEAN + row, mask=row < M, other=0.0)
            xhat = tl.where(rmask, (x - mean) * rstd, 0.0)
        g = w * dy
        c1 = tl.sum(xhat * g, axis=0) / N
        if IS_RMS:
            dx = (g - xhat * c1) * rstd
        else:
            c2 = tl.sum(g, axis=0) / N
            dx = (g - xhat * c1 - c2) * rstd
        if HAS_DRES:
            dx += tl.load(DRES + offset + cols, mask=rmask, other=0.0).to(tl.float32)
        tl.store(DX + offset + cols, dx.to(DX.dtype.element_ty), mask=rmask)
        dw_acc += dy * xhat
        if HAS_BIAS:
            db_acc += dy
    tl.store(DW_PARTIAL + pid * N + cols, dw_acc, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid * N + cols, db_acc, mask=mask)


def _block(n: int) -> int:
    return triton.next_power_of_2(n)


def _warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


def add_norm_forward(x: torch.Tensor, residual: Optional[torch.Tensor], add_bias: Optional[torch.Tensor],
                     weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float, rms: bool,
                     zero_centered: bool, residual_dtype: torch.dtype):
    """x, residual [M, N] contiguous -> (y [M, N] in weight's dtype, the norm input r [M, N] in
    residual_dtype (x itself when nothing is added), mean [M] fp32 (LayerNorm), rstd [M] fp32)."""
    rows, n = x.shape
    store_residual = residual is not None or add_bias is not None
    r = torch.empty((rows, n), dtype=residual_dtype, device=x.device) if store_residual else x
    y = torch.empty((rows, n), dtype=weight.dtype, device=x.device)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    block = _block(n)
    _add_norm_fwd_kernel[(rows,)](
        x, residual if residual is not None else x, add_bias if add_bias is not None else x, r, weight,
        bias if bias is not None else weight, y, mean, rstd, n, eps,
        HAS_RESIDUAL=residual is not None, HAS_ADD_BIAS=add_bias is not None, STORE_RESIDUAL=store_residual,
        HAS_BIAS=bias is not None, IS_RMS=rms, ZERO_CENTERED=zero_centered, BLOCK_N=block,
        num_warps=_warps(block))
    return y, r, mean, rstd


def _num_programs(rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 4 * sms))
    return max(1, min(rows, 4))  # the Triton interpreter (CPU tests)


def add_norm_backward(r: torch.Tensor, dy: torch.Tensor, dres: Optional[torch.Tensor], weight: torch.Tensor,
                      has_bias: bool, mean: torch.Tensor, rstd: torch.Tensor, rms: bool, zero_centered: bool):
    """-> (dr [M, N] in r's dtype (d(norm input), plus d(new residual)), dweight, dbias or None)."""
    rows, n = r.shape
    dx = torch.empty_like(r)
    programs = _num_programs(rows, r.device)
    rows_per_program = triton.cdiv(rows, programs)
    dw_partial = torch.empty((programs, n), dtype=torch.float32, device=r.device)
    db_partial = torch.empty((programs, n), dtype=torch.float32, device=r.device) if has_bias else dw_partial
    block = _block(n)
    _add_norm_bwd_kernel[(programs,)](
        r, dy, dres if dres is not None else dy, weight, mean, rstd, dx, dw_partial, db_partial, rows, n,
        HAS_DRES=dres is not None, HAS_BIAS=has_bias, IS_RMS=rms, ZERO_CENTERED=zero_centered,
        ROWS_PER_PROGRAM=rows_per_program, BLOCK_N=block, num_warps=_warps(block))
    dweight = dw_partial.sum(0).to(weight.dtype)
    dbias = db_partial.sum(0).to(weight.dtype) if has_bias else None
    return dx, dweight, dbias
