"""Name mapping between Megatron-Core's checkpoint keys and ours.

Our model's parameter names are Megatron-Core's local-spec names, with the layer number in the
name: `decoder.layers.{i}.self_attention.linear_qkv.weight`. Megatron-Core's torch_dist (its
`sharded_state_dict`) differs in two ways, checked on files written by megatron-core 0.16.1:

- the layers of a block are STACKED under one key with a leading layer axis (global layer
  number): `decoder.layers.self_attention.linear_qkv.weight` of shape [num_layers, rows, hidden];
- the norms that Transformer Engine fuses into the following linear layer are stored under the
  fused names, whichever layer spec wrote them:

      ours                                   Megatron-Core torch_dist (and its TE-spec state dict)
      input_layernorm.{weight,bias}          self_attention.linear_qkv.layer_norm_{weight,bias}
      pre_mlp_layernorm.{weight,bias}        mlp.linear_fc1.layer_norm_{weight,bias}   (dense MLP;
                                             a MoE layer keeps pre_mlp_layernorm)

The rest is the same: embedding.word_embeddings.weight and embedding.position_embeddings.weight,
decoder.final_layernorm.*, output_layer.weight (absent when tied to the embedding), the fused
QKV in Megatron's grouped-row layout and the SwiGLU fc1 as `[gate; up]` (both the tensor-parallel
size 1 layout, which torch_dist's global tensors are), `_extra_state` entries (Transformer Engine
FP8 metadata, pickled bytes) which carry no weights and are never read.
"""

from __future__ import annotations

import re
from typing import Optional

__all__ = ["FUSED_NORMS", "UNFUSED_NORMS", "STACKED_PREFIX", "is_stacked_key", "unstacked_name",
           "stacked_candidates", "split_layer_name"]

FUSED_NORMS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}
UNFUSED_NORMS = {fused: ours for ours, fused in FUSED_NORMS.items()}
STACKED_PREFIX = "decoder.layers."
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def split_layer_name(name: str) -> Optional[tuple[int, str]]:
    """(global layer, suffix) of `decoder.layers.{i}.{suffix}`, else None."""
    match = _LAYER.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def is_stacked_key(key: str) -> bool:
    """A Megatron-Core torch_dist key holding all layers of the decoder (leading layer axis)."""
    return key.startswith(STACKED_PREFIX) and not key[len(STACKED_PREFIX):][:1].isdigit()


def unstacked_name(key: str, layer: int) -> str:
    """Our name for layer `layer` of the stacked Megatron key `key`."""
    suffix = key[len(STACKED_PREFIX):]
    return f"decoder.layers.{layer}.{UNFUSED_NORMS.get(suffix, suffix)}"


def stacked_candidates(suffix: str) -> list[str]:
    """The Megatron-Core keys that may hold our layer parameter `decoder.layers.{i}.{suffix}`, in
    the order to try (a fused norm name first)."""
    keys = [STACKED_PREFIX + suffix]
    if suffix in FUSED_NORMS:
        keys.insert(0, STACKED_PREFIX + FUSED_NORMS[suffix])
    return keys
