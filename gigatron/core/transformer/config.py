"""TransformerConfig: the shape and numerics of a transformer, named after Megatron's flags.

Every field is a Megatron-LM command-line flag with ``_`` for ``-`` (``num_layers`` is
``--num-layers``); the string literal under each field is its ``--help`` text. Inverted flags
(``--disable-bias-linear`` -> ``add_bias_linear=False``) are mapped by the argument parser's alias
table. ``__post_init__`` fills the derived defaults exactly as Megatron does and validates the
combination; each check raises ``ValueError`` naming the flags and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, Optional, Tuple

import torch

from gigatron.core.fields import RUN_SETTING, SequenceLengthConfig, model_fields, run_setting  # noqa: F401
from gigatron.core.parallel.config import ModelParallelConfig

POSITION_EMBEDDING_TYPES = ("learned_absolute", "rope", "none")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
ATTENTION_BACKENDS = ("auto", "flash", "fused", "cudnn", "efficient", "unfused", "math", "local")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm", "moe", "mla_up_proj")
CROSS_ENTROPY_FUSION_IMPLS = ("native", "te")
CP_COMM_TYPES = ("p2p", "all_gather", "a2a")


@dataclass
class PrecisionConfig:
    """The precision flags that both the model (TransformerConfig) and the optimizer
    (OptimizerConfig) need: defined once here, inherited by both."""

    bf16: bool = run_setting(False)
    """Run the model in bfloat16 (weights in bf16 unless --params-dtype says otherwise); the
    optimizer keeps fp32 main weights."""
    fp16: bool = run_setting(False)
    """Run the model in float16 (weights in fp16 unless --params-dtype says otherwise); the
    optimizer keeps fp32 main weights and scales the loss."""
    params_dtype: Optional[torch.dtype] = run_setting(None)
    """dtype of the model weights. Default: bfloat16 with --bf16, float16 with --fp16, else float32."""


@dataclass
class TransformerConfig(ModelParallelConfig, PrecisionConfig, SequenceLengthConfig):
    # ---------------------------------------------------------------- network size
    num_layers: Optional[int] = None
    """Number of transformer layers (required)."""
    hidden_size: Optional[int] = None
    """Transformer hidden size (required)."""
    ffn_hidden_size: Optional[int] = None
    """Transformer feed-forward (MLP) hidden size. Default: 4 * hidden_size, or with --swiglu
    int(4 * hidden_size * 2 / 3 / 64) * 64."""
    num_attention_heads: Optional[int] = None
    """Number of attention (query) heads (required)."""
    kv_channels: Optional[int] = None
    """Projection size per attention head. Default: hidden_size / num_attention_heads."""
    group_query_attention: bool = False
    """Use grouped-query attention (GQA): keys and values have --num-query-groups heads."""
    num_query_groups: Optional[int] = 1
    """Number of key/value head groups with --group-query-attention (1 = multi-query). Without
    --group-query-attention it is set to num_attention_heads."""
    max_position_embeddings: Optional[int] = None
    """Maximum number of position embeddings (learned absolute positions). Default: seq_length."""
    position_embedding_type: str = "learned_absolute"
    """Position embedding type: learned_absolute, rope or none."""
    rotary_base: int = 10000
    """Base of the rotary position embedding frequencies."""
    rotary_percent: float = 1.0
    """Fraction of each head's channels that rotary position embeddings rotate (0 < p <= 1)."""
    rotary_interleaved: bool = False
    """Rotate interleaved channel pairs (x0,x1),(x2,x3)... instead of the two halves of the head."""
    rotary_seq_len_interpolation_factor: Optional[float] = None
    """Divide rotary positions by this factor (linear sequence-length interpolation)."""
    use_rope_scaling: bool = False
    """Llama-3.1 rotary frequency scaling: frequencies whose wavelength exceeds 8192/1 positions
    (the original context / low-frequency factor) are divided by --rope-scaling-factor, those below
    8192/4 are kept, and the band between is interpolated smoothly (HuggingFace's rope_type llama3)."""
    rope_scaling_factor: float = 8.0
    """Divisor of the low rotary frequencies with --use-rope-scaling (Llama-3.1 uses 8)."""
    window_size: Optional[Tuple[int, int]] = None
    """Sliding-window attention, written `LEFT,RIGHT` (e.g. `4096,0`): query i attends key j only
    when i - LEFT <= j <= i + RIGHT, on top of the causal mask; -1 leaves that side unlimited.
    HuggingFace's Mistral sliding_window W is `W-1,0`."""
    normalization: str = "LayerNorm"
    """Normalization layer: LayerNorm or RMSNorm."""
    norm_epsilon: float = 1e-5
    """Epsilon of the normalization layers."""
    apply_layernorm_1p: bool = False
    """Zero-centered norm weight: the layer scales by (1 + weight) and the weight starts at 0."""
    swiglu: bool = False
    """Use the SwiGLU gated MLP (silu(gate) * up); linear_fc1 then holds [gate; up]."""
    squared_relu: bool = False
    """Use relu(x)^2 as the MLP activation."""
    openai_gelu: bool = False
    """Use OpenAI's tanh approximation of GeLU instead of the exact (erf) GeLU."""
    untie_embeddings_and_output_weights: bool = False
    """Give the output layer its own weight instead of reusing the word embedding."""
    add_bias_linear: bool = True
    """Add biases to the linear layers (--disable-bias-linear turns this off)."""
    add_qkv_bias: bool = False
    """Add a bias to the QKV projection even with --disable-bias-linear."""
    qk_layernorm: bool = False
    """Normalize queries and keys per head (with --normalization) before attention."""
    # ---------------------------------------------------------------- multi-latent attention, MTP
    multi_latent_attention: bool = False
    """Multi-latent attention (MLA, DeepSeek-V2/V3): queries and keys/values are projected through
    low-rank latents (--q-lora-rank, --kv-lora-rank); each head's query and key are a part without
    position (--qk-head-dim) plus a rotated part (--qk-pos-emb-head-dim) whose key is shared by all
    heads; values have --v-head-dim channels. Rotary embeddings are applied inside the attention
    (YaRN-scaled unless --rope-type rope); --kv-channels and --num-query-groups are not used."""
    q_lora_rank: Optional[int] = None
    """MLA: rank of the query latent (down-projection, norm, up-projection). Unset: queries come
    from one full-rank projection (linear_q_proj)."""
    kv_lora_rank: int = 32
    """MLA: rank of the shared key/value latent."""
    qk_head_dim: int = 128
    """MLA: channels of each query/key head that carry no position (the rotated part is
    --qk-pos-emb-head-dim more)."""
    qk_pos_emb_head_dim: int = 64
    """MLA: channels of each query/key head rotated by the rotary embedding (decoupled RoPE; the
    key's rotated part is shared by all heads)."""
    v_head_dim: int = 128
    """MLA: channels of each value head."""
    rope_type: Optional[str] = None
    """Rotary embedding of multi-latent attention: rope (plain) or yarn (YaRN frequency
    interpolation by --rotary-scaling-factor with --mscale/--mscale-all-dim). Default: yarn with
    --multi-latent-attention."""
    rotary_scaling_factor: float = 1.0
    """YaRN context-extension factor of MLA's rotary embedding: low frequencies are divided by it
    (with an original context of 4096 positions, beta_fast 32, beta_slow 1) and attention is
    sharpened by the matching mscale; 1 leaves the frequencies and scale unchanged."""
    mscale: float = 1.0
    """YaRN mscale of MLA's rotary part: the rotated channels are multiplied by
    (0.1 * mscale * ln(factor) + 1) / (0.1 * mscale_all_dim * ln(factor) + 1) (factor:
    --rotary-scaling-factor; no change when factor <= 1)."""
    mscale_all_dim: float = 0.0
    """YaRN mscale of MLA's softmax: the attention scale is (0.1 * mscale_all_dim * ln(factor) + 1)^2
    / sqrt(qk_head_dim + qk_pos_emb_head_dim) (factor: --rotary-scaling-factor)."""
    mtp_num_layers: Optional[int] = None
    """Multi-token prediction (DeepSeek-V3): this many extra blocks after the decoder; block k
    predicts the token k+1 positions beyond the next one from the previous block's hidden state and
    the embedding of the input shifted by k, through the shared output layer. Its losses are
    averaged over the blocks, scaled by --mtp-loss-scaling-factor, added to the training loss and
    logged as `mtp_k loss`."""
    mtp_loss_scaling_factor: float = 0.1
    """Weight of the multi-token prediction loss (the mean over the --mtp-num-layers blocks)."""
    # ---------------------------------------------------------------- regularization, init
    attention_dropout: float = 0.1
    """Dropout probability on the attention probabilities."""
    hidden_dropout: float = 0.1
    """Dropout probability on the embeddings and on each sub-layer's output before the residual add."""
    init_method_xavier_uniform: bool = run_setting(False)
    """Initialize the weights of the linear layers with Xavier (Glorot) uniform instead of the
    normal distribution of --init-method-std (each tensor-parallel shard gets its slice of the
    full weight's initialization)."""
    init_method_std: float = run_setting(0.02)
    """Standard deviation of the zero-mean normal weight init; the output projections of each layer
    (linear_proj, linear_fc2) use init_method_std / sqrt(2 * num_layers)."""
    apply_residual_connection_post_layernorm: bool = False
    """Take the residual from after the layer norm (original BERT) instead of before it."""
    # ---------------------------------------------------------------- numerics
    transformer_impl: Literal["local", "transformer_engine"] = run_setting("transformer_engine")
    """Megatron's choice of layer implementation. Gigatron has one implementation of its own (plain
    PyTorch layers, no Transformer Engine), which both values select; the run says so once in its
    log."""
    apply_query_key_layer_scaling: bool = run_setting(False)
    """Megatron's fp16 overflow guard: scale the attention scores down by the layer number and back
    up inside an fp32 softmax. The two scalings cancel, so Gigatron computes the same by turning on
    --attention-softmax-in-fp32 (which this flag implies)."""
    fp32_residual_connection: bool = run_setting(False)
    """Keep the residual stream in fp32."""
    attention_softmax_in_fp32: bool = run_setting(False)
    """Compute the attention softmax in fp32 (the local backend; SDPA kernels always accumulate
    the softmax in fp32)."""
    attention_backend: str = run_setting("auto")
    """Attention implementation: auto (PyTorch picks), flash, fused/cudnn (cuDNN), efficient
    (memory-efficient), unfused/math (SDPA's math kernel) or local (plain PyTorch matmul-softmax).
    A requested backend that cannot run on the device, dtype or head size fails before the first
    step."""
    use_flash_attn: bool = run_setting(False)
    """Use FlashAttention (same as --attention-backend flash)."""
    cross_entropy_loss_fusion: bool = run_setting(False)
    """Compute the output layer and the cross entropy chunk by chunk, never holding the fp32 logits
    of the whole micro-batch; the gradients of the hidden states and of the output weight are made
    in the same pass (gigatron/core/ops/cross_entropy.py)."""
    cross_entropy_fusion_impl: str = run_setting("native")
    """Kernel of --cross-entropy-loss-fusion: native (Gigatron's chunked output layer + cross
    entropy) or te (Megatron's Transformer Engine kernel, which Gigatron maps to native)."""
    persist_layer_norm: bool = run_setting(True)
    """On CUDA, run LayerNorm/RMSNorm as fused Triton kernels, with the residual add before each
    pre-MLP norm folded in (gigatron/core/ops/fused_norm.py); --no-persist-layer-norm keeps
    PyTorch's norms. CPUs always use PyTorch's."""
    bias_gelu_fusion: bool = run_setting(True)
    """On CUDA, add linear_fc1's bias inside one fused GeLU kernel forward and backward
    (gigatron/core/ops/fused_activation.py); --no-bias-gelu-fusion keeps the unfused path."""
    bias_swiglu_fusion: bool = run_setting(True)
    """On CUDA, add linear_fc1's bias (if any) inside one fused SwiGLU kernel forward and backward;
    --no-bias-swiglu-fusion keeps the unfused path."""
    # ---------------------------------------------------------------- parallelism
    decoder_first_pipeline_num_layers: Optional[int] = run_setting(None)
    """Number of layers on the first pipeline stage (uneven split); the rest are spread evenly."""
    decoder_last_pipeline_num_layers: Optional[int] = run_setting(None)
    """Number of layers on the last pipeline stage (uneven split); the rest are spread evenly."""
    cp_comm_type: str = run_setting("p2p")
    """How attention communicates with --context-parallel-size > 1: p2p (ring attention),
    all_gather (keys and values gathered) or a2a (Ulysses all-to-all over heads)."""
    use_cpu_initialization: bool = run_setting(False)
    """Create and initialize the weights on the CPU, then move them to the device."""
    perform_initialization: bool = run_setting(True)
    """Initialize the weights when the model is built (off: leave them to a checkpoint load)."""
    # ---------------------------------------------------------------- activation recompute
    recompute_granularity: Optional[str] = run_setting(None)
    """Activation recompute: full (whole layers) or selective (--recompute-modules only)."""
    recompute_method: Optional[str] = run_setting(None)
    """With --recompute-granularity full: uniform (checkpoint chunks of --recompute-num-layers
    layers) or block (checkpoint the first --recompute-num-layers layers of each stage)."""
    recompute_num_layers: Optional[int] = run_setting(None)
    """Layers per recompute chunk (uniform) or number of recomputed layers per stage (block)."""
    recompute_modules: Optional[List[str]] = run_setting(None)
    """With selective recompute, the parts of each layer to recompute: core_attn, mlp (the layer's
    MLP, dense or MoE), layernorm, moe (the MoE layers only), mla_up_proj (multi-latent attention's
    up-projections and rotary embedding, recomputed from the latents). Default: core_attn."""
    distribute_saved_activations: bool = run_setting(False)
    """With full recompute, shard each checkpointed layer input across the tensor-parallel group."""

    def __post_init__(self) -> None:
        _require_network_size(self)
        _derive_defaults(self)
        _validate_choices(self)
        _validate_heads(self)
        _validate_positions(self)
        _validate_latent_attention(self)
        _validate_activation(self)
        _validate_precision(self)
        _validate_parallel(self)
        _validate_recompute(self)

    @property
    def num_query_groups_per_partition(self) -> int:
        return self.num_query_groups // self.tensor_model_parallel_size

    @property
    def num_attention_heads_per_partition(self) -> int:
        return self.num_attention_heads // self.tensor_model_parallel_size

    @property
    def resolved_attention_backend(self) -> str:
        """The attention backend after the aliases: auto, flash, cudnn, efficient, math or local."""
        if self.use_flash_attn:
            return "flash"
        return {"fused": "cudnn", "unfused": "math"}.get(self.attention_backend, self.attention_backend)


# ------------------------------------------------------------------------------ validation
def _require_network_size(c: TransformerConfig) -> None:
    for name in ("num_layers", "hidden_size", "num_attention_heads"):
        value = getattr(c, name)
        if value is None:
            raise ValueError(f"--{name.replace('_', '-')} is required")
        if value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _derive_defaults(c: TransformerConfig) -> None:
    if c.ffn_hidden_size is None:
        if c.swiglu:
            # 2/3 of 4h keeps the parameter count of a plain 4h MLP; round down to a multiple of 64.
            c.ffn_hidden_size = int(4 * c.hidden_size * 2 / 3 / 64) * 64
        else:
            c.ffn_hidden_size = 4 * c.hidden_size
    if c.kv_channels is None:
        if c.hidden_size % c.num_attention_heads != 0:
            raise ValueError(
                f"--hidden-size ({c.hidden_size}) is not divisible by --num-attention-heads "
                f"({c.num_attention_heads}); pick divisible sizes or set --kv-channels explicitly")
        c.kv_channels = c.hidden_size // c.num_attention_heads
    if not c.group_query_attention:
        c.num_query_groups = c.num_attention_heads
    elif c.num_query_groups is None:
        c.num_query_groups = 1
    if c.max_position_embeddings is None:
        c.max_position_embeddings = c.seq_length
    if c.params_dtype is None:
        c.params_dtype = torch.bfloat16 if c.bf16 else torch.float16 if c.fp16 else torch.float32
    if c.apply_query_key_layer_scaling:
        c.attention_softmax_in_fp32 = True  # the scores' layer-number scaling cancels inside an fp32 softmax
    if c.window_size is not None:
        c.window_size = tuple(int(v) for v in c.window_size)
    if c.recompute_granularity == "selective" and c.recompute_modules is None:
        c.recompute_modules = ["core_attn"]
    if c.tensor_model_parallel_size == 1 and c.sequence_parallel:
        # As in Megatron: sequence parallelism is meaningless without tensor parallelism.
        c.sequence_parallel = False


def _validate_choices(c: TransformerConfig) -> None:
    checks = (
        ("position_embedding_type", POSITION_EMBEDDING_TYPES),
        ("normalization", NORMALIZATIONS),
        ("attention_backend", ATTENTION_BACKENDS),
        ("cp_comm_type", CP_COMM_TYPES),
        ("cross_entropy_fusion_impl", CROSS_ENTROPY_FUSION_IMPLS),
    )
    for name, choices in checks:
        if getattr(c, name) not in choices:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(c, name)!r} is not one of {choices}")
    if c.ffn_hidden_size <= 0 or c.kv_channels <= 0:
        raise ValueError(f"--ffn-hidden-size ({c.ffn_hidden_size}) and --kv-channels ({c.kv_channels}) "
                         "must be positive")
    for name in ("attention_dropout", "hidden_dropout"):
        p = getattr(c, name)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {p}")
    if c.init_method_std <= 0:
        raise ValueError(f"--init-method-std must be positive, got {c.init_method_std}")


def _validate_heads(c: TransformerConfig) -> None:
    tp = c.tensor_model_parallel_size
    if tp < 1:
        raise ValueError(f"--tensor-model-parallel-size must be >= 1, got {tp}")
    if c.num_query_groups is None or c.num_query_groups < 1:
        raise ValueError(f"--num-query-groups must be >= 1, got {c.num_query_groups}")
    if c.num_attention_heads % tp != 0:
        raise ValueError(
            f"--num-attention-heads ({c.num_attention_heads}) must be divisible by "
            f"--tensor-model-parallel-size ({tp})")
    if c.num_attention_heads % c.num_query_groups != 0:
        raise ValueError(
            f"--num-attention-heads ({c.num_attention_heads}) must be divisible by "
            f"--num-query-groups ({c.num_query_groups})")
    if c.num_query_groups % tp != 0:
        raise ValueError(
            f"--num-query-groups ({c.num_query_groups}) must be divisible by "
            f"--tensor-model-parallel-size ({tp}); use fewer tensor-parallel ranks or more groups")
    if c.ffn_hidden_size % tp != 0:
        raise ValueError(
            f"--ffn-hidden-size ({c.ffn_hidden_size}) must be divisible by "
            f"--tensor-model-parallel-size ({tp})")


def _validate_positions(c: TransformerConfig) -> None:
    if c.position_embedding_type == "learned_absolute":
        if c.max_position_embeddings is None:
            raise ValueError("--max-position-embeddings (or --seq-length) is required with "
                             "--position-embedding-type learned_absolute")
        if c.seq_length is not None and c.seq_length > c.max_position_embeddings:
            raise ValueError(
                f"--seq-length ({c.seq_length}) exceeds --max-position-embeddings "
                f"({c.max_position_embeddings}); raise --max-position-embeddings or shorten the sequences")
    if c.position_embedding_type == "rope":
        if not 0.0 < c.rotary_percent <= 1.0:
            raise ValueError(f"--rotary-percent must be in (0, 1], got {c.rotary_percent}")
        rotary_dim = int(c.kv_channels * c.rotary_percent)
        if rotary_dim < 2 or rotary_dim % 2 != 0:
            raise ValueError(
                f"--rotary-percent {c.rotary_percent} of --kv-channels {c.kv_channels} gives "
                f"{rotary_dim} rotary channels; it must be an even number >= 2")
        if c.rotary_seq_len_interpolation_factor is not None and c.rotary_seq_len_interpolation_factor <= 0:
            raise ValueError("--rotary-seq-len-interpolation-factor must be positive, got "
                             f"{c.rotary_seq_len_interpolation_factor}")
        if c.rotary_base <= 0:
            raise ValueError(f"--rotary-base must be positive, got {c.rotary_base}")
        if c.use_rope_scaling and c.rope_scaling_factor <= 0:
            raise ValueError(f"--rope-scaling-factor must be positive, got {c.rope_scaling_factor}")
    elif c.use_rope_scaling:
        raise ValueError("--use-rope-scaling scales rotary frequencies: it needs --position-embedding-type rope "
                         "(or --use-rotary-position-embeddings)")
    if c.window_size is not None:
        if len(c.window_size) != 2 or any(v < -1 for v in c.window_size):
            raise ValueError(f"--window-size takes LEFT,RIGHT with each >= 0 or -1 (unlimited), got {c.window_size}")


ROPE_TYPES = ("rope", "yarn")


def _validate_latent_attention(c: TransformerConfig) -> None:
    """The MLA and MTP flags (rope_type defaults to yarn with MLA, as in Megatron)."""
    mla_flags = [f for f in ("q_lora_rank",) if getattr(c, f) is not None]
    if c.rope_type is not None and c.rope_type not in ROPE_TYPES:
        raise ValueError(f"--rope-type {c.rope_type!r} is not one of {ROPE_TYPES}")
    if c.multi_latent_attention:
        if c.rope_type is None:
            c.rope_type = "yarn"
        for name in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
            if getattr(c, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(c, name)}")
        if c.q_lora_rank is not None and c.q_lora_rank <= 0:
            raise ValueError(f"--q-lora-rank must be positive (or left unset for a full-rank query), got {c.q_lora_rank}")
        if c.qk_pos_emb_head_dim % 2:
            raise ValueError(f"--qk-pos-emb-head-dim ({c.qk_pos_emb_head_dim}) must be even (rotated in pairs)")
        if c.rotary_interleaved:
            raise ValueError("--rotary-interleaved does not apply to --multi-latent-attention (MLA rotates its "
                             "channel pairs in its own order); drop --rotary-interleaved")
        if c.rotary_scaling_factor <= 0:
            raise ValueError(f"--rotary-scaling-factor must be positive, got {c.rotary_scaling_factor}")
        if c.add_qkv_bias:
            raise ValueError("--add-qkv-bias does not apply to --multi-latent-attention (its projections have "
                             "no biases); drop --add-qkv-bias")
    elif mla_flags or c.rope_type == "yarn":
        given = ["--" + f.replace("_", "-") for f in mla_flags] + (["--rope-type yarn"] if c.rope_type == "yarn" else [])
        raise ValueError(f"{', '.join(given)} configure multi-latent attention; add --multi-latent-attention "
                         "(YaRN rotary scaling is built for MLA only)")
    if (c.recompute_granularity == "selective" and "mla_up_proj" in (c.recompute_modules or ())
            and not c.multi_latent_attention):
        raise ValueError("--recompute-modules mla_up_proj needs --multi-latent-attention; drop mla_up_proj")
    if c.mtp_num_layers is not None:
        if c.mtp_num_layers < 1:
            raise ValueError(f"--mtp-num-layers must be >= 1 (or unset for no multi-token prediction), "
                             f"got {c.mtp_num_layers}")
        if c.pipeline_model_parallel_size > 1 and not c.untie_embeddings_and_output_weights:
            raise ValueError("--mtp-num-layers with --pipeline-model-parallel-size > 1 needs "
                             "--untie-embeddings-and-output-weights (the last stage keeps a copy of the word "
                             "embedding for the blocks; a tied output layer would be a second one)")
        if c.pipeline_model_parallel_size > 1 and c.position_embedding_type == "learned_absolute":
            raise ValueError("--mtp-num-layers with --pipeline-model-parallel-size > 1 needs rotary or no position "
                             "embeddings (--position-embedding-type rope or none): learned positions are not "
                             "copied to the last stage")
        if c.mtp_loss_scaling_factor < 0:
            raise ValueError(f"--mtp-loss-scaling-factor must be >= 0, got {c.mtp_loss_scaling_factor}")


def _validate_activation(c: TransformerConfig) -> None:
    chosen = [f for f in ("swiglu", "squared_relu", "openai_gelu") if getattr(c, f)]
    if len(chosen) > 1:
        raise ValueError("choose at most one MLP activation: " +
                         ", ".join("--" + f.replace("_", "-") for f in chosen))


def check_one_precision(bf16: bool, fp16: bool) -> None:
    """--bf16 and --fp16 exclude each other (TransformerConfig and OptimizerConfig both carry them)."""
    if bf16 and fp16:
        raise ValueError("--bf16 and --fp16 cannot both be set; choose one.")


def _validate_precision(c: TransformerConfig) -> None:
    check_one_precision(c.bf16, c.fp16)
    if c.use_flash_attn and c.attention_backend not in ("auto", "flash"):
        raise ValueError(f"--use-flash-attn conflicts with --attention-backend {c.attention_backend}; "
                         "drop one of them")
    if not isinstance(c.params_dtype, torch.dtype) or not c.params_dtype.is_floating_point:
        raise ValueError(f"--params-dtype must be a floating torch dtype, got {c.params_dtype!r}")


def _validate_parallel(c: TransformerConfig) -> None:
    pp = c.pipeline_model_parallel_size
    if pp < 1:
        raise ValueError(f"--pipeline-model-parallel-size must be >= 1, got {pp}")
    vp = c.virtual_pipeline_model_parallel_size
    if vp is not None and vp < 1:
        raise ValueError(f"--virtual-pipeline-model-parallel-size must be >= 1, got {vp}")
    uneven = c.decoder_first_pipeline_num_layers is not None or c.decoder_last_pipeline_num_layers is not None
    if uneven and pp == 1:
        raise ValueError("--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1")
    # The per-stage split itself is checked (with the numbers) by block.num_layers_on_stage.
    from gigatron.core.transformer.block import check_pipeline_split
    check_pipeline_split(c, pp, vp)


def _validate_recompute(c: TransformerConfig) -> None:
    g = c.recompute_granularity
    if g is None:
        if c.recompute_method is not None:
            raise ValueError("--recompute-method needs --recompute-granularity full")
        return
    if g not in RECOMPUTE_GRANULARITIES:
        raise ValueError(f"--recompute-granularity {g!r} is not one of {RECOMPUTE_GRANULARITIES}")
    if g == "full":
        if c.recompute_method not in RECOMPUTE_METHODS:
            raise ValueError("--recompute-granularity full needs --recompute-method uniform or block, "
                             f"got {c.recompute_method!r}")
        if c.recompute_num_layers is None or c.recompute_num_layers < 1:
            raise ValueError("--recompute-granularity full needs --recompute-num-layers >= 1, got "
                             f"{c.recompute_num_layers}")
    else:
        if c.recompute_method is not None:
            raise ValueError("--recompute-method applies to --recompute-granularity full only")
        unknown = [m for m in c.recompute_modules if m not in RECOMPUTE_MODULES]
        if unknown or not c.recompute_modules:
            raise ValueError(f"--recompute-modules {c.recompute_modules} must be a non-empty subset of "
                             f"{RECOMPUTE_MODULES}")
    if c.distribute_saved_activations and (g != "full" or c.sequence_parallel):
        raise ValueError("--distribute-saved-activations needs --recompute-granularity full and "
                         "no --sequence-parallel")
