"""LayerNorm and RMSNorm over the last dimension, with Megatron's zero-centered (1p) option.

With --apply-layernorm-1p the stored weight w starts at 0 and the layer scales by (1 + w), which
keeps weight decay pulling the scale towards 1 instead of 0. Both norms compute in fp32 and return
the weight's dtype, so an fp32 residual stream (--fp32-residual-connection) feeds bf16/fp16 GEMMs.
With sequence parallelism the parameters are tagged so their partial gradients are summed over the
tensor-parallel group.

With --persist-layer-norm (the default) a norm on a CUDA tensor runs as a fused Triton kernel
(gigatron/core/ops/fused_norm.py), and `add_and_norm` folds the residual add that precedes a
pre-norm into the same kernel; on the CPU, under torch.compile (which fuses these itself) or with
--no-persist-layer-norm, the PyTorch code below runs unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gigatron.core.ops.fused_norm import fused_add_norm, fused_norm_available
from gigatron.core.parallel import tags

__all__ = ["LayerNorm", "RMSNorm", "build_norm", "param_device"]


def param_device(config) -> torch.device:
    """Where parameters are created: the current CUDA device, or the CPU with
    --use-cpu-initialization or without CUDA (the same rule as the parallel layers)."""
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _ones(t: torch.Tensor) -> None:
    nn.init.ones_(t)


def _zeros(t: torch.Tensor) -> None:
    nn.init.zeros_(t)


class _Norm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, zero_centered_gamma: bool, with_bias: bool,
                 dtype: torch.dtype, device, sequence_parallel: bool, init_key: Optional[str],
                 persist: bool = False):
        super().__init__()
        self.hidden_size = hidden_size
        self.persist = persist  # --persist-layer-norm: the fused Triton kernels on CUDA
        self.eps = eps
        self.zero_centered_gamma = zero_centered_gamma
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device)) if with_bias else None
        weight_init = _zeros if zero_centered_gamma else _ones
        with torch.no_grad():
            weight_init(self.weight)
            if self.bias is not None:
                _zeros(self.bias)
        tags.set_init(self.weight, weight_init, None if init_key is None else init_key + ".weight")
        if self.bias is not None:
            tags.set_init(self.bias, _zeros, None if init_key is None else init_key + ".bias")
        for p in self.parameters():
            tags.set_tensor_parallel_attributes(p, False, -1, 1)
            if sequence_parallel:
                tags.mark_sequence_parallel(p)

    def _gamma(self) -> torch.Tensor:
        w = self.weight.float()
        return w + 1.0 if self.zero_centered_gamma else w

    def _fused(self, x: torch.Tensor) -> bool:
        return self.persist and fused_norm_available(x)

    def _fused_forward(self, x, residual, add_bias):
        return fused_add_norm(x, residual, add_bias, self.weight, self.bias, self.eps,
                              rms=isinstance(self, RMSNorm), zero_centered_gamma=self.zero_centered_gamma)

    def add_and_norm(self, x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor):
        """The residual add of a sub-layer's output and this norm: new = residual + (x + bias),
        returns (norm(new), new); x, residual [..., h]. One fused kernel on CUDA (see
        `uses_fused_add`); elsewhere the add and then forward(), exactly as unfused."""
        if self._fused(x):
            return self._fused_forward(x, residual, bias)
        if bias is not None:
            x = x + bias
        new = residual + x
        return self(new), new

    def uses_fused_add(self, x: torch.Tensor) -> bool:
        """Whether add_and_norm on `x` runs the fused kernel."""
        return self._fused(x)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, zero_centered_gamma={self.zero_centered_gamma}"


class LayerNorm(_Norm):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta over the last dim; [..., h] -> [..., h]."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, zero_centered_gamma: bool = False,
                 dtype: torch.dtype = torch.float32, device=None, sequence_parallel: bool = False,
                 init_key: Optional[str] = None, persist: bool = False):
        super().__init__(hidden_size, eps, zero_centered_gamma, True, dtype, device, sequence_parallel,
                         init_key, persist)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused(x):
            return self._fused_forward(x, None, None)[0]
        out_dtype = self.weight.dtype
        if x.dtype == out_dtype and not self.zero_centered_gamma:
            # F.layer_norm accumulates in fp32 internally for half inputs.
            return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)
        y = F.layer_norm(x.float(), (self.hidden_size,), self._gamma(), self.bias.float(), self.eps)
        return y.to(out_dtype)


class RMSNorm(_Norm):
    """y = x / sqrt(mean(x^2) + eps) * gamma over the last dim; [..., h] -> [..., h]."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, zero_centered_gamma: bool = False,
                 dtype: torch.dtype = torch.float32, device=None, sequence_parallel: bool = False,
                 init_key: Optional[str] = None, persist: bool = False):
        super().__init__(hidden_size, eps, zero_centered_gamma, False, dtype, device, sequence_parallel,
                         init_key, persist)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused(x):
            return self._fused_forward(x, None, None)[0]
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self._gamma()).to(self.weight.dtype)


def build_norm(config, hidden_size: int, groups=None, init_key: Optional[str] = None,
               sequence_parallel: Optional[bool] = None) -> _Norm:
    """The norm chosen by --normalization, in config.params_dtype, tagged for sequence parallelism
    when config.sequence_parallel (unless `sequence_parallel` overrides it), fused on CUDA with
    --persist-layer-norm."""
    cls = {"LayerNorm": LayerNorm, "RMSNorm": RMSNorm}[config.normalization]
    device = param_device(config)
    sp = config.sequence_parallel if sequence_parallel is None else sequence_parallel
    return cls(hidden_size, eps=config.norm_epsilon, zero_centered_gamma=config.apply_layernorm_1p,
               dtype=config.params_dtype, device=device, sequence_parallel=sp, init_key=init_key,
               persist=getattr(config, "persist_layer_norm", False))
