"""The key/value cache of one generation run (the inference context).

Shape legend: L = layers on this stage, B = max batch, S = max sequence, ng = key/value groups on
this tensor-parallel rank, dk / dv = key / value head dim (equal for standard attention),
b = rows in this step (b <= B), s = new tokens in this step, rkv = kv_lora_rank,
dr = qk_pos_emb_head_dim.

Each layer owns preallocated tensors [B, S, ng, dk] (keys) and [B, S, ng, dv] (values). Slot j of
row r holds the key/value of the token at position j of that row, so a row's cache slot is its
position id. A forward step writes its new keys/values in place at the positions the caller set
(`set_positions`) and attends over slots 0..kv_len-1 with a mask that hides every slot after the
query's own position; slots that hold padding or stale values are therefore never attended. With a
fixed kv_len every decode step has the same shapes, which is what CUDA graphs and torch.compile
need; `decode_kv_bucket` picks that fixed length from a few sizes (256, 512, 1024, ... up to S) so
that a step early in a long cache does not read all S slots of every layer.

What a layer caches (`cache_head_dims`):
  standard attention        keys [B, S, ng, d] and values [B, S, ng, d], d = --kv-channels;
  multi-latent attention    keys only: [B, S, 1, rkv + dr], each token's compressed latent (after
                            kv_layernorm) and its rotated shared rotary key, the same on every
                            tensor-parallel rank (value_head_dim 0: no value tensors). MLA
                            (transformer/mla.py) rebuilds its per-head keys and values from it, or
                            attends in the latent space directly (the absorbed form).
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch

from gigatron.core.transformer.attention import outside_window

__all__ = ["InferenceContext", "cache_head_dims", "causal_cache_mask", "decode_kv_bucket", "decode_kv_buckets",
           "SMALLEST_KV_BUCKET"]

SMALLEST_KV_BUCKET = 256
"""The smallest attention length of a captured decode step; larger ones double up to the cache length."""


def decode_kv_bucket(kv_len: int, max_sequence_length: int, smallest: int = SMALLEST_KV_BUCKET) -> int:
    """The attention length a static-shape decode step uses when it must cover kv_len slots: the
    smallest of smallest, 2 * smallest, 4 * smallest, ... that is >= kv_len, capped at
    max_sequence_length (so the buckets of a cache of S slots are those sizes below S, then S)."""
    if smallest < 1:
        raise ValueError(f"the smallest kv bucket must be >= 1, got {smallest}")
    if not 0 < kv_len <= max_sequence_length:
        raise ValueError(f"kv_len {kv_len} is outside (0, {max_sequence_length}]: the step's positions must "
                         "lie inside the KV cache")
    bucket = smallest
    while bucket < kv_len:
        bucket *= 2
    return min(bucket, max_sequence_length)


def decode_kv_buckets(max_sequence_length: int, smallest: int = SMALLEST_KV_BUCKET) -> list:
    """Every attention length decode_kv_bucket can return for a cache of max_sequence_length slots."""
    sizes, bucket = [], smallest
    while bucket < max_sequence_length:
        sizes.append(bucket)
        bucket *= 2
    return sizes + [max_sequence_length]


def causal_cache_mask(positions: torch.Tensor, kv_len: int, window=None) -> torch.Tensor:
    """positions [b, s] -> bool mask [b, 1, s, kv_len], True where slot j > the query's position
    (Megatron's convention: True = not attended); with window (--window-size LEFT,RIGHT) also the
    slots outside each query's window, counted from that query's own position."""
    mask = torch.arange(kv_len, device=positions.device)[None, None, None, :] > positions[:, None, :, None]
    if window is not None:
        mask = mask | outside_window(positions, kv_len, window)
    return mask  # [b, 1, s, kv_len]


def cache_head_dims(config):
    """What each attention layer of a model with this TransformerConfig caches per token on one
    tensor-parallel rank: (groups, key head dim, value head dim); value head dim 0 means keys only
    (multi-latent attention's latent cache, see the module docstring)."""
    if getattr(config, "multi_latent_attention", False):
        return 1, config.kv_lora_rank + config.qk_pos_emb_head_dim, 0
    return config.num_query_groups // config.tensor_model_parallel_size, config.kv_channels, config.kv_channels


class InferenceContext:
    """Preallocated KV cache for the given layers.

    InferenceContext(layer_numbers, max_batch_size, max_sequence_length, num_groups, head_dim,
                     dtype, device, value_head_dim=None)
      layer_numbers: the (global) layer numbers of the model's layers, e.g.
        [layer.layer_number for layer in model.decoder.layers].
      head_dim: the keys' head size; value_head_dim: the values' (None: head_dim; 0: no values,
        the layers cache keys only).
    set_positions(positions [b, s], kv_len)  before each forward: where the new tokens go.
    store(layer_number, k [s, b, ng, dk], v [s, b, ng, dv] or None) -> (k [kv_len, b, ng, dk],
      v [kv_len, b, ng, dv] or None): views of the cache after writing (called by the attention).
    rows(start, stop) -> a context over rows start..stop-1 (views: writes land in this cache).
    tensors() -> every cache tensor (keys, then values)."""

    def __init__(self, layer_numbers: Iterable[int], max_batch_size: int, max_sequence_length: int,
                 num_groups: int, head_dim: int, dtype: torch.dtype, device, value_head_dim: Optional[int] = None):
        if max_batch_size < 1 or max_sequence_length < 1:
            raise ValueError(f"the KV cache needs max_batch_size >= 1 and max_sequence_length >= 1, got "
                             f"{max_batch_size} and {max_sequence_length}")
        value_head_dim = head_dim if value_head_dim is None else int(value_head_dim)
        if head_dim < 1 or value_head_dim < 0 or num_groups < 1:
            raise ValueError(f"the KV cache needs num_groups >= 1, head_dim >= 1 and value_head_dim >= 0, got "
                             f"{num_groups}, {head_dim} and {value_head_dim}")
        self.max_batch_size = int(max_batch_size)
        self.max_sequence_length = int(max_sequence_length)
        key_shape = (self.max_batch_size, self.max_sequence_length, num_groups, head_dim)  # [B, S, ng, dk]
        value_shape = (self.max_batch_size, self.max_sequence_length, num_groups, value_head_dim)  # [B, S, ng, dv]
        self.key_cache: Dict[int, torch.Tensor] = {}
        self.value_cache: Dict[int, torch.Tensor] = {}  # empty where the layers cache keys only
        for number in layer_numbers:
            self.key_cache[number] = torch.zeros(key_shape, dtype=dtype, device=device)
            if value_head_dim:
                self.value_cache[number] = torch.zeros(value_shape, dtype=dtype, device=device)
        self.positions: Optional[torch.Tensor] = None
        self._rows: Optional[torch.Tensor] = None  # [b, s] row index of each new token
        self.kv_len = self.max_sequence_length

    @classmethod
    def for_model(cls, model, max_batch_size: int, max_sequence_length: int, dtype=None, device=None):
        """A cache sized for a GPTModel (its local layers, its key/value groups on this rank)."""
        groups, key_dim, value_dim = cache_head_dims(model.config)
        param = next(model.parameters())
        return cls([layer.layer_number for layer in model.decoder.layers], max_batch_size, max_sequence_length,
                   groups, key_dim, dtype or param.dtype, device or param.device, value_head_dim=value_dim)

    def tensors(self):
        """Every cache tensor: the keys of each layer, then the values."""
        return (*self.key_cache.values(), *self.value_cache.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def _view(self, key_cache: Dict[int, torch.Tensor], value_cache: Dict[int, torch.Tensor],
              rows: int) -> "InferenceContext":
        """A context of this class over the given cache tensors, positions not set."""
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.max_batch_size = rows
        view.key_cache, view.value_cache = key_cache, value_cache
        view.positions, view._rows, view.kv_len = None, None, self.max_sequence_length
        return view

    def rows(self, start: int, stop: int) -> "InferenceContext":
        """A context over rows start..stop-1 of this cache (views: writes land here)."""
        if not 0 <= start < stop <= self.max_batch_size:
            raise ValueError(f"rows {start}..{stop - 1} are outside the cache's {self.max_batch_size} rows")
        return self._view({k: t[start:stop] for k, t in self.key_cache.items()},
                          {k: t[start:stop] for k, t in self.value_cache.items()}, stop - start)

    def whole(self) -> "InferenceContext":
        """A new context holding this cache's own tensors (not slices of them; torch.compile then
        sees the step mutate its inputs themselves), positions not set."""
        return self._view(dict(self.key_cache), dict(self.value_cache), self.max_batch_size)

    def set_positions(self, positions: torch.Tensor, kv_len: Optional[int] = None) -> None:
        """positions [b, s] (long): the cache slot (= position id) of each new token; kv_len: how
        many slots attention reads (default: all, the static-shape choice)."""
        if positions.dim() != 2:
            raise ValueError(f"positions must be [batch, new tokens], got shape {tuple(positions.shape)}")
        if positions.shape[0] > self.max_batch_size:
            raise ValueError(f"{positions.shape[0]} rows do not fit the KV cache of {self.max_batch_size} rows")
        kv_len = self.max_sequence_length if kv_len is None else int(kv_len)
        if not 0 < kv_len <= self.max_sequence_length:
            raise ValueError(f"kv_len {kv_len} is outside (0, {self.max_sequence_length}]")
        self.positions = positions
        # Built once per forward (not once per layer): every layer writes the same (row, slot) pairs.
        self._rows = torch.arange(positions.shape[0], device=positions.device)[:, None].expand_as(positions)  # [b, s]
        self.kv_len = kv_len

    def attend(self, layer_number: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               pdl: bool = False):
        """A decode step's attention (one new token per row): q [1, b, nq, d], k, v [1, b, ng, d] ->
        context [1, b, nq*d]; writes k, v at the rows' positions and attends over slots
        0..position of each row (one fused kernel on CUDA, see gigatron/core/ops/decode_attention.py;
        pdl: launched with programmatic dependent launch where the GPU has it)."""
        from gigatron.core.ops.decode_attention import decode_attention
        if self.positions is None:
            raise RuntimeError("InferenceContext.set_positions must be called before the forward")
        if q.shape[0] != 1 or self.positions.shape[1] != 1:
            raise ValueError(f"InferenceContext.attend takes one new token per row, got {q.shape[0]}")
        if layer_number not in self.value_cache or k.shape[-1] != v.shape[-1]:
            raise ValueError("InferenceContext.attend runs the decode-attention kernel of standard attention (keys "
                             "and values of one head size); this layer's cache holds other shapes")
        b = q.shape[1]
        out = decode_attention(q[0], k[0], v[0], self.key_cache[layer_number], self.value_cache[layer_number],
                               self.positions[:, 0], self.kv_len, scale, pdl=pdl)  # [b, nq, d]
        return out.reshape(1, b, -1)

    def store(self, layer_number: int, k: torch.Tensor, v: Optional[torch.Tensor] = None):
        if self.positions is None:
            raise RuntimeError("InferenceContext.set_positions must be called before the forward")
        has_values = layer_number in self.value_cache
        if (v is not None) != has_values:
            raise ValueError(f"layer {layer_number}'s cache holds {'keys and values' if has_values else 'keys only'}"
                             f" but the attention stored {'keys only' if v is None else 'keys and values'}")
        b = k.shape[1]
        rows = self._rows
        key_cache = self.key_cache[layer_number]
        key_cache.index_put_((rows, self.positions), k.transpose(0, 1).to(key_cache.dtype))  # [b, s, ng, dk]
        keys = key_cache[:b, : self.kv_len].transpose(0, 1)  # [kv_len, b, ng, dk]
        if not has_values:
            return keys, None
        value_cache = self.value_cache[layer_number]
        value_cache.index_put_((rows, self.positions), v.transpose(0, 1).to(value_cache.dtype))  # [b, s, ng, dv]
        values = value_cache[:b, : self.kv_len].transpose(0, 1)  # [kv_len, b, ng, dv]
        return keys, values
