"""T5 relative position bias: a learned scalar per (bucket of key - query distance, head), added to
the attention scores of every layer of a stack (computed once per forward and shared by the layers).

Shape legend: sq = queries, sk = keys, b = batch, n = heads on this tensor-parallel rank
(num_attention_heads / tp), d = head dim.

Buckets (T5's scheme): half of the buckets hold exact distances 0 .. max_exact - 1, the rest cover
distances up to `max_distance` logarithmically (all larger distances share the last bucket). A
bidirectional stack (the encoder) gives keys before and after the query separate halves of the
buckets; a causal stack (the decoder) only looks back.

The bias table is [num_buckets, num_attention_heads] split over tensor-parallel ranks along the
heads (dim 1), so each rank holds and trains the columns of its own heads.

`RelativeBiasCoreAttention` is the core attention that takes the bias: its mask argument is a float
tensor [b | 1, n, sq, sk] added to the scores (0 where attended, -inf where masked, plus the bias).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gigatron.core.parallel import tags
from gigatron.core.transformer.attention import CoreAttention
from gigatron.core.transformer.mlp import normal_init_method
from gigatron.core.transformer.norm import param_device

__all__ = ["relative_position_bucket", "RelativePositionBias", "RelativeBiasCoreAttention", "additive_mask"]


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """Bucket ids (int64, same shape) of key - query distances."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log-spaced buckets for max_exact <= distance < max_distance (clamp avoids log(0) on small ones)
    large = max_exact + (torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """forward(sq, sk) -> bias [1, n, sq, sk] (this rank's heads)."""

    def __init__(self, config, groups, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128,
                 init_key: str = "encoder_relative_pos_emb"):
        super().__init__()
        if num_buckets < 4 or (bidirectional and num_buckets % 2):
            raise ValueError(f"--relative-attention-num-buckets must be >= 4 (even when bidirectional), got "
                             f"{num_buckets}")
        if max_distance <= num_buckets // (4 if bidirectional else 2):
            raise ValueError(f"--relative-attention-max-distance ({max_distance}) must exceed the exact-distance "
                             f"buckets ({num_buckets // (4 if bidirectional else 2)})")
        tp = groups.tp
        self.bidirectional = bidirectional
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        local_heads = config.num_attention_heads // tp.size
        weight = torch.empty(num_buckets, local_heads, dtype=config.params_dtype, device=param_device(config))
        self.relative_attention_bias = nn.Embedding(num_buckets, local_heads, _weight=weight)
        tags.set_tensor_parallel_attributes(self.relative_attention_bias.weight, True, 1, 1, rank=tp.rank,
                                            world_size=tp.size)
        tags.set_init(self.relative_attention_bias.weight, normal_init_method(config),
                      init_key + ".relative_attention_bias.weight")

    def forward(self, sq: int, sk: int) -> torch.Tensor:
        device = self.relative_attention_bias.weight.device
        query = torch.arange(sq, device=device)[:, None]  # [sq, 1]
        key = torch.arange(sk, device=device)[None, :]  # [1, sk]
        buckets = relative_position_bucket(key - query, self.bidirectional, self.num_buckets, self.max_distance)
        values = self.relative_attention_bias(buckets)  # [sq, sk, n]
        return values.permute(2, 0, 1).unsqueeze(0)  # [1, n, sq, sk]


def additive_mask(bias: torch.Tensor, mask: Optional[torch.Tensor], causal: bool = False) -> torch.Tensor:
    """bias [1, n, sq, sk] + (-inf where the bool mask [b | 1, 1, sq | 1, sk] is True, or above the
    diagonal when `causal` and no mask is given) -> float [b | 1, n, sq, sk]."""
    sq, sk = bias.shape[-2:]
    if mask is None and causal:
        mask = torch.ones(sq, sk, dtype=torch.bool, device=bias.device).triu(1)[None, None]  # [1, 1, sq, sk]
    if mask is None:
        return bias
    return bias.float().masked_fill(mask, float("-inf")).to(bias.dtype)


class RelativeBiasCoreAttention(CoreAttention):
    """forward(q [s, b, n, d], k, v, additive_mask float [b | 1, n, sq, sk]) -> [s, b, n*d]."""

    def forward(self, q, k, v, attention_mask: Optional[torch.Tensor] = None,
                window_in_mask: bool = False) -> torch.Tensor:  # T5 has no sliding window
        if attention_mask is None or attention_mask.dtype == torch.bool:
            raise ValueError("relative position attention needs the additive float mask (bias + -inf)")
        dropout_p = self.dropout_p if self.training else 0.0
        sq, b = q.shape[0], q.shape[1]
        q = q.permute(1, 2, 0, 3)  # [b, n, sq, d]
        k = k.permute(1, 2, 0, 3)  # [b, n, sk, d]
        v = v.permute(1, 2, 0, 3)  # [b, n, sk, d]
        mask = attention_mask.to(q.dtype)
        ctx = nullcontext()
        if dropout_p > 0.0:
            from gigatron.core.parallel.random import get_tracker
            ctx = get_tracker().fork()
        with ctx:
            if self.backend == "local":
                scores = (torch.matmul(q, k.transpose(-2, -1)) * self.scale).float() + mask.float()  # [b, n, sq, sk]
                probs = torch.softmax(scores, dim=-1).to(v.dtype)
                if dropout_p > 0.0:
                    probs = F.dropout(probs, p=dropout_p, training=True)
                out = torch.matmul(probs, v)  # [b, n, sq, d]
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=self.scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)  # [b, n, sq, d] -> [sq, b, n*d]
