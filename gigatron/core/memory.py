"""Device memory of a training run, per rank, computed from the configs before anything is built.

Pure functions: no tensors are allocated and no model is built. Every activation term below is
what Gigatron's own layers keep for backward (measured with torch.autograd.graph.saved_tensors_hooks
on the CPU and checked by tests/unit/test_memory_estimator.py), not a textbook formula.

Shape legend: s = sequence length on this rank (seq_length / cp), b = micro-batch size,
h = hidden size, tp = tensor-parallel size, T = s * b tokens, Ts = T / tp with sequence parallelism
(else T), f = ffn_hidden_size, nq / ng = query heads / key-value groups, d = kv_channels, V = padded
vocabulary, a = bytes of the compute dtype (params_dtype), r = bytes of the residual stream (4 with
--fp32-residual-connection, else a).

What one transformer layer keeps for backward (no recompute):
    input norm        LayerNorm: its input x [Ts, h] (r) + mean and rstd [Ts] fp32; RMSNorm: the fp32
                      input (x itself when fp32, else an fp32 copy), the fp32 normalized x [Ts, h] and
                      rsqrt [Ts] fp32
    linear_qkv        its input, the norm output [Ts, h] (a)
    attention         the fused QKV output [T, (nq + 2 ng) d / tp] (a; k and v are views of it),
                      a separate q [T, nq d / tp] with RoPE, qk-layernorm or GQA (and a separate k with
                      RoPE or qk-layernorm), RoPE's cos and sin [s, b, r_rot] fp32 twice for q and k,
                      the SDPA output [T, nq d / tp] (a; linear_proj's input is a view of it) and the
                      log-sum-exp [b, nq / tp, s] fp32 -- no s x s scores (flash, cuDNN and
                      memory-efficient kernels recompute them in backward)
    hidden dropout    a mask [Ts, h] after attention and after the MLP (bool on CUDA, the activation
                      dtype on the CPU) when --hidden-dropout > 0
    pre-MLP norm      as the input norm, on the residual after attention
    MLP               linear_fc1's input [Ts, h] (a); GeLU: fc1 output and GeLU output [T, f / tp] (a);
                      SwiGLU: fc1 output [T, 2f / tp], silu(gate) and the product [T, f / tp];
                      squared ReLU: relu and its square [T, f / tp]; OpenAI GeLU: seven [T, f / tp]
Recompute: selective core_attn keeps q, k, v (no log-sum-exp); mlp keeps only linear_fc1's input;
layernorm keeps only the norm inputs (the norm outputs are recomputed); full keeps each checkpointed
chunk's input [Ts, h] (r; divided by tp with --distribute-saved-activations).
Embedding (first stage): the token ids (and position ids with learned positions) int64 [b, s], the
dropout mask; with sequence parallelism and no dropout the first layer's [s/tp, b, h] input is a
view of the full [s, b, h] embedding output, which therefore stays alive. Output (last stage): the final norm, and either the output layer's input [Ts, h] plus
the fp32 softmax [T, V / tp] and the int64 target (plain loss) or the full-sequence hidden [T, h],
the int64 target and the fp32 log-sum-exp [T] (--cross-entropy-loss-fusion).

Hybrid Mamba models (`mamba_config`, a MambaConfig): each layer of the pattern counts its own kind.
An attention layer (`*`) keeps the input norm, linear_qkv's input, the attention terms and one
dropout mask; an MLP layer (`-`) the pre-MLP norm (of the residual stream), linear_fc1's input, the
MLP terms and one dropout mask; a Mamba layer (`M`; per rank I = inner width / tp, G groups / tp,
N state dim, H heads / tp, conv width C = I + 2GN) what its CUDA kernels and PyTorch ops keep:
    norm              as the input norm above
    in_proj           its input [Ts, h] (a) and its output [T, 2I + 2GN + H] (a; the conv1d
                      input x/B/C, z and dt are views of it)
    dt                softplus's fp32 input and its fp32 output (the scan's dt) [T, H]
    A                 -exp(A_log): exp's result and its negation [H] fp32
    gated norm        its input y [T, I] (a; z is a view of the in_proj output)
    out_proj          its input [T, I] (a)
The conv1d and the scan run as one step that keeps only its inputs (ops/ssd.py conv_ssd_scan:
the convolution's output [T, C] is made again in backward), and the gated norm keeps only y, z
and its weight: the Triton kernels by construction, the CPU conv1d + chunked scan and the gated
norm on every device through gigatron/core/ops/ssd_recompute.py (bitwise the gradients of the
plain ops). The CPU and CUDA paths therefore keep the same bytes, measured on the CPU with
saved-tensor hooks by tests/unit/test_mamba_memory.py. At hidden 2048 (I = 4096, 64 heads, 8
groups of state 128, bf16, unfused RMSNorm) that is 57,988 bytes per token: norm 16,388, in_proj
input 4,096 and output 20,608, dt 512, gated norm input 8,192, out_proj input 8,192.

Multi-latent attention and multi-token prediction: their parameters (and so the model state) are
counted; their activations are not modelled yet (layer_activation_bytes refuses MLA).
Not modelled: MoE layers, context parallelism's ring-attention buffers (the attention terms use
the local s / cp), an explicit attention mask from the batch (--reset-attention-mask), and
--torch-compile (Inductor decides what to save; the eager numbers are then an upper bound).

Pipeline schedules keep several micro-batches' activations at once: 1F1B min(pp - rank, M) on
pipeline rank `rank`, interleaved the plan's peak (warm-up + 1 (micro-batch, chunk) pairs), no
pipelining 1.

Model state (bytes per parameter): bf16/fp16 params 2 + fp32 grad buffer 4 + fp32 main params 4 +
Adam moments 8 = 18; with the distributed optimizer the main params and moments cover only this
rank's shard of each bucket (buckets padded to lcm(dp, 128), params aligned to 64 elements), so
6 + 12 / dp plus padding. Everything here counts allocator blocks the program asks for; the caching
allocator's reserve beyond them and the CUDA context are separate lines, never folded in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

__all__ = [
    "dtype_bytes",
    "MemoryTerms",
    "RankMemory",
    "stage_parameter_numels",
    "ddp_buffer_layout",
    "state_bytes",
    "layer_activation_bytes",
    "hybrid_layer_kinds",
    "hybrid_layer_activation_bytes",
    "stage_activation_bytes",
    "microbatches_in_flight",
    "interleaved_activation_peak",
    "temporary_bytes",
    "estimate_rank_memory",
    "estimate_memory",
    "largest_micro_batch",
    "format_memory_table",
    "GIB",
]

GIB = 1024 ** 3
_PARAM_ALIGNMENT = 64  # elements; gigatron/core/distributed/param_and_grad_buffer.py
_CHUNK_LOGIT_BYTES = 256 * 1024 * 1024  # gigatron/core/ops/cross_entropy.py


def dtype_bytes(dtype: torch.dtype) -> int:
    """Bytes of one element of `dtype`."""
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _div(n: int, k: int, what: str) -> int:
    if n % k:
        raise ValueError(f"{what} ({n}) is not divisible by {k}")
    return n // k


# ====================================================================== parameters and state


def _norm_numels(config, size: int) -> List[int]:
    return [size, size] if config.normalization == "LayerNorm" else [size]


def _mla_parameter_numels(config) -> List[int]:
    """Multi-latent attention's projections and latent norms on one tensor-parallel rank (replicated
    down-projections, per-head up-projections), in registration order, before linear_proj."""
    tp = config.tensor_model_parallel_size
    h, heads = config.hidden_size, config.num_attention_heads // tp
    dq = config.qk_head_dim + config.qk_pos_emb_head_dim
    numels = []
    if config.q_lora_rank is None:
        numels.append(heads * dq * h)  # linear_q_proj
    else:
        numels += [config.q_lora_rank * h, heads * dq * config.q_lora_rank]  # linear_q_down_proj, linear_q_up_proj
    numels.append((config.kv_lora_rank + config.qk_pos_emb_head_dim) * h)  # linear_kv_down_proj
    numels.append(heads * (config.qk_head_dim + config.v_head_dim) * config.kv_lora_rank)  # linear_kv_up_proj
    if config.qk_layernorm:
        if config.q_lora_rank is not None:
            numels += _norm_numels(config, config.q_lora_rank)
        numels += _norm_numels(config, config.kv_lora_rank)
    return numels


def _layer_parameter_numels(config) -> List[int]:
    """Parameter sizes of one layer on one tensor-parallel rank, in registration order."""
    tp = config.tensor_model_parallel_size
    h, d = config.hidden_size, config.kv_channels
    qkv = (config.num_attention_heads + 2 * config.num_query_groups) * d // tp
    fc1 = (2 if config.swiglu else 1) * config.ffn_hidden_size // tp
    numels = _norm_numels(config, h)
    if getattr(config, "multi_latent_attention", False):
        numels += _mla_parameter_numels(config)
        numels.append(h * config.num_attention_heads * config.v_head_dim // tp)
    else:
        numels.append(qkv * h)
        if config.add_bias_linear or config.add_qkv_bias:
            numels.append(qkv)
        if config.qk_layernorm:
            numels += _norm_numels(config, d) + _norm_numels(config, d)
        numels.append(h * config.num_attention_heads * d // tp)
    if config.add_bias_linear:
        numels.append(h)
    numels += _norm_numels(config, h)
    numels.append(fc1 * h)
    if config.add_bias_linear:
        numels.append(fc1)
    numels.append(h * config.ffn_hidden_size // tp)
    if config.add_bias_linear:
        numels.append(h)
    return numels


def _attention_parameter_numels(config) -> List[int]:
    return _layer_parameter_numels(config)[:-len(_mlp_parameter_numels(config))]


def _mlp_parameter_numels(config) -> List[int]:
    tp = config.tensor_model_parallel_size
    h = config.hidden_size
    fc1 = (2 if config.swiglu else 1) * config.ffn_hidden_size // tp
    numels = _norm_numels(config, h) + [fc1 * h]
    if config.add_bias_linear:
        numels.append(fc1)
    numels.append(h * config.ffn_hidden_size // tp)
    if config.add_bias_linear:
        numels.append(h)
    return numels


def _mamba_sizes(config, mamba_config) -> Dict[str, int]:
    """Per-rank Mamba mixer sizes: I (inner width), G (groups), N (state), H (heads), C (conv channels)."""
    from gigatron.core.transformer.mamba.config import MAMBA_CONV_KERNEL, mamba_num_heads

    tp = config.tensor_model_parallel_size
    heads = mamba_num_heads(mamba_config, config.hidden_size)
    H = _div(heads, tp, "the Mamba heads over --tensor-model-parallel-size")
    G = _div(mamba_config.mamba_num_groups, tp, "--mamba-num-groups over --tensor-model-parallel-size")
    N = mamba_config.mamba_state_dim
    I = H * mamba_config.mamba_head_dim
    return {"I": I, "G": G, "N": N, "H": H, "C": I + 2 * G * N, "K": MAMBA_CONV_KERNEL}


def _mamba_parameter_numels(config, mamba_config) -> List[int]:
    """norm, dt_bias, A_log, D, in_proj, conv1d weight and bias, the gated norm, out_proj (one rank)."""
    m = _mamba_sizes(config, mamba_config)
    h = config.hidden_size
    I, G, N, H, C = m["I"], m["G"], m["N"], m["H"], m["C"]
    # the mixer's own tensors (dt_bias, A_log, D) come before its submodules' (nn.Module order)
    return _norm_numels(config, h) + [H, H, H, h * (2 * I + 2 * G * N + H), C * m["K"], C, I, I * h]


def hybrid_layer_kinds(config, mamba_config, pp_rank: int = 0) -> List[str]:
    """The pattern symbols of the layers on pipeline rank `pp_rank`."""
    from gigatron.core.transformer.block import layer_offset, num_layers_on_stage
    from gigatron.core.transformer.mamba.config import hybrid_layer_types

    types = hybrid_layer_types(config.num_layers, mamba_config.hybrid_attention_ratio, mamba_config.hybrid_mlp_ratio,
                               mamba_config.hybrid_override_pattern)
    pp = config.pipeline_model_parallel_size
    if "E" in types:
        raise ValueError("the memory estimate does not model MoE layers ('E' in the hybrid pattern) yet")
    start = layer_offset(config, pp_rank, pp)
    return types[start:start + num_layers_on_stage(config, pp_rank, pp)]


def _hybrid_layer_parameter_numels(config, mamba_config, kind: str) -> List[int]:
    if kind == "M":
        return _mamba_parameter_numels(config, mamba_config)
    return _attention_parameter_numels(config) if kind == "*" else _mlp_parameter_numels(config)


def stage_parameter_numels(config, vocab_size: int, pp_rank: int = 0, vp_stage: Optional[int] = None,
                           mamba_config=None):
    """(numel, shared_embedding) of every parameter of one model chunk on one tensor-parallel rank,
    in the order GPTModel (MambaModel with `mamba_config`) registers them. `vocab_size` is the
    padded vocabulary."""
    from gigatron.core.transformer.block import num_layers_on_stage

    pp = config.pipeline_model_parallel_size
    vp = config.virtual_pipeline_model_parallel_size
    vp_size = vp if vp is not None and vp > 1 else None
    first_vp = vp_stage in (None, 0)
    last_vp = vp_stage is None or vp_size is None or vp_stage == vp_size - 1
    pre_process = pp_rank == 0 and first_vp
    post_process = pp_rank == pp - 1 and last_vp
    tied = not config.untie_embeddings_and_output_weights
    tp = config.tensor_model_parallel_size
    h = config.hidden_size
    numels = []
    if pre_process:
        shared = tied or bool(getattr(config, "mtp_num_layers", None))  # a copy lives on the last stage
        numels.append((vocab_size // tp * h, shared and not post_process))
        if config.position_embedding_type == "learned_absolute":
            numels.append((config.max_position_embeddings * h, False))
    if mamba_config is not None:
        numels += [(n, False) for kind in hybrid_layer_kinds(config, mamba_config, pp_rank)
                   for n in _hybrid_layer_parameter_numels(config, mamba_config, kind)]
    else:
        layers = num_layers_on_stage(config, pp_rank, pp, vp_stage if vp_size else None, vp_size)
        numels += [(n, False) for _ in range(layers) for n in _layer_parameter_numels(config)]
    if post_process:
        numels += [(n, False) for n in _norm_numels(config, h)]
        if not (tied and pre_process):
            numels.append((vocab_size // tp * h, tied))
        mtp = getattr(config, "mtp_num_layers", None) or 0
        if mtp and not pre_process:  # the blocks' copy of the word embedding (registered before them)
            numels.append((vocab_size // tp * h, True))
        for _ in range(mtp):
            # a multi-token prediction block: enorm, hnorm, eh_proj [h/tp, 2h], a layer, final_layernorm
            block = _norm_numels(config, h) * 2 + [h // tp * 2 * h] + _layer_parameter_numels(config)
            numels += [(n, False) for n in block + _norm_numels(config, h)]
    return numels


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def ddp_buffer_layout(params, *, dp_size: int, use_distributed_optimizer: bool, bucket_size: Optional[int],
                      pad_buckets_for_high_nccl_busbw: bool = False):
    """Buckets of one DDP buffer exactly as ParamAndGradBuffer lays them out.

    params: [(numel, shared_embedding)] in registration order. Returns (total elements,
    [(bucket_start, bucket_end, [(param_start, param_end), ...])])."""
    if use_distributed_optimizer:
        divisor = math.lcm(dp_size, 128)
        if pad_buckets_for_high_nccl_busbw:
            divisor = math.lcm(divisor, 2 ** 16)
    else:
        divisor = 1
    buckets, current = [], []
    index = bucket_start = 0
    for numel, shared in reversed(params):
        own = use_distributed_optimizer and shared
        if own and current:
            index = _round_up(index, divisor)
            buckets.append((bucket_start, index, current))
            bucket_start, current = index, []
        if use_distributed_optimizer:
            index = _round_up(index, _PARAM_ALIGNMENT)
        current.append((index, index + numel))
        index += numel
        if own or (bucket_size is not None and index - bucket_start >= bucket_size):
            index = _round_up(index, divisor)
            buckets.append((bucket_start, index, current))
            bucket_start, current = index, []
    if current:
        index = _round_up(index, divisor)
        buckets.append((bucket_start, index, current))
    return index, buckets


def state_bytes(config, ddp_config, optimizer_config, vocab_size: int, *, pp_rank: int = 0, dp_size: int = 1,
                dp_rank: int = 0, mamba_config=None) -> Dict[str, int]:
    """Bytes of model parameters, gradient buffer, fp32 main parameters and optimizer states held
    by one rank (all of its model chunks), as DistributedDataParallel and the optimizers allocate
    them (after the first step, when the optimizer states exist)."""
    param_dtype = config.params_dtype
    p_bytes = dtype_bytes(param_dtype)
    g_bytes = dtype_bytes(ddp_config.grad_dtype_for(param_dtype))
    distributed = bool(ddp_config.use_distributed_optimizer)
    states_per_element = 2 if optimizer_config.optimizer == "adam" else (
        1 if getattr(optimizer_config, "sgd_momentum", 0.0) else 0)
    main_bytes = 0 if param_dtype == torch.float32 else 4
    vp = config.virtual_pipeline_model_parallel_size
    chunks = list(range(vp)) if vp is not None and vp > 1 else [None]
    out = {"params": 0, "grads": 0, "main_params": 0, "optimizer_states": 0, "num_parameters": 0}
    for vp_stage in chunks:
        params = stage_parameter_numels(config, vocab_size, pp_rank, vp_stage, mamba_config)
        out["num_parameters"] += sum(n for n, _ in params)
        total, buckets = ddp_buffer_layout(
            params, dp_size=dp_size, use_distributed_optimizer=distributed,
            bucket_size=ddp_config.bucket_size_for(dp_size),
            pad_buckets_for_high_nccl_busbw=ddp_config.pad_buckets_for_high_nccl_busbw)
        out["grads"] += total * g_bytes
        if distributed:
            out["params"] += total * p_bytes  # the contiguous parameter buffer, padding included
            owned = 0
            for start, end, members in buckets:
                shard = (end - start) // dp_size
                lo, hi = start + dp_rank * shard, start + (dp_rank + 1) * shard
                owned += sum(max(0, min(p_hi, hi) - max(p_lo, lo)) for p_lo, p_hi in members)
        else:
            out["params"] += sum(n for n, _ in params) * p_bytes
            owned = sum(n for n, _ in params)
        out["main_params"] += owned * main_bytes
        out["optimizer_states"] += owned * 4 * states_per_element
    return out


# ====================================================================== activations


@dataclass
class _Shape:
    s: int            # sequence on this rank (after context parallelism)
    b: int
    tp: int
    sp: bool
    a: int            # compute dtype bytes
    r: int            # residual stream bytes
    mask: int         # dropout-mask bytes per element (bool on CUDA, the activation dtype on CPU)
    device_type: str

    @property
    def T(self) -> int:
        return self.s * self.b

    @property
    def Ts(self) -> int:
        return self.T // self.tp if self.sp else self.T


def _norm_saved(config, shape: _Shape, tokens: int, width: int, x_bytes: int) -> Dict[str, int]:
    """What a norm keeps for backward, given its input's element size. 'input' is the norm's
    input when the norm keeps that very tensor (so it can be shared with a recompute checkpoint)."""
    a = shape.a
    out: Dict[str, int] = {}
    one_p = config.apply_layernorm_1p
    if config.normalization == "LayerNorm":
        fast = x_bytes == a and not one_p
        if fast or x_bytes == 4:
            out["input"] = tokens * width * x_bytes
        else:
            out["fp32 input"] = tokens * width * 4
        # CUDA keeps mean and rstd in fp32; PyTorch's CPU kernel keeps them in the input dtype.
        stat_bytes = x_bytes if (fast and shape.device_type == "cpu") else 4
        out["stats"] = 2 * tokens * stat_bytes
        if not fast:
            if one_p or a != 4:
                out["fp32 weight"] = width * 4
            if a != 4:
                out["fp32 bias"] = width * 4
    else:
        if x_bytes == 4:
            out["input"] = tokens * width * 4
        else:
            out["fp32 input"] = tokens * width * 4
        out["stats"] = tokens * 4
        out["fp32 normalized"] = tokens * width * 4
        if one_p or a != 4:
            out["fp32 weight"] = width * 4
    return out


def _prefixed(prefix: str, terms: Dict[str, int]) -> Dict[str, int]:
    return {f"{prefix} {k}": v for k, v in terms.items()}


def _attention_kernel(config, shape: _Shape, training: bool = True) -> str:
    backend = config.resolved_attention_backend
    if backend == "local":
        return "local"
    if backend == "math":
        return "math"
    if shape.device_type == "cpu":
        # PyTorch's CPU flash kernel has no dropout: SDPA falls back to its math kernel.
        return "math" if config.attention_dropout > 0 and training else "flash"
    if backend == "efficient" or (backend == "auto" and shape.a == 4):
        return "efficient"  # the flash kernel takes only fp16/bf16
    return "flash"


def _attention_saved(config, shape: _Shape, position_ids: bool, recompute_core_attn: bool) -> Dict[str, int]:
    tp, a, T, s, b = shape.tp, shape.a, shape.T, shape.s, shape.b
    d = config.kv_channels
    nq, ng = config.num_attention_heads // tp, config.num_query_groups // tp
    hpg = nq // ng
    rope = config.position_embedding_type == "rope"
    kernel = _attention_kernel(config, shape)
    out: Dict[str, int] = {}
    separate_q = rope or config.qk_layernorm or hpg > 1
    separate_k = rope or config.qk_layernorm
    # Backends without native GQA (cuDNN, memory-efficient, local) get keys and values repeated per
    # query head (new tensors); otherwise v is a view that keeps the whole fused QKV output alive.
    repeat_kv = hpg > 1 and config.resolved_attention_backend in ("cudnn", "efficient", "local")
    if not repeat_kv:
        out["qkv output"] = T * (nq + 2 * ng) * d * a
    if separate_q:
        out["q"] = T * nq * d * a
    if separate_k:
        out["k"] = T * ng * d * a
    if repeat_kv:
        out["repeated k, v"] = 2 * T * nq * d * a
    if config.qk_layernorm:
        out.update(_prefixed("q norm", _norm_saved(config, shape, T * nq, d, a)))
        out.update(_prefixed("k norm", _norm_saved(config, shape, T * ng, d, a)))
        for key in [k for k in out if k.endswith(" input")]:
            out.pop(key)  # the norms' inputs are views of the QKV output
    if rope:
        rot = int(d * config.rotary_percent)
        out["rope cos, sin"] = 4 * s * (b if position_ids else 1) * rot * 4
    if recompute_core_attn:
        return out  # the checkpoint keeps q, k, v only; the output is linear_proj's input below
    out["attention output"] = T * nq * d * a
    if kernel in ("flash",):
        out["log-sum-exp"] = b * nq * s * 4
    elif kernel == "efficient":
        out["log-sum-exp"] = b * nq * _round_up(s, 32) * 4
    elif kernel == "math":
        # PyTorch's math SDPA with dropout: scaled q and k copies, softmax, dropout mask and the
        # dropped probabilities [b, nq, s, s].
        scores = b * nq * s * s * a
        out["scaled q, k"] = 2 * T * nq * d * a
        out["attention probabilities"] = 2 * scores + b * nq * s * s * shape.mask
        if config.attention_dropout == 0:
            out["attention probabilities"] = scores
    else:  # local: matmul-softmax
        soft = 4 if config.attention_softmax_in_fp32 else a
        out["causal mask"] = s * s
        out["softmax"] = b * nq * s * s * soft
        if config.attention_dropout > 0:
            out["attention dropout"] = b * nq * s * s * (shape.mask + a)
        elif soft != a:
            out["softmax cast"] = b * nq * s * s * a
    return out


def _mlp_saved(config, shape: _Shape) -> Dict[str, int]:
    f = config.ffn_hidden_size // shape.tp
    unit = shape.T * f * shape.a
    if config.swiglu:
        return {"fc1 output": 2 * unit, "silu(gate)": unit, "activation output": unit}
    if config.squared_relu:
        return {"relu output": unit, "activation output": unit}
    if config.openai_gelu:
        return {"fc1 output": unit, "tanh-GeLU intermediates": 5 * unit, "activation output": unit}
    return {"fc1 output": unit, "activation output": unit}


def layer_activation_bytes(config, micro_batch_size: int, seq_length: int, *, device_type: str = "cuda",
                           position_ids: bool = True, checkpointed: bool = False,
                           context_parallel_size: int = 1) -> Dict[str, int]:
    """Bytes one transformer layer keeps for backward for one micro-batch, term by term.

    `checkpointed`: the layer runs inside a full-recompute checkpoint (keeps nothing itself; the
    checkpointed chunk input is counted by stage_activation_bytes). Selective recompute
    (--recompute-modules) is read from the config. `position_ids`: the training batch passes
    position ids (RoPE angles are then [s, b, r] instead of [s, 1, r])."""
    if checkpointed:
        return {}
    if getattr(config, "multi_latent_attention", False):
        raise ValueError("the memory estimate counts multi-latent attention's parameters and optimizer state "
                         "(state_bytes) but does not model its activations yet")
    shape = _shape(config, micro_batch_size, seq_length, device_type, context_parallel_size)
    modules = set(config.recompute_modules or ()) if config.recompute_granularity == "selective" else set()
    h = config.hidden_size
    terms: Dict[str, int] = {}
    mid_bytes = 4 if config.fp32_residual_connection else shape.a
    for name, x_bytes in (("input norm", shape.r), ("pre-MLP norm", mid_bytes)):
        norm = _norm_saved(config, shape, shape.Ts, h, x_bytes)
        if "layernorm" in modules:
            # The checkpointed norm keeps its input; its output is recomputed for its consumer.
            norm = {"input": shape.Ts * h * x_bytes}
        terms.update(_prefixed(name, norm))
    if "layernorm" not in modules:
        terms["linear_qkv input"] = shape.Ts * h * shape.a
        terms["linear_fc1 input"] = shape.Ts * h * shape.a
    elif "mlp" in modules:
        pass  # the MLP checkpoint's input is the discarded norm output
    terms.update(_prefixed("attention", _attention_saved(config, shape, position_ids, "core_attn" in modules)))
    if "core_attn" in modules:
        terms["attention output"] = shape.T * config.num_attention_heads // shape.tp * config.kv_channels * shape.a
    if "mlp" not in modules:
        terms.update(_prefixed("mlp", _mlp_saved(config, shape)))
    if config.hidden_dropout > 0:
        terms["hidden dropout masks"] = 2 * shape.Ts * h * shape.mask
    return terms


def _mamba_saved(config, mamba_config, shape: _Shape) -> Dict[str, int]:
    """What one Mamba layer keeps for backward (see the module docstring)."""
    m = _mamba_sizes(config, mamba_config)
    I, G, N, H = m["I"], m["G"], m["N"], m["H"]
    T, Ts, a, h = shape.T, shape.Ts, shape.a, config.hidden_size
    out = _prefixed("norm", _norm_saved(config, shape, Ts, h, shape.r))
    out["in_proj input"] = Ts * h * a
    out["in_proj output"] = T * (2 * I + 2 * G * N + H) * a
    out["dt (softplus input and output)"] = 2 * T * H * 4
    out["A"] = 2 * H * 4
    out["gated norm input y"] = T * I * a
    out["out_proj input"] = T * I * a
    if config.hidden_dropout > 0:
        out["hidden dropout mask"] = Ts * h * shape.mask
    return out


def _hybrid_layer_saved(config, mamba_config, kind: str, shape: _Shape, position_ids: bool) -> Dict[str, int]:
    """What one layer of a hybrid stack keeps for backward: `kind` is its pattern symbol."""
    if kind == "M":
        return _mamba_saved(config, mamba_config, shape)
    h = config.hidden_size
    if kind == "*":
        out = _prefixed("input norm", _norm_saved(config, shape, shape.Ts, h, shape.r))
        out["linear_qkv input"] = shape.Ts * h * shape.a
        out.update(_prefixed("attention", _attention_saved(config, shape, position_ids, False)))
    else:
        out = _prefixed("pre-MLP norm", _norm_saved(config, shape, shape.Ts, h, shape.r))
        out["linear_fc1 input"] = shape.Ts * h * shape.a
        out.update(_prefixed("mlp", _mlp_saved(config, shape)))
    if config.hidden_dropout > 0:
        out["hidden dropout mask"] = shape.Ts * h * shape.mask
    return out


def hybrid_layer_activation_bytes(config, mamba_config, kind: str, micro_batch_size: int, seq_length: int, *,
                                  device_type: str = "cuda", position_ids: bool = True) -> Dict[str, int]:
    """Bytes one layer of kind `kind` (M, *, -) of a hybrid stack keeps for backward, term by term."""
    shape = _shape(config, micro_batch_size, seq_length, device_type, 1)
    return _hybrid_layer_saved(config, mamba_config, kind, shape, position_ids)


def _shape(config, micro_batch_size, seq_length, device_type, context_parallel_size) -> _Shape:
    tp = config.tensor_model_parallel_size
    sp = bool(config.sequence_parallel) and tp > 1
    s = _div(seq_length, context_parallel_size, "--seq-length over --context-parallel-size")
    if sp:
        _div(s, tp, "--seq-length with --sequence-parallel over --tensor-model-parallel-size")
    a = dtype_bytes(config.params_dtype)
    r = 4 if config.fp32_residual_connection else a
    mask = 1 if device_type == "cuda" else a
    return _Shape(s=s, b=micro_batch_size, tp=tp, sp=sp, a=a, r=r, mask=mask, device_type=device_type)


def _first_layer_keeps_input(config, shape: _Shape) -> bool:
    if config.recompute_granularity == "full":
        return True
    modules = set(config.recompute_modules or ()) if config.recompute_granularity == "selective" else set()
    return "layernorm" in modules or "input" in _norm_saved(config, shape, 1, 1, shape.r)


def _recomputed_layers(config, num_layers: int) -> List[int]:
    """Indices of local layers run inside a full-recompute checkpoint, and the chunk starts."""
    if config.recompute_granularity != "full":
        return []
    if config.recompute_method == "uniform":
        return list(range(num_layers))
    return list(range(min(config.recompute_num_layers, num_layers)))


def _checkpoint_inputs(config, num_layers: int) -> int:
    if config.recompute_granularity != "full" or num_layers == 0:
        return 0
    if config.recompute_method == "uniform":
        return math.ceil(num_layers / config.recompute_num_layers)
    return min(config.recompute_num_layers, num_layers)


def stage_activation_bytes(config, micro_batch_size: int, seq_length: int, vocab_size: int, *, pp_rank: int = 0,
                           vp_stage: Optional[int] = None, device_type: str = "cuda", position_ids: bool = True,
                           context_parallel_size: int = 1, mamba_config=None) -> Dict[str, int]:
    """Bytes one model chunk keeps for backward for one micro-batch, grouped into terms:
    'embedding', 'transformer layers', 'recompute checkpoints', 'final norm', 'output layer and
    loss' (only those present)."""
    from gigatron.core.transformer.block import num_layers_on_stage

    shape = _shape(config, micro_batch_size, seq_length, device_type, context_parallel_size)
    pp = config.pipeline_model_parallel_size
    vp = config.virtual_pipeline_model_parallel_size
    vp_size = vp if vp is not None and vp > 1 else None
    pre_process = pp_rank == 0 and vp_stage in (None, 0)
    post_process = pp_rank == pp - 1 and (vp_size is None or vp_stage == vp_size - 1)
    layers = num_layers_on_stage(config, pp_rank, pp, vp_stage if vp_size else None, vp_size)
    h, T, Ts, a, r = config.hidden_size, shape.T, shape.Ts, shape.a, shape.r
    out: Dict[str, int] = {}
    if pre_process:
        # token ids (with tp > 1: this shard's local ids and the out-of-shard mask instead)
        emb = shape.b * shape.s * (8 + 1 if shape.tp > 1 else 8)
        if config.position_embedding_type == "learned_absolute":
            emb += shape.b * shape.s * 8  # position ids
        if config.hidden_dropout > 0:
            emb_dtype = 4 if config.fp32_residual_connection else a
            emb += Ts * h * (1 if device_type == "cuda" else emb_dtype)
        if (shape.sp and config.hidden_dropout == 0 and config.position_embedding_type == "learned_absolute"
                and layers > 0 and _first_layer_keeps_input(config, shape)):
            # scatter_to_sequence_parallel_region returns a view of the full [s, b, h] embedding, so
            # the first layer keeping its [s/tp, b, h] input keeps the whole tensor alive.
            emb += (T - Ts) * h * r
        out["embedding"] = emb
    recomputed = set(_recomputed_layers(config, layers))
    if mamba_config is not None:
        kinds = hybrid_layer_kinds(config, mamba_config, pp_rank)
        out["transformer layers"] = sum(sum(_hybrid_layer_saved(config, mamba_config, kind, shape, position_ids).values())
                                        for i, kind in enumerate(kinds) if i not in recomputed)
    else:
        per_layer = layer_activation_bytes(config, micro_batch_size, seq_length, device_type=device_type,
                                           position_ids=position_ids, context_parallel_size=context_parallel_size)
        out["transformer layers"] = sum(per_layer.values()) * (layers - len(recomputed))
    checkpoints = _checkpoint_inputs(config, layers)
    if checkpoints:
        per_input = Ts * h * r
        if config.distribute_saved_activations and shape.tp > 1:
            per_input //= shape.tp
        out["recompute checkpoints"] = checkpoints * per_input
        if config.position_embedding_type == "rope":
            rot = int(config.kv_channels * config.rotary_percent)
            out["recompute checkpoints"] += shape.s * (shape.b if position_ids else 1) * rot * 4
        # The first layer after the checkpointed block keeps its input through its norm anyway.
    if post_process:
        norm = _norm_saved(config, shape, Ts, h, r)
        out["final norm"] = sum(norm.values())
        V = vocab_size // shape.tp
        if config.cross_entropy_loss_fusion:
            hidden = T * h * a if shape.sp else Ts * h * a
            out["output layer and loss"] = hidden + T * 8 + T * 4
        else:
            out["output layer and loss"] = Ts * h * a + T * V * 4 + T * (8 + 1)
    return out


# ====================================================================== schedules and peaks


def microbatches_in_flight(pp_rank: int, pp_size: int, num_microbatches: int, vp_size: Optional[int] = None,
                           group_size: Optional[int] = None) -> int:
    """Most (micro-batch, model chunk) forwards whose backward has not run yet on this rank:
    1 without pipelining, min(pp - rank, M) under 1F1B, the interleaved plan's peak otherwise."""
    if pp_size == 1:
        return 1
    if vp_size is None or vp_size == 1:
        return min(pp_size - pp_rank, num_microbatches)
    from gigatron.core.pipeline.schedules import build_interleaved_plan

    return build_interleaved_plan(pp_rank, pp_size, vp_size, num_microbatches, group_size).max_in_flight()


def interleaved_activation_peak(pp_rank: int, pp_size: int, vp_size: int, num_microbatches: int,
                                chunk_bytes: List[int], group_size: Optional[int] = None) -> int:
    """Largest sum of kept activations over the interleaved plan of this rank, where a forward of
    chunk v adds chunk_bytes[v] and its backward releases them."""
    from gigatron.core.pipeline.schedules import build_interleaved_plan

    plan = build_interleaved_plan(pp_rank, pp_size, vp_size, num_microbatches, group_size)
    live = peak = 0
    for step in plan.steps:
        if step.forward is not None:
            live += chunk_bytes[plan.forward_order[step.forward][1]]
            peak = max(peak, live)
        if step.backward is not None:
            live -= chunk_bytes[plan.backward_order[step.backward][1]]
    return peak


def temporary_bytes(config, micro_batch_size: int, seq_length: int, vocab_size: int, *, pp_rank: int = 0,
                    device_type: str = "cuda", context_parallel_size: int = 1,
                    position_ids: bool = True, mamba_config=None) -> Dict[str, int]:
    """Short-lived memory on top of the kept activations of all micro-batches in flight, one entry
    per phase of the step (phases do not overlap, so the peak is the largest entry):

    - loss: the plain loss's logits in the compute dtype next to its fp32 softmax (or one chunk of
      the fused loss plus its fp32 weight-gradient accumulator);
    - backward: two activation gradients of the widest layer tensor, plus the largest parameter
      gradient before the DDP hook moves it into the fp32 buffer; in a hybrid stage with Mamba
      layers also a Mamba layer's backward, which recomputes its gated norm in fp32;
    - recompute: while the last checkpointed part of the last micro-batch runs its backward, its
      recomputed activations (a whole chunk for full recompute, the MLP / attention output / norm
      outputs for selective), less what that micro-batch no longer keeps by then (the loss and
      final norm; with full recompute also its non-recomputed layers)."""
    shape = _shape(config, micro_batch_size, seq_length, device_type, context_parallel_size)
    pp = config.pipeline_model_parallel_size
    vp = config.virtual_pipeline_model_parallel_size
    vp_size = vp if vp is not None and vp > 1 else None
    h, T, Ts, a, r = config.hidden_size, shape.T, shape.Ts, shape.a, shape.r
    V = vocab_size // shape.tp
    f = (2 if config.swiglu else 1) * config.ffn_hidden_size // shape.tp
    if mamba_config is not None:
        m = _mamba_sizes(config, mamba_config)
        f = max(f, 2 * m["I"] + 2 * m["G"] * m["N"] + m["H"])  # the in_proj output
    layer_grads = 2 * T * max(f, h) * a
    last_stage = pp_rank == pp - 1
    vp_stage = (vp_size - 1 if last_stage else 0) if vp_size else None
    out: Dict[str, int] = {}
    if last_stage:
        if config.cross_entropy_loss_fusion:
            c = min(max(64, _CHUNK_LOGIT_BYTES // (4 * V)), T)
            out["loss (one chunk of logits)"] = c * V * (a + 2 * 4) + V * h * 4
        else:
            out["loss (logits)"] = T * V * a + (T * V * 4 if a == 4 else 0)
    params = stage_parameter_numels(config, vocab_size, pp_rank, vp_stage, mamba_config)
    out["backward (activation + parameter gradients)"] = layer_grads + max(n for n, _ in params) * a
    if mamba_config is not None and "M" in hybrid_layer_kinds(config, mamba_config, pp_rank):
        # A Mamba layer's backward recomputes its gated norm in fp32 (it keeps only y and z): about
        # ten fp32 [T, I] tensors at once, plus the recomputed output rounded to the compute dtype
        # (measured on the CPU: 42 bytes per element in bf16, 40 in fp32).
        I = _mamba_sizes(config, mamba_config)["I"]
        out["backward of a Mamba layer (gated norm recomputed)"] = T * I * (40 + (a if a != 4 else 0))
    kept = stage_activation_bytes(config, micro_batch_size, seq_length, vocab_size, pp_rank=pp_rank,
                                  vp_stage=vp_stage, device_type=device_type, position_ids=position_ids,
                                  context_parallel_size=context_parallel_size, mamba_config=mamba_config)
    plain = _without_recompute(config)
    if mamba_config is not None:  # the largest layer of the stage stands for a recomputed one
        per_layer = max((_hybrid_layer_saved(plain, mamba_config, kind, shape, position_ids)
                         for kind in hybrid_layer_kinds(config, mamba_config, pp_rank)),
                        key=lambda terms: sum(terms.values()), default={})
    else:
        per_layer = layer_activation_bytes(plain, micro_batch_size, seq_length, device_type=device_type,
                                           position_ids=position_ids, context_parallel_size=context_parallel_size)
    post = kept.get("output layer and loss", 0) + kept.get("final norm", 0)
    modules = set(config.recompute_modules or ()) if config.recompute_granularity == "selective" else set()
    if config.recompute_granularity == "full":
        chunk = config.recompute_num_layers if config.recompute_method == "uniform" else 1
        working = chunk * sum(per_layer.values()) - Ts * h * r
        if config.distribute_saved_activations and shape.tp > 1:
            working += Ts * h * r - Ts * h * r // shape.tp  # the input all-gathered back for the recompute
        still_kept = kept.get("embedding", 0) + kept.get("recompute checkpoints", 0)
        out["recompute (one chunk) + activation gradients"] = max(
            0, still_kept + working - sum(kept.values())) + layer_grads
    elif modules:
        working = 0
        if "mlp" in modules:
            working += sum(v for k, v in per_layer.items() if k.startswith("mlp "))
        if "core_attn" in modules:
            working += per_layer.get("attention attention output", 0) + per_layer.get("attention log-sum-exp", 0)
        if "layernorm" in modules:
            working += Ts * h * a + sum(v for k, v in per_layer.items() if k.endswith("norm stats"))
        out["recompute (one layer) + activation gradients"] = max(0, working - post) + layer_grads
    return out


def _without_recompute(config):
    import dataclasses

    return dataclasses.replace(config, recompute_granularity=None, recompute_method=None, recompute_num_layers=None,
                               recompute_modules=None, distribute_saved_activations=False)


@dataclass
class MemoryTerms:
    """One rank's estimate, in bytes."""

    params: int
    grads: int
    main_params: int
    optimizer_states: int
    activations: int
    """Kept for backward: micro-batches in flight x one micro-batch's activations of all chunks."""
    output_logits: int
    """Part of `activations`: the output layer and loss terms (fp32 softmax of the plain loss)."""
    temporary: int
    allocator_reserve: int
    """The caching allocator's reserved-but-unallocated memory (a stated fraction, not measured)."""
    cuda_context: int
    num_parameters: int = 0
    in_flight: int = 1
    activation_terms: Dict[str, int] = field(default_factory=dict)
    temporary_terms: Dict[str, int] = field(default_factory=dict)

    @property
    def state(self) -> int:
        return self.params + self.grads + self.main_params + self.optimizer_states

    @property
    def allocated(self) -> int:
        """Peak bytes handed out by the allocator (compare with torch.cuda.max_memory_allocated)."""
        return self.state + self.activations + self.temporary

    @property
    def total(self) -> int:
        """What the device must have free: allocated + allocator reserve + CUDA context."""
        return self.allocated + self.allocator_reserve + self.cuda_context


@dataclass
class RankMemory:
    tp_rank: int
    pp_rank: int
    dp_rank: int
    terms: MemoryTerms


def estimate_rank_memory(transformer, ddp, optimizer, *, vocab_size: int, micro_batch_size: int, seq_length: int,
                         num_microbatches: int, data_parallel_size: int = 1, pp_rank: int = 0, dp_rank: int = 0,
                         context_parallel_size: int = 1, device_type: str = "cuda", position_ids: bool = True,
                         microbatch_group_size: Optional[int] = None, allocator_overhead_fraction: float = 0.0,
                         cuda_context_bytes: int = 0, mamba_config=None) -> MemoryTerms:
    """The memory of pipeline rank `pp_rank` (every tensor-parallel rank of a stage holds the same)."""
    vp = transformer.virtual_pipeline_model_parallel_size
    vp_size = vp if vp is not None and vp > 1 else None
    state = state_bytes(transformer, ddp, optimizer, vocab_size, pp_rank=pp_rank, dp_size=data_parallel_size,
                        dp_rank=dp_rank, mamba_config=mamba_config)
    chunks = list(range(vp_size)) if vp_size else [None]
    per_chunk = [stage_activation_bytes(transformer, micro_batch_size, seq_length, vocab_size, pp_rank=pp_rank,
                                        vp_stage=v, device_type=device_type, position_ids=position_ids,
                                        context_parallel_size=context_parallel_size, mamba_config=mamba_config)
                 for v in chunks]
    in_flight = microbatches_in_flight(pp_rank, transformer.pipeline_model_parallel_size, num_microbatches,
                                       vp_size, microbatch_group_size)
    merged: Dict[str, int] = {}
    for terms in per_chunk:
        for k, v in terms.items():
            merged[k] = merged.get(k, 0) + v
    if vp_size:
        # The interleaved plan keeps a mix of chunks: walk it and take the largest live total.
        totals = [sum(t.values()) for t in per_chunk]
        activations = interleaved_activation_peak(pp_rank, transformer.pipeline_model_parallel_size, vp_size,
                                                  num_microbatches, totals, microbatch_group_size)
        scale = activations / max(sum(totals), 1)
        activation_terms = {k: int(v * scale) for k, v in merged.items()}
    else:
        activation_terms = {k: v * in_flight for k, v in merged.items()}
        activations = sum(activation_terms.values())
    temporary_terms = temporary_bytes(transformer, micro_batch_size, seq_length, vocab_size, pp_rank=pp_rank,
                                      device_type=device_type, context_parallel_size=context_parallel_size,
                                      position_ids=position_ids, mamba_config=mamba_config)
    temporary = max(temporary_terms.values()) if temporary_terms else 0
    allocated = sum(state[k] for k in ("params", "grads", "main_params", "optimizer_states")) + activations + temporary
    return MemoryTerms(params=state["params"], grads=state["grads"], main_params=state["main_params"],
                       optimizer_states=state["optimizer_states"], activations=activations,
                       output_logits=activation_terms.get("output layer and loss", 0), temporary=temporary,
                       allocator_reserve=int(allocated * allocator_overhead_fraction), cuda_context=cuda_context_bytes,
                       num_parameters=state["num_parameters"], in_flight=in_flight,
                       activation_terms=activation_terms, temporary_terms=temporary_terms)


def estimate_memory(transformer, ddp, optimizer, *, vocab_size: int, micro_batch_size: int, seq_length: int,
                    num_microbatches: int, data_parallel_size: int = 1, context_parallel_size: int = 1,
                    device_type: str = "cuda", microbatch_group_size: Optional[int] = None,
                    allocator_overhead_fraction: float = 0.0, cuda_context_bytes: int = 0,
                    mamba_config=None) -> List[RankMemory]:
    """One estimate per distinct pipeline stage (tensor-parallel ranks of a stage are identical;
    with the distributed optimizer the data-parallel rank with the largest shard is shown).
    `mamba_config`: a hybrid Mamba model (MambaModel) with that MambaConfig."""
    results = []
    for pp_rank in range(transformer.pipeline_model_parallel_size):
        best = None
        dp_ranks = range(data_parallel_size) if ddp.use_distributed_optimizer else [0]
        for dp_rank in dp_ranks:
            terms = estimate_rank_memory(
                transformer, ddp, optimizer, vocab_size=vocab_size, micro_batch_size=micro_batch_size,
                seq_length=seq_length, num_microbatches=num_microbatches, data_parallel_size=data_parallel_size,
                pp_rank=pp_rank, dp_rank=dp_rank, context_parallel_size=context_parallel_size,
                device_type=device_type, microbatch_group_size=microbatch_group_size,
                allocator_overhead_fraction=allocator_overhead_fraction, cuda_context_bytes=cuda_context_bytes,
                mamba_config=mamba_config)
            if best is None or terms.total > best[1].total:
                best = (dp_rank, terms)
            if data_parallel_size > 8:
                break  # shards differ by at most one padding block; rank 0 is representative
        results.append(RankMemory(tp_rank=0, pp_rank=pp_rank, dp_rank=best[0], terms=best[1]))
    return results


def largest_micro_batch(device_bytes: int, transformer, ddp, optimizer, *, vocab_size: int, seq_length: int,
                        global_batch_size: int, data_parallel_size: int = 1, context_parallel_size: int = 1,
                        device_type: str = "cuda", allocator_overhead_fraction: float = 0.0,
                        cuda_context_bytes: int = 0, limit: int = 1024, mamba_config=None) -> Optional[int]:
    """The largest micro-batch size that divides the global batch (per data-parallel rank) and whose
    busiest rank fits in `device_bytes`; None if even 1 does not fit."""
    per_dp = global_batch_size // data_parallel_size
    best = None
    for mbs in range(1, min(limit, per_dp) + 1):
        if per_dp % mbs:
            continue
        num_microbatches = per_dp // mbs
        vp = transformer.virtual_pipeline_model_parallel_size
        if vp and vp > 1 and num_microbatches < transformer.pipeline_model_parallel_size:
            continue
        try:
            ranks = estimate_memory(transformer, ddp, optimizer, vocab_size=vocab_size, micro_batch_size=mbs,
                                    seq_length=seq_length, num_microbatches=num_microbatches,
                                    data_parallel_size=data_parallel_size, context_parallel_size=context_parallel_size,
                                    device_type=device_type, allocator_overhead_fraction=allocator_overhead_fraction,
                                    cuda_context_bytes=cuda_context_bytes, mamba_config=mamba_config)
        except ValueError:
            continue
        if max(r.terms.total for r in ranks) <= device_bytes:
            best = mbs
        else:
            break
    return best


# (column heading, legend, value) of the memory table; every value is in GiB.
_TABLE_COLUMNS = [
    ("params", "parameters", lambda t: t.params),
    ("grads", "gradients (the DDP buffer)", lambda t: t.grads),
    ("main", "fp32 main parameters", lambda t: t.main_params),
    ("optim", "optimizer states", lambda t: t.optimizer_states),
    ("activ", "activations kept for backward", lambda t: t.activations),
    ("(loss)", "of which the output layer and loss", lambda t: t.output_logits),
    ("temp", "temporary buffers (peak)", lambda t: t.temporary),
    ("=alloc", "peak allocated: params + grads + main + optim + activ + temp", lambda t: t.allocated),
    ("reserve", "caching allocator reserve", lambda t: t.allocator_reserve),
    ("context", "CUDA context", lambda t: t.cuda_context),
    ("=total", "alloc + reserve + context", lambda t: t.total),
]
_OVERHEAD_COLUMNS = ("reserve", "context", "=total")


def format_memory_table(ranks: List[RankMemory], *, tp_size: int = 1) -> str:
    """A text table, one row per pipeline stage, values in GiB, and a legend of the columns.

    Fits an 80-column terminal at any pipeline size (the caching-allocator reserve and CUDA context
    columns, shown only when one of them is set, widen it to at most 100 columns)."""
    columns = list(_TABLE_COLUMNS)
    if not any(r.terms.allocator_reserve or r.terms.cuda_context for r in ranks):
        columns = [c for c in columns if c[0] not in _OVERHEAD_COLUMNS]  # total == alloc
    head = ["stage", "params/rank", "flight"] + [name for name, _, _ in columns]
    rows = [[f"pp={r.pp_rank}", f"{r.terms.num_parameters / 1e6:.1f}M", str(r.terms.in_flight)]
            + [f"{get(r.terms) / GIB:.2f}" for _, _, get in columns] for r in ranks]
    widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]

    def line(cells):
        first = cells[0].ljust(widths[0])
        return (first + "".join(" " + c.rjust(w) for c, w in zip(cells[1:], widths[1:]))).rstrip()

    out = [line(head)] + [line(row) for row in rows]
    out.append(f"GiB per rank; the {tp_size} tensor-parallel rank(s) of a stage hold the same.")
    out.append("flight: micro-batches in flight; main: fp32 main params; optim: optimizer state;")
    out.append("activ: activations kept for backward, (loss): of them the output layer and loss;")
    out.append("temp: temporary buffers at their peak; =alloc: peak allocated, the sum of these")
    if columns[-1][0] == "=total":
        out.append("reserve: caching-allocator reserve; context: CUDA context; =total: alloc + both")
    return "\n".join(out)
