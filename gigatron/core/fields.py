"""Field markers, and the small bases through which two config dataclasses share a setting that
both need (defined once here, inherited by both).

`run_setting(default)` marks a field that says how a run executes a model (parallel layout,
precision, kernels, recompute, initialization), not what the model computes; `model_fields(cls)`
is every other field of a config class — what a checkpoint's description of its model is derived
from (gigatron/core/convert/protocol.py, --use-checkpoint-args)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

__all__ = ["RUN_SETTING", "run_setting", "model_fields", "SequenceLengthConfig", "DistributedOptimizerConfig"]

RUN_SETTING = "run_setting"


def run_setting(default):
    """A field that says how a run executes the model (parallel layout, precision, kernels,
    recompute, initialization), not what the model computes: a checkpoint records it with the
    run's flags, but it is not part of the model's description (`model_fields`), so loading a
    checkpoint never imposes it on another run."""
    return field(default=default, metadata={RUN_SETTING: True})


def model_fields(cls) -> tuple[str, ...]:
    """The fields of config dataclass `cls` that describe the model: every init field that is not
    a `run_setting`. What a checkpoint records about a model (conversion metadata,
    --use-checkpoint-args, from_pretrained) is derived from these, so a new model field is carried
    everywhere without a list to update."""
    return tuple(f.name for f in fields(cls) if f.init and not f.metadata.get(RUN_SETTING))


@dataclass
class SequenceLengthConfig:
    """The sequence length that both the model (TransformerConfig) and the data (DataConfig) need:
    defined once here, inherited by both."""

    seq_length: Optional[int] = None
    """Maximum sequence length to process (the training sequence length)."""


@dataclass
class DistributedOptimizerConfig:
    """The distributed-optimizer switch that both the data-parallel wrapper (DDPConfig: its buffers
    are laid out for sharding) and the optimizer (OptimizerConfig) need."""

    use_distributed_optimizer: bool = run_setting(False)
    """Shard the fp32 main parameters and optimizer states over the data-parallel ranks; gradients
    are reduce-scattered and parameters all-gathered (--use-distributed-optimizer)."""
