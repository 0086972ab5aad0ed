"""Shared pieces of the evaluation and fine-tuning tasks: start-up, classification accuracy and the
results file.

Shape legend: b = micro-batch, c = choices per sample (RACE: 4), s = sequence, k = classes.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["initialize_task", "stack_rows", "plan_batches", "classification_accuracy", "default_results_path",
           "results_path", "write_results_file"]


def initialize_task(args, task):
    """Validate the flags, start torch.distributed and the parallel groups, build the tokenizer
    (zero-shot evaluation, which runs no training loop; `task` is the TaskConfig).

    Returns a gigatron.training.loop.TrainContext (configs, run, tokenizer, padded_vocab_size).
    The training length is not required here."""
    from gigatron.core.tokenizers import build_tokenizer, vocab_size_with_padding
    from gigatron.training.arguments import configs_from_args
    from gigatron.training.checkpointing import load_args_from_checkpoint
    from gigatron.training.initialize import initialize
    from gigatron.training.loop import TrainContext
    from gigatron.training.logging import print_rank_0
    from gigatron.training.validate import validate_args

    if getattr(args, "use_checkpoint_args", False):
        load_args_from_checkpoint(args)
    args.skip_train = True  # evaluation only: no training length is needed
    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
    else:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    validate_args(args, world_size)
    if args.seq_length is None:
        raise ValueError(f"--task {task.task} needs --seq-length")
    configs = configs_from_args(args)
    run = initialize(args, configs)
    ctx = TrainContext(configs=configs, run=run)
    if getattr(args, "tokenizer_type", None) is None:
        raise ValueError(f"--task {task.task} reads text: give --tokenizer-type and its files")
    ctx.tokenizer = build_tokenizer(args)
    ctx.padded_vocab_size = vocab_size_with_padding(ctx.tokenizer.vocab_size, args.make_vocab_size_divisible_by,
                                                    ctx.groups.tp.size)
    args.padded_vocab_size = ctx.padded_vocab_size
    print_rank_0(f"> task {task.task}: tokenizer {args.tokenizer_type}, vocabulary {ctx.tokenizer.vocab_size} "
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


# ------------------------------------------------------------------ the results file


def _name_part(text: str) -> str:
    """`text` reduced to characters that are safe in a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "data"


def default_results_path(checkpoint: str, task: str, data_paths: Sequence[str], when: Optional[float] = None) -> str:
    """The results file beside the checkpoint directory `checkpoint`:
    <parent>/<checkpoint name>.<task>.<data file names>.<YYYYmmdd-HHMMSS>.json."""
    checkpoint = os.path.abspath(checkpoint).rstrip(os.sep)
    names = [_name_part(os.path.basename(os.path.normpath(p))) for p in data_paths]
    data = "+".join(names) if len(names) <= 3 else f"{'+'.join(names[:3])}+{len(names) - 3}more"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if when is None else when))
    name = f"{os.path.basename(checkpoint)}.{task}.{data}.{stamp}.json"
    return os.path.join(os.path.dirname(checkpoint), name)


def results_path(task, checkpoint: Optional[str]) -> Optional[str]:
    """Where the results of `task` (a TaskConfig) go: --results-path, else the default beside
    `checkpoint`; None when neither is known (nothing is written)."""
    if task.results_path:
        return task.results_path
    if checkpoint:
        return default_results_path(checkpoint, task.task, task.valid_data or [])
    return None


def _candidates(path: str):
    root, ext = os.path.splitext(path)
    yield path
    number = 1
    while True:
        yield f"{root}-{number}{ext}"
        number += 1


def write_results_file(path: str, record: dict) -> str:
    """Write `record` as JSON to `path` atomically, never replacing an existing file: when `path`
    exists the results go to `<name>-1.json`, `<name>-2.json`, ... Returns the path written."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(temporary, "x", encoding="utf-8") as handle:  # created with the user's umask
        handle.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    try:
        for candidate in _candidates(path):
            try:
                os.link(temporary, candidate)  # fails if the name is taken: nothing is replaced
                return candidate
            except FileExistsError:
                continue
            except OSError:  # a file system without hard links: claim the name, then move the file onto it
                try:
                    os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    continue
                os.replace(temporary, candidate)
                return candidate
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    raise AssertionError("unreachable")
