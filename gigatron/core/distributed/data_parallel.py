"""DistributedDataParallel: data parallelism over contiguous gradient buffers.

Gradient flow of one iteration (M micro-batches):

    micro-batches 1..M-1 inside no_sync():  backward -> post-accumulate hook adds param.grad into
                                            param.main_grad (fp32 buffer) and frees param.grad
    micro-batch M:                          same, and each hook marks its param ready; with
                                            overlap_grad_reduce a bucket whose params are all ready
                                            launches its async all-reduce (reduce-scatter with the
                                            distributed optimizer) while backward continues
    finish_grad_sync():                     waits for the reductions (or runs them now when not
                                            overlapping); main_grad then holds the dp-mean gradient
    optimizer step, then start_param_sync() (distributed optimizer): all-gather updated shards;
                                            with overlap_param_gather asynchronously, each bucket
                                            awaited in the forward pre-hook of the modules using it
    zero_grad_buffer():                     zero the buffers for the next iteration
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from .config import DDPConfig
from gigatron.core.fp8.param_gather import is_fp8_gathered
from gigatron.core.parallel.tags import is_expert_parallel

from .param_and_grad_buffer import ParamAndGradBuffer

__all__ = ["DistributedDataParallel"]


class DistributedDataParallel(nn.Module):
    """Wrap `module` for data-parallel training over `groups.dp_cp` (data x context parallel ranks);
    expert-parallel parameters (tags.is_expert_parallel) over `groups.expt_dp` in buffers of their own.

    Every trainable parameter gets `.main_grad`, a view into a contiguous gradient buffer where
    gradients accumulate across micro-batches (fp32 by default, also for bf16 parameters).
    `param.grad` is left None after backward: read `main_grad`. Move the module to its device
    and dtype before wrapping: the buffers are allocated where the parameters are, and with the
    distributed optimizer the parameters become views into a contiguous parameter buffer.
    """

    def __init__(self, config: DDPConfig, module: nn.Module, groups) -> None:
        super().__init__()
        self.ddp_config = config
        self.module = module
        dp = groups.dp_cp
        self.dp_group = dp.group
        self.dp_size = max(dp.size, 1)
        self.dp_rank = max(dp.rank, 0)
        self.is_last_microbatch = True

        names = {p: n for n, p in module.named_parameters()}
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("DistributedDataParallel: the module has no trainable parameters")
        bucket_size = config.bucket_size_for(self.dp_size)
        average_in_collective = config.average_in_collective and not _backend_is(self.dp_group, "gloo")
        if config.calculate_per_token_loss or average_in_collective:
            scaling = 1.0
        else:
            scaling = 1.0 / self.dp_size

        # Expert-parallel parameters (MoE experts) are replicated only over the expert
        # data-parallel group: their gradients already hold the contributions of every token of
        # their expert-parallel group, so they are reduced over groups.expt_dp (and sharded over it
        # with the distributed optimizer) and scaled by 1/dp_cp like the dense ones (also when
        # expt_dp has one rank).
        expt = getattr(groups, "expt_dp", None)
        self.expt_dp_group = expt.group if expt is not None else None
        self.expt_dp_size = max(expt.size, 1) if expt is not None else 1
        self.expt_dp_rank = max(expt.rank, 0) if expt is not None else 0
        expt_average = False  # SUM with the 1/dp_cp factor (an AVG over expt_dp would divide by expt_dp)
        expt_scaling = 1.0 if config.calculate_per_token_loss else 1.0 / self.dp_size

        # One buffer per (param dtype, grad dtype, expert or dense), parameters in reverse
        # registration order.
        # With --fp8-param-gather the FP8 linears' weights get buffers of their own (FP8 storage).
        by_dtype: dict[tuple, list] = {}
        for param in reversed(params):
            fp8 = config.use_distributed_optimizer and is_fp8_gathered(param)
            key = (param.dtype, config.grad_dtype_for(param.dtype), is_expert_parallel(param), fp8)
            by_dtype.setdefault(key, []).append(param)
        self.grad_buffers: list[ParamAndGradBuffer] = []  # (not `buffers`: nn.Module.buffers())
        for (param_dtype, grad_dtype, expert, fp8), dtype_params in by_dtype.items():
            self.grad_buffers.append(
                ParamAndGradBuffer(
                    dtype_params,
                    param_dtype,
                    grad_dtype,
                    bucket_size=config.bucket_size_for(self.expt_dp_size) if expert else bucket_size,
                    dp_group=self.expt_dp_group if expert else self.dp_group,
                    dp_size=self.expt_dp_size if expert else self.dp_size,
                    dp_rank=self.expt_dp_rank if expert else self.dp_rank,
                    use_distributed_optimizer=config.use_distributed_optimizer,
                    pad_buckets_for_high_nccl_busbw=config.pad_buckets_for_high_nccl_busbw,
                    gradient_scaling_factor=expt_scaling if expert else scaling,
                    average_in_collective=expt_average if expert else average_in_collective,
                    check_for_nan_in_grad=config.check_for_nan_in_grad,
                    param_names=names,
                    fp8_params=fp8,
                )
            )
            self.grad_buffers[-1].is_expert = expert
        self.param_to_buffer = {p: buf for buf in self.grad_buffers for p in buf.params}
        self.buckets = [b for buf in self.grad_buffers for b in buf.buckets]

        self._hook_handles = []
        for param in params:
            self._hook_handles.append(param.register_post_accumulate_grad_hook(self._grad_hook))
        if config.overlap_param_gather:
            self._register_param_gather_pre_hooks()

    # ------------------------------------------------------------------ forward
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _grad_hook(self, param: torch.Tensor) -> None:
        """Runs after autograd accumulated into param.grad: move it into main_grad."""
        if param.grad is not None:
            param.main_grad.add_(param.grad)
            param.grad = None
        if self.ddp_config.overlap_grad_reduce and self.is_last_microbatch:
            self.param_to_buffer[param].bucket_of(param).register_grad_ready(param)

    def _register_param_gather_pre_hooks(self) -> None:
        """Before a module's forward, wait for the all-gathers of the buckets holding its params."""
        for submodule in self.module.modules():
            buckets = []
            for param in submodule.parameters(recurse=False):
                if param in self.param_to_buffer:
                    bucket = self.param_to_buffer[param].bucket_of(param)
                    if bucket not in buckets:
                        buckets.append(bucket)
            if buckets:
                self._hook_handles.append(submodule.register_forward_pre_hook(_make_param_wait_hook(buckets)))

    # ------------------------------------------------------------------ gradients
    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients without reducing them (all but the last micro-batch)."""
        self.is_last_microbatch = False
        try:
            yield
        finally:
            self.is_last_microbatch = True

    def start_grad_sync(self) -> None:
        """Launch (asynchronously) the reduction of every bucket not launched yet."""
        for bucket in self.buckets:
            if not bucket.grad_reduce_launched:
                bucket.start_grad_sync(async_op=True)

    def finish_grad_sync(self) -> None:
        """Complete the gradient reduction: afterwards every main_grad (with the distributed
        optimizer: the local shard of each bucket) holds the data-parallel mean gradient."""
        if self.ddp_config.overlap_grad_reduce:
            # Buckets whose params did not all receive a gradient were not launched by the hooks;
            # launch them in bucket order, identical on every rank.
            self.start_grad_sync()
        else:
            for bucket in self.buckets:
                if not bucket.grad_reduce_launched:
                    bucket.start_grad_sync(async_op=True)
        for bucket in self.buckets:
            bucket.finish_grad_sync()

    def zero_grad_buffer(self) -> None:
        """Zero all gradient buffers and reset the per-iteration communication state."""
        for param in self.param_to_buffer:
            param.grad = None
        for buf in self.grad_buffers:
            buf.reset()

    def scale_gradients(self, factor: float) -> None:
        """Multiply every gradient buffer by `factor`."""
        for buf in self.grad_buffers:
            buf.grad_data.mul_(factor)

    # ------------------------------------------------------------------ parameters
    def start_param_sync(self, force_sync: bool = False) -> None:
        """Distributed optimizer: all-gather the updated parameter shards into the model's params.
        Asynchronous with overlap_param_gather (unless `force_sync`), completed by the forward
        pre-hooks or finish_param_sync()."""
        if not self.ddp_config.use_distributed_optimizer:
            return
        async_op = self.ddp_config.overlap_param_gather and not force_sync
        for bucket in self.buckets:
            bucket.start_param_sync(async_op=async_op)

    def finish_param_sync(self) -> None:
        """Wait for every pending parameter all-gather."""
        for bucket in self.buckets:
            bucket.finish_param_sync()

    @torch.no_grad()
    def broadcast_params(self) -> None:
        """Copy every parameter of data-parallel rank 0 to the other data-parallel ranks (makes
        replicas identical at the start of training whatever their initialization)."""
        for param in self.module.parameters():
            group = self.expt_dp_group if is_expert_parallel(param) else self.dp_group
            if group is not None:
                dist.broadcast(param.data, src=dist.get_global_rank(group, 0), group=group)

    def state_dict(self, *args, **kwargs):
        self.finish_param_sync()
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        self.finish_param_sync()
        return self.module.load_state_dict(state_dict, strict=strict)


def _make_param_wait_hook(buckets):
    def hook(module, args):
        for bucket in buckets:
            bucket.finish_param_sync()

    return hook


def _backend_is(group, name: str) -> bool:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return False
    return str(dist.get_backend(group)).lower() == name
