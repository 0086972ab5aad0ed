"""The bookkeeping between two decode steps, in one kernel (Triton), with plain PyTorch as the reference.

Shape legend: b = rows, W = columns of the token table (prompt + generation).

    advance(new [b], active [b] bool, cur [b], last [b], tokens [b, W], next_tokens [b, 1],
            next_positions [b, 1], stops: StopTokens, pad: int, flag=None)

takes every row's chosen token `new` and, in place:
  - a row that already stopped gets the padding token instead: tok = active ? new : pad;
  - writes tok at column cur of its row of `tokens` (a stopped row writes padding past its end);
  - stopped = active & (tok is a stop token, or tok and last both are the pair token);
  - cur += active; active &= ~stopped; last = tok;
  - next_tokens = tok and next_positions = cur - 1: the next decode step's inputs (the captured
    step's own input buffers, so that no copy runs before its replay);
  - flag (optional, a 0-dim bool, may be pinned host memory) = any row still active.

The sampling loop of the inference engine did this as about a dozen small kernels and copies a
step (where, index_put, compares, adds, the copies into the graph's inputs and of the flag to the
host), each waiting for the one before; at batch 1 a step of the 1.3B GPT takes about 1 ms, of
which those were some 5%. The kernel writes the flag straight into pinned host memory (mapped into
the device's address space), so no device-to-host copy runs either.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

from gigatron.core.ops.gemv import gemv_available

__all__ = ["StopTokens", "advance", "reference_advance"]


@dataclasses.dataclass(frozen=True)
class StopTokens:
    """What ends a row: any of `singles` (token ids), or `pair` (a token id, or None) right after
    itself (e.g. a second newline)."""
    singles: tuple = ()
    pair: Optional[int] = None

    def mask(self, new: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """new, last [b] -> bool [b]: rows whose new token is a stop."""
        stop = torch.zeros_like(new, dtype=torch.bool)
        for token in self.singles:
            stop |= new == token
        if self.pair is not None:
            stop |= (new == self.pair) & (last == self.pair)
        return stop


def reference_advance(new, active, cur, last, tokens, next_tokens, next_positions, stops: StopTokens, pad: int,
                      flag: Optional[torch.Tensor] = None) -> None:
    """Plain PyTorch, the same in-place updates as the kernel."""
    tok = torch.where(active, new, pad)  # [b]
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    tokens[rows, cur] = tok
    stopped = stops.mask(tok, last) & active
    cur += active
    active &= ~stopped
    last.copy_(tok)
    next_tokens.copy_(tok.view_as(next_tokens))
    torch.sub(cur, 1, out=next_positions.view(-1))
    if flag is not None:
        flag.copy_(active.any(), non_blocking=True)


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def advance_kernel(new_ptr, active_ptr, cur_ptr, last_ptr, tokens_ptr, next_ptr, positions_ptr, flag_ptr,
                       b, tokens_stride, next_stride, positions_stride, pad, stop0, stop1, stop2, pair,
                       WRITE_FLAG: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.arange(0, BLOCK)
        valid = rows < b
        new = tl.load(new_ptr + rows, mask=valid, other=0)
        active = tl.load(active_ptr + rows, mask=valid, other=0) != 0
        cur = tl.load(cur_ptr + rows, mask=valid, other=0)
        last = tl.load(last_ptr + rows, mask=valid, other=0)
        tok = tl.where(active, new, pad)
        tl.store(tokens_ptr + rows.to(tl.int64) * tokens_stride + cur, tok, mask=valid)
        # Unused stop slots hold -1, which no token id equals.
        stop = (tok == stop0) | (tok == stop1) | (tok == stop2) | ((tok == pair) & (last == pair))
        stop = stop & active
        cur = cur + active.to(tl.int64)
        active = active & (stop == 0)
        tl.store(cur_ptr + rows, cur, mask=valid)
        tl.store(active_ptr + rows, active, mask=valid)
        tl.store(last_ptr + rows, tok, mask=valid)
        tl.store(next_ptr + rows * next_stride, tok, mask=valid)
        tl.store(positions_ptr + rows * positions_stride, cur - 1, mask=valid)
        if WRITE_FLAG:
            tl.store(flag_ptr, tl.max(tl.where(valid & active, 1, 0), axis=0) != 0)

    return advance_kernel


def _kernel_applies(tensors) -> bool:
    return (tensors[0].is_cuda and gemv_available()
            and all(t.dtype == torch.long for t in tensors if t.dtype != torch.bool)
            and all(t.stride(-1) == 1 for t in tensors))


def advance(new, active, cur, last, tokens, next_tokens, next_positions, stops: StopTokens, pad: int,
            flag: Optional[torch.Tensor] = None) -> None:
    """The updates the module docstring lists: one Triton kernel on CUDA (flag may then be pinned
    host memory, which the kernel writes directly), reference_advance elsewhere."""
    if len(stops.singles) > 3:
        raise ValueError(f"at most 3 single stop tokens, got {len(stops.singles)}")
    if not _kernel_applies((new, active, cur, last, tokens, next_tokens, next_positions)):
        reference_advance(new, active, cur, last, tokens, next_tokens, next_positions, stops, pad, flag)
        return
    import triton

    b = tokens.shape[0]
    singles = list(stops.singles) + [-1] * (3 - len(stops.singles))
    pair = -1 if stops.pair is None else stops.pair
    _kernel()[(1,)](new, active, cur, last, tokens, next_tokens, next_positions,
                    flag if flag is not None else active, b, tokens.stride(0), next_tokens.stride(0),
                    next_positions.stride(0), pad, *singles, pair, WRITE_FLAG=flag is not None,
                    BLOCK=max(triton.next_power_of_2(b), 16), num_warps=1 if b <= 256 else 4)
