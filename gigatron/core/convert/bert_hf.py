"""HuggingFace BERT checkpoints (BertModel, BertForPreTraining, MiniLM) -> Gigatron's BertModel.

Shape legend: h = hidden, f = intermediate (ffn) size, d = head dim, nh = heads, V = vocabulary,
Vp = padded vocabulary.

HuggingFace BERT is the original post-LayerNorm BERT, so it loads into BertModel(layer_norm="post").
Name map (layer i; a "bert." prefix, as in BertForPreTraining, is removed first):

  embeddings.word_embeddings.weight [V, h]          embedding.word_embeddings.weight [Vp, h] (zero rows)
  embeddings.position_embeddings.weight             embedding.position_embeddings.weight
  embeddings.token_type_embeddings.weight           embedding.tokentype_embeddings.weight
  embeddings.LayerNorm.{weight,bias}                embedding.layernorm.*
  encoder.layer.i.attention.self.{query,key,value}  encoder.layers.i.self_attention.linear_qkv.*
        .{weight [h, h], bias}                        (Megatron's per-head [q_j; k_j; v_j] rows)
  encoder.layer.i.attention.output.dense.*          encoder.layers.i.self_attention.linear_proj.*
  encoder.layer.i.attention.output.LayerNorm.*      encoder.layers.i.post_attention_layernorm.*
  encoder.layer.i.intermediate.dense.* [f, h]       encoder.layers.i.mlp.linear_fc1.*
  encoder.layer.i.output.dense.* [h, f]             encoder.layers.i.mlp.linear_fc2.*
  encoder.layer.i.output.LayerNorm.*                encoder.layers.i.post_mlp_layernorm.*
  pooler.dense.*                                    pooler.dense.*
  cls.predictions.transform.dense.*                 lm_head.dense.*
  cls.predictions.transform.LayerNorm.*             lm_head.layer_norm.*
  cls.predictions.bias [V]                          output_layer.bias [Vp] (zero entries)
  cls.seq_relationship.{weight [2, h], bias}        binary_head.*

hidden_act "gelu" is the exact GeLU (ours by default), "gelu_new" the tanh form (--openai-gelu).
A checkpoint without the pre-training heads (a plain BertModel such as MiniLM) leaves the LM head,
pooler and binary head at their seeded initialization; `load_hf_bert` reports which weights came
from the checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from gigatron.core.convert.layout import pad_vocab, qkv_to_grouped
from gigatron.core.parallel import tags
from gigatron.core.parallel.init import local_shard

__all__ = ["read_hf_bert", "bert_config_from_hf", "hf_bert_to_ours", "load_hf_bert", "HFBertLoad"]


def read_hf_bert(path: str) -> tuple[dict, Dict[str, torch.Tensor]]:
    """(config.json as a dict, the weights) of a HuggingFace BERT folder (safetensors or .bin)."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"{path} is not a HuggingFace checkpoint folder: it has no config.json")
    with open(config_file, encoding="utf-8") as handle:
        cfg = json.load(handle)
    if cfg.get("model_type") != "bert":
        raise ValueError(f"{path} holds a {cfg.get('model_type')!r} model, not a BERT (model_type 'bert')")
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    state: Dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file
        for name in files:
            state.update(load_file(os.path.join(path, name)))
    elif os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        state = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path} has no *.safetensors or pytorch_model.bin weights")
    return cfg, state


def bert_config_from_hf(cfg: dict, **overrides):
    """A TransformerConfig for the HF config (overrides win, e.g. tensor_model_parallel_size)."""
    from gigatron.core.transformer.config import TransformerConfig

    act = cfg.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"hidden_act {act!r} is not supported (gelu, gelu_new)")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"position_embedding_type {cfg['position_embedding_type']!r} is not supported (absolute)")
    kwargs = dict(
        num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        num_attention_heads=cfg["num_attention_heads"], ffn_hidden_size=cfg["intermediate_size"],
        max_position_embeddings=cfg["max_position_embeddings"], seq_length=cfg["max_position_embeddings"],
        norm_epsilon=cfg.get("layer_norm_eps", 1e-12), hidden_dropout=cfg.get("hidden_dropout_prob", 0.1),
        attention_dropout=cfg.get("attention_probs_dropout_prob", 0.1),
        init_method_std=cfg.get("initializer_range", 0.02), openai_gelu=act != "gelu")
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def hf_bert_to_ours(cfg: dict, state: Dict[str, torch.Tensor], padded_vocab_size: int) -> Dict[str, torch.Tensor]:
    """HF BERT weights -> full (unsharded) Gigatron BertModel(layer_norm="post") tensors."""
    state = {(k[len("bert."):] if k.startswith("bert.") else k): v for k, v in state.items()}
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim = hidden // heads
    out: Dict[str, torch.Tensor] = {}

    def take(src: str, dst: str, vocab: bool = False) -> None:
        if src in state:
            t = state[src]
            out[dst] = pad_vocab(t, padded_vocab_size) if vocab else t

    take("embeddings.word_embeddings.weight", "embedding.word_embeddings.weight", vocab=True)
    take("embeddings.position_embeddings.weight", "embedding.position_embeddings.weight")
    take("embeddings.token_type_embeddings.weight", "embedding.tokentype_embeddings.weight")
    for p in ("weight", "bias"):
        take(f"embeddings.LayerNorm.{p}", f"embedding.layernorm.{p}")
    for i in range(cfg["num_hidden_layers"]):
        src, dst = f"encoder.layer.{i}.", f"encoder.layers.{i}."
        for p in ("weight", "bias"):
            q, k, v = (state[f"{src}attention.self.{n}.{p}"] for n in ("query", "key", "value"))
            out[f"{dst}self_attention.linear_qkv.{p}"] = qkv_to_grouped(q, k, v, heads, heads, head_dim)
            take(f"{src}attention.output.dense.{p}", f"{dst}self_attention.linear_proj.{p}")
            take(f"{src}attention.output.LayerNorm.{p}", f"{dst}post_attention_layernorm.{p}")
            take(f"{src}intermediate.dense.{p}", f"{dst}mlp.linear_fc1.{p}")
            take(f"{src}output.dense.{p}", f"{dst}mlp.linear_fc2.{p}")
            take(f"{src}output.LayerNorm.{p}", f"{dst}post_mlp_layernorm.{p}")
    for p in ("weight", "bias"):
        take(f"pooler.dense.{p}", f"pooler.dense.{p}")
        take(f"cls.predictions.transform.dense.{p}", f"lm_head.dense.{p}")
        take(f"cls.predictions.transform.LayerNorm.{p}", f"lm_head.layer_norm.{p}")
        take(f"cls.seq_relationship.{p}", f"binary_head.{p}")
    take("cls.predictions.bias", "output_layer.bias", vocab=True)
    return out


@dataclass
class HFBertLoad:
    """What load_hf_bert did: the model, the config dict and the names it filled / left alone."""

    model: torch.nn.Module
    hf_config: dict
    loaded: List[str] = field(default_factory=list)
    not_in_checkpoint: List[str] = field(default_factory=list)


def load_hf_bert(path: str, groups=None, padded_vocab_size: Optional[int] = None, seed: int = 1234,
                 add_binary_head: Optional[bool] = None, **config_overrides) -> HFBertLoad:
    """Build BertModel(layer_norm="post") from a HuggingFace BERT folder and load its weights
    (this rank's tensor-parallel shard of each). The binary head (and pooler) is built when the
    checkpoint has a pooler, unless `add_binary_head` says otherwise."""
    from gigatron.core.models.bert import BertModel
    from gigatron.core.parallel.groups import ParallelGroups

    cfg, state = read_hf_bert(path)
    groups = groups if groups is not None else ParallelGroups.single()
    config = bert_config_from_hf(cfg, tensor_model_parallel_size=groups.tp.size, **config_overrides)
    vocab = cfg["vocab_size"]
    if padded_vocab_size is None:
        padded_vocab_size = -(-vocab // groups.tp.size) * groups.tp.size
    if padded_vocab_size < vocab:
        raise ValueError(f"padded_vocab_size {padded_vocab_size} is smaller than the checkpoint's vocabulary {vocab}")
    tensors = hf_bert_to_ours(cfg, state, padded_vocab_size)
    if add_binary_head is None:
        add_binary_head = "pooler.dense.weight" in tensors
    model = BertModel(config, groups, padded_vocab_size, num_tokentypes=cfg.get("type_vocab_size", 2),
                      add_binary_head=add_binary_head, layer_norm="post", seed=seed)
    result = HFBertLoad(model=model, hf_config=cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            full = tensors.get(name)
            if full is None:
                result.not_in_checkpoint.append(name)
                continue
            if tags.is_tensor_parallel(param):
                rank, size = tags.partition_shard(param)
                full = local_shard(full, tags.partition_dim(param), tags.partition_stride(param), rank, size)
            if tuple(full.shape) != tuple(param.shape):
                raise ValueError(f"{name}: the checkpoint gives shape {tuple(full.shape)}, the model expects "
                                 f"{tuple(param.shape)}; the config.json does not match the weights")
            param.copy_(full)
            result.loaded.append(name)
    unused = sorted(set(tensors) - set(result.loaded))
    if unused:
        raise ValueError(f"checkpoint tensors with no place in the model: {unused}")
    return result
