"""FP8 grouped GEMM for the routed experts of a GroupedMLP (--moe-grouped-gemm).

Shape legend: N = rows routed to this rank's experts, sorted by local expert; G = local experts;
K = input features, M = output features; n_g = rows of expert g (tokens_per_expert[g]).

    fp8_grouped_mm(x [N, K], w [G, K, M], tokens_per_expert [G], recipe, history, scale) -> [N, M]
    (gigatron.core.fp8.linear; the tensorwise and delayed GEMMs are `scaled_fp8_grouped_mm` here)
    rows of expert g:  y_g [n_g, M] = x_g [n_g, K] . w[g] [K, M]
    dgrad:             dx_g [n_g, K] = dy_g [n_g, M] . w[g]^T [M, K]
    wgrad:             dw[g] [K, M]  = x_g^T [K, n_g] . dy_g [n_g, M]

Scaling (tensorwise and delayed): every expert is its own "tensor", as each expert of a
SequentialMLP is its own linear: expert g's rows x_g, its weight w[g] and its output gradient dy_g
each get one scale, from their current amax (tensorwise) or from expert g's amax history (delayed;
`history` [G, L, 3] and `scale` [G, 3], one FP8LinearState per expert viewing row g of them, named
by the global expert number). The per-expert amaxes are taken on the device (one row amax per token,
then a scatter-max by expert): no host synchronisation.

Format: `torch._scaled_grouped_mm` (Hopper's grouped FP8 GEMM in PyTorch) takes E4M3 operands only,
so the grouped experts cast activations, weights and gradients to E4M3 under both --fp8-format
values (hybrid's E5M2 gradients have no grouped kernel; per-expert current or delayed scaling keeps
the gradients inside E4M3's range).

Backends (`FP8Recipe.grouped_backend`, chosen once by `scaled_grouped_mm_works` when the model is
built):
- "scaled_grouped_mm" (Hopper): the three GEMMs are `torch._scaled_grouped_mm` calls (2D x 3D for
  forward and dgrad, 2D x 2D with per-expert groups along the contraction dim for wgrad), the
  per-expert scales passed as rowwise float32 factors (a scalar per expert repeated over its rows /
  columns). Each expert's rows are first placed at a multiple of 16 (zero rows between experts:
  the FP8 kernel needs 16-byte aligned group starts along the contraction dim of wgrad); outputs
  come in bf16.
- "emulate" (CPU, older cards, dims not multiples of 16): the same FP8 values and scales,
  dequantized, multiplied expert by expert (fp32 on the CPU, bf16 on CUDA). This is the reference
  the kernel path is tested against, and it runs the quantization (scales, saturation, amax
  recording) on the CPU exactly as on the GPU.

Blockwise (1x128 / 128x128): PyTorch has no grouped kernel for DeepSeek-V3's block scales on
Hopper, so each expert runs `fp8_linear` with the blockwise recipe (per-expert GEMMs, the
dequantized product wherever an expert's token count is not a whole number of 128-row tiles):
FP8 numerics, not FP8 speed.

Saved for backward: the FP8 rows (x in its own dtype with --no-fp8-wgrad) and the FP8 weights.
The weight gradient comes back in the weight's dtype (the kernel writes bf16).
"""

from __future__ import annotations

from typing import Optional

import torch

from .casting import E4M3, FP8_MAX, saturating_cast, scale_from_amax
from .state import GRAD_OUTPUT, INPUT, NUM_KINDS, WEIGHT, FP8LinearState

__all__ = ["GROUPED_DTYPE", "GROUP_ALIGN", "scaled_fp8_grouped_mm", "scaled_grouped_mm_works", "expert_amax",
           "adopt_expert_state", "grouped_experts_note", "kernel_shapes_ok"]

# The FP8 format of every operand of the grouped experts (the grouped kernel's only format).
GROUPED_DTYPE = E4M3
# Row alignment of each expert's group in the kernel path (16 bytes of FP8).
GROUP_ALIGN = 16


# ---------------------------------------------------------------------- scales
def expert_amax(x: torch.Tensor, row_expert: torch.Tensor, groups: int) -> torch.Tensor:
    """[G] fp32: max |x| over the rows of each expert (0 for an expert without rows). x [N, K],
    row_expert [N] (the local expert of each row)."""
    out = torch.zeros(groups, dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return out
    low, high = torch.aminmax(x, dim=1)  # [N]
    rows = torch.maximum(low.neg(), high).float()
    return out.scatter_reduce(0, row_expert, rows, reduce="amax", include_self=True)


def _weight_amax(w: torch.Tensor) -> torch.Tensor:
    """[G] fp32: max |w[g]| of each expert's weight."""
    low, high = torch.aminmax(w.reshape(w.shape[0], -1), dim=1)
    return torch.maximum(low.neg(), high).float()


def _record(history: torch.Tensor, kind: int, amaxes: torch.Tensor) -> None:
    """history[g, 0, kind] = max(history[g, 0, kind], amaxes[g]) for every expert, in place."""
    row = history[:, 0, kind]
    row.copy_(torch.maximum(row, amaxes))


def adopt_expert_state(history: torch.Tensor, scale: torch.Tensor, index: int, state: FP8LinearState) -> None:
    """Make `state` (one expert's FP8LinearState) a view of row `index` of the stacked delayed-scaling
    tensors of a GroupedMLP (history [G, L, 3], scale [G, 3]), keeping its values, so that the
    grouped GEMM reads all experts' scales at once while checkpoints and the end-of-step update
    still see one state per expert (they update states in place). Its FP8 maxima become
    GROUPED_DTYPE's: the grouped experts' gradients are E4M3 under both formats."""
    if tuple(history.shape[1:]) != tuple(state.amax_history.shape) or scale.shape[1] != NUM_KINDS:
        raise ValueError(f"expert FP8 state has amax_history {tuple(state.amax_history.shape)}; the grouped "
                         f"experts' stack holds {tuple(history.shape[1:])} per expert")
    history[index].copy_(state.amax_history)
    scale[index].copy_(state.scale)
    state.amax_history = history[index]
    state.scale = scale[index]
    state.fp8_max.fill_(FP8_MAX[GROUPED_DTYPE])


# ---------------------------------------------------------------------- layout
class _Rows:
    """Which expert each row belongs to, and (kernel path) where it goes in the padded layout.

    row_expert [N]; counts [G] int64. Padded layout: P = N + G*(GROUP_ALIGN-1) rows rounded up to a
    multiple of GROUP_ALIGN (a bound known without reading the counts); expert g's rows start at a
    multiple of GROUP_ALIGN; dest [N] is each row's padded position, offs [G] int32 the padded
    groups' cumulative ends, pad_expert [P] the expert of each padded row (rows past the last group
    count as the last expert's)."""

    def __init__(self, counts: torch.Tensor, n: int, padded: bool):
        groups = counts.shape[0]
        device = counts.device
        self.counts = counts
        self.row_expert = torch.repeat_interleave(torch.arange(groups, device=device), counts, output_size=n)
        self.padded = padded
        if padded:
            sizes = (counts + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN  # [G]
            ends = torch.cumsum(sizes, 0)
            starts = ends - sizes
            first = torch.cumsum(counts, 0) - counts  # first unpadded row of each expert
            self.dest = starts[self.row_expert] + torch.arange(n, device=device) - first[self.row_expert]  # [N]
            bound = n + groups * (GROUP_ALIGN - 1)
            self.rows = (bound + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN  # the wgrad's K: a multiple of 16
            self.offs = ends.to(torch.int32)
            self.pad_expert = torch.searchsorted(ends, torch.arange(self.rows, device=device), right=True)
            self.pad_expert = self.pad_expert.clamp_(max=groups - 1)  # [P]

    def tensors(self) -> tuple:
        """The index tensors, for save_for_backward (with `restore`)."""
        return (self.counts, self.row_expert) + ((self.dest, self.offs, self.pad_expert) if self.padded else ())

    @classmethod
    def restore(cls, tensors, rows: int) -> "_Rows":
        out = cls.__new__(cls)
        out.counts, out.row_expert = tensors[0], tensors[1]
        out.padded = len(tensors) > 2
        if out.padded:
            out.dest, out.offs, out.pad_expert = tensors[2:]
            out.rows = rows
        return out

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """t [N, C] -> [P, C], zero rows between the experts' groups."""
        out = t.new_zeros(self.rows, t.shape[1])
        return out.index_copy_(0, self.dest, t)

    def expert_of_rows(self) -> torch.Tensor:
        return self.pad_expert if self.padded else self.row_expert


# ---------------------------------------------------------------------- GEMMs
def _host_counts(counts: torch.Tensor) -> list[int]:
    return [int(c) for c in counts.tolist()]


def _emulated_rows_mm(a: torch.Tensor, a_sinv: torch.Tensor, b: torch.Tensor, b_sinv: torch.Tensor,
                      rows: _Rows, out_dtype: torch.dtype) -> torch.Tensor:
    """rows of expert g: (a_g * a_sinv[g]) [n_g, C] . (b[g] * b_sinv[g]) [C, D] -> [N, D]."""
    compute = torch.bfloat16 if a.is_cuda else torch.float32
    ad = (a.float() * a_sinv[rows.row_expert].unsqueeze(1)).to(compute)  # [N, C]
    bd = (b.float() * b_sinv[:, None, None]).to(compute)  # [G, C, D]
    pieces = torch.split(ad, _host_counts(rows.counts), dim=0)
    outs = [piece @ bd[g] for g, piece in enumerate(pieces)]  # [n_g, D]
    if not outs:
        return a.new_zeros(0, b.shape[-1], dtype=out_dtype)
    return torch.cat(outs, dim=0).to(out_dtype)


def _emulated_wgrad(a: torch.Tensor, a_sinv: Optional[torch.Tensor], b: torch.Tensor, b_sinv: Optional[torch.Tensor],
                    rows: _Rows, groups: int) -> torch.Tensor:
    """dw[g] = (a_g * a_sinv[g])^T [C, n_g] . (b_g * b_sinv[g]) [n_g, D] -> [G, C, D] fp32 (a, b
    unscaled when their factors are None: the --no-fp8-wgrad operands)."""
    compute = torch.bfloat16 if a.is_cuda else torch.float32
    ad = a.float() if a_sinv is None else a.float() * a_sinv[rows.row_expert].unsqueeze(1)
    bd = b.float() if b_sinv is None else b.float() * b_sinv[rows.row_expert].unsqueeze(1)
    counts = _host_counts(rows.counts)
    out = torch.zeros(groups, a.shape[1], b.shape[1], dtype=torch.float32, device=a.device)
    for g, (pa, pb) in enumerate(zip(torch.split(ad.to(compute), counts), torch.split(bd.to(compute), counts))):
        if pa.shape[0]:
            out[g] = (pa.t() @ pb).float()
    return out


def _kernel_rows_mm(a: torch.Tensor, a_sinv: torch.Tensor, b_colmajor: torch.Tensor, b_sinv: torch.Tensor,
                    rows: _Rows, fast_accum: bool) -> torch.Tensor:
    """Padded a [P, C] (row-major FP8), b [G, C, D] (column-major FP8) -> [P, D] bf16. Fast
    accumulation in the forward GEMM only, as the dense FP8 linear does."""
    groups, _, d = b_colmajor.shape
    scale_a = a_sinv[rows.pad_expert].contiguous()  # [P]
    scale_b = b_sinv[:, None].expand(groups, d).contiguous()  # [G, D]
    return torch._scaled_grouped_mm(a, b_colmajor, scale_a, scale_b, offs=rows.offs, out_dtype=torch.bfloat16,
                                    use_fast_accum=fast_accum)


def _kernel_wgrad(a: torch.Tensor, a_sinv: torch.Tensor, b: torch.Tensor, b_sinv: torch.Tensor,
                  rows: _Rows) -> torch.Tensor:
    """Padded a [P, C], b [P, D] (FP8) -> dw [G, C, D] bf16 with per-expert groups along P."""
    groups = rows.counts.shape[0]
    c, d = a.shape[1], b.shape[1]
    mat_a = a.t().contiguous()  # [C, P] row-major
    mat_b = b.t().contiguous().t()  # [P, D] column-major
    scale_a = a_sinv.repeat_interleave(c)  # [G*C], expert-major
    scale_b = b_sinv.repeat_interleave(d)  # [G*D]
    out = torch._scaled_grouped_mm(mat_a, mat_b, scale_a, scale_b, offs=rows.offs,
                                   out_dtype=torch.bfloat16)  # [G, C, D]
    return _zero_empty_experts(out, rows)


def _zero_empty_experts(dw: torch.Tensor, rows: _Rows) -> torch.Tensor:
    # An expert without rows has a zero weight gradient, whatever the kernel leaves in its slot.
    return torch.where((rows.counts > 0)[:, None, None], dw, torch.zeros((), dtype=dw.dtype, device=dw.device))


def kernel_shapes_ok(k: int, m: int) -> bool:
    """torch._scaled_grouped_mm needs both feature dims of the weight to be multiples of 16."""
    return k % 16 == 0 and m % 16 == 0 and k > 0 and m > 0


# ---------------------------------------------------------------------- autograd
class _FP8GroupedFunction(torch.autograd.Function):
    """forward/dgrad/wgrad of the grouped experts in FP8 (tensorwise or delayed per-expert scales)."""

    @staticmethod
    def forward(ctx, x, w, counts, history, scale, use_kernel: bool, wgrad_in_fp8: bool):
        groups, k, m = w.shape
        n = x.shape[0]
        rows = _Rows(counts, n, padded=use_kernel)
        x_amax = expert_amax(x, rows.row_expert, groups)
        w_amax = _weight_amax(w)
        fp8_max = FP8_MAX[GROUPED_DTYPE]
        if history is not None:
            _record(history, INPUT, x_amax)
            _record(history, WEIGHT, w_amax)
            x_scale, w_scale = scale[:, INPUT].clone(), scale[:, WEIGHT].clone()
        else:
            x_scale, w_scale = scale_from_amax(x_amax, fp8_max), scale_from_amax(w_amax, fp8_max)
        x_sinv, w_sinv = x_scale.reciprocal(), w_scale.reciprocal()  # [G]
        wq = saturating_cast(w, w_scale[:, None, None], GROUPED_DTYPE)  # [G, K, M] (w's layout)
        x_in = rows.pad(x) if use_kernel else x  # [P, K] or [N, K]
        xq = saturating_cast(x_in, x_scale[rows.expert_of_rows()].unsqueeze(1), GROUPED_DTYPE)
        if use_kernel:
            w_colmajor = wq.transpose(1, 2).contiguous().transpose(1, 2)  # [G, K, M], column-major
            y = _kernel_rows_mm(xq, x_sinv, w_colmajor, w_sinv, rows, True)[rows.dest].to(x.dtype)  # [N, M]
        else:
            y = _emulated_rows_mm(xq, x_sinv, wq, w_sinv, rows, x.dtype)  # [N, M]
        x_saved = xq if wgrad_in_fp8 else x_in
        ctx.save_for_backward(x_saved, x_sinv, wq.contiguous(), w_sinv, *rows.tensors())
        # The delayed state is updated in place by later casts (other micro-batches): held, not saved.
        ctx.history, ctx.scale = history, scale
        ctx.padded_rows = rows.rows if use_kernel else 0
        ctx.use_kernel, ctx.wgrad_in_fp8 = use_kernel, wgrad_in_fp8
        ctx.x_dtype, ctx.w_dtype = x.dtype, w.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x_saved, x_sinv, wq, w_sinv, *index = ctx.saved_tensors
        history, scale = ctx.history, ctx.scale
        rows = _Rows.restore(index, ctx.padded_rows)
        groups = wq.shape[0]
        dy = dy.contiguous()
        dy_amax = expert_amax(dy, rows.row_expert, groups)
        if history is not None:
            _record(history, GRAD_OUTPUT, dy_amax)
            dy_scale = scale[:, GRAD_OUTPUT].clone()
        else:
            dy_scale = scale_from_amax(dy_amax, FP8_MAX[GROUPED_DTYPE])
        dy_sinv = dy_scale.reciprocal()
        dy_in = rows.pad(dy) if ctx.use_kernel else dy  # [P, M] or [N, M]
        dyq = saturating_cast(dy_in, dy_scale[rows.expert_of_rows()].unsqueeze(1), GROUPED_DTYPE)

        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            wt = wq.transpose(1, 2)  # [G, M, K]: column-major view of the row-major [G, K, M]
            if ctx.use_kernel:
                grad_x = _kernel_rows_mm(dyq, dy_sinv, wt, w_sinv, rows, False)[rows.dest].to(ctx.x_dtype)
            else:
                grad_x = _emulated_rows_mm(dyq, dy_sinv, wt, w_sinv, rows, ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            if ctx.wgrad_in_fp8 and ctx.use_kernel:
                grad_w = _kernel_wgrad(x_saved, x_sinv, dyq, dy_sinv, rows)
            elif ctx.wgrad_in_fp8:
                grad_w = _emulated_wgrad(x_saved, x_sinv, dyq, dy_sinv, rows, groups)
            elif ctx.use_kernel:
                # --no-fp8-wgrad: x and dy in their own dtype, bf16 grouped GEMM over the padded rows.
                x_t = x_saved.t().to(torch.bfloat16).contiguous()  # [K, P]
                grad_w = torch._grouped_mm(x_t, dy_in.to(torch.bfloat16), offs=rows.offs)  # [G, K, M]
                grad_w = _zero_empty_experts(grad_w, rows)
            else:
                grad_w = _emulated_wgrad(x_saved, None, dy, None, rows, groups)
            grad_w = grad_w.to(ctx.w_dtype)
        return grad_x, grad_w, None, None, None, None, None


def scaled_fp8_grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, recipe,
                          history: Optional[torch.Tensor], scale: Optional[torch.Tensor]) -> torch.Tensor:
    """The tensorwise / delayed grouped GEMM (shapes checked by the caller): the kernel path where
    the recipe's probe passed and the weight's dims are multiples of 16, else the emulated path."""
    use_kernel = (recipe.grouped_backend == "scaled_grouped_mm" and x.is_cuda
                  and kernel_shapes_ok(w.shape[1], w.shape[2]))
    counts = counts.to(device=x.device, dtype=torch.int64)
    return _FP8GroupedFunction.apply(x, w, counts, history, scale, use_kernel, recipe.wgrad_in_fp8)


# ---------------------------------------------------------------------- probe
def scaled_grouped_mm_works(device, wgrad_in_fp8: bool = True) -> bool:
    """Whether torch._scaled_grouped_mm runs the grouped experts' three FP8 GEMMs on `device` and
    agrees with the emulated path (uneven experts, one without rows). Run once when a model is
    built; never inside a step."""
    device = torch.device(device)
    if device.type != "cuda" or not hasattr(torch, "_scaled_grouped_mm"):
        return False
    if torch.cuda.get_device_capability(device)[0] != 9:
        return False
    gen = torch.Generator(device="cpu").manual_seed(0)
    counts = torch.tensor([5, 0, 37, 22], dtype=torch.int64)
    k, m = 64, 96
    x = torch.randn(int(counts.sum()), k, generator=gen).to(device, torch.bfloat16)
    w = (torch.randn(counts.numel(), k, m, generator=gen) * torch.tensor([1.0, 2.0, 0.5, 4.0])[:, None, None])
    w = w.to(device, torch.bfloat16)
    dy = torch.randn(x.shape[0], m, generator=gen).to(device, torch.bfloat16)
    results = []
    try:
        for use_kernel in (True, False):
            xi = x.clone().requires_grad_(True)
            wi = w.clone().requires_grad_(True)
            y = _FP8GroupedFunction.apply(xi, wi, counts.to(device), None, None, use_kernel, wgrad_in_fp8)
            y.backward(dy)
            results.append((y.float(), xi.grad.float(), wi.grad.float()))
    except (RuntimeError, ValueError, NotImplementedError, TypeError):
        return False
    for fast, ref in zip(*results):
        if not torch.isfinite(fast).all() or not torch.allclose(fast, ref, rtol=2e-2,
                                                                 atol=2e-2 * ref.abs().max().item() + 1e-6):
            return False
    return True


def grouped_experts_note(recipe) -> str:
    """One line for the training log: how the GroupedMLP experts run under `recipe`."""
    if recipe.kind == "blockwise":
        return ("--moe-grouped-gemm experts: blockwise FP8 scaling expert by expert (no grouped GEMM takes "
                "1x128/128x128 scales on this PyTorch); FP8 numerics, bf16 speed: use --fp8-recipe tensorwise "
                "or delayed for FP8 grouped GEMMs")
    how = ("torch._scaled_grouped_mm" if recipe.grouped_backend == "scaled_grouped_mm"
           else "emulated (dequantized per-expert GEMMs: no FP8 grouped GEMM on this device)")
    return (f"--moe-grouped-gemm experts in FP8 ({recipe.kind}, one scale per expert, E4M3 for activations, "
            f"weights and gradients): {how}")
