"""What the training loop reports: the log line at each --log-interval (with the values that
need the host), the step timers, memory, the MFU peak and --record-memory-history snapshots.

Host synchronisation happens here and only at log intervals (Megatron's behaviour): the loop keeps
each iteration's gradient norm on the device in `DeferredChecks`, whose `flush` reads them back in
one transfer at a log interval and before anything that must not see a NaN run (evaluation, a
checkpoint save, the end of training). The NaN/Inf semantics are those of a per-iteration check:
the first non-finite gradient norm raises NonFiniteLossError naming its iteration (with
--check-for-nan-in-loss-and-grad), and every non-finite one counts as a nan iteration in its
interval's log line.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from gigatron.training.logging import print_rank_0, print_rank_last

if TYPE_CHECKING:
    from gigatron.training.loop import TrainContext

__all__ = ["NonFiniteLossError", "DeferredChecks", "report", "report_timers", "report_rank_memory", "current_lr",
           "params_norm", "announce_peak", "start_memory_history", "dump_memory_snapshot", "host_float",
           "host_int"]


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/Inf (--check-for-nan-in-loss-and-grad)."""


def host_float(value) -> Optional[float]:
    """A gradient norm as a Python float; a device tensor is read back (a host sync, so only at
    log intervals)."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().reshape(-1)[0].item())
    return value


def host_int(value) -> Optional[int]:
    """A zero count as a Python int; a device tensor is read back (a host sync)."""
    if isinstance(value, torch.Tensor):
        return int(value.detach().reshape(-1)[0].item())
    return value


class DeferredChecks:
    """Each iteration's gradient norm (a device tensor, or None for a skipped step), checked for
    NaN/Inf on the host only at `flush`: one transfer for all pending iterations."""

    def __init__(self) -> None:
        self._pending: list[tuple[int, torch.Tensor]] = []

    def add(self, iteration: int, grad_norm) -> None:
        """grad_norm: a one-element device tensor, a float, or None (a skipped step)."""
        if grad_norm is not None:
            self._pending.append((iteration, grad_norm))

    def flush(self, ctx: "TrainContext") -> None:
        """Read the pending norms back (one sync); count the non-finite ones as nan iterations and,
        with --check-for-nan-in-loss-and-grad, raise at the first one (its iteration named)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        tensors = [g.detach().reshape(-1)[:1].double() for _, g in pending if isinstance(g, torch.Tensor)]
        read = iter(torch.cat(tensors).tolist() if tensors else [])  # the one sync
        values = [next(read) if isinstance(g, torch.Tensor) else float(g) for _, g in pending]
        check = ctx.configs.training.check_for_nan_in_loss_and_grad
        for (iteration, _), value in zip(pending, values):
            if math.isfinite(value):
                continue
            if check:
                raise NonFiniteLossError(
                    f"iteration {iteration}: the gradient norm is {value} (rank {ctx.run.rank}). The loss or a "
                    "gradient became NaN/Inf: lower --lr, use --bf16 instead of --fp16, or check the data; "
                    "--no-check-for-nan-in-loss-and-grad turns this check off.")
            ctx.log.add_nan()


def report_timers(ctx: TrainContext) -> None:
    """--timing-log-level: the step timers' line after the log line (the rank that prints it), and
    with --log-timers-to-tensorboard the timers in TensorBoard/W&B."""
    if ctx.timers is None:
        return
    means = ctx.timers.means_ms()
    line = ctx.timers.report()
    if line is None:
        return
    print_rank_last(line)
    if ctx.configs.logging.log_timers_to_tensorboard and ctx.log.has_backends:
        for name, value in means.items():
            ctx.log._scalar(f"{name}-time", value, ctx.iteration)  # noqa: SLF001 - the log's one writer


def current_lr(ctx: TrainContext) -> float:
    return ctx.scheduler.get_lr() if ctx.scheduler is not None else ctx.optimizer.param_groups[0]["lr"]


def report(ctx: TrainContext, batch_size: int, grad_norm, num_zeros) -> None:
    """The log line of the interval ending at this iteration (grad_norm and num_zeros of this
    iteration: numbers or device tensors; call DeferredChecks.flush first)."""
    norm_of_params = None
    if ctx.configs.logging.log_params_norm:
        norm_of_params = params_norm(ctx)
    lr = current_lr(ctx)
    loss_scale = float(ctx.optimizer.get_loss_scale().item())
    ctx.log.report(
        iteration=ctx.iteration, consumed_samples=ctx.consumed_train_samples, learning_rate=lr,
        global_batch_size=batch_size, loss_scale=loss_scale, grad_norm=host_float(grad_norm),
        num_zeros_in_grad=host_int(num_zeros), params_norm=norm_of_params)
    report_timers(ctx)
    if not ctx.memory_reported:
        report_rank_memory(ctx)
    if ctx.configs.training.check_for_nan_in_loss_and_grad and ctx.log.train_history:
        last_iteration, last_loss = ctx.log.train_history[-1]
        if last_iteration == ctx.iteration and not math.isfinite(last_loss):
            raise NonFiniteLossError(f"iteration {ctx.iteration}: the training loss is {last_loss}; lower --lr or "
                                     "check the data (--no-check-for-nan-in-loss-and-grad turns this check off)")


def report_rank_memory(ctx: TrainContext) -> None:
    """Megatron's once-per-run line of each rank of the first data-parallel replica: allocated and
    peak allocated / reserved device memory in MB after the first logged iteration."""
    ctx.memory_reported = True
    if ctx.device.type != "cuda" or ctx.groups.dp.rank != 0:
        return
    mb = 1024.0 * 1024.0
    print(f"[Rank {ctx.run.rank}] (after {ctx.iteration} iterations) memory (MB) | allocated: "
          f"{torch.cuda.memory_allocated(ctx.device) / mb} | max allocated: "
          f"{torch.cuda.max_memory_allocated(ctx.device) / mb} | reserved: {torch.cuda.memory_reserved(ctx.device) / mb} | "
          f"max reserved: {torch.cuda.max_memory_reserved(ctx.device) / mb}", flush=True)


# ------------------------------------------------------------------ --record-memory-history


def start_memory_history(training) -> bool:
    """--record-memory-history (a TrainingConfig field): start recording the CUDA allocator's history
    (before anything is allocated). Raises ValueError without CUDA. Returns whether recording started."""
    if not getattr(training, "record_memory_history", False):
        return False
    if not torch.cuda.is_available():
        raise ValueError("--record-memory-history needs CUDA (it records the CUDA caching allocator), but no CUDA "
                         "device is available; drop the flag, or use --dry-run / tools/estimate_memory.py for an "
                         "estimate on the CPU")
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    return True


def dump_memory_snapshot(ctx: TrainContext) -> Optional[str]:
    """Write the allocator snapshot of --record-memory-history (once) atomically to
    --memory-snapshot-path (rank r > 0: <name>_rank{r}<ext>); returns the path."""
    training = ctx.configs.training
    if not training.record_memory_history or ctx.memory_snapshot_written:
        return None
    ctx.memory_snapshot_written = True
    path = training.memory_snapshot_path
    if ctx.run.rank > 0:
        root, ext = os.path.splitext(path)
        path = f"{root}_rank{ctx.run.rank}{ext}"
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"
    torch.cuda.memory._dump_snapshot(temporary)
    os.replace(temporary, path)
    torch.cuda.memory._record_memory_history(enabled=None)
    print(f"> rank {ctx.run.rank}: wrote the allocator snapshot of iteration {ctx.iteration} to {path} "
          "(open it at https://pytorch.org/memory_viz)", flush=True)
    return path


def params_norm(ctx: TrainContext) -> float:
    """L2 norm of all parameters, each element counted once over tensor and pipeline ranks."""
    from gigatron.core.parallel.tags import is_shared_embedding, is_tensor_parallel

    groups = ctx.groups
    total = torch.zeros(1, dtype=torch.float32, device=ctx.device)
    for chunk in ctx.model:
        for param in chunk.module.parameters():
            duplicate_over_tp = not is_tensor_parallel(param) and groups.tp.rank > 0
            duplicate_embedding = is_shared_embedding(param) and not groups.is_pipeline_first_stage()
            if duplicate_over_tp or duplicate_embedding:
                continue
            total += param.detach().float().norm() ** 2
    if groups.mp.group is not None:
        dist.all_reduce(total, group=groups.mp.group)
    return float(total.sqrt().item())


def announce_peak(ctx: TrainContext) -> Optional[float]:
    from gigatron.core.flops import device_peak_flops

    dtype = ctx.configs.transformer.params_dtype
    peak = device_peak_flops(ctx.device, dtype)
    if peak is None:
        print_rank_0(f"> MFU: no known dense peak for {ctx.device.type} / {dtype}; MFU is not reported "
                     "(model FLOPs follow Megatron's convention)")
        return None
    tflops, description = peak
    print_rank_0(f"> MFU is model FLOPs (Megatron's convention, no recompute) / peak of {description}")
    return tflops * 1e12
