"""What the OpenAI routes send back: a tracker of each row's generation and the logprobs blocks.

CompletionTracker follows the rows of one request as the engine generates them (its on_step):
it ends a row at end-of-document or at a stop string, counts the tokens each row generated
(usage), keeps each generated token's log-probability and top log-probabilities when the request
asked for them, and yields the text that is safe to stream (never a partial character, never the
start of a possible stop string) together with the tokens that text covers. The same object
finalizes streamed and non-streamed answers, so both give the same text and log-probabilities.

Which tokens a text covers: token k's text is detokenize([id_k]); a finished row keeps the
shortest run of tokens whose texts reach the row's text (a stop string cuts the rest), a running
row's chunk covers the tokens whose texts lie wholly inside the text sent so far.
"""

from __future__ import annotations

import threading
from typing import Dict, List, Optional

__all__ = ["CompletionTracker", "completion_logprobs", "chat_logprobs", "json_logprob", "LOWEST_LOGPROB"]

LOWEST_LOGPROB = -9999.0
"""What a log-probability of -inf (a token the sampling rules made impossible) is sent as: JSON
has no infinity, and OpenAI's API sends this value for such tokens."""


def json_logprob(value: Optional[float]) -> Optional[float]:
    """A log-probability as JSON can carry it: -inf (or NaN) becomes LOWEST_LOGPROB; None stays."""
    if value is None:
        return None
    value = float(value)
    return value if value == value and value > LOWEST_LOGPROB else LOWEST_LOGPROB


class CompletionTracker:
    """CompletionTracker(tokenizer, num_rows, stop, events=None): `events` (put(item)) receives
    ("prompt", row) once a row's prompt log-probabilities are known and (row, text, finish_reason,
    first token, end token) for each piece of text a stream may send."""

    def __init__(self, tokenizer, num_rows: int, stop: List[str], events=None):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: List[List[int]] = [[] for _ in range(num_rows)]  # generated tokens (no end-of-document)
        self.segments: List[List[str]] = [[] for _ in range(num_rows)]  # their texts, one by one
        self.logprobs: List[List[Optional[float]]] = [[] for _ in range(num_rows)]
        self.top_logprobs: List[List[Optional[Dict[int, float]]]] = [[] for _ in range(num_rows)]
        self.prompt: List[Optional[tuple]] = [None] * num_rows  # (log-probabilities, top dicts or None)
        self.end_token: List[Optional[tuple]] = [None] * num_rows  # (text, logprob, top) of an end-of-document
        self.generated = [0] * num_rows  # tokens sampled for the row, end-of-document included
        self.finish: List[Optional[str]] = [None] * num_rows  # "stop" or None (running / "length" at the end)
        self.emitted = [0] * num_rows  # characters sent
        self.emitted_tokens = [0] * num_rows  # tokens whose log-probabilities were sent
        self.events = events
        self.lock = threading.Lock()

    def text(self, row: int) -> str:
        """Generated text of a row, cut before its first stop string."""
        text = self.tokenizer.detokenize(self.ids[row]) if self.ids[row] else ""
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        return text if cut < 0 else text[:cut]

    def covered(self, row: int, length: int, final: bool) -> int:
        """How many leading tokens of the row `length` characters of its text cover (see the module
        docstring); never more than a finished row keeps."""
        cum = [0]  # cum[k]: characters of the first k tokens' texts
        for seg in self.segments[row]:
            cum.append(cum[-1] + len(seg))
        reach = next((k for k, c in enumerate(cum) if c >= length), len(cum) - 1)
        if final:
            return reach
        within = max(k for k, c in enumerate(cum) if c <= length or k == 0)
        return min(within, reach)

    def _safe(self, row: int) -> str:
        text = self.text(row)
        if self.finish[row] is None:
            text = text.rstrip("\ufffd")
            for s in self.stop:  # hold back a suffix that may grow into a stop string
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        text = text[:-k]
                        break
        return text

    def on_step(self, step, tokens, active, offset=0, logprobs=None, top_logprobs=None, prompt_logprobs=None,
                prompt_top_logprobs=None):
        stop_rows = [False] * len(tokens)
        with self.lock:
            if prompt_logprobs is not None:
                for i, lps in enumerate(prompt_logprobs):
                    self.prompt[offset + i] = (lps, None if prompt_top_logprobs is None else prompt_top_logprobs[i])
                    if self.events is not None:
                        self.events.put(("prompt", offset + i))
            for i, (token, on) in enumerate(zip(tokens, active)):
                row = offset + i
                if not on or self.finish[row] is not None:
                    continue
                self.generated[row] += 1
                if token == self.tokenizer.eod:  # ends the row; counted and scored, not part of the text
                    self.finish[row] = "stop"
                    stop_rows[i] = True
                    self.end_token[row] = (self.tokenizer.detokenize([token]),
                                           None if logprobs is None else logprobs[i],
                                           None if top_logprobs is None else top_logprobs[i])
                else:
                    self.ids[row].append(token)
                    self.segments[row].append(self.tokenizer.detokenize([token]))
                    self.logprobs[row].append(None if logprobs is None else logprobs[i])
                    self.top_logprobs[row].append(None if top_logprobs is None else top_logprobs[i])
                    text = self.tokenizer.detokenize(self.ids[row])
                    if any(s in text for s in self.stop):
                        self.finish[row] = "stop"
                        stop_rows[i] = True
                if self.events is not None:
                    self._emit(row)
        return stop_rows

    def _emit(self, row: int, finish_reason=None):
        safe = self._safe(row)
        delta = safe[self.emitted[row]:]
        upto = self.covered(row, len(safe), final=finish_reason is not None)
        if delta or finish_reason or upto > self.emitted_tokens[row]:
            first = self.emitted_tokens[row]
            self.emitted[row] = len(safe)
            self.emitted_tokens[row] = max(upto, first)
            self.events.put((row, delta, finish_reason, first, self.emitted_tokens[row]))

    def set_prompt(self, row: int, logprobs, top_logprobs) -> bool:
        """Record a row's prompt log-probabilities from the final result where no step brought them
        (scoring: max_tokens=0); True if they were new."""
        with self.lock:
            if self.prompt[row] is not None:
                return False
            self.prompt[row] = (logprobs, top_logprobs)
            return True

    def finalize(self, row: int, finish_reason: str):
        with self.lock:
            if self.finish[row] is None:
                self.finish[row] = finish_reason
            if self.events is not None:
                self._emit(row, self.finish[row])

    def kept(self, row: int) -> int:
        """Generated tokens that make up the row's final text."""
        return self.covered(row, len(self.text(row)), final=True)

    def mean_logprob(self, row: int) -> float:
        """Mean log-probability per kept token (best_of ranks rows by it); 0 for an empty row."""
        lps = [lp for lp in self.logprobs[row][: self.kept(row)] if lp is not None]
        return sum(lps) / len(lps) if lps else 0.0


def _top_dict(tokenizer, top: Optional[Dict[int, float]], n: int) -> Optional[Dict[str, float]]:
    if top is None:
        return None
    best = sorted(top.items(), key=lambda x: -x[1])[:n]
    out: Dict[str, float] = {}
    for token, lp in best:  # two ids with the same text keep the likelier one
        out.setdefault(tokenizer.detokenize([token]), json_logprob(lp))
    return out


def completion_logprobs(tokenizer, segments: List[str], logprobs: List[Optional[float]],
                        tops: List[Optional[Dict[int, float]]], n: int, start: int) -> dict:
    """A /v1/completions logprobs block for tokens with these texts, their log-probabilities, their
    top dicts (token id -> log-probability) and n top entries asked for; text_offset counts from
    `start` (the characters of the choice's text before the first of these tokens)."""
    offsets = []
    for seg in segments:
        offsets.append(start)
        start += len(seg)
    return {"tokens": list(segments), "token_logprobs": [json_logprob(lp) for lp in logprobs],
            "top_logprobs": [_top_dict(tokenizer, t, n) for t in tops] if n else None,
            "text_offset": offsets}


def chat_logprobs(tokenizer, segments: List[str], logprobs: List[Optional[float]],
                  tops: List[Optional[Dict[int, float]]], n: int) -> dict:
    """A /v1/chat/completions logprobs block: {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}."""
    content = []
    for seg, lp, top in zip(segments, logprobs, tops):
        entries = []
        if n and top is not None:
            for token, value in sorted(top.items(), key=lambda x: -x[1])[:n]:
                text = tokenizer.detokenize([token])
                entries.append({"token": text, "logprob": json_logprob(value), "bytes": list(text.encode("utf-8"))})
        content.append({"token": seg, "logprob": json_logprob(lp), "bytes": list(seg.encode("utf-8")),
                        "top_logprobs": entries})
    return {"content": content}
