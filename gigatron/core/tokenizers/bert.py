"""BERT WordPiece (``--tokenizer-type BertWordPieceLowerCase`` / ``BertWordPieceCase``).

Ids equal Google's original BERT tokenizer as Megatron uses it: clean the text (drop NUL, U+FFFD
and control characters, map whitespace to spaces), put spaces around CJK ideographs, split on
whitespace and punctuation, lower-case and strip accents (lower-case variant only), then greedy
longest-match WordPiece with ``##`` continuations. Two settings differ from HuggingFace's
BertWordPiece defaults and follow Google's code: a word longer than 200 characters becomes
``[UNK]``, and special tokens written in the text (``[MASK]``, ``[SEP]`` ...) are not special —
they are tokenized as ordinary text (``[``, ``mask``, ``]``). The basic tokenizer is computed
with whole-text string operations (``bert_basic``); WordPiece runs in HuggingFace ``tokenizers``.

Like Megatron, ``[BOS]``, ``[EOS]`` and ``--vocab-extra-ids`` sentinels ``<extra_id_i>`` are added
to the vocabulary after the file's tokens when missing; ``eod`` is ``[EOS]``.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from . import bert_basic
from .base import DictVocabTokenizer, flatten_ids, hf_encode_batch

MAX_WORD_CHARS = 200


def load_vocab_txt(path: str) -> dict[str, int]:
    """vocab.txt: one token per line (surrounding whitespace stripped), id = line number.

    As in Google's loader, a token repeated later in the file takes the later line's id.
    """
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            vocab[line.strip()] = index
    return vocab


class BertWordPieceTokenizer(DictVocabTokenizer):
    """Google BERT basic tokenizer + WordPiece over ``vocab.txt``."""

    def __init__(self, vocab_file: str, lower_case: bool = True, vocab_extra_ids: int = 0):
        super().__init__()
        from tokenizers import Tokenizer as HFTokenizer, models

        self.name = "BertWordPieceLowerCase" if lower_case else "BertWordPieceCase"
        self.lower_case = lower_case
        vocab = load_vocab_txt(vocab_file)
        for required in ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"):
            if required not in vocab:
                raise ValueError(f"{vocab_file} has no {required} token; pass a BERT vocab.txt as --vocab-file")
        # Megatron appends these after the file's tokens; being inside the WordPiece vocabulary
        # does not make them reachable from text, as brackets and '<' are split off as punctuation.
        for token in ["[BOS]", "[EOS]"] + [f"<extra_id_{i}>" for i in range(vocab_extra_ids)]:
            vocab.setdefault(token, len(vocab))
        self._extra_tokens = [f"<extra_id_{i}>" for i in range(vocab_extra_ids)]
        self._vocab = vocab
        self._inv_vocab = {i: t for t, i in vocab.items()}

        # WordPiece runs in HuggingFace tokenizers, one distinct word at a time (no normalizer or
        # pre-tokenizer: each input is one word). No special tokens are registered with it.
        self._wordpiece = HFTokenizer(models.WordPiece(vocab=dict(vocab), unk_token="[UNK]",
                                                       max_input_chars_per_word=MAX_WORD_CHARS))
        bert_basic.tables()  # build the character classes now (forked workers inherit them)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenize_batch([text])[0]

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        ids, lengths = self.tokenize_batch_to_array(texts)
        return [a.tolist() for a in np.split(ids, np.cumsum(lengths)[:-1])] if len(texts) else []

    def tokenize_batch_to_array(self, texts: Sequence[str], dtype=np.int64):
        """Basic tokenization per text, WordPiece once per distinct word, then a numpy gather."""
        words_per_text = [bert_basic.basic_words(t, self.lower_case) for t in texts]
        words_in_text = np.fromiter(map(len, words_per_text), dtype=np.int64, count=len(words_per_text))
        num_words = int(words_in_text.sum())
        # distinct words in first-seen order, then each occurrence's number (both loops run in C)
        index = dict.fromkeys(itertools.chain.from_iterable(words_per_text))
        for code, word in enumerate(index):
            index[word] = code
        codes = np.fromiter(map(index.__getitem__, itertools.chain.from_iterable(words_per_text)),
                            dtype=np.int64, count=num_words)
        pieces = hf_encode_batch(self._wordpiece, list(index), add_special_tokens=False) if index else []
        piece_ids, piece_counts = flatten_ids(pieces, np.int64)
        piece_start = np.zeros(piece_counts.size, dtype=np.int64)
        np.cumsum(piece_counts[:-1], out=piece_start[1:])
        word_len = piece_counts[codes]  # pieces of each word occurrence
        out_start = np.zeros(word_len.size + 1, dtype=np.int64)
        np.cumsum(word_len, out=out_start[1:])
        gather = np.repeat(piece_start[codes] - out_start[:-1], word_len) + np.arange(out_start[-1])
        ids = piece_ids[gather].astype(dtype)
        text_bounds = np.zeros(len(words_per_text) + 1, dtype=np.int64)
        np.cumsum(words_in_text, out=text_bounds[1:])
        lengths = out_start[text_bounds[1:]] - out_start[text_bounds[:-1]]
        return ids, lengths

    def detokenize(self, ids: Sequence[int]) -> str:
        """Tokens joined with spaces, ``##`` continuations glued to the previous token."""
        out = []
        for i in ids:
            token = self._inv_vocab[int(i)]
            if token.startswith("##") and out:
                out[-1] += token[2:]
            else:
                out.append(token)
        return " ".join(out)

    @property
    def cls(self) -> int:
        return self._vocab["[CLS]"]

    @property
    def sep(self) -> int:
        return self._vocab["[SEP]"]

    @property
    def pad(self) -> int:
        return self._vocab["[PAD]"]

    @property
    def mask(self) -> int:
        return self._vocab["[MASK]"]

    @property
    def bos(self) -> int:
        return self._vocab["[BOS]"]

    @property
    def eos(self) -> int:
        return self._vocab["[EOS]"]

    @property
    def eod(self) -> int:
        return self.eos

    @property
    def additional_special_tokens_ids(self) -> list[int]:
        return [self._vocab[t] for t in self._extra_tokens]
