"""Linear layers of a few rows (decode steps of 2 to 16 sequences), Triton, with F.linear as the
reference.

Shape legend: M = rows (2 <= M <= 16), K = input features, N = output features (weight [N, K],
row-major as nn.Linear).

A decode step of M sequences multiplies M rows by every weight matrix: still a stream of the
weight from HBM, as at one row (gemv.py), but cuBLAS's GEMM tilings for M <= 16 leave much of the
bandwidth unused on the 4-34 MB matrices of a 1.3B GPT. `skinny_linear` gives each program
BLOCK_N whole rows of the weight (output features) and walks them in BLOCK_K slices; each slice
is multiplied with the matching slice of all M rows of x (padded to 16 for the tensor cores) and
summed in fp32, so every weight byte is read once, in wide coalesced loads, with no split-K pass.
The tiling is autotuned per (M, N, K) on first use (before a CUDA graph captures it: the inference
engine's warm-up forwards do that).

    skinny_linear(x [..., K] with M rows, weight [N, K], bias [N] | None) -> [..., N]

runs the kernel where `skinny_applies(x, weight)` (CUDA, Triton importable, 2..16 rows, bf16 or
fp16, a contiguous weight, no gradient needed) and F.linear otherwise. It is the custom op
gigatron::skinny_linear, so that torch.compile keeps it as one kernel.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from gigatron.core.ops.gemv import gemv_available

__all__ = ["skinny_linear", "skinny_applies", "MAX_ROWS"]

MAX_ROWS = 16
"""The most rows the kernel takes (one tensor-core tile of x)."""


def skinny_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The Triton path handles this call (otherwise F.linear does)."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (x.is_cuda and weight.is_cuda and x.dtype == weight.dtype and weight.dtype in (torch.bfloat16, torch.float16)
            and 2 <= rows <= MAX_ROWS and weight.dim() == 2 and weight.is_contiguous()
            and x.shape[-1] == weight.shape[1]
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and gemv_available())


@functools.lru_cache(maxsize=None)
def _kernel(autotune: bool = True):
    import triton
    import triton.language as tl

    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=stages)
               for bn in (16, 32, 64) for bk in (64, 128, 256, 512) for w in (4, 8) for stages in (3, 4)
               if bn * bk * 2 * stages <= 160 * 1024]  # the weight tiles in flight fit shared memory

    def prune(configs, named_args, **kwargs):
        """Keep tilings no wider than the (power-of-two-rounded) row and, where there are any,
        grids of at least 128 programs (a large GPU has 132 SMs)."""
        def get(name):
            return kwargs[name] if name in kwargs else named_args[name]

        k, n = get("K"), get("N")
        width = max(triton.next_power_of_2(k), 64)
        fits = [c for c in configs if c.kwargs["BLOCK_K"] <= width] or configs
        return [c for c in fits if (n + c.kwargs["BLOCK_N"] - 1) // c.kwargs["BLOCK_N"] >= 128] or fits

    def skinny_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_x, stride_y, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output features: rows of the weight
        rows = tl.arange(0, BLOCK_M)  # [BM] rows of x
        col_ok = cols < N
        row_ok = rows < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * K + k[None, :], mask=col_ok[:, None] & k_ok[None, :],
                        other=0.0)  # [BN, BK]
            x = tl.load(x_ptr + rows[:, None] * stride_x + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)  # [BM, BK]
            acc += tl.dot(x, tl.trans(w))  # [BM, BN]
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    if not autotune:  # one fixed tiling (tests on CPU through Triton's interpreter)
        return triton.jit(skinny_kernel)
    return triton.autotune(configs=configs, key=["M", "N", "K", "HAS_BIAS"],
                           prune_configs_by={"early_config_prune": prune})(triton.jit(skinny_kernel))


def _launch(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], y: torch.Tensor,
            tiling: Optional[tuple] = None) -> None:
    """x2 [M, K] (unit stride along K), weight [N, K] -> y [M, N]; `tiling` (BLOCK_N, BLOCK_K)
    fixes the tiling instead of autotuning."""
    m, k = x2.shape
    n = weight.shape[0]
    common = (x2, weight, weight if bias is None else bias, y, m, n, k, x2.stride(0), y.stride(0))
    if tiling is None:
        kernel = _kernel(True)
        kernel[lambda meta: ((n + meta["BLOCK_N"] - 1) // meta["BLOCK_N"],)](
            *common, HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS)
    else:
        block_n, block_k = tiling
        _kernel(False)[((n + block_n - 1) // block_n,)](*common, HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS,
                                                         BLOCK_N=block_n, BLOCK_K=block_k)


@torch.library.custom_op("gigatron::skinny_linear", mutates_args=())
def _skinny_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    _launch(x2, weight, bias, y)
    return y.reshape(*x.shape[:-1], n)


@_skinny_op.register_fake
def _skinny_fake(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the Triton kernel where skinny_applies."""
    if skinny_applies(x, weight):
        return _skinny_op(x, weight, bias)
    return F.linear(x, weight, bias)
