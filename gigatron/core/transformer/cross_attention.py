"""Cross-attention (T5 decoder): queries from the decoder stream, keys and values from the encoder.

Shape legend: sq = decoder (query) sequence, sk = encoder (key) sequence, b = batch, h = hidden,
d = head dim (kv_channels), n = attention heads on this tensor-parallel rank (num_attention_heads / tp).

    linear_q   column parallel  [n*d (per rank), h]     decoder hidden -> queries
    linear_kv  column parallel  [2*n*d (per rank), h]   encoder output -> keys and values, laid out per
                                                        head as [K_j (d rows); V_j (d rows)] (Megatron's
                                                        layout), so a contiguous split over tp gives
                                                        each rank whole heads
    linear_proj row parallel    [h, n*d (per rank)]     attention output -> hidden

Every key/value head serves one query head (no grouped-query attention in cross-attention, as in
Megatron). The attention itself is gigatron.core.transformer.attention.CoreAttention; the mask is a
bool tensor broadcastable to [b, 1, sq, sk] with True where a query must NOT see a key.
"""

from __future__ import annotations

import torch
from torch import nn

from gigatron.core.parallel.layers import ColumnParallelLinear, RowParallelLinear
from gigatron.core.transformer.attention import CoreAttention
from gigatron.core.transformer.mlp import normal_init_method, scaled_init_method

__all__ = ["CrossAttention"]


class CrossAttention(nn.Module):
    """forward(hidden [sq, b, h], memory [sk, b, h], attention_mask [b|1, 1, sq|1, sk] bool)
    -> (y [sq, b, h], linear_proj bias or None (added by the caller's bias-dropout-add)).

    `init_prefix` is the module's global name (e.g. "decoder.layers.3.cross_attention"); it seeds
    the initialization of its weights."""

    def __init__(self, config, groups, init_prefix: str):
        super().__init__()
        tp = config.tensor_model_parallel_size
        if groups.tp.size != tp:
            raise ValueError(f"the tensor-parallel group has {groups.tp.size} ranks but "
                             f"--tensor-model-parallel-size is {tp}; build the groups from the same config")
        self.config = config
        self.head_dim = config.kv_channels
        self.num_heads = config.num_attention_heads // tp
        projection = config.num_attention_heads * self.head_dim
        bias = config.add_bias_linear or config.add_qkv_bias
        self.linear_q = ColumnParallelLinear(
            config.hidden_size, projection, config=config, tp=groups.tp, init_method=normal_init_method(config),
            bias=bias, gather_output=False, init_key=init_prefix + ".linear_q")
        self.linear_kv = ColumnParallelLinear(
            config.hidden_size, 2 * projection, config=config, tp=groups.tp, init_method=normal_init_method(config),
            bias=bias, gather_output=False, init_key=init_prefix + ".linear_kv")
        self.core_attention = CoreAttention(config)
        self.recompute_core_attention = (config.recompute_granularity == "selective"
                                         and "core_attn" in config.recompute_modules)
        self.linear_proj = RowParallelLinear(
            projection, config.hidden_size, config=config, tp=groups.tp, init_method=scaled_init_method(config),
            bias=config.add_bias_linear, input_is_parallel=True, skip_bias_add=True,
            init_key=init_prefix + ".linear_proj")

    def split_kv(self, mixed: torch.Tensor):
        """[sk, b, n*2*d] -> k [sk, b, n, d], v [sk, b, n, d]."""
        sk, b = mixed.shape[0], mixed.shape[1]
        mixed = mixed.view(sk, b, self.num_heads, 2 * self.head_dim)  # [sk, b, n, 2d]
        k, v = torch.split(mixed, [self.head_dim, self.head_dim], dim=3)  # [sk, b, n, d] each
        return k, v

    def forward(self, hidden: torch.Tensor, memory: torch.Tensor, attention_mask: torch.Tensor):
        sq, b = hidden.shape[0], hidden.shape[1]
        q, _ = self.linear_q(hidden)  # [sq, b, n*d]
        q = q.view(sq, b, self.num_heads, self.head_dim)  # [sq, b, n, d]
        mixed, _ = self.linear_kv(memory)  # [sk, b, n*2d]
        k, v = self.split_kv(mixed)
        if self.recompute_core_attention and self.training and torch.is_grad_enabled():
            from gigatron.core.parallel.random import checkpoint
            context = checkpoint(self.core_attention, False, q, k, v, attention_mask)
        else:
            context = self.core_attention(q, k, v, attention_mask)  # [sq, b, n*d]
        return self.linear_proj(context)
