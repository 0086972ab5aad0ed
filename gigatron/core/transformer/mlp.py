"""The transformer MLP: linear_fc1 (column parallel) -> activation -> linear_fc2 (row parallel).

Shape legend: s = sequence (full inside the tensor-parallel region), b = batch, h = hidden,
f = ffn_hidden_size, tp = tensor-parallel size.

With --swiglu, linear_fc1 produces 2f outputs. Its logical weight is [gate (f rows); up (f rows)]
tagged with partition stride 2, so tensor-parallel rank r holds [gate_r; up_r] (Megatron's layout)
and splits its local output in two halves.

Fused activations (--bias-gelu-fusion, --bias-swiglu-fusion, on by default): when the parameters
live on a CUDA device, linear_fc1 returns its bias unapplied and one Triton kernel adds it inside
the activation, forward and backward (gigatron/core/ops/fused_activation.py). Where the kernel
cannot run (a CPU tensor, inside torch.compile) the same bias is added before the activation in
PyTorch; CPU-built models keep the bias inside linear_fc1 exactly as without fusion.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gigatron.core.ops.activations import gelu, openai_gelu, squared_relu, swiglu
from gigatron.core.ops.fused_activation import fused_activation_available, fused_bias_activation

__all__ = ["MLP", "gelu", "openai_gelu", "squared_relu", "swiglu", "activation_function",
           "normal_init_method", "scaled_init_method"]


def activation_function(config):
    if config.swiglu:
        return swiglu
    if config.squared_relu:
        return squared_relu
    if config.openai_gelu:
        return openai_gelu
    return gelu


class _NormalInit:
    """Fill a tensor from N(0, std^2) (a picklable init_fn for tags.set_init)."""

    def __init__(self, std: float):
        self.std = std

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(t, mean=0.0, std=self.std)

    def __repr__(self) -> str:
        return f"normal(std={self.std:g})"


class _XavierUniformInit:
    """Fill a tensor from Xavier (Glorot) uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out)) of
    the whole (logical) weight; --init-method-xavier-uniform."""

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return nn.init.xavier_uniform_(t)

    def __repr__(self) -> str:
        return "xavier_uniform"


def normal_init_method(config):
    """N(0, init_method_std^2): every weight except the two output projections of each layer
    (Xavier uniform with --init-method-xavier-uniform)."""
    if getattr(config, "init_method_xavier_uniform", False):
        return _XavierUniformInit()
    return _NormalInit(config.init_method_std)


def scaled_init_method(config):
    """N(0, (init_method_std / sqrt(2 * num_layers))^2): linear_proj and linear_fc2 weights (Xavier
    uniform with --init-method-xavier-uniform, as Megatron uses it for the output layers too)."""
    if getattr(config, "init_method_xavier_uniform", False):
        return _XavierUniformInit()
    return _NormalInit(config.init_method_std / math.sqrt(2.0 * config.num_layers))


def fused_activation_kind(config):
    """The fused kernel's name for the MLP's activation when its fusion flag is on and the model is
    built on a CUDA device, else None (--bias-gelu-fusion / --bias-swiglu-fusion)."""
    from gigatron.core.transformer.norm import param_device

    if param_device(config).type != "cuda":
        return None
    if config.swiglu:
        return "swiglu" if getattr(config, "bias_swiglu_fusion", False) else None
    if config.squared_relu or not getattr(config, "bias_gelu_fusion", False):
        return None
    return "gelu_tanh" if config.openai_gelu else "gelu"


class MLP(nn.Module):
    """forward(x [s, b, h] or [s/tp, b, h] with sequence parallel) -> (y, bias or None), y in the
    same sequence layout as x; the fc2 bias is returned for the fused bias-dropout-add."""

    def __init__(self, config, groups, layer_number: int):
        super().__init__()
        from gigatron.core.parallel.layers import ColumnParallelLinear, RowParallelLinear

        prefix = f"decoder.layers.{layer_number}.mlp"
        ffn = config.ffn_hidden_size
        self.activation = activation_function(config)
        self.fused_kind = fused_activation_kind(config)
        self.linear_fc1 = ColumnParallelLinear(
            config.hidden_size, 2 * ffn if config.swiglu else ffn, config=config, tp=groups.tp,
            init_method=normal_init_method(config), bias=config.add_bias_linear, gather_output=False,
            skip_bias_add=self.fused_kind is not None, stride=2 if config.swiglu else 1,
            init_key=prefix + ".linear_fc1")
        self.linear_fc2 = RowParallelLinear(
            ffn, config.hidden_size, config=config, tp=groups.tp, init_method=scaled_init_method(config),
            bias=config.add_bias_linear, input_is_parallel=True, skip_bias_add=True,
            init_key=prefix + ".linear_fc2")

    def forward(self, x: torch.Tensor):
        intermediate, fc1_bias = self.linear_fc1(x)  # [s, b, f/tp] (x2 with swiglu); bias when fused
        if self.fused_kind is not None and fused_activation_available(intermediate):
            intermediate = fused_bias_activation(intermediate, fc1_bias, self.fused_kind)  # [s, b, f/tp]
        else:
            if fc1_bias is not None:
                intermediate = intermediate + fc1_bias
            intermediate = self.activation(intermediate)  # [s, b, f/tp]
        return self.linear_fc2(intermediate)
