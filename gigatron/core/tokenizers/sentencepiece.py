"""SentencePiece models (``SentencePieceTokenizer``, ``GPTSentencePieceTokenizer``, ``Llama2Tokenizer``).

- ``SentencePieceTokenizer`` (T5/BERT style): the model's pieces, then ``<CLS>``, ``<SEP>``,
  ``<EOD>``, ``<MASK>`` and, when the model lacks them, ``<PAD>``, ``<BOS>``, ``<EOS>``, then the
  ``--vocab-extra-ids`` sentinels ``<extra_id_i>``, each appended with the next free id. These
  special tokens *are* recognised when written in the text (the earliest occurrence wins), as in
  Megatron. ``eod`` is ``<EOD>``.
- ``GPTSentencePieceTokenizer``: the model's pieces only; ``eod`` = the model's EOS.
- ``Llama2Tokenizer``: the model's pieces; ``tokenize`` puts BOS first (Megatron's default for
  text completion); ``eod`` = EOS.
"""

from __future__ import annotations

import re
from typing import Sequence

from .base import DictVocabTokenizer


def _load(model_file: str):
    import sentencepiece

    try:
        return sentencepiece.SentencePieceProcessor(model_file=model_file)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"cannot load SentencePiece model {model_file!r} ({e}); "
                         "pass a .model file as --tokenizer-model") from e


class _SentencePieceBase(DictVocabTokenizer):
    def __init__(self, model_file: str):
        super().__init__()
        self._sp = _load(model_file)
        self._vocab = {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}
        self._inv_vocab = {i: t for t, i in self._vocab.items()}

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self._sp.encode(texts, out_type=int, num_threads=self.num_threads or -1)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class SentencePieceTokenizer(_SentencePieceBase):
    name = "SentencePieceTokenizer"

    def __init__(self, model_file: str, vocab_extra_ids: int = 0):
        super().__init__(model_file)
        self._special: dict[str, int] = {}

        def add(token: str) -> int:
            if token not in self._vocab:
                self._vocab[token] = len(self._vocab)
                self._inv_vocab[self._vocab[token]] = token
            self._special[token] = self._vocab[token]
            return self._vocab[token]

        def model_piece(idx: int, fallback: str) -> str:
            return self._sp.id_to_piece(idx) if 0 <= idx < self._sp.get_piece_size() else fallback

        self._cls = add("<CLS>")
        self._sep = add("<SEP>")
        self._eod = add("<EOD>")
        self._mask = add("<MASK>")
        self._pad = add(model_piece(self._sp.pad_id(), "<PAD>"))
        self._bos = add(model_piece(self._sp.bos_id(), "<BOS>"))
        self._eos = add(model_piece(self._sp.eos_id(), "<EOS>"))
        self._extra = [add(f"<extra_id_{i}>") for i in range(vocab_extra_ids)]
        self._inv_special = {i: t for t, i in self._special.items()}
        # Alternatives in insertion order: at one position the first listed token wins.
        self._special_re = re.compile("|".join(re.escape(t) for t in self._special))

    def _tokenize_with_specials(self, text: str) -> list[int]:
        ids: list[int] = []
        start = 0
        for m in self._special_re.finditer(text):
            ids.extend(self._sp.encode(text[start:m.start()], out_type=int))
            ids.append(self._special[m.group(0)])
            start = m.end()
        ids.extend(self._sp.encode(text[start:], out_type=int))
        return ids

    def tokenize(self, text: str) -> list[int]:
        return self._tokenize_with_specials(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        plain = [i for i, t in enumerate(texts) if self._special_re.search(t) is None]
        out: list[list[int]] = [None] * len(texts)  # type: ignore[list-item]
        for i, ids in zip(plain, self._encode_many([texts[i] for i in plain])):
            out[i] = ids
        for i, t in enumerate(texts):
            if out[i] is None:
                out[i] = self._tokenize_with_specials(t)
        return out

    def detokenize(self, ids: Sequence[int]) -> str:
        """Special tokens are written out, separated by spaces from the decoded runs around them."""
        text, run = "", []
        for i in ids:
            i = int(i)
            if i in self._inv_special:
                text += self._sp.decode(run) + " " + self._inv_special[i] + " "
                run = []
            else:
                run.append(i)
        return text + self._sp.decode(run)

    @property
    def cls(self) -> int:
        return self._cls

    @property
    def sep(self) -> int:
        return self._sep

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def mask(self) -> int:
        return self._mask

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def bos(self) -> int:
        return self._bos

    @property
    def eos(self) -> int:
        return self._eos

    @property
    def additional_special_tokens_ids(self) -> list[int]:
        return list(self._extra)


class GPTSentencePieceTokenizer(_SentencePieceBase):
    name = "GPTSentencePieceTokenizer"

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._encode_many(list(texts))

    @property
    def pad(self) -> int:
        return self._sp.pad_id()

    @property
    def bos(self) -> int:
        return self._sp.bos_id()

    @property
    def eos(self) -> int:
        return self._sp.eos_id()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()


class Llama2Tokenizer(GPTSentencePieceTokenizer):
    name = "Llama2Tokenizer"

    def tokenize(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self._sp.encode(text, out_type=int)
        return ([self.bos] if bos else []) + ids + ([self.eos] if eos else [])

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [[self.bos] + ids for ids in self._encode_many(list(texts))]
