"""The key/value cache of one generation run (the inference context).

Shape legend: L = layers on this stage, B = max batch, S = max sequence, ng = key/value groups on
this tensor-parallel rank, d = head dim, b = rows in this step (b <= B), s = new tokens in this step.

Each layer owns two preallocated tensors [B, S, ng, d]. Slot j of row r holds the key/value of the
token at position j of that row, so a row's cache slot is its position id. A forward step writes
its new keys/values in place at the positions the caller set (`set_positions`) and attends over
slots 0..kv_len-1 with a mask that hides every slot after the query's own position; slots that
hold padding or stale values are therefore never attended. With a fixed kv_len every decode step
has the same shapes, which is what CUDA graphs and torch.compile need; `decode_kv_bucket` picks
that fixed length from a few sizes (256, 512, 1024, ... up to S) so that a step early in a long
cache does not read all S slots of every layer.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch

__all__ = ["InferenceContext", "causal_cache_mask", "decode_kv_bucket", "decode_kv_buckets", "SMALLEST_KV_BUCKET"]

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


def causal_cache_mask(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """positions [b, s] -> bool mask [b, 1, s, kv_len], True where slot j > the query's position
    (Megatron's convention: True = not attended)."""
    slots = torch.arange(kv_len, device=positions.device)  # [kv_len]
    return (slots[None, None, None, :] > positions[:, None, :, None])  # [b, 1, s, kv_len]


class InferenceContext:
    """Preallocated KV cache for the given layers.

    InferenceContext(layer_numbers, max_batch_size, max_sequence_length, num_groups, head_dim,
                     dtype, device)
      layer_numbers: the (global) layer numbers of the model's layers, e.g.
        [layer.layer_number for layer in model.decoder.layers].
    set_positions(positions [b, s], kv_len)  before each forward: where the new tokens go.
    store(layer_number, k [s, b, ng, d], v [s, b, ng, d]) -> (k, v) [kv_len, b, ng, d] views of the
      cache after writing (called by SelfAttention)."""

    def __init__(self, layer_numbers: Iterable[int], max_batch_size: int, max_sequence_length: int,
                 num_groups: int, head_dim: int, dtype: torch.dtype, device):
        if max_batch_size < 1 or max_sequence_length < 1:
            raise ValueError(f"the KV cache needs max_batch_size >= 1 and max_sequence_length >= 1, got "
                             f"{max_batch_size} and {max_sequence_length}")
        self.max_batch_size = int(max_batch_size)
        self.max_sequence_length = int(max_sequence_length)
        shape = (self.max_batch_size, self.max_sequence_length, num_groups, head_dim)  # [B, S, ng, d]
        self.key_cache: Dict[int, torch.Tensor] = {}
        self.value_cache: Dict[int, torch.Tensor] = {}
        for number in layer_numbers:
            self.key_cache[number] = torch.zeros(shape, dtype=dtype, device=device)
            self.value_cache[number] = torch.zeros(shape, dtype=dtype, device=device)
        self.positions: Optional[torch.Tensor] = None
        self._rows: Optional[torch.Tensor] = None  # [b, s] row index of each new token
        self.kv_len = self.max_sequence_length

    @classmethod
    def for_model(cls, model, max_batch_size: int, max_sequence_length: int, dtype=None, device=None):
        """A cache sized for a GPTModel (its local layers, its key/value groups on this rank)."""
        config = model.config
        tp = config.tensor_model_parallel_size
        param = next(model.parameters())
        return cls([layer.layer_number for layer in model.decoder.layers], max_batch_size, max_sequence_length,
                   config.num_query_groups // tp, config.kv_channels, dtype or param.dtype, device or param.device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.key_cache.values(), *self.value_cache.values()))

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
        b = q.shape[1]
        out = decode_attention(q[0], k[0], v[0], self.key_cache[layer_number], self.value_cache[layer_number],
                               self.positions[:, 0], self.kv_len, scale, pdl=pdl)  # [b, nq, d]
        return out.reshape(1, b, -1)

    def store(self, layer_number: int, k: torch.Tensor, v: torch.Tensor):
        if self.positions is None:
            raise RuntimeError("InferenceContext.set_positions must be called before the forward")
        key_cache = self.key_cache[layer_number]
        value_cache = self.value_cache[layer_number]
        b = k.shape[1]
        rows = self._rows
        key_cache.index_put_((rows, self.positions), k.transpose(0, 1).to(key_cache.dtype))  # [b, s, ng, d]
        value_cache.index_put_((rows, self.positions), v.transpose(0, 1).to(value_cache.dtype))
        keys = key_cache[:b, : self.kv_len].transpose(0, 1)  # [kv_len, b, ng, d]
        values = value_cache[:b, : self.kv_len].transpose(0, 1)  # [kv_len, b, ng, d]
        return keys, values
