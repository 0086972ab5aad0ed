"""The task flags of tasks/main.py (Megatron's names), as one config dataclass.

The parser generates the flags from `TaskConfig` (each field's docstring is its --help), and the
task code reads this dataclass and the run's configs, never the parsed namespace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

__all__ = ["ZEROSHOT_TASKS", "FINETUNE_TASKS", "TaskConfig", "validate_task_config"]

ZEROSHOT_TASKS = ("WIKITEXT103", "LAMBADA")
FINETUNE_TASKS = ("MNLI", "QQP", "RACE")


@dataclass
class TaskConfig:
    """Evaluation and fine-tuning tasks (tasks/main.py)."""

    task: Optional[Literal["WIKITEXT103", "LAMBADA", "MNLI", "QQP", "RACE"]] = None
    """The task to run: WIKITEXT103 or LAMBADA (zero-shot GPT evaluation), MNLI, QQP or RACE
    (fine-tuning a BERT encoder)."""

    epochs: Optional[int] = None
    """Fine-tuning: number of passes over the training data (sets the number of iterations)."""

    pretrained_checkpoint: Optional[str] = None
    """Fine-tuning: checkpoint whose weights initialize the encoder (when --load holds no checkpoint)."""

    keep_last: bool = False
    """Fine-tuning: keep the last, incomplete batch of each epoch (dropped by default)."""

    train_data: Optional[list[str]] = None
    """Fine-tuning: training files (RACE: folders)."""

    valid_data: Optional[list[str]] = None
    """Validation / evaluation files (RACE: folders)."""

    overlapping_eval: int = 32
    """WIKITEXT103: stride of the overlapping windows; only the last stride targets of a window count."""

    strict_lambada: bool = False
    """LAMBADA: the target is the whole last word (all its tokens must be predicted)."""

    eval_micro_batch_size: Optional[int] = None
    """Micro-batch size for evaluation (default: --micro-batch-size)."""

    results_path: Optional[str] = None
    """Gigatron addition: JSON file for the evaluation results. Default: beside the checkpoint
    (--load, or --save when fine-tuning), named with the task, the data files and the time. An
    existing file is never overwritten: the results then go to a new name, which is printed."""

    def __post_init__(self) -> None:
        validate_task_config(self)


def validate_task_config(config: TaskConfig) -> None:
    """Raise ValueError naming the flags when the task settings are incomplete or inconsistent."""
    if config.task is None:
        raise ValueError(f"give --task, one of {', '.join(ZEROSHOT_TASKS + FINETUNE_TASKS)}")
    if not config.valid_data:
        raise ValueError(f"--task {config.task} needs --valid-data FILE [FILE ...]")
    if config.task in FINETUNE_TASKS:
        if not config.train_data:
            raise ValueError(f"--task {config.task} needs --train-data")
        if config.epochs is None or config.epochs < 1:
            raise ValueError(f"fine-tuning needs --epochs >= 1 (got {config.epochs})")
    if config.overlapping_eval < 1:
        raise ValueError(f"--overlapping-eval must be >= 1, got {config.overlapping_eval}")
    if config.eval_micro_batch_size is not None and config.eval_micro_batch_size < 1:
        raise ValueError(f"--eval-micro-batch-size must be >= 1, got {config.eval_micro_batch_size}")
