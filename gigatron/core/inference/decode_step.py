"""The inference engine's decode step: one new token per row through a GPTModel's weights, with
the Triton decode kernels of gigatron/core/ops.

Shape legend: b = rows, h = hidden, Vp = padded vocabulary, tp = tensor-parallel size,
kv_len = the step's attention length.

    step = DecodeStep(model, DecodeKernels())
    logits = step(input_ids [b, 1], position_ids [b, 1], attention_mask [b, 1, 1, kv_len],
                  inference_context=ctx)                                  # [1, b, Vp/tp]

computes what `model(input_ids, position_ids, attention_mask, inference_context=ctx)` computes,
with the same operations in the same order and the same roundings, but walks the model's
embedding, layers and output layer itself and picks, per call, the decode kernels:
- a step of one row (b = 1) runs each dense layer (tp = 1, pre-norm residual, an activation the
  fused GEMV knows) as four fused GEMVs (gigatron/core/ops/gemv.py: the norm in the prologue,
  bias, activation and residual add in the epilogue) around the decode-attention kernel: 5
  kernels a layer instead of about 12; the final norm runs inside the output layer's GEMV
  (`DecodeKernels.fused`);
- elsewhere every one-row linear layer runs the plain Triton GEMV (`DecodeKernels.gemv`), and a
  step whose rows x heads do not fill the GPU attends through the decode-attention kernel, which
  also writes the new key/value into the cache (gigatron/core/ops/decode_attention.py,
  `decode_attention_preferred`; `DecodeKernels.attention`; the continuous batch's step attends
  through it at every batch size, `DecodeKernels.attention_every_batch`); MoE layers run their
  own MLP module;
- multi-latent attention layers (--multi-latent-attention) run MLASelfAttention's own forward with
  the latent cache (transformer/mla.py: the absorbed form for one new token per row), their MLPs as
  above;
- with `DecodeKernels.pdl`, on GPUs that have it (Hopper and later), those kernels are launched
  with programmatic dependent launch (gemv.pdl_supported): each streams its weights while the
  kernel before it finishes.
On CPU (or where a kernel does not apply) the ops run their plain-PyTorch references.

The model's layers keep their ordinary forward and carry no inference switch; this module is the
only caller of the decode kernels. The engine runs it inside its captured decode steps (CUDA
graphs, optionally compiled first; gigatron/core/inference/engine.py).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from gigatron.core.ops.activations import fused_activation_name
from gigatron.core.ops.decode_attention import decode_attention_preferred
from gigatron.core.ops.gemv import NORM_CODES, fused_gemv, gemv_applies, maybe_gemv
from gigatron.core.ops.skinny_gemm import skinny_applies, skinny_linear
from gigatron.core.parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    scatter_to_tensor_parallel_region,
)
from gigatron.core.transformer.attention import check_attention_backend
from gigatron.core.transformer.layer import bias_dropout_add
from gigatron.core.transformer.mla import MLASelfAttention

__all__ = ["DecodeKernels", "DecodeStep"]


@dataclasses.dataclass(frozen=True)
class DecodeKernels:
    """Which Triton decode kernels the engine's captured decode steps use (CUDA only). All of them
    by default; benchmarks switch them off one at a time to measure what each gives."""
    gemv: bool = True
    """One-row linear layers through the Triton GEMV; False keeps cuBLAS and SDPA (the step is
    then the model's own forward) and switches off the kernels below."""
    fused: bool = True
    """One-row layers as four fused GEMVs around the decode-attention kernel, and the final norm
    inside the output layer's GEMV; False keeps one plain GEMV per linear layer."""
    attention: bool = True
    """Steps whose rows x heads do not fill the GPU attend through the decode-attention kernel
    (False: SDPA, and no fused one-row layers, which attend only through it)."""
    pdl: bool = True
    """Launch the decode kernels with programmatic dependent launch on GPUs that have it."""
    skinny: bool = False
    """Linear layers of 2 to 16 rows through the Triton few-row kernel
    (gigatron/core/ops/skinny_gemm.py) instead of cuBLAS."""
    attention_every_batch: bool = False
    """Attend through the decode-attention kernel at every batch size, not only where rows x heads
    leave the GPU idle: the continuous batch's step (continuous.py), whose rows have different
    lengths and must each read only their own valid slots of a cache of the full length."""


def _fusable_activation(layer) -> Optional[str]:
    """The fused GEMV's name for a layer's MLP activation when the layer can run as four fused
    GEMVs at all (a dense MLP, tp = 1, the residual taken before the norms); None otherwise."""
    cfg = layer.config
    if (layer.is_moe or cfg.tensor_model_parallel_size != 1 or cfg.apply_residual_connection_post_layernorm
            or isinstance(layer.self_attention, MLASelfAttention)):
        return None
    return fused_activation_name(getattr(layer.mlp, "activation", None))


class DecodeStep:
    """A decode step built from a GPTModel (one pipeline stage holding every layer, no sequence
    parallelism, no context parallelism) and the kernels to use; see the module docstring.

    __call__(input_ids [b, s], position_ids [b, s], attention_mask [b, 1, s, kv_len],
             inference_context) -> logits [s, b, Vp/tp] (or [1, 1, Vp] from the fused head)
    (the one-row kernels apply where s = 1; the caller sets the context's positions first)."""

    def __init__(self, model, kernels: DecodeKernels = DecodeKernels()):
        if not (model.pre_process and model.post_process):
            raise ValueError("the decode step needs the whole model on this rank (--pipeline-model-parallel-size 1)")
        if getattr(model, "sequence_parallel", False) or model.groups.cp.size != 1:
            raise ValueError("the decode step runs without --sequence-parallel and --context-parallel-size 1")
        self.model = model
        self.kernels = kernels
        self.gemv = bool(kernels.gemv)
        self.fused = self.gemv and bool(kernels.fused)
        self.attention = self.gemv and bool(kernels.attention)
        self.pdl = self.gemv and bool(kernels.pdl)
        self.attention_every_batch = self.attention and bool(kernels.attention_every_batch)
        self.skinny = self.gemv and bool(kernels.skinny)
        self.fused_activations = [_fusable_activation(layer) for layer in model.decoder.layers]
        norm = model.decoder.final_layernorm
        self.fusable_head = (norm is not None and type(norm).__name__ in NORM_CODES and model.groups.tp.size == 1)

    # ------------------------------------------------------------------ which kernels apply
    def _one_row(self, hidden: torch.Tensor, weight: torch.Tensor) -> bool:
        """hidden [1, 1, K] (one token of one row) can go through fused_gemv with this weight."""
        return (self.fused and hidden.shape[:2] == (1, 1) and hidden.dtype == weight.dtype
                and (not hidden.is_cuda or gemv_applies(hidden, weight)))

    def _attention_kernel(self, attention, s: int, b: int) -> bool:
        """A step of s = 1 new token per row attends through the decode-attention kernel."""
        if attention.core_attention.window_size is not None:  # the kernel attends the whole cache
            return False
        return self.attention and s == 1 and (self.attention_every_batch
                                              or decode_attention_preferred(b, attention.num_heads))

    # ------------------------------------------------------------------ the parallel linear layers
    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.skinny and skinny_applies(x, weight):
            return skinny_linear(x, weight, bias)
        if self.gemv:
            return maybe_gemv(x, weight, bias, pdl=self.pdl)
        return F.linear(x, weight, bias)

    def _column(self, linear, x: torch.Tensor, weight: Optional[torch.Tensor] = None):
        """ColumnParallelLinear.forward (no sequence parallelism) with the one-row GEMV."""
        weight = linear.weight if weight is None else weight
        bias = None if linear.skip_bias_add else linear.bias
        y = self._linear(copy_to_tensor_parallel_region(x, linear.tp), weight, bias)  # [s, b, out/tp]
        if linear.gather_output:
            y = gather_from_tensor_parallel_region(y, linear.tp)  # [s, b, out]
        return y, (linear.bias if linear.skip_bias_add else None)

    def _row(self, linear, x: torch.Tensor):
        """RowParallelLinear.forward (no sequence parallelism) with the one-row GEMV."""
        if not linear.input_is_parallel:
            x = scatter_to_tensor_parallel_region(x, linear.tp)  # [s, b, in/tp]
        y = reduce_from_tensor_parallel_region(self._linear(x, linear.weight), linear.tp)  # [s, b, out]
        if linear.skip_bias_add:
            return y, linear.bias
        if linear.bias is not None:
            y = y + linear.bias
        return y, None

    # ------------------------------------------------------------------ a layer
    def _fused_layer(self, layer, activation: str, hidden: torch.Tensor, rotary, ctx) -> torch.Tensor:
        """One token of one row [1, 1, h] through a layer in four fused GEMVs and the attention
        kernel; the roundings of TransformerLayer.forward."""
        attention, mlp = layer.self_attention, layer.mlp
        mixed = fused_gemv(hidden, attention.linear_qkv.weight, attention.linear_qkv.bias,
                           norm=layer.input_layernorm, pdl=self.pdl)  # [1, 1, ng*(hpg+2)*d]
        q, k, v = attention.query_key_value(mixed, rotary)
        context = ctx.attend(attention.layer_number, q, k, v, attention.core_attention.scale, pdl=self.pdl)  # [1, 1, nq*d]
        hidden = fused_gemv(context, attention.linear_proj.weight, attention.linear_proj.bias, residual=hidden,
                            pdl=self.pdl)
        intermediate = fused_gemv(hidden, mlp.linear_fc1.weight, mlp.linear_fc1.bias, norm=layer.pre_mlp_layernorm,
                                  activation=activation, pdl=self.pdl)  # [1, 1, f]
        return fused_gemv(intermediate, mlp.linear_fc2.weight, mlp.linear_fc2.bias, residual=hidden, pdl=self.pdl)

    def _self_attention(self, attention, x: torch.Tensor, mask, rotary, ctx):
        """SelfAttention.forward with the cache: -> (out [s, b, h], linear_proj bias or None)."""
        if isinstance(attention, MLASelfAttention):  # its own forward with the latent cache
            return attention(x, mask, rotary, inference_context=ctx)
        mixed, _ = self._column(attention.linear_qkv, x)  # [s, b, ng*(hpg+2)*d]
        q, k, v = attention.query_key_value(mixed, rotary)
        if self._attention_kernel(attention, q.shape[0], q.shape[1]):
            context = ctx.attend(attention.layer_number, q, k, v, attention.core_attention.scale,
                                 pdl=self.pdl)  # [1, b, nq*d]
        else:
            k, v = ctx.store(attention.layer_number, k, v)  # [kv_len, b, ng, d] each
            context = attention.core_attention(q, k, v, mask, window_in_mask=True)  # [s, b, nq*d]
        return self._row(attention.linear_proj, context)

    def _mlp(self, layer, x: torch.Tensor):
        """MLP.forward: -> (out [s, b, h], linear_fc2 bias or None); an MoE layer's MLP runs its
        own forward."""
        mlp = layer.mlp
        if layer.is_moe:
            return mlp(x)
        intermediate, fc1_bias = self._column(mlp.linear_fc1, x)  # [s, b, f/tp]
        if fc1_bias is not None:  # --bias-gelu-fusion / --bias-swiglu-fusion: fc1 skips its bias
            intermediate = intermediate + fc1_bias
        return self._row(mlp.linear_fc2, mlp.activation(intermediate))

    def _layer(self, layer, activation: Optional[str], hidden: torch.Tensor, mask, rotary, ctx) -> torch.Tensor:
        """TransformerLayer.forward in eval mode (no dropout, no recomputation)."""
        attention = layer.self_attention
        if (activation is not None and self._one_row(hidden, attention.linear_qkv.weight)
                and self._attention_kernel(attention, 1, 1)):
            return self._fused_layer(layer, activation, hidden, rotary, ctx)
        post_norm_residual = layer.config.apply_residual_connection_post_layernorm
        normed = layer.input_layernorm(hidden)
        out, bias = self._self_attention(attention, normed, mask, rotary, ctx)
        hidden = bias_dropout_add(out, bias, normed if post_norm_residual else hidden, 0.0, False)
        normed = layer.pre_mlp_layernorm(hidden)
        out, bias = self._mlp(layer, normed)
        return bias_dropout_add(out, bias, normed if post_norm_residual else hidden, 0.0, False)

    # ------------------------------------------------------------------ the step
    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                 inference_context) -> torch.Tensor:
        model = self.model
        if model.training:
            raise RuntimeError("the decode step runs a model in eval mode; call model.eval() first")
        config = model.config
        hidden = model.embedding(input_ids, position_ids)  # [s, b, h]
        rotary = None
        if model.rotary_pos_emb is not None:
            rotary = model.rotary_pos_emb(input_ids.shape[1], position_ids)  # [s, b, 1, r]
        if model.decoder.num_local_layers and not torch.compiler.is_compiling():
            # Layers that attend through SDPA: fail before any work if the backend cannot run here.
            check_attention_backend(config, hidden.device, config.params_dtype, attention_mask is not None, False)
        for layer, activation in zip(model.decoder.layers, self.fused_activations):
            hidden = self._layer(layer, activation, hidden, attention_mask, rotary, inference_context)
        norm = model.decoder.final_layernorm
        weight = model.output_weight()
        if self.fusable_head and self._one_row(hidden, weight):
            return fused_gemv(hidden, weight, None, norm=norm, pdl=self.pdl)  # [1, 1, Vp]
        if norm is not None:
            hidden = norm(hidden)
        logits, _ = self._column(model.output_layer, hidden, weight)  # [s, b, Vp/tp]
        return logits
