"""MambaModel: one pipeline stage of a Mamba-2 or hybrid Mamba-Transformer language model
(Megatron-Core's MambaModel).

Shape legend: b = batch, s = sequence, h = hidden, V = padded vocabulary, tp = tensor-parallel size.

The stack is built from the per-layer pattern (gigatron/core/transformer/mamba/config.py):
--hybrid-override-pattern, or --hybrid-attention-ratio / --hybrid-mlp-ratio, or all Mamba.
Parameter names follow Megatron-Core: embedding.word_embeddings.weight (and
embedding.position_embeddings.weight with learned positions; hybrid models usually pass
--position-embedding-type none), decoder.layers.{i}.norm.weight and decoder.layers.{i}.mixer.(in_proj.weight
| conv1d.weight | conv1d.bias | A_log | D | dt_bias | norm.weight | out_proj.weight) for Mamba
layers, decoder.layers.{i}.(input_layernorm | self_attention.*) for attention layers,
decoder.layers.{i}.(pre_mlp_layernorm | mlp.*) for MLP and MoE layers, decoder.final_norm.weight,
output_layer.weight; i is local to the stage (global i + decoder.layer_offset).

Initialization is layout independent (each parameter seeded by (seed, its global name)), so one
seed gives the same model at any tensor or pipeline parallel size.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from gigatron.core.models.common import LanguageModelEmbedding
from gigatron.core.ops.cross_entropy import chunked_output_cross_entropy
from gigatron.core.parallel import tags
from gigatron.core.parallel.cross_entropy import vocab_parallel_cross_entropy
from gigatron.core.parallel.layers import ColumnParallelLinear
from gigatron.core.parallel.mappings import copy_to_tensor_parallel_region, gather_from_sequence_parallel_region
from gigatron.core.transformer.attention import check_attention_backend
from gigatron.core.transformer.mamba.config import ATTENTION
from gigatron.core.transformer.mamba.stack import MambaStack
from gigatron.core.transformer.mlp import normal_init_method
from gigatron.core.transformer.norm import param_device
from gigatron.core.transformer.rope import RotaryEmbedding

__all__ = ["MambaModel"]


class MambaModel(nn.Module):
    """One stage of a Mamba / hybrid model.

    MambaModel(config, mamba_config, groups, vocab_size, pre_process=True, post_process=True,
               seed=1234, moe_config=None)
      config: TransformerConfig (sizes, norms, attention and MLP flags of the hybrid layers);
      mamba_config: MambaConfig (the --mamba-* and --hybrid-* flags);
      vocab_size: the padded vocabulary (divisible by tp); moe_config: an MoEConfig for `E` layers.

    forward(input_ids [b, s], position_ids [b, s] | None, attention_mask | None, labels [b, s] | None)
      post_process and labels: per-token loss [b, s] (fp32)
      post_process, no labels: logits [s, b, V/tp] (vocab-parallel)
      not post_process:        hidden [s, b, h] ([s/tp, b, h] with sequence parallel)
    attention_mask (attention layers only): None for causal, or Megatron's bool [b | 1, 1, s, s]
    with True where a query must not see a key. Mamba layers are causal by construction.
    inference_context (keyword, generation only): the caches of a generation step, a
    HybridInferenceContext (gigatron/core/inference/state_cache.py): the KV cache of the attention
    layers and the recurrent states of the Mamba layers, read and written in place.
    """

    def __init__(self, config, mamba_config, groups, vocab_size: int, pre_process: bool = True,
                 post_process: bool = True, seed: int = 1234, moe_config=None):
        super().__init__()
        if vocab_size % groups.tp.size != 0:
            raise ValueError(f"the padded vocabulary ({vocab_size}) must be divisible by "
                             f"--tensor-model-parallel-size ({groups.tp.size}); pad it with --make-vocab-size-divisible-by")
        if config.tensor_model_parallel_size != groups.tp.size:
            raise ValueError(f"--tensor-model-parallel-size is {config.tensor_model_parallel_size} but the "
                             f"tensor-parallel group has {groups.tp.size} ranks")
        if groups.cp.size > 1:
            raise ValueError("context parallelism is not supported for Mamba layers; drop --context-parallel-size")
        self.config = config
        self.mamba_config = mamba_config
        self.groups = groups
        self.vocab_size = vocab_size
        self.pre_process = pre_process
        self.post_process = post_process
        self.share_embeddings_and_output_weights = not config.untie_embeddings_and_output_weights
        self.sequence_parallel = config.sequence_parallel and groups.tp.size > 1

        if pre_process:
            self.embedding = LanguageModelEmbedding(config, groups, vocab_size)
        self.rotary_pos_emb = None
        if config.position_embedding_type == "rope":
            self.rotary_pos_emb = RotaryEmbedding(
                config.kv_channels, config.rotary_percent, config.rotary_base, config.rotary_interleaved,
                config.rotary_seq_len_interpolation_factor, device=param_device(config))
        self.decoder = MambaStack(config, mamba_config, groups, pre_process=pre_process,
                                  post_process=post_process, moe_config=moe_config)
        if post_process:
            tied_here = self.share_embeddings_and_output_weights and pre_process
            init_key = "embedding.word_embeddings" if self.share_embeddings_and_output_weights else "output_layer"
            self.output_layer = ColumnParallelLinear(
                config.hidden_size, vocab_size, config=config, tp=groups.tp, init_method=normal_init_method(config),
                bias=False, gather_output=False, init_key=init_key, skip_weight_param_allocation=tied_here)
            if self.share_embeddings_and_output_weights and not pre_process:
                tags.mark_shared_embedding(self.output_layer.weight)
        if pre_process and self.share_embeddings_and_output_weights and not post_process:
            tags.mark_shared_embedding(self.embedding.word_embeddings.weight)

        if config.perform_initialization:
            from gigatron.core.parallel.init import initialize_parameters
            initialize_parameters(self, seed, device="cpu" if config.use_cpu_initialization else None)

    @property
    def layer_types(self):
        """The pattern symbol of every layer of the whole model."""
        return self.decoder.layer_types

    def set_input_tensor(self, input_tensor) -> None:
        """Activations from the previous stage, [s, b, h] ([s/tp, b, h] with sequence parallel)."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError(f"MambaModel takes one input tensor, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def output_weight(self) -> torch.Tensor:
        """The output layer's weight [V/tp, h] (the word embedding when tied on this stage)."""
        if self.output_layer.weight is not None:
            return self.output_layer.weight
        return self.embedding.word_embeddings.weight

    def _sequence_length(self, input_ids: Optional[torch.Tensor]) -> int:
        if self.pre_process:
            return input_ids.shape[1]
        local = self.decoder.input_tensor.shape[0]
        return local * self.groups.tp.size if self.sequence_parallel else local

    def forward(self, input_ids: Optional[torch.Tensor], position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                inference_context=None):
        hidden = self.embedding(input_ids, position_ids) if self.pre_process else None
        rotary = None
        if self.rotary_pos_emb is not None:
            rotary = self.rotary_pos_emb(self._sequence_length(input_ids), position_ids)  # [s, 1|b, 1, r]
        if ATTENTION in self.decoder.local_layer_types and not torch.compiler.is_compiling():
            reference = hidden if hidden is not None else self.decoder.input_tensor
            dropout = self.training and self.config.attention_dropout > 0
            check_attention_backend(self.config, reference.device, self.config.params_dtype,
                                    attention_mask is not None, dropout)
        hidden = self.decoder(hidden, attention_mask, rotary, inference_context=inference_context)
        if not self.post_process:
            return hidden
        return self._output(hidden, labels)

    def _output(self, hidden: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        weight = self.output_weight()
        if labels is None:
            logits, _ = self.output_layer(hidden, weight)  # [s, b, V/tp]
            return logits
        target = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b]
        if self.config.cross_entropy_loss_fusion:
            tp = self.groups.tp
            full = (gather_from_sequence_parallel_region(hidden, tp) if self.sequence_parallel
                    else copy_to_tensor_parallel_region(hidden, tp))  # [s, b, h]
            loss = chunked_output_cross_entropy(full, weight, target, tp)  # [s, b]
        else:
            logits, _ = self.output_layer(hidden, weight)  # [s, b, V/tp]
            loss = vocab_parallel_cross_entropy(logits, target, self.groups.tp)  # [s, b]
        return loss.transpose(0, 1).contiguous()  # [b, s]
