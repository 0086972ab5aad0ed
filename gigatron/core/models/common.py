"""Language-model embedding shared by the GPT-style models.

Shape legend: b = batch, s = sequence, h = hidden, tp = tensor-parallel size.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gigatron.core.parallel import tags
from gigatron.core.parallel.layers import VocabParallelEmbedding
from gigatron.core.parallel.mappings import scatter_to_sequence_parallel_region
from gigatron.core.transformer.mlp import normal_init_method
from gigatron.core.transformer.norm import param_device

__all__ = ["LanguageModelEmbedding"]


class LanguageModelEmbedding(nn.Module):
    """Word (vocab-parallel) + learned absolute position embeddings, then dropout.

    forward(input_ids [b, s], position_ids [b, s] | None) -> [s, b, h] (fp32 with
    --fp32-residual-connection), or [s/tp, b, h] with sequence parallelism."""

    def __init__(self, config, groups, vocab_size: int):
        super().__init__()
        self.config = config
        self.tp = groups.tp
        self.sequence_parallel = config.sequence_parallel and groups.tp.size > 1
        learned = config.position_embedding_type == "learned_absolute"
        self.word_embeddings = VocabParallelEmbedding(
            vocab_size, config.hidden_size, config=config, tp=groups.tp,
            init_method=normal_init_method(config), init_key="embedding.word_embeddings",
            # Without position embeddings the lookup can go straight to the sequence-parallel
            # layout (one reduce-scatter instead of all-reduce + split).
            reduce_scatter_embeddings=self.sequence_parallel and not learned)
        if learned:
            # _weight: allocate without nn.Embedding's own random init (initialize_parameters fills it).
            self.position_embeddings = nn.Embedding(
                config.max_position_embeddings, config.hidden_size,
                _weight=torch.empty(config.max_position_embeddings, config.hidden_size,
                                    dtype=config.params_dtype, device=param_device(config)))
            weight = self.position_embeddings.weight
            tags.set_tensor_parallel_attributes(weight, False, -1, 1)
            tags.set_init(weight, normal_init_method(config), "embedding.position_embeddings.weight")
        else:
            self.position_embeddings = None
        self.dropout_p = config.hidden_dropout

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.word_embeddings(input_ids)  # [b, s, h], or [s/tp, b, h] when reduce-scattered
        if self.position_embeddings is not None:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]  # [1, s]
            emb = emb + self.position_embeddings(position_ids)  # [b, s, h]
        if not self.word_embeddings.reduce_scatter_embeddings:
            emb = emb.transpose(0, 1).contiguous()  # [s, b, h]
        if self.config.fp32_residual_connection:
            emb = emb.float()
        if self.sequence_parallel and not self.word_embeddings.reduce_scatter_embeddings:
            emb = scatter_to_sequence_parallel_region(emb, self.tp)  # [s/tp, b, h]
        if self.training and self.dropout_p > 0.0:
            # Sequence-parallel ranks hold different tokens: draw from the per-rank stream.
            ctx = nullcontext()
            if self.sequence_parallel:
                from gigatron.core.parallel.random import get_tracker
                ctx = get_tracker().fork()
            with ctx:
                emb = F.dropout(emb, p=self.dropout_p, training=True)
        return emb
