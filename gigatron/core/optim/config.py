"""Configuration of the optimizer (OptimizerConfig) and of the lr / weight-decay schedule
(SchedulerConfig). Field names are Megatron's flag names with '_' for '-'."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from gigatron.core.fields import DistributedOptimizerConfig
from gigatron.core.transformer.config import PrecisionConfig, check_one_precision

__all__ = ["OptimizerConfig", "SchedulerConfig"]

_OPTIMIZERS = ("adam", "sgd")
_LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
_WSD_DECAY_STYLES = ("exponential", "linear", "cosine")
_WD_INCR_STYLES = ("constant", "linear", "cosine")


@dataclass
class OptimizerConfig(PrecisionConfig, DistributedOptimizerConfig):
    """Optimizer, mixed precision and gradient clipping flags (bf16, fp16 and params_dtype come
    from PrecisionConfig, shared with TransformerConfig; use_distributed_optimizer from
    DistributedOptimizerConfig, shared with DDPConfig)."""

    optimizer: str = "adam"
    """Optimizer: 'adam' (AdamW, decoupled weight decay) or 'sgd' (--optimizer)."""

    lr: Optional[float] = None
    """Peak learning rate (--lr). Required."""

    min_lr: float = 0.0
    """Learning rate floor of the decay (--min-lr)."""

    decoupled_lr: Optional[float] = None
    """Peak learning rate of the input embedding and the output layer (their own schedule, with the
    warmup and decay of --lr); the other parameters keep --lr."""

    decoupled_min_lr: Optional[float] = None
    """Learning rate floor of the input embedding and the output layer with --decoupled-lr.
    Default: --min-lr."""

    weight_decay: float = 0.01
    """Weight decay coefficient for L2 regularization (--weight-decay)."""

    adam_beta1: float = 0.9
    """Adam's first moment coefficient (--adam-beta1)."""

    adam_beta2: float = 0.999
    """Adam's second moment coefficient (--adam-beta2)."""

    adam_eps: float = 1e-8
    """Adam's denominator term for numerical stability (--adam-eps)."""

    sgd_momentum: float = 0.9
    """Momentum factor for SGD (--sgd-momentum)."""

    clip_grad: float = 1.0
    """Clip gradients to this global L2 norm over all parameters; 0 disables (--clip-grad)."""

    loss_scale: Optional[float] = None
    """Constant loss scale (a positive power of 2 helps convergence); None means dynamic loss
    scaling for fp16 (--loss-scale)."""

    initial_loss_scale: float = 2.0**32
    """Initial dynamic loss scale (--initial-loss-scale)."""

    min_loss_scale: float = 1.0
    """Smallest dynamic loss scale (--min-loss-scale)."""

    loss_scale_window: float = 1000
    """Number of overflow-free steps after which the dynamic loss scale doubles (--loss-scale-window)."""

    hysteresis: int = 2
    """Number of overflows tolerated before the dynamic loss scale halves (--hysteresis)."""

    log_num_zeros_in_grad: bool = False
    """Count the zeros in the (clipped) gradients each step and return the count (--log-num-zeros-in-grad)."""

    def __post_init__(self) -> None:
        validate_optimizer_config(self)


def validate_optimizer_config(config: OptimizerConfig) -> None:
    """Raise ValueError naming the flags when the optimizer settings are inconsistent.

    --bf16 / --fp16 with the default fp32 params_dtype set params_dtype to bf16 / fp16."""
    if config.optimizer not in _OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {_OPTIMIZERS}, got {config.optimizer!r}.")
    check_one_precision(config.bf16, config.fp16)
    wanted = torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else torch.float32
    if config.params_dtype is None or (config.params_dtype == torch.float32 and wanted != torch.float32):
        config.params_dtype = wanted
    if config.params_dtype != wanted:
        raise ValueError(
            f"params_dtype {config.params_dtype} contradicts --bf16={config.bf16} / --fp16={config.fp16}; "
            "params_dtype must be bfloat16 with --bf16, float16 with --fp16, float32 otherwise."
        )
    if config.lr is not None and config.min_lr > config.lr:
        raise ValueError(f"--min-lr ({config.min_lr}) must not exceed --lr ({config.lr}).")
    if config.decoupled_min_lr is not None and config.decoupled_lr is None:
        raise ValueError("--decoupled-min-lr needs --decoupled-lr (the embedding and output layer's peak learning "
                         "rate).")
    if config.decoupled_lr is not None and config.decoupled_min_lr is not None \
            and config.decoupled_min_lr > config.decoupled_lr:
        raise ValueError(f"--decoupled-min-lr ({config.decoupled_min_lr}) must not exceed --decoupled-lr "
                         f"({config.decoupled_lr}).")
    if config.clip_grad < 0:
        raise ValueError(f"--clip-grad must be >= 0 (0 disables clipping), got {config.clip_grad}.")
    if config.loss_scale is not None and config.loss_scale <= 0:
        raise ValueError(f"--loss-scale must be positive (or unset for dynamic scaling), got {config.loss_scale}.")
    if config.hysteresis < 1:
        raise ValueError(f"--hysteresis must be >= 1, got {config.hysteresis}.")
    if config.loss_scale_window < 1:
        raise ValueError(f"--loss-scale-window must be >= 1, got {config.loss_scale_window}.")
    if config.min_loss_scale <= 0 or config.initial_loss_scale < config.min_loss_scale:
        raise ValueError(
            f"need 0 < --min-loss-scale ({config.min_loss_scale}) <= --initial-loss-scale "
            f"({config.initial_loss_scale})."
        )


@dataclass
class SchedulerConfig:
    """Learning-rate and weight-decay schedule flags. The schedule counts samples: iteration-based
    flags are multiplied by the global batch size."""

    lr_decay_style: str = "linear"
    """Learning rate decay: constant, linear, cosine, inverse-square-root or WSD (--lr-decay-style)."""

    lr_wsd_decay_style: str = "exponential"
    """Anneal shape of the WSD schedule's final phase: exponential, linear or cosine (--lr-wsd-decay-style)."""

    lr_decay_iters: Optional[int] = None
    """Iterations over which to decay the lr; None: --train-iters (--lr-decay-iters)."""

    lr_decay_samples: Optional[int] = None
    """Samples over which to decay the lr; None: --train-samples (--lr-decay-samples)."""

    lr_wsd_decay_iters: Optional[int] = None
    """Iterations of the WSD anneal phase (--lr-wsd-decay-iters)."""

    lr_wsd_decay_samples: Optional[int] = None
    """Samples of the WSD anneal phase (--lr-wsd-decay-samples)."""

    lr_warmup_fraction: Optional[float] = None
    """Fraction of the lr decay span used for linear warmup (--lr-warmup-fraction)."""

    lr_warmup_iters: int = 0
    """Iterations of linear lr warmup (--lr-warmup-iters)."""

    lr_warmup_samples: int = 0
    """Samples of linear lr warmup (--lr-warmup-samples)."""

    lr_warmup_init: float = 0.0
    """Learning rate at the start of warmup (--lr-warmup-init)."""

    start_weight_decay: Optional[float] = None
    """Weight decay at the start of training; None: --weight-decay (--start-weight-decay)."""

    end_weight_decay: Optional[float] = None
    """Weight decay at the end of training; None: --weight-decay (--end-weight-decay)."""

    weight_decay_incr_style: str = "constant"
    """Weight decay increment from start to end: constant, linear or cosine (--weight-decay-incr-style)."""

    override_opt_param_scheduler: bool = False
    """Ignore the scheduler values in a checkpoint and use the ones given here
    (--override-opt_param-scheduler)."""

    use_checkpoint_opt_param_scheduler: bool = False
    """Take the scheduler values (lr, warmup, decay) from the checkpoint
    (--use-checkpoint-opt_param-scheduler)."""

    def __post_init__(self) -> None:
        validate_scheduler_config(self)


def validate_scheduler_config(config: SchedulerConfig) -> None:
    """Raise ValueError naming the flags when the schedule settings are inconsistent."""
    if config.lr_decay_style not in _LR_DECAY_STYLES:
        raise ValueError(f"--lr-decay-style must be one of {_LR_DECAY_STYLES}, got {config.lr_decay_style!r}.")
    if config.lr_wsd_decay_style not in _WSD_DECAY_STYLES:
        raise ValueError(
            f"--lr-wsd-decay-style must be one of {_WSD_DECAY_STYLES}, got {config.lr_wsd_decay_style!r}."
        )
    if config.weight_decay_incr_style not in _WD_INCR_STYLES:
        raise ValueError(
            f"--weight-decay-incr-style must be one of {_WD_INCR_STYLES}, got {config.weight_decay_incr_style!r}."
        )
    if config.override_opt_param_scheduler and config.use_checkpoint_opt_param_scheduler:
        raise ValueError(
            "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are mutually "
            "exclusive; keep one."
        )
    given = [flag for flag, value in (("--lr-warmup-fraction", config.lr_warmup_fraction is not None),
                                      ("--lr-warmup-iters", config.lr_warmup_iters),
                                      ("--lr-warmup-samples", config.lr_warmup_samples)) if value]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} are mutually exclusive; give one warmup length.")
    if config.lr_warmup_fraction is not None and not 0.0 <= config.lr_warmup_fraction < 1.0:
        raise ValueError(f"--lr-warmup-fraction must be in [0, 1), got {config.lr_warmup_fraction}.")
