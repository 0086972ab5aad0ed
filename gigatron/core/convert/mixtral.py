"""Mixtral (HuggingFace MixtralForCausalLM) <-> the conversion messages: the mixture-of-experts
part. Attention, norms, embeddings and the output layer are Mistral's (see hf.py); every layer's
MLP is a routed mixture of SwiGLU experts.

Shape legend: h = hidden, f = expert ffn hidden (config.json intermediate_size), E = experts.

Name and layout map (layer i; HF under `model.layers.i.`, Gigatron under `decoder.layers.i.`):

    block_sparse_moe.gate.weight [E, h]             mlp.router.weight
    block_sparse_moe.experts.j.w1.weight [f, h]     mlp.experts.local_experts.j.linear_fc1.weight
    block_sparse_moe.experts.j.w3.weight [f, h]       = [w1; w3] [2f, h] ([gate; up], SwiGLU)
    block_sparse_moe.experts.j.w2.weight [h, f]     mlp.experts.local_experts.j.linear_fc2.weight

Routing: Mixtral takes the softmax over all E router logits, keeps the top-k
(num_experts_per_tok) and renormalises them to sum 1. That equals the softmax over the k largest
logits, which is Gigatron's (and Megatron's) softmax router without --moe-router-pre-softmax and
without a top-k scaling factor; `moe_router_topk` = num_experts_per_tok, `num_experts` =
num_local_experts, every layer an MoE layer (`moe_layer_freq` 1), `moe_ffn_hidden_size` =
intermediate_size, `moe_aux_loss_coeff` = router_aux_loss_coef. Tokens are never dropped
(no capacity factor), as in Mixtral. Mixtral's router_jitter_noise (training only) has no
Gigatron counterpart and is kept in the carried config.json only.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

from gigatron.core.convert.protocol import ConversionError, moe_layer_flags

__all__ = ["mixtral_metadata", "hf_moe_to_ours", "ours_moe_to_hf", "mixtral_config_fields",
           "mixtral_export_problems"]


def mixtral_metadata(cfg: dict) -> dict:
    """The MoE metadata (Megatron flag names) of a Mixtral config.json dict."""
    experts = cfg.get("num_local_experts")
    topk = cfg.get("num_experts_per_tok")
    if not experts or not topk:
        raise ConversionError("a Mixtral config.json needs num_local_experts and num_experts_per_tok")
    if not 1 <= int(topk) <= int(experts):
        raise ConversionError(f"Mixtral num_experts_per_tok ({topk}) must be between 1 and num_local_experts "
                              f"({experts})")
    return dict(
        num_experts=int(experts), moe_layer_freq=1, moe_ffn_hidden_size=int(cfg["intermediate_size"]),
        moe_router_topk=int(topk), moe_router_score_function="softmax", moe_router_pre_softmax=False,
        moe_router_topk_scaling_factor=None, moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=float(cfg.get("router_aux_loss_coef", 0.001)), moe_router_dtype=None,
    )


def hf_moe_to_ours(md: dict, i: int, get: Callable[[str], torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The MoE MLP tensors of layer i from a Mixtral folder (`get` reads an HF tensor by name)."""
    hp = f"model.layers.{i}.block_sparse_moe."
    p = f"decoder.layers.{i}.mlp."
    out = {p + "router.weight": get(hp + "gate.weight")}  # [E, h]
    for j in range(int(md["num_experts"])):
        gate, up = get(f"{hp}experts.{j}.w1.weight"), get(f"{hp}experts.{j}.w3.weight")  # [f, h] each
        out[f"{p}experts.local_experts.{j}.linear_fc1.weight"] = torch.cat([gate, up], dim=0)  # [2f, h]
        out[f"{p}experts.local_experts.{j}.linear_fc2.weight"] = get(f"{hp}experts.{j}.w2.weight")  # [h, f]
    return out


def ours_moe_to_hf(md: dict, i: int, t: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Mixtral's tensors for the MoE MLP of layer i (`t`: the layer's message payload)."""
    hp = f"model.layers.{i}.block_sparse_moe."
    p = f"decoder.layers.{i}.mlp."
    out = {hp + "gate.weight": t[p + "router.weight"]}
    for j in range(int(md["num_experts"])):
        gate, up = torch.chunk(t[f"{p}experts.local_experts.{j}.linear_fc1.weight"], 2, dim=0)  # [f, h] each
        out[f"{hp}experts.{j}.w1.weight"] = gate
        out[f"{hp}experts.{j}.w3.weight"] = up
        out[f"{hp}experts.{j}.w2.weight"] = t[f"{p}experts.local_experts.{j}.linear_fc2.weight"]
    return out


def mixtral_export_problems(md: dict) -> list:
    """What keeps the model `md` describes from being a Mixtral model (empty: exportable)."""
    problems = []
    if not md.get("num_experts"):
        problems.append("a dense model (Mixtral needs --num-experts)")
        return problems
    if not all(moe_layer_flags(md)):
        problems.append("dense layers between MoE layers (Mixtral needs --moe-layer-freq 1)")
    if md.get("moe_router_score_function", "softmax") != "softmax":
        problems.append(f"--moe-router-score-function {md['moe_router_score_function']}")
    if md.get("moe_router_pre_softmax"):
        problems.append("--moe-router-pre-softmax (Mixtral renormalises the top-k probabilities)")
    if md.get("moe_router_topk_scaling_factor") not in (None, 1, 1.0):
        problems.append("--moe-router-topk-scaling-factor")
    if md.get("add_bias_linear"):
        problems.append("linear biases")
    return problems


def mixtral_config_fields(md: dict) -> dict:
    """The Mixtral-specific config.json fields for the model `md` describes."""
    source = md.get("hf_config") or {}
    return dict(
        intermediate_size=int(md.get("moe_ffn_hidden_size") or md["ffn_hidden_size"]),
        num_local_experts=int(md["num_experts"]), num_experts_per_tok=int(md.get("moe_router_topk") or 2),
        router_aux_loss_coef=float(md.get("moe_aux_loss_coeff") or 0.0),
        router_jitter_noise=float(source.get("router_jitter_noise", 0.0)) if source.get("model_type") == "mixtral"
        else 0.0,
        output_router_logits=bool(source.get("output_router_logits", False)),
    )
