"""Multi-token prediction (MTP, DeepSeek-V3), with Megatron-Core's parameter names.

Shape legend: s = sequence (s/tp with sequence parallelism), b = batch, h = hidden, V = padded
vocabulary (V/tp per tensor-parallel rank).

Block k (k = 1 .. --mtp-num-layers, stored as mtp.layers.{k-1}) predicts the token k positions
after the next one. With h_0 the decoder's output (after its final norm) and t the input tokens:

    e_k = embedding(t shifted left by k)                        (the shifted-out end is token 0)
    x_k = eh_proj([enorm(e_k); hnorm(h_{k-1})])                 [s, b, 2h] -> [s, b, h]
    h_k = final_layernorm(transformer_layer(x_k))               one decoder layer, same rotary angles
    loss_k = cross_entropy(output_layer(h_k), labels shifted left by k)

The embedding and output layer are the main model's (shared). The training loss adds
mtp_loss_scaling_factor / D * sum_k mean_k(loss_k), each mean over the loss mask shifted left by k
(so the last k positions of a sequence count for nothing); gigatron/training/gpt.py's loss_func
does the masking and logs each block's mean as `mtp_k loss`.

The transformer layer is built like the decoder's last layer (MoE when that one is) and numbered
after the decoder (global layer num_layers + k - 1; init keys and MoE aux-loss records use it).
eh_proj is column-parallel with its output gathered over the tensor-parallel ranks (and scattered
over the sequence again with sequence parallelism), as in Megatron-Core.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from gigatron.core.transformer.mlp import normal_init_method
from gigatron.core.transformer.norm import build_norm

__all__ = ["MultiTokenPredictionLayer", "MultiTokenPredictionBlock", "shift_left"]


def shift_left(t: torch.Tensor, k: int = 1, dim: int = -1) -> torch.Tensor:
    """t shifted k places towards the start along `dim`, the last k filled with zeros."""
    if k == 0:
        return t
    out = torch.roll(t, shifts=-k, dims=dim)
    length = t.shape[dim]
    out.narrow(dim, length - k, k).zero_()
    return out


class MultiTokenPredictionLayer(nn.Module):
    """One MTP block: forward(embedded [s, b, h], hidden [s, b, h], attention_mask, rotary) -> [s, b, h]."""

    def __init__(self, config, groups, depth: int, moe_config=None):
        super().__init__()
        from gigatron.core.parallel.layers import ColumnParallelLinear
        from gigatron.core.transformer.layer import TransformerLayer

        prefix = f"mtp.layers.{depth}"
        self.config = config
        self.groups = groups
        self.sequence_parallel = bool(config.sequence_parallel) and groups.tp.size > 1
        h = config.hidden_size
        self.enorm = build_norm(config, h, groups, init_key=prefix + ".enorm")
        self.hnorm = build_norm(config, h, groups, init_key=prefix + ".hnorm")
        self.eh_proj = ColumnParallelLinear(2 * h, h, config=config, tp=groups.tp, init_method=normal_init_method(config),
                                            bias=False, gather_output=False, init_key=prefix + ".eh_proj")
        self.transformer_layer = TransformerLayer(config, groups, layer_number=config.num_layers + depth,
                                                  moe_config=moe_config)
        self.final_layernorm = build_norm(config, h, groups, init_key=prefix + ".final_layernorm")

    def forward(self, embedded: torch.Tensor, hidden: torch.Tensor, attention_mask=None,
                rotary_pos_emb=None) -> torch.Tensor:
        from gigatron.core.parallel.mappings import gather_from_tensor_parallel_region, scatter_to_sequence_parallel_region

        x = torch.cat((self.enorm(embedded), self.hnorm(hidden)), dim=-1)  # [s, b, 2h]
        x, _ = self.eh_proj(x)  # [s, b, h/tp] (all tokens)
        if self.groups.tp.size > 1:
            x = gather_from_tensor_parallel_region(x, self.groups.tp)  # [s, b, h]
            if self.sequence_parallel:
                x = scatter_to_sequence_parallel_region(x, self.groups.tp)  # [s/tp, b, h]
        x = self.transformer_layer(x, attention_mask, rotary_pos_emb)
        return self.final_layernorm(x)


class MultiTokenPredictionBlock(nn.Module):
    """The --mtp-num-layers blocks (`layers`) of the last pipeline stage.

    forward(input_ids [b, s], position_ids [b, s] | None, hidden [s, b, h] (decoder output after its
    final norm), embedding (the model's LanguageModelEmbedding), attention_mask, rotary_pos_emb)
    -> the hidden state of each block, a list of D tensors [s, b, h]."""

    def __init__(self, config, groups, moe_config=None):
        super().__init__()
        from gigatron.core.transformer.moe.config import is_moe_layer

        last_is_moe = is_moe_layer(moe_config, config.num_layers - 1, config.num_layers)
        self.layers = nn.ModuleList(
            MultiTokenPredictionLayer(config, groups, depth, moe_config if last_is_moe else None)
            for depth in range(config.mtp_num_layers))

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor], hidden: torch.Tensor,
                embedding, attention_mask=None, rotary_pos_emb=None) -> List[torch.Tensor]:
        outputs = []
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]  # [1, s]
        for layer in self.layers:
            input_ids = shift_left(input_ids, 1)
            position_ids = shift_left(position_ids, 1)
            embedded = embedding(input_ids, position_ids)  # [s, b, h] ([s/tp, b, h] with sequence parallel)
            hidden = layer(embedded, hidden, attention_mask, rotary_pos_emb)
            outputs.append(hidden)
        return outputs
