"""Contiguous gradient (and, for the distributed optimizer, parameter) buffers split into buckets.

Layout of one buffer (one per (param dtype, grad dtype) pair), in elements:

    | bucket 0: p_k ... p_j [pad] | bucket 1: p_i ... [pad] | ...

Parameters are placed in reverse registration order, which approximates the order in which
backward produces their gradients, so the first bucket is complete first. With the distributed
optimizer every parameter starts at a multiple of 64 elements and every bucket is padded to a
multiple of lcm(dp, 128) (lcm(dp, 128, 2^16) with pad_buckets_for_high_nccl_busbw), so a bucket
splits into dp equal contiguous shards: rank r owns elements [r * n / dp, (r + 1) * n / dp) of
each bucket of n elements.

Each parameter gets `param.main_grad`, a view of its slice of the gradient buffer (param shape).
With the distributed optimizer `param.data` also becomes a view into the parameter buffer, so the
all-gather of updated shards writes straight into the model's parameters. A buffer of FP8-gathered
weights (--fp8-param-gather, gigatron.core.fp8.param_gather) instead holds one byte per element:
the gather fills each weight's FP8 copy, which is then read back into the (separate) parameter.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from gigatron.core.fp8.param_gather import attach_fp8_storage, read_back_weights
from gigatron.core.parallel.tags import is_shared_embedding

__all__ = ["Bucket", "ParamAndGradBuffer", "NonFiniteGradientError"]

_PARAM_ALIGNMENT = 64  # elements; start of every parameter with the distributed optimizer


class NonFiniteGradientError(RuntimeError):
    """A gradient holds NaN before the data-parallel reduction (check_for_nan_in_grad)."""


def _reduce_scatter(output: torch.Tensor, input: torch.Tensor, op, group, async_op: bool):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, input, op=op, group=group, async_op=async_op)


def _all_gather(output: torch.Tensor, input: torch.Tensor, group, async_op: bool):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, input, group=group, async_op=async_op)


class Bucket:
    """A contiguous range [start, end) of a buffer whose gradients are reduced together.

    Holds the communication state of one iteration: which parameters have their gradient ready
    (overlapped mode), and the handles of the pending grad reduction and param all-gather.
    """

    def __init__(self, buffer: "ParamAndGradBuffer", index: int, params: list, start: int, end: int) -> None:
        self.buffer = buffer
        self.index = index
        self.params = params
        self.param_set = set(params)
        self.start = start
        self.end = end
        self.numel = end - start
        self.grad_data = buffer.grad_data[start:end]
        self.param_data = buffer.param_data[start:end] if buffer.param_data is not None else None
        self.params_ready: set = set()
        self.grad_handle = None
        self.grad_reduce_launched = False
        self.param_handle = None
        self.read_back_pending = False

    # ---------------------------------------------------------------- shards
    def shard_range(self, dp_rank: int) -> tuple[int, int]:
        """[start, end) in buffer elements of rank `dp_rank`'s shard of this bucket."""
        size = self.numel // self.buffer.dp_size
        return self.start + dp_rank * size, self.start + (dp_rank + 1) * size

    def local_grad_shard(self) -> torch.Tensor:
        size = self.numel // self.buffer.dp_size
        return self.grad_data[self.buffer.dp_rank * size:(self.buffer.dp_rank + 1) * size]

    def local_param_shard(self) -> torch.Tensor:
        size = self.numel // self.buffer.dp_size
        return self.param_data[self.buffer.dp_rank * size:(self.buffer.dp_rank + 1) * size]

    # ---------------------------------------------------------------- gradients
    def reset(self) -> None:
        self.params_ready.clear()
        self.grad_handle = None
        self.grad_reduce_launched = False

    def register_grad_ready(self, param) -> None:
        """Mark `param`'s gradient final for this iteration; launch the bucket's reduction
        asynchronously when it is the last one."""
        if param in self.params_ready:
            raise RuntimeError(
                "a parameter's gradient became ready twice in one backward pass with "
                "--overlap-grad-reduce; run earlier micro-batches inside model.no_sync()"
            )
        self.params_ready.add(param)
        if len(self.params_ready) == len(self.params):
            self.start_grad_sync(async_op=True)

    def start_grad_sync(self, async_op: bool) -> None:
        """Scale and reduce this bucket's gradients over the data-parallel group: all-reduce, or
        reduce-scatter into the local shard with the distributed optimizer."""
        if self.grad_reduce_launched:
            raise RuntimeError(f"gradient reduction of bucket {self.index} launched twice in one iteration")
        self.grad_reduce_launched = True
        buf = self.buffer
        if buf.check_for_nan_in_grad:
            # NaN only: Inf is an fp16 overflow that the loss scaler handles by skipping the step.
            norm = self.grad_data.float().norm()
            if torch.isnan(norm):
                names = ", ".join(buf.param_names.get(p, "?") for p in self.params[:4])
                raise NonFiniteGradientError(
                    f"rank {buf.global_rank}: NaN in the gradients of bucket {self.index} "
                    f"(params {names} ...) before the data-parallel reduction; lower the lr or "
                    "check the data"
                )
        if buf.dp_group is None:
            # One rank: no collective, but the scaling still applies (expert buffers whose expert
            # data-parallel group has one rank are scaled by 1/dp_cp).
            if not buf.average_in_collective and buf.gradient_scaling_factor != 1.0:
                self.grad_data.mul_(buf.gradient_scaling_factor)
            return
        if buf.average_in_collective:
            op = dist.ReduceOp.AVG
        else:
            op = dist.ReduceOp.SUM
            if buf.gradient_scaling_factor != 1.0:
                self.grad_data.mul_(buf.gradient_scaling_factor)
        if buf.use_distributed_optimizer:
            self.grad_handle = _reduce_scatter(self.local_grad_shard(), self.grad_data, op, buf.dp_group, async_op)
        else:
            self.grad_handle = dist.all_reduce(self.grad_data, op=op, group=buf.dp_group, async_op=async_op)
        if not async_op:
            self.grad_handle = None

    def finish_grad_sync(self) -> None:
        """Wait for this bucket's reduction (launching it now if backward never completed it)."""
        if not self.grad_reduce_launched:
            self.start_grad_sync(async_op=False)
        if self.grad_handle is not None:
            self.grad_handle.wait()
            self.grad_handle = None

    # ---------------------------------------------------------------- parameters
    def start_param_sync(self, async_op: bool) -> None:
        """All-gather the updated parameter shards of the data-parallel ranks into this bucket."""
        self.finish_param_sync()
        buf = self.buffer
        self.read_back_pending = buf.fp8_params
        if buf.dp_group is not None:
            self.param_handle = _all_gather(self.param_data, self.local_param_shard(), buf.dp_group, async_op)
            if async_op:
                return
            self.param_handle = None
        self._read_back()

    def finish_param_sync(self) -> None:
        if self.param_handle is not None:
            self.param_handle.wait()
            self.param_handle = None
        self._read_back()

    def _read_back(self) -> None:
        # FP8-gathered weights: the parameters take the values of their gathered FP8 copies.
        if self.read_back_pending:
            self.read_back_pending = False
            read_back_weights(self.params)


class ParamAndGradBuffer:
    """Contiguous storage for the gradients (and with the distributed optimizer the values) of
    `params`, all of dtype `param_dtype`, split into buckets of about `bucket_size` elements.

    Args:
        params: parameters in the order they are placed (callers pass reverse registration order).
        grad_dtype: dtype of the gradient buffer.
        bucket_size: elements per bucket (a bucket closes once it reaches this size); None: one bucket.
        dp_group / dp_size / dp_rank: the group gradients are reduced over (None when size 1).
        gradient_scaling_factor: multiply gradients by this before a SUM reduction (1/dp).
        average_in_collective: reduce with the AVG op instead (already resolved for the backend).
        param_names: names used in error messages.
    """

    def __init__(
        self,
        params: list,
        param_dtype: torch.dtype,
        grad_dtype: torch.dtype,
        *,
        bucket_size: Optional[int],
        dp_group,
        dp_size: int,
        dp_rank: int,
        use_distributed_optimizer: bool,
        pad_buckets_for_high_nccl_busbw: bool,
        gradient_scaling_factor: float,
        average_in_collective: bool,
        check_for_nan_in_grad: bool,
        param_names: dict,
        fp8_params: bool = False,
    ) -> None:
        if not params:
            raise ValueError("ParamAndGradBuffer needs at least one parameter")
        self.params = list(params)
        self.param_dtype = param_dtype
        self.grad_dtype = grad_dtype
        self.dp_group = dp_group
        self.dp_size = dp_size
        self.dp_rank = dp_rank
        self.use_distributed_optimizer = use_distributed_optimizer
        self.gradient_scaling_factor = gradient_scaling_factor
        self.average_in_collective = average_in_collective
        self.check_for_nan_in_grad = check_for_nan_in_grad
        self.param_names = param_names
        if fp8_params and not use_distributed_optimizer:
            raise ValueError("FP8-gathered weights (--fp8-param-gather) need the distributed optimizer "
                             "(--use-distributed-optimizer)")
        self.fp8_params = fp8_params
        self.global_rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        device = self.params[0].device

        if use_distributed_optimizer:
            base = math.lcm(dp_size, 128)
            self._bucket_divisor = math.lcm(base, 2**16) if pad_buckets_for_high_nccl_busbw else base
        else:
            self._bucket_divisor = 1

        # Layout: param -> (start, end, bucket index); bucket boundaries.
        self.param_index_map: dict = {}
        bucket_ranges: list[tuple[int, int, list]] = []
        index = 0
        bucket_start = 0
        bucket_params: list = []
        for param in self.params:
            # With the distributed optimizer the tied embedding / output weight sits alone in its
            # bucket, so its dp shards cover the same elements on the first and last pipeline
            # stages and the embedding-group all-reduce of the shards lines up.
            own_bucket = use_distributed_optimizer and is_shared_embedding(param)
            if own_bucket and bucket_params:
                index = _round_up(index, self._bucket_divisor)
                bucket_ranges.append((bucket_start, index, bucket_params))
                bucket_start, bucket_params = index, []
            if use_distributed_optimizer:
                index = _round_up(index, _PARAM_ALIGNMENT)
            start, end = index, index + param.numel()
            self.param_index_map[param] = (start, end, len(bucket_ranges))
            bucket_params.append(param)
            index = end
            if own_bucket or (bucket_size is not None and index - bucket_start >= bucket_size):
                index = _round_up(index, self._bucket_divisor)
                bucket_ranges.append((bucket_start, index, bucket_params))
                bucket_start, bucket_params = index, []
        if bucket_params:
            index = _round_up(index, self._bucket_divisor)
            bucket_ranges.append((bucket_start, index, bucket_params))
        self.numel = index
        self.numel_unpadded = sum(p.numel() for p in self.params)

        self.grad_data = torch.zeros(self.numel, dtype=grad_dtype, device=device)
        self.param_data = None
        if use_distributed_optimizer:
            storage_dtype = torch.uint8 if fp8_params else param_dtype
            self.param_data = torch.zeros(self.numel, dtype=storage_dtype, device=device)
        with torch.no_grad():
            for param in self.params:
                start, end, _ = self.param_index_map[param]
                if self.param_data is not None and not fp8_params:
                    self.param_data[start:end].copy_(param.data.view(-1))
                    param.data = self.param_data[start:end].view(param.shape)
                param.main_grad = self.grad_data[start:end].view(param.shape)
        if fp8_params:
            attach_fp8_storage(self.params, self.param_data, self.param_index_map)
        self.buckets = [Bucket(self, i, ps, s, e) for i, (s, e, ps) in enumerate(bucket_ranges)]

    def bucket_of(self, param) -> Bucket:
        return self.buckets[self.param_index_map[param][2]]

    def reset(self) -> None:
        """Zero the gradients and forget this iteration's communication state."""
        self.grad_data.zero_()
        for bucket in self.buckets:
            bucket.reset()


def _round_up(value: int, multiple: int) -> int:
    return ((value + multiple - 1) // multiple) * multiple
