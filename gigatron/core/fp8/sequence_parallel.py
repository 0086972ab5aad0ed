"""fp8_linear after a sequence-parallel all-gather that moves FP8 bytes instead of bf16.

Shapes: s = sequence, b = micro-batch, t = tensor-parallel size, K = in features, N/t = this
rank's out features (a column-parallel weight).

    x [s/t, b, K] --quantize--> FP8 [s/t, b, K] --all-gather dim 0--> FP8 [s, b, K] --GEMM--> y [s, b, N/t]

forward: all-gather of the FP8 input (uint8 on the wire: half the bytes of bf16), then the FP8
GEMM; backward: dgrad [s, b, K] reduce-scattered along dim 0 to [s/t, b, K]; the weight gradient
needs the whole input again, which is all-gathered again rather than kept (as the bf16 layer
does): the FP8 bytes for tensorwise and delayed scaling, the local high-precision input for
blockwise (its weight-gradient tiles run along the gathered token dim, so they are made after the
gather).

Every rank of the group must cast with the same scale, so that the gathered tensor has one:
- tensorwise: the input's amax is all-reduced (MAX) over the group before the cast (one float);
- delayed: the layer's FP8LinearState must be updated with `update_fp8_states(states, group)` over
  a group that contains the tensor-parallel ranks (then every rank holds the same scales);
- blockwise: 1x128 tiles lie inside one token's row, so each rank's tiles and their scales are
  gathered as they are.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from gigatron.core.parallel.groups import Group
from gigatron.core.parallel.mappings import all_gather, reduce_scatter

from .casting import FP8_MAX, Quantized, amax, quantize_1x128, quantize_tensorwise, scale_from_amax
from .linear import FP8Recipe, fp8_linear, quantize_weight, scaled_gemm
from .state import GRAD_OUTPUT, INPUT, FP8LinearState, record_amax

__all__ = ["fp8_linear_with_sequence_parallel_gather", "all_gather_fp8"]


def all_gather_fp8(data: torch.Tensor, group: Group) -> torch.Tensor:
    """Concatenate every rank's FP8 `data` along dim 0, sent as bytes (collective backends need
    not know FP8 dtypes)."""
    if group.size == 1:
        return data
    return all_gather(data.view(torch.uint8), group, dim=0).view(data.dtype)


def _group_amax(x: torch.Tensor, group: Group) -> torch.Tensor:
    value = amax(x).reshape(1)
    if group.size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group.group)
    return value.reshape(())


class _FP8LinearWithSequenceParallelGather(torch.autograd.Function):
    """forward: all-gather FP8 x along dim 0, FP8 GEMM; backward: FP8 dgrad reduce-scattered along
    dim 0, x all-gathered again for the FP8 wgrad."""

    @staticmethod
    def forward(ctx, x, weight, bias, amax_history, scale, recipe: FP8Recipe, group: Group,
                accumulate_into_main_grad: bool):
        k = x.shape[-1]
        x2 = x.reshape(-1, k)  # [s/t * b, K]
        fwd = recipe.fwd_dtype
        wq = quantize_weight(weight, recipe, amax_history, scale)
        if recipe.kind == "blockwise":
            xq = quantize_1x128(x2, fwd)
            x_full = Quantized(all_gather_fp8(xq.data, group), all_gather(xq.scale_inv, group, dim=0), "1x128")
            ctx.save_for_backward(x2, wq.data, wq.scale_inv)
        else:
            if recipe.kind == "delayed":
                x_scale = scale[INPUT]
                record_amax(amax_history, INPUT, x2)
            else:
                x_scale = scale_from_amax(_group_amax(x2, group), FP8_MAX[fwd])
            xq = quantize_tensorwise(x2, x_scale, fwd)
            x_full = Quantized(all_gather_fp8(xq.data, group), xq.scale_inv, "tensor")
            ctx.save_for_backward(xq.data, xq.scale_inv, wq.data, wq.scale_inv)
        y = scaled_gemm(x_full, wq, x.dtype, fast_accum=recipe.kind != "blockwise",
                        blockwise_backend=recipe.blockwise_backend)  # [s * b, N/t]
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.recipe, ctx.group = recipe, group
        ctx.w_layout = wq.layout
        ctx.amax_history, ctx.scale = amax_history, scale
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.weight_dtype = weight.dtype
        ctx.main_grad = getattr(weight, "main_grad", None) if accumulate_into_main_grad else None
        ctx.x_shape = x.shape
        return y.reshape(x.shape[0] * max(group.size, 1), *x.shape[1:-1], y.shape[-1])  # [s, b, N/t]

    @staticmethod
    def backward(ctx, dy):
        recipe: FP8Recipe = ctx.recipe
        group: Group = ctx.group
        bwd = recipe.bwd_dtype
        dy2 = dy.reshape(-1, dy.shape[-1])  # [s * b, N/t]
        if recipe.kind == "blockwise":
            x2, w_data, w_scale_inv = ctx.saved_tensors
            dyq = quantize_1x128(dy2, bwd)
        else:
            x_data, x_scale_inv, w_data, w_scale_inv = ctx.saved_tensors
            if recipe.kind == "delayed":
                dy_scale = ctx.scale[GRAD_OUTPUT]
                record_amax(ctx.amax_history, GRAD_OUTPUT, dy2)
            else:
                dy_scale = scale_from_amax(amax(dy2), FP8_MAX[bwd])
            dyq = quantize_tensorwise(dy2, dy_scale, bwd)
        wq = Quantized(w_data, w_scale_inv, ctx.w_layout)

        grad_x = None
        if ctx.needs_input_grad[0]:
            dx_full = scaled_gemm(dyq, wq.t(), dy.dtype, blockwise_backend=recipe.blockwise_backend)  # [s * b, K]
            dx_full = dx_full.reshape(ctx.x_shape[0] * max(group.size, 1), *ctx.x_shape[1:])  # [s, b, K]
            grad_x = reduce_scatter(dx_full, group, dim=0)  # [s/t, b, K]

        grad_w = None
        if ctx.needs_input_grad[1]:
            if recipe.kind == "blockwise":
                x_full = all_gather(x2, group, dim=0)  # [s * b, K]
                grad_w = scaled_gemm(quantize_1x128(dy2.t(), bwd), quantize_1x128(x_full.t(), recipe.fwd_dtype),
                                     torch.float32, blockwise_backend=recipe.blockwise_backend)
            else:
                x_full = Quantized(all_gather_fp8(x_data, group), x_scale_inv, "tensor")
                grad_w = scaled_gemm(dyq.t(), x_full.t(), torch.float32)
            if ctx.main_grad is not None:
                ctx.main_grad.add_(grad_w)
                grad_w = None
            else:
                grad_w = grad_w.to(ctx.weight_dtype)

        grad_b = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = dy2.float().sum(dim=0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def fp8_linear_with_sequence_parallel_gather(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                             recipe: FP8Recipe, state: Optional[FP8LinearState], group: Group, *,
                                             accumulate_into_main_grad: bool = True) -> torch.Tensor:
    """y [s, b, N/t] = all_gather_seq(x [s/t, b, K]) W[N/t, K]^T + b with the input gathered in
    FP8 and the three GEMMs in FP8 (see the module docstring). On a group of one it is fp8_linear.
    With --no-fp8-wgrad the weight gradient needs the high-precision input: gather it in bf16
    (gather_from_sequence_parallel_region) and call fp8_linear instead."""
    if group.size == 1:
        return fp8_linear(x, weight, bias, recipe, state, accumulate_into_main_grad=accumulate_into_main_grad)
    if not recipe.wgrad_in_fp8:
        raise ValueError("fp8_linear_with_sequence_parallel_gather: --no-fp8-wgrad needs the bf16 input for the "
                         "weight gradient; gather in bf16 and call fp8_linear")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8 sequence-parallel linear: x has {x.shape[-1]} features, the weight "
                         f"{tuple(weight.shape)} expects {weight.shape[1]}")
    if recipe.kind == "delayed":
        if state is None:
            raise ValueError("fp8_linear_with_sequence_parallel_gather: --fp8-recipe delayed needs the layer's "
                             "FP8LinearState")
        history, scale = state.amax_history, state.scale
    else:
        history = scale = None
    return _FP8LinearWithSequenceParallelGather.apply(x, weight, bias, history, scale, recipe, group,
                                                      accumulate_into_main_grad)
