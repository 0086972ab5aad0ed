"""``--tokenizer-type HuggingFaceTokenizer``: a ``tokenizer.json`` file or a local folder.

``tokenize`` applies the tokenizer's own post-processor (e.g. a BOS that a Llama-3 tokenizer adds),
as Megatron's ``AutoTokenizer(text).input_ids`` does. ``eod`` is the EOS token named by the
folder's ``tokenizer_config.json`` / ``special_tokens_map.json``; with a bare ``tokenizer.json``
it is the first of the usual end-of-text tokens that the vocabulary has. A name that is not a
local path is handed to ``transformers.AutoTokenizer`` (which works offline from its cache).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from .base import Tokenizer, hf_encode_batch

_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]")


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "</s>", ...}
        return value.get("content")
    return value if isinstance(value, str) else None


class HuggingFaceTokenizer(Tokenizer):
    name = "HuggingFaceTokenizer"

    def __init__(self, tokenizer_model: str):
        super().__init__()
        if tokenizer_model is None:
            raise ValueError("HuggingFaceTokenizer needs --tokenizer-model (a tokenizer.json file or a folder)")
        self._named: dict[str, str | None] = {"eos": None, "bos": None, "pad": None}
        self._hf = None
        self._auto = None
        if os.path.isfile(tokenizer_model):
            self._load_json(tokenizer_model)
        elif os.path.isdir(tokenizer_model):
            path = os.path.join(tokenizer_model, "tokenizer.json")
            for name in ("special_tokens_map.json", "tokenizer_config.json"):
                cfg_path = os.path.join(tokenizer_model, name)
                if os.path.isfile(cfg_path):
                    with open(cfg_path, encoding="utf-8") as f:
                        cfg = json.load(f)
                    for key in self._named:
                        self._named[key] = _token_text(cfg.get(f"{key}_token")) or self._named[key]
            if os.path.isfile(path):
                self._load_json(path)
            else:
                self._load_auto(tokenizer_model)
        else:
            self._load_auto(tokenizer_model)

    def _load_json(self, path: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._hf = HFTokenizer.from_file(path)
        except Exception as e:  # the library raises a plain Exception on parse errors
            raise ValueError(f"cannot load {path} as a HuggingFace tokenizer.json ({e})") from e
        self._vocab = self._hf.get_vocab(with_added_tokens=True)

    def _load_auto(self, name: str) -> None:
        try:
            import transformers
        except ImportError as e:
            raise ValueError(f"--tokenizer-model {name!r} is neither a tokenizer.json nor a folder with one; "
                             "loading other formats or hub names needs the 'transformers' package") from e
        try:
            self._auto = transformers.AutoTokenizer.from_pretrained(name, trust_remote_code=False)  # never run a folder's code
        except Exception as e:  # noqa: BLE001 - report whatever the hub loader says
            raise ValueError(f"cannot load HuggingFace tokenizer {name!r}: {e}. Pass a local folder or "
                             "tokenizer.json as --tokenizer-model") from e
        self._vocab = self._auto.get_vocab()
        for key in self._named:
            self._named[key] = getattr(self._auto, f"{key}_token", None)

    def _special_id(self, key: str, candidates: Sequence[str]) -> int:
        token = self._named[key]
        if token is not None and token in self._vocab:
            return self._vocab[token]
        if token is None:
            for c in candidates:
                if c in self._vocab:
                    return self._vocab[c]
        return -1

    @property
    def vocab_size(self) -> int:
        if self._hf is not None:
            return self._hf.get_vocab_size(with_added_tokens=True)
        return len(self._auto)

    @property
    def vocab(self) -> dict:
        return self._vocab

    def tokenize(self, text: str) -> list[int]:
        if self._hf is not None:
            return self._hf.encode(text).ids
        return self._auto(text).input_ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._hf is not None:
            return hf_encode_batch(self._hf, list(texts))
        return list(self._auto(list(texts)).input_ids)

    def detokenize(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=False)
        return self._auto.decode(ids)

    @property
    def eod(self) -> int:
        return self._special_id("eos", _EOS_CANDIDATES)

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def bos(self) -> int:
        return self._special_id("bos", _BOS_CANDIDATES)

    @property
    def pad(self) -> int:
        return self._special_id("pad", _PAD_CANDIDATES)
