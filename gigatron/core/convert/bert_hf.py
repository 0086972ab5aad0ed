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

__all__ = ["read_hf_bert", "bert_config_from_hf", "hf_bert_to_ours", "load_hf_bert", "HFBertLoad",
           "BERT_WEIGHTS_MESSAGE", "bert_metadata_from_hf", "hf_bert_messages", "save_bert_torch_checkpoint"]


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



# ------------------------------------------------------------------ conversion to the `torch` layout
#
# A BERT conversion is the message stream ("metadata", md), (BERT_WEIGHTS_MESSAGE, tensors),
# ("done", {}), where `tensors` are the full BertModel(layer_norm="post") tensors of
# `hf_bert_to_ours` with the TRUE vocabulary (no padding rows) and md["model_type"] == "BERT".

BERT_WEIGHTS_MESSAGE = "bert weights"


def bert_metadata_from_hf(cfg: dict, params_dtype: str = "float32") -> dict:
    """Conversion metadata (Megatron flag names) of a HuggingFace BERT config.json dict."""
    config = bert_config_from_hf(cfg)  # validates the activation and position embedding type
    heads = cfg["num_attention_heads"]
    return dict(
        model_type="BERT", num_layers=config.num_layers, hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size, num_attention_heads=heads, kv_channels=config.hidden_size // heads,
        group_query_attention=False, num_query_groups=heads, seq_length=cfg["max_position_embeddings"],
        max_position_embeddings=cfg["max_position_embeddings"], position_embedding_type="learned_absolute",
        normalization="LayerNorm", norm_epsilon=config.norm_epsilon, apply_layernorm_1p=False, swiglu=False,
        squared_relu=False, openai_gelu=config.openai_gelu, add_bias_linear=True, add_qkv_bias=False,
        qk_layernorm=False, untie_embeddings_and_output_weights=False,
        attention_dropout=config.attention_dropout, hidden_dropout=config.hidden_dropout,
        bert_layernorm="post", num_tokentypes=int(cfg.get("type_vocab_size", 2)), bert_binary_head=True,
        true_vocab_size=int(cfg["vocab_size"]), make_vocab_size_divisible_by=128, tokenizer_type=None,
        vocab_file=None, merge_file=None, tokenizer_model=None, vocab_size=None, tokenizer_dir=None,
        params_dtype=params_dtype, iteration=None, consumed_train_samples=0, consumed_valid_samples=0,
        hf_config=dict(cfg),
    )


def hf_bert_messages(path: str, dtype: Optional[torch.dtype] = None):
    """The conversion messages of a HuggingFace BERT folder; its tokenizer files go with it."""
    cfg, state = read_hf_bert(path)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    probe = next((v for k, v in state.items() if k.endswith("word_embeddings.weight")), None)
    if probe is None:
        raise ValueError(f"{path} lacks embeddings.word_embeddings.weight; it is not a BERT encoder checkpoint")
    from gigatron.core.convert.protocol import dtype_name

    md = bert_metadata_from_hf(cfg, dtype_name(probe.dtype))
    md["tokenizer_dir"] = os.path.abspath(path)
    yield "metadata", md
    yield BERT_WEIGHTS_MESSAGE, hf_bert_to_ours(cfg, state, int(cfg["vocab_size"]))
    yield "done", {}


def _bert_stream(messages) -> tuple[dict, Dict[str, torch.Tensor]]:
    from gigatron.core.convert.protocol import ConversionError

    it = iter(messages)
    first = next(it, None)
    if first is None or first[0] != "metadata":
        raise ConversionError("the loader sent no metadata message first")
    md = dict(first[1])
    if md.get("model_type") != "BERT":
        raise ConversionError("--model-type BERT: the loader produced a GPT model; use --model-type GPT, or load a "
                              "HuggingFace BERT folder (model_type 'bert') with --loader hf")
    tensors: Dict[str, torch.Tensor] = {}
    done = False
    for name, payload in it:
        if name == BERT_WEIGHTS_MESSAGE:
            tensors.update(payload)
        elif name == "done":
            done = True
        else:
            raise ConversionError(f"unexpected message {name!r} in a BERT conversion")
    if not done:
        raise ConversionError("the loader stopped before its 'done' message")
    return md, tensors


def save_bert_torch_checkpoint(messages, save_dir: str, target_tp: int = 1, target_pp: int = 1,
                               make_vocab_size_divisible_by: Optional[int] = None,
                               params_dtype: Optional[torch.dtype] = None, seed: int = 1234) -> str:
    """Write a BERT message stream as a `torch`-format checkpoint of BertModel(layer_norm="post")
    at tensor-parallel size `target_tp` (<save_dir>/release/mp_rank_TT/model_optim_rng.pt).

    The model pretrain_bert.py builds (binary head on, `num_tokentypes` token types) is made at
    tp = 1 with `seed`; the checkpoint's tensors replace its weights and the ones it lacks (the
    masked-LM head, and the binary head of a plain BertModel) keep that seeded initialization.
    Each parameter is then split as its tensor-parallel tags say. `args` hold the model flags plus
    bert_layernorm, num_tokentypes and the tokenizer flags of the copied tokenizer files. Returns
    the iteration directory."""
    from gigatron.core.checkpoint import torch_layout
    from gigatron.core.checkpoint.header import checkpoint_header
    from gigatron.core.convert.protocol import ConversionError, dtype_name
    from gigatron.core.convert.torch_format import TOKENIZER_DIRNAME, args_for_target, copy_tokenizer_files
    from gigatron.core.models.bert import BertModel
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.core.parallel.init import local_shard
    from gigatron.core.tokenizers import vocab_size_with_padding

    if target_pp != 1:
        raise ValueError(f"--target-pipeline-parallel-size {target_pp}: BERT runs as one pipeline stage; use 1")
    if target_tp < 1:
        raise ValueError(f"--target-tensor-parallel-size must be >= 1, got {target_tp}")
    md, tensors = _bert_stream(messages)
    if make_vocab_size_divisible_by is not None:
        md["make_vocab_size_divisible_by"] = int(make_vocab_size_divisible_by)
    if params_dtype is not None:
        md["params_dtype"] = dtype_name(params_dtype)
    cfg = md["hf_config"]
    heads = md["num_attention_heads"]
    for name, size in (("num_attention_heads", heads), ("ffn_hidden_size", md["ffn_hidden_size"])):
        if size % target_tp != 0:
            raise ValueError(f"--target-tensor-parallel-size {target_tp} does not divide {name} {size}")
    padded = vocab_size_with_padding(int(md["true_vocab_size"]), md["make_vocab_size_divisible_by"], target_tp)
    iter_dir = os.path.join(save_dir, "release")
    if torch_layout.rank_dirs(iter_dir):
        raise ValueError(f"{iter_dir} already holds a checkpoint; its files would mix with the new layout's. "
                         "Choose an empty --save-dir or remove it first")
    full = {k: (pad_vocab(v, padded) if k in ("embedding.word_embeddings.weight", "output_layer.bias") else v)
            for k, v in tensors.items()}
    config = bert_config_from_hf(cfg, tensor_model_parallel_size=1)
    model = BertModel(config, ParallelGroups.single(), padded, num_tokentypes=int(md["num_tokentypes"]),
                      add_binary_head=bool(md["bert_binary_head"]), layer_norm="post", seed=seed)
    own = model.state_dict(keep_vars=True)  # parameters (with their tensor-parallel tags) and buffers
    unused = sorted(set(full) - set(own))
    if unused:
        raise ConversionError(f"checkpoint tensors with no place in BertModel: {unused}")
    seeded = sorted(set(own) - set(full))
    if seeded:
        print(f"BERT conversion: {len(seeded)} tensors are not in the source checkpoint and keep their seeded "
              f"initialization (--seed {seed}): {', '.join(seeded)}", flush=True)
    dtype = getattr(torch, md["params_dtype"])
    os.makedirs(save_dir, exist_ok=True)
    tokenizer_flags = copy_tokenizer_files(md, os.path.join(save_dir, TOKENIZER_DIRNAME))
    args = args_for_target(md, target_tp, 1, padded, tokenizer_flags)
    args.update(bert_layernorm="post", num_tokentypes=int(md["num_tokentypes"]),
                bert_binary_head=bool(md["bert_binary_head"]), seed=seed)
    shards: List[Dict[str, torch.Tensor]] = [{} for _ in range(target_tp)]
    for name, param in own.items():
        if not isinstance(param, torch.Tensor):
            for shard in shards:
                shard[name] = param
            continue
        value = full.get(name, param.detach())
        if tuple(value.shape) != tuple(param.shape):
            raise ConversionError(f"{name}: the checkpoint gives shape {tuple(value.shape)}, BertModel expects "
                                  f"{tuple(param.shape)}; config.json does not match the weights")
        value = value.to(dtype)
        for rank in range(target_tp):
            if tags.is_tensor_parallel(param):
                piece = local_shard(value, tags.partition_dim(param), tags.partition_stride(param), rank, target_tp)
            else:
                piece = value
            shards[rank][name] = piece.contiguous().clone()
    header = checkpoint_header(args, None)
    records = dict(torch_layout.write_rank_file(iter_dir, os.path.join(torch_layout.rank_dir_name(rank, 0, 1),
                                                                       torch_layout.MODEL_FILENAME),
                                                dict(header, model=state_dict))
                   for rank, state_dict in enumerate(shards))
    torch_layout.finish_save(save_dir, iter_dir, None, records)  # checksum manifest, then the tracker
    return iter_dir
