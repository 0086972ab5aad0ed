"""The MLP activation functions, and the names the fused decode GEMV knows them by.

The transformer MLP (gigatron/core/transformer/mlp.py) applies these functions; the fused GEMV
(gigatron/core/ops/gemv.py) folds the same ones into its epilogue and uses them as its reference,
so both import them from here (the ops never import the transformer layers).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["gelu", "openai_gelu", "squared_relu", "swiglu", "FUSED_ACTIVATIONS", "fused_activation_name"]


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GeLU, x * Phi(x) with the erf form (Megatron's default F.gelu)."""
    return F.gelu(x)


def openai_gelu(x: torch.Tensor) -> torch.Tensor:
    """GeLU's tanh approximation (--openai-gelu): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 (--squared-relu)."""
    return torch.pow(F.relu(x), 2)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with x = [gate, up] along the last dim: [..., 2f] -> [..., f]."""
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * up


# The activations the fused decode GEMV applies in its epilogue, by its name for them
# (gemv.ACT_CODES).
FUSED_ACTIVATIONS = {"gelu": gelu, "gelu_tanh": openai_gelu, "swiglu": swiglu, "squared_relu": squared_relu}


def fused_activation_name(activation: Callable) -> Optional[str]:
    """The fused GEMV's name for an MLP's activation function, or None if it does not fold it in."""
    return next((name for name, fn in FUSED_ACTIVATIONS.items() if fn is activation), None)
