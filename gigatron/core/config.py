"""All configuration dataclasses of the core library in one place.

Each dataclass lives next to the code that consumes it; this module re-exports them. Field names
are Megatron's flag names with underscores, and the docstring under each field is its --help."""

from gigatron.core.data.config import DataConfig
from gigatron.core.distributed.config import DDPConfig
from gigatron.core.fp8.config import FP8Config
from gigatron.core.optim.config import OptimizerConfig, SchedulerConfig
from gigatron.core.parallel.config import ParallelConfig
from gigatron.core.transformer.config import TransformerConfig
from gigatron.core.transformer.moe.config import MoEConfig

__all__ = ["DDPConfig", "DataConfig", "FP8Config", "MoEConfig", "OptimizerConfig", "ParallelConfig", "SchedulerConfig",
           "TransformerConfig"]
