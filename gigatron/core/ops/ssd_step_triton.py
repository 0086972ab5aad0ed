"""Triton kernels of the Mamba-2 decode step (gigatron/core/ops/ssd_step.py holds the definition
and the reference). Imported only where Triton is installed.

Shape legend: b = rows, C = conv channels, K = conv kernel width, H = heads, P = head dim,
G = groups, N = state dim.

1. conv step, one program per (row, block of channels): reads the K-1 cached inputs and the new
   one, writes silu(window . weight + bias) in the input's dtype and shifts the window in place.
2. state step, one program per (row, head, block of head dim): reads its x, its group's B and C
   and dt, updates its [block, N] slice of the fp32 state in place and writes y = h C + D x.
Each program owns the cache entries it rewrites, so the in-place updates need no synchronisation.
3. gated RMSNorm, one program per (row, group of channels): rmsnorm(y * silu(z)) * weight.
softplus is computed as log1p(exp(v)) with Goldberg's log1p (accurate for small exp(v)), and v
itself above 20, as torch's softplus.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["triton_mamba_decode_step", "triton_gated_rmsnorm"]

BLOCK_C = 128
BLOCK_P = 32


@triton.jit
def _conv_step_kernel(X, stride_xb, stride_xc, STATE, stride_sb, stride_sc, stride_sk, W, BIAS, OUT, stride_ob,
                      FRESH, KEEP, channels,
                      K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_FRESH: tl.constexpr,
                      HAS_KEEP: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = offs < channels
    offs_k = tl.arange(0, KP)
    in_state = offs_k < K - 1
    x_new = tl.load(X + b * stride_xb + offs * stride_xc, mask=mask, other=0.0)
    base = STATE + b * stride_sb + offs[:, None] * stride_sc
    cached = tl.load(base + offs_k[None, :] * stride_sk, mask=mask[:, None] & in_state[None, :], other=0.0)
    following = tl.load(base + (offs_k[None, :] + 1) * stride_sk,
                        mask=mask[:, None] & (offs_k[None, :] + 1 < K - 1), other=0.0)
    if HAS_FRESH:
        fresh = tl.load(FRESH + b) != 0
        cached = tl.where(fresh, 0.0, cached)
        following = tl.where(fresh, 0.0, following)
    w_cached = tl.load(W + offs[:, None] * K + offs_k[None, :], mask=mask[:, None] & in_state[None, :], other=0.0)
    w_new = tl.load(W + offs * K + (K - 1), mask=mask, other=0.0)
    acc = tl.sum(cached.to(tl.float32) * w_cached.to(tl.float32), axis=1) + x_new.to(tl.float32) * w_new.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs, mask=mask, other=0.0).to(tl.float32)
    acc = acc * tl.sigmoid(acc)
    tl.store(OUT + b * stride_ob + offs, acc.to(OUT.dtype.element_ty), mask=mask)
    write = mask
    if HAS_KEEP:
        write = write & (tl.load(KEEP + b) == 0)
    shifted = tl.where(offs_k[None, :] == K - 2, x_new[:, None].to(following.dtype), following)
    tl.store(base + offs_k[None, :] * stride_sk, shifted.to(STATE.dtype.element_ty),
             mask=write[:, None] & in_state[None, :])


@triton.jit
def _state_step_kernel(CONV, stride_cb, DT, stride_db, stride_dh, SSM, stride_mb, stride_mh, stride_mp, stride_mn,
                       A_LOG, D, DT_BIAS, Y, stride_yb, FRESH, KEEP,
                       H: tl.constexpr, P: tl.constexpr, G: tl.constexpr, N: tl.constexpr,
                       HAS_FRESH: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < P
    mask_n = offs_n < N
    g = h // (H // G)
    row = CONV + b * stride_cb
    x = tl.load(row + h * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    bv = tl.load(row + H * P + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    cv = tl.load(row + H * P + G * N + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    v = tl.load(DT + b * stride_db + h * stride_dh).to(tl.float32) + tl.load(DT_BIAS + h).to(tl.float32)
    e = tl.exp(tl.minimum(v, 20.0))
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    dt = tl.where(v > 20.0, v, log1p)
    decay = tl.exp(dt * -tl.exp(tl.load(A_LOG + h).to(tl.float32)))
    ptrs = SSM + b * stride_mb + h * stride_mh + offs_p[:, None] * stride_mp + offs_n[None, :] * stride_mn
    mask = mask_p[:, None] & mask_n[None, :]
    state = tl.load(ptrs, mask=mask, other=0.0)
    if HAS_FRESH:
        state = tl.where(tl.load(FRESH + b) != 0, 0.0, state)
    state = state * decay + (dt * x)[:, None] * bv[None, :]
    y = tl.sum(state * cv[None, :], axis=1) + tl.load(D + h).to(tl.float32) * x
    tl.store(Y + b * stride_yb + h * P + offs_p, y.to(Y.dtype.element_ty), mask=mask_p)
    if HAS_KEEP:
        mask = mask & (tl.load(KEEP + b) == 0)
    tl.store(ptrs, state, mask=mask)


def triton_mamba_decode_step(xbc: torch.Tensor, dt: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                             bias: Optional[torch.Tensor], ssm_state: torch.Tensor, A_log: torch.Tensor,
                             D: torch.Tensor, dt_bias: torch.Tensor, groups: int,
                             fresh: Optional[torch.Tensor] = None, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """See gigatron/core/ops/ssd_step.py (shapes checked there)."""
    b, channels = xbc.shape
    h = dt.shape[1]
    p, n = ssm_state.shape[2], ssm_state.shape[3]
    k = weight.shape[1]
    weight = weight.contiguous()
    conv = torch.empty(b, channels, dtype=xbc.dtype, device=xbc.device)
    y = torch.empty(b, h * p, dtype=xbc.dtype, device=xbc.device)
    dummy = conv  # never read where the matching HAS_* flag is off
    fresh_arg = fresh.to(torch.int8) if fresh is not None else dummy
    keep_arg = keep.to(torch.int8) if keep is not None else dummy
    _conv_step_kernel[(b, triton.cdiv(channels, BLOCK_C))](
        xbc, xbc.stride(0), xbc.stride(1), conv_state, conv_state.stride(0), conv_state.stride(1),
        conv_state.stride(2), weight, bias if bias is not None else dummy, conv, conv.stride(0),
        fresh_arg, keep_arg, channels,
        K=k, KP=triton.next_power_of_2(max(k - 1, 1)), HAS_BIAS=bias is not None, HAS_FRESH=fresh is not None,
        HAS_KEEP=keep is not None, BLOCK_C=BLOCK_C)
    _state_step_kernel[(b, h, triton.cdiv(p, BLOCK_P))](
        conv, conv.stride(0), dt, dt.stride(0), dt.stride(1), ssm_state, ssm_state.stride(0), ssm_state.stride(1),
        ssm_state.stride(2), ssm_state.stride(3), A_log, D, dt_bias, y, y.stride(0), fresh_arg, keep_arg,
        H=h, P=p, G=groups, N=n, HAS_FRESH=fresh is not None, HAS_KEEP=keep is not None,
        BLOCK_P=BLOCK_P, BLOCK_N=triton.next_power_of_2(n))
    return y


@triton.jit
def _gated_norm_kernel(Y, stride_yb, Z, stride_zb, W, OUT, stride_ob, eps, GS: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * GS + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < GS
    y = tl.load(Y + b * stride_yb + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(Z + b * stride_zb + offs, mask=mask, other=0.0).to(tl.float32)
    g = y * (z * tl.sigmoid(z))
    inv = tl.rsqrt(tl.sum(g * g, axis=0) / GS + eps)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + b * stride_ob + offs, (g * inv * w).to(OUT.dtype.element_ty), mask=mask)


def triton_gated_rmsnorm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int,
                         eps: float) -> torch.Tensor:
    """See gigatron/core/ops/ssd_step.py: y, z [b, I] (last dim contiguous) -> [b, I]."""
    b, width = y.shape
    if y.stride(1) != 1 or z.stride(1) != 1:
        y, z = y.contiguous(), z.contiguous()
    out = torch.empty(b, width, dtype=y.dtype, device=y.device)
    _gated_norm_kernel[(b, width // group_size)](y, y.stride(0), z, z.stride(0), weight.contiguous(), out,
                                                 out.stride(0), eps, GS=group_size,
                                                 BLOCK=triton.next_power_of_2(group_size))
    return out
