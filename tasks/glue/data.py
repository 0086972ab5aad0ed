"""GLUE-style sentence(-pair) classification data: TSV reading and BERT sample construction.

A sample is a dict of numpy arrays: "text" int64 [s] = [CLS] a [SEP] b [SEP] padded with the
tokenizer's pad id, "types" int64 [s] (0 for [CLS] a [SEP], 1 for b [SEP], 0 on padding),
"padding_mask" int64 [s] (1 = token, 0 = padding), "label" int64 [], "uid" int64 [].
A pair longer than s is cut at the end (keeping the final [SEP]).
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

import numpy as np

__all__ = ["DataFormatError", "clean_text", "build_pair_sample", "read_tsv", "GLUEDataset", "collate"]


class DataFormatError(ValueError):
    """A task data file that does not have the expected format (names the file and line)."""


def clean_text(text: str) -> str:
    """Newlines to spaces, runs of whitespace to one space, " . " to ". " (as the GLUE readers do)."""
    text = re.sub(r"\s+", " ", text.replace("\n", " "))
    for _ in range(3):
        text = text.replace(" . ", ". ")
    return text


def build_pair_sample(ids_a: Sequence[int], ids_b: Optional[Sequence[int]], label: int, uid: int, *,
                      max_seq_length: int, cls_id: int, sep_id: int, pad_id: int) -> dict:
    """[CLS] a [SEP] (b [SEP]) cut to `max_seq_length` (keeping a final [SEP]) and padded."""
    if max_seq_length < 3:
        raise ValueError(f"--seq-length {max_seq_length} is too short for [CLS] a [SEP]")
    ids = [cls_id, *ids_a, sep_id]
    types = [0] * len(ids)
    if ids_b is not None:
        ids += [*ids_b, sep_id]
        types += [1] * (len(ids_b) + 1)
    if len(ids) > max_seq_length:
        ids = ids[:max_seq_length - 1] + [sep_id]
        types = types[:max_seq_length]
    num_tokens = len(ids)
    text = np.full(max_seq_length, pad_id, dtype=np.int64)
    text[:num_tokens] = ids
    type_ids = np.zeros(max_seq_length, dtype=np.int64)
    type_ids[:num_tokens] = types
    padding_mask = np.zeros(max_seq_length, dtype=np.int64)
    padding_mask[:num_tokens] = 1
    return {"text": text, "types": type_ids, "padding_mask": padding_mask,
            "label": np.int64(label), "uid": np.int64(uid)}


def read_tsv(path: str) -> list[tuple[int, list[str]]]:
    """(line number, columns) of every non-empty line of a tab-separated file, header included."""
    try:
        handle = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise DataFormatError(f"{path}: file not found") from None
    rows = []
    with handle:
        for line_number, line in enumerate(handle, 1):
            line = line.rstrip("\r\n")
            if line.strip():
                rows.append((line_number, line.split("\t")))
    if not rows:
        raise DataFormatError(f"{path}: the file is empty")
    return rows


def parse_int(value: str, path: str, line_number: int, what: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise DataFormatError(f"{path} line {line_number}: {what} {value!r} is not an integer") from None


class GLUEDataset:
    """Samples of one or more TSV files, each parsed by `parse(path) -> [(uid, text_a, text_b, label)]`,
    tokenized with `tokenizer` into pair samples of length `max_seq_length`."""

    def __init__(self, task_name: str, paths: Sequence[str], tokenizer, max_seq_length: int,
                 parse: Callable[[str], list]):
        self.task_name = task_name
        self.samples = []
        for path in paths:
            for uid, text_a, text_b, label in parse(path):
                ids_a = tokenizer.tokenize(text_a)
                ids_b = tokenizer.tokenize(text_b) if text_b is not None else None
                self.samples.append(build_pair_sample(
                    ids_a, ids_b, label, uid, max_seq_length=max_seq_length, cls_id=tokenizer.cls,
                    sep_id=tokenizer.sep, pad_id=tokenizer.pad))
        if not self.samples:
            raise DataFormatError(f"{task_name}: no samples in {', '.join(paths)}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]


def collate(rows: list) -> dict:
    """Stack sample dicts into a batch of tensors."""
    from tasks.eval_utils import stack_rows

    return stack_rows(rows)
