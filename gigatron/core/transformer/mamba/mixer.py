"""MambaMixer: the Mamba-2 sequence mixer with Megatron-Core's parameters.

Shape legend: s = sequence (s/tp with sequence parallelism at the input and output), b = batch,
h = hidden, tp = tensor-parallel size; per rank: H = Mamba heads / tp, P = head dim,
G = groups / tp, N = state dim, I = H * P (inner width), K = conv kernel width (4).

    zxBCdt = in_proj(hidden)                          [s, b, 2I + 2GN + H]   (column parallel)
    z, xBC, dt = split                                [s, b, I], [s, b, I + 2GN], [s, b, H]
    xBC = silu(causal depthwise conv1d(xBC))           over the sequence, per channel
    x, B, C = split xBC                               [b, s, H, P], [b, s, G, N], [b, s, G, N]
    y = SSD scan(x, softplus(dt + dt_bias), A = -exp(A_log), B, C, D)     [b, s, H, P]
    y = rmsnorm_per_group(y * silu(z)) * norm.weight  [s, b, I]   (the gated RMSNorm, eps 1e-5)
    out = out_proj(y)                                 [s, b, h]              (row parallel)

Parameters (Megatron-Core's names and per-rank shapes): in_proj.weight [2I + 2GN + H, h],
conv1d.weight [I + 2GN, 1, K], conv1d.bias [I + 2GN], A_log [H], D [H], dt_bias [H],
norm.weight [I], out_proj.weight [h, I]. No biases on the projections. The fused in_proj
and conv1d rows are split segment by segment over the ranks (gigatron/core/transformer/mamba/layout.py).
Saved for backward (training): in_proj's input, the in_proj output (z, xBC and dt are views of
it), softplus's fp32 input and output, y and out_proj's input; the conv1d + scan step
(ops/ssd.py conv_ssd_scan) and the gated norm keep only their inputs and recompute the rest in
backward (ops/ssd_recompute.py on the CPU; gradients bitwise those of the plain ops).
A_log and D are created in the model's params dtype (Megatron creates them in fp32 but its
Float16Module then casts the whole model); the scan reads them in fp32.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from gigatron.core.ops.causal_conv1d import causal_conv1d
from gigatron.core.ops.ssd import DEFAULT_CHUNK_SIZE, conv_ssd_scan, split_xbc, ssd_scan
from gigatron.core.ops.ssd_recompute import keep_inputs_only
from gigatron.core.ops.ssd_step import gated_rmsnorm, mamba_decode_step, reference_gated_rmsnorm
from gigatron.core.parallel import tags
from gigatron.core.transformer.mamba.config import MAMBA_CONV_KERNEL, mamba_num_heads
from gigatron.core.transformer.mamba.layout import (
    InverseSoftplusDtInit,
    LogUniformInit,
    OnesInit,
    UniformInit,
    conv_segments,
    in_proj_segments,
)
from gigatron.core.transformer.mlp import normal_init_method
from gigatron.core.transformer.norm import param_device

__all__ = ["MambaMixer", "GatedRMSNorm", "DepthwiseConv1d", "reference_gated_rmsnorm", "output_init_method"]

GATED_NORM_EPS = 1e-5  # Megatron's MambaMixer fixes it (not --norm-epsilon)


class _Normal:
    """N(0, std^2) (picklable)."""

    def __init__(self, std: float):
        self.std = std

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(t, mean=0.0, std=self.std)

    def __repr__(self) -> str:
        return f"normal(std={self.std:g})"


def output_init_method(config, is_hybrid_model: bool):
    """Init of each layer's output projection: N(0, std^2 / (m * num_layers)) with m = 1 for a
    hybrid model (--is-hybrid-model) and 2 otherwise (Megatron's output_layer_init_method)."""
    multiplier = 1.0 if is_hybrid_model else 2.0
    return _Normal(config.init_method_std / math.sqrt(multiplier * config.num_layers))


class GatedRMSNorm(nn.Module):
    """The mixer's output norm: rmsnorm of y * silu(z), per group of channels (Megatron's
    RMSNormGated with norm_before_gate=False). weight [I] is this rank's slice (tensor parallel)."""

    def __init__(self, width: int, group_size: int, tp, dtype, device, init_key: str):
        super().__init__()
        if width % group_size != 0:
            raise ValueError(f"gated norm: width {width} is not a multiple of the group size {group_size}")
        self.group_size = group_size
        self.eps = GATED_NORM_EPS
        self.weight = nn.Parameter(torch.ones(width, dtype=dtype, device=device))
        tags.set_tensor_parallel_attributes(self.weight, True, 0, 1, rank=tp.rank, world_size=tp.size)
        tags.set_init(self.weight, OnesInit(), init_key + ".weight")

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # Keeps y, z (a view of the in_proj output) and the weight for backward, not the fp32
        # y, z, silu(z), product and normalized product: those are recomputed in backward.
        norm = functools.partial(reference_gated_rmsnorm, group_size=self.group_size, eps=self.eps)
        return keep_inputs_only(norm, y, z, self.weight)


class DepthwiseConv1d(nn.Module):
    """The causal depthwise convolution with SiLU; weight [C, 1, K] and bias [C] as torch's Conv1d
    (Megatron's `conv1d`). forward(x [b, s, C], any strides) -> [b, s, C]."""

    def __init__(self, channels: int, kernel: int, segments, tp, dtype, device, init_key: str):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(channels, dtype=dtype, device=device))
        bound = 1.0 / math.sqrt(kernel)
        for name, p in (("weight", self.weight), ("bias", self.bias)):
            tags.set_tensor_parallel_attributes(p, True, 0, 1, rank=tp.rank, world_size=tp.size, segments=segments)
            tags.set_init(p, UniformInit(bound), f"{init_key}.{name}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return causal_conv1d(x, self.weight[:, 0, :], self.bias, silu=True)


class MambaMixer(nn.Module):
    """forward(hidden [s, b, h] ([s/tp, b, h] with sequence parallel)) -> (out in the same layout,
    None). `layer_number` is the global 0-based layer number (init keys)."""

    def __init__(self, config, mamba_config, groups, layer_number: int, chunk_size: int = DEFAULT_CHUNK_SIZE):
        super().__init__()
        from gigatron.core.parallel.layers import ColumnParallelLinear, RowParallelLinear

        tp = groups.tp
        self.config = config
        self.layer_number = layer_number
        self.chunk_size = chunk_size
        self.decode_kernel = "auto"  # the generation step's kernel (ops/ssd_step.py); benchmarks set "reference"
        self.head_dim = mamba_config.mamba_head_dim
        self.state_dim = mamba_config.mamba_state_dim
        num_heads = mamba_num_heads(mamba_config, config.hidden_size)
        num_groups = mamba_config.mamba_num_groups
        for what, count in (("the Mamba heads", num_heads), ("--mamba-num-groups", num_groups)):
            if count % tp.size != 0:
                raise ValueError(f"{what} ({count}) must be divisible by --tensor-model-parallel-size ({tp.size})")
        if num_heads % num_groups != 0:
            raise ValueError(f"the Mamba heads ({num_heads}) must be divisible by --mamba-num-groups ({num_groups})")
        d_inner = num_heads * self.head_dim
        self.num_heads = num_heads // tp.size  # H
        self.num_groups = num_groups // tp.size  # G
        self.d_inner = d_inner // tp.size  # I
        self.conv_dim = self.d_inner + 2 * self.num_groups * self.state_dim
        prefix = f"decoder.layers.{layer_number}.mixer"
        dtype, device = config.params_dtype, param_device(config)

        proj_segments = in_proj_segments(d_inner, num_groups, self.state_dim, num_heads)
        self.in_proj = ColumnParallelLinear(
            config.hidden_size, sum(proj_segments), config=config, tp=tp,
            init_method=normal_init_method(config), bias=False, gather_output=False, init_key=prefix + ".in_proj")
        tags.set_tensor_parallel_attributes(self.in_proj.weight, True, 0, 1, rank=tp.rank, world_size=tp.size,
                                            segments=proj_segments)
        self.conv1d = DepthwiseConv1d(self.conv_dim, MAMBA_CONV_KERNEL, conv_segments(d_inner, num_groups, self.state_dim),
                                      tp, dtype, device, prefix + ".conv1d")
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads, dtype=dtype, device=device))
        self.A_log = nn.Parameter(torch.empty(self.num_heads, dtype=dtype, device=device))
        self.D = nn.Parameter(torch.empty(self.num_heads, dtype=dtype, device=device))
        for name, init in (("dt_bias", InverseSoftplusDtInit()), ("A_log", LogUniformInit()), ("D", OnesInit())):
            p = getattr(self, name)
            tags.set_tensor_parallel_attributes(p, True, 0, 1, rank=tp.rank, world_size=tp.size)
            tags.set_init(p, init, f"{prefix}.{name}")
        self.norm = GatedRMSNorm(self.d_inner, d_inner // num_groups, tp, dtype, device, prefix + ".norm")
        self.out_proj = RowParallelLinear(
            d_inner, config.hidden_size, config=config, tp=tp,
            init_method=output_init_method(config, mamba_config.is_hybrid_model), bias=False,
            input_is_parallel=True, skip_bias_add=True, init_key=prefix + ".out_proj")

    def forward(self, hidden: torch.Tensor, inference_context=None):
        """inference_context: None (training, whole sequences from zero states), or the context of a
        generation step holding `mamba_states` (gigatron/core/inference/state_cache.py): the step
        starts from the cached states of its rows and writes their new states back."""
        zxbcdt, _ = self.in_proj(hidden)  # [s, b, 2I + 2GN + H]
        s, b = zxbcdt.shape[0], zxbcdt.shape[1]
        z, xbc, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        states = getattr(inference_context, "mamba_states", None) if inference_context is not None else None
        if states is not None:
            if s == 1:
                y = self._decode_step(xbc[0], dt[0], inference_context, states)  # [b, I]
                y = gated_rmsnorm(y, z[0], self.norm.weight, self.norm.group_size, self.norm.eps,
                                  kernel=self.decode_kernel)  # [b, I]
                return self.out_proj(y[None])
            return self.out_proj(self.norm(self._prefill(xbc, dt, inference_context, states), z))
        dt = F.softplus(dt.float() + self.dt_bias.float()).transpose(0, 1)  # [b, s, H]
        A = -torch.exp(self.A_log.float())  # [H]
        # silu(conv1d(xbc)) -> x, B, C -> scan, keeping only the inputs (the conv output is made
        # again in backward): y [b, s, H, P]
        y = conv_ssd_scan(xbc.transpose(0, 1), self.conv1d.weight[:, 0, :], self.conv1d.bias, dt, A, self.D,
                          (self.num_heads, self.head_dim, self.num_groups, self.state_dim), chunk_size=self.chunk_size)
        y = y.transpose(0, 1).reshape(s, b, self.d_inner)  # [s, b, I]
        y = self.norm(y, z)  # [s, b, I]
        return self.out_proj(y)

    def _split_xbc(self, xbc: torch.Tensor):
        """[..., I + 2GN] -> x [..., H, P], B [..., G, N], C [..., G, N]."""
        return split_xbc(xbc, self.num_heads, self.head_dim, self.num_groups, self.state_dim)

    def _start_states(self, inference_context, states, b: int):
        """(conv [b, C, K-1], ssm [b, H, P, N]) the step starts from: the cached states, zeros for a
        row whose first new position is 0 (a new sequence), and the cache views to write back."""
        conv_cache, ssm_cache = states.layer(self.layer_number, b)
        fresh = inference_context.positions[:, 0] == 0  # [b]
        conv0 = torch.where(fresh[:, None, None], torch.zeros((), dtype=conv_cache.dtype, device=conv_cache.device),
                            conv_cache)
        ssm0 = torch.where(fresh[:, None, None, None], torch.zeros((), device=ssm_cache.device), ssm_cache)
        return conv0, ssm0, conv_cache, ssm_cache

    def _prefill(self, xbc: torch.Tensor, dt: torch.Tensor, inference_context, states) -> torch.Tensor:
        """s > 1 new tokens per row from the cached states: xbc [s, b, I + 2GN], dt [s, b, H] ->
        y [s, b, I]; writes the states after each row's last real token (states.lengths) back."""
        s, b = xbc.shape[0], xbc.shape[1]
        conv0, ssm0, conv_cache, ssm_cache = self._start_states(inference_context, states, b)
        width = conv0.shape[-1]  # K - 1
        lengths = states.lengths[:b] if states.lengths is not None else None
        inputs = torch.cat([conv0.transpose(1, 2).to(xbc.dtype), xbc.transpose(0, 1)], dim=1)  # [b, K-1+s, C]
        conv_out = self.conv1d(inputs)[:, width:]  # [b, s, C]
        x, B, C = self._split_xbc(conv_out)
        dt = F.softplus(dt.float() + self.dt_bias.float()).transpose(0, 1)  # [b, s, H]
        if lengths is not None:  # padding past a row's length neither decays nor feeds its state
            real = torch.arange(s, device=dt.device)[None, :] < lengths[:, None]  # [b, s]
            dt = dt * real[..., None]
        A = -torch.exp(self.A_log.float())  # [H]
        y, final = ssd_scan(x, dt, A, B, C, self.D, initial_state=ssm0, chunk_size=self.chunk_size)
        ends = lengths if lengths is not None else torch.full((b,), s, dtype=torch.long, device=xbc.device)
        window = ends[:, None] + torch.arange(width, device=xbc.device)[None, :]  # [b, K-1] indices into inputs
        last = inputs.gather(1, window[..., None].expand(b, width, inputs.shape[-1]))  # [b, K-1, C]
        conv_cache.copy_(last.transpose(1, 2).to(conv_cache.dtype))
        ssm_cache.copy_(final)
        return y.transpose(0, 1).reshape(s, b, self.d_inner)

    def _decode_step(self, xbc: torch.Tensor, dt: torch.Tensor, inference_context, states) -> torch.Tensor:
        """One new token per row: xbc [b, I + 2GN], dt [b, H] -> y [b, I]; updates the cached states in
        place (gigatron/core/ops/ssd_step.py: the recurrence in plain PyTorch, one Triton kernel for
        the convolution and one for the state on CUDA); rows of length 0 keep their states."""
        b = xbc.shape[0]
        conv_cache, ssm_cache = states.layer(self.layer_number, b)
        fresh = inference_context.positions[:, 0] == 0  # [b]: a new sequence starts from zero states
        keep = states.lengths[:b] == 0 if states.lengths is not None else None
        return mamba_decode_step(xbc, dt, conv_cache, self.conv1d.weight[:, 0, :], self.conv1d.bias, ssm_cache,
                                 self.A_log, self.D, self.dt_bias, self.num_groups, fresh=fresh, keep=keep,
                                 kernel=self.decode_kernel)
