"""QQP (GLUE): are two Quora questions duplicates (2 classes)?

TSV files with a header line. Train and dev: id, qid1, qid2, question1, question2, is_duplicate
(6 columns, label 0 or 1). Test: id, question1, question2 (3 columns; dummy label 0).
"""

from __future__ import annotations

from tasks.glue.data import DataFormatError, GLUEDataset, clean_text, parse_int, read_tsv

__all__ = ["LABELS", "NUM_CLASSES", "parse_qqp", "QQPDataset"]

LABELS = (0, 1)
NUM_CLASSES = 2
_TRAIN_COLUMNS = 6
_TEST_COLUMNS = 3


def parse_qqp(path: str) -> list[tuple[int, str, str, int]]:
    """(uid, text_a, text_b, label) of every data line of a QQP TSV file."""
    rows = read_tsv(path)
    (_, header), data = rows[0], rows[1:]
    if len(header) not in (_TRAIN_COLUMNS, _TEST_COLUMNS):
        raise DataFormatError(f"{path} line 1: the header has {len(header)} columns; QQP files have "
                              f"{_TRAIN_COLUMNS} (id, qid1, qid2, question1, question2, is_duplicate) or "
                              f"{_TEST_COLUMNS} (id, question1, question2)")
    is_test = len(header) == _TEST_COLUMNS
    samples = []
    for line_number, row in data:
        if len(row) != len(header):
            raise DataFormatError(f"{path} line {line_number}: {len(row)} columns, expected {len(header)} like the "
                                  "header (a tab inside a question or a truncated line?)")
        uid = parse_int(row[0], path, line_number, "id")
        if is_test:
            text_a, text_b, label = row[1], row[2], 0
        else:
            text_a, text_b = row[3], row[4]
            label = parse_int(row[5], path, line_number, "is_duplicate")
            if label not in LABELS:
                raise DataFormatError(f"{path} line {line_number}: is_duplicate {label} is not 0 or 1")
        text_a, text_b = clean_text(text_a.strip()), clean_text(text_b.strip())
        if not text_a or not text_b:
            raise DataFormatError(f"{path} line {line_number}: empty question")
        samples.append((uid, text_a, text_b, label))
    return samples


class QQPDataset(GLUEDataset):
    """QQP samples of one or more TSV files."""

    def __init__(self, paths, tokenizer, max_seq_length: int):
        super().__init__("QQP", paths, tokenizer, max_seq_length, parse_qqp)
