"""`get_optimizer`: builds the optimizer a run's precision and layout call for.

It sits above the optimizer classes it chooses between (optimizer.py, distrib_optimizer.py), so
that those modules never import each other in a circle; gigatron.core.optim re-exports it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .config import OptimizerConfig
from .distrib_optimizer import DistributedOptimizer
from .grad_scaler import ConstantGradScaler, DynamicGradScaler, MegatronGradScaler
from .optimizer import FP32Optimizer, MegatronOptimizer, MixedPrecisionOptimizer, get_param_groups

__all__ = ["get_optimizer"]


def _make_grad_scaler(config: OptimizerConfig, device) -> Optional[MegatronGradScaler]:
    """fp16: constant scaler with --loss-scale, else dynamic; bf16: constant only if --loss-scale."""
    if config.loss_scale is not None and (config.fp16 or config.bf16):
        return ConstantGradScaler(config.loss_scale, device=device)
    if config.fp16:
        return DynamicGradScaler(
            initial_scale=config.initial_loss_scale,
            min_scale=config.min_loss_scale,
            growth_factor=2.0,
            backoff_factor=0.5,
            growth_interval=int(config.loss_scale_window),
            hysteresis=config.hysteresis,
            device=device,
        )
    return None


def get_optimizer(
    config: OptimizerConfig,
    model_chunks,
    groups,
    no_weight_decay_cond: Optional[Callable[[str, torch.Tensor], bool]] = None,
    scale_lr_cond: Optional[Callable[[str, torch.Tensor], bool]] = None,
    lr_mult: float = 1.0,
) -> MegatronOptimizer:
    """Build the optimizer for `model_chunks` (DistributedDataParallel-wrapped).

    fp32 params -> FP32Optimizer; --bf16/--fp16 -> MixedPrecisionOptimizer;
    --use-distributed-optimizer -> DistributedOptimizer (the chunks must use it too)."""
    model_chunks = list(model_chunks)
    if not model_chunks:
        raise ValueError("get_optimizer needs at least one model chunk")
    for chunk in model_chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is None:
            raise ValueError("get_optimizer needs model chunks wrapped in DistributedDataParallel")
        if bool(ddp_config.use_distributed_optimizer) != bool(config.use_distributed_optimizer):
            raise ValueError(
                "--use-distributed-optimizer must be set in both DDPConfig and OptimizerConfig "
                f"(DDP: {ddp_config.use_distributed_optimizer}, optimizer: {config.use_distributed_optimizer})"
            )
    param_groups = get_param_groups(model_chunks, no_weight_decay_cond, scale_lr_cond, lr_mult,
                                    decoupled_lr=getattr(config, "decoupled_lr", None),
                                    decoupled_min_lr=getattr(config, "decoupled_min_lr", None))
    if not param_groups:
        raise ValueError("get_optimizer: the model has no trainable parameters")
    device = param_groups[0]["params"][0].device
    dtypes = {p.dtype for g in param_groups for p in g["params"]}
    unexpected = dtypes - {torch.float32, config.params_dtype}
    if unexpected:
        raise ValueError(
            f"model parameters are {sorted(map(str, unexpected))} but the optimizer expects "
            f"{config.params_dtype} (--bf16={config.bf16}, --fp16={config.fp16}); build the model and "
            "the optimizer with the same precision flags"
        )
    if config.use_distributed_optimizer:
        return DistributedOptimizer(config, model_chunks, groups, param_groups, _make_grad_scaler(config, device))
    if config.bf16 or config.fp16 or dtypes != {torch.float32}:
        return MixedPrecisionOptimizer(config, model_chunks, groups, param_groups, _make_grad_scaler(config, device))
    return FP32Optimizer(config, model_chunks, groups, param_groups)
