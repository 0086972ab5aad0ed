"""Data parallelism: contiguous gradient buffers, bucketed (overlapped) reduction, finalize."""

from .config import DDPConfig
from .data_parallel import DistributedDataParallel
from .finalize import finalize_model_grads
from .param_and_grad_buffer import NonFiniteGradientError

__all__ = ["DDPConfig", "DistributedDataParallel", "finalize_model_grads", "NonFiniteGradientError"]
