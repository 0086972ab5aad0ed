"""Keep only a function's inputs for backward and recompute the rest there.

The Mamba mixer's plain-PyTorch pieces (the gated RMSNorm on every device; the causal conv1d and
the chunked SSD scan on the CPU) would otherwise keep their fp32 intermediates for backward: the
gated norm four [T, I] fp32 tensors (plus fp32 copies of y and z), the chunked scan its per-chunk
Q x Q decay and score matrices. `keep_inputs_only(fn, *inputs)` runs `fn` without recording a
graph, keeps only `inputs` (views stay views: no new storage), and in backward runs `fn` again
with autograd and differentiates that graph. The recomputed graph is the very same sequence of
ops on the same values, so outputs and gradients are bitwise those of calling `fn` directly (one
extra forward of `fn` in backward is the price).

`fn` takes the tensors (some may be None) and returns a tensor or a tuple of tensors; everything
else it needs (sizes, eps) is bound into it (functools.partial). Outputs that are not floating
point, or whose gradient is not needed, are fine: only outputs that receive a gradient enter the
recomputed backward.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch

__all__ = ["keep_inputs_only", "records_graph"]


def records_graph(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd records a graph for an op on these tensors (grad mode on and one of them
    requires grad): only then is there anything to save."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _KeepInputsOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, *inputs):
        ctx.fn = fn
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            out = fn(*inputs)
        ctx.is_tuple = isinstance(out, tuple)
        return out

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        leaves = [t.detach().requires_grad_(need) if t is not None else None for t, need in zip(saved, needs)]
        with torch.enable_grad():
            out = ctx.fn(*leaves)
        outs = out if ctx.is_tuple else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wanted = [t for t, need in zip(leaves, needs) if need]
        if not pairs or not wanted:
            return (None,) * (len(saved) + 1)
        got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        return (None, *(next(got) if need else None for need in needs))


def keep_inputs_only(fn: Callable[..., Union[torch.Tensor, Tuple[torch.Tensor, ...]]],
                     *inputs: Optional[torch.Tensor]):
    """fn(*inputs), keeping only `inputs` for backward (see the module docstring). Without a graph
    to record (no_grad, or no input requiring grad) it is fn(*inputs) itself."""
    if not records_graph(*inputs):
        return fn(*inputs)
    return _KeepInputsOnly.apply(fn, *inputs)
