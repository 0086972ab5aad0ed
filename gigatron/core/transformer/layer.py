"""TransformerLayer: pre-norm attention and MLP sub-layers with residual connections.

Shape legend: s = sequence (s/tp with sequence parallelism), b = batch, h = hidden.

    x = x + dropout(attention(norm1(x)) + bias)
    x = x + dropout(mlp(norm2(x)) + bias)

--apply-residual-connection-post-layernorm takes the residual from norm1(x) / norm2(x) instead.
With --fp32-residual-connection the stream arriving from the embedding is fp32 and stays fp32
(norms return the weight dtype for the GEMMs; the residual add promotes back to fp32).

On CUDA with --persist-layer-norm (and no dropout) the residual add after attention and the
pre-MLP norm run as one fused kernel (`_Norm.add_and_norm`); elsewhere the code path is the plain
one above.

The forward has no host synchronisation and no data-dependent Python branches, so each layer
compiles to one graph with torch.compile (branches depend only on the config and on whether
dropout is active).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gigatron.core.transformer.attention import SelfAttention
from gigatron.core.transformer.mlp import MLP
from gigatron.core.transformer.norm import LayerNorm, RMSNorm, build_norm

__all__ = ["TransformerLayer", "bias_dropout_add"]


def bias_dropout_add(x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor, p: float,
                     training: bool) -> torch.Tensor:
    """residual + dropout(x + bias); all [s, b, h]."""
    if bias is not None:
        x = x + bias
    if training and p > 0.0:
        x = F.dropout(x, p=p, training=True)
    return residual + x


class _DiscardNormOutput:
    """Saved-tensor hooks for the consumer of a recomputed norm: any tensor it saves for backward
    that lives in the norm output's storage (the GEMM input, or a view of it) is replaced by a
    note, and backward recomputes the norm from its input (which the norm's checkpoint keeps
    anyway). Saves one [s, b, h] activation per norm; Megatron's output-discarding checkpoint."""

    def __init__(self, norm: nn.Module, x: torch.Tensor, y: torch.Tensor):
        self.norm = norm
        self.x = x.detach()
        self.storage_ptr = y.untyped_storage().data_ptr()
        self.dtype = y.dtype
        self.recomputed = None

    def pack(self, t: torch.Tensor):
        if t.dtype == self.dtype and t.untyped_storage().data_ptr() == self.storage_ptr:
            return (t.size(), t.stride(), t.storage_offset())
        return t

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        if self.recomputed is None:
            with torch.no_grad():
                self.recomputed = self.norm(self.x)
        size, stride, offset = packed
        return self.recomputed.as_strided(size, stride, offset)

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class TransformerLayer(nn.Module):
    """One decoder layer; `layer_number` is the global (0-based) number, used for init keys.

    forward(hidden [s, b, h], attention_mask, rotary_pos_emb, inference_context=None) -> [s, b, h]
    (inference_context: an optional KV cache, see SelfAttention.forward)."""

    def __init__(self, config, groups, layer_number: int, moe_config=None):
        super().__init__()
        self.config = config
        self.layer_number = layer_number
        # moe_config (an MoEConfig or None): layers that --moe-layer-freq selects use an MoELayer
        # (returns (out, None)) in place of the dense MLP, under the same name `mlp`.
        self.is_moe = False
        if moe_config is not None and moe_config.num_experts is not None:
            from gigatron.core.transformer.moe.config import is_moe_layer
            # Multi-token prediction layers (numbered after the decoder) are built like its last layer.
            self.is_moe = is_moe_layer(moe_config, min(layer_number, config.num_layers - 1), config.num_layers)
        prefix = f"decoder.layers.{layer_number}"
        self.input_layernorm = build_norm(config, config.hidden_size, groups, init_key=prefix + ".input_layernorm")
        if getattr(config, "multi_latent_attention", False):
            from gigatron.core.transformer.mla import MLASelfAttention
            self.self_attention = MLASelfAttention(config, groups, layer_number)
        else:
            self.self_attention = SelfAttention(config, groups, layer_number)
        self.pre_mlp_layernorm = build_norm(config, config.hidden_size, groups,
                                            init_key=prefix + ".pre_mlp_layernorm")
        if self.is_moe:
            from gigatron.core.transformer.moe.moe_layer import MoELayer
            self.mlp = MoELayer(config, moe_config, groups, layer_number)
        else:
            self.mlp = MLP(config, groups, layer_number)
        modules = config.recompute_modules if config.recompute_granularity == "selective" else ()
        self.recompute_layernorm = "layernorm" in modules
        self.recompute_mlp = "mlp" in modules or (self.is_moe and "moe" in modules)

    def _dropout_context(self):
        # With sequence parallelism each tensor-parallel rank holds different tokens, so the
        # dropout masks come from the per-rank model-parallel RNG stream.
        if self.config.sequence_parallel and self.training and self.config.hidden_dropout > 0.0:
            from gigatron.core.parallel.random import get_tracker
            return get_tracker().fork()
        return nullcontext()

    def _recomputing(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def _norm(self, norm: nn.Module, x: torch.Tensor):
        """norm(x), and the context the norm's consumer runs in: with layernorm recompute, the
        norm is checkpointed and its output is not kept by the consumer either (recomputed)."""
        if self.recompute_layernorm and self._recomputing():
            from gigatron.core.parallel.random import checkpoint
            y = checkpoint(norm, False, x)
            return y, _DiscardNormOutput(norm, x, y).hooks()
        return norm(x), nullcontext()

    def _fuse_add_and_norm(self, attn_out: torch.Tensor) -> bool:
        """Whether the residual add after attention and the pre-MLP norm run as one fused kernel:
        the norm's fused path applies to `attn_out`, no dropout is active, the residual is the
        layer input, and the norm is not recomputed."""
        cfg = self.config
        dropout = self.training and cfg.hidden_dropout > 0.0
        recomputed = self.recompute_layernorm and self._recomputing()
        if dropout or recomputed or cfg.apply_residual_connection_post_layernorm:
            return False
        norm = self.pre_mlp_layernorm
        return isinstance(norm, (LayerNorm, RMSNorm)) and norm.uses_fused_add(attn_out)

    def _mlp_with_bias(self, x: torch.Tensor) -> torch.Tensor:
        out, bias = self.mlp(x)
        return out if bias is None else out + bias

    def _mlp(self, x: torch.Tensor):
        if self.recompute_mlp and self._recomputing():
            from gigatron.core.parallel.random import checkpoint
            return checkpoint(self._mlp_with_bias, False, x), None
        return self.mlp(x)

    def forward(self, hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                rotary_pos_emb: Optional[torch.Tensor] = None, inference_context=None) -> torch.Tensor:
        cfg = self.config
        p = cfg.hidden_dropout
        # Attention sub-layer.
        normed, consumer_context = self._norm(self.input_layernorm, hidden)
        with consumer_context:
            attn_out, attn_bias = self.self_attention(normed, attention_mask, rotary_pos_emb,
                                                      inference_context=inference_context)
        residual = normed if cfg.apply_residual_connection_post_layernorm else hidden
        if self._fuse_add_and_norm(attn_out):
            # The residual add and the pre-MLP norm in one kernel (--persist-layer-norm, CUDA).
            normed, hidden = self.pre_mlp_layernorm.add_and_norm(attn_out, attn_bias, residual)
            consumer_context = nullcontext()
        else:
            with self._dropout_context():
                hidden = bias_dropout_add(attn_out, attn_bias, residual, p, self.training)
            # MLP sub-layer.
            normed, consumer_context = self._norm(self.pre_mlp_layernorm, hidden)
        with consumer_context:
            mlp_out, mlp_bias = self._mlp(normed)
        residual = normed if cfg.apply_residual_connection_post_layernorm else hidden
        with self._dropout_context():
            hidden = bias_dropout_add(mlp_out, mlp_bias, residual, p, self.training)
        return hidden
