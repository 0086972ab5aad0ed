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


def check_single_stage_model(config, groups, model: str, position_types=("learned_absolute",),
                             pipeline: bool = False) -> None:
    """T5 runs as one pipeline stage, BERT (`pipeline`) over any number of stages; neither with
    sequence or context parallelism."""
    if not pipeline and (config.pipeline_model_parallel_size != 1 or groups.pp.size != 1):
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
    if pipeline and config.pipeline_model_parallel_size != groups.pp.size:
        raise ValueError(f"--pipeline-model-parallel-size is {config.pipeline_model_parallel_size} but the "
                         f"pipeline-parallel group has {groups.pp.size} ranks")
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
    """The post-LN encoder layers of one pipeline stage (no final LayerNorm); `layer_offset` is the
    global number of its first layer. Stages after the first take their input from
    set_input_tensor.

    forward(hidden [s, b, h] | None, attention_mask) -> [s, b, h]."""

    def __init__(self, config, groups, prefix: str = "encoder", pre_process: bool = True,
                 vp_stage: Optional[int] = None):
        super().__init__()
        from gigatron.core.transformer.block import layer_offset, num_layers_on_stage

        self.config = config
        self.tp = groups.tp
        self.pre_process = pre_process
        pp_rank, pp_size, vp_size = groups.pp.rank, groups.pp.size, groups.vp_size
        if vp_size is not None and vp_stage is None:
            vp_stage = 0
        self.num_local_layers = num_layers_on_stage(config, pp_rank, pp_size, vp_stage, vp_size)
        self.layer_offset = layer_offset(config, pp_rank, pp_size, vp_stage, vp_size)
        self.layers = nn.ModuleList(PostLNTransformerLayer(config, groups, self.layer_offset + i, prefix)
                                    for i in range(self.num_local_layers))
        self.final_layernorm = None
        self.input_tensor = None

    def set_input_tensor(self, tensor: Optional[torch.Tensor]) -> None:
        """Input of a stage after the first: [s, b, h]."""
        self.input_tensor = tensor

    def forward(self, hidden: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.pre_process:
            if self.input_tensor is None:
                raise RuntimeError("a pipeline stage after the first needs set_input_tensor() before forward")
            hidden = self.input_tensor
        return run_layers(self.layers, self.config, self.tp, hidden, attention_mask)


def build_encoder(config, groups, layer_norm: str, prefix: str = "encoder", pre_process: bool = True,
                  post_process: bool = True, vp_stage: Optional[int] = None) -> nn.Module:
    """The encoder layers of one pipeline stage (pre-LN: Megatron's TransformerBlock, with the final
    LayerNorm on the last stage; post-LN: PostLNEncoder), their init keys named under `prefix` with
    global layer numbers."""
    if layer_norm not in LAYER_NORM_PLACEMENTS:
        raise ValueError(f"layer_norm must be one of {LAYER_NORM_PLACEMENTS}, got {layer_norm!r}")
    if layer_norm == "post":
        return PostLNEncoder(config, groups, prefix, pre_process=pre_process, vp_stage=vp_stage)
    block = TransformerBlock(config, groups, post_process=post_process, pre_process=pre_process, vp_stage=vp_stage)
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
    """BERT with the masked-LM head and (optionally) the sentence-order binary head; one pipeline
    stage of it with pipeline parallelism.

    BertModel(config, groups, vocab_size, num_tokentypes=2, add_binary_head=True, layer_norm="pre",
              pre_process=True, post_process=True, seed=1234, vp_stage=None)
      vocab_size: the padded vocabulary (divisible by tp).
      num_tokentypes: token-type (segment) embeddings; 0 for none.
      layer_norm: "pre" (Megatron's BERT) or "post" (the original BERT: HuggingFace, MiniLM).
      pre_process: this stage holds the embedding (the first stage).
      post_process: this stage holds the LM head, the output bias, the pooler and the binary head
        (the last stage). The output layer is tied to the word embedding: on a last stage without
        the embedding it is a copy seeded like it, kept equal by all-reducing the two gradients
        over the embedding group (gigatron.core.distributed.finalize_model_grads), as for GPT.
      vp_stage: the virtual pipeline stage (model chunk) this is, with interleaving.
    Encoder layers are split over the stages as GPT's decoder layers are
    (gigatron.core.transformer.block); their parameter names carry stage-local numbers, their init
    keys and checkpoint names global ones.

    forward(input_ids [b, s] | None, attention_mask [b, s] (1 real, 0 padding) | None,
            tokentype_ids [b, s] | None, lm_labels [b, s] | None)
      last stage, with lm_labels:    (per-token masked-LM loss [b, s] fp32, binary logits [b, 2] | None)
      last stage, without lm_labels: (vocab-parallel logits [s, b, V/tp], binary logits [b, 2] | None)
      other stages:                  the hidden states [s, b, h] for the next stage
    Every stage takes the padding mask (padding keys are masked in every layer); stages after the
    first read their input from set_input_tensor and ignore input_ids.
    Labels may hold -1 (unmasked positions); their loss is computed against id 0 and must be
    zeroed by the loss mask. encode(...) returns the encoder output [s, b, h] (one-stage model).
    """

    def __init__(self, config, groups, vocab_size: int, num_tokentypes: int = 2, add_binary_head: bool = True,
                 layer_norm: str = "pre", pre_process: bool = True, post_process: bool = True,
                 seed: int = 1234, vp_stage: Optional[int] = None):
        super().__init__()
        check_single_stage_model(config, groups, "BERT", pipeline=True)
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
        self.vp_stage = vp_stage
        self.num_tokentypes = num_tokentypes
        self.add_binary_head = add_binary_head
        self.layer_norm = layer_norm
        self.embedding = (BertEmbedding(config, groups, vocab_size, num_tokentypes, layernorm=layer_norm == "post")
                          if pre_process else None)
        self.encoder = build_encoder(config, groups, layer_norm, "encoder", pre_process=pre_process,
                                     post_process=post_process, vp_stage=vp_stage)
        self.lm_head = self.output_layer = self.pooler = self.binary_head = None
        if post_process:
            self.lm_head = BertLMHead(config, groups)
            # The output weight is the word embedding: on a stage without it, an own copy seeded by
            # the embedding's init key (so both start equal), its gradient shared with the embedding.
            self.output_layer = ColumnParallelLinear(
                config.hidden_size, vocab_size, config=config, tp=groups.tp, init_method=normal_init_method(config),
                bias=True, gather_output=False, init_key="output_layer", skip_weight_param_allocation=pre_process)
            if not pre_process:
                tags.set_init(self.output_layer.weight, normal_init_method(config), "embedding.word_embeddings.weight")
                tags.mark_shared_embedding(self.output_layer.weight)
            if add_binary_head:
                self.pooler = Pooler(config)
                self.binary_head = replicated_linear(config.hidden_size, 2, config, "binary_head")
        if pre_process and not post_process:
            tags.mark_shared_embedding(self.embedding.word_embeddings.weight)
        if config.perform_initialization:
            from gigatron.core.parallel.init import initialize_parameters
            initialize_parameters(self, seed, device="cpu" if config.use_cpu_initialization else None)

    def set_input_tensor(self, input_tensor) -> None:
        """Activations from the previous stage [s, b, h]; a one-stage model takes none."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError(f"BERT takes one input tensor, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        if self.pre_process:
            reject_pipeline_input(input_tensor, "The first stage of BERT")
            return
        self.encoder.set_input_tensor(input_tensor)

    def output_weight(self) -> torch.Tensor:
        """The output layer's weight [V/tp, h] (the word embedding when it is on this stage)."""
        if self.output_layer.weight is not None:
            return self.output_layer.weight
        return self.embedding.word_embeddings.weight

    def _attention_mask(self, attention_mask: Optional[torch.Tensor], b: int, s: int, device) -> torch.Tensor:
        if attention_mask is None:
            return torch.zeros(1, 1, 1, s, dtype=torch.bool, device=device)  # [1, 1, 1, s] all visible
        if attention_mask.shape != (b, s):
            raise ValueError(f"attention_mask must be the padding mask [b, s] = {(b, s)}, got "
                             f"{tuple(attention_mask.shape)}")
        return padding_attention_mask(attention_mask)  # [b, 1, 1, s]

    def _encode_stage(self, input_ids, attention_mask, tokentype_ids, position_ids) -> torch.Tensor:
        if self.pre_process:
            b, s = input_ids.shape
            hidden = self.embedding(input_ids, position_ids, tokentype_ids)  # [s, b, h]
            reference = hidden
        else:
            reference = self.encoder.input_tensor
            if reference is None:
                raise RuntimeError("a BERT pipeline stage after the first needs set_input_tensor() before forward")
            s, b = reference.shape[0], reference.shape[1]
            hidden = None
        mask = self._attention_mask(attention_mask, b, s, reference.device)
        if not torch.compiler.is_compiling():
            dropout = self.training and self.config.attention_dropout > 0
            check_attention_backend(self.config, reference.device, self.config.params_dtype, True, dropout)
        return self.encoder(hidden, mask)  # [s, b, h]

    def encode(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
               tokentype_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
        """The encoder's output (last hidden states) [s, b, h] of a one-stage model."""
        if not (self.pre_process and self.post_process):
            raise ValueError("encode() needs the whole BERT model (one pipeline stage); this is a stage of a "
                             "pipelined model: call forward on each stage instead")
        return self._encode_stage(input_ids, attention_mask, tokentype_ids, position_ids)

    def forward(self, input_ids: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor] = None,
                tokentype_ids: Optional[torch.Tensor] = None, lm_labels: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None):
        hidden = self._encode_stage(input_ids, attention_mask, tokentype_ids, position_ids)  # [s, b, h]
        if not self.post_process:
            return hidden
        binary_logits = None
        if self.binary_head is not None:
            binary_logits = self.binary_head(self.pooler(hidden, 0))  # [b, 2]
        logits, _ = self.output_layer(self.lm_head(hidden), self.output_weight())  # [s, b, V/tp]
        if lm_labels is None:
            return logits, binary_logits
        target = lm_labels.clamp(min=0).transpose(0, 1).contiguous()  # [b, s] -> [s, b]
        loss = vocab_parallel_cross_entropy(logits, target, self.groups.tp)  # [s, b]
        return loss.transpose(0, 1).contiguous(), binary_logits  # [b, s]
