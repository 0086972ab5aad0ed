"""Tensor-parallel layers with Megatron-LM's weight shapes.

Shapes: s = sequence, b = micro-batch, t = tensor-parallel size, V = padded vocabulary.
    ColumnParallelLinear   weight [out/t, in]   x [s, b, in] (SP: [s/t, b, in])  -> [s, b, out/t]
    RowParallelLinear      weight [out, in/t]   x [s, b, in/t]                   -> [s, b, out] (SP: [s/t, b, out])
    VocabParallelEmbedding weight [V/t, h]      ids [b, s]                       -> [b, s, h]
                                                (reduce_scatter_embeddings:      -> [s/t, b, h])

Parameters are allocated uninitialized and tagged (gigatron/core/parallel/tags.py) with their
tensor-parallel layout and an init spec; gigatron.core.parallel.init.initialize_parameters fills
them so that the full logical tensors do not depend on the parallel layout.

`init_key` is the layer's global module name, e.g. "decoder.layers.7.mlp.linear_fc1"; the weight
is seeded by "<init_key>.weight" and the bias by "<init_key>.bias". With init_key=None the key is
the parameter's name in the module handed to initialize_parameters (optionally mapped by its
`global_name_fn`).

`config` is a TransformerConfig; the layers read `sequence_parallel`, `params_dtype` and
`use_cpu_initialization` from it.

FP8: `enable_fp8(recipe, state)` makes a Column/RowParallelLinear run its three GEMMs through
gigatron.core.fp8 (`fp8_linear`; under sequence parallelism the column-parallel input is all-gathered
in FP8 by `fp8_linear_with_sequence_parallel_gather`). `fp8_recipe` (None: the layer computes in its
parameters' dtype) and `fp8_state` (the delayed recipe's FP8LinearState) are plain attributes: no
parameter, no buffer, nothing in the state_dict. gigatron.core.fp8.model decides which layers.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .groups import Group
from .mappings import (
    all_gather,
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
from .tags import mark_sequence_parallel, set_init, set_tensor_parallel_attributes

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "linear_with_sequence_parallel_gather",
]


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(
            f"{what} ({numerator}) is not divisible by --tensor-model-parallel-size ({denominator}); "
            f"choose sizes that divide"
        )
    return numerator // denominator


def _param_dtype(config) -> torch.dtype:
    return getattr(config, "params_dtype", torch.float32) or torch.float32


def _param_device(config) -> torch.device:
    if getattr(config, "use_cpu_initialization", False) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _child_key(init_key: Optional[str], name: str) -> Optional[str]:
    return None if init_key is None else f"{init_key}.{name}"


class _FP8Switch:
    """The FP8 attributes shared by the two parallel linears (see the module docstring)."""

    fp8_recipe = None
    fp8_state = None

    def enable_fp8(self, recipe, state=None) -> None:
        """Run this layer's GEMMs in FP8 with `recipe` (an FP8Recipe); `state` is the layer's
        FP8LinearState, required by the delayed recipe."""
        if recipe.kind == "delayed" and state is None:
            raise ValueError(f"{type(self).__name__}: --fp8-recipe delayed needs the layer's FP8LinearState")
        self.fp8_recipe = recipe
        self.fp8_state = state

    def _fp8_linear(self, x, weight, bias):
        from gigatron.core.fp8 import fp8_linear

        return fp8_linear(x, weight, bias, self.fp8_recipe, self.fp8_state)


class _LinearWithSequenceParallelGather(torch.autograd.Function):
    """y = all_gather_seq(x) @ W^T + b, saving only the local [s/t, b, in] input for backward.

    forward: all-gather dim 0, then the GEMM; backward: all-gather dim 0 again for the weight
    gradient, input gradient reduce-scattered along dim 0."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group = group
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        total = all_gather(x, group, dim=0)  # [s, b, in]
        return F.linear(total, weight, bias)  # [s, b, out/t]

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        group = ctx.group
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_total = grad_out.matmul(weight.to(grad_out.dtype))  # [s, b, in]
            grad_x = reduce_scatter(grad_total, group, dim=0)  # [s/t, b, in]
        if ctx.needs_input_grad[1]:
            total = all_gather(x, group, dim=0)  # [s, b, in]
            grad_2d = grad_out.reshape(-1, grad_out.shape[-1])  # [s*b, out/t]
            total_2d = total.reshape(-1, total.shape[-1])  # [s*b, in]
            grad_weight = grad_2d.t().matmul(total_2d.to(grad_2d.dtype)).to(weight.dtype)  # [out/t, in]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(dim=0)  # [out/t]
        return grad_x, grad_weight, grad_bias, None


def linear_with_sequence_parallel_gather(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                         group: Group) -> torch.Tensor:
    """forward: all-gather x along dim 0 then x @ W^T + b; backward: input grad reduce-scattered
    along dim 0 (the gathered input is recomputed by another all-gather instead of being kept)."""
    if group.size == 1:
        return F.linear(x, weight, bias)
    return _LinearWithSequenceParallelGather.apply(x, weight, bias, group)


class ColumnParallelLinear(_FP8Switch, torch.nn.Module):
    """Y = X A^T + b with A split along its output dim: this rank holds A's rows [out/t, in].

    forward(x [s, b, in], or [s/t, b, in] with sequence parallel, weight=None)
        -> (y [s, b, out/t] ([s, b, out] with gather_output), bias or None)

    Without sequence parallel the input passes through `copy_to_tensor_parallel_region` (identity;
    its gradient is all-reduced); with sequence parallel it is all-gathered along the sequence
    (its gradient reduce-scattered). `skip_bias_add` returns the bias instead of adding it (for
    fusion downstream). `stride` is the partition stride of fused weights ([gate; up] SwiGLU fc1
    uses 2). `skip_weight_param_allocation` makes the layer hold no weight; forward then needs
    `weight` (a tied output layer on the first stage uses the word embeddings).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config,
        tp: Group,
        init_method: Callable[[torch.Tensor], object],
        bias: bool = True,
        gather_output: bool = False,
        skip_bias_add: bool = False,
        stride: int = 1,
        init_key: Optional[str] = None,
        skip_weight_param_allocation: bool = False,
    ):
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.tp = tp
        self.gather_output = gather_output
        self.skip_bias_add = skip_bias_add
        self.sequence_parallel = bool(getattr(config, "sequence_parallel", False)) and tp.size > 1
        if self.sequence_parallel and gather_output:
            raise ValueError("ColumnParallelLinear: gather_output=True cannot be used with --sequence-parallel")
        self.output_size_per_partition = _divide(output_size, tp.size, "ColumnParallelLinear output size")
        if stride > 1:
            _divide(self.output_size_per_partition, stride, "ColumnParallelLinear output size per rank / stride")
        dtype, device = _param_dtype(config), _param_device(config)

        if skip_weight_param_allocation:
            self.register_parameter("weight", None)
        else:
            self.weight = torch.nn.Parameter(
                torch.empty(self.output_size_per_partition, input_size, dtype=dtype, device=device))
            set_tensor_parallel_attributes(self.weight, True, 0, stride, rank=tp.rank, world_size=tp.size)
            set_init(self.weight, init_method, _child_key(init_key, "weight"))
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(self.output_size_per_partition, dtype=dtype, device=device))
            set_tensor_parallel_attributes(self.bias, True, 0, stride, rank=tp.rank, world_size=tp.size)
            set_init(self.bias, torch.nn.init.zeros_, _child_key(init_key, "bias"))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None):
        if weight is None:
            if self.weight is None:
                raise ValueError("ColumnParallelLinear was built with skip_weight_param_allocation=True; "
                                 "pass the weight to forward()")
            weight = self.weight
        elif weight.shape != (self.output_size_per_partition, self.input_size):
            raise ValueError(f"ColumnParallelLinear: weight of shape {tuple(weight.shape)} given, expected "
                             f"{(self.output_size_per_partition, self.input_size)}")
        bias = None if self.skip_bias_add else self.bias
        if self.fp8_recipe is not None:
            y = self._fp8_forward(x, weight, bias)  # [s, b, out/t]
        elif self.sequence_parallel:
            y = linear_with_sequence_parallel_gather(x, weight, bias, self.tp)  # [s, b, out/t]
        else:
            y = F.linear(copy_to_tensor_parallel_region(x, self.tp), weight, bias)  # [s, b, out/t]
        if self.gather_output:
            y = gather_from_tensor_parallel_region(y, self.tp)  # [s, b, out]
        return y, (self.bias if self.skip_bias_add else None)

    def _fp8_forward(self, x, weight, bias):
        if not self.sequence_parallel:
            return self._fp8_linear(copy_to_tensor_parallel_region(x, self.tp), weight, bias)  # [s, b, out/t]
        if self.fp8_recipe.wgrad_in_fp8:
            from gigatron.core.fp8 import fp8_linear_with_sequence_parallel_gather

            return fp8_linear_with_sequence_parallel_gather(x, weight, bias, self.fp8_recipe, self.fp8_state,
                                                            self.tp)  # [s, b, out/t], x gathered in FP8
        # --no-fp8-wgrad: the weight gradient needs the high-precision input, gathered in its dtype.
        return self._fp8_linear(gather_from_sequence_parallel_region(x, self.tp), weight, bias)  # [s, b, out/t]

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, tp={self.tp.size}, "
                f"bias={self.bias is not None}, gather_output={self.gather_output}, "
                f"sequence_parallel={self.sequence_parallel}" + (f", fp8={self.fp8_recipe.kind}" if self.fp8_recipe else ""))


class RowParallelLinear(_FP8Switch, torch.nn.Module):
    """Y = X A^T + b with A split along its input dim: this rank holds A's columns [out, in/t].

    forward(x [s, b, in/t]) -> (y [s, b, out] ([s/t, b, out] with sequence parallel), bias or None)

    The partial products are all-reduced over tp (or reduce-scattered along the sequence with
    sequence parallel); the bias is added after the reduction. With sequence parallel the bias is
    tagged sequence-parallel: each rank sees a part of the sequence, so its gradient is all-reduced
    over tp by finalize_model_grads. `input_is_parallel=False` splits a full [s, b, in] input first.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config,
        tp: Group,
        init_method: Callable[[torch.Tensor], object],
        bias: bool = True,
        input_is_parallel: bool = True,
        skip_bias_add: bool = False,
        init_key: Optional[str] = None,
    ):
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.tp = tp
        self.input_is_parallel = input_is_parallel
        self.skip_bias_add = skip_bias_add
        self.sequence_parallel = bool(getattr(config, "sequence_parallel", False)) and tp.size > 1
        if self.sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: --sequence-parallel needs input_is_parallel=True")
        self.input_size_per_partition = _divide(input_size, tp.size, "RowParallelLinear input size")
        dtype, device = _param_dtype(config), _param_device(config)

        self.weight = torch.nn.Parameter(
            torch.empty(output_size, self.input_size_per_partition, dtype=dtype, device=device))
        set_tensor_parallel_attributes(self.weight, True, 1, 1, rank=tp.rank, world_size=tp.size)
        set_init(self.weight, init_method, _child_key(init_key, "weight"))
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(output_size, dtype=dtype, device=device))
            set_tensor_parallel_attributes(self.bias, False, 0, 1)
            set_init(self.bias, torch.nn.init.zeros_, _child_key(init_key, "bias"))
            if self.sequence_parallel:
                mark_sequence_parallel(self.bias)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor):
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel_region(x, self.tp)  # [s, b, in/t]
        if self.fp8_recipe is not None:
            partial = self._fp8_linear(x, self.weight, None)  # [s, b, out], a partial sum over tp
        else:
            partial = F.linear(x, self.weight)  # [s, b, out], a partial sum over tp
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(partial, self.tp)  # [s/t, b, out]
        else:
            y = reduce_from_tensor_parallel_region(partial, self.tp)  # [s, b, out]
        if self.skip_bias_add:
            return y, self.bias
        if self.bias is not None:
            y = y + self.bias
        return y, None

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, tp={self.tp.size}, "
                f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}"
                + (f", fp8={self.fp8_recipe.kind}" if self.fp8_recipe else ""))


class VocabParallelEmbedding(torch.nn.Module):
    """Embedding table split along the vocabulary: rank r holds rows [r*V/t, (r+1)*V/t).

    forward(ids [b, s]) -> [b, s, h], summed over tp. Ids outside this rank's rows look up row 0
    and their output is zeroed, so the sum holds exactly one real row per token.

    `reduce_scatter_embeddings=True` (needs --sequence-parallel) instead returns the
    sequence-parallel [s/t, b, h] directly: the partial lookups are transposed to [s, b, h] and
    reduce-scattered along the sequence, half the traffic of all-reduce-then-split. Only for models
    that add nothing else (position/token-type embeddings) before entering the sequence-parallel
    region.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        config,
        tp: Group,
        init_method: Callable[[torch.Tensor], object],
        init_key: Optional[str] = None,
        reduce_scatter_embeddings: bool = False,
    ):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.tp = tp
        self.num_embeddings_per_partition = _divide(
            num_embeddings, tp.size, "VocabParallelEmbedding vocabulary size (pad it: --make-vocab-size-divisible-by)")
        self.vocab_start_index = tp.rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        if reduce_scatter_embeddings and not getattr(config, "sequence_parallel", False):
            raise ValueError("VocabParallelEmbedding: reduce_scatter_embeddings=True needs --sequence-parallel")
        self.reduce_scatter_embeddings = reduce_scatter_embeddings
        dtype, device = _param_dtype(config), _param_device(config)
        self.weight = torch.nn.Parameter(
            torch.empty(self.num_embeddings_per_partition, embedding_dim, dtype=dtype, device=device))
        set_tensor_parallel_attributes(self.weight, True, 0, 1, rank=tp.rank, world_size=tp.size)
        set_init(self.weight, init_method, _child_key(init_key, "weight"))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size > 1:
            outside = (ids < self.vocab_start_index) | (ids >= self.vocab_end_index)  # [b, s]
            local_ids = (ids - self.vocab_start_index).masked_fill(outside, 0)  # [b, s]
            out = F.embedding(local_ids, self.weight)  # [b, s, h]
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)  # [b, s, h]
        else:
            out = F.embedding(ids, self.weight)  # [b, s, h]
        if self.reduce_scatter_embeddings:
            out = out.transpose(0, 1).contiguous()  # [s, b, h]
            return reduce_scatter_to_sequence_parallel_region(out, self.tp)  # [s/t, b, h]
        return reduce_from_tensor_parallel_region(out, self.tp)  # [b, s, h]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tp={self.tp.size}"
