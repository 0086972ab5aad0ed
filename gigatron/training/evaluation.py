"""Evaluation during and after training: forward-only passes over the validation/test iterators,
the validation box, and a task's own evaluation hook (split from the training loop)."""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist

from gigatron.training.initialize import collective_phase

if TYPE_CHECKING:
    from gigatron.training.loop import TrainContext

__all__ = ["evaluate", "evaluate_and_report", "run_evaluation_hook", "final_validation_label"]


def evaluate(ctx: TrainContext, forward_step_func: Callable, data_iterator, num_iters: int) -> dict[str, float]:
    """Forward-only over `num_iters` global batches; returns key -> mean loss on the last stage
    (empty elsewhere). Advances consumed_valid_samples."""
    from gigatron.core.pipeline import get_forward_backward_func

    training, groups = ctx.configs.training, ctx.groups
    forward_backward = get_forward_backward_func(groups.pp.size, groups.vp_size)
    num_microbatches = training.global_batch_size // (training.micro_batch_size * groups.dp.size)
    from gigatron.core.fp8.model import amax_recording_paused

    for chunk in ctx.model:
        chunk.eval()
    totals: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad(), collective_phase("evaluation"), amax_recording_paused(ctx.fp8_states):
            for _ in range(num_iters):
                losses_reduced = forward_backward(
                    forward_step_func=forward_step_func, data_iterator=data_iterator, model=ctx.model,
                    num_microbatches=num_microbatches, seq_length=ctx.configs.transformer.seq_length,
                    micro_batch_size=training.micro_batch_size, groups=groups, config=ctx.configs.transformer,
                    forward_only=True)
                for entry in losses_reduced:
                    for key, value in entry.items():
                        value = value.detach().float().reshape(-1)
                        if value.numel() == 1:
                            value = torch.cat([value, torch.ones_like(value)])
                        totals[key] = totals[key] + value if key in totals else value.clone()
                ctx.consumed_valid_samples += training.global_batch_size
            keys = sorted(totals)
            if not keys:
                return {}
            stacked = torch.stack([totals[k] for k in keys]).to(ctx.device)  # [keys, 2]
            if groups.dp_cp.group is not None:
                dist.all_reduce(stacked, group=groups.dp_cp.group)
            values = (stacked[:, 0] / stacked[:, 1].clamp(min=1)).tolist()
    finally:
        for chunk in ctx.model:
            chunk.train()
    if training.empty_unused_memory_level >= 2 and ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(zip(keys, values))


def run_evaluation_hook(ctx: TrainContext) -> None:
    """pretrain's `evaluation_hook(ctx)` (a task's own evaluation), at most once per iteration."""
    if ctx.evaluation_hook is None or ctx.evaluation_hook_iteration == ctx.iteration:
        return
    ctx.evaluation_hook_iteration = ctx.iteration
    from gigatron.core.fp8.model import amax_recording_paused

    with amax_recording_paused(ctx.fp8_states):  # a task's forward passes leave the FP8 scales alone
        ctx.evaluation_hook(ctx)


def evaluate_and_report(ctx: TrainContext, forward_step_func, iterator, prefix: str, record: bool = True) -> dict:
    training = ctx.configs.training
    if iterator is None or training.eval_iters == 0:
        return {}
    if training.manual_gc and training.manual_gc_eval:
        gc.collect()
    losses = evaluate(ctx, forward_step_func, iterator, training.eval_iters)
    if training.manual_gc and training.manual_gc_eval:
        gc.collect()
    if losses:
        ctx.log.report_validation(prefix, ctx.iteration, losses, record=record)
    return losses


def final_validation_label(ctx: TrainContext, evaluated_here: bool) -> str:
    """Megatron's label of the end-of-run validation; when the periodic evaluation has just run at
    the same iteration, the label says why the two values differ (other validation batches)."""
    label = f"iteration {ctx.iteration} on validation set"
    if evaluated_here:
        batches = ctx.configs.training.eval_iters
        label += (f" (final evaluation, on the next {batches} validation batch{'es' if batches != 1 else ''}; "
                  f"the evaluation at iteration {ctx.iteration} above used earlier ones)")
    return label
