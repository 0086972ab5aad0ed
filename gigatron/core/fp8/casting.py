"""FP8 formats, scales and saturating casts.

Convention (Transformer Engine's): a tensor x is stored as q = saturate(x * scale) in FP8 and read
back as q * scale_inv with scale_inv = 1 / scale. `saturate` clamps to the format's largest finite
value (E4M3: 448, E5M2: 57344) before the cast, so an amax larger than the one the scale was made
for (delayed scaling) never turns into NaN or inf.

Shapes for block scaling (the contraction dimension is always the last one, K):
    x [R, K]  1x128 tiles  -> scale_inv [R, ceil(K/128)]                 (activations, gradients)
    w [R, K]  128x128      -> scale_inv [ceil(R/128), ceil(K/128)]       (weights)
Partial tiles at the edges are scaled by their own amax (as if zero-padded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
BLOCK = 128

__all__ = [
    "E4M3",
    "E5M2",
    "FP8_MAX",
    "BLOCK",
    "Quantized",
    "format_dtypes",
    "amax",
    "scale_from_amax",
    "saturating_cast",
    "quantize_tensorwise",
    "quantize_1x128",
    "quantize_128x128",
    "dequantize",
]


def format_dtypes(fp8_format: str) -> tuple[torch.dtype, torch.dtype]:
    """(forward dtype, gradient dtype) of --fp8-format: e4m3 -> (E4M3, E4M3), hybrid -> (E4M3, E5M2)."""
    if fp8_format == "e4m3":
        return E4M3, E4M3
    if fp8_format == "hybrid":
        return E4M3, E5M2
    raise ValueError(f"--fp8-format {fp8_format!r} is not one of e4m3, hybrid")


def amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a 0-dim fp32 tensor (no host synchronisation; one pass over x); 0 for no elements."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    low, high = torch.aminmax(x)
    return torch.maximum(low.neg(), high).float()


def scale_from_amax(amax_value: torch.Tensor, fp8_max, margin: int = 0,
                    fallback: torch.Tensor | float = 1.0, power_of_two: bool = False) -> torch.Tensor:
    """scale = fp8_max / amax / 2^margin, elementwise over `amax_value` (fp32).

    `fp8_max` is a float (FP8_MAX[dtype]) or a tensor broadcasting against `amax_value`.
    Where amax is 0 or not finite the scale is `fallback` (the previous scale for delayed scaling,
    1 otherwise). The scale is kept finite (a denormal amax would give inf). `power_of_two` rounds
    the scale down to a power of two (then q * scale_inv is exact in bf16)."""
    amax_value = amax_value.float()
    scale = fp8_max / amax_value
    if margin:
        scale = scale / (2.0 ** margin)
    scale = scale.clamp(max=torch.finfo(torch.float32).max)
    if power_of_two:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    if not isinstance(fallback, torch.Tensor):
        fallback = torch.full_like(scale, fallback)
    usable = (amax_value > 0) & torch.isfinite(amax_value)
    return torch.where(usable, scale, fallback)


def saturating_cast(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """saturate(x * scale) in `fp8_dtype`; `scale` broadcasts against x (computed in fp32)."""
    limit = FP8_MAX[fp8_dtype]
    return (x.float() * scale).clamp(-limit, limit).to(fp8_dtype)


@dataclass
class Quantized:
    """An FP8 matrix [R, K] and the factors that read it back: `data * scale_inv` (broadcast by
    `layout`: "tensor" scalar, "1x128" [R, ceil(K/128)], "128x128" [ceil(R/128), ceil(K/128)])."""

    data: torch.Tensor
    scale_inv: torch.Tensor
    layout: str

    def t(self) -> "Quantized":
        """The transpose [K, R] (same factors): only for "tensor" and "128x128" layouts."""
        if self.layout == "tensor":
            return Quantized(self.data.t().contiguous(), self.scale_inv, "tensor")
        if self.layout == "128x128":
            return Quantized(self.data.t().contiguous(), self.scale_inv.t().contiguous(), "128x128")
        raise ValueError("a 1x128-tiled tensor has no transpose with the same tiles; quantize x.t() instead")


def quantize_tensorwise(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype) -> Quantized:
    """x [R, K] with one scale (0-dim fp32)."""
    return Quantized(saturating_cast(x, scale, fp8_dtype), scale.reciprocal(), "tensor")


def _padded_blocks(x: torch.Tensor, rows: int) -> tuple[torch.Tensor, int, int]:
    """x [R, K] zero-padded to [ceil(R/rows)*rows, ceil(K/128)*128]."""
    r, k = x.shape
    pad_r = (-r) % rows
    pad_k = (-k) % BLOCK
    if pad_r or pad_k:
        x = torch.nn.functional.pad(x, (0, pad_k, 0, pad_r))
    return x, r, k


def quantize_1x128(x: torch.Tensor, fp8_dtype: torch.dtype) -> Quantized:
    """x [R, K]: one power-of-two scale per 1x128 tile along K (DeepSeek-V3's activation tiles)."""
    padded, r, k = _padded_blocks(x, 1)
    tiles = padded.float().reshape(r, padded.shape[1] // BLOCK, BLOCK)  # [R, K/128, 128]
    scale = scale_from_amax(tiles.abs().amax(dim=-1), FP8_MAX[fp8_dtype], power_of_two=True)  # [R, K/128]
    data = saturating_cast(tiles, scale.unsqueeze(-1), fp8_dtype).reshape(r, padded.shape[1])[:, :k]  # [R, K]
    return Quantized(data.contiguous(), scale.reciprocal(), "1x128")


def quantize_128x128(x: torch.Tensor, fp8_dtype: torch.dtype) -> Quantized:
    """x [R, K]: one power-of-two scale per 128x128 block (DeepSeek-V3's weight blocks)."""
    padded, r, k = _padded_blocks(x, BLOCK)
    rb, kb = padded.shape[0] // BLOCK, padded.shape[1] // BLOCK
    blocks = padded.float().reshape(rb, BLOCK, kb, BLOCK)  # [R/128, 128, K/128, 128]
    scale = scale_from_amax(blocks.abs().amax(dim=(1, 3)), FP8_MAX[fp8_dtype], power_of_two=True)  # [R/128, K/128]
    data = saturating_cast(blocks, scale[:, None, :, None], fp8_dtype)  # [R/128, 128, K/128, 128]
    data = data.reshape(rb * BLOCK, kb * BLOCK)[:r, :k]  # [R, K]
    return Quantized(data.contiguous(), scale.reciprocal(), "128x128")


def _expand_factors(q: Quantized) -> torch.Tensor:
    """The per-element read-back factor of q, broadcastable to q.data [R, K]."""
    r, k = q.data.shape
    if q.layout == "tensor":
        return q.scale_inv
    if q.layout == "1x128":
        return q.scale_inv.repeat_interleave(BLOCK, dim=1)[:, :k]  # [R, K]
    if q.layout == "128x128":
        return q.scale_inv.repeat_interleave(BLOCK, dim=0).repeat_interleave(BLOCK, dim=1)[:r, :k]  # [R, K]
    raise ValueError(f"unknown FP8 scale layout {q.layout!r}")


def dequantize(q: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q.data * scale_inv in `dtype` (exact in bf16 for power-of-two block scales)."""
    return (q.data.float() * _expand_factors(q)).to(dtype)
