"""Tokenizers selected by Megatron's ``--tokenizer-type`` names.

    tokenizer = build_tokenizer(config)        # any object with the tokenizer flags as attributes
    ids = tokenizer.tokenize("Hello world")
    padded = vocab_size_with_padding(tokenizer.vocab_size, 128, tp_size)

Every tokenizer has ``vocab_size``, ``tokenize``, ``detokenize``, ``tokenize_batch``, ``eod``,
``pad`` and ``cls``/``sep``/``mask``/``bos``/``eos``/``additional_special_tokens_ids`` (``-1`` or
None where a tokenizer has no such token). See ``base.Tokenizer``.
"""

from __future__ import annotations

import math

from .base import Tokenizer, flatten_ids
from .bert import BertWordPieceTokenizer
from .gpt2 import GPT2BPETokenizer
from .huggingface import HuggingFaceTokenizer
from .null import NullTokenizer
from .sentencepiece import GPTSentencePieceTokenizer, Llama2Tokenizer, SentencePieceTokenizer
from .tiktoken_file import TikTokenizer

TOKENIZER_TYPES = (
    "BertWordPieceLowerCase", "BertWordPieceCase", "GPT2BPETokenizer", "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer", "Llama2Tokenizer", "HuggingFaceTokenizer", "TikTokenizer",
    "NullTokenizer",
)

# Attributes read by build_tokenizer and their defaults when the object lacks them.
_DEFAULTS = {
    "tokenizer_type": None, "vocab_file": None, "merge_file": None, "tokenizer_model": None,
    "vocab_size": None, "vocab_extra_ids": 0, "tiktoken_pattern": None,
    "tiktoken_num_special_tokens": 1000, "tiktoken_special_tokens": None,
}


def _require(value, flag: str, tokenizer_type: str):
    if value is None:
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs {flag}")
    return value


def build_tokenizer(args) -> Tokenizer:
    """Build the tokenizer named by ``args.tokenizer_type`` from the tokenizer flags in ``args``."""
    a = {k: (getattr(args, k, None) if getattr(args, k, None) is not None else d) for k, d in _DEFAULTS.items()}
    kind = a["tokenizer_type"]
    if kind in ("BertWordPieceLowerCase", "BertWordPieceCase"):
        return BertWordPieceTokenizer(_require(a["vocab_file"], "--vocab-file (vocab.txt)", kind),
                                      lower_case=kind == "BertWordPieceLowerCase",
                                      vocab_extra_ids=int(a["vocab_extra_ids"]))
    if kind == "GPT2BPETokenizer":
        return GPT2BPETokenizer(_require(a["vocab_file"], "--vocab-file (vocab.json)", kind),
                                _require(a["merge_file"], "--merge-file (merges.txt)", kind))
    if kind == "SentencePieceTokenizer":
        return SentencePieceTokenizer(_require(a["tokenizer_model"], "--tokenizer-model (.model)", kind),
                                      vocab_extra_ids=int(a["vocab_extra_ids"]))
    if kind == "GPTSentencePieceTokenizer":
        return GPTSentencePieceTokenizer(_require(a["tokenizer_model"], "--tokenizer-model (.model)", kind))
    if kind == "Llama2Tokenizer":
        return Llama2Tokenizer(_require(a["tokenizer_model"], "--tokenizer-model (.model)", kind))
    if kind == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(_require(a["tokenizer_model"], "--tokenizer-model", kind))
    if kind == "TikTokenizer":
        return TikTokenizer(_require(a["tokenizer_model"], "--tokenizer-model", kind),
                            pattern=_require(a["tiktoken_pattern"], "--tiktoken-pattern (v1 or v2)", kind),
                            vocab_size=a["vocab_size"],
                            num_special_tokens=int(a["tiktoken_num_special_tokens"]),
                            special_tokens=a["tiktoken_special_tokens"])
    if kind == "NullTokenizer":
        return NullTokenizer(_require(a["vocab_size"], "--vocab-size", kind))
    raise ValueError(f"unknown --tokenizer-type {kind!r}; choose one of {', '.join(TOKENIZER_TYPES)}")


def vocab_size_with_padding(orig_vocab_size: int, make_vocab_size_divisible_by: int = 128, tp_size: int = 1) -> int:
    """Megatron's padded vocabulary: the next multiple of ``make_vocab_size_divisible_by * tp_size``."""
    multiple = int(make_vocab_size_divisible_by) * int(tp_size)
    if multiple <= 0:
        raise ValueError(f"--make-vocab-size-divisible-by ({make_vocab_size_divisible_by}) times tensor-parallel "
                         f"size ({tp_size}) must be positive")
    return int(math.ceil(orig_vocab_size / multiple) * multiple)


__all__ = [
    "Tokenizer", "flatten_ids", "build_tokenizer", "vocab_size_with_padding", "TOKENIZER_TYPES",
    "BertWordPieceTokenizer", "GPT2BPETokenizer", "HuggingFaceTokenizer", "NullTokenizer",
    "SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer", "TikTokenizer",
]
