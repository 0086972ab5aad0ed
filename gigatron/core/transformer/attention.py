"""Self-attention: fused QKV projection, RoPE, core attention, output projection.

Shape legend: s = sequence, b = batch, h = hidden, d = head dim (kv_channels),
nq = query heads on this tensor-parallel rank (num_attention_heads / tp),
ng = key/value groups on this rank (num_query_groups / tp), hpg = nq / ng query heads per group.

linear_qkv's logical weight is Megatron's grouped layout: for each key/value group g (in order)
the rows of its hpg query heads, then K_g, then V_g:
    W_qkv = cat_g [Q_g (hpg*d rows); K_g (d rows); V_g (d rows)]
so a contiguous split of the rows over tp ranks gives each rank whole groups (num_query_groups % tp
== 0) and the local output reshapes to [s, b, ng, hpg + 2, d].

Core attention runs torch's scaled_dot_product_attention under the backend chosen by
--attention-backend (or --use-flash-attn), or a plain matmul-softmax (the "local" backend).
With a context-parallel group of more than one rank, core attention is ring_attention from
gigatron/core/transformer/context_parallel.py (--cp-comm-type; causal only, no attention dropout).
The attention mask follows Megatron: a bool tensor [b | 1, 1 | nq, s, s] where True marks a pair
(query, key) that must NOT be attended; it must include causality. Without a mask the attention is
causal. --window-size LEFT,RIGHT (sliding-window attention) adds `sliding_window_mask` to it: the
queries are the last s_q of the s_k key positions (the whole sequence in training, the newest
tokens with a KV cache).
"""

from __future__ import annotations

import functools
import math
import warnings
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gigatron.core.transformer.mlp import normal_init_method, scaled_init_method
from gigatron.core.transformer.norm import build_norm
from gigatron.core.transformer.rope import apply_rotary_pos_emb

__all__ = ["AttentionBackendError", "CoreAttention", "SelfAttention", "check_attention_backend",
           "core_attention", "sliding_window_mask"]


def sliding_window_mask(s_q: int, s_k: int, window, device=None) -> torch.Tensor:
    """[s_q, s_k] bool, True = outside the window: query i (at key position s_k - s_q + i) attends
    key j only when i - LEFT <= j <= i + RIGHT (a side of -1 is unlimited). Causality is not
    included; combine it with the causal or given mask."""
    left, right = window
    q_pos = torch.arange(s_k - s_q, s_k, device=device)[:, None]  # [s_q, 1]
    k_pos = torch.arange(s_k, device=device)[None, :]  # [1, s_k]
    outside = torch.zeros(s_q, s_k, dtype=torch.bool, device=device)
    if left >= 0:
        outside |= k_pos < q_pos - left
    if right >= 0:
        outside |= k_pos > q_pos + right
    return outside


def outside_window(positions: torch.Tensor, kv_len: int, window) -> torch.Tensor:
    """positions [b, s] (a KV-cache step's query positions) -> bool [b, 1, s, kv_len], True where
    slot j lies outside the query's window: position - LEFT <= j <= position + RIGHT (a side of -1
    is unlimited). The cached counterpart of sliding_window_mask, for rows at different positions."""
    left, right = window
    slots = torch.arange(kv_len, device=positions.device)[None, None, None, :]  # [1, 1, 1, kv]
    query = positions[:, None, :, None]  # [b, 1, s, 1]
    outside = torch.zeros(positions.shape[0], 1, positions.shape[1], kv_len, dtype=torch.bool, device=positions.device)
    if left >= 0:
        outside = outside | (slots < query - left)
    if right >= 0:
        outside = outside | (slots > query + right)
    return outside


class AttentionBackendError(RuntimeError):
    """The requested attention backend cannot run with this device, dtype or head size."""


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend
    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]


# Backends whose kernels take fewer key/value heads than query heads (enable_gqa); the others get
# keys and values repeated per query head.
_NATIVE_GQA = ("auto", "flash", "math")


def _repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[b, ng, s, d] -> [b, num_heads, s, d], each group repeated for its query heads."""
    groups = x.shape[1]
    if groups == num_heads:
        return x
    return x.repeat_interleave(num_heads // groups, dim=1)  # [b, nq, s, d]


def _local_attention(q, k, v, attention_mask, dropout_p, scale, softmax_in_fp32):
    """Plain PyTorch attention on [b, n, s, d] tensors (also the reference for the SDPA paths)."""
    k = _repeat_kv(k, q.shape[1])
    v = _repeat_kv(v, q.shape[1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # [b, nq, s, s]
    if softmax_in_fp32:
        scores = scores.float()
    if attention_mask is None:
        s_q, s_k = scores.shape[-2:]
        attention_mask = torch.ones(s_q, s_k, dtype=torch.bool, device=scores.device).triu(1)
    scores = scores.masked_fill(attention_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v)  # [b, nq, s, d]


def core_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   attention_mask: Optional[torch.Tensor] = None, *, backend: str = "auto",
                   dropout_p: float = 0.0, scale: Optional[float] = None,
                   softmax_in_fp32: bool = True) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v on [b, n, s, d] tensors -> [b, nq, s, d].

    q has nq heads, k and v ng heads (nq % ng == 0). attention_mask: bool, True = masked out
    (Megatron's convention); None = causal. backend: auto, flash, cudnn, efficient, math, local."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if backend == "local":
        return _local_attention(q, k, v, attention_mask, dropout_p, scale, softmax_in_fp32)
    num_heads, num_groups = q.shape[1], k.shape[1]
    gqa = num_heads != num_groups
    if gqa and backend not in _NATIVE_GQA:
        k = _repeat_kv(k, num_heads)
        v = _repeat_kv(v, num_heads)
    kwargs = dict(dropout_p=dropout_p, scale=scale)
    if gqa and backend in _NATIVE_GQA:
        kwargs["enable_gqa"] = True
    if attention_mask is None:
        kwargs["is_causal"] = True
    else:
        kwargs["attn_mask"] = ~attention_mask  # SDPA's bool mask marks the pairs that ARE attended
    if backend == "auto":
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel(_sdpa_backend(backend)):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _probe(backend: str, device_type: str, device_index, dtype: torch.dtype, num_heads: int,
           num_groups: int, head_dim: int, with_mask: bool, dropout: bool) -> None:
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    shape_q = (1, num_heads, 8, head_dim)
    shape_kv = (1, num_groups, 8, head_dim)
    q = torch.randn(shape_q, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(shape_kv, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(shape_kv, device=device, dtype=dtype, requires_grad=True)
    mask = None
    if with_mask:
        mask = torch.ones(8, 8, dtype=torch.bool, device=device).triu(1)[None, None]  # [1, 1, 8, 8]
    with warnings.catch_warnings():  # torch warns per rejected kernel; our error says it all
        warnings.simplefilter("ignore")
        out = core_attention(q, k, v, mask, backend=backend, dropout_p=0.1 if dropout else 0.0)
        out.sum().backward()


@functools.lru_cache(maxsize=None)
def _checked_probe(*key) -> None:
    """The probe, cached, leaving the CPU and CUDA generators as they were (a run with and without
    a cached probe must draw the same dropout masks)."""
    devices = [key[2] if key[2] is not None else torch.cuda.current_device()] if key[1] == "cuda" else []
    # The probe runs a backward pass, so it needs autograd even when the first use is under
    # torch.no_grad() (evaluation, generation).
    with torch.random.fork_rng(devices=devices, device_type="cuda"), torch.enable_grad():
        _probe(*key)


def check_attention_backend(config, device: torch.device, dtype: torch.dtype, with_mask: bool = False,
                            dropout: Optional[bool] = None) -> None:
    """Run a tiny forward and backward of the configured attention backend with this device, dtype,
    head size and head counts; raise AttentionBackendError (saying what to change) if it cannot run.
    Results are cached, so calling it before every step costs nothing after the first."""
    backend = config.resolved_attention_backend
    if backend == "local":
        return
    device = torch.device(device)
    if dropout is None:
        dropout = config.attention_dropout > 0
    num_heads = config.num_attention_heads // config.tensor_model_parallel_size
    num_groups = config.num_query_groups // config.tensor_model_parallel_size
    try:
        _checked_probe(backend, device.type, device.index, dtype, num_heads, num_groups,
                       config.kv_channels, bool(with_mask), bool(dropout))
    except Exception as exc:  # any failure of the probe means the real call would fail too
        flag = "--use-flash-attn" if config.use_flash_attn else f"--attention-backend {config.attention_backend}"
        what = "an explicit attention mask (--reset-attention-mask / padding)" if with_mask else "causal masking"
        raise AttentionBackendError(
            f"{flag} cannot run on {device} with dtype {dtype}, head dim {config.kv_channels}, "
            f"{num_heads} query heads / {num_groups} key-value groups per rank and {what}"
            f"{' and attention dropout' if dropout else ''}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. "
            "Use --attention-backend auto (PyTorch picks a kernel that can run), a supported "
            "--bf16/--fp16 dtype or head size, or run on a device that has this kernel.") from exc


class CoreAttention(nn.Module):
    """forward(q [s, b, nq, d], k [s, b, ng, d], v [s, b, ng, d], attention_mask) -> [s, b, nq*d]."""

    def __init__(self, config, groups=None):
        super().__init__()
        self.config = config
        self.backend = config.resolved_attention_backend
        self.dropout_p = config.attention_dropout
        self.scale = 1.0 / math.sqrt(config.kv_channels)
        self.softmax_in_fp32 = config.attention_softmax_in_fp32
        # Context parallelism: this rank holds s/cp tokens (load-balanced chunks) and attends over
        # the whole sequence through gigatron.core.transformer.context_parallel.
        self.cp = groups.cp if groups is not None and groups.cp.size > 1 else None
        self.window_size = getattr(config, "window_size", None)
        if self.cp is not None and self.window_size is not None:
            raise ValueError(f"--window-size {self.window_size} (sliding-window attention) is not supported with "
                             f"--context-parallel-size {self.cp.size}; drop one of them")
        if self.cp is not None and config.attention_dropout > 0.0:
            raise ValueError(
                f"--context-parallel-size {self.cp.size} does not support attention dropout "
                f"(--attention-dropout {config.attention_dropout}); set --attention-dropout 0")

    def _with_window(self, attention_mask, s_q: int, s_k: int, device) -> torch.Tensor:
        """The mask (None = causal) with the pairs outside --window-size masked out as well."""
        outside = sliding_window_mask(s_q, s_k, self.window_size, device)  # [s_q, s_k]
        if attention_mask is None:
            causal = sliding_window_mask(s_q, s_k, (-1, 0), device)
            return (outside | causal)[None, None]  # [1, 1, s_q, s_k]
        return attention_mask | outside

    def _context_parallel(self, q, k, v, attention_mask):
        from gigatron.core.transformer.context_parallel import ring_attention
        if attention_mask is not None:
            raise ValueError("context parallelism supports causal attention only; drop the attention "
                             "mask (--reset-attention-mask) or --context-parallel-size")
        kernel = {"cudnn": "cudnn", "flash": "flash", "math": "math", "local": "math"}.get(self.backend, "auto")
        return ring_attention(q, k, v, self.cp, causal=True, softmax_scale=self.scale,
                              comm_type=self.config.cp_comm_type, kernel=kernel)  # [b, nq, s/cp, d]

    def forward(self, q, k, v, attention_mask: Optional[torch.Tensor] = None,
                window_in_mask: bool = False) -> torch.Tensor:
        """window_in_mask: the mask already holds --window-size (a KV-cache step, whose queries sit
        at each row's own positions: kv_cache.causal_cache_mask); otherwise the window is added
        here for queries that are the last s_q of the s_k keys (a full sequence)."""
        if self.cp is not None:
            s, b = q.shape[0], q.shape[1]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, n, s/cp, d]
            out = self._context_parallel(q, k, v, attention_mask)
            return out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [b, nq, s, d] -> [s, b, nq*d]
        dropout_p = self.dropout_p if self.training else 0.0
        if self.window_size is not None and not window_in_mask:
            attention_mask = self._with_window(attention_mask, q.shape[0], k.shape[0], q.device)
        if not torch.compiler.is_compiling():
            check_attention_backend(self.config, q.device, q.dtype, attention_mask is not None, dropout_p > 0)
        s, b = q.shape[0], q.shape[1]
        q = q.permute(1, 2, 0, 3)  # [b, nq, s, d]
        k = k.permute(1, 2, 0, 3)  # [b, ng, s, d]
        v = v.permute(1, 2, 0, 3)  # [b, ng, s, d]
        # Heads are split over tensor-parallel ranks, so the dropout mask is drawn from the
        # model-parallel RNG stream (different per rank, reproducible under recompute).
        ctx = _model_parallel_rng_fork() if dropout_p > 0.0 else nullcontext()
        with ctx:
            out = core_attention(q, k, v, attention_mask, backend=self.backend, dropout_p=dropout_p,
                                 scale=self.scale, softmax_in_fp32=self.softmax_in_fp32)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [b, nq, s, d] -> [s, b, nq*d]


def _model_parallel_rng_fork():
    from gigatron.core.parallel.random import get_tracker
    return get_tracker().fork()


class SelfAttention(nn.Module):
    """forward(x [s, b, h] (or [s/tp, b, h] with sequence parallel), attention_mask, rotary_pos_emb)
    -> (y in x's layout, linear_proj bias or None)."""

    def __init__(self, config, groups, layer_number: int):
        super().__init__()
        from gigatron.core.parallel.layers import ColumnParallelLinear, RowParallelLinear

        prefix = f"decoder.layers.{layer_number}.self_attention"
        tp = config.tensor_model_parallel_size
        if groups.tp.size != tp:
            raise ValueError(f"the tensor-parallel group has {groups.tp.size} ranks but "
                             f"--tensor-model-parallel-size is {tp}; build the groups from the same config")
        self.config = config
        self.layer_number = layer_number
        self.head_dim = config.kv_channels
        self.num_heads = config.num_attention_heads // tp
        self.num_groups = config.num_query_groups // tp
        self.heads_per_group = config.num_attention_heads // config.num_query_groups
        qkv_size = (config.num_attention_heads + 2 * config.num_query_groups) * self.head_dim
        self.linear_qkv = ColumnParallelLinear(
            config.hidden_size, qkv_size, config=config, tp=groups.tp, init_method=normal_init_method(config),
            bias=config.add_bias_linear or config.add_qkv_bias, gather_output=False, skip_bias_add=False,
            init_key=prefix + ".linear_qkv")
        if config.qk_layernorm:
            # Replicated over tp but each rank normalizes only its heads: the gradient is a partial
            # sum over tp ranks, which the sequence-parallel tag makes finalize_model_grads reduce.
            self.q_layernorm = build_norm(config, self.head_dim, groups, init_key=prefix + ".q_layernorm",
                                          sequence_parallel=tp > 1)
            self.k_layernorm = build_norm(config, self.head_dim, groups, init_key=prefix + ".k_layernorm",
                                          sequence_parallel=tp > 1)
        else:
            self.q_layernorm = None
            self.k_layernorm = None
        self.core_attention = CoreAttention(config, groups)
        self.recompute_core_attention = (config.recompute_granularity == "selective"
                                         and "core_attn" in config.recompute_modules)
        self.linear_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim, config.hidden_size, config=config, tp=groups.tp,
            init_method=scaled_init_method(config), bias=config.add_bias_linear, input_is_parallel=True,
            skip_bias_add=True, init_key=prefix + ".linear_proj")

    def split_qkv(self, mixed: torch.Tensor):
        """[s, b, ng*(hpg+2)*d] -> q [s, b, nq, d], k [s, b, ng, d], v [s, b, ng, d]."""
        s, b = mixed.shape[0], mixed.shape[1]
        mixed = mixed.view(s, b, self.num_groups, self.heads_per_group + 2, self.head_dim)  # [s, b, ng, hpg+2, d]
        q, k, v = torch.split(mixed, [self.heads_per_group, 1, 1], dim=3)
        q = q.reshape(s, b, self.num_heads, self.head_dim)  # [s, b, nq, d]
        k = k.reshape(s, b, self.num_groups, self.head_dim)  # [s, b, ng, d]
        v = v.reshape(s, b, self.num_groups, self.head_dim)  # [s, b, ng, d]
        return q, k, v

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                rotary_pos_emb: Optional[torch.Tensor] = None, inference_context=None):
        """inference_context: None (training, full sequences), or a KV cache
        (gigatron.core.inference.kv_cache.InferenceContext): the new keys and values are written
        into it and attention runs over the cached ones, with attention_mask shaped
        [b, 1, s_new, kv_len] by the caller (kv_cache.causal_cache_mask: by each token's position,
        --window-size included)."""
        mixed, _ = self.linear_qkv(x)  # [s, b, ng*(hpg+2)*d]
        context = self.attend(mixed, attention_mask, rotary_pos_emb, inference_context)  # [s, b, nq*d]
        return self.linear_proj(context)

    def query_key_value(self, mixed: torch.Tensor, rotary_pos_emb: Optional[torch.Tensor] = None):
        """The QKV projection's output [s, b, ng*(hpg+2)*d] -> q [s, b, nq, d], k, v [s, b, ng, d]:
        split, q/k norms, RoPE."""
        q, k, v = self.split_qkv(mixed)
        if self.q_layernorm is not None:
            q = self.q_layernorm(q)
            k = self.k_layernorm(k)
        if rotary_pos_emb is not None:
            interleaved = self.config.rotary_interleaved
            q = apply_rotary_pos_emb(q, rotary_pos_emb, interleaved)
            k = apply_rotary_pos_emb(k, rotary_pos_emb, interleaved)
        return q, k, v

    def attend(self, mixed: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
               rotary_pos_emb: Optional[torch.Tensor] = None, inference_context=None) -> torch.Tensor:
        """The QKV projection's output [s, b, ng*(hpg+2)*d] -> the attention context [s, b, nq*d]
        (query_key_value, the KV cache, core attention)."""
        q, k, v = self.query_key_value(mixed, rotary_pos_emb)
        if inference_context is not None:
            k, v = inference_context.store(self.layer_number, k, v)  # [kv_len, b, ng, d] each
            # The caller's mask is over the cache, by position, window included (causal_cache_mask).
            return self.core_attention(q, k, v, attention_mask, window_in_mask=True)  # [s, b, nq*d]
        if self.recompute_core_attention and self.training and torch.is_grad_enabled():
            from gigatron.core.parallel.random import checkpoint
            if attention_mask is None:
                return checkpoint(self.core_attention, False, q, k, v)
            return checkpoint(self.core_attention, False, q, k, v, attention_mask)
        return self.core_attention(q, k, v, attention_mask)  # [s, b, nq*d]
