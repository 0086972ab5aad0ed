"""Matrix-vector product for one-token decode steps (Triton), with F.linear as the reference.

Shape legend: K = input features, N = output features (weight [N, K], row-major as nn.Linear).

A decode step at batch 1 multiplies one row x [1, K] by every weight matrix: pure streaming of
the weight from HBM. cuBLAS picks GEMM tilings for these shapes that reach roughly 55-70% of the
bandwidth on an H200 for the 8-34 MB matrices of a 1.3B GPT. `gemv` instead gives each program
BLOCK_N whole rows of the weight and walks them in BLOCK_K slices: every load is a wide,
coalesced read of contiguous weight bytes, the products are summed in fp32 in registers, and no
split-K reduction pass is needed. The tiling is autotuned per (N, K) on first use.

    linear_one_row(x [..., K], weight [N, K], bias [N] | None) -> [..., N]

runs the Triton kernel when `gemv_applies(x, weight)` (CUDA, Triton importable, x holds a single
row, bf16/fp16, contiguous weight, no gradient needed) and F.linear otherwise. It is registered as
the custom op gigatron::gemv so that torch.compile treats it as one opaque kernel, and a CUDA
graph captures it like any other launch (autotuning must have run before the capture: the
inference engine's warm-up forwards do that).

`decode_gemv(enabled)` is the switch the inference engine turns on around its decode steps; the
linear layers call `maybe_gemv` which falls back to F.linear whenever it is off.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["gemv_available", "gemv_applies", "linear_one_row", "reference_linear_one_row", "decode_gemv",
           "maybe_gemv"]

_ENABLED = False


_AVAILABLE: Optional[bool] = None


def gemv_available() -> bool:
    """Triton is importable and a CUDA device is present (checked once; a plain global rather than
    an lru_cache, which torch.compile would trace through with a warning)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _AVAILABLE = torch.cuda.is_available()
        except ImportError:
            _AVAILABLE = False
    return _AVAILABLE


def gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The Triton path handles this call (otherwise F.linear does)."""
    return (x.is_cuda and weight.is_cuda and x.dtype == weight.dtype and weight.dtype in (torch.bfloat16, torch.float16)
            and x.numel() == x.shape[-1] and weight.dim() == 2 and weight.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and gemv_available())


@contextlib.contextmanager
def decode_gemv(enabled: bool = True):
    """Route one-row linear layers through the Triton GEMV inside this block (the inference
    engine's decode steps). Read when a layer runs, so a CUDA graph captured inside the block
    replays the kernel."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(enabled)
    try:
        yield
    finally:
        _ENABLED = previous


def maybe_gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the Triton GEMV when decode_gemv is on and it applies."""
    if _ENABLED and gemv_applies(x, weight) and x.shape[-1] == weight.shape[1]:
        return _gemv_op(x, weight, bias)
    return F.linear(x, weight, bias)


def reference_linear_one_row(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """The plain-PyTorch reference."""
    return F.linear(x, weight, bias)


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=stages)
               for bn in (1, 2, 4, 8, 16) for bk in (512, 1024, 2048, 4096, 8192) for w in (4, 8)
               for stages in (1, 2)
               if bn * bk <= 2048 * w]  # the fp32 accumulator: at most 64 registers per thread

    def prune(configs, named_args, **kwargs):
        """Drop slices wider than the (power-of-two-rounded) row and grids with too few programs."""
        k, n = named_args["K"], named_args["N"]
        width = triton.next_power_of_2(k)
        kept = [c for c in configs if c.kwargs["BLOCK_K"] <= width
                and (n + c.kwargs["BLOCK_N"] - 1) // c.kwargs["BLOCK_N"] >= 128]
        return kept or configs

    @triton.autotune(configs=configs, key=["N", "K"], prune_configs_by={"early_config_prune": prune})
    @triton.jit
    def gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, HAS_BIAS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        row_ok = rows < N
        cols = tl.arange(0, BLOCK_K)  # [BK]
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * K  # [BN, 1]
        for k0 in range(0, K, BLOCK_K):
            k = k0 + cols
            k_ok = k < K
            xk = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)  # [BK]
            w = tl.load(w_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0,
                        eviction_policy="evict_first")  # [BN, BK]
            acc += w.to(tl.float32) * xk[None, :]
        y = tl.sum(acc, axis=1)  # [BN]
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    return gemv_kernel


@torch.library.custom_op("gigatron::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    n, k = weight.shape
    x_row = x.reshape(k).contiguous()
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    kernel = _kernel()

    def grid(meta):
        return ((n + meta["BLOCK_N"] - 1) // meta["BLOCK_N"],)

    kernel[grid](x_row, weight, bias if bias is not None else weight, y, n, k, HAS_BIAS=bias is not None)
    return y.reshape(*x.shape[:-1], n)


@_gemv_op.register_fake
def _gemv_fake(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def linear_one_row(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] holding one row, weight [N, K], bias [N] -> [..., N] (the Triton GEMV)."""
    if not gemv_applies(x, weight):
        raise ValueError(f"the Triton GEMV needs one bf16/fp16 CUDA row and a contiguous weight of the same dtype "
                         f"(got x {tuple(x.shape)} {x.dtype} on {x.device}, weight {tuple(weight.shape)} "
                         f"{weight.dtype}); use F.linear")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but the weight expects {weight.shape[1]}")
    return _gemv_op(x, weight, bias)
