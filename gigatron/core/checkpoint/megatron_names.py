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
      pre_mlp_layernorm.{weight,bias}        mlp.linear_fc1.layer_norm_{weight,bias}   (MoE layers too)

- routed experts (SequentialMLP) are stacked twice: `decoder.layers.mlp.experts.experts.linear_fc1.weight`
  of shape [num_layers, num_experts, rows, cols] (global expert number, whatever the writer's
  expert-parallel size) holds our `decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight`;
  the router is `decoder.layers.mlp.router.weight` [num_layers, num_experts, hidden].

BERT and T5 (Megatron-Core's BertModel and T5Model) stack their `encoder.layers.*` the same way
(`encoder.layers.self_attention.linear_qkv.weight` [num_layers, rows, hidden], the same fused-norm
names); T5's decoder layers add `pre_cross_attn_layernorm.*` and `cross_attention.(linear_q |
linear_kv | linear_proj).*`, stored as they are. T5Model registers its output layer and position
embedding twice, so its torch_dist also holds `output_layer.bias` (a copy of
`lm_head.output_layer.bias`) and `position_embeddings.weight` (a copy of
`embedding.position_embeddings.weight`): `ALIASES` names them; they are skipped on reading and
written as copies.

The rest is the same: embedding.word_embeddings.weight and embedding.position_embeddings.weight,
decoder.final_layernorm.*, output_layer.weight (absent when tied to the embedding), the fused
QKV in Megatron's grouped-row layout and the SwiGLU fc1 as `[gate; up]` (both the tensor-parallel
size 1 layout, which torch_dist's global tensors are), `_extra_state` entries (Transformer Engine
FP8 metadata, pickled bytes) which carry no weights and are never read.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

__all__ = ["FUSED_NORMS", "UNFUSED_NORMS", "STACKED_PREFIX", "BLOCK_PREFIXES", "EXPERTS_PREFIX", "ALIASES",
           "is_stacked_key", "stacked_axes", "unstacked_name", "stacked_candidates", "split_layer_name",
           "split_block_name", "aliases_in", "is_legacy_bert", "flatten", "nest", "legacy_to_ours", "ours_to_legacy",
           "legacy_qkv_to_ours", "MAMBA_FUSED_NORMS", "HYBRID_FUSED_NORMS", "HYBRID_UNFUSED_NORMS", "MAMBA_PARTS",
           "hybrid_key", "hybrid_parts", "holds_hybrid_layers", "hybrid_to_ours", "ours_to_hybrid"]

FUSED_NORMS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}
UNFUSED_NORMS = {fused: ours for ours, fused in FUSED_NORMS.items()}
STACKED_PREFIX = "decoder.layers."
BLOCK_PREFIXES = (STACKED_PREFIX, "encoder.layers.")  # GPT's decoder; BERT's encoder; T5's both
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_BLOCK_LAYER = re.compile(r"^((?:en|de)coder\.layers\.)(\d+)\.(.+)$")
# Megatron-Core key -> the key it copies (T5Model's second registration of the same module).
ALIASES = {"output_layer.bias": "lm_head.output_layer.bias",
           "position_embeddings.weight": "embedding.position_embeddings.weight"}


def split_layer_name(name: str) -> Optional[tuple[int, str]]:
    """(global layer, suffix) of `decoder.layers.{i}.{suffix}`, else None."""
    match = _LAYER.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def split_block_name(name: str) -> Optional[tuple[str, int, str]]:
    """(block prefix, global layer, suffix) of `{encoder|decoder}.layers.{i}.{suffix}`, else None."""
    match = _BLOCK_LAYER.match(name)
    return (match.group(1), int(match.group(2)), match.group(3)) if match else None


def aliases_in(keys) -> set:
    """The keys of a Megatron-Core checkpoint that copy another key also present (T5Model's)."""
    keys = set(keys)
    return {alias for alias, real in ALIASES.items() if alias in keys and real in keys}


EXPERTS_PREFIX = STACKED_PREFIX + "mlp.experts.experts."
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")


def _block_of(key: str) -> Optional[str]:
    return next((p for p in BLOCK_PREFIXES if key.startswith(p)), None)


def is_stacked_key(key: str) -> bool:
    """A Megatron-Core torch_dist key holding all layers of a block (leading layer axis)."""
    block = _block_of(key)
    return block is not None and not key[len(block):][:1].isdigit()


def stacked_axes(key: str) -> int:
    """How many leading axes of a Megatron-Core key index layers (and experts): 0, 1, or 2 for the
    routed experts (`decoder.layers.mlp.experts.experts.*`: [layer, global expert, ...])."""
    if not is_stacked_key(key):
        return 0
    return 2 if key.startswith(EXPERTS_PREFIX) else 1


def unstacked_name(key: str, index: tuple) -> str:
    """Our name for entry `index` ((layer,) or (layer, expert)) of the stacked Megatron key `key`."""
    if key.startswith(EXPERTS_PREFIX):
        layer, expert = index
        return f"decoder.layers.{layer}.mlp.experts.local_experts.{expert}.{key[len(EXPERTS_PREFIX):]}"
    block = _block_of(key)
    suffix = key[len(block):]
    return f"{block}{index[0]}.{UNFUSED_NORMS.get(suffix, suffix)}"


def stacked_candidates(suffix: str, block: str = STACKED_PREFIX) -> list[tuple[str, tuple]]:
    """(Megatron-Core key, offsets after the layer axis) that may hold our layer parameter
    `{block}{i}.{suffix}` (block: `decoder.layers.` or `encoder.layers.`), in the order to try (a
    fused norm name first); a routed expert's global number is the offset along the experts key's
    second axis."""
    expert = _LOCAL_EXPERT.match(suffix)
    if expert and block == STACKED_PREFIX:
        return [(EXPERTS_PREFIX + expert.group(2), (int(expert.group(1)),))]
    keys = [(block + suffix, ())]
    if suffix in FUSED_NORMS:
        keys.insert(0, (block + FUSED_NORMS[suffix], ()))
    return keys


# ------------------------------------------------------------------ pre-Megatron-Core ("legacy") names
#
# Megatron-LM before Megatron-Core (megatron/model/, the published 345M GPT and BERT checkpoints)
# saves a nested state dict; flattened with dots, a GPT rank file's `model` holds
#
#   language_model.embedding.word_embeddings.weight        embedding.word_embeddings.weight
#   language_model.embedding.position_embeddings.weight    embedding.position_embeddings.weight
#   language_model.encoder.layers.{i}.                     decoder.layers.{i}.   (older: .transformer.)
#       input_layernorm.{weight,bias}                          input_layernorm.*
#       self_attention.query_key_value.{weight,bias}           self_attention.linear_qkv.*  (older: attention.)
#       self_attention.dense.{weight,bias}                     self_attention.linear_proj.*
#       post_attention_layernorm.{weight,bias}                 pre_mlp_layernorm.*
#       mlp.dense_h_to_4h.{weight,bias}                        mlp.linear_fc1.*
#       mlp.dense_4h_to_h.{weight,bias}                        mlp.linear_fc2.*
#   language_model.encoder.final_layernorm.{weight,bias}   decoder.final_layernorm.*
#   language_model.output_layer.weight                     output_layer.weight  (untied)
#   word_embeddings_for_head.weight                        output_layer.weight  (tied copy, last stage)
#
# A BERT rank file (megatron/model/bert_model.py) holds the same `language_model` (its layers become
# our `encoder.layers.{i}.`, its final norm `encoder.final_layernorm.*`) plus
#
#   language_model.embedding.tokentype_embeddings.weight   embedding.tokentype_embeddings.weight
#   language_model.pooler.dense.{weight,bias}              pooler.dense.*
#   lm_head.dense.{weight,bias}                            lm_head.dense.*
#   lm_head.layernorm.{weight,bias}                        lm_head.layer_norm.*
#   lm_head.bias  [V/tp per rank]                          output_layer.bias
#   binary_head.{weight,bias}                              binary_head.*   (with the binary head)
#
# The fused QKV rows are per head [q; k; v] (per query group with GQA) from checkpoint_version 2.0
# on, which is Megatron-Core's layout; version 0 stored [all q; all k; all v] and version 1.0
# [head][head dim][q, k, v] (legacy_qkv_to_ours reorders both).

LEGACY_LAYER_NAMES = {
    "input_layernorm": "input_layernorm",
    "self_attention.query_key_value": "self_attention.linear_qkv",
    "attention.query_key_value": "self_attention.linear_qkv",
    "self_attention.dense": "self_attention.linear_proj",
    "attention.dense": "self_attention.linear_proj",
    "post_attention_layernorm": "pre_mlp_layernorm",
    "mlp.dense_h_to_4h": "mlp.linear_fc1",
    "mlp.dense_4h_to_h": "mlp.linear_fc2",
}
OUR_LAYER_NAMES = {ours: legacy for legacy, ours in LEGACY_LAYER_NAMES.items()
                   if not legacy.startswith("attention.")}
_LEGACY_LAYER = re.compile(r"^language_model\.(?:encoder|transformer)\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_LEGACY_OTHER = {
    "language_model.embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
    "language_model.embedding.position_embeddings.weight": "embedding.position_embeddings.weight",
    "language_model.encoder.final_layernorm.weight": "decoder.final_layernorm.weight",
    "language_model.encoder.final_layernorm.bias": "decoder.final_layernorm.bias",
    "language_model.transformer.final_layernorm.weight": "decoder.final_layernorm.weight",
    "language_model.transformer.final_layernorm.bias": "decoder.final_layernorm.bias",
    "language_model.output_layer.weight": "output_layer.weight",
    "word_embeddings_for_head.weight": "output_layer.weight",
}


_LEGACY_BERT_OTHER = {
    "language_model.embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
    "language_model.embedding.position_embeddings.weight": "embedding.position_embeddings.weight",
    "language_model.embedding.tokentype_embeddings.weight": "embedding.tokentype_embeddings.weight",
    "language_model.encoder.final_layernorm.weight": "encoder.final_layernorm.weight",
    "language_model.encoder.final_layernorm.bias": "encoder.final_layernorm.bias",
    "language_model.transformer.final_layernorm.weight": "encoder.final_layernorm.weight",
    "language_model.transformer.final_layernorm.bias": "encoder.final_layernorm.bias",
    "language_model.pooler.dense.weight": "pooler.dense.weight",
    "language_model.pooler.dense.bias": "pooler.dense.bias",
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.layernorm.weight": "lm_head.layer_norm.weight",
    "lm_head.layernorm.bias": "lm_head.layer_norm.bias",
    "lm_head.bias": "output_layer.bias",
    "binary_head.weight": "binary_head.weight",
    "binary_head.bias": "binary_head.bias",
}
_OUR_BERT_OTHER = {ours: legacy for legacy, ours in _LEGACY_BERT_OTHER.items() if ".transformer." not in legacy}


def is_legacy_bert(names) -> bool:
    """Flattened legacy names of a BERT (its masked-LM head `lm_head.*`; a GPT has none)."""
    return any(name.startswith("lm_head.") for name in names)


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested state dict as {dotted name: value}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def legacy_to_ours(name: str, bert: bool = False) -> Optional[str]:
    """Our name for a flattened legacy name, or None if it is not a GPT (`bert`: BERT) weight we know."""
    table = _LEGACY_BERT_OTHER if bert else _LEGACY_OTHER
    if name in table:
        return table[name]
    match = _LEGACY_LAYER.match(name)
    if match and match.group(2) in LEGACY_LAYER_NAMES:
        block = "encoder" if bert else "decoder"
        return f"{block}.layers.{match.group(1)}.{LEGACY_LAYER_NAMES[match.group(2)]}.{match.group(3)}"
    return None


def ours_to_legacy(name: str, tied_head: bool = False) -> str:
    """The flattened legacy name of one of our (stage-local) names. `tied_head`: the last stage's
    copy of a tied embedding (`word_embeddings_for_head.weight`)."""
    if name == "output_layer.weight" and tied_head:
        return "word_embeddings_for_head.weight"
    if name in _OUR_BERT_OTHER and (name.startswith(("encoder.", "lm_head.", "pooler.", "binary_head."))
                                    or name in ("output_layer.bias", "embedding.tokentype_embeddings.weight")):
        return _OUR_BERT_OTHER[name]
    for legacy, ours in _LEGACY_OTHER.items():
        if ours == name and ".transformer." not in legacy and not legacy.startswith("word_embeddings_for_head"):
            return legacy
    split = split_block_name(name)
    if split is not None:
        _, layer, suffix = split
        module, _, leaf = suffix.rpartition(".")
        if module in OUR_LAYER_NAMES:
            return f"language_model.encoder.layers.{layer}.{OUR_LAYER_NAMES[module]}.{leaf}"
    raise KeyError(f"{name} has no pre-Megatron-Core (legacy) name")


def nest(flat: dict) -> dict:
    """{dotted name: value} as the nested dict legacy Megatron-LM saves: the language model's
    `embedding` as `{word_embeddings: {weight}}`, `encoder` and `output_layer` as flat state dicts."""
    tree: dict = {}
    for name, value in flat.items():
        if name.startswith("language_model.embedding."):
            module, leaf = name[len("language_model.embedding."):].rsplit(".", 1)
            tree.setdefault("language_model", {}).setdefault("embedding", {}).setdefault(module, {})[leaf] = value
        elif name.startswith("language_model."):
            part, rest = name[len("language_model."):].split(".", 1)
            tree.setdefault("language_model", {}).setdefault(part, {})[rest] = value
        else:
            part, rest = name.split(".", 1)
            tree.setdefault(part, {})[rest] = value
    return tree


def legacy_qkv_to_ours(tensor, version: float, head_dim: int):
    """A rank's fused QKV weight or bias of checkpoint_version `version` in the per-head [q; k; v]
    row order (versions >= 2.0 already are)."""
    if version >= 2.0:
        return tensor
    rows = tensor.shape[0]
    heads = rows // (3 * head_dim)
    rest = tuple(tensor.shape[1:])
    if version < 1.0:  # [3][heads][head_dim] -> [heads][3][head_dim]
        ordered = tensor.reshape(3, heads, head_dim, *rest).transpose(0, 1)
    else:  # [heads][head_dim][3] -> [heads][3][head_dim]
        ordered = tensor.reshape(heads, head_dim, 3, *rest).transpose(1, 2)
    return ordered.reshape(rows, *rest).contiguous()


# ------------------------------------------------------------------ Mamba / hybrid models (MambaModel)
#
# Megatron-Core's MambaStack (megatron/core/ssm/mamba_block.py, 0.16.1) does NOT stack its layers
# in torch_dist: each layer of a hybrid model, Mamba, attention or MLP alike, is stored under its
# own global number (`decoder.layers.{i}.…`, no layer axis). Its one layer spec is Transformer
# Engine's, so every norm before a linear layer has the fused name, the Mamba layer's too:
#
#   ours (MambaModel)                          Megatron-Core (torch_dist key, and `torch` state dict)
#   decoder.layers.{i}.norm.weight             decoder.layers.{i}.mixer.in_proj.layer_norm_weight
#   decoder.layers.{i}.input_layernorm.*       decoder.layers.{i}.self_attention.linear_qkv.layer_norm_*
#   decoder.layers.{i}.pre_mlp_layernorm.*     decoder.layers.{i}.mlp.linear_fc1.layer_norm_*
#   decoder.layers.{i}.mixer.{A_log, D, dt_bias, norm.weight, out_proj.weight}   the same
#   decoder.final_norm.weight                  the same
#
# and the mixer's fused tensors are split into their parts, each a global tensor of its own (the
# mixer's sharded_state_dict splits each rank's [z_r; x_r; B_r; C_r; dt_r] and shards every part
# evenly over the tensor-parallel ranks, so a part's global tensor is its tp=1 rows):
#
#   mixer.in_proj.weight [z; x; B; C; dt]      mixer.in_proj.weight.z, .x, .B, .C, .dt
#   mixer.conv1d.weight / .bias [x; B; C]      mixer.conv1d.weight.x, .B, .C (and .bias.x, .B, .C)
#
# In Megatron's `torch` rank files the layers are numbered within the pipeline stage and the fused
# tensors are whole, each rank's rows [z_r; x_r; B_r; C_r; dt_r] (tp_layout.py merges and splits them).

MAMBA_FUSED_NORMS = {"norm.weight": "mixer.in_proj.layer_norm_weight", "norm.bias": "mixer.in_proj.layer_norm_bias"}
HYBRID_FUSED_NORMS = {**FUSED_NORMS, **MAMBA_FUSED_NORMS}
HYBRID_UNFUSED_NORMS = {fused: ours for ours, fused in HYBRID_FUSED_NORMS.items()}
MAMBA_PARTS = {"mixer.in_proj.weight": ("z", "x", "B", "C", "dt"), "mixer.conv1d.weight": ("x", "B", "C"),
               "mixer.conv1d.bias": ("x", "B", "C")}
_PER_LAYER_KEY = re.compile(r"^(decoder\.layers\.\d+\.)(.+)$")


def hybrid_key(name: str) -> str:
    """Megatron-Core's per-layer key of our (global) name in a hybrid model; for a split mixer
    tensor the key its parts extend (`….mixer.in_proj.weight` -> `….mixer.in_proj.weight.z`, …)."""
    match = _PER_LAYER_KEY.match(name)
    if match is None:
        return name
    return match.group(1) + HYBRID_FUSED_NORMS.get(match.group(2), match.group(2))


def hybrid_parts(name: str) -> Optional[tuple]:
    """The part names (z, x, B, C, dt / x, B, C) Megatron-Core splits the mixer tensor `name` into, else None."""
    match = _PER_LAYER_KEY.match(name)
    return MAMBA_PARTS.get(match.group(2)) if match else None


def holds_hybrid_layers(keys) -> bool:
    """Whether Megatron-Core keys are a MambaStack's: layers under their own numbers, not stacked."""
    return any(_PER_LAYER_KEY.match(key) for key in keys)


def hybrid_to_ours(tensors: dict) -> dict:
    """A hybrid model's tensors under Megatron-Core's per-layer keys (fused norms, split mixer
    tensors) as ours: norms unfused, each split tensor the concatenation of its parts in order."""
    out, parts = {}, {}
    for key, tensor in tensors.items():
        match = _PER_LAYER_KEY.match(key)
        if match is None:
            out[key] = tensor
            continue
        base, _, part = key.rpartition(".")
        split = _PER_LAYER_KEY.match(base)
        if split is not None and part in MAMBA_PARTS.get(split.group(2), ()):
            parts.setdefault(base, {})[part] = tensor
            continue
        out[match.group(1) + HYBRID_UNFUSED_NORMS.get(match.group(2), match.group(2))] = tensor
    for base, found in parts.items():
        order = MAMBA_PARTS[_PER_LAYER_KEY.match(base).group(2)]
        missing = [p for p in order if p not in found]
        if missing:
            raise KeyError(f"{base} is stored in parts {order}, but {', '.join(f'{base}.{p}' for p in missing)} "
                           "are missing")
        out[base] = torch.cat([found[p] for p in order], dim=0)
    return out


def ours_to_hybrid(tensors: dict, segments_of) -> dict:
    """Our hybrid model's tensors (global names) under Megatron-Core's per-layer keys; a split mixer
    tensor becomes its parts, `segments_of(name)` giving the parts' row counts (tp_layout.mamba_segments)."""
    out = {}
    for name, tensor in tensors.items():
        key, parts = hybrid_key(name), hybrid_parts(name)
        if parts is None:
            out[key] = tensor
            continue
        sizes = list(segments_of(name))
        if len(sizes) != len(parts) or sum(sizes) != tensor.shape[0]:
            raise ValueError(f"{name} has {tensor.shape[0]} rows; its parts {parts} are {sizes} rows")
        for part, chunk in zip(parts, torch.split(tensor, sizes, dim=0)):
            out[f"{key}.{part}"] = chunk.contiguous()
    return out
