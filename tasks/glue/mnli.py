"""MNLI (GLUE): 3-way entailment classification of sentence pairs.

TSV files with a header line. Train and dev files: id in column 0, sentence1 in column 8,
sentence2 in column 9, gold label in the last column; test files have 10 columns and no label
(every sample gets the dummy label "contradiction").
"""

from __future__ import annotations

from tasks.glue.data import DataFormatError, GLUEDataset, clean_text, parse_int, read_tsv

__all__ = ["LABELS", "NUM_CLASSES", "parse_mnli", "MNLIDataset"]

LABELS = {"contradiction": 0, "entailment": 1, "neutral": 2}
NUM_CLASSES = len(LABELS)
_TEST_COLUMNS = 10
_MIN_COLUMNS = 11  # id .. sentence2 (10 columns), then at least one label column


def parse_mnli(path: str) -> list[tuple[int, str, str, int]]:
    """(uid, text_a, text_b, label) of every data line of an MNLI TSV file."""
    rows = read_tsv(path)
    (_, header), data = rows[0], rows[1:]
    is_test = len(header) == _TEST_COLUMNS
    expected = _TEST_COLUMNS if is_test else len(header)
    if not is_test and len(header) < _MIN_COLUMNS:
        raise DataFormatError(f"{path} line 1: the header has {len(header)} columns; MNLI files have "
                              f"{_TEST_COLUMNS} (test) or at least {_MIN_COLUMNS} (train/dev)")
    samples = []
    for line_number, row in data:
        if len(row) != expected:
            raise DataFormatError(f"{path} line {line_number}: {len(row)} columns, expected {expected} like the "
                                  "header (a tab inside a sentence or a truncated line?)")
        uid = parse_int(row[0], path, line_number, "id")
        text_a, text_b = clean_text(row[8].strip()), clean_text(row[9].strip())
        if not text_a or not text_b:
            raise DataFormatError(f"{path} line {line_number}: empty sentence in column 9 or 10")
        if is_test:
            label = LABELS["contradiction"]
        else:
            name = row[-1].strip()
            if name not in LABELS:
                raise DataFormatError(f"{path} line {line_number}: label {name!r} is not one of {sorted(LABELS)}")
            label = LABELS[name]
        samples.append((uid, text_a, text_b, label))
    return samples


class MNLIDataset(GLUEDataset):
    """MNLI samples of one or more TSV files."""

    def __init__(self, paths, tokenizer, max_seq_length: int):
        super().__init__("MNLI", paths, tokenizer, max_seq_length, parse_mnli)
