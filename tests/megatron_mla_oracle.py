"""Upstream Megatron-Core's multi-latent attention GPT (with multi-token prediction) as a test oracle.

Run as a script in a subprocess (see tests/megatron_oracle.py for why megatron.core must never be
imported in the pytest process):

    python tests/megatron_mla_oracle.py --spec SPEC.json --state STATE.pt --out OUT.pt

SPEC.json: the model sizes and MLA/MTP settings; STATE.pt: {"state_dict", "tokens", "labels"} with
a state dict in Megatron-Core's local-spec names (ours). The script builds Megatron-Core's GPTModel
with the local layer spec (MLASelfAttention) and, with mtp_num_layers, its MTP block; loads the
state dict strictly; and writes OUT.pt: {"logits" [b, s, V] (eval forward; without MTP, whose
Megatron forward needs labels), "loss" [b, s] (the
main per-token loss of a training forward with the labels), "grads" {name: gradient of the mean
main loss, which carries the MTP losses through Megatron's MTPLossAutoScaler}, "mtp" [D] (Megatron's
logged MTP losses)}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class ExplicitCoreAttention(torch.nn.Module):
    """softmax(q k^T * softmax_scale + causal mask) v, for Megatron-Core's MLASelfAttention: its
    local spec's DotProductAttention (megatron-core 0.16) does not take the separate key/value
    head sizes (k_channels, v_channels) that MLA passes, so the oracle substitutes this
    textbook attention; the projections, norms, rotary embedding, scales and MTP stay Megatron's."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, softmax_scale=None, k_channels=None,
                 v_channels=None, cp_comm_type=None, pg_collection=None, **kwargs):
        super().__init__()
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        q, k, v = (t.permute(1, 2, 0, 3).float() for t in (query, key, value))  # [b, n, s, d]
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.softmax_scale
        s = scores.shape[-1]
        causal = torch.ones(s, s, dtype=torch.bool).triu(1)
        probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
        out = torch.matmul(probs, v).to(query.dtype)  # [b, n, s, dv]
        return out.permute(2, 0, 1, 3).reshape(s, out.shape[0], -1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--port", type=int, default=29651)
    args = parser.parse_args()

    from megatron_oracle import cpu_only, destroy_parallel, init_parallel

    spec = json.loads(open(args.spec, encoding="utf-8").read())
    saved = torch.load(args.state, weights_only=True)
    init_parallel(1, 1, port=args.port)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    mtp = spec.get("mtp_num_layers")
    config = MLATransformerConfig(
        num_layers=spec["num_layers"], hidden_size=spec["hidden_size"], num_attention_heads=spec["num_attention_heads"],
        ffn_hidden_size=spec["ffn_hidden_size"], q_lora_rank=spec["q_lora_rank"], kv_lora_rank=spec["kv_lora_rank"],
        qk_head_dim=spec["qk_head_dim"], qk_pos_emb_head_dim=spec["qk_pos_emb_head_dim"], v_head_dim=spec["v_head_dim"],
        rope_type=spec["rope_type"], rotary_base=spec["rotary_base"], rotary_scaling_factor=spec["rotary_scaling_factor"],
        mscale=spec["mscale"], mscale_all_dim=spec["mscale_all_dim"], qk_layernorm=True, normalization="RMSNorm",
        layernorm_epsilon=1e-5, gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, pipeline_dtype=torch.float32,
        mtp_num_layers=mtp, mtp_loss_scaling_factor=spec.get("mtp_loss_scaling_factor", 0.1))
    from megatron.core.transformer import multi_latent_attention

    # Without Transformer Engine its layer classes import as None while HAVE_TE stays True, and
    # MLASelfAttention's isinstance(.., TELinear) check fails; no TE layer is used here.
    multi_latent_attention.HAVE_TE = False
    layer_spec = get_gpt_layer_local_spec(multi_latent_attention=True, qk_layernorm=True, normalization="RMSNorm")
    layer_spec.submodules.self_attention.submodules.core_attention = ExplicitCoreAttention
    mtp_spec = get_gpt_mtp_block_spec(config, layer_spec, use_transformer_engine=False) if mtp else None
    with cpu_only():
        model = GPTModel(config, layer_spec, vocab_size=spec["vocab_size"], max_sequence_length=spec["seq_length"],
                         position_embedding_type="rope", share_embeddings_and_output_weights=False,
                         mtp_block_spec=mtp_spec)
    missing, unexpected = model.load_state_dict(saved["state_dict"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    tokens, labels = saved["tokens"], saved["labels"]
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    mask = torch.triu(torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool), diagonal=1)[None, None]
    out = {}
    with cpu_only():
        if not mtp:  # Megatron-Core's MTP forward needs labels (it has no logits-only path)
            model.eval()
            with torch.no_grad():
                out["logits"] = model(tokens, positions, mask).float()
        model.train()
        loss = model(tokens, positions, mask, labels=labels, loss_mask=torch.ones_like(labels, dtype=torch.float32))
        out["loss"] = loss.detach().float()
        (loss.float().sum() / loss.numel()).backward()
    out["grads"] = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    if mtp:
        from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

        out["mtp"] = MTPLossLoggingHelper.tracker["values"].detach().clone()
    torch.save(out, args.out)
    destroy_parallel()


if __name__ == "__main__":
    main()
