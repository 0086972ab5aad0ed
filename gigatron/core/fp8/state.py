"""Delayed-scaling state of one FP8 linear layer: amax history and scales.

Three tensor kinds per linear: INPUT (x), WEIGHT (w), GRAD_OUTPUT (dy).

    amax_history [history_len, 3] fp32   row 0: the amax of the step in progress (recorded by
                                         every cast of that kind: forward, recompute, micro-batches);
                                         rows 1..L-1: earlier steps (row L-1 the latest of them)
    scale        [3] fp32                the scales the casts of this step use (1 at the start)

After each training step (every micro-batch's backward done) `update_scales` (or
`update_fp8_states` for many layers with one all-reduce) derives the next scales from the history,
as Transformer Engine's delayed scaling does: amax = max over the history (`max`) or row 0
(`most_recent`); scale = fp8_max / amax / 2^margin, the previous scale kept where amax is 0 or not
finite; then the history rolls one row (row 0 becomes the oldest, zeroed for the next step).
Everything stays on the device: no host synchronisation.

A row's age: row 0 is age 0, row L-1 age 1, row L-2 age 2, ..., row 1 age L-1. `load_state_dict`
uses this to load a history of another length (--fp8-amax-history-len changed on resume): the
newest min(L_saved, L) ages are kept.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

from .casting import FP8_MAX, amax, scale_from_amax

INPUT, WEIGHT, GRAD_OUTPUT = 0, 1, 2
NUM_KINDS = 3

__all__ = ["FP8LinearState", "update_fp8_states", "INPUT", "WEIGHT", "GRAD_OUTPUT"]


class FP8LinearState:
    """Delayed-scaling amax history and scales of one linear layer (see the module docstring)."""

    def __init__(self, history_len: int, fwd_dtype: torch.dtype, bwd_dtype: torch.dtype, *,
                 margin: int = 0, amax_compute_algo: str = "most_recent", device=None) -> None:
        if history_len < 1:
            raise ValueError(f"--fp8-amax-history-len must be >= 1, got {history_len}")
        if amax_compute_algo not in ("max", "most_recent"):
            raise ValueError(f"--fp8-amax-compute-algo {amax_compute_algo!r} is not one of max, most_recent")
        self.margin = margin
        self.amax_compute_algo = amax_compute_algo
        self.amax_history = torch.zeros(history_len, NUM_KINDS, dtype=torch.float32, device=device)
        self.scale = torch.ones(NUM_KINDS, dtype=torch.float32, device=device)
        self.fp8_max = torch.tensor([FP8_MAX[fwd_dtype], FP8_MAX[fwd_dtype], FP8_MAX[bwd_dtype]],
                                    dtype=torch.float32, device=device)

    @classmethod
    def from_config(cls, config, device=None) -> "FP8LinearState":
        """The state for an FP8Config with --fp8-recipe delayed."""
        from .casting import format_dtypes

        fwd, bwd = format_dtypes(config.fp8)
        return cls(config.fp8_amax_history_len, fwd, bwd, margin=config.fp8_margin,
                   amax_compute_algo=config.fp8_amax_compute_algo, device=device)

    @property
    def history_len(self) -> int:
        return self.amax_history.shape[0]

    def to(self, device) -> "FP8LinearState":
        """Move the tensors to `device` (in place; returns self)."""
        self.amax_history = self.amax_history.to(device)
        self.scale = self.scale.to(device)
        self.fp8_max = self.fp8_max.to(device)
        return self

    # ------------------------------------------------------------------ per step
    def current_amax(self) -> torch.Tensor:
        """[3]: the amax derived from the history for the next scale."""
        if self.amax_compute_algo == "max":
            return self.amax_history.amax(dim=0)
        return self.amax_history[0]

    @torch.no_grad()
    def update_scales(self) -> None:
        """Derive the next step's scales from the history, then roll the history one row."""
        new_scale = scale_from_amax(self.current_amax(), self.fp8_max, self.margin, fallback=self.scale)
        self.scale.copy_(new_scale)
        self.amax_history.copy_(torch.roll(self.amax_history, -1, dims=0))
        self.amax_history[0].zero_()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Tensors only (loads with weights_only): the history and the scales, on the CPU."""
        return {"amax_history": self.amax_history.detach().cpu().clone(),
                "scale": self.scale.detach().cpu().clone()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore a saved state exactly (a history of another length keeps the newest rows)."""
        missing = {"amax_history", "scale"} - set(state)
        if missing:
            raise ValueError(f"FP8 delayed-scaling state is missing {sorted(missing)}; the checkpoint is "
                             f"corrupt or was written by another program")
        history, scale = state["amax_history"], state["scale"]
        if history.dim() != 2 or history.shape[1] != NUM_KINDS or tuple(scale.shape) != (NUM_KINDS,):
            raise ValueError(f"FP8 delayed-scaling state has amax_history {tuple(history.shape)} and scale "
                             f"{tuple(scale.shape)}; expected [history_len, {NUM_KINDS}] and [{NUM_KINDS}]")
        saved_len, new_len = history.shape[0], self.history_len
        history = history.to(self.amax_history.device, torch.float32)
        if saved_len == new_len:
            self.amax_history.copy_(history)
        else:
            self.amax_history.zero_()
            for age in range(min(saved_len, new_len)):
                self.amax_history[(-age) % new_len] = history[(-age) % saved_len]
        self.scale.copy_(scale.to(self.scale.device, torch.float32))


def record_amax(history: torch.Tensor, kind: int, x: torch.Tensor) -> None:
    """history[0, kind] = max(history[0, kind], amax(x)), in place on the device."""
    row = history[0, kind:kind + 1]
    row.copy_(torch.maximum(row, amax(x).reshape(1)))


@torch.no_grad()
def update_fp8_states(states: Iterable[FP8LinearState], group=None) -> None:
    """End of a training step: reduce the step's amaxes (row 0 of every history) with MAX over
    `group` (a gigatron Group; Transformer Engine reduces over tensor x data x context parallel
    ranks, so that every replica keeps the same scales) in one all-reduce, then update each state
    exactly as `FP8LinearState.update_scales` does, batched: a few kernels per group of states
    sharing history length, margin and algorithm instead of several per layer."""
    states = list(states)
    if not states:
        return
    process_group: Optional[object] = getattr(group, "group", None)
    if process_group is not None and getattr(group, "size", 1) > 1:
        rows = torch.cat([s.amax_history[0] for s in states])  # [3 * len(states)]
        dist.all_reduce(rows, op=dist.ReduceOp.MAX, group=process_group)
        torch._foreach_copy_([s.amax_history[0] for s in states], list(rows.view(-1, NUM_KINDS).unbind(0)))
    batches: dict[tuple, list[FP8LinearState]] = {}
    for s in states:
        key = (s.history_len, s.margin, s.amax_compute_algo, s.amax_history.device)
        batches.setdefault(key, []).append(s)
    for (_, margin, algo, _), batch in batches.items():
        history = torch.stack([s.amax_history for s in batch])  # [S, L, 3]
        current = history.amax(dim=1) if algo == "max" else history[:, 0]  # [S, 3]
        old_scale = torch.stack([s.scale for s in batch])  # [S, 3]
        fp8_max = torch.stack([s.fp8_max for s in batch])  # [S, 3]
        new_scale = scale_from_amax(current, fp8_max, margin, fallback=old_scale)
        history = torch.roll(history, -1, dims=1)
        history[:, 0] = 0.0
        torch._foreach_copy_([s.scale for s in batch], list(new_scale.unbind(0)))
        torch._foreach_copy_([s.amax_history for s in batch], list(history.unbind(0)))
