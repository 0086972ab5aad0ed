"""Evaluation and fine-tuning tasks with Megatron's `tasks/main.py` command line.

    python tasks/main.py --task WIKITEXT103 --valid-data wiki.test.tokens --load CKPT \\
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt \\
        <model flags> --seq-length 1024 --micro-batch-size 8 --overlapping-eval 32
    python tasks/main.py --task LAMBADA --valid-data lambada_test.jsonl --strict-lambada ...
    python tasks/main.py --task MNLI --train-data train.tsv --valid-data dev_matched.tsv dev_mismatched.tsv \\
        --pretrained-checkpoint BERT_CKPT --epochs 5 --lr 5e-5 --lr-warmup-fraction 0.065 ...

Zero-shot GPT tasks (WIKITEXT103, LAMBADA) print a results table. Fine-tuning tasks (MNLI, QQP,
RACE) train a classification or multiple-choice head on a BERT encoder through the training loop
and print the accuracy on every --valid-data set after each epoch. Both write their results as
JSON to --results-path or, by default, beside the checkpoint (--load; fine-tuning: --save), named
with the task, the data files and the time; an existing file is never overwritten.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tasks.config import FINETUNE_TASKS, ZEROSHOT_TASKS, TaskConfig  # noqa: E402

__all__ = ["ZEROSHOT_TASKS", "FINETUNE_TASKS", "parse_task_args", "BertPooledEncoder", "bert_encoder",
           "run_finetune", "main"]


def parse_task_args(argv: Optional[Sequence[str]] = None):
    """(parsed flags, TaskConfig): the run's flags plus the task flags generated from TaskConfig
    (and, for the fine-tuning tasks, the BERT model flags --bert-no-binary-head, --num-tokentypes,
    --bert-layernorm)."""
    import argparse

    from gigatron.training.arguments import build_config, config_classes, parse_args

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--task", default=None)
    extra = None
    if pre.parse_known_args(argv)[0].task in FINETUNE_TASKS:
        from gigatron.training.bert import extra_args_provider as extra
    args = parse_args(argv, extra_args_provider=extra, classes={**config_classes(), "task": TaskConfig})
    return args, build_config(TaskConfig, args)


class BertPooledEncoder(torch.nn.Module):
    """A BertModel behind the interface encoder(tokens, types, padding_mask) -> pooled [b, h]:
    tanh(dense(h[CLS])) of BERT's pooler.

    The BertModel sits at `.module`, where checkpoint loading looks for a wrapped model, so a
    pretraining checkpoint (BertModel's parameter names) loads into it unchanged. A BertModel
    built without the binary head (--bert-no-binary-head) has no pooler; this encoder then has
    its own, initialized from `seed`."""

    def __init__(self, bert, seed: int = 1234):
        super().__init__()
        self.module = bert
        if bert.pooler is None:
            from gigatron.core.models.bert import Pooler
            from gigatron.core.parallel.init import initialize_parameters

            self.pooler = Pooler(bert.config)
            device = next(bert.parameters()).device
            initialize_parameters(self.pooler, seed, device=device)
        else:
            self.pooler = None

    def forward(self, tokens, types, padding_mask):
        bert = self.module
        hidden = bert.encode(tokens, padding_mask, types if bert.num_tokentypes > 0 else None)  # [s, b, h]
        pooler = self.pooler if self.pooler is not None else bert.pooler
        return pooler(hidden, 0)  # [b, h]


def bert_encoder(ctx):
    """The BERT encoder (gigatron.training.bert's model, built from the BERT flags) behind the
    fine-tuning interface encoder(tokens, types, padding_mask) -> pooled [b, h]."""
    from gigatron.training.bert import model_provider

    return BertPooledEncoder(model_provider(ctx), seed=ctx.configs.data.seed)


def _task_dataset(task: str):
    """(dataset class taking (paths, tokenizer, max_seq_length), number of classes or None for RACE)."""
    if task == "RACE":
        from tasks.race.data import RaceDataset

        return RaceDataset, None
    if task == "MNLI":
        from tasks.glue.mnli import NUM_CLASSES, MNLIDataset

        return MNLIDataset, NUM_CLASSES
    from tasks.glue.qqp import NUM_CLASSES, QQPDataset

    return QQPDataset, NUM_CLASSES


def _head_builder(task: TaskConfig, num_classes: Optional[int]):
    """build_head(ctx, encoder): the task model in the encoder's parameter dtype."""

    def build_head(ctx, encoder):
        from tasks.finetune_utils import Classification, MultipleChoice

        transformer = ctx.configs.transformer
        common = dict(dropout=transformer.hidden_dropout, init_std=transformer.init_method_std,
                      seed=ctx.configs.data.seed, params_dtype=transformer.params_dtype)
        if task.task == "RACE":
            return MultipleChoice(encoder, transformer.hidden_size, **common)
        return Classification(encoder, transformer.hidden_size, num_classes, **common)

    return build_head


def _finetune_results_writer(args, task: TaskConfig):
    """write(result) after each evaluated epoch (rank 0): the accuracies so far, to --results-path
    or beside --save (or --load / --pretrained-checkpoint); one file per run, chosen at the first
    write (never an existing one) and replaced atomically by the later writes of the same run."""
    from gigatron.core.checkpoint.io import atomic_write_text
    from tasks.eval_utils import results_path, write_results_file

    checkpoint = args.save or args.load or task.pretrained_checkpoint
    destination = results_path(task, checkpoint)
    chosen = {}

    def write(result) -> None:
        import json

        import torch.distributed as dist

        if destination is None or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
            return
        record = {"task": task.task, "checkpoint": os.path.abspath(checkpoint) if checkpoint else None,
                  "iteration": result.iteration, "train_data": [os.path.abspath(p) for p in task.train_data],
                  "epochs": [{"accuracy": {os.path.abspath(k): v for k, v in acc.items()}, "mean_training_loss": loss}
                             for acc, loss in zip(result.accuracies, result.train_losses)]}
        if "path" in chosen:
            atomic_write_text(chosen["path"], json.dumps(record, indent=2, sort_keys=True) + "\n")
            return
        chosen["path"] = write_results_file(destination, record)
        if chosen["path"] != destination:
            print(f"> {destination} exists and is kept; results written to {chosen['path']}", flush=True)
        else:
            print(f"> results written to {chosen['path']}", flush=True)

    return write


def run_finetune(args, task: Optional[TaskConfig] = None, encoder_provider=None):
    """Fine-tune `task` (default: the TaskConfig of `args`) through the training loop (see
    tasks/finetune_utils.py). `encoder_provider(ctx) -> encoder` (default: `bert_encoder`) builds the
    encoder the head sits on."""
    from gigatron.training.arguments import build_config
    from tasks.finetune_utils import finetune
    from tasks.glue.data import collate

    task = build_config(TaskConfig, args) if task is None else task
    dataset_class, num_classes = _task_dataset(task.task)
    return finetune(args, task, encoder_provider=encoder_provider or bert_encoder,
                    build_head=_head_builder(task, num_classes), dataset_class=dataset_class, collate=collate,
                    write_results=_finetune_results_writer(args, task))


def main(argv: Optional[Sequence[str]] = None):
    """Parse the flags and run --task; returns the task's results."""
    args, task = parse_task_args(argv)
    if task.task in ZEROSHOT_TASKS:
        from tasks.zeroshot_gpt.evaluate import run

        return run(args, task)
    return run_finetune(args, task)


def _cli_main(argv: Optional[Sequence[str]] = None) -> int:
    import torch.distributed as dist

    try:
        main(argv)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from gigatron.cli import run_cli

    sys.exit(run_cli(_cli_main))
