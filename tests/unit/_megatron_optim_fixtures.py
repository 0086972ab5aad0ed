"""Gigatron's side of the tests that resume Megatron-Core's full training state (the Megatron side
is tests/megatron_oracle.py `train`, tp=pp=1, and tests/megatron_parallel_oracle.py, tp/pp 2):
our model, optimizer and schedule built with the flags the Megatron run used, at any
tensor/pipeline layout, loaded from its torch_dist directory and trained on over the same batches.

    groups, ddp, optimizer, scheduler = build_training(root, dp, use_distributed_optimizer)
    loaded, losses = resume(root, dp, use_distributed_optimizer)    # losses of SAVED_AT .. TOTAL-1
    megatron_losses(root)                                          # Megatron's own continuation

One process holds the whole data-parallel batch (the `dp` ranks' micro-batches in rank order);
in a gloo group (tests/parallel/harness.py) `groups` gives the tensor/pipeline/data layout: each
data-parallel rank takes its own micro-batch, the losses are averaged over them and come back on
the last pipeline stage only (None elsewhere)."""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import megatron_oracle as oracle  # noqa: E402

SAVED_AT, TOTAL = 3, 6
T = oracle.TRAIN


def build_training(root, dp, use_distributed_optimizer, bf16=False, groups=None):
    """Our model (this rank's stage), DDP wrapper, optimizer and schedule with the flags the Megatron
    run used; `groups` (default: one process) gives the tensor/pipeline layout."""
    import gigatron
    from gigatron.core.distributed import DDPConfig, DistributedDataParallel
    from gigatron.core.models.gpt import GPTModel
    from gigatron.core.optim import OptimizerConfig, OptimizerParamScheduler, SchedulerConfig, get_optimizer
    from gigatron.core.parallel.groups import ParallelGroups

    groups = groups or ParallelGroups.single()
    template = gigatron.from_pretrained(root)
    model_config = dataclasses.replace(template.config, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else None,
                                       tensor_model_parallel_size=groups.tp.size,
                                       pipeline_model_parallel_size=groups.pp.size)
    model = GPTModel(model_config, groups, template.padded_vocab_size, seed=42, pre_process=groups.pp.rank == 0,
                     post_process=groups.pp.rank == groups.pp.size - 1)
    ddp = DistributedDataParallel(DDPConfig(use_distributed_optimizer=use_distributed_optimizer), model, groups)
    config = OptimizerConfig(bf16=bf16, lr=T["lr"], min_lr=T["min_lr"], weight_decay=T["weight_decay"],
                             adam_beta1=T["beta1"], adam_beta2=T["beta2"], adam_eps=T["eps"],
                             clip_grad=T["clip_grad"], use_distributed_optimizer=use_distributed_optimizer)
    optimizer = get_optimizer(config, [ddp], groups)
    scheduler = OptimizerParamScheduler(
        optimizer, SchedulerConfig(lr_decay_style="cosine", lr_warmup_samples=T["warmup"],
                                   lr_decay_samples=T["decay_iters"]), config,
        global_batch_size=T["micro_batch"] * dp, train_samples=T["decay_iters"])
    return groups, ddp, optimizer, scheduler


def train_step(groups, ddp, optimizer, scheduler, iteration, dp):
    """One iteration over the global batch of `iteration` (one micro-batch) through our pipeline
    schedule; the mean loss on the last stage, None on the others."""
    from gigatron.core.distributed import finalize_model_grads
    from gigatron.core.pipeline import get_forward_backward_func

    if groups.dp.size > 1:
        batch = oracle.train_batch(iteration, groups.dp.rank, dp)  # this data-parallel rank's share
    else:
        batch = torch.cat([oracle.train_batch(iteration, r, dp) for r in range(dp)])  # the global batch

    def loss_func(per_token):
        loss = per_token.float().mean()
        return loss, {"loss": loss.detach()}

    def forward_step(data_iterator, model):
        return model(batch[:, :-1], None, None, labels=batch[:, 1:]), loss_func

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    config = ddp.module.config
    reports = get_forward_backward_func(groups.pp.size)(
        forward_step_func=forward_step, data_iterator=None, model=[ddp], num_microbatches=1,
        seq_length=oracle.SEQ, micro_batch_size=batch.shape[0], groups=groups, config=config,
        finalize_model_grads_func=lambda chunks: finalize_model_grads(chunks, groups, config))
    ok, _, _ = optimizer.step()
    assert ok
    scheduler.step(T["micro_batch"] * dp)
    if not reports:
        return None
    loss = reports[0]["loss"].detach().clone()
    if groups.dp.size > 1:
        import torch.distributed as dist

        dist.all_reduce(loss, group=groups.dp.group)
    return float(loss) / groups.dp.size


def resume(root, dp, use_distributed_optimizer, load_optim=True, bf16=False, groups=None):
    """Load the Megatron checkpoint and train to TOTAL: (loaded checkpoint, our losses as float64;
    None on a stage without the loss)."""
    from gigatron.training.checkpointing import load_checkpoint

    groups, ddp, optimizer, scheduler = build_training(root, dp, use_distributed_optimizer, bf16, groups)
    loaded = load_checkpoint(str(root), [ddp], optimizer, scheduler, groups, load_optim=load_optim)
    losses = [train_step(groups, ddp, optimizer, scheduler, it, dp) for it in range(loaded.iteration, TOTAL)]
    if any(loss is None for loss in losses):
        return loaded, None
    return loaded, torch.tensor(losses, dtype=torch.float64)


def megatron_losses(root):
    """Megatron's own losses of iterations SAVED_AT .. TOTAL-1 (its uninterrupted run)."""
    return torch.load(os.path.join(root, "losses.pt"), weights_only=True)["losses"][SAVED_AT:]
