"""HuggingFace checkpoints (GPT-2, Llama 2/3, Mistral, Mixtral) <-> the conversion messages.
Mixtral is Mistral with mixture-of-experts MLPs; its expert and router map is in mixtral.py.

Shape legend: h = hidden, f = ffn hidden, d = head dim, nh = query heads, ng = key/value heads,
V = vocabulary.

Name and layout map (layer i; Gigatron names under `decoder.layers.i.`):

Llama / Mistral                                 Gigatron
  model.embed_tokens.weight [V, h]                embedding.word_embeddings.weight
  model.layers.i.input_layernorm.weight           input_layernorm.weight          (RMSNorm)
  self_attn.{q,k,v}_proj.{weight,bias}            self_attention.linear_qkv.*     (grouped per KV head:
                                                  [q of the group's heads; k_g; v_g] for g in 0..ng-1)
  self_attn.o_proj.{weight,bias}                  self_attention.linear_proj.*
  model.layers.i.post_attention_layernorm.weight  pre_mlp_layernorm.weight
  mlp.gate_proj, mlp.up_proj [f, h] each          mlp.linear_fc1.* = [gate; up] [2f, h] (SwiGLU)
  mlp.down_proj [h, f]                            mlp.linear_fc2.*
  model.norm.weight                               decoder.final_layernorm.weight
  lm_head.weight (absent when tied)               output_layer.weight (untied only)
  RoPE is the half-split (non-interleaved) layout in both; rope_theta -> rotary_base,
  rms_norm_eps -> norm_epsilon, num_key_value_heads -> num_query_groups (GQA).

GPT-2 (Conv1D weights are stored [in, out]: transposed both ways)
  wte.weight / wpe.weight                         embedding.word_embeddings / position_embeddings
  h.i.ln_1.{weight,bias}                          input_layernorm.*               (LayerNorm)
  h.i.attn.c_attn.{weight [h, 3h], bias}          self_attention.linear_qkv.*     ([q|k|v] columns ->
                                                  Megatron's per-head [q_j; k_j; v_j] rows, ng = nh)
  h.i.attn.c_proj.*                               self_attention.linear_proj.*
  h.i.ln_2.*                                      pre_mlp_layernorm.*
  h.i.mlp.c_fc.* / h.i.mlp.c_proj.*               mlp.linear_fc1.* / mlp.linear_fc2.*
  ln_f.*                                          decoder.final_layernorm.*
  gelu_new (tanh approximation) -> --openai-gelu; embeddings tied.

Every transform is a transpose, reshape, split or concatenation, so HF -> Gigatron -> HF gives
bitwise identical tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import warnings
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import torch

from gigatron.core.checkpoint.formats import is_hf_folder
from gigatron.core.checkpoint.io import atomic_write_bytes, atomic_write_text
from gigatron.core.convert.layout import compact, grouped_to_qkv, qkv_to_grouped
from gigatron.core.convert.protocol import (
    ConversionError,
    Message,
    MessageReader,
    dtype_from_name,
    dtype_name,
    layer_message,
)

__all__ = [
    "FAMILIES",
    "HFWeights",
    "is_hf_checkpoint",
    "read_hf_config",
    "metadata_from_hf_config",
    "hf_config_from_metadata",
    "infer_family",
    "hf_messages",
    "save_hf_checkpoint",
    "export_tokenizer",
]

FAMILIES = ("gpt2", "llama", "mistral", "mixtral")
_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "mixtral": "MixtralForCausalLM"}
_DEFAULT_SHARD_BYTES = 5 * 1024 ** 3


# ------------------------------------------------------------------ reading HF folders


def is_hf_checkpoint(path: str) -> bool:
    """A folder with a config.json and HuggingFace weight files (the checkpoint registry decides)."""
    return is_hf_folder(path)


def read_hf_config(path: str) -> dict:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ConversionError(f"{path} has no config.json; it is not a HuggingFace model folder")
    with open(config_path, encoding="utf-8") as handle:
        return json.load(handle)


class HFWeights:
    """Lazy access to the tensors of a HuggingFace folder (safetensors, sharded or not, or
    pytorch_model.bin files)."""

    def __init__(self, path: str):
        self.path = path
        self._where: Dict[str, str] = {}
        self._bin_cache: Dict[str, dict] = {}
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index_path = os.path.join(path, index_name)
            if os.path.isfile(index_path):
                with open(index_path, encoding="utf-8") as handle:
                    weight_map = json.load(handle)["weight_map"]
                self._where = {name: os.path.join(path, f) for name, f in weight_map.items()}
                return
        for single in ("model.safetensors", "pytorch_model.bin"):
            file = os.path.join(path, single)
            if os.path.isfile(file):
                self._where = {name: file for name in self._file_keys(file)}
                return
        raise ConversionError(f"{path} holds no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")

    def _file_keys(self, file: str) -> List[str]:
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt") as handle:
                return list(handle.keys())
        return list(self._load_bin(file))

    def _load_bin(self, file: str) -> dict:
        # One .bin file memory-mapped at a time (shards are read in order).
        if file not in self._bin_cache:
            self._bin_cache = {file: torch.load(file, map_location="cpu", weights_only=True, mmap=True)}
        return self._bin_cache[file]

    def keys(self) -> List[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of tensor `name`, without reading its data from a safetensors file."""
        file = self._where[name]
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt") as handle:
                code = handle.get_slice(name).get_dtype()
            names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
            if code not in names:
                raise ConversionError(f"{name} is stored as {code}; only floating-point weights are converted")
            return dtype_from_name(names[code])
        return self._load_bin(file)[name].dtype

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ConversionError(f"{self.path} lacks the tensor {name}")
        file = self._where[name]
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt") as handle:
                return handle.get_tensor(name)
        return self._load_bin(file)[name]


# ------------------------------------------------------------------ configs


def _family(cfg: dict) -> str:
    family = cfg.get("model_type")
    if family == "bert":
        raise ConversionError("this HuggingFace folder holds a BERT (model_type 'bert'): convert it with "
                              "--model-type BERT --loader hf --saver core")
    if family not in FAMILIES:
        raise ConversionError(f"HuggingFace model_type {family!r} is not supported; supported: {', '.join(FAMILIES)}")
    return family


def _rope_scaling(cfg: dict) -> dict:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or params.get("type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in ("default", "linear", "llama3"):
        raise ConversionError(f"RoPE scaling type {kind!r} is not supported (plain, linear or llama3 RoPE only); the "
                              "model would compute different positions")
    if kind == "llama3":
        # --use-rope-scaling has Llama 3.1's fixed constants; other values would compute other frequencies.
        from gigatron.core.transformer.rope import (LLAMA3_HIGH_FREQ_FACTOR, LLAMA3_LOW_FREQ_FACTOR,
                                                    LLAMA3_ORIGINAL_CONTEXT)
        merged = {**scaling, **params}
        expected = {"low_freq_factor": LLAMA3_LOW_FREQ_FACTOR, "high_freq_factor": LLAMA3_HIGH_FREQ_FACTOR,
                    "original_max_position_embeddings": LLAMA3_ORIGINAL_CONTEXT}
        wrong = {k: merged.get(k) for k, v in expected.items() if merged.get(k) is not None and merged.get(k) != v}
        if wrong:
            raise ConversionError(f"llama3 RoPE scaling with {wrong} is not supported: --use-rope-scaling uses "
                                  f"Llama 3.1's {expected}")
    return {"kind": kind, "factor": params.get("factor", scaling.get("factor"))}


def _rope_theta(cfg: dict) -> float:
    _rope_scaling(cfg)
    params = cfg.get("rope_parameters") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return float(theta)


def _rope_interpolation_factor(cfg: dict) -> Optional[float]:
    """HuggingFace's linear RoPE scaling (positions / factor) is --rotary-seq-len-interpolation-factor."""
    scaling = _rope_scaling(cfg)
    return float(scaling["factor"]) if scaling["kind"] == "linear" else None


def _params_dtype(cfg: dict, weights: Optional[HFWeights], probe: Optional[str]) -> str:
    if weights is not None and probe is not None and probe in weights:
        return dtype_name(weights.dtype(probe))
    return dtype_name(dtype_from_name(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"))


def metadata_from_hf_config(cfg: dict, params_dtype: str = "float32") -> dict:
    """Conversion metadata (Megatron flag names) for a HuggingFace config.json dict."""
    family = _family(cfg)
    if family == "gpt2":
        md = _gpt2_metadata(cfg)
    else:
        md = _llama_metadata(cfg, family)
    if family == "mixtral":
        from gigatron.core.convert.mixtral import mixtral_metadata

        md.update(mixtral_metadata(cfg))
    md.update(
        make_vocab_size_divisible_by=128, tokenizer_type=None, vocab_file=None, merge_file=None,
        tokenizer_model=None, vocab_size=None, tokenizer_dir=None, params_dtype=params_dtype, iteration=None,
        consumed_train_samples=0, consumed_valid_samples=0, hf_config=dict(cfg),
    )
    return md


def _gpt2_metadata(cfg: dict) -> dict:
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise ConversionError(f"GPT-2 activation_function {act!r} is not supported (gelu_new or gelu)")
    if cfg.get("scale_attn_by_inverse_layer_idx"):
        raise ConversionError("GPT-2 scale_attn_by_inverse_layer_idx=True is not supported")
    if cfg.get("scale_attn_weights") is False:
        raise ConversionError("GPT-2 scale_attn_weights=False is not supported (attention is scaled by 1/sqrt(d))")
    if cfg.get("add_cross_attention"):
        raise ConversionError("GPT-2 with cross-attention is not a decoder-only language model")
    h, nh = cfg["n_embd"], cfg["n_head"]
    positions = cfg["n_positions"]
    return dict(
        num_layers=cfg["n_layer"], hidden_size=h, ffn_hidden_size=cfg.get("n_inner") or 4 * h,
        num_attention_heads=nh, kv_channels=h // nh, group_query_attention=False, num_query_groups=nh,
        seq_length=positions, max_position_embeddings=positions, position_embedding_type="learned_absolute",
        rotary_base=10000, rotary_percent=1.0, rotary_interleaved=False, normalization="LayerNorm",
        norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5), apply_layernorm_1p=False, swiglu=False,
        squared_relu=False, openai_gelu=act != "gelu", add_bias_linear=True, add_qkv_bias=False,
        qk_layernorm=False, untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", True),
        attention_dropout=float(cfg.get("attn_pdrop", 0.1)), hidden_dropout=float(cfg.get("resid_pdrop", 0.1)),
        true_vocab_size=cfg["vocab_size"],
    )


def _llama_metadata(cfg: dict, family: str) -> dict:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"{family} hidden_act {act!r} is not supported (SwiGLU needs silu)")
    if cfg.get("pretraining_tp", 1) not in (1, None):
        raise ConversionError("Llama pretraining_tp > 1 is not supported")
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    positions = cfg.get("max_position_embeddings", 2048)
    window = cfg.get("sliding_window") if family in ("mistral", "mixtral") else None
    # HuggingFace's sliding_window W: a query attends the W newest positions, itself included.
    window_size = (int(window) - 1, 0) if window is not None and window < positions else None
    scaling = _rope_scaling(cfg)
    return dict(
        window_size=window_size, use_rope_scaling=scaling["kind"] == "llama3",
        rope_scaling_factor=float(scaling["factor"]) if scaling["kind"] == "llama3" else 8.0,
        num_layers=cfg["num_hidden_layers"], hidden_size=h, ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=nh, kv_channels=cfg.get("head_dim") or h // nh, group_query_attention=nkv != nh,
        num_query_groups=nkv, seq_length=min(positions, 4096), max_position_embeddings=positions,
        position_embedding_type="rope", rotary_base=_rope_theta(cfg),
        rotary_seq_len_interpolation_factor=_rope_interpolation_factor(cfg),
        rotary_percent=float(cfg.get("partial_rotary_factor", 1.0)), rotary_interleaved=False,
        normalization="RMSNorm", norm_epsilon=cfg.get("rms_norm_eps", 1e-6), apply_layernorm_1p=False,
        swiglu=True, squared_relu=False, openai_gelu=False,
        add_bias_linear=bool(cfg.get("attention_bias", False) or cfg.get("mlp_bias", False)), add_qkv_bias=False,
        qk_layernorm=False, untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", False),
        attention_dropout=float(cfg.get("attention_dropout", 0.0)), hidden_dropout=0.0,
        true_vocab_size=cfg["vocab_size"],
    )


def infer_family(md: dict) -> str:
    """The HuggingFace family of a model: from its hf_config, else from its shape flags."""
    source = (md.get("hf_config") or {}).get("model_type")
    if md.get("num_experts"):
        return "mixtral"
    if source in FAMILIES:
        return source
    llama_like = (md["swiglu"] and md["normalization"] == "RMSNorm" and md["position_embedding_type"] == "rope"
                  and not md.get("rotary_interleaved") and not md.get("add_qkv_bias"))
    if llama_like:
        return "llama"
    gpt2_like = (not md["swiglu"] and not md.get("squared_relu") and md["normalization"] == "LayerNorm"
                 and md["position_embedding_type"] == "learned_absolute" and md["add_bias_linear"]
                 and not md.get("group_query_attention"))
    if gpt2_like:
        return "gpt2"
    raise ConversionError(
        "this model matches no HuggingFace family Gigatron exports: Llama needs --swiglu --normalization RMSNorm "
        "--position-embedding-type rope (non-interleaved); GPT-2 needs LayerNorm, learned positions, GeLU, biases "
        "and no GQA")


def _check_exportable(md: dict, family: str) -> None:
    problems = []
    if md.get("apply_layernorm_1p"):
        problems.append("--apply-layernorm-1p")
    if md.get("qk_layernorm"):
        problems.append("--qk-layernorm")
    if md.get("multi_latent_attention"):
        problems.append("--multi-latent-attention (DeepSeek's HF layout is not built)")
    if md.get("mtp_num_layers"):
        problems.append("--mtp-num-layers")
    if md.get("apply_residual_connection_post_layernorm"):
        problems.append("--apply-residual-connection-post-layernorm")
    if md.get("add_qkv_bias") and not md["add_bias_linear"]:
        problems.append("--add-qkv-bias without linear biases")
    if family == "mixtral":
        from gigatron.core.convert.mixtral import mixtral_export_problems

        problems += mixtral_export_problems(md)
    elif md.get("num_experts"):
        problems.append("mixture-of-experts layers (export them as mixtral)")
    if family == "gpt2":
        if md["swiglu"] or md.get("squared_relu") or md["normalization"] != "LayerNorm" \
                or md["position_embedding_type"] != "learned_absolute" or not md["add_bias_linear"] \
                or md["num_query_groups"] != md["num_attention_heads"] \
                or md["kv_channels"] * md["num_attention_heads"] != md["hidden_size"]:
            problems.append("a GPT-2 layout (LayerNorm, learned positions, GeLU, biases, no GQA, d = h / heads)")
    else:
        if not md["swiglu"] or md["normalization"] != "RMSNorm" or md["position_embedding_type"] != "rope" \
                or md.get("rotary_interleaved"):
            problems.append("a Llama layout (SwiGLU, RMSNorm, non-interleaved RoPE)")
    if problems:
        raise ConversionError(f"cannot export to HuggingFace {family}: unsupported {', '.join(problems)}")


def hf_config_from_metadata(md: dict, family: str, bias_flags: Optional[Dict[str, bool]] = None) -> dict:
    """config.json for the model `md` describes, in HuggingFace family `family`. The source
    hf_config (if any, same family) keeps its other fields (token ids, initializer range, ...)."""
    source = md.get("hf_config") or {}
    cfg = dict(source) if source.get("model_type") == family else {}
    for key in ("transformers_version", "_name_or_path"):
        cfg.pop(key, None)
    cfg["architectures"] = [_ARCHITECTURES[family]]
    cfg["model_type"] = family
    dtype = md.get("params_dtype", "float32")
    cfg["dtype"] = dtype
    cfg["torch_dtype"] = dtype
    vocab = int(md["true_vocab_size"])
    tied = not md["untie_embeddings_and_output_weights"]
    if family == "gpt2":
        h = md["hidden_size"]
        cfg.update(
            vocab_size=vocab, n_positions=md["max_position_embeddings"], n_embd=h, n_layer=md["num_layers"],
            n_head=md["num_attention_heads"], n_inner=None if md["ffn_hidden_size"] == 4 * h else md["ffn_hidden_size"],
            activation_function="gelu_new" if md["openai_gelu"] else "gelu",
            layer_norm_epsilon=md["norm_epsilon"], tie_word_embeddings=tied,
            scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
        )
        cfg.setdefault("attn_pdrop", md.get("attention_dropout", 0.1))
        cfg.setdefault("resid_pdrop", md.get("hidden_dropout", 0.1))
        cfg.setdefault("embd_pdrop", md.get("hidden_dropout", 0.1))
        if vocab == 50257:
            cfg.setdefault("bos_token_id", 50256)
            cfg.setdefault("eos_token_id", 50256)
        return cfg
    flags = bias_flags or {"attention_bias": md["add_bias_linear"], "mlp_bias": md["add_bias_linear"]}
    cfg.update(
        vocab_size=vocab, hidden_size=md["hidden_size"], intermediate_size=md["ffn_hidden_size"],
        num_hidden_layers=md["num_layers"], num_attention_heads=md["num_attention_heads"],
        num_key_value_heads=md["num_query_groups"], head_dim=md["kv_channels"], hidden_act="silu",
        max_position_embeddings=md["max_position_embeddings"], rms_norm_eps=md["norm_epsilon"],
        tie_word_embeddings=tied, rope_theta=float(md["rotary_base"]),
        rope_parameters={"rope_type": "default", "rope_theta": float(md["rotary_base"])},
        attention_dropout=float(md.get("attention_dropout") or 0.0),
    )
    cfg.pop("rope_scaling", None)
    factor = md.get("rotary_seq_len_interpolation_factor")
    if factor is not None:  # linear RoPE scaling: positions / factor
        cfg["rope_parameters"] = {"rope_type": "linear", "factor": float(factor), "rope_theta": float(md["rotary_base"])}
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    if md.get("use_rope_scaling"):  # Llama 3.1's frequency scaling
        from gigatron.core.transformer.rope import (LLAMA3_HIGH_FREQ_FACTOR, LLAMA3_LOW_FREQ_FACTOR,
                                                    LLAMA3_ORIGINAL_CONTEXT)
        llama3 = {"rope_type": "llama3", "factor": float(md.get("rope_scaling_factor") or 8.0),
                  "low_freq_factor": LLAMA3_LOW_FREQ_FACTOR, "high_freq_factor": LLAMA3_HIGH_FREQ_FACTOR,
                  "original_max_position_embeddings": LLAMA3_ORIGINAL_CONTEXT}
        cfg["rope_parameters"] = {**llama3, "rope_theta": float(md["rotary_base"])}
        cfg["rope_scaling"] = dict(llama3)
    if md.get("rotary_percent", 1.0) != 1.0:
        cfg["partial_rotary_factor"] = md["rotary_percent"]
    if family == "mixtral":
        from gigatron.core.convert.mixtral import mixtral_config_fields

        if md.get("moe_apply_probs_on_input"):
            raise ConversionError("--moe-apply-probs-on-input has no HuggingFace Mixtral equivalent (Mixtral weighs "
                                  "the expert outputs)")
        cfg.update(mixtral_config_fields(md))
    if family == "llama":
        if md.get("window_size") is not None:
            raise ConversionError(f"--window-size {tuple(md['window_size'])} (sliding-window attention) has no Llama "
                                  "equivalent; export this model as mistral")
        cfg.update(attention_bias=flags["attention_bias"], mlp_bias=flags["mlp_bias"])
    else:
        if flags["attention_bias"] or flags["mlp_bias"]:
            raise ConversionError("Mistral has no linear biases; export this model as llama (attention_bias/mlp_bias)")
        window = md.get("window_size")
        if window is not None:
            if tuple(window)[1] not in (0, -1) or tuple(window)[0] < 0:
                raise ConversionError(f"--window-size {tuple(window)} has no HuggingFace Mistral sliding_window "
                                      "(which looks back only)")
            cfg["sliding_window"] = int(window[0]) + 1
        else:
            # Full attention: no sliding window unless the source model had one.
            cfg.setdefault("sliding_window", None)
    return cfg


# ------------------------------------------------------------------ HF -> messages


# Buffers some checkpoints store that carry no weights: GPT-2's causal-mask buffers, rotary tables.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def _gpt2_prefix(weights: HFWeights) -> str:
    return "transformer." if "transformer.wte.weight" in weights else ""


def _hf_layer_to_ours(family: str, md: dict, i: int, get: Callable[[str], torch.Tensor],
                      has: Callable[[str], bool], prefix: str) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    p = f"decoder.layers.{i}"
    nh, ng, d = md["num_attention_heads"], md["num_query_groups"], md["kv_channels"]
    if family == "gpt2":
        hp = f"{prefix}h.{i}."
        out[p + ".input_layernorm.weight"] = get(hp + "ln_1.weight")
        out[p + ".input_layernorm.bias"] = get(hp + "ln_1.bias")
        w = get(hp + "attn.c_attn.weight").t()  # [h, 3h] -> [3h, h]: rows [q; k; v]
        q, k, v = torch.chunk(w, 3, dim=0)
        out[p + ".self_attention.linear_qkv.weight"] = qkv_to_grouped(q, k, v, nh, ng, d)
        q, k, v = torch.chunk(get(hp + "attn.c_attn.bias"), 3, dim=0)
        out[p + ".self_attention.linear_qkv.bias"] = qkv_to_grouped(q, k, v, nh, ng, d)
        out[p + ".self_attention.linear_proj.weight"] = get(hp + "attn.c_proj.weight").t().contiguous()  # [h, h]
        out[p + ".self_attention.linear_proj.bias"] = get(hp + "attn.c_proj.bias")
        out[p + ".pre_mlp_layernorm.weight"] = get(hp + "ln_2.weight")
        out[p + ".pre_mlp_layernorm.bias"] = get(hp + "ln_2.bias")
        out[p + ".mlp.linear_fc1.weight"] = get(hp + "mlp.c_fc.weight").t().contiguous()  # [h, f] -> [f, h]
        out[p + ".mlp.linear_fc1.bias"] = get(hp + "mlp.c_fc.bias")
        out[p + ".mlp.linear_fc2.weight"] = get(hp + "mlp.c_proj.weight").t().contiguous()  # [f, h] -> [h, f]
        out[p + ".mlp.linear_fc2.bias"] = get(hp + "mlp.c_proj.bias")
        return out
    hp = f"model.layers.{i}."
    out[p + ".input_layernorm.weight"] = get(hp + "input_layernorm.weight")
    q, k, v = (get(hp + f"self_attn.{x}_proj.weight") for x in "qkv")
    out[p + ".self_attention.linear_qkv.weight"] = qkv_to_grouped(q, k, v, nh, ng, d)
    out[p + ".self_attention.linear_proj.weight"] = get(hp + "self_attn.o_proj.weight")
    out[p + ".pre_mlp_layernorm.weight"] = get(hp + "post_attention_layernorm.weight")
    if family == "mixtral":
        from gigatron.core.convert.mixtral import hf_moe_to_ours

        out.update(hf_moe_to_ours(md, i, get))
        return out
    gate, up = get(hp + "mlp.gate_proj.weight"), get(hp + "mlp.up_proj.weight")
    out[p + ".mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)  # [2f, h]
    out[p + ".mlp.linear_fc2.weight"] = get(hp + "mlp.down_proj.weight")
    if md["add_bias_linear"]:
        h, f = md["hidden_size"], md["ffn_hidden_size"]
        dtype = q.dtype

        def bias(name: str, size: int) -> torch.Tensor:
            # A family flag that is off while the other is on: zero biases (exactly the same function).
            return get(name) if has(name) else torch.zeros(size, dtype=dtype)

        bq = bias(hp + "self_attn.q_proj.bias", nh * d)
        bk = bias(hp + "self_attn.k_proj.bias", ng * d)
        bv = bias(hp + "self_attn.v_proj.bias", ng * d)
        out[p + ".self_attention.linear_qkv.bias"] = qkv_to_grouped(bq, bk, bv, nh, ng, d)
        out[p + ".self_attention.linear_proj.bias"] = bias(hp + "self_attn.o_proj.bias", h)
        out[p + ".mlp.linear_fc1.bias"] = torch.cat([bias(hp + "mlp.gate_proj.bias", f),
                                                     bias(hp + "mlp.up_proj.bias", f)])  # [2f]
        out[p + ".mlp.linear_fc2.bias"] = bias(hp + "mlp.down_proj.bias", h)
    return out


def hf_messages(path: str, params_dtype: Optional[torch.dtype] = None) -> Iterator[Message]:
    """The conversion messages of a HuggingFace folder, read layer by layer. `params_dtype`
    casts the weights (default: keep the checkpoint's dtype)."""
    from gigatron.core.convert.torch_format import tokenizer_flags_for_dir

    cfg = read_hf_config(path)
    family = _family(cfg)
    weights = HFWeights(path)
    prefix = _gpt2_prefix(weights) if family == "gpt2" else ""
    embed_name = f"{prefix}wte.weight" if family == "gpt2" else "model.embed_tokens.weight"
    md = metadata_from_hf_config(cfg, _params_dtype(cfg, weights, embed_name))
    if params_dtype is not None:
        md["params_dtype"] = dtype_name(params_dtype)
    md["tokenizer_dir"] = os.path.abspath(path)
    md.update(tokenizer_flags_for_dir(path, md))

    used = set()

    def get(name: str) -> torch.Tensor:
        used.add(name)
        t = weights.get(name)
        return t.to(params_dtype) if params_dtype is not None else t

    yield "metadata", md
    emb = {"embedding.word_embeddings.weight": get(embed_name)}
    if family == "gpt2":
        emb["embedding.position_embeddings.weight"] = get(f"{prefix}wpe.weight")
    if emb["embedding.word_embeddings.weight"].shape[0] != md["true_vocab_size"]:
        raise ConversionError(f"{embed_name} has {emb['embedding.word_embeddings.weight'].shape[0]} rows but "
                              f"config.json says vocab_size {md['true_vocab_size']}")
    yield "embeddings", emb
    for i in range(md["num_layers"]):
        yield layer_message(i), _hf_layer_to_ours(family, md, i, get, weights.__contains__, prefix)
    if family == "gpt2":
        final = {"decoder.final_layernorm.weight": get(f"{prefix}ln_f.weight"),
                 "decoder.final_layernorm.bias": get(f"{prefix}ln_f.bias")}
    else:
        final = {"decoder.final_layernorm.weight": get("model.norm.weight")}
    yield "final norm", final
    if md["untie_embeddings_and_output_weights"]:
        yield "output layer", {"output_layer.weight": get("lm_head.weight")}
    left = sorted(n for n in weights.keys() if n not in used and not n.endswith(_IGNORED_SUFFIXES)
                  and not (n == "lm_head.weight" and not md["untie_embeddings_and_output_weights"]))
    if left:
        raise ConversionError(f"{path} holds tensors this converter does not map (an unsupported feature?): "
                              f"{', '.join(left[:6])}{' ...' if len(left) > 6 else ''}")
    yield "done", {}


# ------------------------------------------------------------------ messages -> HF


def _ours_layer_to_hf(family: str, md: dict, i: int, t: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    p = f"decoder.layers.{i}"
    nh, ng, d = md["num_attention_heads"], md["num_query_groups"], md["kv_channels"]
    out: Dict[str, torch.Tensor] = {}
    if family == "gpt2":
        hp = f"transformer.h.{i}."
        out[hp + "ln_1.weight"] = t[p + ".input_layernorm.weight"]
        out[hp + "ln_1.bias"] = t[p + ".input_layernorm.bias"]
        q, k, v = grouped_to_qkv(t[p + ".self_attention.linear_qkv.weight"], nh, ng, d)
        out[hp + "attn.c_attn.weight"] = torch.cat([q, k, v], dim=0).t()  # [3h, h] -> [h, 3h]
        q, k, v = grouped_to_qkv(t[p + ".self_attention.linear_qkv.bias"], nh, ng, d)
        out[hp + "attn.c_attn.bias"] = torch.cat([q, k, v], dim=0)
        out[hp + "attn.c_proj.weight"] = t[p + ".self_attention.linear_proj.weight"].t()
        out[hp + "attn.c_proj.bias"] = t[p + ".self_attention.linear_proj.bias"]
        out[hp + "ln_2.weight"] = t[p + ".pre_mlp_layernorm.weight"]
        out[hp + "ln_2.bias"] = t[p + ".pre_mlp_layernorm.bias"]
        out[hp + "mlp.c_fc.weight"] = t[p + ".mlp.linear_fc1.weight"].t()
        out[hp + "mlp.c_fc.bias"] = t[p + ".mlp.linear_fc1.bias"]
        out[hp + "mlp.c_proj.weight"] = t[p + ".mlp.linear_fc2.weight"].t()
        out[hp + "mlp.c_proj.bias"] = t[p + ".mlp.linear_fc2.bias"]
        return out
    hp = f"model.layers.{i}."
    out[hp + "input_layernorm.weight"] = t[p + ".input_layernorm.weight"]
    q, k, v = grouped_to_qkv(t[p + ".self_attention.linear_qkv.weight"], nh, ng, d)
    for x, tensor in zip("qkv", (q, k, v)):
        out[hp + f"self_attn.{x}_proj.weight"] = tensor
    out[hp + "self_attn.o_proj.weight"] = t[p + ".self_attention.linear_proj.weight"]
    out[hp + "post_attention_layernorm.weight"] = t[p + ".pre_mlp_layernorm.weight"]
    if family == "mixtral":
        from gigatron.core.convert.mixtral import ours_moe_to_hf

        out.update(ours_moe_to_hf(md, i, t))
        return out
    gate, up = torch.chunk(t[p + ".mlp.linear_fc1.weight"], 2, dim=0)
    out[hp + "mlp.gate_proj.weight"], out[hp + "mlp.up_proj.weight"] = gate, up
    out[hp + "mlp.down_proj.weight"] = t[p + ".mlp.linear_fc2.weight"]
    if md["add_bias_linear"]:
        q, k, v = grouped_to_qkv(t[p + ".self_attention.linear_qkv.bias"], nh, ng, d)
        for x, tensor in zip("qkv", (q, k, v)):
            out[hp + f"self_attn.{x}_proj.bias"] = tensor
        out[hp + "self_attn.o_proj.bias"] = t[p + ".self_attention.linear_proj.bias"]
        gate_b, up_b = torch.chunk(t[p + ".mlp.linear_fc1.bias"], 2, dim=0)
        out[hp + "mlp.gate_proj.bias"], out[hp + "mlp.up_proj.bias"] = gate_b, up_b
        out[hp + "mlp.down_proj.bias"] = t[p + ".mlp.linear_fc2.bias"]
    return out


_ATTENTION_BIAS = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.o_proj.bias")
_MLP_BIAS = ("mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias")


def _llama_bias_flags(md: dict, tensors: Dict[str, torch.Tensor]) -> Dict[str, bool]:
    """attention_bias / mlp_bias for export; drops all-zero bias groups that the source config had
    switched off (they were zero-filled on import)."""
    if not md["add_bias_linear"]:
        return {"attention_bias": False, "mlp_bias": False}
    source = md.get("hf_config") or {}
    flags = {}
    for flag, suffixes in (("attention_bias", _ATTENTION_BIAS), ("mlp_bias", _MLP_BIAS)):
        names = [n for n in tensors if n.endswith(suffixes)]
        keep = source.get(flag, True) or any(bool(tensors[n].any()) for n in names)
        flags[flag] = bool(keep)
        if not keep:
            for n in names:
                del tensors[n]
    return flags


def _write_safetensors(tensors: Dict[str, torch.Tensor], save_dir: str, max_shard_bytes: int) -> None:
    from safetensors.torch import save as safetensors_save

    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = compact(t)
        size += nbytes
    if len(shards) == 1:
        atomic_write_bytes(os.path.join(save_dir, "model.safetensors"),
                           safetensors_save(shards[0], metadata={"format": "pt"}))
        return
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        file = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        atomic_write_bytes(os.path.join(save_dir, file), safetensors_save(shard, metadata={"format": "pt"}))
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_text(os.path.join(save_dir, "model.safetensors.index.json"), json.dumps(index, indent=2) + "\n")


# ------------------------------------------------------------------ tokenizer of an export

_TOKENIZER_FLAGS = ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_model", "vocab_size", "vocab_extra_ids",
                    "tiktoken_pattern", "tiktoken_num_special_tokens", "tiktoken_special_tokens")
_SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
# The files a HuggingFace tokenizer folder may hold (AutoTokenizer reads them by these names).
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                       "vocab.json", "merges.txt", "added_tokens.json", "vocab.txt")


def _valid_id(value, vocab: int) -> Optional[int]:
    return int(value) if isinstance(value, int) and 0 <= value < vocab else None


def _copy_file(src: str, dst: str) -> None:
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _token_text(tokenizer, token_id: Optional[int]) -> Optional[str]:
    if token_id is None:
        return None
    try:
        text = tokenizer.inv_vocab.get(token_id)
    except Exception:  # noqa: BLE001 - a tokenizer without an id -> text table
        return None
    return text if isinstance(text, str) else None


def export_tokenizer(md: dict, save_dir: str, model_max_length: Optional[int] = None) -> Dict[str, int]:
    """Write the checkpoint's tokenizer into `save_dir` under the names `AutoTokenizer` reads, and
    return its special ids (`bos_token_id`, `eos_token_id` = the end-of-document token, and
    `pad_token_id` where it has one).

    GPT2BPETokenizer: vocab.json and merges.txt (whatever the source files were called);
    HuggingFaceTokenizer: its folder's files, or tokenizer.json; SentencePiece tokenizers:
    tokenizer.model; a tokenizer_config.json naming the class and special tokens is written unless
    the source folder had one. NullTokenizer and TikTokenizer have no HuggingFace form: only the ids
    are returned. Tokenizer files that no longer exist leave the export without a tokenizer (with a
    warning), never without weights."""
    kind = md.get("tokenizer_type")
    if not kind:
        return {}
    from gigatron.core.tokenizers import build_tokenizer

    try:
        tokenizer = build_tokenizer(argparse.Namespace(**{k: md.get(k) for k in _TOKENIZER_FLAGS}))
    except (OSError, ValueError) as exc:
        warnings.warn(f"the checkpoint's tokenizer ({kind}) cannot be built ({exc}); the export gets no tokenizer "
                      "files and no bos/eos token ids from it: copy the files in by hand", stacklevel=2)
        return {}
    vocab = int(tokenizer.vocab_size)
    eos = _valid_id(tokenizer.eod, vocab)
    bos = _valid_id(getattr(tokenizer, "bos", None), vocab)
    pad = _valid_id(getattr(tokenizer, "pad", None), vocab)
    ids = {}
    if eos is not None:
        ids["eos_token_id"] = eos
        ids["bos_token_id"] = bos if bos is not None else eos  # GPT-2's convention: one token for both
    if pad is not None:
        ids["pad_token_id"] = pad

    written = set()

    def copy(src: Optional[str], name: str) -> None:
        if src and os.path.isfile(src):
            _copy_file(src, os.path.join(save_dir, name))
            written.add(name)

    def copy_folder(folder: str) -> None:
        for name in _HF_TOKENIZER_FILES:
            copy(os.path.join(folder, name), name)

    source_dir = md.get("tokenizer_dir")
    model = md.get("tokenizer_model")
    if source_dir and os.path.isdir(source_dir):
        copy_folder(source_dir)
    elif kind == "GPT2BPETokenizer":
        copy(md.get("vocab_file"), "vocab.json")
        copy(md.get("merge_file"), "merges.txt")
    elif kind == "HuggingFaceTokenizer" and model and os.path.isdir(model):
        copy_folder(model)
    elif kind == "HuggingFaceTokenizer":
        copy(model, "tokenizer.json")
    elif kind in _SENTENCEPIECE_TYPES:
        copy(model, "tokenizer.model")
    if not written:
        if kind != "NullTokenizer":
            warnings.warn(f"the checkpoint's tokenizer ({kind}) has no HuggingFace form here; the export holds "
                          "the bos/eos token ids but no tokenizer files", stacklevel=2)
        return ids
    if "tokenizer_config.json" not in written:
        config = _tokenizer_config(kind, tokenizer, ids, written, model_max_length)
        if config is not None:
            atomic_write_text(os.path.join(save_dir, "tokenizer_config.json"),
                              json.dumps(config, indent=2, sort_keys=True) + "\n")
    return ids


def _tokenizer_config(kind: str, tokenizer, ids: Dict[str, int], written: set,
                      model_max_length: Optional[int]) -> Optional[dict]:
    """tokenizer_config.json for files written without one: the class and the special tokens."""
    if "tokenizer.json" in written:
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    elif kind == "GPT2BPETokenizer":
        config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
                  "unk_token": _token_text(tokenizer, ids.get("eos_token_id"))}
    elif kind in _SENTENCEPIECE_TYPES:
        # Llama2Tokenizer starts every text with <s>; the other SentencePiece tokenizers add nothing.
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": kind == "Llama2Tokenizer",
                  "add_eos_token": False, "legacy": True}
    else:
        return None
    for key in ("bos", "eos", "pad"):
        text = _token_text(tokenizer, ids.get(f"{key}_token_id"))
        if text is not None:
            config[f"{key}_token"] = text
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    return {k: v for k, v in config.items() if v is not None}


def save_hf_checkpoint(messages: Iterable[Message], save_dir: str, checking: bool = True,
                       family: Optional[str] = None, params_dtype: Optional[torch.dtype] = None,
                       max_shard_bytes: int = _DEFAULT_SHARD_BYTES) -> str:
    """Write the model of a message stream as a HuggingFace folder: safetensors weights (the true
    vocabulary only), config.json and generation_config.json with the tokenizer's bos/eos ids, and
    the tokenizer files (see export_tokenizer). `family` defaults to the source model's (hf_config)
    or the one its shape fits. Returns `save_dir`."""
    reader = MessageReader(messages, checking)
    md = dict(reader.md)
    if params_dtype is not None:
        md["params_dtype"] = dtype_name(params_dtype)
    family = family or infer_family(md)
    if family not in FAMILIES:
        raise ConversionError(f"unknown HuggingFace family {family!r}; choose one of {', '.join(FAMILIES)}")
    _check_exportable(md, family)
    if os.path.isdir(save_dir) and any(f.endswith((".safetensors", ".bin")) or f.endswith(".index.json")
                                       for f in os.listdir(save_dir)):
        raise ValueError(f"{save_dir} already holds model weights; choose an empty --save-dir or remove them first")
    tensors: Dict[str, torch.Tensor] = {}
    tied = not md["untie_embeddings_and_output_weights"]
    for name, payload in reader:
        if params_dtype is not None:
            payload = {k: v.to(params_dtype) for k, v in payload.items()}
        if name == "embeddings":
            if family == "gpt2":
                tensors["transformer.wte.weight"] = payload["embedding.word_embeddings.weight"]
                tensors["transformer.wpe.weight"] = payload["embedding.position_embeddings.weight"]
            else:
                tensors["model.embed_tokens.weight"] = payload["embedding.word_embeddings.weight"]
        elif name == "final norm":
            if family == "gpt2":
                tensors["transformer.ln_f.weight"] = payload["decoder.final_layernorm.weight"]
                tensors["transformer.ln_f.bias"] = payload["decoder.final_layernorm.bias"]
            else:
                tensors["model.norm.weight"] = payload["decoder.final_layernorm.weight"]
        elif name == "output layer":
            tensors["lm_head.weight"] = payload["output_layer.weight"]
        else:
            i = int(name.rsplit(" ", 1)[1])
            tensors.update(_ours_layer_to_hf(family, md, i, payload))
    bias_flags = _llama_bias_flags(md, tensors) if family != "gpt2" else None
    cfg = hf_config_from_metadata(md, family, bias_flags)
    if tied:
        tensors.pop("lm_head.weight", None)
    os.makedirs(save_dir, exist_ok=True)
    _write_safetensors(tensors, save_dir, max_shard_bytes)
    special = export_tokenizer(md, save_dir, md.get("max_position_embeddings"))
    for key in ("bos_token_id", "eos_token_id"):  # a source model's own ids are kept
        if cfg.get(key) is None and key in special:
            cfg[key] = special[key]
    atomic_write_text(os.path.join(save_dir, "config.json"), json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    generation = {key: cfg[key] for key in ("bos_token_id", "eos_token_id") if cfg.get(key) is not None}
    if "eos_token_id" in generation:
        # Without a pad id, generate() warns and pads with the end-of-document token: say so once here.
        generation["pad_token_id"] = special.get("pad_token_id", cfg.get("pad_token_id"))
        if generation["pad_token_id"] is None:
            eos = generation["eos_token_id"]
            generation["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
        atomic_write_text(os.path.join(save_dir, "generation_config.json"),
                          json.dumps(generation, indent=2, sort_keys=True) + "\n")
    return save_dir
