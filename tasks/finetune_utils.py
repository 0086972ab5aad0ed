"""Fine-tuning a pooled encoder on classification (GLUE) and multiple-choice (RACE) tasks.

Shape legend: b = micro-batch, c = choices per question (RACE: 4), s = sequence, h = hidden,
k = classes.

The task model wraps any encoder with the interface

    encoder(tokens [n, s] int64, types [n, s] int64, padding_mask [n, s] int64 (1 = token, 0 = pad))
        -> pooled [n, h]

(BERT's pooler output) and puts a head on it: `Classification` (dropout + linear to k logits) or
`MultipleChoice` (dropout + linear to one score per choice; the c choices of a question are
encoded as c rows and their scores form the logits [b, c]).

`finetune` runs --epochs passes over the training set: each step takes global-batch-size samples
(micro-batches of --micro-batch-size on every data-parallel rank, accumulated through the
schedule), the loss is the mean cross-entropy over the samples of the step, and after each
epoch the accuracy on every validation set is printed and, with --save, a checkpoint is written
(also when --exit-interval stops the run; --load resumes it, mid-epoch included).
Weights come from --load (resuming a fine-tuning run, optimizer included) or else from
--pretrained-checkpoint (the encoder only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gigatron.core.parallel import tags
from tasks.eval_utils import classification_accuracy, plan_batches

__all__ = ["ClassificationHead", "Classification", "MultipleChoice", "FinetuneResult", "finetune",
           "steps_per_epoch"]


class ClassificationHead(nn.Module):
    """Dropout then a linear layer [h] -> [k]; replicated on every tensor-parallel rank, initialized
    N(0, init_std^2) (bias 0) from `seed` so that all ranks start equal."""

    def __init__(self, hidden_size: int, num_outputs: int, dropout: float, init_std: float = 0.02,
                 seed: int = 1234):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden_size, num_outputs)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
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
                 init_std: float = 0.02, seed: int = 1234):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classification head needs at least 2 classes, got {num_classes}")
        self.encoder = encoder
        self.num_classes = num_classes
        self.classification_head = ClassificationHead(hidden_size, num_classes, dropout, init_std, seed)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.classification_head(_encode(self.encoder, batch))  # [b, k]


class MultipleChoice(nn.Module):
    """forward(batch {"text", "types", "padding_mask": [b, c, s]}) -> logits [b, c]."""

    def __init__(self, encoder: nn.Module, hidden_size: int, dropout: float = 0.1, init_std: float = 0.02,
                 seed: int = 1234):
        super().__init__()
        self.encoder = encoder
        self.multichoice_head = ClassificationHead(hidden_size, 1, dropout, init_std, seed)

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
    """What a fine-tuning run did: its last iteration and, per epoch, {valid set: accuracy}."""

    iteration: int = 0
    accuracies: list = field(default_factory=list)
    train_losses: list = field(default_factory=list)


def _log(message: str) -> None:
    from gigatron.training.logging import print_rank_0

    print_rank_0(message)


def finetune(model: nn.Module, train_dataset, valid_datasets: dict, collate: Callable[[list], dict], *, args,
             configs, groups, device, rng_tracker=None) -> FinetuneResult:
    """Fine-tune `model` (a Classification or MultipleChoice) for --epochs (see module docstring).

    `valid_datasets` maps a name (e.g. the file) to a dataset; `collate` turns a list of samples
    into a batch dict of tensors (with "label"). Reads --micro-batch-size, --global-batch-size,
    --eval-micro-batch-size, --epochs, --keep-last, --seed, --log-interval, --exit-interval, --save,
    --load, --pretrained-checkpoint and the optimizer / scheduler / DDP configs."""
    from gigatron.core.distributed import DistributedDataParallel, finalize_model_grads
    from gigatron.core.optim import get_optimizer
    from gigatron.core.optim.scheduler import OptimizerParamScheduler
    from gigatron.core.pipeline import get_forward_backward_func
    from gigatron.training.checkpointing import load_checkpoint, read_tracker, save_checkpoint

    if groups.pp.size > 1:
        raise ValueError("fine-tuning runs the encoder as one pipeline stage; use --pipeline-model-parallel-size 1")
    if args.epochs is None or args.epochs < 1:
        raise ValueError(f"fine-tuning needs --epochs >= 1 (got {args.epochs})")
    if args.lr is None:
        raise ValueError("fine-tuning needs --lr, e.g. --lr 5e-5")
    mbs, dp = args.micro_batch_size, groups.dp.size
    gbs = args.global_batch_size
    num_microbatches = gbs // (mbs * dp)
    num_samples = len(train_dataset)
    iters_per_epoch = steps_per_epoch(num_samples, mbs, dp, num_microbatches, args.keep_last)
    if iters_per_epoch == 0:
        raise ValueError(f"the training set has {num_samples} samples, fewer than one global batch ({gbs}); "
                         "lower --global-batch-size/--micro-batch-size or add --keep-last")
    train_iters = args.epochs * iters_per_epoch

    model.to(device)
    ddp = DistributedDataParallel(configs.ddp, model, groups)
    optimizer = get_optimizer(configs.optimizer, [ddp], groups)
    scheduler = OptimizerParamScheduler(optimizer, configs.scheduler, configs.optimizer, global_batch_size=gbs,
                                        train_iters=train_iters)
    iteration = 0
    if args.load and read_tracker(args.load)[0] is not None:
        loaded = load_checkpoint(args.load, [ddp], optimizer, scheduler, groups, ckpt_step=args.ckpt_step,
                                 load_optim=not args.no_load_optim, load_rng=not args.no_load_rng,
                                 rng_tracker=rng_tracker)
        iteration = loaded.iteration
        _log(f"> resuming fine-tuning from {loaded.path} at iteration {iteration}")
    elif args.pretrained_checkpoint:
        loaded = load_checkpoint(args.pretrained_checkpoint, [model.encoder], None, None, groups, finetune=True,
                                 load_optim=False, load_rng=False, exit_on_missing_checkpoint=True)
        optimizer.reload_model_params()
        _log(f"> encoder weights from {loaded.path}")

    forward_backward = get_forward_backward_func(1, None)
    per_group = mbs * dp
    eval_mbs = getattr(args, "eval_micro_batch_size", None) or mbs

    def finalize(chunks, num_tokens=None):
        finalize_model_grads(chunks, groups, configs.transformer, num_tokens)

    def save():
        save_checkpoint(args.save, iteration, [ddp], optimizer, scheduler, args, groups,
                        save_optim=not args.no_save_optim, save_rng=not args.no_save_rng, rng_tracker=rng_tracker)
        _log(f" saved checkpoint of iteration {iteration} to {args.save}")

    result = FinetuneResult(iteration=iteration)
    seq_length = args.seq_length
    for epoch in range(iteration // iters_per_epoch, args.epochs):
        order = np.random.RandomState(args.seed + epoch).permutation(num_samples)
        plan = plan_batches(num_samples, mbs, groups.dp.rank, dp, order, keep_last=args.keep_last)
        ddp.train()
        epoch_loss = torch.zeros(2, dtype=torch.float64, device=device)
        for step in range(iteration - epoch * iters_per_epoch, iters_per_epoch):
            micro = plan[step * num_microbatches:(step + 1) * num_microbatches]
            start = step * num_microbatches * per_group
            step_samples = min(num_samples, start + num_microbatches * per_group) - start  # over all ranks
            batches = []
            for rows in micro:
                batch = collate([train_dataset[i] for i, _ in rows])
                batch["weight"] = torch.tensor([float(v) for _, v in rows])
                batches.append({k: v.to(device) for k, v in batch.items()})
            scale = dp * len(micro) / step_samples

            def forward_step(data_iterator, chunk):
                batch = next(data_iterator)
                logits = chunk(batch)  # [b, k]

                def loss_func(output):
                    losses = F.cross_entropy(output.float(), batch["label"].long(), reduction="none")  # [b]
                    weighted = (losses * batch["weight"]).sum()
                    return weighted * scale, {"loss": torch.stack([weighted.detach(), batch["weight"].sum()])}

                return logits, loss_func

            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            logs = forward_backward(forward_step_func=forward_step, data_iterator=iter(batches), model=ddp,
                                    num_microbatches=len(micro), seq_length=seq_length, micro_batch_size=mbs,
                                    groups=groups, config=configs.transformer, forward_only=False,
                                    grad_scale_func=optimizer.scale_loss, finalize_model_grads_func=finalize)
            update_successful, grad_norm, _ = optimizer.step()
            if update_successful:
                scheduler.step(increment=gbs)
            iteration += 1
            for entry in logs:
                epoch_loss += entry["loss"].double()
            if args.log_interval and iteration % args.log_interval == 0:
                _log(f" epoch {epoch + 1} | iteration {iteration:7d}/{train_iters:7d} | lr {scheduler.get_lr():.3e} | "
                     f"grad norm {grad_norm if grad_norm is not None else float('nan'):.3f}")
            if args.exit_interval and iteration % args.exit_interval == 0:
                if args.save:
                    save()
                _log(f" exiting at iteration {iteration} (--exit-interval {args.exit_interval})")
                result.iteration = iteration
                return result
        if groups.dp.group is not None:
            torch.distributed.all_reduce(epoch_loss, group=groups.dp.group)
        mean_loss = float(epoch_loss[0] / epoch_loss[1].clamp(min=1.0))
        result.train_losses.append(mean_loss)
        accuracies = {}
        for name, dataset in valid_datasets.items():
            correct, total = classification_accuracy(ddp.module, dataset, micro_batch_size=eval_mbs,
                                                     groups=groups, device=device, collate=collate)
            accuracies[name] = correct / total
            _log(f" epoch {epoch + 1} | {name}: accuracy {100.0 * correct / total:.2f} % ({correct} / {total})")
        _log(f" epoch {epoch + 1} | mean training loss {mean_loss:.4f}")
        result.accuracies.append(accuracies)
        if args.save:
            save()
    result.iteration = iteration
    return result
