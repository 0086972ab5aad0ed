"""HuggingFace Mamba-2 (Mamba2ForCausalLM) and the hybrids Nemotron-H (NemotronHForCausalLM) and Bamba
(BambaForCausalLM) <-> the conversion messages of a MambaModel (gigatron/core/models/mamba.py).

Shape legend: h = hidden, H = Mamba heads, P = Mamba head dim, I = H * P, G = Mamba groups,
N = state dim, K = conv kernel (4), f = MLP hidden, nh / ng / d = attention heads / key-value heads /
head dim, V = vocabulary.

Name and layout map (layer i; HF under `backbone.layers.i.` — Nemotron-H also as `model.layers.i.`,
which transformers uses in memory — Gigatron under `decoder.layers.i.`):

  backbone.embeddings.weight [V, h]       embedding.word_embeddings.weight
  backbone.norm_f.weight                  decoder.final_norm.weight                (RMSNorm)
  lm_head.weight (absent when tied)       output_layer.weight (untied only)
  Mamba layer (Mamba-2: every layer; Nemotron-H: "M" / linear_attention):
    norm.weight                           norm.weight
    mixer.in_proj.weight [2I+2GN+H, h]    mixer.in_proj.weight        (the same rows: [z; x; B; C; dt])
    mixer.conv1d.weight [I+2GN, 1, K]     mixer.conv1d.weight         (over [x; B; C])
    mixer.conv1d.bias, A_log, D, dt_bias  the same names
    mixer.norm.weight [I]                 mixer.norm.weight           (gated RMSNorm, groups of I / G)
    mixer.out_proj.weight [h, I]          mixer.out_proj.weight
  Nemotron-H attention layer ("*"; no position embedding, no biases):
    norm.weight                           input_layernorm.weight
    mixer.{q,k,v}_proj.weight             self_attention.linear_qkv.weight   (grouped per KV head)
    mixer.o_proj.weight                   self_attention.linear_proj.weight
  Nemotron-H MLP layer ("-"; relu2 = --squared-relu, no gate):
    norm.weight                           pre_mlp_layernorm.weight
    mixer.up_proj.weight [f, h]           mlp.linear_fc1.weight
    mixer.down_proj.weight [h, f]         mlp.linear_fc2.weight

Bamba (under `model.`): each Bamba layer j is two of ours, 2j (Mamba or attention) and 2j+1 (a SwiGLU
MLP), so its pattern is "M-" / "*-" per layer (attn_layer_indices give the "*"):
  model.embed_tokens.weight / model.final_layernorm.weight / lm_head.weight
  layers.j.input_layernorm.weight         layer 2j: norm.weight (Mamba) or input_layernorm.weight
  layers.j.mamba.*                        layer 2j: mixer.* (as above)
  layers.j.self_attn.{q,k,v,o}_proj       layer 2j: self_attention.* (grouped QKV; RoPE on the first
                                          partial_rotary_factor of each head, half-split, as ours)
  layers.j.pre_ff_layernorm.weight        layer 2j+1: pre_mlp_layernorm.weight
  layers.j.feed_forward.{gate,up}_proj    layer 2j+1: mlp.linear_fc1.weight = [gate; up] (SwiGLU)
  layers.j.feed_forward.down_proj         layer 2j+1: mlp.linear_fc2.weight

The math is the same on both sides: softplus(dt + dt_bias) with no clamp (time_step_limit (0, inf)),
A = -exp(A_log), head j reading group j // (H / G) of B and C, D skip, SiLU after the short conv,
rmsnorm(y * silu(z)) per group, pre-norm residual layers. HuggingFace uses one epsilon
(layer_norm_epsilon) for the layer norms and the gated norm; Gigatron's gated norm has Megatron's
fixed 1e-5, so only layer_norm_epsilon 1e-5 (the default of both families) converts. Mamba-2's
residual_in_fp32 keeps the residual stream in fp32 for a bf16/fp16 model; Gigatron keeps it in the
parameter dtype (--fp32-residual-connection is a run setting), so half-precision logits differ by
rounding; an export writes residual_in_fp32 false unless the model came from a Mamba-2 folder.
Nemotron-H MoE layers (shared experts, sigmoid routing with a score-correction bias) are not
converted.

Every transform is a rename, split or concatenation, so HF -> Gigatron -> HF is bitwise identical.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import torch

from gigatron.core.convert.layout import grouped_to_qkv, qkv_to_grouped
from gigatron.core.convert.protocol import (
    MAMBA_MODEL,
    MAMBA_MIXER_TENSORS as MIXER_TENSORS,
    ConversionError,
    Message,
    hybrid_layer_symbols,
    layer_message,
)

__all__ = ["MAMBA_FAMILIES", "mamba_family_metadata", "mamba_family_of", "hf_mamba_messages",
           "mamba_hf_tensors_and_config", "mamba_hf_config_from_metadata", "mamba_export_problems"]

MAMBA_FAMILIES = ("mamba2", "nemotron_h", "bamba")
ARCHITECTURES = {"mamba2": "Mamba2ForCausalLM", "nemotron_h": "NemotronHForCausalLM", "bamba": "BambaForCausalLM"}
# Each family's config.json keys for the mixer settings (mixer activation, conv kernel, projection biases,
# norm epsilon, conv bias).
_KEYS = {
    "mamba2": dict(act="hidden_act", kernel="conv_kernel", bias=("use_bias",), eps="layer_norm_epsilon",
                   conv_bias="use_conv_bias"),
    "nemotron_h": dict(act="mamba_hidden_act", kernel="conv_kernel", bias=("use_bias", "mamba_proj_bias"),
                       eps="layer_norm_epsilon", conv_bias="use_conv_bias"),
    "bamba": dict(act="hidden_act", kernel="mamba_d_conv", bias=("mamba_proj_bias",), eps="rms_norm_eps",
                  conv_bias="mamba_conv_bias"),
}
GATED_NORM_EPS = 1e-5  # gigatron.core.transformer.mamba.mixer.GATED_NORM_EPS (Megatron's fixed value)
CONV_KERNEL = 4  # gigatron.core.transformer.mamba.config.MAMBA_CONV_KERNEL
_SYMBOL = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
# Nemotron-H's layer kinds: its current names and the older ones its configs may still carry.
_NEMOTRON_KINDS = {"linear_attention": "M", "mamba": "M", "full_attention": "*", "attention": "*", "mlp": "-",
                   "moe": "E"}
_NEMOTRON_NAMES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}


# ------------------------------------------------------------------ configs


def _float(value) -> float:
    # transformers 5 writes non-finite floats as {"__float__": "Infinity"}; older ones as JSON's Infinity.
    return float(value["__float__"]) if isinstance(value, dict) and "__float__" in value else float(value)


def _float_pair(value) -> tuple:
    return tuple(_float(v) for v in value)


def _check_mixer_config(cfg: dict, family: str) -> None:
    keys = _KEYS[family]
    act = cfg.get(keys["act"], "silu")
    problems = []
    if act != "silu":
        problems.append(f"{keys['act']} {act!r} (the Mamba-2 mixer uses silu)")
    kernel = int(cfg.get(keys["kernel"], CONV_KERNEL))
    if kernel != CONV_KERNEL:
        problems.append(f"{keys['kernel']} {kernel} (Megatron's Mamba mixer has a fixed kernel of {CONV_KERNEL})")
    limit = cfg.get("time_step_limit", (0.0, math.inf))
    limit = (0.0, math.inf) if limit is None else _float_pair(limit)
    if limit != (0.0, math.inf):
        problems.append(f"time_step_limit {list(limit)} (Gigatron does not clamp dt; only (0, inf) converts)")
    for key in keys["bias"]:
        if cfg.get(key):
            problems.append(f"{key} (biases on the mixer's in_proj / out_proj)")
    eps = float(cfg.get(keys["eps"], GATED_NORM_EPS))
    if eps != GATED_NORM_EPS:
        problems.append(f"{keys['eps']} {eps} (it is also the gated norm's epsilon, which is fixed at "
                        f"{GATED_NORM_EPS} as in Megatron)")
    if problems:
        raise ConversionError(f"HuggingFace {family} model with unsupported {'; '.join(problems)}")


def nemotron_pattern(cfg: dict) -> str:
    """The layer pattern (M, *, -, E) of a Nemotron-H config.json."""
    if cfg.get("hybrid_override_pattern"):
        return str(cfg["hybrid_override_pattern"])
    kinds = cfg.get("layers_block_type") or cfg.get("layer_types")
    if not kinds:
        raise ConversionError("a Nemotron-H config.json needs layers_block_type (or hybrid_override_pattern)")
    unknown = sorted({k for k in kinds if k not in _NEMOTRON_KINDS})
    if unknown:
        raise ConversionError(f"Nemotron-H layer types {unknown} are unknown; expected {sorted(_NEMOTRON_KINDS)}")
    return "".join(_NEMOTRON_KINDS[k] for k in kinds)


def mamba_family_metadata(cfg: dict) -> dict:
    """The model metadata (Megatron flag names) of a Mamba2, Nemotron-H or Bamba config.json dict."""
    family = cfg.get("model_type")
    if family not in MAMBA_FAMILIES:
        raise ConversionError(f"model_type {family!r} is not a Mamba family ({', '.join(MAMBA_FAMILIES)})")
    _check_mixer_config(cfg, family)
    h = int(cfg["hidden_size"])
    groups = int(cfg.get("mamba_n_groups" if family == "bamba" else "n_groups", 1 if family == "bamba" else 8))
    if family == "mamba2":
        heads, head_dim, state = int(cfg["num_heads"]), int(cfg["head_dim"]), int(cfg["state_size"])
        if int(cfg.get("expand", 2)) * h != heads * head_dim:
            raise ConversionError(f"Mamba-2 config: expand * hidden_size ({int(cfg.get('expand', 2)) * h}) must equal "
                                  f"num_heads * head_dim ({heads * head_dim})")
        layers = int(cfg["num_hidden_layers"])
        pattern = "M" * layers
        # An all-Mamba model has no attention layer; the attention flags only have to be valid ones
        # (the groups' count splits over the same tensor-parallel sizes as the Mamba groups).
        nh = groups if h % groups == 0 else 1
        attention = dict(num_attention_heads=nh, kv_channels=h // nh, group_query_attention=False,
                         num_query_groups=nh, ffn_hidden_size=4 * h, squared_relu=False,
                         seq_length=4096, max_position_embeddings=4096, attention_dropout=0.0, hidden_dropout=0.0)
        hybrid = False
    elif family == "nemotron_h":
        heads, head_dim = int(cfg["mamba_num_heads"]), int(cfg["mamba_head_dim"])
        state = int(cfg["ssm_state_size"])
        pattern = nemotron_pattern(cfg)
        layers = len(pattern)
        if "E" in pattern:
            raise ConversionError("Nemotron-H MoE layers ('moe' / E: shared experts and sigmoid routing with a "
                                  "correction bias) are not converted; dense Nemotron-H models (M, *, -) are")
        if int(cfg.get("num_nextn_predict_layers") or 0):
            raise ConversionError("Nemotron-H multi-token prediction layers (num_nextn_predict_layers) are not converted")
        act = cfg.get("mlp_hidden_act", "relu2")
        if "-" in pattern and act != "relu2":
            raise ConversionError(f"Nemotron-H mlp_hidden_act {act!r} is not supported (relu2 = --squared-relu)")
        if cfg.get("mlp_bias") or cfg.get("attention_bias"):
            raise ConversionError("Nemotron-H with attention_bias / mlp_bias is not supported (no linear biases)")
        if cfg.get("sliding_window") is not None:
            raise ConversionError("Nemotron-H with a sliding_window is not supported (full causal attention only)")
        nh = int(cfg["num_attention_heads"])
        nkv = int(cfg.get("num_key_value_heads") or nh)
        positions = int(cfg.get("max_position_embeddings", 4096))
        attention = dict(num_attention_heads=nh, kv_channels=int(cfg.get("head_dim") or h // nh),
                         group_query_attention=nkv != nh, num_query_groups=nkv,
                         ffn_hidden_size=int(cfg["intermediate_size"]), squared_relu=True,
                         seq_length=min(positions, 4096), max_position_embeddings=positions,
                         attention_dropout=float(cfg.get("attention_dropout", 0.0)),
                         hidden_dropout=float(cfg.get("hidden_dropout", 0.0)))
        hybrid = True
    elif family == "bamba":
        return _bamba_metadata(cfg, h, groups)
    else:
        raise ConversionError(f"model_type {family!r} is not a Mamba family ({', '.join(MAMBA_FAMILIES)})")
    return dict(
        attention, num_layers=layers, hidden_size=h, position_embedding_type="none", rotary_base=10000,
        rotary_percent=1.0, rotary_interleaved=False, normalization="RMSNorm",
        norm_epsilon=float(cfg.get("layer_norm_epsilon", GATED_NORM_EPS)), apply_layernorm_1p=False, swiglu=False,
        openai_gelu=False, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False,
        untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", False),
        true_vocab_size=int(cfg["vocab_size"]),
        mamba_state_dim=state, mamba_head_dim=head_dim, mamba_num_groups=groups, mamba_num_heads=heads,
        hybrid_override_pattern=pattern, hybrid_attention_ratio=0.0, hybrid_mlp_ratio=0.0, is_hybrid_model=hybrid,
        **{MAMBA_MODEL: True},
    )


def _bamba_metadata(cfg: dict, h: int, groups: int) -> dict:
    layers = int(cfg["num_hidden_layers"])
    attention_layers = set(cfg.get("attn_layer_indices") or [])
    pattern = "".join(("*" if j in attention_layers else "M") + "-" for j in range(layers))
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"Bamba hidden_act {cfg.get('hidden_act')!r} is not supported (SwiGLU needs silu)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ConversionError("Bamba with attention_bias / mlp_bias is not supported (no linear biases)")
    rope = dict(cfg.get("rope_parameters") or {})
    rope.update({k: v for k, v in (cfg.get("rope_scaling") or {}).items() if k not in rope})
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind != "default":
        raise ConversionError(f"Bamba RoPE scaling {kind!r} is not supported (plain RoPE only)")
    heads = int(cfg["mamba_n_heads"])
    expand = int(cfg.get("mamba_expand", 2))
    head_dim = cfg.get("mamba_d_head", "auto")
    head_dim = expand * h // heads if head_dim in (None, "auto") else int(head_dim)
    if heads * head_dim != expand * h:
        raise ConversionError(f"Bamba config: mamba_n_heads * mamba_d_head ({heads * head_dim}) must equal "
                              f"mamba_expand * hidden_size ({expand * h})")
    nh = int(cfg["num_attention_heads"])
    nkv = int(cfg.get("num_key_value_heads") or nh)
    positions = int(cfg.get("max_position_embeddings", 4096))
    return dict(
        num_layers=2 * layers, hidden_size=h, num_attention_heads=nh, kv_channels=int(cfg.get("head_dim") or h // nh),
        group_query_attention=nkv != nh, num_query_groups=nkv, ffn_hidden_size=int(cfg["intermediate_size"]),
        seq_length=min(positions, 4096), max_position_embeddings=positions, position_embedding_type="rope",
        rotary_base=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rotary_percent=float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5))),
        rotary_interleaved=False, rotary_seq_len_interpolation_factor=None, normalization="RMSNorm",
        norm_epsilon=float(cfg.get("rms_norm_eps", GATED_NORM_EPS)), apply_layernorm_1p=False, swiglu=True,
        squared_relu=False, openai_gelu=False, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False,
        attention_dropout=float(cfg.get("attention_dropout") or 0.0), hidden_dropout=0.0,
        untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", False),
        true_vocab_size=int(cfg["vocab_size"]), mamba_state_dim=int(cfg["mamba_d_state"]), mamba_head_dim=head_dim,
        mamba_num_groups=groups, mamba_num_heads=heads, hybrid_override_pattern=pattern, hybrid_attention_ratio=0.0,
        hybrid_mlp_ratio=0.0, is_hybrid_model=True, **{MAMBA_MODEL: True},
    )


# ------------------------------------------------------------------ HF -> messages


def _prefix(family: str, keys: Callable[[str], bool]) -> str:
    if family == "bamba":
        return "model."
    if family == "nemotron_h" and not keys("backbone.embeddings.weight") and keys("model.embeddings.weight"):
        return "model."
    return "backbone."


def _hf_names(family: str, symbol: str, i: int, prefix: str) -> dict:
    """HF names of layer i's tensors (our numbering): norm, mixer (Mamba or attention module prefix),
    and the MLP's up / gate / down."""
    if family == "bamba":
        hp = f"{prefix}layers.{i // 2}."
        if symbol == "-":
            return dict(norm=hp + "pre_ff_layernorm.weight", up=hp + "feed_forward.up_proj.weight",
                        gate=hp + "feed_forward.gate_proj.weight", down=hp + "feed_forward.down_proj.weight")
        return dict(norm=hp + "input_layernorm.weight", mixer=hp + ("mamba." if symbol == "M" else "self_attn."))
    hp = f"{prefix}layers.{i}."
    return dict(norm=hp + "norm.weight", mixer=hp + "mixer.", up=hp + "mixer.up_proj.weight",
                down=hp + "mixer.down_proj.weight")


def _hf_layer_to_ours(md: dict, symbol: str, i: int, names: dict, get: Callable[[str], torch.Tensor],
                      has: Callable[[str], bool], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    p = f"decoder.layers.{i}."
    if symbol == "M":
        mp = names["mixer"]
        out = {p + "norm.weight": get(names["norm"])}
        for name in MIXER_TENSORS:
            if name == "conv1d.bias" and not has(mp + "conv1d.bias"):
                # use_conv_bias false: a zero bias computes the same function.
                channels = get(mp + "conv1d.weight").shape[0]
                out[p + "mixer.conv1d.bias"] = torch.zeros(channels, dtype=dtype)
                continue
            out[p + "mixer." + name] = get(mp + name)
        return out
    if symbol == "*":
        q, k, v = (get(names["mixer"] + f"{x}_proj.weight") for x in "qkv")
        return {p + "input_layernorm.weight": get(names["norm"]),
                p + "self_attention.linear_qkv.weight": qkv_to_grouped(q, k, v, md["num_attention_heads"],
                                                                       md["num_query_groups"], md["kv_channels"]),
                p + "self_attention.linear_proj.weight": get(names["mixer"] + "o_proj.weight")}
    up = get(names["up"])
    fc1 = torch.cat([get(names["gate"]), up], dim=0) if "gate" in names else up  # SwiGLU: [gate; up]
    return {p + "pre_mlp_layernorm.weight": get(names["norm"]), p + "mlp.linear_fc1.weight": fc1,
            p + "mlp.linear_fc2.weight": get(names["down"])}


def _outer_names(family: str, prefix: str) -> tuple:
    """(word embedding, final norm) names of a family's folder."""
    if family == "bamba":
        return prefix + "embed_tokens.weight", prefix + "final_layernorm.weight"
    return prefix + "embeddings.weight", prefix + "norm_f.weight"


def hf_mamba_messages(path: str, cfg: dict, md: dict, weights, params_dtype: Optional[torch.dtype]
                      ) -> Iterator[Message]:
    """The conversion messages of a Mamba2 / Nemotron-H folder (`md`: its metadata, complete;
    `weights`: its hf.HFWeights)."""
    family = cfg["model_type"]
    prefix = _prefix(family, weights.__contains__)
    used = set()

    def get(name: str) -> torch.Tensor:
        used.add(name)
        t = weights.get(name)
        return t.to(params_dtype) if params_dtype is not None else t

    yield "metadata", md
    emb_name, final_name = _outer_names(family, prefix)
    emb = get(emb_name)
    if emb.shape[0] != md["true_vocab_size"]:
        raise ConversionError(f"{emb_name} has {emb.shape[0]} rows but config.json says vocab_size "
                              f"{md['true_vocab_size']}")
    yield "embeddings", {"embedding.word_embeddings.weight": emb}
    dtype = emb.dtype
    for i, symbol in enumerate(hybrid_layer_symbols(md)):
        yield layer_message(i), _hf_layer_to_ours(md, symbol, i, _hf_names(family, symbol, i, prefix), get,
                                                  weights.__contains__, dtype)
    yield "final norm", {"decoder.final_norm.weight": get(final_name)}
    tied = not md["untie_embeddings_and_output_weights"]
    if not tied:
        yield "output layer", {"output_layer.weight": get("lm_head.weight")}
    left = sorted(n for n in weights.keys() if n not in used and not (n == "lm_head.weight" and tied))
    if left:
        raise ConversionError(f"{path} holds tensors this converter does not map (an unsupported feature?): "
                              f"{', '.join(left[:6])}{' ...' if len(left) > 6 else ''}")
    yield "done", {}


# ------------------------------------------------------------------ messages -> HF


def _bamba_pairs(symbols: List[str]) -> bool:
    return len(symbols) % 2 == 0 and all(symbols[k] in "M*" and symbols[k + 1] == "-"
                                         for k in range(0, len(symbols), 2))


def mamba_family_of(md: dict) -> str:
    """The HuggingFace family of a Mamba / hybrid model: the source's (from a Mamba family folder),
    else Mamba2 when every layer is a Mamba layer, Bamba for (M|*)- pairs with a SwiGLU MLP and
    RoPE, Nemotron-H otherwise."""
    source = (md.get("hf_config") or {}).get("model_type")
    if source in MAMBA_FAMILIES:
        return source
    symbols = hybrid_layer_symbols(md)
    if all(s == "M" for s in symbols):
        return "mamba2"
    if _bamba_pairs(symbols) and md.get("swiglu") and md["position_embedding_type"] == "rope":
        return "bamba"
    return "nemotron_h"


def mamba_export_problems(md: dict, family: str) -> List[str]:
    """What keeps the model `md` describes from being a HuggingFace `family` model (empty: exportable)."""
    problems = []
    if not md.get(MAMBA_MODEL):
        return [f"a GPT model (the {family} family holds Mamba / hybrid models: export it as llama, mistral, "
                "mixtral or gpt2)"]
    symbols = hybrid_layer_symbols(md)
    if md["normalization"] != "RMSNorm":
        problems.append(f"--normalization {md['normalization']} (RMSNorm only)")
    if float(md["norm_epsilon"]) != GATED_NORM_EPS:
        problems.append(f"--norm-epsilon {md['norm_epsilon']} (HuggingFace uses one epsilon for the layer norms and "
                        f"the mixer's gated norm, whose epsilon is {GATED_NORM_EPS})")
    for flag in ("apply_layernorm_1p", "qk_layernorm", "apply_residual_connection_post_layernorm", "add_bias_linear",
                 "add_qkv_bias"):
        if md.get(flag):
            problems.append("--" + flag.replace("_", "-").replace("add-bias-linear", "add-bias-linear (biases)"))
    if md["position_embedding_type"] == "learned_absolute":
        problems.append("learned absolute position embeddings (use --position-embedding-type none)")
    if "E" in symbols:
        problems.append("MoE layers (E)")
    if family == "mamba2":
        wrong = sorted({_SYMBOL[s] for s in symbols if s != "M"})
        if wrong:
            problems.append(f"{', '.join(wrong)} layers (Mamba2ForCausalLM is all Mamba; export it as nemotron_h)")
        heads, head_dim = _heads(md)
        if (heads * head_dim) % int(md["hidden_size"]) != 0:
            problems.append(f"an inner width {heads * head_dim} that is not a multiple of --hidden-size "
                            f"{md['hidden_size']} (Mamba2 derives it as expand * hidden_size)")
    elif family == "bamba":
        if not _bamba_pairs(symbols):
            problems.append("a pattern other than Mamba or attention layers each followed by an MLP layer "
                            "('M-' / '*-' pairs: a Bamba layer is both)")
        if not md["swiglu"]:
            problems.append("an MLP without SwiGLU (Bamba's feed-forward is gate/up/down: --swiglu)")
        if "*" in symbols and (md["position_embedding_type"] != "rope" or md.get("rotary_interleaved")
                               or md.get("rotary_seq_len_interpolation_factor") or md.get("use_rope_scaling")):
            problems.append("attention without plain half-split RoPE (Bamba rotates each head's first "
                            "partial_rotary_factor channels: --position-embedding-type rope --rotary-percent)")
        if "*" in symbols and md.get("window_size") is not None:
            problems.append("--window-size (sliding-window attention)")
        heads, head_dim = _heads(md)
        if (heads * head_dim) % int(md["hidden_size"]) != 0:
            problems.append(f"an inner width {heads * head_dim} that is not a multiple of --hidden-size")
    else:
        if "*" in symbols and md["position_embedding_type"] == "rope":
            problems.append("rotary position embeddings (Nemotron-H attention has none: --position-embedding-type "
                            "none)")
        if "-" in symbols and (md["swiglu"] or not md.get("squared_relu")):
            problems.append("an MLP activation other than squared ReLU (Nemotron-H's relu2: --squared-relu)")
        if "*" in symbols and md.get("window_size") is not None:
            problems.append("--window-size (sliding-window attention)")
    return problems


def _heads(md: dict) -> tuple:
    from gigatron.core.transformer.mamba.config import mamba_num_heads
    from gigatron.core.convert.protocol import mamba_config_from_metadata

    config = mamba_config_from_metadata(md)
    return mamba_num_heads(config, int(md["hidden_size"])), config.mamba_head_dim


def mamba_hf_config_from_metadata(md: dict, family: str, conv_bias: bool = True) -> dict:
    """config.json for the Mamba / hybrid model `md` describes, as HuggingFace `family`. The source
    hf_config (same family) keeps its other fields (token ids, initializer range, chunk size, ...)."""
    source = md.get("hf_config") or {}
    same = source.get("model_type") == family
    cfg = dict(source) if same else {}
    for key in ("transformers_version", "_name_or_path"):
        cfg.pop(key, None)
    heads, head_dim = _heads(md)
    h = int(md["hidden_size"])
    dtype = md.get("params_dtype", "float32")
    if family == "bamba":
        return _bamba_config(cfg, md, heads, head_dim, conv_bias)
    cfg.update(architectures=[ARCHITECTURES[family]], model_type=family, dtype=dtype, torch_dtype=dtype,
               vocab_size=int(md["true_vocab_size"]), hidden_size=h, n_groups=int(md["mamba_num_groups"]),
               conv_kernel=CONV_KERNEL, use_bias=False, use_conv_bias=conv_bias,
               layer_norm_epsilon=float(md["norm_epsilon"]),
               tie_word_embeddings=not md["untie_embeddings_and_output_weights"])
    if not same or "time_step_limit" not in cfg:
        cfg["time_step_limit"] = [0.0, math.inf]
    if family == "mamba2":
        cfg.update(num_heads=heads, head_dim=head_dim, state_size=int(md["mamba_state_dim"]),
                   expand=heads * head_dim // h, num_hidden_layers=int(md["num_layers"]), hidden_act="silu")
        cfg.setdefault("residual_in_fp32", False)
        return cfg
    symbols = hybrid_layer_symbols(md)
    cfg.pop("hybrid_override_pattern", None)
    cfg.pop("layer_types", None)
    cfg.update(layers_block_type=[_NEMOTRON_NAMES[s] for s in symbols], num_hidden_layers=len(symbols),
               mamba_num_heads=heads, mamba_head_dim=head_dim, ssm_state_size=int(md["mamba_state_dim"]),
               mamba_hidden_act="silu", mamba_proj_bias=False,
               num_attention_heads=int(md["num_attention_heads"]), num_key_value_heads=int(md["num_query_groups"]),
               head_dim=int(md["kv_channels"]), intermediate_size=int(md["ffn_hidden_size"]),
               mlp_hidden_act="relu2", mlp_bias=False, attention_bias=False, sliding_window=None,
               max_position_embeddings=int(md["max_position_embeddings"]),
               attention_dropout=float(md.get("attention_dropout") or 0.0),
               hidden_dropout=float(md.get("hidden_dropout") or 0.0), num_nextn_predict_layers=0)
    return cfg


def _bamba_config(cfg: dict, md: dict, heads: int, head_dim: int, conv_bias: bool) -> dict:
    h = int(md["hidden_size"])
    symbols = hybrid_layer_symbols(md)
    dtype = md.get("params_dtype", "float32")
    theta = float(md["rotary_base"])
    cfg.pop("rope_scaling", None)
    cfg.update(architectures=[ARCHITECTURES["bamba"]], model_type="bamba", dtype=dtype, torch_dtype=dtype,
               vocab_size=int(md["true_vocab_size"]), hidden_size=h, num_hidden_layers=len(symbols) // 2,
               attn_layer_indices=[k // 2 for k in range(0, len(symbols), 2) if symbols[k] == "*"],
               num_attention_heads=int(md["num_attention_heads"]), num_key_value_heads=int(md["num_query_groups"]),
               intermediate_size=int(md["ffn_hidden_size"]), hidden_act="silu", attention_bias=False, mlp_bias=False,
               rms_norm_eps=float(md["norm_epsilon"]), max_position_embeddings=int(md["max_position_embeddings"]),
               attention_dropout=float(md.get("attention_dropout") or 0.0),
               tie_word_embeddings=not md["untie_embeddings_and_output_weights"],
               rope_theta=theta, partial_rotary_factor=float(md.get("rotary_percent", 1.0)),
               rope_parameters={"rope_type": "default", "rope_theta": theta,
                                "partial_rotary_factor": float(md.get("rotary_percent", 1.0))},
               mamba_n_heads=heads, mamba_d_head=head_dim, mamba_n_groups=int(md["mamba_num_groups"]),
               mamba_d_state=int(md["mamba_state_dim"]), mamba_d_conv=CONV_KERNEL, mamba_expand=heads * head_dim // h,
               mamba_conv_bias=conv_bias, mamba_proj_bias=False)
    if int(md["kv_channels"]) != h // int(md["num_attention_heads"]):
        cfg["head_dim"] = int(md["kv_channels"])
    cfg.setdefault("time_step_limit", [0.0, math.inf])
    return cfg


def _ours_layer_to_hf(md: dict, symbol: str, i: int, names: dict, t: Dict[str, torch.Tensor]
                      ) -> Dict[str, torch.Tensor]:
    p = f"decoder.layers.{i}."
    if symbol == "M":
        out = {names["norm"]: t[p + "norm.weight"]}
        out.update({names["mixer"] + name: t[p + "mixer." + name] for name in MIXER_TENSORS})
        return out
    if symbol == "*":
        q, k, v = grouped_to_qkv(t[p + "self_attention.linear_qkv.weight"], md["num_attention_heads"],
                                 md["num_query_groups"], md["kv_channels"])
        mp = names["mixer"]
        return {names["norm"]: t[p + "input_layernorm.weight"], mp + "q_proj.weight": q, mp + "k_proj.weight": k,
                mp + "v_proj.weight": v, mp + "o_proj.weight": t[p + "self_attention.linear_proj.weight"]}
    fc1 = t[p + "mlp.linear_fc1.weight"]
    out = {names["norm"]: t[p + "pre_mlp_layernorm.weight"], names["down"]: t[p + "mlp.linear_fc2.weight"]}
    if "gate" in names:
        out[names["gate"]], out[names["up"]] = torch.chunk(fc1, 2, dim=0)
    else:
        out[names["up"]] = fc1
    return out


def mamba_hf_tensors_and_config(reader: Iterable[Message], md: dict, family: str,
                                params_dtype: Optional[torch.dtype]) -> tuple:
    """(HF tensors, config.json) of the Mamba / hybrid model of a checked message stream (`reader`,
    whose metadata is `md`) as HuggingFace `family`; hf.save_hf_checkpoint writes them with the
    tokenizer files."""
    problems = mamba_export_problems(md, family)
    if problems:
        raise ConversionError(f"cannot export to HuggingFace {family}: unsupported {'; '.join(problems)}")
    symbols = hybrid_layer_symbols(md)
    prefix = "model." if family == "bamba" else "backbone."
    emb_name, final_name = _outer_names(family, prefix)
    tensors: Dict[str, torch.Tensor] = {}
    for name, payload in reader:
        if params_dtype is not None:
            payload = {k: v.to(params_dtype) for k, v in payload.items()}
        if name == "embeddings":
            tensors[emb_name] = payload["embedding.word_embeddings.weight"]
        elif name == "final norm":
            tensors[final_name] = payload["decoder.final_norm.weight"]
        elif name == "output layer":
            tensors["lm_head.weight"] = payload["output_layer.weight"]
        else:
            i = int(name.rsplit(" ", 1)[1])
            tensors.update(_ours_layer_to_hf(md, symbols[i], i, _hf_names(family, symbols[i], i, prefix), payload))
    # A source without conv biases (use_conv_bias false) was imported with zero ones: leave them out again.
    source = md.get("hf_config") or {}
    conv_biases = [n for n in tensors if n.endswith(("mixer.conv1d.bias", "mamba.conv1d.bias"))]
    conv_bias = (bool(source.get(_KEYS[family]["conv_bias"], True)) if source.get("model_type") == family else True) \
        or any(bool(tensors[n].any()) for n in conv_biases)
    if not conv_bias:
        for n in conv_biases:
            del tensors[n]
    cfg = mamba_hf_config_from_metadata(md, family, conv_bias)
    return tensors, cfg

