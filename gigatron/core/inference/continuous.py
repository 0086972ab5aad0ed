"""Continuous batching: sequences join and leave one running batch at every decode step.

Shape legend: B = slots (--inference-max-requests), S = the cache's max sequence
(--inference-max-seq-length), m = slots up to the highest one in use, c = prefill chunk tokens,
V = true vocabulary.

The KV cache has B fixed slots of S positions each ([B, S, ng, d] per layer, as the static
engine's cache); a sequence owns one slot from its admission to its end, and slot row r, position
j holds the key/value of its token j. Nothing is ever copied or compacted: a sequence that ends
frees its slot, the lowest free slot goes to the next waiting sequence, and its prefill overwrites
the positions it uses. Fixed slots over paged blocks: every sequence may grow to S, so a slot
needs no block table, the decode step keeps the static engine's shapes ([m, 1] tokens, one mask),
and the memory is B * S positions, known at start; the price is that a short sequence leaves most
of its slot unused, which paged blocks would lend to others (the measurement that should decide is
left to the GPU benchmark, bench/bench_serving.py).

One call of step():
  1. admission: waiting sequences take free slots, oldest first (a request waits while all B
     slots are taken: the memory cap queues, it never fails);
  2. prefill: sequences still reading their prompt, oldest first, run their next chunk
     (positions p..p+c-1 of their own slot, a [1, c] forward over the slot's cache view) until
     the step has read `prefill_chunk` prompt tokens, so a long prompt is spread over several
     steps and never stalls the decoding sequences for long, while several short ones are read in
     one step; the chunk that ends a prompt samples its first token;
  3. decode: every sequence past its prefill feeds its latest token ([m, 1], each row at its own
     position; a slot that is free or still in prefill feeds a padding token at the first position
     it has not written, which its own next write overwrites before anything reads it); each row
     samples its next token with its own sampling parameters and generator (greedy rows share one
     argmax; the step reads the device once, for every row's token and log-probabilities);
  4. bookkeeping on the host: a sequence ends at the end-of-document token, at its token limit,
     when its on_token callback says so (a stop string) or when it is withdrawn (its client went
     away); its slot is free for the next step.

A Mamba / hybrid model also has one row of recurrent states per slot (state_cache.py): a
sequence's first prefill chunk (position 0) starts from zero states, so a reused slot is reset by
its new sequence, and the decode step tells the model which rows are decoding (lengths 1 / 0), so
the padding fed by free and prefilling slots never reaches their states.

Greedy results equal those of running each request alone (tested); a seeded sequence draws from
its own generator seeded with its seed (row i of a request: seed + i), so a one-row seeded request
draws what the static engine draws for it alone. Log-probabilities are the model's own (before
penalties and bias), as in the static engine.
"""

from __future__ import annotations

import collections
import dataclasses
import random
from typing import Callable, Deque, Dict, List, Optional

import torch
import torch.nn.functional as F

from gigatron.core.inference.engine import InferenceEngine, SamplingParams
from gigatron.core.inference.kv_cache import InferenceContext
from gigatron.core.inference.sampling import sample
from gigatron.core.inference.state_cache import inference_context_for, is_recurrent_model, mamba_state_bytes_per_row

__all__ = ["Sequence", "ContinuousBatcher", "continuous_capable", "slot_bytes", "slots_for_buffer"]


def slot_bytes(model, max_sequence_length: int) -> int:
    """KV-cache bytes of one slot: keys and values of every local attention layer for S positions
    (2 * layers * S * key/value groups on this rank * head dim * bytes per element), plus a Mamba
    model's recurrent states of one sequence (state_cache.py; constant in S)."""
    config = model.config
    element = next(model.parameters()).element_size()
    groups = config.num_query_groups // config.tensor_model_parallel_size
    if not is_recurrent_model(model):
        return 2 * len(model.decoder.layers) * max_sequence_length * groups * config.kv_channels * element
    attention = sum(hasattr(layer, "self_attention") for layer in model.decoder.layers)
    return (2 * attention * max_sequence_length * groups * config.kv_channels * element
            + mamba_state_bytes_per_row(model))


def slots_for_buffer(model, max_sequence_length: int, buffer_gb: float) -> int:
    """How many slots a KV-cache buffer of buffer_gb GiB holds (--inference-dynamic-batching-buffer-size-gb);
    ValueError if not even one."""
    per_slot = slot_bytes(model, max_sequence_length)
    slots = int(buffer_gb * 2 ** 30) // per_slot
    if slots < 1:
        raise ValueError(f"--inference-dynamic-batching-buffer-size-gb {buffer_gb} holds no sequence: one slot of "
                         f"{max_sequence_length} positions takes {per_slot / 2 ** 30:.3g} GiB; give a larger buffer "
                         "or a smaller --inference-max-seq-length")
    return slots


def continuous_capable(params: SamplingParams) -> bool:
    """Whether a request's rows can run in the continuous batch (the newline rules and top_p decay
    of Megatron's /api run in the static engine instead)."""
    return not (params.stop_on_eol or params.stop_on_double_eol or params.prevent_newline_after_colon
                or params.top_p_decay > 0.0)


@dataclasses.dataclass(eq=False)  # compared by identity
class Sequence:
    """One row of a request. on_token(token, logprob, top, prompt_scores) is called on the host for
    each sampled token (prompt_scores: (prompt log-probabilities, prompt top dicts or None) with the
    first token, else None) and returns True to end the row; withdrawn() says the client left."""
    prompt: List[int]
    params: SamplingParams
    seed: int = -1
    on_token: Optional[Callable] = None
    withdrawn: Optional[Callable[[], bool]] = None
    on_done: Optional[Callable[["Sequence"], None]] = None
    # Filled in as it runs.
    generated: List[int] = dataclasses.field(default_factory=list)
    logprobs: List[float] = dataclasses.field(default_factory=list)
    top_logprobs: List[Dict[int, float]] = dataclasses.field(default_factory=list)
    prompt_logprobs: List[float] = dataclasses.field(default_factory=list)
    prompt_top_logprobs: List[Dict[int, float]] = dataclasses.field(default_factory=list)
    slot: Optional[int] = None
    prefilled: int = 0  # prompt tokens whose keys/values are in the slot
    admitted: int = -1  # admission order (the oldest prompt is read first)
    done: bool = False
    generator: Optional[torch.Generator] = None
    counts: Optional[torch.Tensor] = None  # [V] each token's count in the generation (penalties)


class ContinuousBatcher:
    """ContinuousBatcher(engine, max_requests, prefill_chunk=256): add(seq) queues a sequence;
    step() runs one step (see the module docstring) and returns the sequences that ended in it;
    busy() says whether anything is waiting or running."""

    def __init__(self, engine: InferenceEngine, max_requests: int, prefill_chunk: int = 256):
        if max_requests < 1:
            raise ValueError(f"--inference-max-requests must be >= 1, got {max_requests}")
        if prefill_chunk < 1:
            raise ValueError(f"--inference-prefill-chunk-size must be >= 1, got {prefill_chunk}")
        if engine.groups.tp.size != 1:
            raise ValueError("continuous batching runs on one process; use --tensor-model-parallel-size 1 "
                             "or leave --inference-dynamic-batching off")
        self.engine = engine
        self.max_requests = int(max_requests)
        self.prefill_chunk = int(prefill_chunk)
        self.S = engine.max_sequence_length
        self.ctx = inference_context_for(engine.model, self.max_requests, self.S)
        self.waiting: Deque[Sequence] = collections.deque()
        self.slots: List[Optional[Sequence]] = [None] * self.max_requests
        self.steps = 0
        self.largest_batch = 0
        self.admissions = 0

    # ------------------------------------------------------------------ queue
    def add(self, seq: Sequence) -> None:
        need = len(seq.prompt) + seq.params.tokens_to_generate
        if not seq.prompt:
            raise ValueError("every prompt needs at least one token")
        if need > self.S:
            raise ValueError(f"a prompt of {len(seq.prompt)} tokens plus {seq.params.tokens_to_generate} to generate "
                             f"needs {need} positions but a slot holds {self.S} (--inference-max-seq-length)")
        if seq.params.tokens_to_generate < 1:
            raise ValueError("continuous batching generates at least one token (score prompts with the static engine)")
        self.engine._check_logit_shaping(seq.params)
        seq.generator = torch.Generator(device=self.engine.device).manual_seed(
            seq.seed if seq.seed >= 0 else random.randrange(2 ** 62))
        if seq.params.presence_penalty or seq.params.frequency_penalty:
            seq.counts = torch.zeros(self.engine.vocab_size, device=self.engine.device)
        self.waiting.append(seq)

    def busy(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    def running(self) -> int:
        return sum(s is not None for s in self.slots)

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self) -> List[Sequence]:
        self.engine.model.eval()
        ended: List[Sequence] = []
        for seq in [s for s in self.slots if s is not None] + list(self.waiting):  # clients that went away
            if seq.withdrawn is not None and seq.withdrawn():
                self._end(seq, ended)
        self.waiting = collections.deque(s for s in self.waiting if not s.done)
        while self.waiting and None in self.slots:  # 1. admission: the lowest free slot
            seq = self.waiting.popleft()
            seq.slot = self.slots.index(None)
            seq.admitted = self.admissions
            self.admissions += 1
            self.slots[seq.slot] = seq
        decoding = [s for s in self.slots if s is not None and s.prefilled == len(s.prompt) and s.generated]
        prefilling = [s for s in self.slots if s is not None and s.prefilled < len(s.prompt)]
        budget = self.prefill_chunk  # 2. prompt tokens read this step, oldest prompt first
        for seq in sorted(prefilling, key=lambda s: s.admitted):
            if budget <= 0:
                break
            budget -= self._prefill_chunk(seq, ended, budget)
        if decoding:  # 3. one token for every decoding sequence
            self._decode(decoding, ended)
        self.steps += 1
        return ended

    def _end(self, seq: Sequence, ended: List[Sequence]) -> None:
        seq.done = True
        if seq.slot is not None and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None
        ended.append(seq)
        if seq.on_done is not None:
            seq.on_done(seq)

    def _slot_view(self, slot: int) -> InferenceContext:
        """The cache of one slot as a one-row context (views of the cache tensors: writes land in
        the slot)."""
        if getattr(self.ctx, "mamba_states", None) is not None:
            return self.ctx.rows(slot, slot + 1)
        view = object.__new__(InferenceContext)
        view.max_batch_size = 1
        view.max_sequence_length = self.S
        view.key_cache = {k: t[slot: slot + 1] for k, t in self.ctx.key_cache.items()}
        view.value_cache = {k: t[slot: slot + 1] for k, t in self.ctx.value_cache.items()}
        view.positions, view._rows, view.kv_len = None, None, self.S
        return view

    def _prefill_chunk(self, seq: Sequence, ended: List[Sequence], budget: int) -> int:
        """Read the next at most `budget` prompt tokens of seq; returns how many."""
        engine = self.engine
        lo = seq.prefilled
        hi = min(len(seq.prompt), lo + budget)
        device = engine.device
        tokens = torch.tensor([seq.prompt[lo:hi]], dtype=torch.long, device=device)  # [1, c]
        positions = torch.arange(lo, hi, device=device)[None]  # [1, c]
        logits = engine._forward(self._slot_view(seq.slot), tokens, positions, hi)[0]  # [c, V]
        seq.prefilled = hi
        lp = F.log_softmax(logits, dim=-1)  # [c, V]
        following = seq.prompt[lo + 1: hi + 1]  # the prompt tokens these positions predict
        if following:
            k = len(following)
            seq.prompt_logprobs += lp[:k].gather(-1, torch.tensor(following, device=device)[:, None])[:, 0].tolist()
            n = min(seq.params.top_logprobs, engine.vocab_size)
            if seq.params.prompt_top_logprobs and n > 0:
                values, ids = lp[:k].topk(n, dim=-1)
                seq.prompt_top_logprobs += [dict(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        if hi == len(seq.prompt):  # the prompt is read: its last logits give the first token
            self._take([seq], logits[-1:], lp[-1:], ended, first=True)
        return hi - lo

    def _decode(self, decoding: List[Sequence], ended: List[Sequence]) -> None:
        engine = self.engine
        device = engine.device
        m = max(s.slot for s in decoding) + 1
        self.largest_batch = max(self.largest_batch, len(decoding))
        tokens = [engine.eod] * m
        positions = [0] * m
        now = {id(s) for s in decoding}
        for slot in range(m):
            seq = self.slots[slot]
            if seq is None:
                continue
            if id(seq) in now:
                tokens[slot] = seq.generated[-1]
                positions[slot] = len(seq.prompt) + len(seq.generated) - 1
            else:  # in prefill: padding at the first position it has not written (overwritten later)
                positions[slot] = seq.prefilled
        kv_len = max(positions) + 1
        lengths = None
        if getattr(self.ctx, "mamba_states", None) is not None:
            # The padding fed by free and prefilling slots must not reach their recurrent states.
            view = self.ctx.rows(0, m)
            lengths = torch.tensor([int(id(self.slots[r]) in now) for r in range(m)], device=device)
        else:
            view = object.__new__(InferenceContext)
            view.max_batch_size = m
            view.max_sequence_length = self.S
            view.key_cache = {k: t[:m] for k, t in self.ctx.key_cache.items()}
            view.value_cache = {k: t[:m] for k, t in self.ctx.value_cache.items()}
            view.positions, view._rows, view.kv_len = None, None, self.S
        logits = engine._forward(view, torch.tensor(tokens, device=device)[:, None],
                                 torch.tensor(positions, device=device)[:, None], kv_len,
                                 lengths=lengths)[:, -1]  # [m, V]
        rows = torch.tensor([seq.slot for seq in decoding], device=device)
        logits = logits[rows]  # [k, V], in the order of `decoding`
        self._take(decoding, logits, F.log_softmax(logits, dim=-1), ended)

    def _take(self, seqs: List[Sequence], logits: torch.Tensor, lp: torch.Tensor, ended: List[Sequence],
              first: bool = False) -> None:
        """Sample the next token of each of seqs from its row of logits [k, V] (log-probabilities
        lp [k, V]) and apply the stop rules. The device work is queued for every row first (greedy
        rows share one argmax, the others sample one by one from their own generators) and read
        back once: tokens, their log-probabilities and the top log-probabilities."""
        engine = self.engine
        device = logits.device
        k = len(seqs)
        plain = [i for i, s in enumerate(seqs) if s.params.top_k == 1 and not s.params.shapes_logits()]
        new = torch.empty(k, dtype=torch.long, device=device)  # [k]
        if plain:
            index = torch.tensor(plain, device=device)
            new[index] = logits[index].argmax(dim=-1)
        greedy = set(plain)
        for i, seq in enumerate(seqs):
            if i in greedy:
                continue
            params = seq.params
            shaped = logits[i: i + 1]
            if params.shapes_logits():
                if seq.counts is not None:
                    shaped = (shaped - params.frequency_penalty * seq.counts
                              - params.presence_penalty * (seq.counts > 0).float())
                else:
                    shaped = shaped.clone()
                for token, bias in params.logit_bias:
                    shaped[0, token] += bias
            new[i] = sample(shaped, top_k=params.top_k, top_p=params.top_p, temperature=params.temperature,
                            generator=seq.generator)[0]
        for i, seq in enumerate(seqs):
            if seq.counts is not None:
                seq.counts.index_add_(0, new[i: i + 1], torch.ones(1, device=device))
        chosen = lp.gather(-1, new[:, None])[:, 0]  # [k]
        n = min(max(s.params.top_logprobs for s in seqs), engine.vocab_size)
        top_values = top_ids = None
        if n > 0:
            top_values, top_ids = lp.topk(n, dim=-1)  # [k, n]
            top_values, top_ids = top_values.tolist(), top_ids.tolist()
        tokens, logprobs = new.tolist(), chosen.tolist()  # the one read of the step
        for i, seq in enumerate(seqs):
            params = seq.params
            token = tokens[i]
            top = None
            if params.top_logprobs > 0:
                m = min(params.top_logprobs, engine.vocab_size)
                top = dict(zip(top_ids[i][:m], top_values[i][:m]))
                seq.top_logprobs.append(top)
            seq.generated.append(token)
            seq.logprobs.append(logprobs[i])
            stop = False
            if seq.on_token is not None:
                prompt_scores = ((seq.prompt_logprobs, seq.prompt_top_logprobs if params.prompt_top_logprobs else None)
                                 if first else None)
                stop = bool(seq.on_token(token, logprobs[i], top, prompt_scores))
            if (stop or (params.stop_at_eod and token == engine.eod)
                    or len(seq.generated) >= params.tokens_to_generate
                    or (seq.withdrawn is not None and seq.withdrawn())):
                self._end(seq, ended)
