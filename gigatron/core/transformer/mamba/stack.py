"""The layers of a hybrid Mamba-Transformer stack and the stack of one pipeline stage
(Megatron-Core's MambaLayer, hybrid attention/MLP layers and MambaStack).

Shape legend: s = sequence (s/tp with sequence parallelism), b = batch, h = hidden.

Each layer is one pre-norm sub-layer with a residual connection:
    M  MambaLayer      x = x + dropout(mixer(norm(x)))                  norm, mixer.*
    *  AttentionLayer  x = x + dropout(self_attention(input_layernorm(x)) + bias)
    -  MLPLayer        x = x + dropout(mlp(pre_mlp_layernorm(x)) + bias)
    E  MLPLayer with an MoE layer as `mlp` (router + experts)
These are the parameter names of Megatron-Core's hybrid stack with unfused norms; its Transformer
Engine spec fuses each pre-norm into the next linear layer, which renames the norm weight
(torch_layout._TE_NORM_NAMES maps those names to ours). The stack ends with `final_norm` on the last
pipeline stage (Megatron's MambaStack name, not final_layernorm).

Pipeline stages take their layers from the whole pattern as TransformerBlock does (even split, or
--decoder-first/last-pipeline-num-layers); virtual pipeline stages are refused, as in Megatron.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import List, Optional

import torch
from torch import nn

from gigatron.core.parallel import tags
from gigatron.core.transformer.block import layer_offset, num_layers_on_stage
from gigatron.core.transformer.layer import bias_dropout_add
from gigatron.core.transformer.mamba.config import ATTENTION, MAMBA, MLP, MOE, validate_mamba
from gigatron.core.transformer.mamba.mixer import MambaMixer, output_init_method
from gigatron.core.transformer.norm import build_norm

__all__ = ["MambaLayer", "AttentionLayer", "MLPLayer", "MambaStack"]


class _ResidualLayer(nn.Module):
    """x + dropout(sublayer(norm(x)) + bias), the residual and dropout as TransformerLayer has them."""

    def __init__(self, config, layer_number: int):
        super().__init__()
        self.config = config
        self.layer_number = layer_number

    def _dropout_context(self):
        # Sequence-parallel ranks hold different tokens: their masks come from the per-rank stream.
        if self.config.sequence_parallel and self.training and self.config.hidden_dropout > 0.0:
            from gigatron.core.parallel.random import get_tracker
            return get_tracker().fork()
        return nullcontext()

    def _residual(self, out, bias, residual):
        with self._dropout_context():
            return bias_dropout_add(out, bias, residual, self.config.hidden_dropout, self.training)


class MambaLayer(_ResidualLayer):
    """forward(hidden [s, b, h], attention_mask=None, rotary_pos_emb=None, inference_context=None)
    -> [s, b, h] (inference_context: a generation step's caches, see MambaMixer.forward)."""

    def __init__(self, config, mamba_config, groups, layer_number: int):
        super().__init__(config, layer_number)
        self.norm = build_norm(config, config.hidden_size, groups, init_key=f"decoder.layers.{layer_number}.norm")
        self.mixer = MambaMixer(config, mamba_config, groups, layer_number)

    def forward(self, hidden, attention_mask=None, rotary_pos_emb=None, inference_context=None):
        out, bias = self.mixer(self.norm(hidden), inference_context)
        return self._residual(out, bias, hidden)


class AttentionLayer(_ResidualLayer):
    """An attention-only layer (`*`). forward(hidden, attention_mask, rotary_pos_emb) -> [s, b, h]."""

    def __init__(self, config, mamba_config, groups, layer_number: int):
        super().__init__(config, layer_number)
        from gigatron.core.transformer.attention import SelfAttention
        prefix = f"decoder.layers.{layer_number}"
        self.input_layernorm = build_norm(config, config.hidden_size, groups, init_key=prefix + ".input_layernorm")
        self.self_attention = SelfAttention(config, groups, layer_number)
        if mamba_config.is_hybrid_model:
            tags.set_init(self.self_attention.linear_proj.weight, output_init_method(config, True),
                          prefix + ".self_attention.linear_proj.weight")

    def forward(self, hidden, attention_mask=None, rotary_pos_emb=None, inference_context=None):
        out, bias = self.self_attention(self.input_layernorm(hidden), attention_mask, rotary_pos_emb,
                                        inference_context=inference_context)
        return self._residual(out, bias, hidden)


class MLPLayer(_ResidualLayer):
    """An MLP-only layer (`-`), or with `moe_config` an MoE-only layer (`E`).
    forward(hidden, attention_mask=None, rotary_pos_emb=None) -> [s, b, h]."""

    def __init__(self, config, mamba_config, groups, layer_number: int, moe_config=None):
        super().__init__(config, layer_number)
        prefix = f"decoder.layers.{layer_number}"
        self.pre_mlp_layernorm = build_norm(config, config.hidden_size, groups, init_key=prefix + ".pre_mlp_layernorm")
        if moe_config is not None:
            from gigatron.core.transformer.moe.config import validate_moe
            from gigatron.core.transformer.moe.moe_layer import MoELayer
            validate_moe(moe_config, config, groups)
            self.mlp = MoELayer(config, moe_config, groups, layer_number)
        else:
            from gigatron.core.transformer.mlp import MLP as DenseMLP
            self.mlp = DenseMLP(config, groups, layer_number)
            if mamba_config.is_hybrid_model:
                tags.set_init(self.mlp.linear_fc2.weight, output_init_method(config, True),
                              prefix + ".mlp.linear_fc2.weight")

    def forward(self, hidden, attention_mask=None, rotary_pos_emb=None, inference_context=None):
        out, bias = self.mlp(self.pre_mlp_layernorm(hidden))
        return self._residual(out, bias, hidden)


def build_hybrid_layer(symbol: str, config, mamba_config, groups, layer_number: int, moe_config=None) -> nn.Module:
    """The layer of one pattern symbol (global 0-based layer number)."""
    if symbol == MAMBA:
        return MambaLayer(config, mamba_config, groups, layer_number)
    if symbol == ATTENTION:
        return AttentionLayer(config, mamba_config, groups, layer_number)
    if symbol == MLP:
        return MLPLayer(config, mamba_config, groups, layer_number)
    if symbol == MOE:
        if moe_config is None or moe_config.num_experts is None:
            raise ValueError(f"layer {layer_number} is an MoE layer ('E' in --hybrid-override-pattern) but "
                             "--num-experts is not set; set the MoE flags or use '-' for a dense MLP layer")
        return MLPLayer(config, mamba_config, groups, layer_number, moe_config)
    raise ValueError(f"unknown hybrid layer symbol {symbol!r}")


class MambaStack(nn.Module):
    """The hybrid layers of one pipeline stage and, on the last stage, the final norm.

    forward(hidden [s, b, h] | None, attention_mask=None, rotary_pos_emb=None) -> [s, b, h]; stages
    after the first take their input from set_input_tensor. `layer_types` holds the symbol of every
    layer of the whole model; `local_layer_types` this stage's."""

    def __init__(self, config, mamba_config, groups, pre_process: bool = True, post_process: bool = True,
                 moe_config=None):
        super().__init__()
        if groups.vp_size is not None or config.virtual_pipeline_model_parallel_size is not None:
            raise ValueError("hybrid Mamba models do not support --virtual-pipeline-model-parallel-size "
                             "(as in Megatron); drop it")
        pp_rank, pp_size = groups.pp.rank, groups.pp.size
        if pp_size != config.pipeline_model_parallel_size:
            raise ValueError(f"the pipeline group has {pp_size} ranks but --pipeline-model-parallel-size is "
                             f"{config.pipeline_model_parallel_size}; build the groups from the same config")
        if config.recompute_granularity == "selective":
            raise ValueError("--recompute-granularity selective has no modules to recompute in a hybrid Mamba "
                             "model; use --recompute-granularity full")
        self.config = config
        self.groups = groups
        self.pre_process = pre_process
        self.post_process = post_process
        self.layer_types: List[str] = validate_mamba(mamba_config, config, groups.tp.size)
        self.num_local_layers = num_layers_on_stage(config, pp_rank, pp_size)
        self.layer_offset = layer_offset(config, pp_rank, pp_size)
        self.local_layer_types = self.layer_types[self.layer_offset:self.layer_offset + self.num_local_layers]
        self.layers = nn.ModuleList(
            build_hybrid_layer(symbol, config, mamba_config, groups, self.layer_offset + i, moe_config)
            for i, symbol in enumerate(self.local_layer_types))
        self.final_norm = (build_norm(config, config.hidden_size, groups, init_key="decoder.final_norm")
                           if post_process else None)
        self.input_tensor = None

    def set_input_tensor(self, tensor: Optional[torch.Tensor]) -> None:
        """Input of a stage after the first: [s, b, h] (or [s/tp, b, h] with sequence parallel)."""
        self.input_tensor = tensor

    def _run_layers(self, start: int, end: int, hidden, attention_mask, rotary_pos_emb, inference_context=None):
        for layer in self.layers[start:end]:
            hidden = layer(hidden, attention_mask, rotary_pos_emb, inference_context)
            router = getattr(getattr(layer, "mlp", None), "router", None)
            if router is not None and router.pending_aux_losses:
                router.flush_aux_losses()  # values a compiled MoE layer queued
        return hidden

    def _forward_full_recompute(self, hidden, attention_mask, rotary_pos_emb):
        """--recompute-granularity full: uniform (chunks of --recompute-num-layers layers) or block
        (the first --recompute-num-layers layers of the stage), as TransformerBlock does."""
        from gigatron.core.parallel.random import checkpoint

        cfg = self.config
        n = self.num_local_layers

        def chunk(start, end):
            def run(x, mask, rope):
                return self._run_layers(start, end, x, mask, rope)
            return run

        spans = ([(s, min(s + cfg.recompute_num_layers, n)) for s in range(0, n, cfg.recompute_num_layers)]
                 if cfg.recompute_method == "uniform" else [(i, i + 1) for i in range(n)])
        recomputed = n if cfg.recompute_method == "uniform" else min(cfg.recompute_num_layers, n)
        for start, end in spans:
            if start < recomputed:
                hidden = checkpoint(chunk(start, end), cfg.distribute_saved_activations, hidden, attention_mask,
                                    rotary_pos_emb, tp=self.groups.tp)
            else:
                hidden = self._run_layers(start, end, hidden, attention_mask, rotary_pos_emb)
        return hidden

    def forward(self, hidden: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor] = None,
                rotary_pos_emb=None, inference_context=None) -> torch.Tensor:
        """inference_context: None, or a generation step's caches (KV cache of the attention
        layers, recurrent states of the Mamba layers: gigatron/core/inference/state_cache.py)."""
        if not self.pre_process:
            if self.input_tensor is None:
                raise RuntimeError("a pipeline stage after the first needs set_input_tensor() before forward")
            hidden = self.input_tensor
        if self.config.recompute_granularity == "full" and self.training and torch.is_grad_enabled():
            hidden = self._forward_full_recompute(hidden, attention_mask, rotary_pos_emb)
        else:
            hidden = self._run_layers(0, self.num_local_layers, hidden, attention_mask, rotary_pos_emb,
                                      inference_context)
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        return hidden
