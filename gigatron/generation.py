"""`generate()` of a model loaded with `gigatron.from_pretrained`: token ids in, token ids out,
through the inference engine (gigatron.core.inference: KV cache, batched prompts of any lengths).

    model = gigatron.from_pretrained("ckpt")
    ids = model.generate([464, 2068, 7586], max_new_tokens=20)              # greedy: the prompt + 20 ids
    ids = model.generate([[464, 2068], [40]], max_new_tokens=20, temperature=0.8, top_p=0.9, seed=1)
    tokenizer = model.tokenizer()                                           # the checkpoint's tokenizer
    print(tokenizer.detokenize(ids[0]))

Greedy unless a sampling option (temperature, top_k, top_p) is given. A row stops after the
end-of-document token (stop_at_eod). The engine is built once per model and batch size and kept.
"""

from __future__ import annotations

import weakref
from typing import List, Optional, Sequence, Union

import torch

__all__ = ["generate"]

# model -> {max_batch_size: InferenceEngine}; the engine keeps its KV cache between calls.
_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _IdTokenizer:
    """A checkpoint that names no tokenizer: token ids only, the last id of the true vocabulary as
    the end-of-document token (what NullTokenizer and GPT-2 do)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)
        self.eod = self.vocab_size - 1

    def tokenize(self, text: str) -> List[int]:
        raise ValueError("this model knows no tokenizer: pass token ids")

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


def _tokenizer_of(model):
    if model.tokenizer_args.get("tokenizer_type"):
        return model.tokenizer()
    return _IdTokenizer(model.vocab_size)


def _as_rows(prompt_ids) -> "tuple[List[List[int]], bool]":
    """prompt_ids (ids [s], rows [b, s] as a tensor, or lists) -> (rows of ids, one row given)."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() not in (1, 2) or prompt_ids.dtype.is_floating_point or prompt_ids.dtype == torch.bool:
            raise ValueError(f"prompt_ids must be integer token ids [seq] or [batch, seq], got "
                             f"{prompt_ids.dtype} of shape {tuple(prompt_ids.shape)}")
        single = prompt_ids.dim() == 1
        rows = [prompt_ids.tolist()] if single else prompt_ids.tolist()
        return rows, single
    if isinstance(prompt_ids, Sequence) and not isinstance(prompt_ids, (str, bytes)):
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt_ids):
            return [list(prompt_ids)], True
        if all(isinstance(row, Sequence) and not isinstance(row, (str, bytes))
               and all(isinstance(t, int) and not isinstance(t, bool) for t in row) for row in prompt_ids):
            return [list(row) for row in prompt_ids], False
    raise ValueError("prompt_ids must be token ids: a list of ints, a list of such lists, or an integer tensor "
                     "[seq] / [batch, seq] (tokenize text with model.tokenizer().tokenize)")


def generate(model, prompt_ids, max_new_tokens: int = 32, *, temperature: Optional[float] = None,
             top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
             stop_at_eod: bool = True, decode_mode: str = "eager") -> Union[List[int], List[List[int]]]:
    """Continue each prompt by up to max_new_tokens tokens.

    model: a PretrainedGPT (gigatron.from_pretrained). prompt_ids: token ids of one prompt (a list
    of ints or a 1-D tensor) or of several (a list of lists, of any lengths, or a 2-D tensor).
    Greedy unless temperature, top_k (1 = greedy) or top_p (not both top_k > 1 and top_p) is
    given; seed makes sampling reproducible. decode_mode: "eager", "cuda_graph" or "compiled"
    (see gigatron.core.inference.engine). Returns the prompt followed by the generated ids (up to
    and including the end-of-document token where a row stops), a list for one prompt and a list
    of lists for several."""
    from gigatron.core.inference.engine import InferenceEngine, SamplingParams

    rows, single = _as_rows(prompt_ids)
    if not rows or any(len(row) == 0 for row in rows):
        raise ValueError("every prompt needs at least one token id")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    bad = sorted({t for row in rows for t in row if not 0 <= t < model.vocab_size})
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {model.vocab_size})")
    sampling = temperature is not None or top_k is not None or top_p is not None
    params = SamplingParams(
        tokens_to_generate=max_new_tokens, temperature=1.0 if temperature is None else float(temperature),
        top_k=(0 if top_k is None else int(top_k)) if sampling else 1, top_p=0.0 if top_p is None else float(top_p),
        random_seed=-1 if seed is None else int(seed), stop_at_eod=stop_at_eod)
    engines = _ENGINES.setdefault(model, {})
    key = (len(rows), decode_mode)
    engine = engines.get(key)
    if engine is None:
        engine = engines[key] = InferenceEngine(model.model, _tokenizer_of(model), vocab_size=model.vocab_size,
                                                max_batch_size=len(rows), decode_mode=decode_mode)
    tokens = engine.generate_tokens(rows, params).tokens
    return tokens[0] if single else tokens
