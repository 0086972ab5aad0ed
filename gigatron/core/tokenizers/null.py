"""``--tokenizer-type NullTokenizer``: the text already is token ids, written as decimal numbers.

``--vocab-size V`` ids 0..V-1 are allowed in the text; ``eod`` is V and ``vocab_size`` is V + 1,
as in Megatron. Numbers are separated by whitespace (Megatron splits on single spaces only and
fails on two spaces in a row or on an empty text; here any whitespace separates and an empty text
has no ids). A number outside 0..V is an error naming it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import Tokenizer


class NullTokenizer(Tokenizer):
    name = "NullTokenizer"

    def __init__(self, vocab_size: int):
        super().__init__()
        if vocab_size is None or int(vocab_size) <= 0:
            raise ValueError(f"NullTokenizer needs --vocab-size > 0, got {vocab_size}")
        self._num_ids = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._num_ids + 1

    @property
    def eod(self) -> int:
        return self._num_ids

    @property
    def eos(self) -> int:
        return self._num_ids

    def tokenize(self, text: str) -> list[int]:
        return self._parse(text).tolist()

    def _parse(self, text: str) -> np.ndarray:
        try:
            ids = np.array([int(x) for x in text.split()], dtype=np.int64)
        except ValueError as e:
            raise ValueError(f"NullTokenizer input must be whitespace-separated integers: {e}") from e
        bad = (ids < 0) | (ids > self._num_ids)
        if bad.any():
            raise ValueError(f"NullTokenizer: id {int(ids[bad][0])} is outside 0..{self._num_ids} "
                             f"(--vocab-size {self._num_ids}; {self._num_ids} is the end-of-document id)")
        return ids

    def tokenize_batch_to_array(self, texts: Sequence[str], dtype=np.int64):
        arrays = [self._parse(t) for t in texts]
        lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        ids = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype=dtype)
        return ids, lengths

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)
