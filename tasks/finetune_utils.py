"""Fine-tuning a pooled encoder on classification (GLUE) and multiple-choice (RACE) tasks.

Shape legend: b = micro-batch, c = choices per question (RACE: 4), s = sequence, h = hidden,
k = classes.

The task model wraps any encoder with the interface

    encoder(tokens [n, s] int64, types [n, s] int64, padding_mask [n, s] int64 (1 = token, 0 = pad))
        -> pooled [n, h]

(BERT's pooler output) and puts a head on it: `Classification` (dropout + linear to k logits) or
`MultipleChoice` (dropout + linear to one score per choice; the c choices of a question are
encoded as c rows and their scores form the logits [b, c]). The head is built in the encoder's
parameter dtype (--bf16 / --fp16), so mixed-precision runs hold one dtype throughout.

`finetune` runs the training loop (gigatron.training.loop.pretrain) with the task's providers:
--epochs passes over the training set become --train-iters; each step takes global-batch-size
samples (micro-batches of --micro-batch-size on every data-parallel rank, accumulated through the
schedule; the order is shuffled per epoch from --seed), the loss is the mean cross-entropy over the
samples of the step, and after each epoch (the loop's evaluation, every epoch's iterations) the
accuracy on every validation set is printed and a checkpoint is written with --save (unless
--save-interval says otherwise; also when --exit-interval stops the run, and --load resumes it,
mid-epoch included). Weights come from --load (resuming a fine-tuning run, optimizer included) or
else from --pretrained-checkpoint (the encoder only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gigatron.core.parallel import tags
from tasks.eval_utils import classification_accuracy, plan_batches

__all__ = ["ClassificationHead", "Classification", "MultipleChoice", "FinetuneResult", "finetune",
           "steps_per_epoch", "epoch_batches"]


class ClassificationHead(nn.Module):
    """Dropout then a linear layer [h] -> [k] in `params_dtype`; replicated on every tensor-parallel
    rank, initialized N(0, init_std^2) (bias 0) from `seed` so that all ranks start equal."""

    def __init__(self, hidden_size: int, num_outputs: int, dropout: float, init_std: float = 0.02,
                 seed: int = 1234, params_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden_size, num_outputs, dtype=params_dtype)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # drawn in fp32, then rounded: the same start at every precision
            self.dense.weight.copy_(torch.randn(self.dense.weight.shape, generator=generator) * init_std)
            self.dense.bias.zero_()
        for param in self.dense.parameters():
            tags.set_tensor_parallel_attributes(param, False, -1, 1)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.dense(self.dropout(pooled))


def _encode(encoder: nn.Module, batch: dict) -> torch.Tensor:
    return encoder(batch["text"].long(), batch["types"].long(), batch["padding_mask"].long())


class Classification(nn.Module):
    """forward(batch {"text", "types", "padding_mask": [b, s]}) -> logits [b, k]."""

    def __init__(self, encoder: nn.Module, hidden_size: int, num_classes: int, dropout: float = 0.1,
                 init_std: float = 0.02, seed: int = 1234, params_dtype: torch.dtype = torch.float32):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classification head needs at least 2 classes, got {num_classes}")
        self.encoder = encoder
        self.num_classes = num_classes
        self.classification_head = ClassificationHead(hidden_size, num_classes, dropout, init_std, seed,
                                                      params_dtype)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.classification_head(_encode(self.encoder, batch))  # [b, k]


class MultipleChoice(nn.Module):
    """forward(batch {"text", "types", "padding_mask": [b, c, s]}) -> logits [b, c]."""

    def __init__(self, encoder: nn.Module, hidden_size: int, dropout: float = 0.1, init_std: float = 0.02,
                 seed: int = 1234, params_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.encoder = encoder
        self.multichoice_head = ClassificationHead(hidden_size, 1, dropout, init_std, seed, params_dtype)

    def forward(self, batch: dict) -> torch.Tensor:
        b, c, s = batch["text"].shape
        flat = {key: batch[key].reshape(b * c, s) for key in ("text", "types", "padding_mask")}  # [b c, s]
        scores = self.multichoice_head(_encode(self.encoder, flat))  # [b c, 1]
        return scores.view(b, c)  # [b, c]


def steps_per_epoch(num_samples: int, micro_batch_size: int, dp_size: int, num_microbatches: int,
                    keep_last: bool) -> int:
    """Optimizer steps in one pass over `num_samples` (an incomplete last step is kept with --keep-last)."""
    per_step = micro_batch_size * dp_size * num_microbatches
    return math.ceil(num_samples / per_step) if keep_last else num_samples // per_step


@dataclass
class FinetuneResult:
    """What a fine-tuning run did: its last iteration and, per evaluated epoch, {valid set: accuracy}
    and the mean training loss; `context` is the training loop's (model, optimizer, ...)."""

    iteration: int = 0
    accuracies: list = field(default_factory=list)
    train_losses: list = field(default_factory=list)
    context: Any = None


@dataclass
class _Schedule:
    """How the epochs of a fine-tuning run are cut into steps."""

    num_samples: int
    micro_batch_size: int
    dp_size: int
    num_microbatches: int
    iters_per_epoch: int
    epochs: int
    keep_last: bool
    seed: int


def epoch_batches(dataset, collate: Callable[[list], dict], schedule: _Schedule, dp_rank: int, start_iteration: int):
    """This rank's micro-batches, epoch after epoch, from iteration `start_iteration` on.

    Epoch e takes the samples in the order of RandomState(seed + e); each batch (collated) carries
    "weight" [b] (0 for the filler rows of an incomplete last step, see plan_batches, and for the
    filler micro-batches that complete its number of micro-batches) and "scale",
    dp x micro-batches / samples of the step over all ranks: the loss of a step is then the mean
    over its samples once the schedule has divided by the micro-batches and DDP averaged over dp."""
    s = schedule
    per_group = s.micro_batch_size * s.dp_size
    for epoch in range(start_iteration // s.iters_per_epoch, s.epochs):
        order = np.random.RandomState(s.seed + epoch).permutation(s.num_samples)
        plan = plan_batches(s.num_samples, s.micro_batch_size, dp_rank, s.dp_size, order, keep_last=s.keep_last)
        first = max(start_iteration - epoch * s.iters_per_epoch, 0)
        for step in range(first, s.iters_per_epoch):
            micro = plan[step * s.num_microbatches:(step + 1) * s.num_microbatches]
            # the loop runs every step's micro-batches: complete an incomplete last step with filler rows
            micro += [[(int(order[0]), False)] * s.micro_batch_size] * (s.num_microbatches - len(micro))
            start = step * s.num_microbatches * per_group
            step_samples = min(s.num_samples, start + s.num_microbatches * per_group) - start  # over all ranks
            scale = torch.tensor(s.dp_size * s.num_microbatches / step_samples, dtype=torch.float32)
            for rows in micro:
                batch = collate([dataset[i] for i, _ in rows])
                batch["weight"] = torch.tensor([float(valid) for _, valid in rows])
                batch["scale"] = scale
                yield batch


class _TrainingLoss:
    """The weighted cross-entropy sum and sample count of the training steps since the last epoch
    report (device tensors; read once per epoch)."""

    def __init__(self) -> None:
        self.totals = None

    def add(self, loss_sum: torch.Tensor, count: torch.Tensor) -> None:
        value = torch.stack([loss_sum.double(), count.double()])
        self.totals = value if self.totals is None else self.totals + value

    def mean_and_reset(self, groups, device) -> float:
        totals = self.totals if self.totals is not None else torch.zeros(2, dtype=torch.float64)
        totals = totals.to(device)
        if groups.dp.group is not None:
            torch.distributed.all_reduce(totals, group=groups.dp.group)
        self.totals = None
        return float(totals[0] / totals[1].clamp(min=1.0))


def _forward_step_func(training_loss: _TrainingLoss):
    """The schedules' forward step: logits of the task model and the weighted mean cross-entropy."""

    def forward_step(data_iterator, model):
        inner = getattr(model, "module", model)
        device = next(inner.parameters()).device
        batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
        logits = model(batch)  # [b, k]

        def loss_func(output):
            losses = F.cross_entropy(output.float(), batch["label"].long(), reduction="none")  # [b]
            weighted = (losses * batch["weight"]).sum()
            count = batch["weight"].sum()
            training_loss.add(weighted.detach(), count)
            return weighted * batch["scale"], {"loss": torch.stack([weighted.detach(), count])}

        return logits, loss_func

    return forward_step


def _log(message: str) -> None:
    from gigatron.training.logging import print_rank_0

    print_rank_0(message)


def _resuming(ctx) -> bool:
    """Whether --load holds a checkpoint (the run resumes it instead of starting from
    --pretrained-checkpoint)."""
    from gigatron.training.checkpointing import read_tracker

    load = ctx.configs.checkpoint.load
    return bool(load) and read_tracker(load)[0] is not None


def _model_provider(task, encoder_provider: Callable, build_head: Callable):
    def model_provider(ctx, pre_process: bool = True, post_process: bool = True, vp_stage=None):
        from gigatron.training.checkpointing import load_checkpoint

        if not (pre_process and post_process) or vp_stage is not None:
            raise ValueError("fine-tuning runs the encoder as one pipeline stage; use "
                             "--pipeline-model-parallel-size 1 (and no virtual stages)")
        encoder = encoder_provider(ctx)
        if task.pretrained_checkpoint and not _resuming(ctx):
            loaded = load_checkpoint(task.pretrained_checkpoint, [encoder], None, None, ctx.groups, finetune=True,
                                     load_optim=False, load_rng=False, exit_on_missing_checkpoint=True)
            _log(f"> encoder weights from {loaded.path}")
        return build_head(ctx, encoder)

    return model_provider


def _evaluation_hook(task, valid_datasets: dict, collate, result: FinetuneResult, training_loss: _TrainingLoss,
                     iters_per_epoch: int, write_results: Callable[[FinetuneResult], None]):
    """After each epoch (the loop's evaluation): accuracy on every validation set and the mean
    training loss, printed, kept in `result` and written to the results file."""

    def hook(ctx) -> None:
        epoch = math.ceil(ctx.iteration / iters_per_epoch)
        eval_mbs = task.eval_micro_batch_size or ctx.configs.training.micro_batch_size
        model = ctx.model[0].module
        accuracies = {}
        for name, dataset in valid_datasets.items():
            correct, total = classification_accuracy(model, dataset, micro_batch_size=eval_mbs, groups=ctx.groups,
                                                     device=ctx.device, collate=collate)
            accuracies[name] = correct / total
            _log(f" epoch {epoch} | {name}: accuracy {100.0 * correct / total:.2f} % ({correct} / {total})")
        mean_loss = training_loss.mean_and_reset(ctx.groups, ctx.device)
        _log(f" epoch {epoch} | mean training loss {mean_loss:.4f}")
        result.accuracies.append(accuracies)
        result.train_losses.append(mean_loss)
        result.iteration = ctx.iteration
        write_results(result)

    return hook


def _data_parallel_size(args) -> int:
    import os

    import torch.distributed as dist

    from gigatron.training.validate import check_parallel_sizes

    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
    else:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return check_parallel_sizes(args, world_size)


def _loop_args(args, task, schedule: _Schedule):
    """The flags the training loop runs with: the task's length in iterations, an evaluation (and,
    unless given, a save) after every epoch, batches from the task (an external loader), and the
    encoder loaded by the model provider rather than by the loop."""
    import copy

    given = [flag for flag, name in (("--train-iters", "train_iters"), ("--train-samples", "train_samples"))
             if getattr(args, name, None) is not None]
    if given:
        raise ValueError(f"fine-tuning runs --epochs {task.epochs} over --train-data; drop {' and '.join(given)}")
    sources = [flag for flag, name in (("--data-path", "data_path"), ("--train-data-path", "train_data_path"),
                                       ("--valid-data-path", "valid_data_path"), ("--test-data-path", "test_data_path"),
                                       ("--mock-data", "mock_data")) if getattr(args, name, None)]
    if sources:
        raise ValueError(f"--task {task.task} reads --train-data/--valid-data; drop {' and '.join(sources)}")
    if getattr(args, "rampup_batch_size", None):
        raise ValueError("fine-tuning cuts its epochs into steps of --global-batch-size; drop --rampup-batch-size")
    if getattr(args, "step_batch_size_schedule", None):
        raise ValueError("fine-tuning cuts its epochs into steps of --global-batch-size; drop "
                         "--step-batch-size-schedule and give --global-batch-size")
    run = copy.copy(args)
    for name in ("data_path", "train_data_path", "valid_data_path", "test_data_path", "mock_data"):
        if hasattr(run, name):
            delattr(run, name)  # no pretraining data source: the task provides the batches
    run.train_iters = schedule.epochs * schedule.iters_per_epoch
    run.eval_interval = schedule.iters_per_epoch
    run.eval_iters = 0  # no loss evaluation: the evaluation hook measures accuracy
    if run.save and getattr(run, "save_interval", None) is None:
        run.save_interval = schedule.iters_per_epoch
    run.dataloader_type = "external"
    run.pretrained_checkpoint = None  # loaded into the encoder by the model provider
    return run


def finetune(args, task, *, encoder_provider: Callable, build_head: Callable, dataset_class, collate,
             write_results: Callable[[FinetuneResult], None]) -> FinetuneResult:
    """Fine-tune through the training loop (see the module docstring).

    `args`: the parsed flags, handed to the loop; `task`: the TaskConfig. `encoder_provider(ctx)`
    builds the encoder and `build_head(ctx, encoder)` the task model around it;
    `dataset_class(paths, tokenizer, max_seq_length)` reads the task's files and `collate` stacks
    its samples; `write_results(result)` is called after every evaluated epoch."""
    from gigatron.core.tokenizers import build_tokenizer
    from gigatron.training.loop import pretrain
    from gigatron.training.validate import check_batch_sizes

    if args.lr is None:
        raise ValueError("fine-tuning needs --lr, e.g. --lr 5e-5")
    if args.seq_length is None:
        raise ValueError(f"--task {task.task} needs --seq-length")
    if getattr(args, "tokenizer_type", None) is None:
        raise ValueError(f"--task {task.task} reads text: give --tokenizer-type and its files")
    dp = _data_parallel_size(args)
    num_microbatches = check_batch_sizes(args, dp)
    tokenizer = build_tokenizer(args)
    train = dataset_class(task.train_data, tokenizer, args.seq_length)
    valid = {path: dataset_class([path], tokenizer, args.seq_length) for path in task.valid_data}
    iters_per_epoch = steps_per_epoch(len(train), args.micro_batch_size, dp, num_microbatches, task.keep_last)
    if iters_per_epoch == 0:
        raise ValueError(f"the training set has {len(train)} samples, fewer than one global batch "
                         f"({args.global_batch_size}); lower --global-batch-size/--micro-batch-size or add --keep-last")
    schedule = _Schedule(len(train), args.micro_batch_size, dp, num_microbatches, iters_per_epoch, task.epochs,
                         task.keep_last, args.seed)
    result = FinetuneResult()
    training_loss = _TrainingLoss()

    def datasets_provider(ctx, train_valid_test_num_samples):
        batches = epoch_batches(train, collate, schedule, ctx.groups.dp.rank, ctx.iteration)
        return batches, None, None

    ctx = pretrain(datasets_provider, _model_provider(task, encoder_provider, build_head),
                   _forward_step_func(training_loss), args=_loop_args(args, task, schedule),
                   evaluation_hook=_evaluation_hook(task, valid, collate, result, training_loss, iters_per_epoch,
                                                    write_results))
    result.iteration = ctx.iteration
    result.context = ctx
    return result
