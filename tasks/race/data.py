"""RACE reading comprehension: multiple choice over 4 options.

A RACE folder (e.g. RACE/train/middle) holds *.txt files, each one JSON object
{"article": str, "questions": [str], "options": [[4 str]], "answers": ["A".."D"]}.
Every question gives one sample of NUM_CHOICES rows `[CLS] qa [SEP] article [SEP]`, where qa is the
question with "_" replaced by the option if it has a blank, else question + " " + option; qa is
cut to MAX_QA_LENGTH tokens. Label = ord(answer) - ord("A").

A sample: "text", "types", "padding_mask" int64 [4, s], "label" int64 [], "uid" int64 [].
"""

from __future__ import annotations

import glob
import json
import os
from typing import Sequence

import numpy as np

from tasks.glue.data import DataFormatError, build_pair_sample

__all__ = ["NUM_CHOICES", "MAX_QA_LENGTH", "question_option_text", "read_race_file", "RaceDataset"]

NUM_CHOICES = 4
MAX_QA_LENGTH = 128


def question_option_text(question: str, option: str) -> str:
    """The question with its blank filled by `option`, or the question followed by the option."""
    return question.replace("_", option) if "_" in question else question + " " + option


def read_race_file(path: str) -> dict:
    """The JSON object of one RACE file, checked for the fields and their shapes."""
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}: not JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(record, dict):
        raise DataFormatError(f"{path}: expected a JSON object with article, questions, options, answers")
    missing = [key for key in ("article", "questions", "options", "answers") if key not in record]
    if missing:
        raise DataFormatError(f"{path}: missing field(s) {', '.join(missing)}")
    questions, options, answers = record["questions"], record["options"], record["answers"]
    if not (len(questions) == len(options) == len(answers)):
        raise DataFormatError(f"{path}: {len(questions)} questions, {len(options)} option lists and "
                              f"{len(answers)} answers; they must be equally many")
    for index, (choices, answer) in enumerate(zip(options, answers)):
        if len(choices) != NUM_CHOICES:
            raise DataFormatError(f"{path}: question {index + 1} has {len(choices)} options, expected {NUM_CHOICES}")
        if not (isinstance(answer, str) and len(answer) == 1 and 0 <= ord(answer) - ord("A") < NUM_CHOICES):
            raise DataFormatError(f"{path}: question {index + 1} has answer {answer!r}, expected one of A, B, C, D")
    return record


class RaceDataset:
    """RACE samples of the *.txt files in one or more folders."""

    def __init__(self, folders: Sequence[str], tokenizer, max_seq_length: int, max_qa_length: int = MAX_QA_LENGTH):
        self.samples = []
        for folder in folders:
            if not os.path.isdir(folder):
                raise DataFormatError(f"{folder}: not a folder; RACE data is a folder of *.txt JSON files "
                                      "(e.g. RACE/train/middle)")
            paths = sorted(glob.glob(os.path.join(folder, "*.txt")))
            if not paths:
                raise DataFormatError(f"{folder}: no *.txt files")
            for path in paths:
                self._add_file(read_race_file(path), tokenizer, max_seq_length, max_qa_length)

    def _add_file(self, record: dict, tokenizer, max_seq_length: int, max_qa_length: int) -> None:
        article_ids = tokenizer.tokenize(record["article"])
        for question, choices, answer in zip(record["questions"], record["options"], record["answers"]):
            rows = []
            for option in choices:
                qa_ids = tokenizer.tokenize(question_option_text(question, option))[:max_qa_length]
                rows.append(build_pair_sample(qa_ids, article_ids, 0, 0, max_seq_length=max_seq_length,
                                              cls_id=tokenizer.cls, sep_id=tokenizer.sep, pad_id=tokenizer.pad))
            uid = len(self.samples)
            self.samples.append({
                "text": np.stack([r["text"] for r in rows]),  # [4, s]
                "types": np.stack([r["types"] for r in rows]),  # [4, s]
                "padding_mask": np.stack([r["padding_mask"] for r in rows]),  # [4, s]
                "label": np.int64(ord(answer) - ord("A")),
                "uid": np.int64(uid),
            })

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]
