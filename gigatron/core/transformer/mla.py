"""Multi-latent attention (MLA, DeepSeek-V2/V3), with Megatron-Core's parameter names.

Shape legend: s = sequence (s/tp where marked, with sequence parallelism), b = batch, h = hidden,
n = query heads on this tensor-parallel rank (num_attention_heads / tp), dn = qk_head_dim (the
part of a query/key head without position), dr = qk_pos_emb_head_dim (the rotated part),
dq = dn + dr, dv = v_head_dim, rq = q_lora_rank, rkv = kv_lora_rank.

    queries:  q = linear_q_up_proj(q_layernorm(linear_q_down_proj(x)))       [s, b, n*dq]
              (or q = linear_q_proj(x) when --q-lora-rank is unset)
    keys/values: [c; k_r] = linear_kv_down_proj(x)                            [s, b, rkv + dr]
              [k_nope; v] = linear_kv_up_proj(kv_layernorm(c))                [s, b, n*(dn+dv)]
    each head: query = [q_nope; rope(q_r)], key = [k_nope; rope(k_r)] (k_r shared by all heads),
              attention with scale mscale(factor, mscale_all_dim)^2 / sqrt(dq), then linear_proj.

q_layernorm / kv_layernorm exist with --qk-layernorm only (as in Megatron; otherwise the latents
are used as they are). Rotary embedding follows Megatron's MLA convention: the dr channels are
taken as pairs (0,1), (2,3), ... (the even channels, then the odd ones, rotated as halves) and
both cos and sin carry the YaRN concentration factor mscale(factor, mscale) /
mscale(factor, mscale_all_dim), where mscale(f, m) = 0.1 * m * ln(f) + 1 for f > 1, else 1.

Tensor parallelism: the up-projections and linear_q_proj are column-parallel (each rank its
heads), linear_proj row-parallel; the down-projections and the latent norms are replicated. With
sequence parallelism the down-projections see this rank's s/tp tokens (their gradients are partial
sums, tagged sequence_parallel so finalize_model_grads all-reduces them), the column-parallel
up-projections gather the sequence, and the shared rotary key k_r is all-gathered over the
sequence (its gradient reduce-scattered). Without sequence parallelism k_r enters the
tensor-parallel region through copy_to_tensor_parallel_region (its gradient, one part per rank's
heads, all-reduced).

Generation (forward with an inference_context, gigatron/core/inference/kv_cache.py): the cache
holds, per token, the latent and the rotated rotary key, l = [c; rope(k_r)] [rkv + dr] (the same
on every tensor-parallel rank), not per-head keys and values: (rkv + dr) numbers per token and
layer instead of n * (dq + dv). With W_uk [n, dn, rkv] and W_uv [n, dv, rkv] the key and value
rows of linear_kv_up_proj's weight, two equal ways attend over the cached tokens j (kv = kv_len):
  - expanded (a step of several new tokens: prefill, prefill chunks): the cached latents
    [kv, b, rkv] go through linear_kv_up_proj to k_nope and v, the keys are [k_nope; rope(k_r)]
    and attention runs as in training (core_attention, the configured backend);
  - absorbed (a decode step, one new token per row): query . key = q_nope . (W_uk c_j) +
    q_r . k_r_j = [W_uk^T q_nope; q_r] . l_j, and sum_j p_j v_j = W_uv (sum_j p_j c_j), so each
    head attends over the latents themselves ([b, n, 1, rkv + dr] against [b, 1, kv, rkv + dr],
    the values being the latents' first rkv channels) and only the context goes through W_uv: a
    step reads (rkv + dr) numbers per cached token, with no up-projection of the cache.
Both run with the softmax scale of training (the dot products are the same numbers) and a mask
from each new token's position (causal over the cache; --window-size counted from the position).
--recompute-modules mla_up_proj / core_attn do not apply (no gradients at inference).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gigatron.core.parallel.tags import mark_sequence_parallel, set_init
from gigatron.core.transformer.attention import core_attention, outside_window, sliding_window_mask
from gigatron.core.transformer.mlp import normal_init_method, scaled_init_method
from gigatron.core.transformer.norm import build_norm, param_device
from gigatron.core.transformer.rope import RotaryEmbedding, rotate_half

__all__ = ["MLASelfAttention", "YarnRotaryEmbedding", "yarn_mscale", "mla_softmax_scale", "mla_rope_mscale",
           "mla_rotary_embedding", "apply_mla_rotary_pos_emb", "YARN_ORIGINAL_MAX_POSITION_EMBEDDINGS",
           "YARN_BETA_FAST", "YARN_BETA_SLOW"]

# Megatron-Core's MLA YaRN constants (not command-line flags in Megatron either).
YARN_ORIGINAL_MAX_POSITION_EMBEDDINGS = 4096
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term: 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def mla_softmax_scale(config) -> float:
    """The attention scale of MLA: mscale(factor, mscale_all_dim)^2 / sqrt(qk_head_dim + qk_pos_emb_head_dim)."""
    m = yarn_mscale(config.rotary_scaling_factor, config.mscale_all_dim)
    return m * m / math.sqrt(config.qk_head_dim + config.qk_pos_emb_head_dim)


def mla_rope_mscale(config) -> float:
    """The factor on cos and sin of MLA's rotary part: 1 with --rope-type rope, else
    mscale(factor, mscale) / mscale(factor, mscale_all_dim)."""
    if config.rope_type != "yarn":
        return 1.0
    factor = config.rotary_scaling_factor
    return yarn_mscale(factor, config.mscale) / yarn_mscale(factor, config.mscale_all_dim)


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, original: int) -> float:
    """The channel-pair index whose wavelength turns `num_rotations` times over `original` positions."""
    return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_inv_freq(dim: int, base: float, factor: float, original: int = YARN_ORIGINAL_MAX_POSITION_EMBEDDINGS,
                  beta_fast: float = YARN_BETA_FAST, beta_slow: float = YARN_BETA_SLOW) -> torch.Tensor:
    """YaRN's rotary frequencies [dim/2] (fp32): high frequencies (more than beta_fast turns over
    the original context) kept, low ones (fewer than beta_slow turns) divided by `factor`, a linear
    ramp over the channel pairs between."""
    extrapolated = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    interpolated = extrapolated / factor
    low = max(math.floor(_yarn_correction_dim(beta_fast, dim, base, original)), 0)
    high = min(math.ceil(_yarn_correction_dim(beta_slow, dim, base, original)), dim - 1)
    if low == high:
        high += 0.001  # a one-step ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # 0: keep, 1: divide
    return interpolated * ramp + extrapolated * (1 - ramp)


class YarnRotaryEmbedding(RotaryEmbedding):
    """RotaryEmbedding with YaRN's frequencies (yarn_inv_freq); forward as RotaryEmbedding."""

    def __init__(self, dim: int, rotary_base: float, scaling_factor: float, device=None):
        super().__init__(dim, rotary_base=rotary_base, device=device)
        self.register_buffer("inv_freq", yarn_inv_freq(dim, rotary_base, scaling_factor).to(device), persistent=False)


def mla_rotary_embedding(config) -> RotaryEmbedding:
    """The rotary embedding of MLA's dr rotated channels (built once per model, like the plain one)."""
    device = param_device(config)
    if config.rope_type == "yarn":
        return YarnRotaryEmbedding(config.qk_pos_emb_head_dim, config.rotary_base, config.rotary_scaling_factor,
                                   device=device)
    return RotaryEmbedding(config.qk_pos_emb_head_dim, config.rotary_percent, config.rotary_base, device=device)


def apply_mla_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, mscale: float = 1.0) -> torch.Tensor:
    """Rotate t [s, b, n, dr] by freqs [s, 1 | b, 1, r] in MLA's pair order (channel pairs (0,1),
    (2,3), ... laid out as [even channels; odd channels] and rotated as halves), cos and sin scaled
    by `mscale`. Computed in fp32, returned in t's dtype and in the [even; odd] order (queries and
    keys share the order, so their products are those of the pairs)."""
    rot_dim = freqs.shape[-1]
    t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    t_rot = torch.cat((t_rot[..., 0::2], t_rot[..., 1::2]), dim=-1).float()
    rotated = t_rot * (torch.cos(freqs) * mscale) + rotate_half(t_rot, False) * (torch.sin(freqs) * mscale)
    rotated = rotated.to(t.dtype)
    if t_pass.shape[-1] == 0:
        return rotated
    return torch.cat((rotated, t_pass), dim=-1)


class _ReplicatedLinear(nn.Module):
    """y = x W^T with W [out, in] whole on every tensor-parallel rank (MLA's down-projections).
    With sequence parallelism each rank sees its own tokens, so W's gradient is a partial sum and is
    tagged sequence_parallel."""

    def __init__(self, input_size: int, output_size: int, config, init_key: str, sequence_parallel: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype,
                                               device=param_device(config)))
        set_init(self.weight, normal_init_method(config), init_key + ".weight")
        if sequence_parallel:
            mark_sequence_parallel(self.weight)

    def forward(self, x: torch.Tensor):
        return F.linear(x, self.weight), None

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, replicated"


class MLASelfAttention(nn.Module):
    """forward(x [s, b, h] ([s/tp, b, h] with sequence parallel), attention_mask, rotary_pos_emb)
    -> (y in x's layout, linear_proj bias or None). rotary_pos_emb: the angles [s, 1 | b, 1, dr] of
    mla_rotary_embedding (GPTModel builds it)."""

    def __init__(self, config, groups, layer_number: int, prefix: Optional[str] = None):
        super().__init__()
        from gigatron.core.parallel.layers import ColumnParallelLinear, RowParallelLinear

        prefix = prefix or f"decoder.layers.{layer_number}.self_attention"
        tp = config.tensor_model_parallel_size
        if groups.tp.size != tp:
            raise ValueError(f"the tensor-parallel group has {groups.tp.size} ranks but "
                             f"--tensor-model-parallel-size is {tp}; build the groups from the same config")
        if groups.cp.size > 1:
            raise ValueError("--multi-latent-attention is not built for --context-parallel-size > 1; use tensor/"
                             "sequence parallelism or drop --context-parallel-size")
        self.config = config
        self.groups = groups
        self.layer_number = layer_number
        self.num_heads = config.num_attention_heads // tp
        self.dn, self.dr, self.dv = config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim
        self.dq = self.dn + self.dr
        self.sequence_parallel = bool(config.sequence_parallel) and tp > 1
        self.softmax_scale = mla_softmax_scale(config)
        self.rope_mscale = mla_rope_mscale(config)
        self.backend = config.resolved_attention_backend
        self.window_size = getattr(config, "window_size", None)
        h, n_all = config.hidden_size, config.num_attention_heads
        init = normal_init_method(config)
        if config.q_lora_rank is None:
            self.linear_q_proj = ColumnParallelLinear(h, n_all * self.dq, config=config, tp=groups.tp, init_method=init,
                                                      bias=False, gather_output=False,
                                                      init_key=prefix + ".linear_q_proj")
        else:
            self.linear_q_down_proj = _ReplicatedLinear(h, config.q_lora_rank, config, prefix + ".linear_q_down_proj",
                                                        self.sequence_parallel)
            self.linear_q_up_proj = ColumnParallelLinear(config.q_lora_rank, n_all * self.dq, config=config,
                                                         tp=groups.tp, init_method=init, bias=False,
                                                         gather_output=False, init_key=prefix + ".linear_q_up_proj")
        self.linear_kv_down_proj = _ReplicatedLinear(h, config.kv_lora_rank + self.dr, config,
                                                     prefix + ".linear_kv_down_proj", self.sequence_parallel)
        self.linear_kv_up_proj = ColumnParallelLinear(config.kv_lora_rank, n_all * (self.dn + self.dv), config=config,
                                                      tp=groups.tp, init_method=init, bias=False, gather_output=False,
                                                      init_key=prefix + ".linear_kv_up_proj")
        if config.qk_layernorm:
            if config.q_lora_rank is not None:
                self.q_layernorm = build_norm(config, config.q_lora_rank, groups, init_key=prefix + ".q_layernorm")
            self.kv_layernorm = build_norm(config, config.kv_lora_rank, groups, init_key=prefix + ".kv_layernorm")
        self.linear_proj = RowParallelLinear(
            n_all * self.dv, h, config=config, tp=groups.tp, init_method=scaled_init_method(config),
            bias=config.add_bias_linear, input_is_parallel=True, skip_bias_add=True, init_key=prefix + ".linear_proj")
        selective = config.recompute_modules if config.recompute_granularity == "selective" else ()
        self.recompute_core_attention = "core_attn" in selective
        self.recompute_up_proj = "mla_up_proj" in selective

    # ------------------------------------------------------------------ projections
    def _latents(self, x: torch.Tensor):
        """x -> (query latent or x, kv latent c [s(/tp), b, rkv], shared rotary key k_r [s, b, dr])."""
        cfg = self.config
        if cfg.q_lora_rank is not None:
            q_latent, _ = self.linear_q_down_proj(x)  # [s(/tp), b, rq]
            if hasattr(self, "q_layernorm"):
                q_latent = self.q_layernorm(q_latent)
        else:
            q_latent = x
        kv, _ = self.linear_kv_down_proj(x)  # [s(/tp), b, rkv + dr]
        c, k_r = torch.split(kv, [cfg.kv_lora_rank, self.dr], dim=-1)
        if hasattr(self, "kv_layernorm"):
            c = self.kv_layernorm(c)
        if self.groups.tp.size > 1:
            from gigatron.core.parallel.mappings import (copy_to_tensor_parallel_region,
                                                         gather_from_sequence_parallel_region)
            if self.sequence_parallel:
                k_r = gather_from_sequence_parallel_region(k_r.contiguous(), self.groups.tp)  # [s, b, dr]
            else:
                k_r = copy_to_tensor_parallel_region(k_r, self.groups.tp)
        return q_latent, c, k_r

    def query_key_value(self, x: torch.Tensor, rotary_pos_emb: Optional[torch.Tensor]):
        """x -> query [s, b, n, dq], key [s, b, n, dq], value [s, b, n, dv]. With --recompute-modules
        mla_up_proj the up-projections and the rotary embedding run under a checkpoint: backward
        recomputes them from the latents instead of keeping their intermediates."""
        if rotary_pos_emb is None:
            raise ValueError("multi-latent attention needs the rotary angles of mla_rotary_embedding "
                             "(GPTModel passes them)")
        q_latent, c, k_r = self._latents(x)
        if self.recompute_up_proj and self.training and torch.is_grad_enabled():
            from gigatron.core.parallel.random import checkpoint
            return checkpoint(self._up_projections, False, q_latent, c, k_r, rotary_pos_emb)
        return self._up_projections(q_latent, c, k_r, rotary_pos_emb)

    def _up_projections(self, q_latent, c, k_r, rotary_pos_emb):
        """Latents -> query, key, value per head, the rotary part rotated."""
        if self.config.q_lora_rank is not None:
            q, _ = self.linear_q_up_proj(q_latent)  # [s, b, n*dq]
        else:
            q, _ = self.linear_q_proj(q_latent)  # [s, b, n*dq]
        kv, _ = self.linear_kv_up_proj(c)  # [s, b, n*(dn+dv)]
        s, b = q.shape[0], q.shape[1]
        q = q.view(s, b, self.num_heads, self.dq)
        kv = kv.view(s, b, self.num_heads, self.dn + self.dv)
        q_nope, q_r = torch.split(q, [self.dn, self.dr], dim=-1)
        k_nope, v = torch.split(kv, [self.dn, self.dv], dim=-1)
        k_r = k_r.unsqueeze(2)  # [s, b, 1, dr]
        q_r = apply_mla_rotary_pos_emb(q_r, rotary_pos_emb, self.rope_mscale)
        k_r = apply_mla_rotary_pos_emb(k_r, rotary_pos_emb, self.rope_mscale)
        query = torch.cat((q_nope, q_r), dim=-1)  # [s, b, n, dq]
        key = torch.cat((k_nope, k_r.expand(-1, -1, self.num_heads, -1)), dim=-1)  # [s, b, n, dq]
        return query, key, v.contiguous()

    # ------------------------------------------------------------------ attention
    def _core_attention(self, query, key, value, attention_mask=None):
        """[s, b, n, dq], [s, b, n, dq], [s, b, n, dv] -> [s, b, n*dv]."""
        dropout_p = self.config.attention_dropout if self.training else 0.0
        s, b = query.shape[0], query.shape[1]
        if self.window_size is not None:
            outside = sliding_window_mask(s, key.shape[0], self.window_size, query.device)
            if attention_mask is None:
                attention_mask = (outside | sliding_window_mask(s, key.shape[0], (-1, 0), query.device))[None, None]
            else:
                attention_mask = attention_mask | outside
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        if dropout_p > 0.0:
            from gigatron.core.parallel.random import get_tracker
            ctx = get_tracker().fork()
        else:
            ctx = nullcontext()
        with ctx:
            out = core_attention(q, k, v, attention_mask, backend=self.backend, dropout_p=dropout_p,
                                 scale=self.softmax_scale, softmax_in_fp32=self.config.attention_softmax_in_fp32)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [b, n, s, dv] -> [s, b, n*dv]

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                rotary_pos_emb: Optional[torch.Tensor] = None, inference_context=None):
        """inference_context: None (training, full sequences), or the latent cache of a generation
        step (see the module docstring): attention_mask is then [b, 1, s_new, kv_len] by the
        caller, or None for causal over the positions the context was given."""
        if inference_context is not None:
            return self.linear_proj(self._cached_attention(x, attention_mask, rotary_pos_emb, inference_context))
        query, key, value = self.query_key_value(x, rotary_pos_emb)
        if self.recompute_core_attention and self.training and torch.is_grad_enabled():
            from gigatron.core.parallel.random import checkpoint
            if attention_mask is None:
                context = checkpoint(self._core_attention, False, query, key, value)
            else:
                context = checkpoint(self._core_attention, False, query, key, value, attention_mask)
        else:
            context = self._core_attention(query, key, value, attention_mask)
        return self.linear_proj(context)

    # ------------------------------------------------------------------ generation (latent cache)
    def _cached_attention(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor],
                          rotary_pos_emb: Optional[torch.Tensor], inference_context) -> torch.Tensor:
        """x [s, b, h] (the new tokens) -> context [s, b, n*dv]: writes the new tokens' latents
        into the cache, then attends over slots 0..kv_len-1 (absorbed for one new token per row,
        expanded otherwise)."""
        if rotary_pos_emb is None:
            raise ValueError("multi-latent attention needs the rotary angles of mla_rotary_embedding "
                             "(GPTModel passes them)")
        q_latent, c, k_r = self._latents(x)  # [s, b, rq | h], [s, b, rkv], [s, b, dr]
        if self.config.q_lora_rank is not None:
            q, _ = self.linear_q_up_proj(q_latent)  # [s, b, n*dq]
        else:
            q, _ = self.linear_q_proj(q_latent)  # [s, b, n*dq]
        s, b = q.shape[0], q.shape[1]
        q_nope, q_r = torch.split(q.view(s, b, self.num_heads, self.dq), [self.dn, self.dr], dim=-1)
        q_r = apply_mla_rotary_pos_emb(q_r, rotary_pos_emb, self.rope_mscale)  # [s, b, n, dr]
        k_r = apply_mla_rotary_pos_emb(k_r.unsqueeze(2), rotary_pos_emb, self.rope_mscale)  # [s, b, 1, dr]
        latent = torch.cat((c.unsqueeze(2).to(k_r.dtype), k_r), dim=-1)  # [s, b, 1, rkv + dr]
        cached, _ = inference_context.store(self.layer_number, latent)  # [kv, b, 1, rkv + dr]
        mask = self._cache_mask(attention_mask, inference_context, s, cached.shape[0], x.device)  # [b|1, 1, s, kv]
        if s == 1:
            return self.absorbed_attention(q_nope, q_r, cached, mask)
        return self.expanded_attention(q_nope, q_r, cached, mask)

    def _cache_mask(self, attention_mask, inference_context, s: int, kv_len: int, device) -> torch.Tensor:
        """The mask over the cache [b | 1, 1, s, kv_len] (True = not attended): the caller's, or
        causal over the context's positions; with --window-size also the slots outside each
        query's window, counted from its position."""
        positions = inference_context.positions  # [b, s]
        if positions is None or positions.shape[1] != s:
            raise ValueError(f"the inference context's positions do not match the {s} new tokens of this step; "
                             "call set_positions with the step's positions first")
        positions = positions.to(device)
        if attention_mask is not None:
            mask = attention_mask
        else:
            mask = torch.arange(kv_len, device=device)[None, None, None, :] > positions[:, None, :, None]
        if self.window_size is not None:
            mask = mask | outside_window(positions, kv_len, self.window_size)
        return mask

    def _kv_up_weights(self):
        """linear_kv_up_proj's weight [n*(dn+dv), rkv] as W_uk [n, dn, rkv] and W_uv [n, dv, rkv]."""
        weight = self.linear_kv_up_proj.weight.view(self.num_heads, self.dn + self.dv, -1)  # [n, dn+dv, rkv]
        return weight[:, : self.dn], weight[:, self.dn:]

    def absorbed_attention(self, q_nope: torch.Tensor, q_r: torch.Tensor, cached: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor:
        """Attention in the latent space: q_nope [s, b, n, dn], rotated q_r [s, b, n, dr], cached
        latents [kv, b, 1, rkv + dr], mask [b | 1, 1, s, kv] -> context [s, b, n*dv]."""
        s, b = q_nope.shape[0], q_nope.shape[1]
        w_uk, w_uv = self._kv_up_weights()
        q_absorbed = torch.einsum("sbnd,ndr->sbnr", q_nope, w_uk)  # [s, b, n, rkv]
        query = torch.cat((q_absorbed, q_r), dim=-1).permute(1, 2, 0, 3)  # [b, n, s, rkv + dr]
        keys = cached.permute(1, 2, 0, 3)  # [b, 1, kv, rkv + dr]
        scores = torch.matmul(query, keys.transpose(-2, -1)).float() * self.softmax_scale  # [b, n, s, kv]
        probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1).to(keys.dtype)
        context = torch.matmul(probs, keys[..., : self.config.kv_lora_rank])  # [b, n, s, rkv]
        out = torch.einsum("bnsr,ndr->sbnd", context, w_uv)  # [s, b, n, dv]
        return out.reshape(s, b, self.num_heads * self.dv)  # [s, b, n*dv]

    def expanded_attention(self, q_nope: torch.Tensor, q_r: torch.Tensor, cached: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor:
        """Per-head keys and values rebuilt from the cached latents, then core attention:
        q_nope [s, b, n, dn], q_r [s, b, n, dr], cached [kv, b, 1, rkv + dr], mask
        [b | 1, 1, s, kv] -> context [s, b, n*dv]."""
        s, b, kv = q_nope.shape[0], q_nope.shape[1], cached.shape[0]
        c, k_r = torch.split(cached[:, :, 0], [self.config.kv_lora_rank, self.dr], dim=-1)  # [kv, b, rkv], [kv, b, dr]
        up, _ = self.linear_kv_up_proj(c)  # [kv, b, n*(dn+dv)]
        k_nope, value = torch.split(up.view(kv, b, self.num_heads, self.dn + self.dv), [self.dn, self.dv], dim=-1)
        key = torch.cat((k_nope, k_r.unsqueeze(2).expand(-1, -1, self.num_heads, -1)), dim=-1)  # [kv, b, n, dq]
        query = torch.cat((q_nope, q_r), dim=-1)  # [s, b, n, dq]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value.contiguous()))  # [b, n, s | kv, d]
        out = core_attention(q, k, v, mask, backend=self.backend, scale=self.softmax_scale,
                             softmax_in_fp32=self.config.attention_softmax_in_fp32)  # [b, n, s, dv]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [s, b, n*dv]
