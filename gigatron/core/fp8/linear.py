"""y = x W^T + b with the forward GEMM and both backward GEMMs in FP8.

Shapes: x [..., K] (e.g. [s, b, K]) flattened to [M, K]; W [N, K]; y [..., N]; dy [M, N].
Every GEMM is written in one "NT" form, both operands holding the contraction dim last:

    forward  y  [M, N] = x  [M, K] . W   [N, K]^T
    dgrad    dx [M, K] = dy [M, N] . W^T [K, N]^T
    wgrad    dW [N, K] = dy^T [N, M] . x^T [K, M]^T

so one `scaled_gemm(a [M, K], b [N, K])` serves all three: `torch._scaled_mm(a, b.t())` takes the
row-major a and the column-major b.t() that Hopper's FP8 tensor cores need.

Recipes:
- tensorwise: one scale per tensor from its current amax.
- delayed: one scale per tensor kind from the layer's FP8LinearState (amax history of earlier
  steps); this step's amaxes are recorded into it (dy's in backward).
- blockwise (DeepSeek-V3): x and dy in 1x128 tiles along the contraction dim, W in 128x128
  blocks; dy^T and x^T for the weight gradient are tiled again along M from the high-precision
  tensors (x^T is quantized in forward and saved in FP8). Block scales are powers of two.
  The GEMM is `torch._scaled_mm` with 1x128 / 128x128 scales where this PyTorch and card run it
  (probed once by `FP8Recipe.for_device` on Hopper), else the blocks are dequantized (exact for
  power-of-two scales) and multiplied in bf16 on CUDA (the product rounded to bf16, as a bf16
  layer's) or in fp32 on the CPU.

`fp8_grouped_mm` (end of this module) is the same for the experts of a GroupedMLP, x [N, K] rows
grouped by expert times w [G, K, M], one scale per expert (see gigatron.core.fp8.grouped).

Saved for backward: the FP8 x (x^T for blockwise) and FP8 W, half the bytes of bf16 (with
--no-fp8-wgrad: x in its own dtype). Outputs and input gradients come in x's dtype. The weight
gradient is computed in fp32 and added into `weight.main_grad` when the weight has one (our DDP
gives every parameter one) and `accumulate_into_main_grad`; the backward then returns no weight
gradient, and DDP's post-accumulate hook still runs (it sees `.grad` None). Otherwise the
gradient is returned in the weight's dtype, as the other linear layers do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .casting import (
    BLOCK,
    FP8_MAX,
    Quantized,
    amax,
    dequantize,
    format_dtypes,
    quantize_128x128,
    quantize_1x128,
    quantize_tensorwise,
    scale_from_amax,
)
from .grouped import scaled_fp8_grouped_mm, scaled_grouped_mm_works
from .state import GRAD_OUTPUT, INPUT, WEIGHT, FP8LinearState, record_amax

__all__ = ["FP8Recipe", "fp8_linear", "fp8_grouped_mm", "quantize_weight", "scaled_gemm", "blockwise_scaled_mm_works"]


@dataclass(frozen=True)
class FP8Recipe:
    """What fp8_linear does, fixed when the model is built (a constant under torch.compile)."""

    kind: str  # tensorwise | delayed | blockwise
    fwd_dtype: torch.dtype
    bwd_dtype: torch.dtype
    wgrad_in_fp8: bool = True
    blockwise_backend: str = "dequantize"  # scaled_mm (Hopper, probed) | dequantize
    grouped_backend: str = "emulate"  # scaled_grouped_mm (Hopper, probed) | emulate: GroupedMLP experts

    @classmethod
    def for_device(cls, config, device=None) -> "FP8Recipe":
        """The recipe of an FP8Config on `device` (the blockwise GEMM path and, for tensorwise and
        delayed, the grouped experts' torch._scaled_grouped_mm path are probed on CUDA)."""
        if config.fp8_recipe not in ("tensorwise", "delayed", "blockwise"):
            raise ValueError(f"--fp8-recipe {config.fp8_recipe} has no FP8 linear here; use tensorwise, "
                             f"delayed or blockwise")
        fwd, bwd = format_dtypes(config.fp8)
        backend, grouped = "dequantize", "emulate"
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda":
            if config.fp8_recipe == "blockwise" and blockwise_scaled_mm_works(device, fwd, bwd):
                backend = "scaled_mm"
            if config.fp8_recipe != "blockwise" and scaled_grouped_mm_works(device, config.fp8_wgrad):
                grouped = "scaled_grouped_mm"
        return cls(config.fp8_recipe, fwd, bwd, config.fp8_wgrad, backend, grouped)


# ---------------------------------------------------------------------- GEMMs
def _tensorwise_scaled_mm_ok(a: Quantized, b: Quantized) -> bool:
    if a.data.device.type != "cuda":
        return True
    # cuBLASLt: K and N multiples of 16 (M free).
    return a.data.shape[1] % 16 == 0 and b.data.shape[0] % 16 == 0


def _blockwise_scaled_mm_ok(a: Quantized, b: Quantized) -> bool:
    m, k = a.data.shape
    n = b.data.shape[0]
    # Whole tiles only, and K/128 a multiple of 4 (the 128x128 scale layout cuBLASLt reads); no
    # empty operand (an expert without tokens takes the dequantized path).
    return min(m, n, k) > 0 and m % BLOCK == 0 and n % BLOCK == 0 and k % (4 * BLOCK) == 0


def _blockwise_scales(a: Quantized, b: Quantized) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale tensors in the layouts torch._scaled_mm reads for (1x128, 128x128) and (1x128, 1x128)."""
    scale_a = a.scale_inv.t().contiguous().t()  # [M, K/128], strides (1, M)
    if b.layout == "128x128":
        scale_b = b.scale_inv.contiguous().t()  # [K/128, N/128]: the [N/128, K/128] blocks transposed
    else:
        scale_b = b.scale_inv.t().contiguous()  # [K/128, N]
    return scale_a, scale_b


def scaled_gemm(a: Quantized, b: Quantized, out_dtype: torch.dtype, *, fast_accum: bool = False,
                blockwise_backend: str = "dequantize") -> torch.Tensor:
    """dequantize(a) [M, K] @ dequantize(b) [N, K]^T -> [M, N] in `out_dtype`."""
    if a.layout == "tensor" and b.layout == "tensor":
        if _tensorwise_scaled_mm_ok(a, b):
            return torch._scaled_mm(a.data, b.data.t(), a.scale_inv, b.scale_inv, out_dtype=out_dtype,
                                    use_fast_accum=fast_accum and a.data.is_cuda)
    elif (blockwise_backend == "scaled_mm" and a.layout == "1x128" and a.data.is_cuda
          and _blockwise_scaled_mm_ok(a, b)):
        scale_a, scale_b = _blockwise_scales(a, b)
        return torch._scaled_mm(a.data, b.data.t(), scale_a, scale_b, out_dtype=out_dtype)
    # Dequantized product: bf16 on CUDA (tensor cores, fp32 accumulation), fp32 on the CPU.
    compute = torch.bfloat16 if a.data.is_cuda else torch.float32
    return (dequantize(a, compute) @ dequantize(b, compute).t()).to(out_dtype)


def blockwise_scaled_mm_works(device, fwd_dtype=torch.float8_e4m3fn, bwd_dtype=torch.float8_e5m2) -> bool:
    """Whether torch._scaled_mm runs the three blockwise GEMMs of fp8_linear on `device` and agrees
    with the dequantized product (run once when a model is built; never inside a step)."""
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return False
    gen = torch.Generator(device="cpu").manual_seed(0)
    m, n, k = 256, 384, 512
    x = torch.randn(m, k, generator=gen).to(device, torch.bfloat16)
    w = torch.randn(n, k, generator=gen).to(device, torch.bfloat16)
    dy = torch.randn(m, n, generator=gen).to(device, torch.bfloat16)
    wq = quantize_128x128(w, fwd_dtype)
    cases = [(quantize_1x128(x, fwd_dtype), wq),  # forward
             (quantize_1x128(dy, bwd_dtype), wq.t()),  # dgrad
             (quantize_1x128(dy.t(), bwd_dtype), quantize_1x128(x.t(), fwd_dtype))]  # wgrad
    try:
        for a, b in cases:
            fast = scaled_gemm(a, b, torch.float32, blockwise_backend="scaled_mm")
            ref = scaled_gemm(a, b, torch.float32, blockwise_backend="dequantize")
            if not torch.allclose(fast, ref, rtol=2e-2, atol=1e-2 * ref.abs().max().item()):
                return False
    except (RuntimeError, ValueError, NotImplementedError):
        return False
    return True


# ---------------------------------------------------------------------- autograd
def _tensor_scale(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return scale_from_amax(amax(t), FP8_MAX[dtype])


def quantize_weight(weight: torch.Tensor, recipe: FP8Recipe, amax_history: Optional[torch.Tensor],
                    scale: Optional[torch.Tensor]) -> Quantized:
    """The FP8 operand of `weight` [N, K] for a forward GEMM.

    With --fp8-param-gather the distributed optimizer has already cast the weight to FP8 after its
    step (`weight.fp8_data` with `weight.fp8_scale_inv`, scaled by the weight's current amax; see
    gigatron.core.fp8.param_gather): that copy is used as it is. Otherwise the weight is cast here:
    blockwise in 128x128 blocks, delayed with the scale of the layer's amax history (recording this
    step's amax), tensorwise with its current amax."""
    cached = getattr(weight, "fp8_data", None)
    if cached is not None and recipe.kind != "blockwise":
        return Quantized(cached, weight.fp8_scale_inv, "tensor")
    if recipe.kind == "blockwise":
        return quantize_128x128(weight, recipe.fwd_dtype)
    if recipe.kind == "delayed":
        record_amax(amax_history, WEIGHT, weight)
        return quantize_tensorwise(weight, scale[WEIGHT], recipe.fwd_dtype)
    return quantize_tensorwise(weight, _tensor_scale(weight, recipe.fwd_dtype), recipe.fwd_dtype)


class _FP8LinearFunction(torch.autograd.Function):
    """forward: y = x W^T + b in FP8; backward: dgrad and wgrad GEMMs in FP8 (no communication)."""

    @staticmethod
    def forward(ctx, x, weight, bias, amax_history, scale, recipe: FP8Recipe, accumulate_into_main_grad: bool):
        in_features = x.shape[-1]
        x2 = x.reshape(-1, in_features)  # [M, K]
        fwd = recipe.fwd_dtype
        wq = quantize_weight(weight, recipe, amax_history, scale)
        if recipe.kind == "blockwise":
            xq = quantize_1x128(x2, fwd)
            y = scaled_gemm(xq, wq, x.dtype, blockwise_backend=recipe.blockwise_backend)  # [M, N]
            x_saved = quantize_1x128(x2.t(), fwd) if recipe.wgrad_in_fp8 else None  # x^T [K, M]
        else:
            if recipe.kind == "delayed":
                x_scale = scale[INPUT]
                record_amax(amax_history, INPUT, x2)
            else:
                x_scale = _tensor_scale(x2, fwd)
            xq = quantize_tensorwise(x2, x_scale, fwd)
            y = scaled_gemm(xq, wq, x.dtype, fast_accum=True)  # [M, N]
            x_saved = xq if recipe.wgrad_in_fp8 else None
        if bias is not None:
            y = y + bias.to(y.dtype)
        if x_saved is None:
            ctx.save_for_backward(x2, wq.data, wq.scale_inv)
        else:
            ctx.save_for_backward(x_saved.data, x_saved.scale_inv, wq.data, wq.scale_inv)
        ctx.w_layout = wq.layout
        ctx.x_layout = None if x_saved is None else x_saved.layout
        ctx.recipe = recipe
        ctx.amax_history, ctx.scale = amax_history, scale
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.weight_dtype = weight.dtype
        ctx.main_grad = getattr(weight, "main_grad", None) if accumulate_into_main_grad else None
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        recipe: FP8Recipe = ctx.recipe
        bwd = recipe.bwd_dtype
        if ctx.x_layout is None:
            x2, w_data, w_scale_inv = ctx.saved_tensors
            x_saved = None
        else:
            x_data, x_scale_inv, w_data, w_scale_inv = ctx.saved_tensors
            x_saved = Quantized(x_data, x_scale_inv, ctx.x_layout)
        wq = Quantized(w_data, w_scale_inv, ctx.w_layout)
        dy2 = dy.reshape(-1, dy.shape[-1])  # [M, N]
        backend = recipe.blockwise_backend

        # dgrad: dx [M, K] = dy [M, N] . W^T [K, N]^T
        if recipe.kind == "blockwise":
            dyq = quantize_1x128(dy2, bwd)
        else:
            if recipe.kind == "delayed":
                dy_scale = ctx.scale[GRAD_OUTPUT]
                record_amax(ctx.amax_history, GRAD_OUTPUT, dy2)
            else:
                dy_scale = _tensor_scale(dy2, bwd)
            dyq = quantize_tensorwise(dy2, dy_scale, bwd)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = scaled_gemm(dyq, wq.t(), dy.dtype, blockwise_backend=backend)
            grad_x = grad_x.reshape(ctx.x_shape)

        # wgrad: dW [N, K] = dy^T [N, M] . x^T [K, M]^T, in fp32
        grad_w = None
        if ctx.needs_input_grad[1]:
            if x_saved is None:
                grad_w = dy2.t().matmul(x2.to(dy2.dtype)).float()
            elif recipe.kind == "blockwise":
                dyq_t = quantize_1x128(dy2.t(), bwd)
                grad_w = scaled_gemm(dyq_t, x_saved, torch.float32, blockwise_backend=backend)
            else:
                grad_w = scaled_gemm(dyq.t(), x_saved.t(), torch.float32)
            if ctx.main_grad is not None:
                ctx.main_grad.add_(grad_w)
                grad_w = None
            else:
                grad_w = grad_w.to(ctx.weight_dtype)

        grad_b = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = dy2.float().sum(dim=0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], recipe: FP8Recipe,
               state: Optional[FP8LinearState] = None, *, accumulate_into_main_grad: bool = True) -> torch.Tensor:
    """y [..., N] = x [..., K] W[N, K]^T + b, the three GEMMs in FP8 by `recipe`.

    `state` (an FP8LinearState) is required by the delayed recipe and unused by the others.
    The caller brings x to the device and does any tensor/sequence-parallel communication; this
    function communicates nothing."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: x has {x.shape[-1]} features, the weight {tuple(weight.shape)} expects "
                         f"{weight.shape[1]}")
    if recipe.kind == "delayed":
        if state is None:
            raise ValueError("fp8_linear: --fp8-recipe delayed needs the layer's FP8LinearState")
        history, scale = state.amax_history, state.scale
    else:
        history = scale = None
    return _FP8LinearFunction.apply(x, weight, bias, history, scale, recipe, accumulate_into_main_grad)


def _blockwise_grouped_mm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor,
                          recipe: FP8Recipe) -> torch.Tensor:
    """Blockwise recipe for grouped experts: one fp8_linear per expert (no grouped kernel takes
    1x128 / 128x128 scales); expert g's weight [M, K] is the transpose of w[g]."""
    counts = [int(c) for c in tokens_per_expert.tolist()]
    pieces = torch.split(x, counts, dim=0)
    # An expert without rows: an empty product (zero gradients, still in the autograd graph).
    outs = [fp8_linear(piece, w[g].t(), None, recipe, None, accumulate_into_main_grad=False)
            if piece.shape[0] else piece @ w[g].to(piece.dtype) for g, piece in enumerate(pieces)]
    if not outs:
        return x.new_zeros(0, w.shape[-1])
    return torch.cat(outs, dim=0)  # [N, M]


def fp8_grouped_mm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor, recipe: FP8Recipe,
                   history: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [N, K] grouped by expert (tokens_per_expert [G] rows each), w [G, K, M] -> [N, M]: the
    grouped experts' GEMM and its two backward GEMMs in FP8 by `recipe`, one scale per expert
    (gigatron.core.fp8.grouped). Delayed: `history` [G, L, 3] and `scale` [G, 3], the experts'
    stacked FP8LinearStates. Communicates nothing."""
    if w.dim() != 3 or x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"fp8_grouped_mm: expected x [N, K] and w [G, K, M], got {tuple(x.shape)} and "
                         f"{tuple(w.shape)}")
    if tokens_per_expert.numel() != w.shape[0]:
        raise ValueError(f"fp8_grouped_mm: {tokens_per_expert.numel()} group sizes for {w.shape[0]} experts")
    if recipe.kind == "blockwise":
        return _blockwise_grouped_mm(x, w, tokens_per_expert, recipe)
    if recipe.kind == "delayed":
        if history is None or scale is None:
            raise ValueError("fp8_grouped_mm: --fp8-recipe delayed needs the experts' stacked amax history and scales")
    else:
        history = scale = None
    return scaled_fp8_grouped_mm(x, w, tokens_per_expert, recipe, history, scale)
