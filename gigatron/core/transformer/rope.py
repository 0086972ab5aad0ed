"""Rotary position embeddings (RoPE), Megatron's variants.

Shape legend: s = sequence, b = batch, n = heads, d = head dim, r = rotary dim
(= int(d * rotary_percent)).

The rotary dim r is split into r/2 frequency pairs with inv_freq[i] = base^(-2i/r).
- half-split (default, HuggingFace/Llama layout): channel i pairs with channel i + r/2;
- interleaved (--rotary-interleaved): channel 2i pairs with channel 2i + 1.
Channels r..d pass through unrotated. --rotary-seq-len-interpolation-factor divides the positions.
--use-rope-scaling rescales the frequencies as Llama 3.1 does (`llama3_scaled_inv_freq`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["RotaryEmbedding", "apply_rotary_pos_emb", "rotate_half", "llama3_scaled_inv_freq"]

# Llama 3.1's fixed constants of its frequency scaling (Megatron hard-codes the same).
LLAMA3_ORIGINAL_CONTEXT = 8192
LLAMA3_LOW_FREQ_FACTOR = 1.0
LLAMA3_HIGH_FREQ_FACTOR = 4.0


def llama3_scaled_inv_freq(inv_freq: torch.Tensor, factor: float,
                           original_context: int = LLAMA3_ORIGINAL_CONTEXT,
                           low_freq_factor: float = LLAMA3_LOW_FREQ_FACTOR,
                           high_freq_factor: float = LLAMA3_HIGH_FREQ_FACTOR) -> torch.Tensor:
    """Llama 3.1's rotary frequency scaling: a frequency whose wavelength (2 pi / f) is longer than
    original_context / low_freq_factor is divided by `factor`, one shorter than
    original_context / high_freq_factor is kept, and in between the two are blended linearly in
    original_context / wavelength."""
    wavelength = 2 * math.pi / inv_freq
    long_limit = original_context / low_freq_factor
    short_limit = original_context / high_freq_factor
    blend = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - blend) * inv_freq / factor + blend * inv_freq
    scaled = torch.where(wavelength > long_limit, inv_freq / factor, inv_freq)
    in_between = (wavelength >= short_limit) & (wavelength <= long_limit)
    return torch.where(in_between, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Produces the rotation angles: forward(seq_len | position_ids) -> freqs [s, 1 | b, 1, r] (fp32)."""

    def __init__(self, kv_channels: int, rotary_percent: float = 1.0, rotary_base: float = 10000,
                 rotary_interleaved: bool = False, seq_len_interpolation_factor: Optional[float] = None,
                 device=None, rope_scaling: bool = False, rope_scaling_factor: float = 8.0):
        super().__init__()
        dim = int(kv_channels * rotary_percent)
        if dim < 2 or dim % 2:
            raise ValueError(f"rotary dim {dim} (kv_channels {kv_channels} x rotary_percent {rotary_percent}) "
                             "must be an even number >= 2")
        self.dim = dim
        self.interleaved = rotary_interleaved
        self.seq_len_interpolation_factor = seq_len_interpolation_factor
        inv_freq = 1.0 / (rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        if rope_scaling:
            inv_freq = llama3_scaled_inv_freq(inv_freq, rope_scaling_factor)
        # Kept out of the state dict (Megatron does not checkpoint it) and recomputed on load.
        self.register_buffer("inv_freq", inv_freq.float().to(device), persistent=False)

    def _angles(self, positions: torch.Tensor) -> torch.Tensor:
        positions = positions.to(torch.float32)
        if self.seq_len_interpolation_factor is not None:
            positions = positions / self.seq_len_interpolation_factor
        freqs = positions.unsqueeze(-1) * self.inv_freq.to(positions.device)  # [..., r/2]
        if self.interleaved:
            return torch.stack((freqs, freqs), dim=-1).flatten(-2)  # [..., r]: f0 f0 f1 f1 ...
        return torch.cat((freqs, freqs), dim=-1)  # [..., r]: f0 f1 ... f0 f1 ...

    def forward(self, seq_len: int, position_ids: Optional[torch.Tensor] = None,
                offset: int = 0) -> torch.Tensor:
        if position_ids is None:
            positions = torch.arange(offset, offset + seq_len, device=self.inv_freq.device)
            return self._angles(positions)[:, None, None, :]  # [s, 1, 1, r]
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be [b, s], got shape {tuple(position_ids.shape)}")
        return self._angles(position_ids).transpose(0, 1)[:, :, None, :]  # [b, s, r] -> [s, b, 1, r]


def rotate_half(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The partner of each channel, negated on the first of the pair: [..., r] -> [..., r]."""
    if interleaved:
        x1 = x[..., 0::2]
        x2 = x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)  # [..., r/2, 2] -> [..., r]
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate the first r channels of t [s, b, n, d] by the angles freqs [s, 1 | b, 1, r].

    Computed in fp32 and returned in t's dtype."""
    rot_dim = freqs.shape[-1]
    t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    cos = torch.cos(freqs)
    sin = torch.sin(freqs)
    t_rot_f = t_rot.float()
    rotated = t_rot_f * cos + rotate_half(t_rot_f, interleaved) * sin
    rotated = rotated.to(t.dtype)
    if t_pass.shape[-1] == 0:
        return rotated
    return torch.cat((rotated, t_pass), dim=-1)
