"""Model FLOPs per iteration and the peak of the device they are measured against.

Two conventions:

- `num_floating_point_operations` (the default; Megatron's training.py): for every token,
  3 (forward, weight-gradient, input-gradient GEMMs) x 2 (multiply-add) x
      [ per layer: QKV and output projections with GQA groups, h*(nq*d)*(2 + 2*ng/nh)
                   + core attention, 2*s*(nq*d) at half for the causal mask
                   + MLP, 2*h*f (x 3/2 with SwiGLU)
        + logits h*V ].
  With multi-latent attention the attention term is Megatron's MLA count instead: query
  (h*nh*dq, or rq*(h + nh*dq + 1) through the latent), kv latent rkv*(h + nh*(dn + dv) + 1),
  shared rotary key h*dr, output projection nh*dv*h, core attention s*nh*(dq + dv)/2. Each
  multi-token prediction block adds a layer like the decoder's last, eh_proj 2h*h, 3h for its
  norms and another h*V for the output layer.
  Recompute is never counted.
  A hybrid Mamba model (`mamba_config`) counts each layer by its kind in the pattern: attention
  layers the QKV, output projection and core attention terms above, MLP layers the MLP term, Mamba
  layers Megatron's hybrid count, in_proj h*(2I + 2GN + H) + out_proj I*h multiply-adds plus
  7*I*N FLOPs per token per pass direction for the scan (I = Mamba heads x head dim, G groups, N state
  dim, H heads; the convolution is not counted), i.e. 6*T*(h(2I + 2GN + H) + I h) + 21*T*I*N.
- `paper_flops`: 6 * T * (L * (12 h^2 + s h) + h V), the simple dense formula of the
  pretraining issue (attention projections as 4h^2, MLP as 8h^2, causal attention scores as s h).
  It equals Megatron's count for a plain GPT (multi-head attention, 4h GeLU MLP) and ignores
  GQA, SwiGLU and --ffn-hidden-size otherwise.

MFU = achieved FLOP/s / `device_peak_flops(...)` of the card the run is on.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["num_floating_point_operations", "paper_flops", "device_peak_flops", "PEAK_TFLOPS"]


def num_floating_point_operations(config, vocab_size: int, batch_size: int, seq_length: int,
                                  moe_config=None, mamba_config=None) -> float:
    """Megatron's model FLOPs of one training iteration of `batch_size` sequences of `seq_length`
    tokens (vocab_size: the padded vocabulary the output layer uses).

    `moe_config` (an MoEConfig with num_experts): the MLP of each MoE layer (--moe-layer-freq)
    counts the active parameters, --moe-router-topk experts of --moe-ffn-hidden-size, plus the
    shared experts of --moe-shared-expert-intermediate-size (Megatron's convention: the router
    GEMM is not counted).

    `mamba_config` (a MambaConfig): the model is a hybrid Mamba stack; each layer counts the terms
    of its kind (see the module docstring)."""
    if mamba_config is not None:
        return _hybrid_flops(config, mamba_config, vocab_size, batch_size, seq_length, moe_config)
    h = config.hidden_size
    layers = config.num_layers
    gated = 1.5 if config.swiglu else 1.0
    per_token_per_layer = (
        _attention_macs(config, seq_length)
        # MLP: fc1 and fc2 (SwiGLU's fc1 is twice as wide).
        + 2 * h * config.ffn_hidden_size * gated
    )
    per_token = layers * per_token_per_layer + h * vocab_size
    last_is_moe = False
    if moe_config is not None and moe_config.num_experts is not None:
        from gigatron.core.transformer.moe.config import moe_layer_pattern

        pattern = moe_layer_pattern(moe_config, layers)
        last_is_moe = pattern[-1]
        num_moe = sum(pattern)
        moe_ffn = moe_config.moe_ffn_hidden_size or config.ffn_hidden_size
        shared = moe_config.moe_shared_expert_intermediate_size or 0
        moe_mlp = 2 * h * (moe_ffn * moe_config.moe_router_topk + shared) * gated
        per_token += num_moe * (moe_mlp - 2 * h * config.ffn_hidden_size * gated)
    mtp = getattr(config, "mtp_num_layers", None) or 0
    if mtp:
        # Each multi-token prediction block: a layer like the decoder's last, eh_proj (2h -> h),
        # its three norms (as Megatron counts them) and another pass through the output layer.
        last_layer = per_token_per_layer + (moe_mlp - 2 * h * config.ffn_hidden_size * gated if last_is_moe else 0)
        per_token += mtp * (last_layer + 2 * h * h + 3 * h + h * vocab_size)
    # 3 passes (fwd, wgrad, dgrad) x 2 FLOPs per multiply-add.
    return 6.0 * batch_size * seq_length * per_token


def _attention_macs(config, seq_length: int) -> float:
    """Multiply-adds per token of one attention sub-layer: projections plus core attention (half of
    the s x s matrix under the causal mask)."""
    h = config.hidden_size
    heads = config.num_attention_heads
    if getattr(config, "multi_latent_attention", False):
        dq = config.qk_head_dim + config.qk_pos_emb_head_dim
        if config.q_lora_rank is None:
            q_term = h * heads * dq
        else:  # down-projection, norm and up-projection of the query latent
            q_term = config.q_lora_rank * (h + heads * dq + 1)
        return (q_term
                # kv latent (down-projection, norm, up-projection to k_nope and v) and the shared rotary key
                + config.kv_lora_rank * (h + heads * (config.qk_head_dim + config.v_head_dim) + 1)
                + h * config.qk_pos_emb_head_dim
                # output projection
                + heads * config.v_head_dim * h
                # QK^T over dq channels and AV over v_head_dim channels
                + seq_length * heads * dq / 2 + seq_length * heads * config.v_head_dim / 2)
    groups = config.num_query_groups if config.group_query_attention else heads
    query_size = config.kv_channels * heads
    # QKV (queries full size, keys and values per group) and the output projection: 2 GEMMs of
    # h x query_size plus 2 of h x (groups * d); QK^T and AV.
    return 2 * h * query_size * (1.0 + groups / heads) + query_size * seq_length


def _hybrid_flops(config, mamba_config, vocab_size: int, batch_size: int, seq_length: int, moe_config) -> float:
    from gigatron.core.transformer.mamba.config import hybrid_layer_types, mamba_num_heads

    h = config.hidden_size
    heads = config.num_attention_heads
    groups = config.num_query_groups if config.group_query_attention else heads
    query_size = config.kv_channels * heads
    gated = 1.5 if config.swiglu else 1.0
    attention = 2 * h * query_size * (1.0 + groups / heads) + query_size * seq_length
    mlp = 2 * h * config.ffn_hidden_size * gated
    if moe_config is not None and moe_config.num_experts is not None:
        moe_ffn = moe_config.moe_ffn_hidden_size or config.ffn_hidden_size
        shared = moe_config.moe_shared_expert_intermediate_size or 0
        moe = 2 * h * (moe_ffn * moe_config.moe_router_topk + shared) * gated
    else:
        moe = mlp
    m_heads = mamba_num_heads(mamba_config, h)
    inner = m_heads * mamba_config.mamba_head_dim
    gn = mamba_config.mamba_num_groups * mamba_config.mamba_state_dim
    # GEMM multiply-adds per token, plus the scan's 21 I N FLOPs per token (fwd + bwd) as multiply-adds x 6
    mamba = h * (2 * inner + 2 * gn + m_heads) + inner * h + 3.5 * inner * mamba_config.mamba_state_dim
    per_kind = {"M": mamba, "*": attention, "-": mlp, "E": moe}
    layers = hybrid_layer_types(config.num_layers, mamba_config.hybrid_attention_ratio,
                                mamba_config.hybrid_mlp_ratio, mamba_config.hybrid_override_pattern)
    per_token = sum(per_kind[kind] for kind in layers) + h * vocab_size
    return 6.0 * batch_size * seq_length * per_token


def paper_flops(config, vocab_size: int, batch_size: int, seq_length: int) -> float:
    """6 * T * (L * (12 h^2 + s h) + h V) with T = batch_size * seq_length tokens."""
    h = config.hidden_size
    tokens = batch_size * seq_length
    return 6.0 * tokens * (config.num_layers * (12 * h * h + seq_length * h) + h * vocab_size)


# Dense (no sparsity) tensor-core peaks in TFLOP/s. fp32 means TF32 tensor cores.
PEAK_TFLOPS = {
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "fp32": 494.7},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp8": 1513.0, "fp32": 378.0},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "fp8": 1670.0, "fp32": 417.5},
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "fp32": 494.7},
    "GH200": {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "fp32": 494.7},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp8": 733.0, "fp32": 183.0},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp8": 242.0, "fp32": 60.0},
    "V100": {"fp16": 125.0, "fp32": 15.7},
}


def _card(name: str) -> Optional[str]:
    n = name.upper()
    if "GH200" in n:
        return "GH200"
    if "H200" in n:
        return "H200"
    if "H100" in n:
        if "PCIE" in n:
            return "H100 PCIe"
        if "NVL" in n:
            return "H100 NVL"
        return "H100 SXM"
    for card in ("A100", "L40S", "L4", "V100"):
        if card in n:
            return card
    return None


def _dtype_key(dtype) -> str:
    if isinstance(dtype, str):
        return dtype
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.float32:
        return "fp32"
    if "float8" in str(dtype):
        return "fp8"
    raise ValueError(f"no peak FLOP/s known for dtype {dtype}")


def device_peak_flops(device=None, dtype=torch.bfloat16, device_name: Optional[str] = None
                      ) -> Optional[Tuple[float, str]]:
    """(dense peak TFLOP/s, description) of the card `device` for `dtype`; None on a CPU or on a
    card not in PEAK_TFLOPS. `device_name` overrides torch.cuda.get_device_name (for tests)."""
    if device_name is None:
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type != "cuda":
            return None
        device_name = torch.cuda.get_device_name(device)
    card = _card(device_name)
    if card is None:
        return None
    key = _dtype_key(dtype)
    peak = PEAK_TFLOPS[card].get(key)
    if peak is None:
        return None
    return peak, f"{device_name} ({card}, {key} dense {peak:g} TFLOP/s)"
