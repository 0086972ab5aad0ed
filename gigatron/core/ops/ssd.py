"""The SSD selective state-space scan of Mamba-2: a sequential reference, a chunked plain-PyTorch
path (CPU, differentiable by autograd) and Triton kernels for CUDA (gigatron/core/ops/ssd_triton.py).

Shape legend: b = batch, l = sequence, h = heads, p = head dim, g = groups (h % g == 0; head i uses
group i // (h / g)), n = state dim, Q = chunk length, c = number of chunks (ceil(l / Q)).

The recurrence, for every batch row, head and position t, with a state S of shape [p, n]:

    S_t = exp(dt_t * A) * S_{t-1} + dt_t * outer(x_t, B_t)
    y_t = S_t @ C_t + D * x_t

x [b, l, h, p]; dt [b, l, h] the step sizes (already softplus(dt + dt_bias), > 0); A [h] the
per-head scalar decay rate (< 0, -exp(A_log)); B, C [b, l, g, n]; D [h] the skip (or None);
initial_state [b, h, p, n] or None (zeros). Every path returns (y [b, l, h, p] in x's dtype,
final state [b, h, p, n] in fp32) and computes in fp32 (the PyTorch paths in fp64 for fp64 inputs).

The chunked form (the Mamba-2 paper's SSD algorithm) cuts the sequence into chunks of Q positions.
With cs_t the cumulative sum of dt*A inside a chunk (a chunk's total decay is exp(cs_last)):
  1. inside a chunk:  y_t += sum_{s<=t} (C_t . B_s) exp(cs_t - cs_s) dt_s x_s        (a masked GEMM)
  2. chunk states:    states_c = sum_s exp(cs_last - cs_s) dt_s outer(x_s, B_s)
  3. between chunks:  S_in[c+1] = exp(cs_last(c)) S_in[c] + states_c   (S_in[0] = initial state)
  4. from the state:  y_t += exp(cs_t) S_in[c] @ C_t
A sequence whose length is not a multiple of Q is padded with zero steps (dt = 0: no decay, no
input), which changes neither the outputs nor the final state.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from gigatron.core.ops.ssd_base import split_xbc, ssd_triton_available  # noqa: F401 - part of this module's API
from gigatron.core.ops.ssd_recompute import keep_inputs_only

__all__ = ["reference_ssd_scan", "chunked_ssd_scan", "ssd_scan", "conv_ssd_scan", "split_xbc",
           "ssd_triton_available", "ssd_flops", "DEFAULT_CHUNK_SIZE"]

# Megatron-Core's MambaMixer chunk size.
DEFAULT_CHUNK_SIZE = 128


def _check_shapes(x, dt, A, B, C, D, initial_state) -> None:
    if x.dim() != 4:
        raise ValueError(f"ssd scan: x must be [b, l, h, p], got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if dt.shape != (b, l, h):
        raise ValueError(f"ssd scan: dt must be [b, l, h] = {(b, l, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"ssd scan: A must be [h] = {(h,)}, got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, l) or B.shape != C.shape:
        raise ValueError(f"ssd scan: B and C must be [b, l, g, n] with b, l = {(b, l)}, got "
                         f"{tuple(B.shape)} and {tuple(C.shape)}")
    if h % B.shape[2] != 0:
        raise ValueError(f"ssd scan: the heads ({h}) must be divisible by the groups ({B.shape[2]})")
    if D is not None and D.shape != (h,):
        raise ValueError(f"ssd scan: D must be [h] = {(h,)}, got {tuple(D.shape)}")
    if initial_state is not None and initial_state.shape != (b, h, p, B.shape[3]):
        raise ValueError(f"ssd scan: initial_state must be [b, h, p, n] = {(b, h, p, B.shape[3])}, got "
                         f"{tuple(initial_state.shape)}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs (so that the reference can serve as an fp64 oracle)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _to_heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """[b, l, g, n] -> [b, l, h, n], each group repeated for its heads."""
    return t.repeat_interleave(h // t.shape[2], dim=2)


def reference_ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: Optional[torch.Tensor] = None, initial_state: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The recurrence step by step (the test oracle). See the module docstring for the shapes."""
    _check_shapes(x, dt, A, B, C, D, initial_state)
    b, l, h, p = x.shape
    n = B.shape[3]
    f = _compute_dtype(x)
    xf, dtf, Af = x.to(f), dt.to(f), A.to(f)
    Bh, Ch = _to_heads(B.to(f), h), _to_heads(C.to(f), h)  # [b, l, h, n]
    state = (initial_state.to(f) if initial_state is not None
             else torch.zeros(b, h, p, n, dtype=f, device=x.device))
    ys = []
    for t in range(l):
        decay = torch.exp(dtf[:, t] * Af)  # [b, h]
        inp = (dtf[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]  # [b, h, p, n]
        state = state * decay[..., None, None] + inp
        y = torch.einsum("bhpn,bhn->bhp", state, Ch[:, t])  # [b, h, p]
        if D is not None:
            y = y + D.to(f)[:, None] * xf[:, t]
        ys.append(y)
    return torch.stack(ys, dim=1).to(x.dtype), state  # [b, l, h, p], [b, h, p, n]


def chunked_ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                     D: Optional[torch.Tensor] = None, initial_state: Optional[torch.Tensor] = None,
                     chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tuple[torch.Tensor, torch.Tensor]:
    """The chunked SSD algorithm in plain PyTorch (batched GEMMs per chunk and a loop over chunks);
    differentiable by autograd. See the module docstring."""
    _check_shapes(x, dt, A, B, C, D, initial_state)
    if chunk_size < 1:
        raise ValueError(f"ssd scan: chunk_size must be >= 1, got {chunk_size}")
    b, l, h, p = x.shape
    n = B.shape[3]
    Q = chunk_size
    nc = -(-l // Q)
    pad = nc * Q - l
    f = _compute_dtype(x)
    xf, dtf = x.to(f), dt.to(f)
    Bh, Ch = _to_heads(B.to(f), h), _to_heads(C.to(f), h)  # [b, l, h, n]
    if pad:
        xf = F.pad(xf, (0, 0, 0, 0, 0, pad))  # [b, c*Q, h, p]
        dtf = F.pad(dtf, (0, 0, 0, pad))  # [b, c*Q, h]
        Bh = F.pad(Bh, (0, 0, 0, 0, 0, pad))  # [b, c*Q, h, n]
        Ch = F.pad(Ch, (0, 0, 0, 0, 0, pad))
    xc = xf.view(b, nc, Q, h, p)  # [b, c, Q, h, p]
    Bc = Bh.view(b, nc, Q, h, n)  # [b, c, Q, h, n]
    Cc = Ch.view(b, nc, Q, h, n)
    dtc = dtf.view(b, nc, Q, h).permute(0, 3, 1, 2)  # [b, h, c, Q]
    cs = torch.cumsum(dtc * A.to(f)[None, :, None, None], dim=-1)  # [b, h, c, Q]
    u = xc * dtc.permute(0, 2, 3, 1)[..., None]  # [b, c, Q, h, p]: dt_s x_s

    # 1. inside each chunk: (C B^T) masked by the causal decay exp(cs_t - cs_s), s <= t.
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    segment = (cs[..., :, None] - cs[..., None, :]).masked_fill(~causal, float("-inf"))  # [b, h, c, Q, Q]
    scores = torch.einsum("bcthn,bcshn->bhcts", Cc, Bc) * torch.exp(segment)  # [b, h, c, Q, Q]
    y = torch.einsum("bhcts,bcshp->bcthp", scores, u)  # [b, c, Q, h, p]

    # 2. each chunk's contribution to the state at its end.
    to_end = torch.exp(cs[..., -1:] - cs)  # [b, h, c, Q]
    states = torch.einsum("bcshn,bhcs,bcshp->bchpn", Bc, to_end, u)  # [b, c, h, p, n]

    # 3. the state entering each chunk, chunk by chunk.
    state = (initial_state.to(f) if initial_state is not None
             else torch.zeros(b, h, p, n, dtype=f, device=x.device))
    chunk_decay = torch.exp(cs[..., -1])  # [b, h, c]
    entering = []
    for c in range(nc):
        entering.append(state)
        state = state * chunk_decay[:, :, c, None, None] + states[:, c]  # [b, h, p, n]
    s_in = torch.stack(entering, dim=1)  # [b, c, h, p, n]

    # 4. the entering state read out by C, decayed to each position.
    y = y + torch.einsum("bcthn,bchpn,bhct->bcthp", Cc, s_in, torch.exp(cs))  # [b, c, Q, h, p]
    if D is not None:
        y = y + D.to(f)[:, None] * xc
    y = y.reshape(b, nc * Q, h, p)[:, :l]  # [b, l, h, p]
    return y.to(x.dtype), state




def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             D: Optional[torch.Tensor] = None, initial_state: Optional[torch.Tensor] = None,
             chunk_size: int = DEFAULT_CHUNK_SIZE, kernel: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan: (y [b, l, h, p], final state [b, h, p, n] fp32).

    kernel: "auto" (Triton on CUDA tensors when Triton is installed, else the chunked PyTorch path),
    "triton", "chunked" or "reference" (the sequential recurrence). The Triton and chunked paths
    keep only their inputs for backward (x, dt, A, B, C, D, initial_state) and recompute the rest
    there; the chunked path through gigatron/core/ops/ssd_recompute.py, with gradients bitwise
    those of chunked_ssd_scan's own autograd graph."""
    if kernel == "auto":
        kernel = "triton" if x.is_cuda and ssd_triton_available() else "chunked"
    if kernel == "triton":
        if not x.is_cuda:
            raise ValueError("ssd scan: the Triton kernel needs CUDA tensors; use kernel='chunked' on the CPU")
        if not ssd_triton_available():
            raise ValueError("ssd scan: kernel='triton' needs Triton (pip install triton); use kernel='chunked'")
        from gigatron.core.ops.ssd_triton import triton_ssd_scan
        _check_shapes(x, dt, A, B, C, D, initial_state)
        return triton_ssd_scan(x, dt, A, B, C, D, initial_state, chunk_size)
    if kernel == "chunked":
        # Keeps the inputs only (x, B, C stay views of the conv1d output), as the Triton scan does,
        # instead of the per-chunk decay and score matrices; they are recomputed in backward.
        _check_shapes(x, dt, A, B, C, D, initial_state)
        return keep_inputs_only(functools.partial(chunked_ssd_scan, chunk_size=chunk_size), x, dt, A, B, C, D,
                                initial_state)
    if kernel == "reference":
        return reference_ssd_scan(x, dt, A, B, C, D, initial_state)
    raise ValueError(f"ssd scan: kernel {kernel!r} is not one of auto, triton, chunked, reference")




def _conv_then_chunked(xbc, weight, bias, dt, A, D, sizes, chunk_size):
    from gigatron.core.ops.causal_conv1d import reference_causal_conv1d

    x, B, C = split_xbc(reference_causal_conv1d(xbc, weight, bias, silu=True), *sizes)
    return chunked_ssd_scan(x, dt, A, B, C, D, chunk_size=chunk_size)[0]


def conv_ssd_scan(xbc: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dt: torch.Tensor,
                  A: torch.Tensor, D: Optional[torch.Tensor], sizes: Tuple[int, int, int, int],
                  chunk_size: int = DEFAULT_CHUNK_SIZE, kernel: str = "auto") -> torch.Tensor:
    """The Mamba mixer's training path from the in_proj output to the scan: x, B, C =
    split(silu(causal conv1d(xbc))), then y = ssd_scan(x, dt, A, B, C, D) from zero states.
    xbc [b, l, H P + 2 G N] (any strides), weight [H P + 2 G N, W], bias, dt [b, l, H] (after
    softplus), A, D [H], sizes = (H, P, G, N) -> y [b, l, H, P].

    Keeps only its inputs for backward (xbc is a view of the in_proj output in the mixer): the
    convolution's output is made again in backward (one memory-bound pass) instead of being kept.
    kernel: "auto" (Triton on CUDA tensors when Triton is installed, else "chunked"), "triton" or
    "chunked" (reference_causal_conv1d and chunked_ssd_scan, recomputed through
    gigatron/core/ops/ssd_recompute.py: gradients bitwise those of the plain ops)."""
    if kernel == "auto":
        kernel = "triton" if xbc.is_cuda and ssd_triton_available() else "chunked"
    if kernel == "triton":
        if not xbc.is_cuda or not ssd_triton_available():
            raise ValueError("conv_ssd_scan: the Triton kernels need CUDA tensors and Triton; use kernel='chunked'")
        from gigatron.core.ops.ssd_triton import triton_conv_ssd_scan
        return triton_conv_ssd_scan(xbc, weight, bias, dt, A, D, sizes, chunk_size)
    if kernel == "chunked":
        return keep_inputs_only(functools.partial(_conv_then_chunked, sizes=tuple(sizes), chunk_size=chunk_size),
                                xbc, weight, bias, dt, A, D)
    raise ValueError(f"conv_ssd_scan: kernel {kernel!r} is not one of auto, triton, chunked")


def ssd_flops(batch: int, seq: int, heads: int, head_dim: int, state_dim: int,
              chunk_size: int = DEFAULT_CHUNK_SIZE, backward: bool = True) -> int:
    """Matrix FLOPs of the chunked scan (2 per multiply-add), forward (+ backward = 2x forward):
    per chunk and head, C B^T (2 Q^2 n), its product with x (2 Q^2 p), the chunk state (2 Q p n)
    and the state read-out (2 Q p n); the causal half of the Q x Q products is counted in full,
    as the kernels compute it."""
    nc = -(-seq // chunk_size)
    q = chunk_size
    forward = batch * heads * nc * (2 * q * q * state_dim + 2 * q * q * head_dim + 4 * q * head_dim * state_dim)
    return forward * (3 if backward else 1)
