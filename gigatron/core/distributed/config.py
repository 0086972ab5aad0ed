"""Configuration of the data-parallel wrapper (gradient buffers, buckets, overlap)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from gigatron.core.fields import DistributedOptimizerConfig

__all__ = ["DDPConfig", "default_bucket_size"]


def default_bucket_size(dp_size: int) -> int:
    """Megatron's default bucket size in parameters: max(40M, 1M x data-parallel size)."""
    return max(40_000_000, 1_000_000 * dp_size)


@dataclass
class DDPConfig(DistributedOptimizerConfig):
    """Flags of `DistributedDataParallel`. Field names are those of Megatron-Core's
    DistributedDataParallelConfig; where the command-line flag differs it is named in the field's
    docstring (the argument layer's alias table maps it)."""

    grad_reduce_in_fp32: bool = True
    """Keep the contiguous gradient buffer (accumulation across micro-batches and the data-parallel
    reduction) in fp32 (--accumulate-allreduce-grads-in-fp32). Megatron requires this flag for
    bf16 training; Gigatron makes it the default for bf16 and fp16 alike. Ignored for fp32 params."""

    grad_reduce_in_bf16: bool = False
    """Keep the gradient buffer and reduce gradients in bf16 (--grad-reduce-in-bf16); halves the
    gradient memory and traffic at the cost of precision. Overrides grad_reduce_in_fp32; fp32
    parameters keep fp32 gradients."""

    overlap_grad_reduce: bool = False
    """Launch each bucket's reduction asynchronously as soon as all its gradients are ready during
    the last micro-batch's backward pass (--overlap-grad-reduce)."""

    overlap_param_gather: bool = False
    """With the distributed optimizer, all-gather updated parameters asynchronously after the step
    and wait for each bucket in the forward pre-hook of the modules that use it
    (--overlap-param-gather). Needs use_distributed_optimizer and overlap_grad_reduce."""

    bucket_size: Optional[int] = None
    """Bucket size in parameters (--ddp-bucket-size). None: max(40M, 1M x data-parallel size).
    Buckets only exist with overlap_grad_reduce; without it each buffer is one bucket."""

    average_in_collective: bool = False
    """Average gradients inside the collective (AVG op) instead of scaling them by 1/dp before a
    sum (--ddp-average-in-collective). Backends without AVG (gloo) fall back to scale-then-sum."""

    check_for_nan_in_grad: bool = False
    """Raise an error naming the bucket if a gradient holds NaN before it is reduced. A Gigatron
    addition (Megatron-Core's DDP option, which Megatron's training feeds from its own flag): the
    training loop's --check-for-nan-in-loss-and-grad checks the reduced loss and the gradient norm
    instead, and does not turn this on."""

    calculate_per_token_loss: bool = False
    """The loss is summed over tokens (not averaged): gradients are not scaled by 1/dp before the
    reduction; finalize_model_grads divides them by the global token count instead
    (--calculate-per-token-loss)."""

    pad_buckets_for_high_nccl_busbw: bool = False
    """With the distributed optimizer, pad bucket ends to lcm(dp, 128, 2^16) elements instead of
    lcm(dp, 128), which gives NCCL higher bus bandwidth (--ddp-pad-buckets-for-high-nccl-busbw)."""

    def __post_init__(self) -> None:
        validate_ddp_config(self)

    def grad_dtype_for(self, param_dtype):
        """The dtype of the gradient buffer for parameters of `param_dtype`."""
        import torch

        if param_dtype == torch.float32:
            return torch.float32
        if self.grad_reduce_in_bf16:
            return torch.bfloat16
        if self.grad_reduce_in_fp32:
            return torch.float32
        return param_dtype

    def bucket_size_for(self, dp_size: int) -> Optional[int]:
        """Effective bucket size in parameters (None = one bucket per buffer)."""
        if not self.overlap_grad_reduce:
            return None
        if self.bucket_size is not None:
            return self.bucket_size
        return default_bucket_size(dp_size)


def validate_ddp_config(config: DDPConfig) -> None:
    """Raise ValueError naming the flags when the DDP settings contradict each other."""
    if config.overlap_param_gather and not config.use_distributed_optimizer:
        raise ValueError(
            "--overlap-param-gather needs --use-distributed-optimizer (only the distributed "
            "optimizer all-gathers parameters); add it or drop --overlap-param-gather."
        )
    if config.overlap_param_gather and not config.overlap_grad_reduce:
        raise ValueError(
            "--overlap-param-gather needs --overlap-grad-reduce; add it or drop --overlap-param-gather."
        )
    if config.calculate_per_token_loss and config.average_in_collective:
        raise ValueError(
            "--calculate-per-token-loss sums gradients over data-parallel ranks (they are divided by "
            "the global token count later); drop --ddp-average-in-collective."
        )
    if config.bucket_size is not None and config.bucket_size <= 0:
        raise ValueError(f"--ddp-bucket-size must be a positive number of parameters, got {config.bucket_size}.")
