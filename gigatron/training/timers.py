"""Megatron's step timers (--timing-log-level, --log-timers-to-tensorboard): how long the parts of a
training step take, printed with each log line.

Level 0 (the default) adds nothing to the log line's iteration time. Level 1 times the
forward/backward pass of all micro-batches, the optimizer step and the loss all-reduce; level 2 adds
the compute time of the forward and backward steps inside the schedule (without the pipeline's
waiting and communication). Times are this rank's, averaged over the iterations of the log interval
and printed by the rank that prints the log line. Timing a part synchronises the device at its end,
so timers cost some speed on GPUs (as in Megatron).
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, Optional

import torch

__all__ = ["StepTimers"]


class StepTimers:
    """Named accumulating timers, each active from a `--timing-log-level`."""

    LEVELS = {"forward-backward": 1, "optimizer": 1, "loss-all-reduce": 1, "forward-compute": 2,
              "backward-compute": 2}

    def __init__(self, level: int, device: torch.device):
        self.level = int(level)
        self.device = torch.device(device)
        self._seconds: dict[str, float] = {}
        self._iterations = 0

    def active(self, name: str) -> bool:
        return self.level >= self.LEVELS[name]

    @contextlib.contextmanager
    def time(self, name: str) -> Iterator[None]:
        """Add the block's duration to timer `name` (nothing when its level is above --timing-log-level)."""
        if not self.active(name):
            yield
            return
        self._sync()
        begin = time.perf_counter()
        yield
        self._sync()
        self.add(name, time.perf_counter() - begin)

    def add(self, name: str, seconds: float) -> None:
        self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def end_iteration(self) -> None:
        self._iterations += 1

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def means_ms(self) -> dict[str, float]:
        """Milliseconds per iteration of each timer over the iterations since the last reset."""
        n = max(1, self._iterations)
        return {name: 1000.0 * seconds / n for name, seconds in self._seconds.items()}

    def report(self) -> Optional[str]:
        """The timers line for the interval (None at level 0 or before any iteration); resets."""
        means = self.means_ms()
        self._seconds, self._iterations = {}, 0
        if not means:
            return None
        return "timers (ms per iteration): " + " | ".join(f"{name}: {value:.2f}" for name, value in means.items())
