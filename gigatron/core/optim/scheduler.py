"""Learning-rate and weight-decay schedule (Megatron's OptimizerParamScheduler).

The schedule counts *samples*: the training loop calls ``step(increment=global_batch_size)`` once
per iteration, and iteration-based flags are converted to samples with the global batch size.

Learning rate at sample count n (W = warmup, D = decay span, both in samples):
  n <= W (W > 0):     lr_warmup_init + (max_lr - lr_warmup_init) * n / W
  constant:           max_lr
  n > D:              min_lr
  inverse-square-root: max(min_lr, max_lr * sqrt(max(W, 1)) / sqrt(max(n, 1)))
  otherwise r = (n - W) / (D - W) and lr = min_lr + coeff * (max_lr - min_lr) with
    linear  coeff = 1 - r
    cosine  coeff = 0.5 * (cos(pi * r) + 1)
    WSD     coeff = 1 until n > D - S (S = anneal span), then with q = (n - (D - S)) / S:
            exponential 2 * 0.5**q - 1, linear 1 - q, cosine 0.5 * (cos(pi * q) + 1)
Weight decay at n (I = increment span): n > I -> end; constant -> end (start must equal end);
  linear start + (end - start) * n / I; cosine start + (end - start) * 0.5 * (cos(pi * (1 - n / I)) + 1).

Each optimizer param group may carry 'lr_mult' and 'wd_mult' (default 1) and its own 'max_lr' /
'min_lr'; the group's lr is get_lr(group) * lr_mult and its weight decay get_wd() * wd_mult.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

from .config import OptimizerConfig, SchedulerConfig

__all__ = ["OptimizerParamScheduler", "SchedulerCheckpointMismatch"]

logger = logging.getLogger(__name__)

# The schedule values a checkpoint must agree on: attribute -> (what it is, unit, the flags that set it).
_CHECKED = {
    "max_lr": ("the peak learning rate", None, "--lr"),
    "min_lr": ("the minimum learning rate", None, "--min-lr"),
    "lr_warmup_steps": ("the learning-rate warmup", "samples",
                        "--lr-warmup-iters, --lr-warmup-samples or --lr-warmup-fraction"),
    "lr_decay_steps": ("the learning-rate decay span", "samples",
                       "--train-iters or --train-samples, unless --lr-decay-iters/--lr-decay-samples is given"),
    "lr_decay_style": ("the learning-rate decay style", None, "--lr-decay-style"),
    "start_wd": ("the start weight decay", None, "--start-weight-decay or --weight-decay"),
    "end_wd": ("the end weight decay", None, "--end-weight-decay or --weight-decay"),
    "wd_incr_steps": ("the weight-decay increment span", "samples", "--train-iters or --train-samples"),
    "wd_incr_style": ("the weight-decay increment style", None, "--weight-decay-incr-style"),
}


class SchedulerCheckpointMismatch(ValueError):
    """A scheduler value in the checkpoint differs from the one given on the command line."""


class OptimizerParamScheduler:
    """Sets lr and weight decay of every param group of `optimizer` from the consumed samples.

    Args:
        optimizer: a torch optimizer or a MegatronOptimizer (anything with ``param_groups``).
        config: the schedule flags.
        optimizer_config: gives ``lr`` (the peak), ``min_lr`` and ``weight_decay`` (the default for
            start/end weight decay).
        global_batch_size: samples per iteration; converts the ``*_iters`` flags to samples.
        train_iters / train_samples: the training length (exactly one); the default decay span and
            the weight-decay increment span.
    """

    def __init__(
        self,
        optimizer,
        config: SchedulerConfig,
        optimizer_config: OptimizerConfig,
        *,
        global_batch_size: int,
        train_iters: Optional[int] = None,
        train_samples: Optional[int] = None,
    ) -> None:
        if (train_iters is None) == (train_samples is None):
            raise ValueError("OptimizerParamScheduler needs exactly one of --train-iters and --train-samples.")
        if optimizer_config.lr is None:
            raise ValueError("--lr is required to build the learning-rate schedule.")
        if global_batch_size <= 0:
            raise ValueError(f"global batch size must be positive, got {global_batch_size}.")
        self.optimizer = optimizer
        self.config = config
        self.global_batch_size = global_batch_size
        gbs = global_batch_size
        if train_iters is not None:
            if config.lr_decay_samples is not None or config.lr_wsd_decay_samples is not None or config.lr_warmup_samples:
                raise ValueError(
                    "--train-iters cannot be combined with --lr-decay-samples/--lr-wsd-decay-samples/"
                    "--lr-warmup-samples; use the *-iters flags."
                )
            decay_iters = config.lr_decay_iters if config.lr_decay_iters is not None else train_iters
            self.lr_decay_steps = decay_iters * gbs
            self.wd_incr_steps = train_iters * gbs
            self.wsd_decay_steps = (
                config.lr_wsd_decay_iters * gbs if config.lr_wsd_decay_iters is not None else None
            )
            warmup_explicit = config.lr_warmup_iters * gbs
        else:
            if config.lr_decay_iters is not None or config.lr_wsd_decay_iters is not None or config.lr_warmup_iters:
                raise ValueError(
                    "--train-samples cannot be combined with --lr-decay-iters/--lr-wsd-decay-iters/"
                    "--lr-warmup-iters; use the *-samples flags."
                )
            self.lr_decay_steps = config.lr_decay_samples if config.lr_decay_samples is not None else train_samples
            self.wd_incr_steps = train_samples
            self.wsd_decay_steps = config.lr_wsd_decay_samples
            warmup_explicit = config.lr_warmup_samples
        if config.lr_warmup_fraction is not None:
            self.lr_warmup_steps = config.lr_warmup_fraction * self.lr_decay_steps
        else:
            self.lr_warmup_steps = warmup_explicit

        self.max_lr = float(optimizer_config.lr)
        self.min_lr = float(optimizer_config.min_lr)
        self.init_lr = float(config.lr_warmup_init)
        self.lr_decay_style = config.lr_decay_style
        self.lr_wsd_decay_style = config.lr_wsd_decay_style
        wd = optimizer_config.weight_decay
        self.start_wd = float(config.start_weight_decay if config.start_weight_decay is not None else wd)
        self.end_wd = float(config.end_weight_decay if config.end_weight_decay is not None else wd)
        self.wd_incr_style = config.weight_decay_incr_style
        self.override_opt_param_scheduler = config.override_opt_param_scheduler
        self.use_checkpoint_opt_param_scheduler = config.use_checkpoint_opt_param_scheduler
        self._validate()
        self.num_steps = 0
        self.step(0)
        logger.info("learning rate decay style: %s", self.lr_decay_style)

    def _validate(self) -> None:
        if self.min_lr < 0.0:
            raise ValueError(f"--min-lr must be >= 0, got {self.min_lr}.")
        if self.max_lr < self.min_lr:
            raise ValueError(f"--lr ({self.max_lr}) must be >= --min-lr ({self.min_lr}).")
        if self.init_lr > self.max_lr:
            raise ValueError(f"--lr-warmup-init ({self.init_lr}) must be <= --lr ({self.max_lr}).")
        if self.lr_decay_steps <= 0:
            raise ValueError(f"the lr decay span must be positive, got {self.lr_decay_steps} samples.")
        if self.lr_warmup_steps >= self.lr_decay_steps:
            raise ValueError(
                f"lr warmup ({self.lr_warmup_steps} samples) must be shorter than the lr decay span "
                f"({self.lr_decay_steps} samples); lower --lr-warmup-* or raise --lr-decay-*."
            )
        if self.lr_decay_style == "WSD":
            if self.wsd_decay_steps is None:
                raise ValueError("--lr-decay-style WSD needs --lr-wsd-decay-iters or --lr-wsd-decay-samples.")
            if not 0 < self.wsd_decay_steps <= self.lr_decay_steps:
                raise ValueError(
                    f"the WSD anneal span ({self.wsd_decay_steps} samples) must be in (0, lr decay span "
                    f"{self.lr_decay_steps}]."
                )
        if self.wd_incr_style == "constant" and self.start_wd != self.end_wd:
            raise ValueError(
                f"--weight-decay-incr-style constant needs --start-weight-decay ({self.start_wd}) == "
                f"--end-weight-decay ({self.end_wd}); pick linear or cosine to change it over training."
            )
        if self.wd_incr_style != "constant":
            if self.start_wd < 0.0 or self.end_wd < self.start_wd:
                raise ValueError(
                    f"need 0 <= --start-weight-decay ({self.start_wd}) <= --end-weight-decay ({self.end_wd})."
                )
            if self.wd_incr_steps <= 0:
                raise ValueError("the weight-decay increment span (training length) must be positive.")

    # ------------------------------------------------------------------ formulas
    def get_wd(self) -> float:
        """Weight decay at the current sample count."""
        if self.num_steps > self.wd_incr_steps:
            return self.end_wd
        if self.wd_incr_style == "constant":
            return self.end_wd
        ratio = float(self.num_steps) / float(self.wd_incr_steps)
        if self.wd_incr_style == "linear":
            coeff = ratio
        else:  # cosine
            coeff = 0.5 * (math.cos(math.pi * (1.0 - ratio)) + 1.0)
        return self.start_wd + coeff * (self.end_wd - self.start_wd)

    def get_lr(self, param_group: Optional[dict] = None) -> float:
        """Learning rate (before the group's lr_mult) at the current sample count."""
        group = param_group or {}
        max_lr = group.get("max_lr", self.max_lr)
        min_lr = group.get("min_lr", self.min_lr)
        n = self.num_steps
        warmup = self.lr_warmup_steps
        if warmup > 0 and n <= warmup:
            return self.init_lr + (max_lr - self.init_lr) * float(n) / float(warmup)
        if self.lr_decay_style == "constant":
            return max_lr
        if n > self.lr_decay_steps:
            return min_lr
        if self.lr_decay_style == "inverse-square-root":
            lr = max_lr * math.sqrt(max(warmup, 1)) / math.sqrt(max(n, 1))
            return max(min_lr, lr)
        ratio = float(n - warmup) / float(self.lr_decay_steps - warmup)
        if self.lr_decay_style == "linear":
            coeff = 1.0 - ratio
        elif self.lr_decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:  # WSD: constant, then anneal over the last wsd_decay_steps samples
            anneal_start = self.lr_decay_steps - self.wsd_decay_steps
            if n <= anneal_start:
                coeff = 1.0
            else:
                q = float(n - anneal_start) / float(self.wsd_decay_steps)
                if self.lr_wsd_decay_style == "linear":
                    coeff = 1.0 - q
                elif self.lr_wsd_decay_style == "cosine":
                    coeff = 0.5 * (math.cos(math.pi * q) + 1.0)
                else:  # exponential
                    coeff = 2.0 * math.pow(0.5, q) - 1.0
        return min_lr + coeff * (max_lr - min_lr)

    def step(self, increment: int) -> None:
        """Advance by `increment` samples and set lr / weight_decay of every param group."""
        self.num_steps += increment
        new_wd = self.get_wd()
        for group in self.optimizer.param_groups:
            group["lr"] = self.get_lr(group) * group.get("lr_mult", 1.0)
            group["weight_decay"] = new_wd * group.get("wd_mult", 1.0)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Megatron's keys: values needed to check and resume the schedule."""
        return {
            "max_lr": self.max_lr,
            "lr_warmup_steps": self.lr_warmup_steps,
            "num_steps": self.num_steps,
            "lr_decay_style": self.lr_decay_style,
            "lr_decay_steps": self.lr_decay_steps,
            "min_lr": self.min_lr,
            "start_wd": self.start_wd,
            "end_wd": self.end_wd,
            "wd_incr_style": self.wd_incr_style,
            "wd_incr_steps": self.wd_incr_steps,
        }

    def _describe(self, key: str, value) -> str:
        """`value` of the checked quantity `key` in words, with its unit."""
        unit = _CHECKED[key][1]
        if unit != "samples" or not isinstance(value, (int, float)):
            return f"{value:g}" if isinstance(value, float) else str(value)
        text = f"{value:,.10g} samples"
        if value and value % self.global_batch_size == 0:
            text += f" ({value / self.global_batch_size:,.10g} iterations of {self.global_batch_size} samples)"
        return text

    def _resolve(self, key: str, current, saved, mismatches: list):
        """--override-opt-param-scheduler keeps `current`; --use-checkpoint-opt-param-scheduler takes
        `saved`; otherwise a difference is recorded in `mismatches` and `current` kept."""
        name = _CHECKED[key][0]
        if self.override_opt_param_scheduler:
            logger.info(" > overriding %s value to %s", name, current)
            return current
        if self.use_checkpoint_opt_param_scheduler:
            logger.info(" > using checkpoint value %s for %s", saved, name)
            return saved
        if current != saved:
            mismatches.append(f"{name} is {self._describe(key, current)} in this run but "
                              f"{self._describe(key, saved)} in the checkpoint (set by {_CHECKED[key][2]})")
        return current

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the schedule (accepts Megatron's older key names too). Raises
        SchedulerCheckpointMismatch naming every value that differs from this run's flags."""
        sd = state_dict
        saved = {
            "max_lr": sd["start_lr"] if "start_lr" in sd else sd["max_lr"],
            "min_lr": sd["min_lr"],
            "lr_warmup_steps": sd.get("warmup_iter", sd.get("warmup_steps", sd.get("lr_warmup_steps"))),
            "lr_decay_steps": sd.get("end_iter", sd.get("decay_steps", sd.get("lr_decay_steps"))),
            "lr_decay_style": sd.get("decay_style", sd.get("lr_decay_style")),
        }
        if "start_wd" in sd:
            saved.update({key: sd[key] for key in ("start_wd", "end_wd", "wd_incr_steps", "wd_incr_style")})
        num_steps = sd["num_iters"] if "num_iters" in sd else sd["num_steps"]
        mismatches: list[str] = []
        resolved = {key: self._resolve(key, getattr(self, key), value, mismatches) for key, value in saved.items()}
        if mismatches:
            raise SchedulerCheckpointMismatch(
                "the checkpoint's learning-rate schedule differs from this run's: " + "; ".join(mismatches)
                + ". Resume with the flags the checkpoint was trained with, or pass --override-opt-param-scheduler "
                "to continue with this run's schedule (or --use-checkpoint-opt-param-scheduler to keep the "
                "checkpoint's).")
        for key, value in resolved.items():
            setattr(self, key, value)
        self.num_steps = 0
        self.step(increment=num_steps)
