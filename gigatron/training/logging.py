"""The training log: Megatron's log line, the validation box, TensorBoard, W&B and the loss curve.

The log line keeps Megatron's fields, order and number formats (log parsers and dashboards rely on
them) and appends Gigatron's: tokens per second, model TFLOP/s per device, MFU (Megatron's FLOPs
convention divided by the device's dense peak) and peak memory. It is printed by the last rank,
which holds the loss. Losses are accumulated on the device between log intervals; the only host
synchronisation is at the log interval.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from datetime import datetime
from typing import Optional

import torch
import torch.distributed as dist

__all__ = [
    "print_rank_0",
    "print_rank_last",
    "is_last_rank",
    "format_train_log_line",
    "format_validation_box",
    "memory_report",
    "TrainingLog",
    "write_loss_curve",
    "write_loss_curves",
]

SKIPPED_KEY = "skipped iterations"
NAN_KEY = "nan iterations"
ADVANCED_KEY = "advanced iterations"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_last_rank() -> bool:
    return _rank() == _world() - 1


def print_rank_0(message: str) -> None:
    """Print on global rank 0 only."""
    if _rank() == 0:
        print(message, flush=True)


def print_rank_last(message: str) -> None:
    """Print on the last global rank only (the last pipeline stage, which holds the loss)."""
    if is_last_rank():
        print(message, flush=True)


def format_train_log_line(
    *,
    iteration: int,
    train_iters: int,
    consumed_samples: int,
    elapsed_ms_per_iteration: float,
    learning_rate: Optional[float],
    global_batch_size: int,
    losses: dict[str, float],
    loss_scale: float,
    grad_norm: Optional[float],
    num_skipped: int,
    num_nan: int,
    throughput_tflops: Optional[float] = None,
    num_zeros_in_grad: Optional[float] = None,
    params_norm: Optional[float] = None,
    extras: Optional[dict[str, str]] = None,
    now: Optional[datetime] = None,
) -> str:
    """One training log line in Megatron's format, then `extras` (name -> formatted value)."""
    stamp = (now or datetime.now()).strftime("%Y-%m-%d %H:%M:%S")
    line = f" [{stamp}]"
    line += " iteration {:8d}/{:8d} |".format(iteration, train_iters)
    line += " consumed samples: {:12d} |".format(consumed_samples)
    line += " elapsed time per iteration (ms): {:.1f} |".format(elapsed_ms_per_iteration)
    if throughput_tflops is not None:
        line += f" throughput per GPU (TFLOP/s/GPU): {throughput_tflops:.1f} |"
    if learning_rate is not None:
        line += f" learning rate: {learning_rate:.6E} |"
    line += " global batch size: {:5d} |".format(global_batch_size)
    for key, value in losses.items():
        if value > 0.0:
            line += " {}: {:.6E} |".format(key, value)
    line += " loss scale: {:.1f} |".format(loss_scale)
    if grad_norm is not None:
        line += " grad norm: {:.3f} |".format(grad_norm)
    if num_zeros_in_grad is not None:
        line += " num zeros: {:.1f} |".format(num_zeros_in_grad)
    if params_norm is not None:
        line += " params norm: {:.3f} |".format(params_norm)
    line += " number of skipped iterations: {:3d} |".format(num_skipped)
    line += " number of nan iterations: {:3d} |".format(num_nan)
    for key, value in (extras or {}).items():
        line += f" {key}: {value} |"
    return line


def format_validation_box(prefix: str, losses: dict[str, float]) -> str:
    """Megatron's boxed validation report: a dashed line, the losses and PPLs, a dashed line."""
    text = f" validation loss at {prefix} | "
    for key, value in losses.items():
        text += "{} value: {:.6E} | ".format(key, value)
        text += "{} PPL: {:.6E} | ".format(key, math.exp(min(20.0, value)))
    rule = "-" * (len(text) + 1)
    return f"{rule}\n{text}\n{rule}"


def memory_report(device: torch.device) -> dict[str, str]:
    """Peak device memory (CUDA) or the process' peak resident set size (CPU), formatted in GiB."""
    gib = 1024.0 ** 3
    if device.type == "cuda":
        return {
            "peak allocated memory (GiB)": f"{torch.cuda.max_memory_allocated(device) / gib:.2f}",
            "peak reserved memory (GiB)": f"{torch.cuda.max_memory_reserved(device) / gib:.2f}",
        }
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1.0 if sys.platform == "darwin" else 1024.0  # macOS reports bytes, Linux KiB
    return {"peak RSS (GiB)": f"{rss_kib * scale / gib:.2f}"}


def write_loss_curve(path: str, train: list[tuple[int, float]], valid: list[tuple[int, float]],
                     title: str = "loss") -> Optional[str]:
    """Plot training and validation loss against iteration into a PNG (written atomically)."""
    return write_loss_curves(path, {"": (train, valid)}, title)


def write_loss_curves(path: str, runs: dict, title: str = "loss", xlabel: str = "iteration") -> Optional[str]:
    """Several runs' loss curves in one PNG (written atomically): `runs` maps a label to (training,
    validation) lists of (iteration, loss); the label "" names a run's curves plainly ("training
    loss"). Training curves are drawn thin (faint beside other runs), validation with markers.
    None when there is nothing to draw."""
    if not any(train or valid for train, valid in runs.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gigatron.core.checkpoint.io import atomic_write

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=110)
    several = len(runs) > 1
    for index, (label, (train, valid)) in enumerate(runs.items()):
        color = f"C{index}"
        if train:
            axes.plot([i for i, _ in train], [v for _, v in train], color=color, linewidth=1.0 if several else 1.4,
                      alpha=0.35 if several else 1.0, label=f"{label} training" if label else "training loss")
        if valid:
            axes.plot([i for i, _ in valid], [v for _, v in valid], "o-", color=color, linewidth=1.4,
                      label=f"{label} validation" if label else "validation loss")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("lm loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    atomic_write(path, lambda handle: figure.savefig(handle, format="png"))
    plt.close(figure)
    return path


class TrainingLog:
    """Accumulates training statistics between log intervals and reports them.

    Args:
        logging_config: a LoggingConfig.
        train_iters: the run's total iterations (for the `iteration N/M` field).
        peak_flops: the device's dense peak FLOP/s for MFU (None: MFU not reported).
        device: where losses live (memory report for CUDA).
        world_size: number of devices (model throughput is per device).
        output_dir: where loss_curve.png goes (checkpoint dir, else TensorBoard dir; None: no PNG).
        run_config: flat dict of the run's flags, written to TensorBoard/W&B once.
    """

    def __init__(self, logging_config, *, train_iters: int, peak_flops: Optional[float], device: torch.device,
                 world_size: int, output_dir: Optional[str] = None, run_config: Optional[dict] = None) -> None:
        self.config = logging_config
        self.train_iters = train_iters
        self.peak_flops = peak_flops
        self.device = device
        self.world_size = world_size
        self.output_dir = output_dir
        self.train_history: list[tuple[int, float]] = []
        self.valid_history: list[tuple[int, float]] = []
        self._sums: dict[str, torch.Tensor] = {}
        self._advanced = 0
        self._skipped = 0
        self._nan = 0
        self._tokens = 0
        self._flops = 0.0
        self._interval_start = time.perf_counter()
        self._iterations_in_interval = 0
        self.writer = None
        self.wandb = None
        if is_last_rank():
            self._open_backends(run_config or {})

    # -- backends
    def _open_backends(self, run_config: dict) -> None:
        if self.config.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=self.config.tensorboard_dir, max_queue=self.config.tensorboard_queue_size)
            text = "\n".join(f"    {k}: {v}" for k, v in sorted(run_config.items()))
            self.writer.add_text("arguments", text, global_step=0)
        if self.config.wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("--wandb-project needs the wandb package: pip install wandb "
                                   "(or drop --wandb-project)") from None
            save_dir = self.config.wandb_save_dir or (os.path.join(self.output_dir, "wandb") if self.output_dir else None)
            if save_dir:
                os.makedirs(save_dir, exist_ok=True)
            kwargs = dict(project=self.config.wandb_project, name=self.config.wandb_exp_name or None, dir=save_dir,
                          config=run_config)
            try:
                self.wandb = wandb.init(**kwargs)
            except Exception as exc:  # no network or no login: keep the run, log offline
                print_rank_last(f"W&B online init failed ({exc}); logging offline to {save_dir}")
                self.wandb = wandb.init(mode="offline", **kwargs)

    def _scalar(self, name: str, value: float, iteration: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, iteration)
        if self.wandb is not None:
            self.wandb.log({name: value}, step=iteration)

    def resume_history(self, iteration: int) -> None:
        """Take the loss history of earlier runs (loss_curve.json in the output dir) up to `iteration`,
        so that the curve of a resumed run starts at the beginning."""
        if not self.output_dir:
            return
        path = os.path.join(self.output_dir, "loss_curve.json")
        if not os.path.isfile(path):
            return
        try:
            with open(path, encoding="utf-8") as handle:
                saved = json.load(handle)
        except (OSError, ValueError):
            return  # a damaged history only costs the early part of the plot
        self.train_history = [(int(i), float(v)) for i, v in saved.get("train", []) if i <= iteration]
        self.valid_history = [(int(i), float(v)) for i, v in saved.get("valid", []) if i <= iteration]

    def start_interval(self) -> None:
        """Start timing the next log interval now (call when training starts)."""
        self._interval_start = time.perf_counter()

    def exclude_time(self, seconds: float) -> None:
        """Leave `seconds` (evaluation, checkpoint saving) out of the iteration time and throughput."""
        self._interval_start += seconds

    # -- accumulation (no host sync)
    def add_iteration(self, losses: dict[str, torch.Tensor], *, skipped: bool, tokens: int, flops: float) -> None:
        """Record one iteration: `losses` are device scalars (averaged over the batch)."""
        self._iterations_in_interval += 1
        self._tokens += tokens
        self._flops += flops
        if skipped:
            self._skipped += 1
            return
        self._advanced += 1
        for key, value in losses.items():
            value = value.detach().float()
            self._sums[key] = self._sums[key] + value if key in self._sums else value.clone()

    @property
    def has_backends(self) -> bool:
        """TensorBoard or W&B is open (on the last rank)."""
        return self.writer is not None or self.wandb is not None

    def tensorboard_step(self, iteration: int, losses: dict[str, torch.Tensor], *, learning_rate: Optional[float],
                         global_batch_size: int, loss_scale: float, grad_norm: Optional[float]) -> None:
        """Write this iteration's loss, learning rate, batch size, loss scale and gradient norm to
        TensorBoard/W&B (every --tensorboard-log-interval iterations; the loop calls it each one)."""
        if not self.has_backends or iteration % self.config.tensorboard_log_interval != 0:
            return
        for key, value in losses.items():
            self._scalar(key, float(value.detach().float().item()), iteration)
        if learning_rate is not None and self.config.log_learning_rate_to_tensorboard:
            self._scalar("learning-rate", learning_rate, iteration)
        if self.config.log_batch_size_to_tensorboard:
            self._scalar("batch-size", global_batch_size, iteration)
        if self.config.log_loss_scale_to_tensorboard:
            self._scalar("loss-scale", loss_scale, iteration)
        if grad_norm is not None:
            self._scalar("grad-norm", grad_norm, iteration)

    def add_nan(self) -> None:
        self._nan += 1

    # -- reporting (syncs)
    def report(self, *, iteration: int, consumed_samples: int, learning_rate: Optional[float], global_batch_size: int,
               loss_scale: float, grad_norm: Optional[float], num_zeros_in_grad=None, params_norm=None,
               mem_to_tensorboard: bool = True) -> Optional[str]:
        """Print the log line for the interval that ends at `iteration` and reset the accumulators."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - self._interval_start
        iters = max(1, self._iterations_in_interval)
        averages = {k: (v / max(1, self._advanced)).item() for k, v in self._sums.items()}
        seconds_per_iteration = elapsed / iters
        tokens_per_second = self._tokens / elapsed if elapsed > 0 else 0.0
        tflops_per_device = self._flops / elapsed / self.world_size / 1e12 if elapsed > 0 else 0.0
        extras = {
            "tokens per second": f"{tokens_per_second:.1f}",
            "tokens per second per device": f"{tokens_per_second / self.world_size:.1f}",
            "model TFLOP/s per device": f"{tflops_per_device:.2f}",
        }
        if self.peak_flops:
            extras["MFU"] = f"{100.0 * tflops_per_device * 1e12 / self.peak_flops:.2f}%"
        extras.update(memory_report(self.device))
        line = format_train_log_line(
            iteration=iteration, train_iters=self.train_iters, consumed_samples=consumed_samples,
            elapsed_ms_per_iteration=seconds_per_iteration * 1000.0, learning_rate=learning_rate,
            global_batch_size=global_batch_size, losses=averages, loss_scale=loss_scale, grad_norm=grad_norm,
            num_skipped=self._skipped, num_nan=self._nan,
            throughput_tflops=tflops_per_device if self.config.log_throughput else None,
            num_zeros_in_grad=num_zeros_in_grad, params_norm=params_norm, extras=extras,
        )
        if "lm loss" in averages:
            self.train_history.append((iteration, averages["lm loss"]))
        elif averages:
            self.train_history.append((iteration, next(iter(averages.values()))))
        if is_last_rank():
            print(line, flush=True)
            self._report_backends(iteration, averages, learning_rate, global_batch_size, loss_scale, grad_norm,
                                  num_zeros_in_grad, params_norm, seconds_per_iteration, tflops_per_device)
        self._sums = {}
        self._advanced = self._skipped = self._nan = self._tokens = 0
        self._flops = 0.0
        self._iterations_in_interval = 0
        self._interval_start = time.perf_counter()
        return line

    def _report_backends(self, iteration, averages, learning_rate, global_batch_size, loss_scale, grad_norm,
                         num_zeros_in_grad, params_norm, seconds_per_iteration, tflops_per_device) -> None:
        # The per-iteration values (losses, learning rate, batch size, loss scale, gradient norm) are
        # written by tensorboard_step every --tensorboard-log-interval iterations; what is measured
        # over a log interval is written here.
        if self.writer is None and self.wandb is None:
            return
        if num_zeros_in_grad is not None:
            self._scalar("num-zeros", num_zeros_in_grad, iteration)
        if params_norm is not None:
            self._scalar("params-norm", params_norm, iteration)
        self._scalar("iteration-time", seconds_per_iteration, iteration)
        if self.config.log_throughput:
            self._scalar("throughput", tflops_per_device, iteration)
        if self.config.log_memory_to_tensorboard and self.device.type == "cuda":
            self._scalar("mem-allocated-bytes", torch.cuda.memory_allocated(self.device), iteration)
            self._scalar("mem-reserved-bytes", torch.cuda.memory_reserved(self.device), iteration)
            self._scalar("mem-max-allocated-bytes", torch.cuda.max_memory_allocated(self.device), iteration)

    def report_validation(self, prefix: str, iteration: int, losses: dict[str, float], record: bool = True) -> str:
        """Print the validation box; record the loss for the curve and the backends."""
        box = format_validation_box(prefix, losses)
        print_rank_last(box)
        if record and losses:
            key = "lm loss" if "lm loss" in losses else next(iter(losses))
            self.valid_history.append((iteration, losses[key]))
        if is_last_rank():
            for key, value in losses.items():
                self._scalar(f"{key} validation", value, iteration)
                if self.config.log_validation_ppl_to_tensorboard:
                    self._scalar(f"{key} validation ppl", math.exp(min(20.0, value)), iteration)
        return box

    def write_loss_curve(self) -> Optional[str]:
        """Write `<output_dir>/loss_curve.png` (last rank; no-op without an output dir or --no-loss-curve)."""
        if not self.config.loss_curve or not self.output_dir or not is_last_rank():
            return None
        from gigatron.core.checkpoint.io import atomic_write_text

        os.makedirs(self.output_dir, exist_ok=True)
        atomic_write_text(os.path.join(self.output_dir, "loss_curve.json"),
                          json.dumps({"train": self.train_history, "valid": self.valid_history}))
        return write_loss_curve(os.path.join(self.output_dir, "loss_curve.png"), self.train_history, self.valid_history)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
