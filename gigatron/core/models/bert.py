"""BertModel: a bidirectional encoder with the masked-LM head, pooler and sentence-order head
(Megatron-Core's BertModel), plus the post-LayerNorm layer of the original BERT (HuggingFace BERT,
MiniLM) for imported checkpoints.

Shape legend: b = batch, s = sequence, h = hidden, V = padded vocabulary, tp = tensor-parallel size.

Parameter names follow Megatron-Core:
    embedding.word_embeddings.weight [V/tp, h]      embedding.position_embeddings.weight
    embedding.tokentype_embeddings.weight           (with num_tokentypes > 0)
    encoder.layers.{i}.(input_layernorm | self_attention.linear_qkv | self_attention.linear_proj |
                        pre_mlp_layernorm | mlp.linear_fc1 | mlp.linear_fc2).*     (layer_norm="pre")
    encoder.final_layernorm.*                       (layer_norm="pre")
    lm_head.dense.*  lm_head.layer_norm.*  output_layer.bias [V/tp]   (the output weight is the word
                                                    embedding)
    pooler.dense.*   binary_head.*                  (with add_binary_head)

layer_norm="pre" is Megatron's BERT: each layer x = x + attn(LN(x)); x = x + mlp(LN(x)), and a
final LayerNorm. layer_norm="post" is the original BERT: the embedding sum is normalized
(embedding.layernorm), each layer x = LN(x + attn(x)); x = LN(x + mlp(x)) with
encoder.layers.{i}.post_attention_layernorm / post_mlp_layernorm, and no final LayerNorm.

Attention is bidirectional; padding keys are masked (a query never attends to a padding token).
Queries at padding positions still attend to the real tokens, so their outputs are finite; they
never reach the outputs at real positions or the loss.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gigatron.core.parallel import tags
from gigatron.core.parallel.cross_entropy import vocab_parallel_cross_entropy
from gigatron.core.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from gigatron.core.transformer.attention import SelfAttention, check_attention_backend
from gigatron.core.transformer.block import TransformerBlock
from gigatron.core.transformer.layer import bias_dropout_add
from gigatron.core.transformer.mlp import MLP, gelu, normal_init_method, openai_gelu
from gigatron.core.transformer.norm import build_norm, param_device

__all__ = ["BertModel", "BertEmbedding", "BertLMHead", "Pooler", "PostLNTransformerLayer", "PostLNEncoder",
           "padding_attention_mask", "unmask_empty_rows", "rekey_init", "check_single_stage_model",
           "run_layers", "LAYER_NORM_PLACEMENTS"]

LAYER_NORM_PLACEMENTS = ("pre", "post")


# ------------------------------------------------------------------------------ helpers
def padding_attention_mask(padding_mask: torch.Tensor) -> torch.Tensor:
    """[b, s] (1 or True = real token) -> bool [b, 1, 1, s], True where a key must not be seen."""
    return (padding_mask < 0.5).view(padding_mask.shape[0], 1, 1, padding_mask.shape[1])  # [b, 1, 1, s]


def unmask_empty_rows(mask: torch.Tensor) -> torch.Tensor:
    """Let a query whose every key is masked (a padding row) see all keys instead, so softmax stays
    finite. Such rows belong to padding positions: their outputs never reach a real position."""
    empty = mask.all(dim=-1, keepdim=True)  # [..., sq, 1]
    return mask & ~empty


def rekey_init(module: nn.Module, old_prefix: str, new_prefix: str) -> None:
    """Rename the init keys of `module`'s parameters from old_prefix... to new_prefix... (the
    shared transformer layers name themselves "decoder."; an encoder's weights must be seeded by
    their own names)."""
    for param in module.parameters():
        spec = tags.init_spec(param)
        if spec is not None and spec.key is not None and spec.key.startswith(old_prefix):
            tags.set_init(param, spec.init_fn, new_prefix + spec.key[len(old_prefix):])


def check_single_stage_model(config, groups, model: str, position_types=("learned_absolute",)) -> None:
    """BERT and T5 run as one pipeline stage without sequence or context parallelism."""
    if config.pipeline_model_parallel_size != 1 or groups.pp.size != 1:
        raise ValueError(f"{model} does not support pipeline parallelism (--pipeline-model-parallel-size "
                         f"{config.pipeline_model_parallel_size}); use tensor and data parallelism")
    if config.sequence_parallel and groups.tp.size > 1:
        raise ValueError(f"{model} does not support --sequence-parallel; drop the flag")
    if groups.cp.size != 1:
        raise ValueError(f"{model} does not support context parallelism (--context-parallel-size "
                         f"{groups.cp.size}); its attention is not causal")
    if config.tensor_model_parallel_size != groups.tp.size:
        raise ValueError(f"--tensor-model-parallel-size is {config.tensor_model_parallel_size} but the "
                         f"tensor-parallel group has {groups.tp.size} ranks")
    if config.position_embedding_type not in position_types:
        raise ValueError(f"{model} supports --position-embedding-type {' or '.join(position_types)}, not "
                         f"{config.position_embedding_type}")


def reject_pipeline_input(input_tensor, model: str) -> None:
    """set_input_tensor of a one-stage model: accept only "no input" (None, or a list of Nones)."""
    if input_tensor is not None and not (isinstance(input_tensor, (list, tuple))
                                         and all(t is None for t in input_tensor)):
        raise ValueError(f"{model} has no pipeline stages and takes no input tensor")


def replicated_linear(in_features: int, out_features: int, config, init_key: str) -> nn.Linear:
    """An nn.Linear replicated over tensor-parallel ranks (its input is the full hidden state, so
    every rank computes the same output and gets the same gradient), N(0, init_method_std^2)
    weight, zero bias, tagged for layout-independent initialization."""
    linear = nn.Linear(in_features, out_features, bias=True, device="meta")
    dtype, device = config.params_dtype, param_device(config)
    linear.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
    linear.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device))
    for name, param, init in (("weight", linear.weight, normal_init_method(config)),
                              ("bias", linear.bias, nn.init.zeros_)):
        tags.set_tensor_parallel_attributes(param, False, -1, 1)
        tags.set_init(param, init, f"{init_key}.{name}")
    return linear


def _replicated_embedding(num: int, dim: int, config, init_key: str) -> nn.Embedding:
    weight = torch.empty(num, dim, dtype=config.params_dtype, device=param_device(config))
    embedding = nn.Embedding(num, dim, _weight=weight)
    tags.set_tensor_parallel_attributes(embedding.weight, False, -1, 1)
    tags.set_init(embedding.weight, normal_init_method(config), init_key + ".weight")
    return embedding


def run_layers(layers, config, tp, hidden: torch.Tensor, *args) -> torch.Tensor:
    """hidden = layer(hidden, *args) for each layer, with --recompute-granularity full (uniform:
    chunks of --recompute-num-layers layers; block: the first --recompute-num-layers layers) when
    training."""
    from gigatron.core.parallel.random import checkpoint

    n = len(layers)
    recompute = config.recompute_granularity == "full" and torch.is_grad_enabled() and \
        any(layer.training for layer in layers)
    if not recompute:
        for layer in layers:
            hidden = layer(hidden, *args)
        return hidden

    def chunk(start, end):
        def run(x, *rest):
            for layer in layers[start:end]:
                x = layer(x, *rest)
            return x
        return run

    distribute = config.distribute_saved_activations
    if config.recompute_method == "uniform":
        for start in range(0, n, config.recompute_num_layers):
            end = min(start + config.recompute_num_layers, n)
            hidden = checkpoint(chunk(start, end), distribute, hidden, *args, tp=tp)
        return hidden
    for i in range(n):
        if i < config.recompute_num_layers:
            hidden = checkpoint(chunk(i, i + 1), distribute, hidden, *args, tp=tp)
        else:
            hidden = layers[i](hidden, *args)
    return hidden


# ------------------------------------------------------------------------------ embedding
class BertEmbedding(nn.Module):
    """Word (vocab-parallel) + learned position + token-type embeddings, [LayerNorm], dropout.

    forward(input_ids [b, s], position_ids [b, s] | None, tokentype_ids [b, s] | None) -> [s, b, h]."""

    def __init__(self, config, groups, vocab_size: int, num_tokentypes: int, layernorm: bool):
        super().__init__()
        self.config = config
        self.word_embeddings = VocabParallelEmbedding(
            vocab_size, config.hidden_size, config=config, tp=groups.tp, init_method=normal_init_method(config),
            init_key="embedding.word_embeddings")
        self.position_embeddings = _replicated_embedding(config.max_position_embeddings, config.hidden_size, config,
                                                         "embedding.position_embeddings")
        self.num_tokentypes = num_tokentypes
        self.tokentype_embeddings = (_replicated_embedding(num_tokentypes, config.hidden_size, config,
                                                           "embedding.tokentype_embeddings")
                                     if num_tokentypes > 0 else None)
        self.layernorm = build_norm(config, config.hidden_size, groups, init_key="embedding.layernorm") \
            if layernorm else None
        self.dropout_p = config.hidden_dropout

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                tokentype_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        s = input_ids.shape[1]
        if s > self.config.max_position_embeddings:
            raise ValueError(f"the sequence has {s} tokens but --max-position-embeddings is "
                             f"{self.config.max_position_embeddings}")
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device)[None, :]  # [1, s]
        emb = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)  # [b, s, h]
        if self.tokentype_embeddings is not None:
            if tokentype_ids is None:
                tokentype_ids = torch.zeros_like(input_ids)
            emb = emb + self.tokentype_embeddings(tokentype_ids)  # [b, s, h]
        elif tokentype_ids is not None:
            raise ValueError("token type ids given to a model built with num_tokentypes=0")
        emb = emb.transpose(0, 1).contiguous()  # [s, b, h]
        if self.config.fp32_residual_connection:
            emb = emb.float()
        if self.layernorm is not None:
            emb = self.layernorm(emb)
        if self.training and self.dropout_p > 0.0:
            emb = F.dropout(emb, p=self.dropout_p, training=True)
        return emb


# ------------------------------------------------------------------------------ post-LN encoder
class PostLNTransformerLayer(nn.Module):
    """The original BERT layer: x = LN(x + dropout(attn(x))); x = LN(x + dropout(mlp(x))).

    forward(hidden [s, b, h], attention_mask) -> [s, b, h]. `layer_number` is global (init keys)."""

    def __init__(self, config, groups, layer_number: int, prefix: str = "encoder"):
        super().__init__()
        self.config = config
        name = f"{prefix}.layers.{layer_number}"
        self.self_attention = SelfAttention(config, groups, layer_number)
        self.post_attention_layernorm = build_norm(config, config.hidden_size, groups,
                                                   init_key=name + ".post_attention_layernorm")
        self.mlp = MLP(config, groups, layer_number)
        self.post_mlp_layernorm = build_norm(config, config.hidden_size, groups,
                                             init_key=name + ".post_mlp_layernorm")
        rekey_init(self, f"decoder.layers.{layer_number}.", name + ".")

    def forward(self, hidden: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        p = self.config.hidden_dropout
        out, bias = self.self_attention(hidden, attention_mask)
        hidden = self.post_attention_layernorm(bias_dropout_add(out, bias, hidden, p, self.training))
        out, bias = self.mlp(hidden)
        return self.post_mlp_layernorm(bias_dropout_add(out, bias, hidden, p, self.training))


class PostLNEncoder(nn.Module):
    """All layers of a post-LN encoder (no final LayerNorm).

    forward(hidden [s, b, h], attention_mask) -> [s, b, h]."""

    def __init__(self, config, groups, prefix: str = "encoder"):
        super().__init__()
        self.config = config
        self.tp = groups.tp
        self.layers = nn.ModuleList(PostLNTransformerLayer(config, groups, i, prefix)
                                    for i in range(config.num_layers))
        self.final_layernorm = None

    def forward(self, hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return run_layers(self.layers, self.config, self.tp, hidden, attention_mask)


def build_encoder(config, groups, layer_norm: str, prefix: str = "encoder") -> nn.Module:
    """The encoder layers (pre-LN: Megatron's TransformerBlock with a final LayerNorm; post-LN:
    PostLNEncoder), their init keys named under `prefix`."""
    if layer_norm not in LAYER_NORM_PLACEMENTS:
        raise ValueError(f"layer_norm must be one of {LAYER_NORM_PLACEMENTS}, got {layer_norm!r}")
    if layer_norm == "post":
        return PostLNEncoder(config, groups, prefix)
    block = TransformerBlock(config, groups, post_process=True, pre_process=True)
    rekey_init(block, "decoder.", prefix + ".")
    return block


# ------------------------------------------------------------------------------ heads
class BertLMHead(nn.Module):
    """dense (h -> h), activation (GeLU), LayerNorm: [s, b, h] -> [s, b, h]."""

    def __init__(self, config, groups):
        super().__init__()
        self.dense = replicated_linear(config.hidden_size, config.hidden_size, config, "lm_head.dense")
        self.activation = openai_gelu if config.openai_gelu else gelu
        self.layer_norm = build_norm(config, config.hidden_size, groups, init_key="lm_head.layer_norm")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.activation(self.dense(hidden)))


class Pooler(nn.Module):
    """tanh(dense(hidden[sequence_index])): [s, b, h] -> [b, h] (the [CLS] representation)."""

    def __init__(self, config, init_key: str = "pooler.dense"):
        super().__init__()
        self.dense = replicated_linear(config.hidden_size, config.hidden_size, config, init_key)

    def forward(self, hidden: torch.Tensor, sequence_index: int = 0) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[sequence_index]))  # [b, h]


# ------------------------------------------------------------------------------ model
class BertModel(nn.Module):
    """BERT with the masked-LM head and (optionally) the sentence-order binary head.

    BertModel(config, groups, vocab_size, num_tokentypes=2, add_binary_head=True, layer_norm="pre",
              pre_process=True, post_process=True, seed=1234)
      vocab_size: the padded vocabulary (divisible by tp).
      num_tokentypes: token-type (segment) embeddings; 0 for none.
      layer_norm: "pre" (Megatron's BERT) or "post" (the original BERT: HuggingFace, MiniLM).

    forward(input_ids [b, s], attention_mask [b, s] (1 real, 0 padding) | None,
            tokentype_ids [b, s] | None, lm_labels [b, s] | None)
      with lm_labels:    (per-token masked-LM loss [b, s] fp32, binary logits [b, 2] | None)
      without lm_labels: (vocab-parallel logits [s, b, V/tp], binary logits [b, 2] | None)
    Labels may hold -1 (unmasked positions); their loss is computed against id 0 and must be
    zeroed by the loss mask. encode(...) returns the encoder output [s, b, h].
    """

    def __init__(self, config, groups, vocab_size: int, num_tokentypes: int = 2, add_binary_head: bool = True,
                 layer_norm: str = "pre", pre_process: bool = True, post_process: bool = True,
                 seed: int = 1234):
        super().__init__()
        check_single_stage_model(config, groups, "BERT")
        if not (pre_process and post_process):
            raise ValueError("BERT is built as a single pipeline stage (pre_process and post_process)")
        if vocab_size % groups.tp.size != 0:
            raise ValueError(f"the padded vocabulary ({vocab_size}) must be divisible by "
                             f"--tensor-model-parallel-size ({groups.tp.size}); pad it with --make-vocab-size-divisible-by")
        if config.untie_embeddings_and_output_weights:
            raise ValueError("BERT ties its output layer to the word embeddings; drop "
                             "--untie-embeddings-and-output-weights")
        if add_binary_head and num_tokentypes == 0:
            raise ValueError("the BERT binary head reads two segments: give --num-tokentypes 2 or "
                             "--bert-no-binary-head")
        self.config = config
        self.groups = groups
        self.vocab_size = vocab_size
        self.pre_process = pre_process
        self.post_process = post_process
        self.num_tokentypes = num_tokentypes
        self.add_binary_head = add_binary_head
        self.layer_norm = layer_norm
        self.embedding = BertEmbedding(config, groups, vocab_size, num_tokentypes, layernorm=layer_norm == "post")
        self.encoder = build_encoder(config, groups, layer_norm, "encoder")
        self.lm_head = BertLMHead(config, groups)
        self.output_layer = ColumnParallelLinear(
            config.hidden_size, vocab_size, config=config, tp=groups.tp, init_method=normal_init_method(config),
            bias=True, gather_output=False, init_key="output_layer", skip_weight_param_allocation=True)
        if add_binary_head:
            self.pooler = Pooler(config)
            self.binary_head = replicated_linear(config.hidden_size, 2, config, "binary_head")
        else:
            self.pooler = None
            self.binary_head = None
        if config.perform_initialization:
            from gigatron.core.parallel.init import initialize_parameters
            initialize_parameters(self, seed, device="cpu" if config.use_cpu_initialization else None)

    def set_input_tensor(self, input_tensor) -> None:
        """BERT runs as one stage: there is never an input from a previous stage."""
        reject_pipeline_input(input_tensor, "BERT")

    def encode(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
               tokentype_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
        """The encoder's output (last hidden states) [s, b, h]."""
        b, s = input_ids.shape
        if attention_mask is None:
            mask = torch.zeros(1, 1, 1, s, dtype=torch.bool, device=input_ids.device)  # [1, 1, 1, s] all visible
        else:
            if attention_mask.shape != (b, s):
                raise ValueError(f"attention_mask must be the padding mask [b, s] = {(b, s)}, got "
                                 f"{tuple(attention_mask.shape)}")
            mask = padding_attention_mask(attention_mask)  # [b, 1, 1, s]
        hidden = self.embedding(input_ids, position_ids, tokentype_ids)  # [s, b, h]
        if not torch.compiler.is_compiling():
            dropout = self.training and self.config.attention_dropout > 0
            check_attention_backend(self.config, hidden.device, self.config.params_dtype, True, dropout)
        return self.encoder(hidden, mask)  # [s, b, h]

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                tokentype_ids: Optional[torch.Tensor] = None, lm_labels: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None):
        hidden = self.encode(input_ids, attention_mask, tokentype_ids, position_ids)  # [s, b, h]
        binary_logits = None
        if self.binary_head is not None:
            binary_logits = self.binary_head(self.pooler(hidden, 0))  # [b, 2]
        weight = self.embedding.word_embeddings.weight
        logits, _ = self.output_layer(self.lm_head(hidden), weight)  # [s, b, V/tp]
        if lm_labels is None:
            return logits, binary_logits
        target = lm_labels.clamp(min=0).transpose(0, 1).contiguous()  # [b, s] -> [s, b]
        loss = vocab_parallel_cross_entropy(logits, target, self.groups.tp)  # [s, b]
        return loss.transpose(0, 1).contiguous(), binary_logits  # [b, s]
