"""T5Model: an encoder-decoder transformer with shared word embeddings (Megatron-Core's T5Model).

Shape legend: b = batch, se = encoder sequence, sd = decoder sequence, h = hidden,
V = padded vocabulary, tp = tensor-parallel size.

    embedding (word + learned absolute positions, shared by encoder and decoder inputs; with
               position_embedding_type="relative" words only, and each stack adds T5's relative
               position bias to its self-attention scores instead: encoder_relative_pos_emb
               (bidirectional buckets) and decoder_relative_pos_emb (causal buckets), each computed
               once per forward and shared by the stack's layers; cross-attention has no bias)
    encoder: pre-LN layers with bidirectional (padding-masked) self-attention, final LayerNorm
    decoder: pre-LN layers of causal self-attention, cross-attention over the encoder output and the
             MLP, final LayerNorm
    lm_head.output_layer: logits with the word embedding as weight, plus a bias

Parameter names follow Megatron-Core: embedding.word_embeddings.weight,
embedding.position_embeddings.weight, encoder.layers.{i}.(input_layernorm | self_attention.* |
pre_mlp_layernorm | mlp.*), encoder.final_layernorm.*, decoder.layers.{i}.(input_layernorm |
self_attention.* | pre_cross_attn_layernorm | cross_attention.(linear_q | linear_kv | linear_proj) |
pre_mlp_layernorm | mlp.*), decoder.final_layernorm.*, lm_head.output_layer.bias.

Masks follow Megatron: bool, True where a query must NOT see a key, [b, sq, sk] or [b, 1, sq, sk]
(or None: the encoder and cross-attention then see every key, the decoder is causal). A query row
that masks every key (a padding position) is let see all keys so the softmax stays finite; padding
positions never reach real positions or the loss.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from gigatron.core.models.bert import (
    build_encoder,
    check_single_stage_model,
    reject_pipeline_input,
    run_layers,
    unmask_empty_rows,
)
from gigatron.core.models.common import LanguageModelEmbedding
from gigatron.core.parallel.cross_entropy import vocab_parallel_cross_entropy
from gigatron.core.parallel.layers import ColumnParallelLinear
from gigatron.core.transformer.cross_attention import CrossAttention
from gigatron.core.transformer.layer import TransformerLayer, bias_dropout_add
from gigatron.core.transformer.mlp import normal_init_method
from gigatron.core.transformer.norm import build_norm
from gigatron.core.transformer.relative_position import (
    RelativeBiasCoreAttention,
    RelativePositionBias,
    additive_mask,
)

__all__ = ["T5Model", "T5DecoderLayer", "T5DecoderBlock", "T5LMHead", "attention_mask_4d"]


def attention_mask_4d(mask: Optional[torch.Tensor], sq: int, sk: int, device) -> Optional[torch.Tensor]:
    """A Megatron bool mask [b, sq, sk] / [b, 1, sq, sk] -> [b, 1, sq, sk] with empty rows opened."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise ValueError(f"attention masks must be bool (True = masked), got {mask.dtype}")
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)  # [b, 1, sq, sk]
    if mask.dim() != 4 or mask.shape[-2:] != (sq, sk):
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not match queries {sq} x keys {sk}")
    return unmask_empty_rows(mask.to(device))


class T5DecoderLayer(TransformerLayer):
    """A pre-LN decoder layer with cross-attention:

        x = x + dropout(self_attention(LN(x), causal mask))
        x = x + dropout(cross_attention(LN(x), memory, cross mask))
        x = x + dropout(mlp(LN(x)))

    forward(hidden [sd, b, h], attention_mask, memory [se, b, h], cross_attention_mask) -> [sd, b, h]."""

    def __init__(self, config, groups, layer_number: int):
        super().__init__(config, groups, layer_number)
        prefix = f"decoder.layers.{layer_number}"
        self.pre_cross_attn_layernorm = build_norm(config, config.hidden_size, groups,
                                                   init_key=prefix + ".pre_cross_attn_layernorm")
        self.cross_attention = CrossAttention(config, groups, prefix + ".cross_attention")

    def _residual(self, normed, hidden):
        return normed if self.config.apply_residual_connection_post_layernorm else hidden

    def forward(self, hidden: torch.Tensor, attention_mask: Optional[torch.Tensor], memory: torch.Tensor,
                cross_attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        p = self.config.hidden_dropout
        normed, consumer = self._norm(self.input_layernorm, hidden)
        with consumer:
            out, bias = self.self_attention(normed, attention_mask)
        hidden = bias_dropout_add(out, bias, self._residual(normed, hidden), p, self.training)
        normed, consumer = self._norm(self.pre_cross_attn_layernorm, hidden)
        with consumer:
            out, bias = self.cross_attention(normed, memory, cross_attention_mask)
        hidden = bias_dropout_add(out, bias, self._residual(normed, hidden), p, self.training)
        normed, consumer = self._norm(self.pre_mlp_layernorm, hidden)
        with consumer:
            out, bias = self._mlp(normed)
        return bias_dropout_add(out, bias, self._residual(normed, hidden), p, self.training)


class T5DecoderBlock(nn.Module):
    """The decoder layers and the final LayerNorm.

    forward(hidden [sd, b, h], attention_mask, memory [se, b, h], cross_attention_mask) -> [sd, b, h]."""

    def __init__(self, config, groups):
        super().__init__()
        self.config = config
        self.tp = groups.tp
        self.layers = nn.ModuleList(T5DecoderLayer(config, groups, i) for i in range(config.num_layers))
        self.final_layernorm = build_norm(config, config.hidden_size, groups, init_key="decoder.final_layernorm")

    def forward(self, hidden, attention_mask, memory, cross_attention_mask):
        hidden = run_layers(self.layers, self.config, self.tp, hidden, attention_mask, memory, cross_attention_mask)
        return self.final_layernorm(hidden)


class T5LMHead(nn.Module):
    """Logits [sd, b, V/tp] = hidden @ word_embeddings^T + bias (vocab-parallel)."""

    def __init__(self, config, groups, vocab_size: int):
        super().__init__()
        self.output_layer = ColumnParallelLinear(
            config.hidden_size, vocab_size, config=config, tp=groups.tp, init_method=normal_init_method(config),
            bias=True, gather_output=False, init_key="lm_head.output_layer", skip_weight_param_allocation=True)

    def forward(self, hidden: torch.Tensor, word_embeddings_weight: torch.Tensor) -> torch.Tensor:
        logits, _ = self.output_layer(hidden, word_embeddings_weight)
        return logits


class T5Model(nn.Module):
    """T5Model(config, groups, vocab_size, pre_process=True, post_process=True, seed=1234,
            decoder_num_layers=None, position_embedding_type=None, relative_attention_num_buckets=32,
            relative_attention_max_distance=128)

    position_embedding_type: "learned_absolute" (Megatron's T5 default) or "relative" (T5's
    relative position bias, --position-embedding-type relative); None takes
    config.position_embedding_type.

    config.num_layers layers in the encoder and decoder_num_layers (default: as many) in the decoder;
    config.max_position_embeddings must cover the longer of the encoder and decoder sequences.

    forward(encoder_input_ids [b, se], decoder_input_ids [b, sd], encoder_attn_mask,
            decoder_attn_mask, encoder_decoder_attn_mask, lm_labels [b, sd] | None)
      with lm_labels:    per-token loss [b, sd] (fp32; labels < 0 count as id 0, zero them with the
                         loss mask)
      without lm_labels: vocab-parallel logits [sd, b, V/tp]
    encode(encoder_input_ids, encoder_attn_mask) -> [se, b, h].
    """

    def __init__(self, config, groups, vocab_size: int, pre_process: bool = True, post_process: bool = True,
                 seed: int = 1234, decoder_num_layers: Optional[int] = None,
                 position_embedding_type: Optional[str] = None, relative_attention_num_buckets: int = 32,
                 relative_attention_max_distance: int = 128):
        super().__init__()
        position_embedding_type = position_embedding_type or config.position_embedding_type
        if position_embedding_type not in ("learned_absolute", "relative"):
            raise ValueError(f"T5 supports --position-embedding-type learned_absolute or relative, not "
                             f"{position_embedding_type} (it needs position information)")
        check_single_stage_model(config, groups, "T5", position_types=("learned_absolute", "none"))
        if decoder_num_layers is not None and decoder_num_layers < 1:
            raise ValueError(f"--decoder-num-layers must be >= 1, got {decoder_num_layers}")
        if not (pre_process and post_process):
            raise ValueError("T5 is built as a single pipeline stage (pre_process and post_process)")
        if vocab_size % groups.tp.size != 0:
            raise ValueError(f"the padded vocabulary ({vocab_size}) must be divisible by "
                             f"--tensor-model-parallel-size ({groups.tp.size}); pad it with --make-vocab-size-divisible-by")
        if config.untie_embeddings_and_output_weights:
            raise ValueError("T5 ties its output layer to the word embeddings; drop "
                             "--untie-embeddings-and-output-weights")
        self.groups = groups
        self.vocab_size = vocab_size
        self.pre_process = pre_process
        self.post_process = post_process
        self.position_embedding_type = position_embedding_type
        relative = position_embedding_type == "relative"
        if relative != (config.position_embedding_type == "none"):
            # The embedding adds learned positions exactly when the config says learned_absolute.
            config = dataclasses.replace(config, position_embedding_type="none" if relative else "learned_absolute")
        self.config = config
        self.embedding = LanguageModelEmbedding(config, groups, vocab_size)
        self.encoder = build_encoder(config, groups, "pre", "encoder")
        decoder_config = config if decoder_num_layers in (None, config.num_layers) else \
            dataclasses.replace(config, num_layers=decoder_num_layers)
        self.decoder = T5DecoderBlock(decoder_config, groups)
        self.lm_head = T5LMHead(config, groups, vocab_size)
        self.encoder_relative_pos_emb = self.decoder_relative_pos_emb = None
        if relative:
            self.encoder_relative_pos_emb = RelativePositionBias(
                config, groups, True, relative_attention_num_buckets, relative_attention_max_distance,
                "encoder_relative_pos_emb")
            self.decoder_relative_pos_emb = RelativePositionBias(
                config, groups, False, relative_attention_num_buckets, relative_attention_max_distance,
                "decoder_relative_pos_emb")
            for layer in list(self.encoder.layers) + list(self.decoder.layers):
                layer.self_attention.core_attention = RelativeBiasCoreAttention(config)
        if config.perform_initialization:
            from gigatron.core.parallel.init import initialize_parameters
            initialize_parameters(self, seed, device="cpu" if config.use_cpu_initialization else None)

    def set_input_tensor(self, input_tensor) -> None:
        """T5 runs as one stage: there is never an input from a previous stage."""
        reject_pipeline_input(input_tensor, "T5")

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.position_embedding_type == "learned_absolute" and ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"a sequence of {ids.shape[1]} tokens exceeds --max-position-embeddings "
                             f"{self.config.max_position_embeddings}; raise it to the longer of "
                             "--encoder-seq-length and --decoder-seq-length")
        return self.embedding(ids)  # [s, b, h]

    def encode(self, encoder_input_ids: torch.Tensor, encoder_attn_mask: Optional[torch.Tensor] = None):
        """Encoder output [se, b, h]."""
        se = encoder_input_ids.shape[1]
        mask = attention_mask_4d(encoder_attn_mask, se, se, encoder_input_ids.device)
        if self.encoder_relative_pos_emb is not None:
            mask = additive_mask(self.encoder_relative_pos_emb(se, se), mask)  # [b | 1, n, se, se] float
        elif mask is None:
            mask = torch.zeros(1, 1, 1, se, dtype=torch.bool, device=encoder_input_ids.device)  # all visible
        return self.encoder(self._embed(encoder_input_ids), mask)

    def forward(self, encoder_input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                encoder_attn_mask: Optional[torch.Tensor] = None, decoder_attn_mask: Optional[torch.Tensor] = None,
                encoder_decoder_attn_mask: Optional[torch.Tensor] = None, lm_labels: Optional[torch.Tensor] = None):
        if encoder_input_ids.shape[0] != decoder_input_ids.shape[0]:
            raise ValueError(f"encoder batch {encoder_input_ids.shape[0]} != decoder batch {decoder_input_ids.shape[0]}")
        memory = self.encode(encoder_input_ids, encoder_attn_mask)  # [se, b, h]
        se, sd = encoder_input_ids.shape[1], decoder_input_ids.shape[1]
        device = decoder_input_ids.device
        self_mask = attention_mask_4d(decoder_attn_mask, sd, sd, device)  # None = causal
        if self.decoder_relative_pos_emb is not None:
            self_mask = additive_mask(self.decoder_relative_pos_emb(sd, sd), self_mask, causal=True)
        cross_mask = attention_mask_4d(encoder_decoder_attn_mask, sd, se, device)
        if cross_mask is None:
            cross_mask = torch.zeros(1, 1, 1, se, dtype=torch.bool, device=device)  # all visible
        hidden = self.decoder(self._embed(decoder_input_ids), self_mask, memory, cross_mask)  # [sd, b, h]
        logits = self.lm_head(hidden, self.embedding.word_embeddings.weight)  # [sd, b, V/tp]
        if lm_labels is None:
            return logits
        target = lm_labels.clamp(min=0).transpose(0, 1).contiguous()  # [b, sd] -> [sd, b]
        loss = vocab_parallel_cross_entropy(logits, target, self.groups.tp)  # [sd, b]
        return loss.transpose(0, 1).contiguous()  # [b, sd]
