"""Shared pieces of the evaluation and fine-tuning tasks: start-up and classification accuracy.

Shape legend: b = micro-batch, c = choices per sample (RACE: 4), s = sequence, k = classes.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["initialize_task", "stack_rows", "plan_batches", "classification_accuracy"]


def initialize_task(args):
    """Validate the flags, start torch.distributed and the parallel groups, build the tokenizer.

    Returns a gigatron.training.loop.TrainContext (args, configs, run, tokenizer, padded_vocab_size).
    Tasks do not run the pretraining loop, so the training length is not required here."""
    from gigatron.core.tokenizers import build_tokenizer, vocab_size_with_padding
    from gigatron.training.arguments import configs_from_args
    from gigatron.training.checkpointing import load_args_from_checkpoint
    from gigatron.training.initialize import initialize
    from gigatron.training.loop import TrainContext
    from gigatron.training.logging import print_rank_0
    from gigatron.training.validate import validate_args

    if getattr(args, "use_checkpoint_args", False):
        load_args_from_checkpoint(args)
    args.skip_train = True  # the length of fine-tuning is --epochs, not --train-iters
    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
    else:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    validate_args(args, world_size)
    if args.seq_length is None:
        raise ValueError(f"--task {args.task} needs --seq-length")
    configs = configs_from_args(args)
    run = initialize(args, configs)
    ctx = TrainContext(args=args, configs=configs, run=run)
    if getattr(args, "tokenizer_type", None) is None:
        raise ValueError(f"--task {args.task} reads text: give --tokenizer-type and its files")
    ctx.tokenizer = build_tokenizer(args)
    ctx.padded_vocab_size = vocab_size_with_padding(ctx.tokenizer.vocab_size, args.make_vocab_size_divisible_by,
                                                    ctx.groups.tp.size)
    args.padded_vocab_size = ctx.padded_vocab_size
    print_rank_0(f"> task {args.task}: tokenizer {args.tokenizer_type}, vocabulary {ctx.tokenizer.vocab_size} "
                 f"(padded to {ctx.padded_vocab_size}), world size {run.world_size}")
    return ctx


def stack_rows(rows: list) -> dict:
    """A list of sample dicts -> a dict of stacked tensors (numpy arrays and ints stacked along dim 0)."""
    batch = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        batch[key] = torch.from_numpy(np.stack([np.asarray(v) for v in values]))
    return batch


def plan_batches(num_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 order: Optional[np.ndarray] = None, keep_last: bool = True) -> list:
    """This rank's micro-batches as lists of (sample index, valid) pairs.

    Samples are taken in `order` (default 0..n-1) in groups of micro_batch_size x dp; rank r takes
    the r-th slice of each group. Without `keep_last` an incomplete last group is dropped; with it
    the missing rows are filled with sample `order[0]` marked invalid (weight 0), so every rank runs
    the same number of equally shaped micro-batches."""
    order = np.arange(num_samples) if order is None else np.asarray(order)
    per_group = micro_batch_size * dp_size
    num_groups = math.ceil(num_samples / per_group) if keep_last else num_samples // per_group
    batches = []
    for group_index in range(num_groups):
        rows = []
        for slot in range(micro_batch_size):
            position = group_index * per_group + dp_rank * micro_batch_size + slot
            if position < num_samples:
                rows.append((int(order[position]), True))
            else:
                rows.append((int(order[0]), False))
        batches.append(rows)
    return batches


def classification_accuracy(model: torch.nn.Module, dataset, *, micro_batch_size: int, groups, device,
                            collate: Callable[[list], dict]) -> tuple[int, int]:
    """(correct, total) of `model`'s argmax over `dataset`, every sample counted once over the
    data-parallel ranks. `model(batch)` returns logits [b, k]; batch["label"] holds [b]."""
    plan = plan_batches(len(dataset), micro_batch_size, groups.dp.rank, groups.dp.size, keep_last=True)
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for rows in plan:
            batch = collate([dataset[i] for i, _ in rows])
            batch = {k: v.to(device) for k, v in batch.items()}
            valid = torch.tensor([float(v) for _, v in rows], dtype=torch.float64, device=device)  # [b]
            predicted = model(batch).argmax(dim=-1)  # [b]
            totals[0] += ((predicted == batch["label"]).double() * valid).sum()
            totals[1] += valid.sum()
    if groups.dp.group is not None:
        dist.all_reduce(totals, group=groups.dp.group)
    model.train(was_training)
    return int(round(float(totals[0]))), int(round(float(totals[1])))
