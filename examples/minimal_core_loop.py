"""Train a tiny GPT for a few steps with `gigatron.core` alone: no argparse, no gigatron.training.

    python examples/minimal_core_loop.py [--steps 8]

Builds the parallel groups of one process, a GPT model, the data-parallel wrapper, the optimizer and
learning-rate schedule, mock data and the (non-pipelined) schedule, then runs the same training step
that `pretrain_gpt.py` runs at any scale.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from gigatron.core.data import DataConfig, build_gpt_datasets, build_pretraining_data_loader
from gigatron.core.distributed import DDPConfig, DistributedDataParallel, finalize_model_grads
from gigatron.core.models.gpt import GPTModel
from gigatron.core.optim import OptimizerConfig, OptimizerParamScheduler, SchedulerConfig, get_optimizer
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.parallel.random import model_parallel_seed
from gigatron.core.pipeline import get_forward_backward_func
from gigatron.core.tokenizers import NullTokenizer, vocab_size_with_padding
from gigatron.core.transformer.config import TransformerConfig

SEQ_LENGTH, MICRO_BATCH, NUM_MICROBATCHES, SEED = 16, 2, 2, 1234


def loss_func(loss_mask, per_token_loss):
    """Mean loss over the tokens of the mask; logs [loss_sum, num_tokens]."""
    mask = loss_mask.reshape(-1)  # [b * s]
    loss_sum = (per_token_loss.float().reshape(-1) * mask).sum()
    num_tokens = mask.sum()
    return loss_sum / num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens])}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    device = next(model.parameters()).device
    output = model(batch["tokens"].to(device), batch["position_ids"].to(device), None,
                   labels=batch["labels"].to(device))  # per-token loss [b, s]
    return output, partial(loss_func, batch["loss_mask"].to(device))


def main(steps: int) -> list[float]:
    groups = ParallelGroups.single()
    model_parallel_seed(SEED, groups)
    tokenizer = NullTokenizer(vocab_size=4096)  # mock documents use ids below 4096
    vocab = vocab_size_with_padding(tokenizer.vocab_size, 128, groups.tp.size)
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=SEQ_LENGTH,
                               max_position_embeddings=SEQ_LENGTH, attention_dropout=0.0, hidden_dropout=0.0)
    model = DistributedDataParallel(DDPConfig(), GPTModel(config, groups, vocab, seed=SEED), groups)
    optimizer_config = OptimizerConfig(lr=3e-3, min_lr=3e-4, weight_decay=0.01, clip_grad=1.0)
    optimizer = get_optimizer(optimizer_config, [model], groups)
    global_batch = MICRO_BATCH * NUM_MICROBATCHES
    schedule = SchedulerConfig(lr_decay_style="cosine", lr_warmup_iters=min(2, steps - 1))
    scheduler = OptimizerParamScheduler(optimizer, schedule, optimizer_config, global_batch_size=global_batch,
                                        train_iters=steps)

    data_config = DataConfig(mock_data=True, seq_length=SEQ_LENGTH, seed=SEED)
    train, _, _ = build_gpt_datasets(data_config, tokenizer, [steps * global_batch, 0, 0])
    data_iterator = iter(build_pretraining_data_loader(train, 0, MICRO_BATCH, 0, 1, num_workers=0))

    forward_backward = get_forward_backward_func(groups.pp.size, groups.vp_size)
    losses = []
    for step in range(1, steps + 1):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        logged = forward_backward(
            forward_step_func=forward_step, data_iterator=data_iterator, model=[model],
            num_microbatches=NUM_MICROBATCHES, seq_length=SEQ_LENGTH, micro_batch_size=MICRO_BATCH, groups=groups,
            config=config, grad_scale_func=optimizer.scale_loss,
            finalize_model_grads_func=lambda chunks: finalize_model_grads(chunks, groups, config))
        _, grad_norm, _ = optimizer.step()
        scheduler.step(increment=global_batch)
        total = torch.stack([d["lm loss"] for d in logged]).sum(dim=0)  # [loss_sum, num_tokens]
        losses.append(float(total[0] / total[1]))
        print(f"step {step}: lm loss {losses[-1]:.4f}  grad norm {grad_norm:.3f}  lr {scheduler.get_lr():.2e}")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    main(parser.parse_args().steps)
