"""Evaluation and fine-tuning tasks with Megatron's `tasks/main.py` command line.

    python tasks/main.py --task WIKITEXT103 --valid-data wiki.test.tokens --load CKPT \\
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt \\
        <model flags> --seq-length 1024 --micro-batch-size 8 --overlapping-eval 32
    python tasks/main.py --task LAMBADA --valid-data lambada_test.jsonl --strict-lambada ...
    python tasks/main.py --task MNLI --train-data train.tsv --valid-data dev_matched.tsv dev_mismatched.tsv \\
        --pretrained-checkpoint BERT_CKPT --epochs 5 --lr 5e-5 --lr-warmup-fraction 0.065 ...

Zero-shot GPT tasks (WIKITEXT103, LAMBADA) print a results table and write
<load>/eval_results/<task>.json. Fine-tuning tasks (MNLI, QQP, RACE) train a classification or
multiple-choice head on a BERT encoder and print the accuracy on every --valid-data set per epoch.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

__all__ = ["ZEROSHOT_TASKS", "FINETUNE_TASKS", "add_task_args", "args_provider", "BertPooledEncoder", "bert_encoder", "run_finetune",
           "main"]

ZEROSHOT_TASKS = ("WIKITEXT103", "LAMBADA")
FINETUNE_TASKS = ("MNLI", "QQP", "RACE")


def add_task_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The task flags (Megatron's names), added to the generated parser. Flags the parser already
    has (e.g. --pretrained-checkpoint, --finetune) keep their meaning there."""
    group = parser.add_argument_group("tasks", "Evaluation and fine-tuning tasks")
    have = set(parser._option_string_actions)  # noqa: SLF001 - argparse keeps no public index

    def add(option, **kwargs):
        if option not in have:
            group.add_argument(option, **kwargs)

    add("--task", required=True, choices=ZEROSHOT_TASKS + FINETUNE_TASKS, help="The task to run.")
    add("--epochs", type=int, default=None, help="Fine-tuning: number of passes over the training data.")
    add("--pretrained-checkpoint", type=str, default=None,
        help="Fine-tuning: checkpoint whose weights initialize the encoder.")
    add("--keep-last", action="store_true",
        help="Fine-tuning: keep the last, incomplete batch of each epoch (dropped by default).")
    add("--train-data", nargs="+", default=None, help="Fine-tuning: training files (RACE: folders).")
    add("--valid-data", nargs="*", default=None, help="Validation / evaluation files (RACE: folders).")
    add("--overlapping-eval", type=int, default=32,
        help="WIKITEXT103: stride of the overlapping windows; only the last stride targets of a window count.")
    add("--strict-lambada", action="store_true",
        help="LAMBADA: the target is the whole last word (all its tokens must be predicted).")
    add("--eval-micro-batch-size", type=int, default=None,
        help="Micro-batch size for evaluation (default: --micro-batch-size).")
    return parser


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


def args_provider(task: Optional[str]):
    """The extra-flags provider for `task`: the task flags, plus the BERT model flags
    (--bert-no-binary-head, --num-tokentypes, --bert-layernorm) for the fine-tuning tasks."""
    if task not in FINETUNE_TASKS:
        return add_task_args

    def provider(parser):
        from gigatron.training.bert import extra_args_provider as bert_args

        add_task_args(parser)
        return bert_args(parser)

    return provider


def bert_encoder(ctx):
    """The BERT encoder (gigatron.training.bert's model, built from the BERT flags) behind the
    fine-tuning interface encoder(tokens, types, padding_mask) -> pooled [b, h]."""
    from gigatron.training.bert import model_provider

    return BertPooledEncoder(model_provider(ctx), seed=ctx.args.seed)


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


def run_finetune(args, encoder_provider=None):
    """Build the task's datasets and model and fine-tune (see tasks/finetune_utils.py).

    `encoder_provider(ctx) -> encoder` (default: `bert_encoder`) builds the encoder the head sits on."""
    from tasks.eval_utils import initialize_task
    from tasks.finetune_utils import Classification, MultipleChoice, finetune
    from tasks.glue.data import collate

    if not args.train_data:
        raise ValueError(f"--task {args.task} needs --train-data")
    if not args.valid_data:
        raise ValueError(f"--task {args.task} needs --valid-data")
    ctx = initialize_task(args)
    encoder = (encoder_provider or bert_encoder)(ctx)
    dataset_class, num_classes = _task_dataset(args.task)
    train = dataset_class(args.train_data, ctx.tokenizer, args.seq_length)
    valid = {path: dataset_class([path], ctx.tokenizer, args.seq_length) for path in args.valid_data}
    hidden = ctx.configs.transformer.hidden_size
    dropout = ctx.configs.transformer.hidden_dropout
    if args.task == "RACE":
        model = MultipleChoice(encoder, hidden, dropout, args.init_method_std, args.seed)
    else:
        model = Classification(encoder, hidden, num_classes, dropout, args.init_method_std, args.seed)
    return finetune(model, train, valid, collate, args=args, configs=ctx.configs, groups=ctx.groups,
                    device=ctx.device, rng_tracker=ctx.run.rng_tracker)


def main(argv: Optional[Sequence[str]] = None):
    """Parse the flags and run --task; returns the task's results."""
    from gigatron.training.arguments import parse_args

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--task", default=None)
    args = parse_args(argv, extra_args_provider=args_provider(pre.parse_known_args(argv)[0].task))
    if args.task in ZEROSHOT_TASKS:
        from tasks.zeroshot_gpt.evaluate import run

        return run(args)
    return run_finetune(args)


if __name__ == "__main__":
    import torch.distributed as dist

    try:
        main()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
