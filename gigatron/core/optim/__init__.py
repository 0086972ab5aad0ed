"""Optimizers (fp32, mixed precision, distributed), loss scaling, clipping and lr schedules."""

from .config import OptimizerConfig, SchedulerConfig
from .distrib_optimizer import DistributedOptimizer
from .grad_scaler import ConstantGradScaler, DynamicGradScaler, MegatronGradScaler
from .factory import get_optimizer
from .optimizer import FP32Optimizer, MegatronOptimizer, MixedPrecisionOptimizer
from .scheduler import OptimizerParamScheduler, SchedulerCheckpointMismatch

__all__ = [
    "OptimizerConfig",
    "SchedulerConfig",
    "MegatronOptimizer",
    "FP32Optimizer",
    "MixedPrecisionOptimizer",
    "DistributedOptimizer",
    "get_optimizer",
    "ConstantGradScaler",
    "DynamicGradScaler",
    "MegatronGradScaler",
    "OptimizerParamScheduler",
    "SchedulerCheckpointMismatch",
]
