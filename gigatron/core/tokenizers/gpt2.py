"""GPT-2 byte-level BPE (``--tokenizer-type GPT2BPETokenizer``).

Ids equal OpenAI's original GPT-2 encoder: text is cut with GPT-2's pre-tokenization pattern (no
prefix space), each piece's UTF-8 bytes are mapped to printable characters and merged by the BPE
ranks of ``merges.txt``. ``<|endoftext|>`` (50256 in the original files) is the end-of-document id;
written inside a text it is ordinary text, as in the original encoder.

Encoding runs in HuggingFace ``tokenizers``. When the vocabulary is laid out like OpenAI's (the 256
byte tokens first, then one token per merge in merge order, extra tokens after), ``tiktoken`` is
used instead: it computes the same ids faster (tests/unit/test_tokenizers.py compares them).
"""

from __future__ import annotations

import json
from typing import Sequence

from .base import DictVocabTokenizer, hf_encode_batch

#: OpenAI's GPT-2 pre-tokenization pattern.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOD_TOKEN = "<|endoftext|>"


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Bytes that are printable Latin-1 characters (other than space) map to themselves; the others
    are given the characters 256, 257, ... in increasing byte order.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _read_merges(path: str) -> list[tuple[str, str]]:
    merges = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or line.startswith("#version"):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{path}: merge line {line!r} is not two tokens separated by a space; "
                                 "pass GPT-2's merges.txt (vocab.bpe) as --merge-file")
            merges.append((parts[0], parts[1]))
    return merges


def _tiktoken_ranks(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """Byte ranks and special tokens for tiktoken, or None when ids would differ from BPE's.

    tiktoken returns merge ranks as ids, so the layout must be: each of the 256 byte tokens below
    256, merge ``i`` producing token id ``256 + i``, and every other token out of reach of merges.
    """
    # str.translate maps each printable stand-in back to the Latin-1 character of its byte value;
    # encoding as Latin-1 then yields the token's bytes (and fails for characters outside the map).
    to_latin1 = {ord(c): b for b, c in byte_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for token, idx in vocab.items():
        try:
            ranks[token.translate(to_latin1).encode("latin-1")] = idx
        except UnicodeEncodeError:
            return None
    if len(ranks) != len(vocab):
        return None
    if sorted(ranks.get(bytes([b]), -1) for b in range(256)) != list(range(256)):
        return None
    for i, (a, b) in enumerate(merges):
        if vocab.get(a + b) != 256 + i:
            return None
    num_mergeable = 256 + len(merges)
    mergeable = {t: i for t, i in ranks.items() if i < num_mergeable}
    if len(mergeable) != num_mergeable:
        return None
    # Tokens after the merges (e.g. <|endoftext|>) are only produced by id, never by merging.
    inv = {i: t for t, i in vocab.items()}
    special = {inv[i]: i for i in ranks.values() if i >= num_mergeable}
    return mergeable, special


class GPT2BPETokenizer(DictVocabTokenizer):
    """Byte-level BPE from ``vocab.json`` (token -> id) and ``merges.txt``."""

    name = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str, merge_file: str, use_tiktoken: bool | None = None):
        """``use_tiktoken``: None picks tiktoken when installed and the files allow it."""
        super().__init__()
        with open(vocab_file, encoding="utf-8") as f:
            self._vocab = json.load(f)
        if EOD_TOKEN not in self._vocab:
            raise ValueError(f"{vocab_file} has no {EOD_TOKEN} token; GPT2BPETokenizer needs GPT-2's "
                             "vocab.json (encoder.json) as --vocab-file")
        self._eod = self._vocab[EOD_TOKEN]
        merges = _read_merges(merge_file)
        self._inv_vocab = {i: t for t, i in self._vocab.items()}

        self._tiktoken = None
        if use_tiktoken is not False:
            try:
                import tiktoken
            except ImportError:
                tiktoken = None
                if use_tiktoken:
                    raise
            layout = _tiktoken_ranks(self._vocab, merges) if tiktoken is not None else None
            if layout is None and use_tiktoken:
                raise ValueError(f"{vocab_file}: token ids are not laid out in merge order; "
                                 "tiktoken cannot reproduce them (use use_tiktoken=None)")
            if layout is not None:
                mergeable, special = layout
                self._tiktoken = tiktoken.Encoding(
                    name="gigatron-gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=mergeable,
                    special_tokens=special)
        self._hf = None
        if self._tiktoken is None:
            from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

            hf = HFTokenizer(models.BPE(vocab=dict(self._vocab), merges=merges))
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            hf.decoder = decoders.ByteLevel()
            self._hf = hf

    @property
    def backend(self) -> str:
        """Which library encodes: ``"tiktoken"`` or ``"tokenizers"``."""
        return "tiktoken" if self._tiktoken is not None else "tokenizers"

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        if self._tiktoken is not None:
            return self._tiktoken.encode_ordinary(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        if self._tiktoken is not None:
            return self._tiktoken.encode_ordinary_batch(texts, num_threads=self.num_threads or 8)
        return hf_encode_batch(self._hf, texts, add_special_tokens=False)

    def detokenize(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self._tiktoken is not None:
            return self._tiktoken.decode(ids, errors="replace")
        return self._hf.decode(ids, skip_special_tokens=False)
