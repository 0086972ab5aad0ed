"""Sampling from next-token logits: greedy, temperature, top-k, top-p (nucleus).

Shape legend: b = rows, V = true vocabulary.

Megatron's rules: top_k == 1 is greedy (argmax); otherwise the logits are divided by the
temperature, everything below the k-th largest logit is masked (top_k > 1), then the smallest set
of tokens whose probability reaches top_p is kept (the token that crosses top_p stays; top_p > 0),
and a token is drawn from the softmax of what is left. Masked entries get -inf, so they are never
drawn.

Nothing here reads a tensor on the host, so a decode step can queue its sampling behind the model
without waiting for the device. The draw (`draw_from`) is an exponential race (argmax of probs / q
with q ~ Exp(1)): on the CPU the very draw torch.multinomial(probs, 1) makes from the same
generator state (tested), without torch's validity check of probs, which synchronises.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["top_k_mask", "top_p_mask", "sample", "draw_from", "check_sampling_params", "greedy_tokens"]


def check_sampling_params(top_k: int, top_p: float, temperature: float, vocab_size: int) -> None:
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off, 1 = greedy), got {top_k}")
    if top_k > vocab_size:
        raise ValueError(f"top_k ({top_k}) is larger than the vocabulary ({vocab_size})")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1] (0 = off), got {top_p}")
    if top_k > 1 and top_p > 0.0:
        raise ValueError("top_k and top_p cannot be combined; set one of them to 0")
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0 (use top_k=1 for greedy decoding), got {temperature}")


def top_k_mask(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """logits [b, V] -> bool [b, V], True where the logit is below the row's k-th largest."""
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [b, 1]
    return logits < kth


def top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """logits [b, V] -> bool [b, V], True for tokens outside the nucleus: sorted by probability,
    a token is dropped when the probability of the tokens before it already exceeds top_p (so
    the most likely token is always kept)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [b, V]
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = before > top_p  # [b, V] in sorted order
    drop_sorted[..., 0] = False
    return torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order


def sample(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits [b, V] (true vocabulary only) -> token ids [b] (long). The input is not modified."""
    if top_k == 1:
        return torch.argmax(logits, dim=-1)
    logits = logits.float() / temperature  # [b, V]
    if top_k > 1:
        logits = logits.masked_fill(top_k_mask(logits, top_k), float("-inf"))
    elif top_p > 0.0:
        logits = logits.masked_fill(top_p_mask(logits, top_p), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return draw_from(probs, generator)


def greedy_tokens(logits: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """logits [b, V] -> argmax [b] (long), the first index of the largest logit as torch.argmax,
    in two stages: the maximum of every chunk of `chunk` logits, then the best chunk. Compiled,
    that is two short kernels that spread over the GPU, where one [1, 50257] argmax runs as a
    single block (13 us on an H200, 1% of a batch-1 decode step of a 1.3B GPT)."""
    b, v = logits.shape
    pad = (-v) % chunk
    if pad:
        logits = F.pad(logits, (0, pad), value=float("-inf"))
    values, within = logits.view(b, -1, chunk).max(dim=-1)  # [b, V/chunk] each
    best = values.argmax(dim=-1, keepdim=True)  # [b, 1]: the first chunk holding the maximum
    return (best * chunk + within.gather(-1, best)).squeeze(-1)


def draw_from(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """probs [b, V] (rows summing to 1, zeros allowed) -> one index per row [b] (long), drawn with
    probability probs[r, i]: the index of the largest probs / q for independent q ~ Exp(1).
    On the CPU the same draw and generator advance as torch.multinomial(probs, 1, generator=...)."""
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)  # [b, V]
    race = torch.div(probs, race, out=race)
    return torch.argmax(race, dim=-1)  # [b]
