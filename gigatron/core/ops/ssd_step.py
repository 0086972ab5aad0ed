"""One decode step of the Mamba-2 mixer's recurrence (one new token per row), from its cached
states: the short causal convolution's window update and the SSD state update.

Shape legend: b = rows, C = conv channels (I + 2GN), K = conv kernel width, H = heads, P = head
dim, G = groups (head i uses group i // (H / G)), N = state dim, I = H * P.

    window = [conv_state, xbc]                       [b, C, K]   (the K-1 cached inputs, then the new one)
    xBC    = silu(sum_k window[.., k] * weight[:, k] + bias), rounded to xbc's dtype
    x, B, C = split xBC                              [b, H, P], [b, G, N], [b, G, N]
    dt     = softplus(dt_raw + dt_bias)              [b, H]
    h      = exp(dt * A) * h + dt * outer(x, B)      [b, H, P, N]   (A = -exp(A_log); fp32)
    y      = h @ C + D * x                           [b, H, P] -> [b, I] in xbc's dtype
    conv_state <- window[..., 1:]

which is one position of gigatron/core/ops/causal_conv1d.py and gigatron/core/ops/ssd.py (the
state h is the scan's state S_t). The mixer then applies its gated RMSNorm to y and z
(gated_rmsnorm: rmsnorm(y * silu(z)) * weight per group of channels, also one Triton kernel on
CUDA in place of about ten ops). Rows where `fresh` is set start from zero states (a new
sequence); rows where `keep` is set leave their states as they were (their output is computed but
meaningless). The states are updated in place.

reference_mamba_decode_step is plain PyTorch (the CPU path and the test oracle); on CUDA with
Triton installed mamba_decode_step runs gigatron/core/ops/ssd_step_triton.py: one kernel for the
convolution of all channels and one for the state update of every (row, head), instead of about
twenty PyTorch ops (under torch.compile the reference runs, which Inductor fuses itself).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["reference_mamba_decode_step", "mamba_decode_step", "reference_gated_rmsnorm", "gated_rmsnorm"]


def _check(xbc, dt, conv_state, weight, bias, ssm_state, A_log, D, dt_bias, groups):
    b, c = xbc.shape
    if conv_state.shape[:2] != (b, c) or weight.shape != (c, conv_state.shape[2] + 1):
        raise ValueError(f"mamba step: conv_state must be [b, C, K-1] = {(b, c)} + (K-1,) and weight [C, K], got "
                         f"{tuple(conv_state.shape)} and {tuple(weight.shape)}")
    h = dt.shape[1]
    if dt.shape != (b, h) or ssm_state.dim() != 4 or ssm_state.shape[:2] != (b, h):
        raise ValueError(f"mamba step: dt must be [b, H] and ssm_state [b, H, P, N], got {tuple(dt.shape)} and "
                         f"{tuple(ssm_state.shape)}")
    p, n = ssm_state.shape[2], ssm_state.shape[3]
    if h % groups != 0 or c != h * p + 2 * groups * n:
        raise ValueError(f"mamba step: {c} conv channels do not hold x [H*P = {h * p}] and B, C [G*N = {groups * n}] "
                         f"each, or {h} heads are not divisible by {groups} groups")
    for name, t in (("A_log", A_log), ("D", D), ("dt_bias", dt_bias)):
        if t.shape != (h,):
            raise ValueError(f"mamba step: {name} must be [H] = {(h,)}, got {tuple(t.shape)}")
    if bias is not None and bias.shape != (c,):
        raise ValueError(f"mamba step: bias must be [C] = {(c,)}, got {tuple(bias.shape)}")
    if ssm_state.dtype != torch.float32:
        raise ValueError(f"mamba step: the ssm state is kept in fp32, got {ssm_state.dtype}")


def reference_mamba_decode_step(xbc: torch.Tensor, dt: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                                bias: Optional[torch.Tensor], ssm_state: torch.Tensor, A_log: torch.Tensor,
                                D: torch.Tensor, dt_bias: torch.Tensor, groups: int,
                                fresh: Optional[torch.Tensor] = None, keep: Optional[torch.Tensor] = None
                                ) -> torch.Tensor:
    """The step in plain PyTorch (see the module docstring): xbc [b, C], dt [b, H] (before
    softplus and dt_bias), conv_state [b, C, K-1], weight [C, K], bias [C] | None, ssm_state
    [b, H, P, N] fp32, A_log, D, dt_bias [H], fresh / keep [b] bool | None -> y [b, H*P]."""
    _check(xbc, dt, conv_state, weight, bias, ssm_state, A_log, D, dt_bias, groups)
    b, h = dt.shape
    p, n = ssm_state.shape[2], ssm_state.shape[3]
    conv0, ssm0 = conv_state, ssm_state
    if fresh is not None:
        conv0 = torch.where(fresh[:, None, None], torch.zeros((), dtype=conv_state.dtype, device=xbc.device), conv0)
        ssm0 = torch.where(fresh[:, None, None, None], torch.zeros((), device=xbc.device), ssm0)
    window = torch.cat([conv0.float(), xbc.float()[..., None]], dim=-1)  # [b, C, K]
    conv = (window * weight.float()).sum(-1)  # [b, C]
    if bias is not None:
        conv = conv + bias.float()
    conv = F.silu(conv).to(xbc.dtype)
    x = conv[:, : h * p].float().view(b, h, p)
    B = conv[:, h * p: h * p + groups * n].float().view(b, groups, n).repeat_interleave(h // groups, dim=1)  # [b, H, N]
    C = conv[:, h * p + groups * n:].float().view(b, groups, n).repeat_interleave(h // groups, dim=1)
    step = F.softplus(dt.float() + dt_bias.float())  # [b, H]
    decay = torch.exp(step * -torch.exp(A_log.float()))  # [b, H]
    state = ssm0 * decay[..., None, None] + (step[..., None] * x)[..., None] * B[:, :, None, :]  # [b, H, P, N]
    y = torch.einsum("bhpn,bhn->bhp", state, C) + D.float()[:, None] * x  # [b, H, P]
    new_conv = window[..., 1:].to(conv_state.dtype)
    if keep is not None:
        new_conv = torch.where(keep[:, None, None], conv_state, new_conv)
        state = torch.where(keep[:, None, None, None], ssm_state, state)
    conv_state.copy_(new_conv)
    ssm_state.copy_(state)
    return y.to(xbc.dtype).reshape(b, h * p)


def mamba_decode_step(xbc: torch.Tensor, dt: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor], ssm_state: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor,
                      dt_bias: torch.Tensor, groups: int, fresh: Optional[torch.Tensor] = None,
                      keep: Optional[torch.Tensor] = None, kernel: str = "auto") -> torch.Tensor:
    """The decode step; kernel: "auto" (Triton on CUDA tensors when Triton is installed and not
    under torch.compile, else the reference), "triton" or "reference"."""
    if kernel == "auto":
        kernel = "reference"
        if xbc.is_cuda and not torch.compiler.is_compiling():
            from gigatron.core.ops.ssd_base import ssd_triton_available
            kernel = "triton" if ssd_triton_available() else "reference"
    if kernel == "reference":
        return reference_mamba_decode_step(xbc, dt, conv_state, weight, bias, ssm_state, A_log, D, dt_bias, groups,
                                           fresh, keep)
    if kernel == "triton":
        _check(xbc, dt, conv_state, weight, bias, ssm_state, A_log, D, dt_bias, groups)
        from gigatron.core.ops.ssd_step_triton import triton_mamba_decode_step
        return triton_mamba_decode_step(xbc, dt, conv_state, weight, bias, ssm_state, A_log, D, dt_bias, groups,
                                        fresh, keep)
    raise ValueError(f"mamba step: kernel {kernel!r} is not one of auto, triton, reference")


def reference_gated_rmsnorm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int,
                            eps: float = 1e-5) -> torch.Tensor:
    """rmsnorm(y * silu(z)) * weight over each group of `group_size` channels of the last dim;
    computed in fp32, returned in y's dtype. [..., I] -> [..., I] (the Mamba mixer's output norm)."""
    g = (y.float() * F.silu(z.float()))
    grouped = g.unflatten(-1, (g.shape[-1] // group_size, group_size))  # [..., I/gs, gs]
    normed = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return (normed.flatten(-2) * weight.float()).to(y.dtype)


def gated_rmsnorm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float = 1e-5,
                  kernel: str = "auto") -> torch.Tensor:
    """The gated RMSNorm of rows y, z [b, I] (z may be a strided view) -> [b, I]; kernel: "auto"
    (Triton on CUDA tensors when Triton is installed and not under torch.compile, else the
    reference), "triton" or "reference"."""
    if kernel == "auto":
        kernel = "reference"
        if y.is_cuda and not torch.compiler.is_compiling():
            from gigatron.core.ops.ssd_base import ssd_triton_available
            kernel = "triton" if ssd_triton_available() else "reference"
    if kernel == "reference":
        return reference_gated_rmsnorm(y, z, weight, group_size, eps)
    if kernel == "triton":
        if y.dim() != 2 or z.shape != y.shape or weight.shape != (y.shape[1],) or y.shape[1] % group_size:
            raise ValueError(f"gated norm: y and z must be [b, I] and weight [I] with I divisible by {group_size}, "
                             f"got {tuple(y.shape)}, {tuple(z.shape)} and {tuple(weight.shape)}")
        from gigatron.core.ops.ssd_step_triton import triton_gated_rmsnorm
        return triton_gated_rmsnorm(y, z, weight, group_size, eps)
    raise ValueError(f"gated norm: kernel {kernel!r} is not one of auto, triton, reference")
