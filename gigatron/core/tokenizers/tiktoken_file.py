"""``--tokenizer-type TikTokenizer``: a byte-level BPE given as merge ranks, encoded by tiktoken.

The file is either Megatron's JSON (a list of ``{"rank", "token_bytes" (base64), "token_str"}``
in rank order) or tiktoken's text format (``<base64 token> <rank>`` per line). As in Megatron,
ids ``0 .. --tiktoken-num-special-tokens - 1`` are special tokens (the given
``--tiktoken-special-tokens``, which must include ``<unk>``, ``<s>``, ``</s>``, then fillers
``<SPECIAL_i>``), and token of rank r gets id ``r + num_special_tokens``; the vocabulary is cut to
``--vocab-size`` (default 2**17) ids. ``eod`` is ``</s>``. Special tokens written in the text are
ordinary text.
"""

from __future__ import annotations

import base64
import json
from typing import Sequence

from .base import Tokenizer

PATTERN_V1 = r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
PATTERN_V2 = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
              r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
              r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
REQUIRED_SPECIALS = ["<unk>", "<s>", "</s>"]


def load_ranks(path: str, max_vocab: int | None = None) -> dict[bytes, int]:
    """Token bytes -> rank, from Megatron's JSON list or a tiktoken ``.tiktoken`` file."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        head = f.read(1)
    if head == b"[":
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
        for i, entry in enumerate(entries):
            if entry.get("rank") != i:
                raise ValueError(f"{path}: entry {i} has rank {entry.get('rank')}; ranks must be 0, 1, 2, ... in order")
            ranks[base64.b64decode(entry["token_bytes"])] = i
    else:
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
                except ValueError as e:
                    raise ValueError(f"{path}:{n}: expected '<base64 token> <rank>'") from e
    if max_vocab is not None:
        ranks = {t: r for t, r in ranks.items() if r < max_vocab}
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps")
    return ranks


class TikTokenizer(Tokenizer):
    name = "TikTokenizer"

    def __init__(self, path: str, pattern: str = "v2", vocab_size: int | None = None,
                 num_special_tokens: int = 1000, special_tokens: Sequence[str] | None = None):
        super().__init__()
        import tiktoken

        if pattern not in ("v1", "v2"):
            raise ValueError(f"--tiktoken-pattern must be v1 or v2, got {pattern!r}")
        self._vocab_size = int(vocab_size) if vocab_size else 2 ** 17
        specials = list(special_tokens) if special_tokens else list(REQUIRED_SPECIALS)
        if len(set(specials)) != len(specials):
            raise ValueError(f"--tiktoken-special-tokens has duplicates: {specials}")
        missing = [t for t in REQUIRED_SPECIALS if t not in specials]
        if missing:
            raise ValueError(f"--tiktoken-special-tokens must include {REQUIRED_SPECIALS}; missing {missing}")
        if not len(specials) <= num_special_tokens < self._vocab_size:
            raise ValueError(f"need len(special tokens)={len(specials)} <= --tiktoken-num-special-tokens="
                             f"{num_special_tokens} < vocab size {self._vocab_size}")
        specials += [f"<SPECIAL_{i}>" for i in range(len(specials), num_special_tokens)]
        ranks = load_ranks(path, max_vocab=self._vocab_size - num_special_tokens)
        mergeable = {t: r + num_special_tokens for t, r in ranks.items()}
        special_ids = {t: i for i, t in enumerate(specials)}
        # tiktoken treats ids as merge ranks; shifting all ranks by a constant keeps their order.
        self._model = tiktoken.Encoding(name="gigatron-tiktoken", pat_str=PATTERN_V1 if pattern == "v1" else PATTERN_V2,
                                        mergeable_ranks=mergeable, special_tokens=special_ids)
        self._token_to_id: dict = dict(mergeable)
        self._token_to_id.update(special_ids)
        self._specials = special_ids

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def vocab(self) -> dict:
        return self._token_to_id

    def tokenize(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._model.encode_ordinary(text)
        return ([self.bos] if bos else []) + ids + ([self.eos] if eos else [])

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._model.encode_ordinary_batch(list(texts), num_threads=self.num_threads or 8)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._model.decode([int(i) for i in ids], errors="replace")

    @property
    def bos(self) -> int:
        return self._specials["<s>"]

    @property
    def eos(self) -> int:
        return self._specials["</s>"]

    @property
    def eod(self) -> int:
        return self.eos

    @property
    def unk(self) -> int:
        return self._specials["<unk>"]
