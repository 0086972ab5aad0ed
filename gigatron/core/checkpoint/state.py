"""What a checkpoint format hands back: a model as full tensors, or a restored training state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["ModelState", "TrainingState"]


@dataclass
class ModelState:
    """A model read from a checkpoint, independent of the layout it was saved at.

    `tensors`: full logical tensors keyed by global name (`decoder.layers.{global}.…`, routed
    experts by global expert number), the vocabulary rows as stored (padded), the fused QKV and
    SwiGLU fc1 in Megatron's tp=1 layout (gigatron/core/checkpoint/tp_layout.py). `args`: the flags
    the checkpoint was saved with (a plain dict). `iteration`: None for a `release` checkpoint."""

    args: dict
    tensors: dict[str, torch.Tensor]
    iteration: Optional[int]
    path: str
    dtype: torch.dtype = torch.float32


@dataclass
class TrainingState:
    """What a format restored besides the model (and optimizer), which it loads in place.

    `header`: gigatron/core/checkpoint/header.py's keys. `optimizer_loaded`: the optimizer's state
    came from the checkpoint (otherwise the caller refreshes its main parameters from the model).
    `rng_state`: this rank's saved RNG state, or None; `rng_missing`: why there is none, and
    whether that is an error (`rng_missing_is_error`) or only a warning (another parallel layout)."""

    header: dict
    path: str
    optimizer_loaded: bool = False
    scheduler_state: Optional[dict] = None
    rng_state: Optional[dict] = None
    rng_missing: Optional[str] = None
    rng_missing_is_error: bool = True
    extra: dict = field(default_factory=dict)
