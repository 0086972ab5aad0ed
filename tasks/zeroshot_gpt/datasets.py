"""Zero-shot evaluation data: WikiText-style perplexity windows and LAMBADA cloze samples.

Every sample is a dict {"text": int64 [L + 1], "pad_mask": float32 [L]}: the model reads
text[:-1], predicts text[1:], and a target counts where pad_mask is 1 (L = --seq-length).

Perplexity windows (Megatron's definition). For T tokens, window length L and stride S
(--overlapping-eval, S <= L), window k holds tokens [k S, k S + L + 1) (padded past the end);
window 0 counts all its targets, window k > 0 only its last S, so every target 1 .. T-1 counts
exactly once; there are ceil(max(T - 1 - S, 0) / S) + 1 windows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from tasks.zeroshot_gpt.detokenizer import wikitext_detokenizer

__all__ = [
    "EvalDataError",
    "num_windows",
    "LMWindowDataset",
    "WikitextCorpus",
    "read_wikitext",
    "build_wikitext_dataset",
    "lambada_tokens",
    "LambadaDataset",
    "read_lambada",
    "build_lambada_dataset",
]


class EvalDataError(ValueError):
    """An evaluation file that cannot be read as the task expects (names the file and line)."""


def num_windows(num_tokens: int, stride: int) -> int:
    """ceil(max(T - 1 - S, 0) / S) + 1: Megatron's number of overlapping windows."""
    return math.ceil(max(num_tokens - 1 - stride, 0) / stride) + 1


class LMWindowDataset:
    """Overlapping windows of a token stream for perplexity (see the module docstring)."""

    def __init__(self, tokens: Sequence[int], seq_length: int, pad_id: int, stride: Optional[int] = None):
        stride = seq_length if stride is None else stride
        if seq_length < 1:
            raise ValueError(f"--seq-length must be >= 1, got {seq_length}")
        if not 1 <= stride <= seq_length:
            raise ValueError(f"--overlapping-eval ({stride}) must be between 1 and --seq-length ({seq_length}); "
                             "a larger stride would skip targets")
        if len(tokens) < 2:
            raise EvalDataError(f"the evaluation text has {len(tokens)} token(s); perplexity needs at least 2")
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.seq_length = seq_length
        self.stride = stride
        self.pad_id = int(pad_id)
        self.num_sequences = num_windows(len(self.tokens), stride)

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_sequences:
            raise IndexError(index)
        start = index * self.stride
        chunk = self.tokens[start:start + self.seq_length + 1]
        text = np.full(self.seq_length + 1, self.pad_id, dtype=np.int64)
        text[:len(chunk)] = chunk
        pad_mask = np.zeros(self.seq_length, dtype=np.float32)  # target j is text[j + 1]
        pad_mask[:max(len(chunk) - 1, 0)] = 1.0
        if index > 0 and self.stride != self.seq_length:
            pad_mask[:self.seq_length - self.stride] = 0.0  # counted by the previous windows
        return {"text": text, "pad_mask": pad_mask}


@dataclass
class WikitextCorpus:
    """A whole evaluation text: its tokens and the word count that adjusted perplexity uses."""

    tokens: list
    num_original_tokens: int

    @property
    def num_tokenized_tokens(self) -> int:
        return len(self.tokens)


def read_wikitext(path: str, tokenize: Callable[[str], list],
                  detokenize: Optional[Callable[[str], str]] = wikitext_detokenizer) -> WikitextCorpus:
    """Read `path` as one UTF-8 string; count its words as len(text.strip().split(" ")); apply
    `detokenize` (WikiText's by default) and tokenize the whole text."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise EvalDataError(f"--valid-data {path}: file not found") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EvalDataError(f"--valid-data {path}: not UTF-8 text ({exc}); "
                            "give the raw wiki.test.tokens file") from None
    if not text.strip():
        raise EvalDataError(f"--valid-data {path}: the file is empty")
    num_original_tokens = len(text.strip().split(" "))
    if detokenize is not None:
        text = detokenize(text)
    return WikitextCorpus(tokens=list(tokenize(text)), num_original_tokens=num_original_tokens)


def build_wikitext_dataset(path: str, tokenizer, seq_length: int,
                           stride: int) -> tuple[LMWindowDataset, WikitextCorpus]:
    """The windows over WikiText file `path` (padded with the tokenizer's end-of-document id)."""
    corpus = read_wikitext(path, tokenizer.tokenize)
    return LMWindowDataset(corpus.tokens, seq_length, tokenizer.eod, stride), corpus


# ------------------------------------------------------------------ LAMBADA


def lambada_tokens(text: str, tokenize: Callable[[str], list], strict: bool) -> tuple[list, list]:
    """(context ids, target ids) of one LAMBADA passage.

    Non-strict: the whole text is tokenized and its last token is the target. Strict: the target
    is the last whitespace-separated word, tokenized as " " + word (possibly several tokens), and
    the context is the text before it, stripped, tokenized on its own."""
    if strict:
        words = text.split()
        if not words:
            raise ValueError("empty passage")
        last_word = words[-1]
        start = text.rfind(last_word)
        context = list(tokenize(text[:start].strip()))
        target = list(tokenize(" " + last_word))
    else:
        ids = list(tokenize(text))
        if len(ids) < 2:
            raise ValueError(f"the passage has {len(ids)} token(s); it needs a context and a target")
        context, target = ids[:-1], ids[-1:]
    if not context or not target:
        raise ValueError("the passage has no context before its last word")
    return context, target


class LambadaDataset:
    """LAMBADA samples: context + target padded to L + 1 tokens; pad_mask marks the target tokens."""

    def __init__(self, samples: Sequence[tuple[list, list]], seq_length: int, pad_id: int, source: str = "LAMBADA"):
        self.samples = list(samples)
        self.seq_length = seq_length
        self.pad_id = int(pad_id)
        for index, (context, target) in enumerate(self.samples):
            if len(context) + len(target) > seq_length + 1:
                raise EvalDataError(
                    f"{source} passage {index + 1}: {len(context) + len(target)} tokens do not fit --seq-length "
                    f"{seq_length} (+1); raise --seq-length or drop the passage")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        context, target = self.samples[index]
        ids = context + target
        text = np.full(self.seq_length + 1, self.pad_id, dtype=np.int64)
        text[:len(ids)] = ids
        pad_mask = np.zeros(self.seq_length, dtype=np.float32)
        pad_mask[len(context) - 1:len(ids) - 1] = 1.0  # targets text[len(context)] .. text[len(ids) - 1]
        return {"text": text, "pad_mask": pad_mask}


def read_lambada(path: str) -> list[str]:
    """The "text" field of every line of a LAMBADA jsonl file (blank lines are skipped)."""
    texts = []
    try:
        handle = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise EvalDataError(f"--valid-data {path}: file not found") from None
    with handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvalDataError(f"{path} line {line_number}: not JSON ({exc.msg}); LAMBADA files hold one "
                                    '{"text": ...} object per line') from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise EvalDataError(f'{path} line {line_number}: expected an object with a "text" string')
            texts.append(record["text"])
    if not texts:
        raise EvalDataError(f"--valid-data {path}: no passages")
    return texts


def build_lambada_dataset(path: str, tokenizer, seq_length: int, strict: bool) -> LambadaDataset:
    """LAMBADA samples of jsonl file `path` (strict or last-token targets)."""
    samples = []
    for line_number, text in enumerate(read_lambada(path), 1):
        try:
            samples.append(lambada_tokens(text, tokenizer.tokenize, strict))
        except ValueError as exc:
            raise EvalDataError(f"{path} passage {line_number}: {exc}") from None
    return LambadaDataset(samples, seq_length, tokenizer.eod, source=path)
