"""The interface every tokenizer follows, and the batch path used by preprocessing.

A tokenizer maps text to a list of integer ids and back, and names the ids that the data
pipeline and the models need (end of document, padding, BERT/T5 specials). Ids that a tokenizer
does not have are ``-1``, as in Megatron (so ``pad == -1`` means "no padding token"; the GPT
dataset then pads with -1 and masks those positions out of the loss).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from typing import Iterable, Sequence

import numpy as np


class NoVocabularyError(AttributeError):
    """Asked for the token vocabulary of a tokenizer that has none (e.g. NullTokenizer)."""


class Tokenizer(ABC):
    """Base class: subclasses implement ``tokenize``, ``detokenize``, ``vocab_size`` and ``eod``.

    ``tokenize_batch`` encodes many texts at once; subclasses backed by a Rust or C++ library
    override it with that library's batch encoder, which runs outside the Python interpreter lock
    on ``num_threads`` threads (None: the library's default).
    """

    #: Megatron's ``--tokenizer-type`` name of this tokenizer.
    name: str = ""

    def __init__(self) -> None:
        self.num_threads: int | None = None

    # -- the per-text interface -------------------------------------------------------------
    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (before padding for the embedding table)."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Text -> ids."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Ids -> text."""

    @property
    def vocab(self) -> dict:
        """Token string (or bytes) -> id."""
        raise NoVocabularyError(f"{type(self).__name__} has no token vocabulary")

    @property
    def inv_vocab(self) -> dict:
        """Id -> token string (or bytes)."""
        return {i: t for t, i in self.vocab.items()}

    # -- special ids (-1: this tokenizer has none) -------------------------------------------
    @property
    @abstractmethod
    def eod(self) -> int:
        """End-of-document id appended by ``--append-eod`` and used by ``--eod-mask-loss``."""

    @property
    def pad(self) -> int:
        return -1

    @property
    def cls(self) -> int:
        return -1

    @property
    def sep(self) -> int:
        return -1

    @property
    def mask(self) -> int:
        return -1

    @property
    def bos(self) -> int:
        return -1

    @property
    def eos(self) -> int:
        return -1

    @property
    def additional_special_tokens_ids(self) -> list[int] | None:
        """The ``--vocab-extra-ids`` sentinels ``<extra_id_0>``... (T5); None if not supported."""
        return None

    # -- batch interface ----------------------------------------------------------------------
    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text; equal to ``[self.tokenize(t) for t in texts]``."""
        return [self.tokenize(t) for t in texts]

    def tokenize_batch_to_array(self, texts: Sequence[str], dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
        """All ids of ``texts`` concatenated into one array of ``dtype``, and each text's length.

        Returns ``(ids [sum(lengths)], lengths [len(texts)] int64)``. The concatenation runs in
        C (no Python work per token).
        """
        return flatten_ids(self.tokenize_batch(texts), dtype)


def flatten_ids(id_lists: Sequence[Iterable[int]], dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate lists of ids into one array; returns ``(ids, lengths)``."""
    lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
    total = int(lengths.sum())
    ids = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=dtype, count=total)
    return ids, lengths


def hf_encode_batch(tokenizer, texts: list, add_special_tokens: bool = True) -> list[list[int]]:
    """Ids of each text from a HuggingFace ``tokenizers.Tokenizer`` (without offsets where supported)."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # _fast: tokenizers >= 0.20
    return [e.ids for e in encode(texts, add_special_tokens=add_special_tokens)]


class DictVocabTokenizer(Tokenizer):
    """A tokenizer whose vocabulary is held as ``self._vocab`` (token -> id) and
    ``self._inv_vocab`` (id -> token), both built by the subclass's constructor."""

    _vocab: dict
    _inv_vocab: dict

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def vocab(self) -> dict:
        return self._vocab

    @property
    def inv_vocab(self) -> dict:
        return self._inv_vocab
