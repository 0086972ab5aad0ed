"""The recurrent state cache of the Mamba layers, beside the KV cache of the attention layers.

Shape legend: B = max batch (rows or slots), S = max sequence, C = conv channels on this rank
(I + 2GN of the mixer), K = conv kernel width (4), H = Mamba heads on this rank, P = head dim,
N = state dim, b = rows in this step, s = new tokens in this step.

A Mamba layer's whole history is two fixed-size tensors per row, whatever the sequence length:
  conv state [B, C, K-1]  the last K-1 inputs of the short causal convolution (the mixer's x, B and
                          C channels before the convolution), oldest first, in the model's dtype;
  ssm state  [B, H, P, N] the SSD recurrence's state S_t (gigatron/core/ops/ssd.py), fp32.
So a sequence's cache is constant in memory: 2 * layers * (C * (K-1) * element + H * P * N * 4)
bytes, against the attention layers' keys and values that grow with S.

How a forward step uses it (MambaMixer.forward with an inference context): a row whose first new
position is 0 starts from zero states (a new sequence: a reused row or slot is reset by its
prefill, nothing else needs clearing); any other row continues from its cached states. The step
reads the row's s new tokens, of which the first `lengths[r]` are real (set_lengths; None = all s):
  - s > 1 (prefill, or a chunk of one): the convolution runs over [conv state, new inputs] and the
    chunked SSD scan starts from the ssm state; the step size dt of every position past a row's
    length is set to 0, which neither decays nor feeds the state (right padding leaves the state
    as it was after the last real token), and the new conv state is the K-1 inputs before the
    row's length (gathered per row);
  - s = 1 (decode): one recurrent step in plain PyTorch (conv window update, h = exp(dt A) h +
    dt B x, y = C h + D x); a row with length 0 keeps its states (a continuous-batching slot that
    is free or still reading its prompt feeds a padding token that must not reach its state).
Every step writes the new states in place into rows 0..b-1 of the cache (static addresses: the
step can be captured in a CUDA graph).

HybridInferenceContext is the InferenceContext (kv_cache.py) of a Mamba / hybrid model: the KV
cache of its attention layers only, plus `mamba_states` (MambaStateCache). `inference_context_for`
builds the right one for any model; `is_recurrent_model` tells a model with Mamba layers.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch

from gigatron.core.inference.kv_cache import InferenceContext, cache_head_dims

__all__ = ["MambaStateCache", "HybridInferenceContext", "inference_context_for", "is_recurrent_model",
           "mamba_state_bytes_per_row"]


def is_recurrent_model(model) -> bool:
    """Whether the model has Mamba layers (a MambaModel: its decoder knows its layer pattern)."""
    return hasattr(getattr(model, "decoder", None), "local_layer_types")


def _mixers(model) -> List[Tuple[int, object]]:
    """(layer number, mixer) of every local Mamba layer."""
    return [(layer.layer_number, layer.mixer) for layer in model.decoder.layers if hasattr(layer, "mixer")]


def _attention_layer_numbers(model) -> List[int]:
    return [layer.layer_number for layer in model.decoder.layers if hasattr(layer, "self_attention")]


class MambaStateCache:
    """The conv and ssm states of some Mamba layers for B rows (see the module docstring).

    MambaStateCache(shapes, max_batch_size, dtype, device)
      shapes: {layer number: (C, K, H, P, N)}.
    layer(number) -> (conv [b, C, K-1], ssm [b, H, P, N]) of the rows this step runs (views).
    rows(start, stop) -> a MambaStateCache whose tensors are views of rows start..stop-1 (writes
      land in this cache).
    set_lengths(lengths [b] | None), lengths: the real tokens of each row in the next forward.
    reset(rows=None): zero the states of those rows (all by default).
    reorder(index [b]): rows 0..b-1 take the states of rows index (beam search)."""

    def __init__(self, shapes: Dict[int, Tuple[int, int, int, int, int]], max_batch_size: int, dtype, device):
        if max_batch_size < 1:
            raise ValueError(f"the Mamba state cache needs max_batch_size >= 1, got {max_batch_size}")
        self.max_batch_size = int(max_batch_size)
        self.conv: Dict[int, torch.Tensor] = {}
        self.ssm: Dict[int, torch.Tensor] = {}
        for number, (channels, kernel, heads, head_dim, state_dim) in shapes.items():
            self.conv[number] = torch.zeros(self.max_batch_size, channels, kernel - 1, dtype=dtype, device=device)
            self.ssm[number] = torch.zeros(self.max_batch_size, heads, head_dim, state_dim, dtype=torch.float32,
                                           device=device)
        self.lengths: Optional[torch.Tensor] = None
        self.batch = self.max_batch_size

    @classmethod
    def for_model(cls, model, max_batch_size: int, dtype=None, device=None) -> "MambaStateCache":
        param = next(model.parameters())
        shapes = {number: (m.conv_dim, m.conv1d.weight.shape[-1], m.num_heads, m.head_dim, m.state_dim)
                  for number, m in _mixers(model)}
        return cls(shapes, max_batch_size, dtype or param.dtype, device or param.device)

    def tensors(self) -> Iterable[torch.Tensor]:
        return (*self.conv.values(), *self.ssm.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def rows(self, start: int, stop: int) -> "MambaStateCache":
        view = object.__new__(MambaStateCache)
        view.max_batch_size = stop - start
        view.conv = {k: t[start:stop] for k, t in self.conv.items()}
        view.ssm = {k: t[start:stop] for k, t in self.ssm.items()}
        view.lengths = None
        view.batch = view.max_batch_size
        return view

    def set_lengths(self, lengths: Optional[torch.Tensor]) -> None:
        """lengths [b] (long, on the cache's device): how many of each row's new tokens in the next
        forward are real (the rest is right padding; 0: the row's states stay); None: all."""
        if lengths is not None and (lengths.dim() != 1 or lengths.shape[0] > self.max_batch_size):
            raise ValueError(f"lengths must be [rows <= {self.max_batch_size}], got shape {tuple(lengths.shape)}")
        self.lengths = lengths

    def layer(self, number: int, b: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if b > self.max_batch_size:
            raise ValueError(f"{b} rows do not fit the Mamba state cache of {self.max_batch_size} rows")
        return self.conv[number][:b], self.ssm[number][:b]

    def reset(self, rows: Optional[Iterable[int]] = None) -> None:
        for t in self.tensors():
            if rows is None:
                t.zero_()
            else:
                t[torch.as_tensor(list(rows), dtype=torch.long, device=t.device)] = 0

    def reorder(self, index: torch.Tensor) -> None:
        n = index.shape[0]
        for t in self.tensors():
            t[:n] = t[index]


def mamba_state_bytes_per_row(model) -> int:
    """Bytes of one row's (one sequence's) Mamba states on this rank: constant in its length."""
    element = next(model.parameters()).element_size()
    return sum(m.conv_dim * (m.conv1d.weight.shape[-1] - 1) * element + m.num_heads * m.head_dim * m.state_dim * 4
               for _, m in _mixers(model))


class HybridInferenceContext(InferenceContext):
    """The inference context of a Mamba / hybrid model: the KV cache of its attention layers
    (InferenceContext) and `mamba_states`, the MambaStateCache of its Mamba layers.

    rows(start, stop) -> a context over rows start..stop-1 of both caches (views)."""

    def __init__(self, attention_layer_numbers: Iterable[int], mamba_states: MambaStateCache, max_batch_size: int,
                 max_sequence_length: int, num_groups: int, head_dim: int, dtype: torch.dtype, device,
                 value_head_dim: Optional[int] = None):
        super().__init__(attention_layer_numbers, max_batch_size, max_sequence_length, num_groups, head_dim,
                         dtype, device, value_head_dim=value_head_dim)
        self.mamba_states = mamba_states

    @classmethod
    def for_model(cls, model, max_batch_size: int, max_sequence_length: int, dtype=None, device=None):
        param = next(model.parameters())
        groups, key_dim, value_dim = cache_head_dims(model.config)
        return cls(_attention_layer_numbers(model), MambaStateCache.for_model(model, max_batch_size, dtype, device),
                   max_batch_size, max_sequence_length, groups, key_dim, dtype or param.dtype,
                   device or param.device, value_head_dim=value_dim)

    def nbytes(self) -> int:
        return super().nbytes() + self.mamba_states.nbytes()

    def rows(self, start: int, stop: int) -> "HybridInferenceContext":
        view = super().rows(start, stop)
        view.mamba_states = self.mamba_states.rows(start, stop)
        return view


def inference_context_for(model, max_batch_size: int, max_sequence_length: int, dtype=None,
                          device=None) -> InferenceContext:
    """The inference context of a model: a HybridInferenceContext for a model with Mamba layers,
    else the plain KV cache."""
    if is_recurrent_model(model):
        return HybridInferenceContext.for_model(model, max_batch_size, max_sequence_length, dtype, device)
    return InferenceContext.for_model(model, max_batch_size, max_sequence_length, dtype, device)
