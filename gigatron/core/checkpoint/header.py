"""The header every checkpoint carries, in every format: the run's flags and where training stands.

    args                                   the run's flags as a plain dict (Megatron keeps the
                                           consumed-sample counts in it too)
    checkpoint_version                     3.0, Megatron's current version
    iteration                              the iteration the checkpoint was saved after
    num_floating_point_operations_so_far   for Megatron's throughput logging
    consumed_train_samples / consumed_valid_samples
    fp8_state                              optional: an FP8 run's delayed-scaling state, the whole
                                           model's, {linear name: {amax_history, scale}}
                                           (gigatron.core.fp8.model); the loaders hand it back

The `torch` layout stores these keys at the top level of every rank's file; torch_dist stores them
in common.pt's `extra_state`. Built here only, so both formats (and the converters) agree.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["CHECKPOINT_VERSION", "HEADER_KEYS", "checkpoint_header"]

CHECKPOINT_VERSION = 3.0
HEADER_KEYS = ("args", "checkpoint_version", "iteration", "num_floating_point_operations_so_far",
               "consumed_train_samples", "consumed_valid_samples")


def checkpoint_header(args: dict, iteration: Optional[int], *, num_floating_point_operations_so_far: float = 0.0,
                      consumed_train_samples: int = 0, consumed_valid_samples: int = 0) -> dict:
    """The header of a checkpoint saved after `iteration` (None or 0 for an imported model)."""
    return {
        "args": args,
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": int(iteration or 0),
        "num_floating_point_operations_so_far": float(num_floating_point_operations_so_far),
        "consumed_train_samples": int(consumed_train_samples),
        "consumed_valid_samples": int(consumed_valid_samples),
    }
