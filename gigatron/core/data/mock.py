"""Synthetic documents for ``--mock-data`` (Megatron's MockGPTLowLevelDataset / MockGPTDataset)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from .gpt_dataset import GPTDataset


class MockGPTLowLevelDataset:
    """100,000 documents; document ``i`` is ``1, 2, …, n_i - 1`` (each id modulo the tokenizer's
    ``vocab_size``) followed by ``eod``, with ``n_i`` uniform in [1, 4096).

    The lengths come from ``numpy.random.default_rng(0)`` and the ids wrap at the tokenizer's
    vocabulary size, as in Megatron-Core, so mock runs see the same token stream in both frameworks
    (and every id is a valid embedding row, whatever the vocabulary size).
    """

    seed: int = 0
    size: int = 100000
    max_sequence_length: int = 4096

    def __init__(self, tokenizer):
        if tokenizer is None or getattr(tokenizer, "eod", None) is None:
            raise ValueError("--mock-data needs a tokenizer with an `eod` token (e.g. --tokenizer-type NullTokenizer)")
        self.tokenizer = tokenizer
        vocab_size = getattr(tokenizer, "vocab_size", None)
        if not isinstance(vocab_size, (int, np.integer)) or vocab_size <= 0:
            raise ValueError("--mock-data needs a tokenizer with a positive `vocab_size` (its ids wrap at it), "
                             f"got {vocab_size!r}; use e.g. --tokenizer-type NullTokenizer --vocab-size N")
        self.vocab_size = int(vocab_size)
        self.eod = int(tokenizer.eod)
        rng = np.random.default_rng(seed=self.seed)
        self.sequence_lengths = rng.integers(
            low=1, high=self.max_sequence_length, size=self.size, dtype=np.int32
        )
        self.document_indices = np.arange(self.size + 1, dtype=np.int64)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> np.ndarray:
        length = int(self.sequence_lengths[idx])
        sample = np.empty(length, dtype=np.int64)
        sample[:-1] = np.arange(1, length) % self.vocab_size
        sample[-1] = self.eod
        return sample

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        if length is None:
            length = int(self.sequence_lengths[idx]) - offset
        return self[idx][offset : offset + length]


class MockGPTDataset(GPTDataset):
    """A GPTDataset over :class:`MockGPTLowLevelDataset` (no files; indices built in memory unless a
    cache directory is given)."""
