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

`maybe_gemv(x, weight, bias)` is F.linear through the Triton GEMV wherever it applies.

The same kernel, as `fused_gemv`, runs a whole one-row layer in four launches (the inference
engine's decode step, gigatron/core/inference/decode_step.py): LayerNorm/RMSNorm of x in the
prologue (every program reads the row once from L2 and reduces it, with a slice as wide as the
row, while its first weight tile is in flight), then bias, GeLU / SwiGLU / squared ReLU and the
residual add in the epilogue, rounding where the unfused layers round. With `pdl=True` on a
Hopper GPU the decode kernels are launched with programmatic dependent launch: a kernel's
programs start while the kernel before it finishes, request their weights, bias and norm weights
(nothing an earlier kernel wrote), and only then wait (griddepcontrol.wait) for the previous
kernel's output, so the ramp and tail of consecutive small kernels overlap (see pdl_supported).
No state is kept between calls: whoever calls an op says how it is launched.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from gigatron.core.ops.activations import FUSED_ACTIVATIONS

__all__ = ["gemv_available", "gemv_applies", "linear_one_row", "reference_linear_one_row", "maybe_gemv",
           "pdl_supported", "fused_gemv", "reference_fused_gemv", "ACT_CODES", "NORM_CODES"]


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


def pdl_supported(pdl: bool) -> bool:
    """Launch with programmatic dependent launch: asked for (`pdl`) and the GPU has it (compute
    capability 9.0 or later). Every decode kernel launched this way first requests what does not
    depend on the kernels before it (its first weight tile), then waits for them to complete
    (griddepcontrol.wait) before it reads anything they wrote and before it writes anything, so
    the overlap with the kernel before it is safe and transitive along a chain of such kernels; a
    kernel launched this way after an ordinary one simply starts when that one completes."""
    return pdl and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def maybe_gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
               pdl: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias), through the Triton GEMV where it applies (gemv_applies)."""
    if gemv_applies(x, weight) and x.shape[-1] == weight.shape[1]:
        return _gemv_op(x, weight, bias, pdl)
    return F.linear(x, weight, bias)


def reference_linear_one_row(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """The plain-PyTorch reference."""
    return F.linear(x, weight, bias)


NORM_CODES = {None: 0, "LayerNorm": 1, "RMSNorm": 2}
ACT_CODES = {None: 0, "gelu": 1, "gelu_tanh": 2, "swiglu": 3, "squared_relu": 4}  # names as in FUSED_ACTIVATIONS
_ACT_NAMES = {code: name for name, code in ACT_CODES.items()}


def _accumulators(act: int) -> int:
    """[BLOCK_N, BLOCK_K] fp32 accumulators a program keeps: two for SwiGLU's gate and up rows."""
    return 2 if act == ACT_CODES["swiglu"] else 1


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=stages)
               for bn in (1, 2, 4, 8, 16) for bk in (512, 1024, 2048, 4096, 8192) for w in (4, 8)
               for stages in (1, 2)
               if bn * bk <= 2048 * w]  # one fp32 accumulator: at most 64 registers per thread

    def prune(configs, named_args, **kwargs):
        """Keep tilings whose accumulators fit (at most 64 fp32 registers a thread; the loop keeps
        the next weight tile in flight too), no wider than the (power-of-two-rounded) row, and
        grids of at least 128 programs."""
        def get(name):
            return kwargs[name] if name in kwargs else named_args[name]

        k, n, accs = get("K"), get("N_OUT"), _accumulators(get("ACT"))
        width = triton.next_power_of_2(k)
        fits = [c for c in configs if accs * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 2048 * c.num_warps
                and c.kwargs["BLOCK_K"] <= max(width, 512)]
        kept = [c for c in fits if (n + c.kwargs["BLOCK_N"] - 1) // c.kwargs["BLOCK_N"] >= 128] or fits
        # With a norm, a slice as wide as the row keeps the row, its statistics and the norm's
        # weights in registers (one read of x, no second pass).
        whole_row = [c for c in kept if c.kwargs["BLOCK_K"] >= k]
        return whole_row if get("NORM") and whole_row else kept

    @triton.autotune(configs=configs, key=["N_OUT", "K", "NORM", "ACT", "HAS_RESIDUAL", "HAS_BIAS"],
                     prune_configs_by={"early_config_prune": prune})
    @triton.heuristics({"ONE_TILE": lambda args: args["BLOCK_K"] >= args["K"]})
    @triton.jit
    def gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, r_ptr, g_ptr, nb_ptr, N_OUT, K, eps, gamma_offset,
                    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, NORM_BIAS: tl.constexpr, ACT: tl.constexpr,
                    HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    ONE_TILE: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output features
        row_ok = rows < N_OUT
        cols = tl.arange(0, BLOCK_K)  # [BK]
        io_dtype = y_ptr.dtype.element_ty
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * K  # [BN, 1]
        w_up_rows = w_ptr + (rows.to(tl.int64) + N_OUT)[:, None] * K  # SwiGLU: up row N_OUT + j for gate row j
        # Everything that does not depend on the kernels before this one (the first weight tile,
        # the bias, the norm's weights) is requested first: under programmatic dependent launch
        # while the previous kernel finishes, and in any case while x (in L2, where the previous
        # kernel left it) is read and reduced. Inside the loop the next weight tile is always
        # requested before the current one is reduced.
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        col_ok = cols < K
        first_ok = row_ok[:, None] & col_ok[None, :]
        w_next = tl.load(w_rows + cols[None, :], mask=first_ok, other=0.0, eviction_policy="evict_first")
        if ACT == 3:
            w_up_next = tl.load(w_up_rows + cols[None, :], mask=first_ok, other=0.0, eviction_policy="evict_first")
        if HAS_BIAS:
            bias = tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            if ACT == 3:
                bias_up = tl.load(b_ptr + N_OUT + rows, mask=row_ok, other=0.0).to(tl.float32)
        if NORM != 0 and ONE_TILE:
            gamma_row = tl.load(g_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) + gamma_offset
            if NORM_BIAS:
                beta_row = tl.load(nb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if PDL:  # nothing the kernels before this one wrote is read (or written) above this line
            tl.extra.cuda.gdc_wait()
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if ACT == 3:
            acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if ONE_TILE:  # the whole row in one slice: x read once, the norm from registers
            x_row = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)  # [BK]
            if NORM != 0:  # the norm's output, rounded to the I/O dtype as the unfused norm rounds it
                mean = 0.0
                if NORM == 1:
                    mean = tl.sum(x_row, axis=0) / K
                centred = tl.where(col_ok, x_row - mean, 0.0)
                rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / K + eps)
                x_row = centred * rstd * gamma_row
                if NORM_BIAS:
                    x_row += beta_row
                x_row = tl.where(col_ok, x_row.to(io_dtype).to(tl.float32), 0.0)
            acc += w_next.to(tl.float32) * x_row[None, :]
            if ACT == 3:
                acc_up += w_up_next.to(tl.float32) * x_row[None, :]
        else:
            if NORM != 0:  # statistics of the row, in fp32, two passes (mean, then squared deviations)
                mean = 0.0
                if NORM == 1:
                    x_sum = tl.zeros((BLOCK_K,), dtype=tl.float32)
                    for k0 in range(0, K, BLOCK_K):
                        x_sum += tl.load(x_ptr + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
                    mean = tl.sum(x_sum, axis=0) / K
                x_squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    k = k0 + cols
                    centred = tl.where(k < K, tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32) - mean, 0.0)
                    x_squares += centred * centred
                rstd = 1.0 / tl.sqrt(tl.sum(x_squares, axis=0) / K + eps)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + cols
                k_ok = k < K
                w = w_next
                next_ok = row_ok[:, None] & (k + BLOCK_K < K)[None, :]
                w_next = tl.load(w_rows + (k + BLOCK_K)[None, :], mask=next_ok, other=0.0,
                                 eviction_policy="evict_first")
                if ACT == 3:
                    w_up = w_up_next
                    w_up_next = tl.load(w_up_rows + (k + BLOCK_K)[None, :], mask=next_ok, other=0.0,
                                        eviction_policy="evict_first")
                xk = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)  # [BK]
                if NORM != 0:
                    gamma = tl.load(g_ptr + k, mask=k_ok, other=0.0).to(tl.float32) + gamma_offset
                    xk = (xk - mean) * rstd * gamma
                    if NORM_BIAS:
                        xk += tl.load(nb_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
                    xk = tl.where(k_ok, xk.to(io_dtype).to(tl.float32), 0.0)
                acc += w.to(tl.float32) * xk[None, :]
                if ACT == 3:
                    acc_up += w_up.to(tl.float32) * xk[None, :]
        y = tl.sum(acc, axis=1)  # [BN]
        if ACT == 3:
            up = tl.sum(acc_up, axis=1)
        # Epilogue, rounding where the unfused layers round: a bias inside the GEMM (before the
        # rounding) except before a residual add, where the layer adds it to the rounded output.
        if HAS_BIAS and not HAS_RESIDUAL:
            y += bias
        y = y.to(io_dtype).to(tl.float32)
        if ACT == 3:  # output j = silu(gate j) * up j
            if HAS_BIAS:
                up += bias_up
            up = up.to(io_dtype).to(tl.float32)
            y = (y * tl.sigmoid(y)).to(io_dtype).to(tl.float32) * up
        elif ACT == 1:
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
        elif ACT == 2:
            inner = 0.7978845608028654 * (y + 0.044715 * y * y * y)
            y = 0.5 * y * (2.0 * tl.sigmoid(2.0 * inner))  # 1 + tanh(inner) = 2 sigmoid(2 inner)
        elif ACT == 4:
            y = tl.maximum(y, 0.0)
            y = y * y
        if HAS_RESIDUAL:
            if HAS_BIAS:
                y = (y + bias).to(io_dtype).to(tl.float32)
            y += tl.load(r_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(io_dtype), mask=row_ok)

    return gemv_kernel


def _launch(x_row, weight, bias, residual, norm_weight, norm_bias, y, n_out, eps, gamma_offset, norm, act, pdl):
    k = weight.shape[1]
    kernel = _kernel()

    def grid(meta):
        return ((n_out + meta["BLOCK_N"] - 1) // meta["BLOCK_N"],)

    dummy = weight  # never read: the constexpr flags switch those loads off
    pdl = pdl_supported(pdl)
    kernel[grid](x_row, weight, dummy if bias is None else bias, y, dummy if residual is None else residual,
                 dummy if norm_weight is None else norm_weight, dummy if norm_bias is None else norm_bias,
                 n_out, k, float(eps), float(gamma_offset), HAS_BIAS=bias is not None, NORM=norm,
                 NORM_BIAS=norm_bias is not None, ACT=act, HAS_RESIDUAL=residual is not None, PDL=pdl,
                 **({"launch_pdl": True} if pdl else {}))


@torch.library.custom_op("gigatron::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], pdl: bool = False) -> torch.Tensor:
    n, k = weight.shape
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    _launch(x.reshape(k).contiguous(), weight, bias, None, None, None, y, n, 0.0, 0.0, 0, 0, pdl)
    return y.reshape(*x.shape[:-1], n)


@_gemv_op.register_fake
def _gemv_fake(x, weight, bias, pdl=False):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _out_features(weight: torch.Tensor, act: int) -> int:
    return weight.shape[0] // 2 if act == ACT_CODES["swiglu"] else weight.shape[0]


def reference_fused_gemv(x, weight, bias, residual, norm_weight, norm_bias, norm: int, eps: float,
                         gamma_offset: float, act: int) -> torch.Tensor:
    """Plain PyTorch, rounding to x's dtype where the unfused layers do (the norm's output, the
    linear's output, each activation step, the bias add before a residual add)."""
    dtype = x.dtype
    if norm:
        xf = x.float()
        gamma = norm_weight.float() + gamma_offset
        if norm == NORM_CODES["LayerNorm"]:
            xf = F.layer_norm(xf, (xf.shape[-1],), gamma, None if norm_bias is None else norm_bias.float(), eps)
        else:
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * gamma
        x = xf.to(dtype)
    linear_bias = bias if residual is None else None
    y = F.linear(x, weight, linear_bias)
    if act:  # the MLP's own activation functions
        y = FUSED_ACTIVATIONS[_ACT_NAMES[act]](y)
    if residual is not None:
        if bias is not None:
            y = y + bias
        y = residual + y
    return y


@torch.library.custom_op("gigatron::fused_gemv", mutates_args=())
def _fused_gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   residual: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor],
                   norm_bias: Optional[torch.Tensor], norm: int, eps: float, gamma_offset: float,
                   act: int, pdl: bool = False) -> torch.Tensor:
    if not (gemv_available() and x.is_cuda):  # CPU: the same computation in plain PyTorch
        return reference_fused_gemv(x, weight, bias, residual, norm_weight, norm_bias, norm, eps, gamma_offset, act)
    k = weight.shape[1]
    n_out = _out_features(weight, act)
    y = torch.empty(n_out, dtype=x.dtype, device=x.device)
    _launch(x.reshape(k).contiguous(), weight, bias, None if residual is None else residual.reshape(n_out).contiguous(),
            norm_weight, norm_bias, y, n_out, eps, gamma_offset, norm, act, pdl)
    return y.reshape(*x.shape[:-1], n_out)


@_fused_gemv_op.register_fake
def _fused_gemv_fake(x, weight, bias, residual, norm_weight, norm_bias, norm, eps, gamma_offset, act, pdl=False):
    return x.new_empty(*x.shape[:-1], _out_features(weight, act))


def fused_gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
               norm: Optional[torch.nn.Module] = None, activation: Optional[str] = None,
               residual: Optional[torch.Tensor] = None, pdl: bool = False) -> torch.Tensor:
    """One-row linear layer with its neighbours fused in (one kernel on CUDA):

        y = residual + (act(norm(x) @ weight^T + bias))      [..., K] -> [..., N]

    norm: a gigatron LayerNorm / RMSNorm module applied to x first (its statistics are computed
    by every program in the prologue); activation: None, "gelu", "gelu_tanh", "squared_relu" or
    "swiglu" (weight [2F, K] = [gate; up] -> F outputs); residual [..., N]: added last, with the
    bias added to the rounded linear output before it (the unfused bias-dropout-add's order).
    On CUDA with Triton it needs `gemv_applies(x, weight)`; elsewhere it runs the same
    computation in plain PyTorch. pdl: launch with programmatic dependent launch where the GPU
    has it (pdl_supported)."""
    if activation not in ACT_CODES:
        raise ValueError(f"unknown activation {activation!r} for the fused GEMV; one of "
                         f"{', '.join(str(a) for a in ACT_CODES if a)}")
    if activation is not None and residual is not None:
        raise ValueError("the fused GEMV adds a residual only to a plain linear output (no activation)")
    norm_code, norm_weight, norm_bias, eps, offset = 0, None, None, 0.0, 0.0
    if norm is not None:
        kind = type(norm).__name__
        if kind not in NORM_CODES:
            raise ValueError(f"the fused GEMV folds in LayerNorm or RMSNorm, not {kind}")
        norm_code, norm_weight, norm_bias, eps = NORM_CODES[kind], norm.weight, norm.bias, norm.eps
        offset = 1.0 if norm.zero_centered_gamma else 0.0
    if x.is_cuda and not gemv_applies(x, weight):
        raise ValueError(f"the fused GEMV needs one bf16/fp16 CUDA row and a contiguous weight of the same dtype "
                         f"(got x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype})")
    return _fused_gemv_op(x, weight, bias, residual, norm_weight, norm_bias, norm_code, float(eps), offset,
                          ACT_CODES[activation], bool(pdl))


def linear_one_row(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                   pdl: bool = False) -> torch.Tensor:
    """x [..., K] holding one row, weight [N, K], bias [N] -> [..., N] (the Triton GEMV)."""
    if not gemv_applies(x, weight):
        raise ValueError(f"the Triton GEMV needs one bf16/fp16 CUDA row and a contiguous weight of the same dtype "
                         f"(got x {tuple(x.shape)} {x.dtype} on {x.device}, weight {tuple(weight.shape)} "
                         f"{weight.dtype}); use F.linear")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but the weight expects {weight.shape[1]}")
    return _gemv_op(x, weight, bias, bool(pdl))
