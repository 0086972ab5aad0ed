"""GPTModel: one pipeline stage of a decoder-only language model (Megatron-Core's GPTModel).

Shape legend: b = batch, s = sequence, h = hidden, V = padded vocabulary, tp = tensor-parallel size.

Parameter names follow Megatron-Core: embedding.word_embeddings.weight,
embedding.position_embeddings.weight, decoder.layers.{i}.(input_layernorm | self_attention.linear_qkv
| self_attention.linear_proj | pre_mlp_layernorm | mlp.linear_fc1 | mlp.linear_fc2).*,
decoder.final_layernorm.*, output_layer.weight; i is local to the stage.

Initialization (layout independent, see gigatron/core/parallel/init.py): every weight is
N(0, init_method_std^2) except linear_proj and linear_fc2, which use init_method_std /
sqrt(2 * num_layers); biases start at 0, norm weights at 1 (0 with --apply-layernorm-1p). Each
parameter is seeded by (seed, its global name), so the same seed gives the same model at any
tensor or pipeline parallel size.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from gigatron.core.ops.cross_entropy import chunked_output_cross_entropy
from gigatron.core.parallel import tags
from gigatron.core.parallel.cross_entropy import vocab_parallel_cross_entropy
from gigatron.core.parallel.layers import ColumnParallelLinear
from gigatron.core.parallel.mappings import copy_to_tensor_parallel_region, gather_from_sequence_parallel_region
from gigatron.core.models.common import LanguageModelEmbedding
from gigatron.core.transformer.attention import check_attention_backend
from gigatron.core.transformer.block import TransformerBlock
from gigatron.core.transformer.mlp import normal_init_method
from gigatron.core.transformer.norm import param_device
from gigatron.core.transformer.rope import RotaryEmbedding

__all__ = ["GPTModel"]


class GPTModel(nn.Module):
    """One stage of a GPT model.

    GPTModel(config, groups, vocab_size, pre_process=True, post_process=True, vp_stage=None, seed=1234)
      vocab_size: the padded vocabulary (divisible by tp).
      pre_process: this stage holds the embedding (the first stage).
      post_process: this stage holds the final norm and the output layer (the last stage).
      vp_stage: the virtual pipeline stage (model chunk) this is, with interleaving.
      seed: the initialization seed (Megatron's --seed, default 1234); parameters are initialized
        at construction when config.perform_initialization.
      moe_config: an MoEConfig; with num_experts set, the layers --moe-layer-freq selects are
        MoE layers (router + experts under decoder.layers.{i}.mlp). None: a dense model.

    forward(input_ids [b, s], position_ids [b, s] | None, attention_mask | None, labels [b, s] | None)
      post_process and labels: per-token loss [b, s] (fp32)
      post_process, no labels: logits [s, b, V/tp] (vocab-parallel)
      not post_process:        hidden [s, b, h] ([s/tp, b, h] with sequence parallel)
    attention_mask: None for causal attention, or a bool [b | 1, 1, s, s] with True where a query
    must not see a key (Megatron's convention; e.g. --reset-attention-mask).
    With --mtp-num-layers D (config.mtp_num_layers) the last stage also holds the multi-token
    prediction blocks (`mtp`); a training forward with labels computes their per-token losses
    [D, b, s], which `pop_mtp_losses()` hands over (gigatron/training/gpt.py's loss_func adds them).
    With --multi-latent-attention the layers' attention is MLASelfAttention and the rotary angles
    are MLA's (mla_rotary_embedding).
    inference_context (keyword, generation only): a KV cache
    (gigatron.core.inference.kv_cache.InferenceContext); input_ids are then the new tokens only,
    position_ids their positions and attention_mask [b, 1, s_new, kv_len] over the cached keys.
    loss_mask (keyword, [b, s], optional): the weights the caller's loss puts on the per-token
    losses. With --cross-entropy-loss-fusion the gradients of the output layer are then made in
    the forward pass; the gradient reaching the returned losses must be proportional to loss_mask
    (a masked mean or sum, as the GPT loss function takes). Ignored otherwise.
    With context parallelism (groups.cp.size > 1) input_ids, position_ids and labels hold this
    rank's tokens as split by context_parallel.get_batch_on_this_cp_rank (s/cp of them; position_ids
    required) and the loss is [b, s/cp].
    position_ids feed the learned position embeddings and, with RoPE, the rotary angles (so
    --reset-position-ids restarts the rotation per document; Megatron's RoPE always uses 0..s-1,
    which is the same whenever position ids are not reset).
    """

    def __init__(self, config, groups, vocab_size: int, pre_process: bool = True, post_process: bool = True,
                 vp_stage: Optional[int] = None, seed: int = 1234, moe_config=None, layer_spec=None):
        super().__init__()
        if vocab_size % groups.tp.size != 0:
            raise ValueError(f"the padded vocabulary ({vocab_size}) must be divisible by "
                             f"--tensor-model-parallel-size ({groups.tp.size}); pad it with "
                             "--make-vocab-size-divisible-by")
        if config.tensor_model_parallel_size != groups.tp.size:
            raise ValueError(f"--tensor-model-parallel-size is {config.tensor_model_parallel_size} but the "
                             f"tensor-parallel group has {groups.tp.size} ranks")
        self.config = config
        self.groups = groups
        self.vocab_size = vocab_size
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.share_embeddings_and_output_weights = not config.untie_embeddings_and_output_weights
        self.sequence_parallel = config.sequence_parallel and groups.tp.size > 1

        if pre_process:
            self.embedding = LanguageModelEmbedding(config, groups, vocab_size)
        if getattr(config, "multi_latent_attention", False):
            from gigatron.core.transformer.mla import mla_rotary_embedding
            self.rotary_pos_emb = mla_rotary_embedding(config)  # MLA's rotated channels (qk_pos_emb_head_dim)
        elif config.position_embedding_type == "rope":
            self.rotary_pos_emb = RotaryEmbedding(
                config.kv_channels, config.rotary_percent, config.rotary_base, config.rotary_interleaved,
                config.rotary_seq_len_interpolation_factor, device=param_device(config),
                rope_scaling=config.use_rope_scaling, rope_scaling_factor=config.rope_scaling_factor)
        else:
            self.rotary_pos_emb = None
        self.moe_config = moe_config
        self.decoder = TransformerBlock(config, groups, post_process=post_process, vp_stage=vp_stage,
                                        pre_process=pre_process, moe_config=moe_config, layer_spec=layer_spec)
        if post_process:
            tied_here = self.share_embeddings_and_output_weights and pre_process
            # Tied on a separate last stage: its own copy, seeded like the word embedding so both
            # start equal; finalize_model_grads keeps them equal by all-reducing their gradients.
            init_key = "embedding.word_embeddings" if self.share_embeddings_and_output_weights else "output_layer"
            self.output_layer = ColumnParallelLinear(
                config.hidden_size, vocab_size, config=config, tp=groups.tp,
                init_method=normal_init_method(config), bias=False, gather_output=False,
                init_key=init_key, skip_weight_param_allocation=tied_here)
            if self.share_embeddings_and_output_weights and not pre_process:
                tags.mark_shared_embedding(self.output_layer.weight)
        if pre_process and not post_process and (self.share_embeddings_and_output_weights
                                                 or getattr(config, "mtp_num_layers", None)):
            tags.mark_shared_embedding(self.embedding.word_embeddings.weight)
        # Multi-token prediction (--mtp-num-layers): blocks after the decoder on the last stage
        # (gigatron/core/transformer/mtp.py); a training forward with labels keeps their per-token
        # losses for pop_mtp_losses().
        self.mtp = None
        self.mtp_losses = None
        if post_process and getattr(config, "mtp_num_layers", None):
            if groups.cp.size > 1:
                raise ValueError("--mtp-num-layers is not built for --context-parallel-size > 1 (the shifted tokens "
                                 "cross context-parallel ranks); drop one of them")
            if not pre_process:
                # The blocks embed shifted tokens on the last stage: a copy of the word embedding, seeded
                # like the first stage's and kept equal by summing both copies' gradients over the
                # embedding group (finalize_model_grads), as a tied output layer is.
                self.embedding = LanguageModelEmbedding(config, groups, vocab_size)
                tags.mark_shared_embedding(self.embedding.word_embeddings.weight)
            from gigatron.core.transformer.mtp import MultiTokenPredictionBlock
            self.mtp = MultiTokenPredictionBlock(config, groups, moe_config)

        if config.perform_initialization:
            from gigatron.core.parallel.init import initialize_parameters
            initialize_parameters(self, seed, device="cpu" if config.use_cpu_initialization else None)

    # ------------------------------------------------------------------ pipeline plumbing
    def set_input_tensor(self, input_tensor) -> None:
        """Activations from the previous stage, [s, b, h] ([s/tp, b, h] with sequence parallel)."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError(f"GPTModel takes one input tensor, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def output_weight(self) -> torch.Tensor:
        """The output layer's weight [V/tp, h] (the word embedding when tied on this stage)."""
        if self.output_layer.weight is not None:
            return self.output_layer.weight
        return self.embedding.word_embeddings.weight

    # ------------------------------------------------------------------ forward
    def _sequence_length(self, input_ids: Optional[torch.Tensor]) -> int:
        if self.pre_process:
            return input_ids.shape[1]
        local = self.decoder.input_tensor.shape[0]
        return local * self.groups.tp.size if self.sequence_parallel else local

    def forward(self, input_ids: Optional[torch.Tensor], position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                inference_context=None, loss_mask: Optional[torch.Tensor] = None):
        cp = self.groups.cp
        if position_ids is None and cp.size > 1:
            # This rank holds chunks r and 2C-1-r of the sequence (also on stages that read no
            # batch): embed and rotate by their global positions.
            from gigatron.core.transformer.context_parallel import cp_chunk_indices
            reference = input_ids if self.pre_process else self.decoder.input_tensor
            local = self._sequence_length(input_ids)
            position_ids = cp_chunk_indices(local * cp.size, cp.size, cp.rank, device=reference.device)[None]  # [1, s/cp]
        hidden = self.embedding(input_ids, position_ids) if self.pre_process else None
        rotary = None
        if self.rotary_pos_emb is not None:
            rotary = self.rotary_pos_emb(self._sequence_length(input_ids), position_ids)  # [s, 1|b, 1, r]
        if self.decoder.num_local_layers and self.groups.cp.size == 1 and not torch.compiler.is_compiling():
            # Fail before any work if the attention kernel asked for cannot run here.
            reference = hidden if hidden is not None else self.decoder.input_tensor
            dropout = self.training and self.config.attention_dropout > 0
            check_attention_backend(self.config, reference.device, self.config.params_dtype,
                                    attention_mask is not None, dropout)
        if inference_context is None:
            hidden = self.decoder(hidden, attention_mask, rotary)
        else:
            hidden = self.decoder(hidden, attention_mask, rotary, inference_context=inference_context)
        if not self.post_process:
            return hidden
        if self.mtp is not None:
            self.mtp_losses = None
            if labels is not None and self.training and inference_context is None:
                self.mtp_losses = self._mtp_losses(input_ids, position_ids, hidden, labels, attention_mask, rotary)
        return self._output(hidden, labels, loss_mask)

    def _mtp_losses(self, input_ids, position_ids, hidden, labels, attention_mask, rotary):
        """Per-token losses [D, b, s] of the multi-token prediction blocks (block k's labels are the
        labels shifted left by k; the last k positions are left for the loss mask to drop)."""
        from gigatron.core.transformer.mtp import shift_left

        states = self.mtp(input_ids, position_ids, hidden, self.embedding, attention_mask, rotary)
        losses = []
        for k, state in enumerate(states, start=1):
            losses.append(self._output(state, shift_left(labels, k)))  # [b, s]
        return torch.stack(losses)  # [D, b, s]

    def pop_mtp_losses(self):
        """The per-token losses [D, b, s] of the multi-token prediction blocks from the last training
        forward with labels (None without --mtp-num-layers), handed over once."""
        losses, self.mtp_losses = self.mtp_losses, None
        return losses

    def _output(self, hidden: torch.Tensor, labels: Optional[torch.Tensor],
                loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight = self.output_weight()
        if labels is None:
            logits, _ = self.output_layer(hidden, weight)  # [s, b, V/tp]
            return logits
        target = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b]
        if self.config.cross_entropy_loss_fusion:
            tp = self.groups.tp
            if self.sequence_parallel:
                full = gather_from_sequence_parallel_region(hidden, tp)  # [s, b, h]
            else:
                full = copy_to_tensor_parallel_region(hidden, tp)  # [s, b, h]
            # With the loss mask the gradients are made in the same pass (see cross_entropy.py).
            weights = None if loss_mask is None else loss_mask.transpose(0, 1).contiguous()  # [b, s] -> [s, b]
            loss = chunked_output_cross_entropy(full, weight, target, tp, loss_weights=weights)  # [s, b]
        else:
            logits, _ = self.output_layer(hidden, weight)  # [s, b, V/tp]
            loss = vocab_parallel_cross_entropy(logits, target, self.groups.tp)  # [s, b]
        return loss.transpose(0, 1).contiguous()  # [b, s]
