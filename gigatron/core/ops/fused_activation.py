"""Bias + GeLU and bias + SwiGLU fused into one pass forward and one backward (--bias-gelu-fusion,
--bias-swiglu-fusion).

Shape legend: M = tokens, F = ffn / tp (the activation's output width).

The MLP's linear_fc1 then returns its bias unapplied (as Megatron's fused path does) and
`fused_bias_activation(x, bias, kind)` adds it inside the activation kernel: one read of x and one
write of y forward, one read of x and dy and one write of dx backward (the unfused eager path
makes two to five passes). The kernels (Triton) run on CUDA only; `reference_bias_activation` is
the same computation in plain PyTorch (the test oracle and the path everywhere else).
"""

from __future__ import annotations

from typing import Optional

import torch

from gigatron.core.ops.activations import gelu, openai_gelu, swiglu

__all__ = ["fused_bias_activation", "reference_bias_activation", "fused_activation_available",
           "FUSED_BIAS_ACTIVATIONS"]

FUSED_BIAS_ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu")


def fused_activation_available(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on `x` (CUDA, Triton installed, not inside torch.compile,
    which fuses the bias and the activation itself)."""
    if not x.is_cuda or torch.compiler.is_compiling() or x.numel() == 0:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class _FusedBiasActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, kind):
        from gigatron.core.ops import fused_activation_triton as k

        ctx.save_for_backward(x, bias)
        ctx.kind = kind
        if kind == "swiglu":
            return k.swiglu_forward(x, bias)
        return k.gelu_forward(x, bias, tanh=kind == "gelu_tanh")

    @staticmethod
    def backward(ctx, dy):
        from gigatron.core.ops import fused_activation_triton as k

        x, bias = ctx.saved_tensors
        dy = dy.contiguous()
        if ctx.kind == "swiglu":
            dx = k.swiglu_backward(dy, x, bias)
        else:
            dx = k.gelu_backward(dy, x, bias, tanh=ctx.kind == "gelu_tanh")
        dbias = dx.sum(0, dtype=torch.float32).to(bias.dtype) if bias is not None and ctx.needs_input_grad[1] else None
        return dx, dbias, None


def fused_bias_activation(x: torch.Tensor, bias: Optional[torch.Tensor], kind: str) -> torch.Tensor:
    """Triton: activation(x + bias) for kind gelu (erf), gelu_tanh (--openai-gelu) or swiglu
    ([..., 2F] -> [..., F]); x [..., W], bias [W] or None. CUDA only (fused_activation_available)."""
    if kind not in FUSED_BIAS_ACTIVATIONS:
        raise ValueError(f"no fused kernel for activation {kind!r}; choose from {FUSED_BIAS_ACTIVATIONS}")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()  # [M, W]
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    y = _FusedBiasActivation.apply(x2, bias, kind)  # [M, W or W/2]
    return y.view(*shape[:-1], y.shape[-1])


_REFERENCE = {"gelu": gelu, "gelu_tanh": openai_gelu, "swiglu": swiglu}


def reference_bias_activation(x: torch.Tensor, bias: Optional[torch.Tensor], kind: str) -> torch.Tensor:
    """Plain PyTorch: activation(x + bias), computed in fp32 and returned in x's dtype."""
    z = x.float() if bias is None else x.float() + bias.float()
    return _REFERENCE[kind](z).to(x.dtype)
