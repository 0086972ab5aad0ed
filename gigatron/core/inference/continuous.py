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

The static step (SlotDecodeStep, on CUDA captured in CUDA graphs; chosen when the engine's
decode_mode is not "eager") pads the decoding rows to a batch-size bucket and feeds each slot's
latest token from a device buffer that the sampling writes, so the host needs no token value to
launch a step. It therefore takes a step's tokens (4.) in the next step, after launching that one:
the host's bookkeeping and callbacks run while the device computes. A sequence that ends by a
token value (end-of-document, a stop string) decodes once more, and that token is dropped; one that
reaches its token limit does not (the host counts the tokens it has asked for, `issued`).
Mamba / hybrid models decode through the eager step (the static step is the GPT decode step).

Greedy results equal those of running each request alone (tested); a seeded sequence draws from
its own generator seeded with its seed (row i of a request: seed + i), so a one-row seeded request
draws what the static engine draws for it alone. Log-probabilities are the model's own (before
penalties and bias), as in the static engine.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import random
from typing import Callable, Deque, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from gigatron.core.inference.decode_step import DecodeStep
from gigatron.core.inference.engine import InferenceEngine, SamplingParams
from gigatron.core.inference.kv_cache import InferenceContext, cache_head_dims
from gigatron.core.inference.sampling import greedy_tokens, sample
from gigatron.core.inference.state_cache import inference_context_for, is_recurrent_model, mamba_state_bytes_per_row

__all__ = ["Sequence", "ContinuousBatcher", "SlotDecodeStep", "continuous_capable", "slot_bytes",
           "slots_for_buffer", "step_buckets"]


def slot_bytes(model, max_sequence_length: int) -> int:
    """KV-cache bytes of one slot: what every local attention layer caches for S positions
    (layers * S * groups on this rank * (key head dim + value head dim) * bytes per element; for
    multi-latent attention one latent of kv_lora_rank + qk_pos_emb_head_dim per position, see
    kv_cache.cache_head_dims), plus a Mamba model's recurrent states of one sequence
    (state_cache.py; constant in S)."""
    element = next(model.parameters()).element_size()
    groups, key_dim, value_dim = cache_head_dims(model.config)
    per_position = groups * (key_dim + value_dim) * element
    if not is_recurrent_model(model):
        return len(model.decoder.layers) * max_sequence_length * per_position
    attention = sum(hasattr(layer, "self_attention") for layer in model.decoder.layers)
    return attention * max_sequence_length * per_position + mamba_state_bytes_per_row(model)


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
    issued: int = 0  # tokens chosen on the device (the static step reads them one step later)
    admitted: int = -1  # admission order (the oldest prompt is read first)
    done: bool = False
    generator: Optional[torch.Generator] = None
    counts: Optional[torch.Tensor] = None  # [V] each token's count in the generation (penalties)
    # Prompt scores on the device, one entry per prefill chunk (log-probabilities [k], top ids and
    # values [k, n] or None), read with the first token (the step's one read of the device).
    pending_prompt: List[tuple] = dataclasses.field(default_factory=list)


def step_buckets(max_requests: int, count: Optional[int] = None) -> List[int]:
    """The batch sizes of the continuous step's static shapes (one CUDA graph each): 1, 2, 4, 8, ...
    below max_requests, then max_requests; with count (--inference-dynamic-batching-num-cuda-graphs)
    `count` sizes evenly spaced up to max_requests instead (fewer where max_requests is smaller).
    A step of m running rows runs the smallest size >= m."""
    if max_requests < 1:
        raise ValueError(f"--inference-max-requests must be >= 1, got {max_requests}")
    if count is not None:
        if count < 1:
            raise ValueError(f"--inference-dynamic-batching-num-cuda-graphs must be >= 1, got {count}")
        return sorted({-(-max_requests * i // count) for i in range(1, count + 1)})
    sizes, size = [], 1
    while size < max_requests:
        sizes.append(size)
        size *= 2
    return sizes + [max_requests]


class SlotDecodeStep:
    """The continuous batch's decode step with static shapes: rows 0..b-1 of the slot cache, b one
    of step_buckets(), each row at its own position.

    SlotDecodeStep(engine, ctx, buckets, capture)
      tokens [B] (device): each slot's latest token, which the caller writes on the device;
      run(positions) (a host list of b = a bucket's entries) -> (logits [b, V] fp32,
        log-probabilities [b, V], packed [b, 2] float64: each row's greedy token and its
        log-probability) of rows 0..b-1 feeding tokens[:b], valid until the next run.

    The step is the engine's decode step (decode_step.DecodeStep, on CPU its plain-PyTorch
    references) with the decode-attention kernel at every batch size (each row reads its own slots
    0..position only; the attention length is the whole cache, which sizes only the kernel's work
    split), then log_softmax and the greedy token. Tokens and positions live in static device
    buffers: the tokens never leave the device (the sampling of one step writes the next step's),
    and run() writes the positions into pinned host memory and copies them in with one
    asynchronous copy, so the host never waits for the device here. With `capture` (CUDA) each
    bucket's step is captured in a CUDA graph at its first use (compiled by torch.compile first
    under decode_mode "compiled"), which reads its slice of that buffer: a step is the copy and one
    replay. Without it the same function runs op by op (compiled under "compiled")."""

    def __init__(self, engine: InferenceEngine, ctx: InferenceContext, buckets: List[int], capture: bool):
        self.engine = engine
        self.ctx = ctx
        self.buckets = list(buckets)
        self.capture = bool(capture)
        device = engine.device
        on_cuda = device.type == "cuda"
        if self.capture and not on_cuda:
            raise ValueError("the continuous step is captured in CUDA graphs only on a CUDA device")
        kernels = dataclasses.replace(engine.decode_kernels, attention_every_batch=True)
        self.model = DecodeStep(engine.model, kernels) if kernels.gemv else engine.model
        largest = self.buckets[-1]
        # A step of b rows feeds tokens[:b] (each slot's latest token, which the batcher's sampling
        # writes on the device) at positions[:b] (from the host: one asynchronous copy out of
        # pinned memory, two staging rows used in turn).
        self.tokens = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.staging = torch.zeros(2, largest, dtype=torch.long, pin_memory=on_cuda)
        self.copied = [torch.cuda.Event(), torch.cuda.Event()] if on_cuda else None
        self.runs = 0
        self.views: Dict[int, InferenceContext] = {}
        self.graphs: Dict[int, Tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self.pool = None
        self.compiled = set()
        self.function = self._compute
        if engine.decode_mode == "compiled":
            config = torch._dynamo.config
            name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
            setattr(config, name, max(getattr(config, name), 2 * len(self.buckets)))
            self.function = torch.compile(self._compute, dynamic=False)

    def bucket(self, rows: int) -> int:
        """The smallest static batch size that holds `rows` rows."""
        for size in self.buckets:
            if size >= rows:
                return size
        raise ValueError(f"{rows} rows exceed the largest continuous step of {self.buckets[-1]} rows")

    def _view(self, b: int) -> InferenceContext:
        """The slot cache as the context of the step of b rows (one object per b, for
        torch.compile's guards). It holds the whole cache tensors, not row slices: a step of b
        rows writes and reads rows 0..b-1 of them, and a compiled step then mutates its inputs
        themselves rather than views of them (which would make it copy the cache back)."""
        view = self.views.get(b)
        if view is None:
            view = self.views[b] = self.ctx.whole()
        return view

    def _compute(self, ctx: InferenceContext, tokens: torch.Tensor, positions: torch.Tensor):
        """tokens, positions [b, 1] -> (logits [b, V], log-probabilities [b, V], packed [b, 2])."""
        engine = self.engine
        logits = engine._forward(ctx, tokens, positions, ctx.max_sequence_length, self.model)[:, -1]  # [b, V]
        lp = F.log_softmax(logits, dim=-1)
        greedy = greedy_tokens(logits)  # [b]
        packed = torch.stack([greedy.double(), lp.gather(-1, greedy[:, None])[:, 0].double()], dim=1)  # [b, 2]
        return logits, lp, packed

    def _call(self, b: int):
        return self.function(self._view(b), self.tokens[:b].view(b, 1), self.positions[:b].view(b, 1))

    def _capture(self, b: int):
        """Capture the step of b rows. The warm-up and the capture write position 0 of rows
        0..b-1, which may hold live keys/values: saved and restored around them (and the inputs)."""
        device = self.engine.device
        ctx = self.ctx
        saved_inputs = (self.tokens.clone(), self.positions.clone())
        self.tokens.zero_()
        self.positions.zero_()
        saved = [t[:b, :1].clone() for t in ctx.tensors()]
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # compiles and autotunes outside the capture
            for _ in range(2):
                self._call(b)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self._call(b)
        for t, kept in zip(ctx.tensors(), saved):
            t[:b, :1].copy_(kept)
        self.tokens.copy_(saved_inputs[0])
        self.positions.copy_(saved_inputs[1])
        self.graphs[b] = (graph, outputs)

    def run(self, positions: List[int]):
        """One step of b = len(positions) rows (a bucket size): row r feeds tokens[r] at positions[r]."""
        b = len(positions)
        if b not in self.buckets:
            raise ValueError(f"the continuous step runs {self.buckets} rows, got {b} positions")
        turn = self.runs % 2
        self.runs += 1
        if self.copied is not None:
            self.copied[turn].synchronize()  # this staging row's copy of two steps ago is done (long since)
        self.staging[turn, :b] = torch.tensor(positions, dtype=torch.long)
        self.positions[:b].copy_(self.staging[turn, :b], non_blocking=True)
        if self.copied is not None:
            self.copied[turn].record()
        compiling = self.engine.decode_mode == "compiled" and b not in self.compiled and b not in self.graphs
        with self.engine._compiling(b, self.ctx.max_sequence_length) if compiling else contextlib.nullcontext():
            if self.capture:
                if b not in self.graphs:
                    self._capture(b)
                graph, outputs = self.graphs[b]
                graph.replay()
            else:
                outputs = self._call(b)
        self.compiled.add(b)
        return outputs


class ContinuousBatcher:
    """ContinuousBatcher(engine, max_requests, prefill_chunk=256, *, static_step=None,
    graph_buckets=None): add(seq) queues a sequence; step() runs one step (see the module
    docstring) and returns the sequences that ended in it; busy() says whether anything is waiting
    or running.

    static_step: decode through SlotDecodeStep (static shapes; on CUDA captured in CUDA graphs);
    default: when the engine's decode_mode is not "eager" and the model has no Mamba layers. Otherwise the decode step is the model's
    own forward over the slots in use (the reference the static step is tested against).
    graph_buckets: the static step's batch sizes (default step_buckets(max_requests)).
    max_step_tokens: at most this many tokens in one step, decoded and prompt tokens together
    (--inference-dynamic-batching-max-tokens): a step's prompt budget is the smaller of
    prefill_chunk and max_step_tokens minus the sequences it decodes; at least max_requests, so a
    free slot's prompt always gets a token."""

    def __init__(self, engine: InferenceEngine, max_requests: int, prefill_chunk: int = 256, *,
                 static_step: Optional[bool] = None, graph_buckets: Optional[List[int]] = None,
                 max_step_tokens: Optional[int] = None):
        if max_requests < 1:
            raise ValueError(f"--inference-max-requests must be >= 1, got {max_requests}")
        if prefill_chunk < 1:
            raise ValueError(f"--inference-prefill-chunk-size must be >= 1, got {prefill_chunk}")
        if max_step_tokens is not None and max_step_tokens < max_requests:
            raise ValueError(f"--inference-dynamic-batching-max-tokens {max_step_tokens} is below the "
                             f"{max_requests} sequences a step may decode (--inference-max-requests); give at least "
                             f"{max_requests}")
        self.max_step_tokens = None if max_step_tokens is None else int(max_step_tokens)
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
        # Decode work so far (benchmarks: the mean running batch and the KV positions the steps read).
        self.decode_steps = 0
        self.decoded_rows = 0
        self.kv_positions_read = 0
        self.on_cuda = engine.device.type == "cuda"
        # The step's one read: pinned host memory and an event per turn (two, used in turn: the
        # static step reads a step's results while the next step's read is queued).
        self._read_buffers: List[Optional[torch.Tensor]] = [None, None]
        self._read_events = [torch.cuda.Event(), torch.cuda.Event()] if self.on_cuda else None
        self._reads = 0
        self._pending = None  # the static step's results not yet taken: (groups, prompt parts, read)
        recurrent = is_recurrent_model(engine.model)
        if static_step is None:
            static_step = engine.decode_mode != "eager" and not recurrent
        if static_step and recurrent:
            raise ValueError("the continuous batch's static decode step runs GPT models; a Mamba or hybrid model "
                             "decodes through the eager step (decode_mode 'eager')")
        self.decoder: Optional[SlotDecodeStep] = None
        self.graph_buckets = list(graph_buckets) if graph_buckets is not None else step_buckets(self.max_requests)
        if static_step:
            buckets = self.graph_buckets
            if not buckets or buckets != sorted(set(buckets)) or buckets[0] < 1 or buckets[-1] != self.max_requests:
                raise ValueError(f"the continuous step's batch sizes must rise from >= 1 to --inference-max-requests "
                                 f"{self.max_requests}, got {buckets}")
            self.decoder = SlotDecodeStep(engine, self.ctx, buckets, capture=self.on_cuda)

    @torch.no_grad()
    def warm_up(self) -> None:
        """Capture (and under decode_mode "compiled" compile) the static step of every batch size
        now, so that no request waits for it; only while no sequence holds a slot (the steps write
        padding at position 0 of the slots)."""
        if self.decoder is None:
            return
        if self.busy():
            raise RuntimeError("warm_up() runs before any sequence is admitted")
        self.engine.model.eval()
        for b in self.decoder.buckets:
            self.decoder.run([0] * b)

    def clear(self) -> None:
        """Forget every sequence, waiting, running or with results not yet taken (after a failed
        step; the callers have been told)."""
        self.waiting.clear()
        self.slots = [None] * self.max_requests
        self._pending = None

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
        return bool(self.waiting) or any(s is not None for s in self.slots) or self._pending is not None

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
        # Decoding: past the prompt, with a first token chosen (read or not) and tokens left to choose.
        decoding = [s for s in self.slots if s is not None and s.prefilled == len(s.prompt)
                    and 0 < s.issued < s.params.tokens_to_generate]
        prefilling = [s for s in self.slots if s is not None and s.prefilled < len(s.prompt)]
        budget = self.prefill_chunk  # 2. prompt tokens read this step, oldest prompt first
        if self.max_step_tokens is not None:
            budget = min(budget, self.max_step_tokens - len(decoding))
        groups = []  # (sequences, their rows of the logits, logits, log-probabilities, packed greedy or None, first)
        for seq in sorted(prefilling, key=lambda s: s.admitted):
            if budget <= 0:
                break
            read, last = self._prefill_chunk(seq, budget)
            budget -= read
            if last is not None:  # the prompt is read: its last logits give the first token
                groups.append(([seq], [0], *last, None, True))
        if decoding:  # 3. one token for every decoding sequence
            groups.append((decoding, *self._decode(decoding), False))
        for seqs, *_ in groups:
            for seq in seqs:
                seq.issued += 1
        if self.decoder is None:
            if groups:  # 4. read the tokens and apply them at once
                self._apply(*self._queue_read(groups), ended)
        else:
            # The static step: this step's tokens are on the device already (the next step feeds
            # them from there); its read is queued, and the host takes the previous step's tokens
            # while the device runs this one.
            previous, self._pending = self._pending, (self._queue_read(groups) if groups else None)
            if previous is not None:
                self._apply(*previous, ended)
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
        return self.ctx.rows(slot, slot + 1)

    def _device_longs(self, values: List[int]) -> torch.Tensor:
        """A host list as a long tensor on the device, copied asynchronously (from pinned memory)."""
        host = torch.tensor(values, dtype=torch.long, pin_memory=self.on_cuda)
        return host.to(self.engine.device, non_blocking=True)

    def _prefill_chunk(self, seq: Sequence, budget: int):
        """Read the next at most `budget` prompt tokens of seq -> (how many, (logits [1, V],
        log-probabilities [1, V]) at the last prompt token once the prompt is read, else None).
        Queues device work only: the prompt's scores stay on the device until the first token's
        read."""
        engine = self.engine
        lo = seq.prefilled
        hi = min(len(seq.prompt), lo + budget)
        device = engine.device
        tokens = self._device_longs(seq.prompt[lo:hi])[None]  # [1, c]
        positions = torch.arange(lo, hi, device=device)[None]  # [1, c]
        logits = engine._forward(self._slot_view(seq.slot), tokens, positions, hi)[0]  # [c, V]
        seq.prefilled = hi
        lp = F.log_softmax(logits, dim=-1)  # [c, V]
        following = seq.prompt[lo + 1: hi + 1]  # the prompt tokens these positions predict
        if following:
            k = len(following)
            chosen = lp[:k].gather(-1, self._device_longs(following)[:, None])[:, 0]  # [k]
            n = min(seq.params.top_logprobs, engine.vocab_size)
            top = lp[:k].topk(n, dim=-1) if seq.params.prompt_top_logprobs and n > 0 else None
            seq.pending_prompt.append((chosen, None if top is None else top[1], None if top is None else top[0]))
        last = (logits[-1:], lp[-1:]) if hi == len(seq.prompt) else None
        return hi - lo, last

    def _decode(self, decoding: List[Sequence]):
        """Queue the decode step of the sequences in `decoding` -> (their rows of the logits,
        logits [R, V], log-probabilities [R, V], packed greedy tokens and their log-probabilities
        [R, 2] or None). Row r is slot r; rows of free slots or of sequences still in prefill feed
        padding (see the module docstring). The static step feeds each slot's latest token from
        the device (SlotDecodeStep.tokens); the eager step feeds the host's."""
        engine = self.engine
        m = max(s.slot for s in decoding) + 1
        self.largest_batch = max(self.largest_batch, len(decoding))
        rows = m if self.decoder is None else self.decoder.bucket(m)
        tokens = [engine.eod] * rows
        positions = [0] * rows
        now = {id(s) for s in decoding}
        for slot in range(rows):
            seq = self.slots[slot]
            if seq is None:
                continue
            if id(seq) in now:
                positions[slot] = len(seq.prompt) + seq.issued - 1
                if self.decoder is None:
                    tokens[slot] = seq.generated[-1]
            else:  # in prefill: padding at the first position it has not written (overwritten later)
                positions[slot] = seq.prefilled
        order = [seq.slot for seq in decoding]
        self.decode_steps += 1
        self.decoded_rows += len(decoding)
        self.kv_positions_read += sum(positions[r] + 1 for r in order)
        if self.decoder is not None:
            logits, lp, packed = self.decoder.run(positions)
            return order, logits, lp, packed
        lengths = None
        view = self.ctx.rows(0, m)
        if getattr(self.ctx, "mamba_states", None) is not None:
            # The padding fed by free and prefilling slots must not reach their recurrent states.
            lengths = self._device_longs([int(id(self.slots[r]) in now) for r in range(m)])
        logits = engine._forward(view, self._device_longs(tokens)[:, None], self._device_longs(positions)[:, None],
                                 max(positions) + 1, lengths=lengths)[:, -1]  # [m, V]
        return order, logits, F.log_softmax(logits, dim=-1), None

    def _choose(self, seqs: List[Sequence], rows: List[int], logits: torch.Tensor, lp: torch.Tensor,
                packed: Optional[torch.Tensor]) -> torch.Tensor:
        """Queue the choice of the next token of each of seqs from its row of logits [R, V] ->
        float64 [R, 2 + 2n] on the device: per row the token, its log-probability (the model's own,
        before penalties and bias), the n top token ids and their log-probabilities (n = the most
        any of seqs asks for). Greedy rows take the argmax (`packed` [R, 2] where the step computed
        it), the others sample one by one from their own generators."""
        engine = self.engine
        device = logits.device
        if packed is None:
            greedy = logits.argmax(dim=-1)  # [R]
            packed = torch.stack([greedy.double(), lp.gather(-1, greedy[:, None])[:, 0].double()], dim=1)
        out = packed
        for seq, r in zip(seqs, rows):
            params = seq.params
            if params.top_k == 1 and not params.shapes_logits():
                continue
            if out is packed:
                out = packed.clone()
            shaped = logits[r: r + 1]
            if params.shapes_logits():
                if seq.counts is not None:
                    shaped = (shaped - params.frequency_penalty * seq.counts
                              - params.presence_penalty * (seq.counts > 0).float())
                else:
                    shaped = shaped.clone()
                for token, bias in params.logit_bias:
                    shaped[0, token] += bias
            new = sample(shaped, top_k=params.top_k, top_p=params.top_p, temperature=params.temperature,
                         generator=seq.generator)  # [1]
            out[r: r + 1, 0] = new.double()
            out[r: r + 1, 1] = lp[r: r + 1].gather(-1, new[:, None])[:, 0].double()
        for seq, r in zip(seqs, rows):
            if seq.counts is not None:
                seq.counts.index_add_(0, out[r: r + 1, 0].long(), torch.ones(1, device=device))
        n = min(max(s.params.top_logprobs for s in seqs), engine.vocab_size)
        if n > 0:
            values, ids = lp.topk(n, dim=-1)  # [R, n]
            out = torch.cat([out, ids.double(), values.double()], dim=1)
        return out

    def _queue_read(self, groups):
        """Queue the choice of every group's tokens (groups of (sequences, their rows, logits,
        log-probabilities, packed greedy or None, first token)), for the static step also write
        them where its next step feeds them from, and queue the step's one read of the device:
        the tokens, their log-probabilities and top log-probabilities and the prompt scores of
        sequences taking their first token, as one float64 vector copied into pinned memory
        (on CUDA). -> (groups, prompt parts, the read) for _apply."""
        chosen = [self._choose(seqs, rows, logits, lp, packed) for seqs, rows, logits, lp, packed, _ in groups]
        if self.decoder is not None:  # each slot's latest token, where the next decode step reads it
            slot_tokens = self.decoder.tokens
            # The decode step's rows first: row r is slot r, every row of the step is written
            # (rows that did not decode feed padding anyway) ...
            for (seqs, rows, *_, first), values in zip(groups, chosen):
                if not first:
                    slot_tokens[: values.shape[0]].copy_(values[:, 0])
            # ... then the first tokens of prompts read this step, over their slots' padding rows.
            for (seqs, rows, *_, first), values in zip(groups, chosen):
                if first:  # one sequence, one row
                    slot_tokens[seqs[0].slot: seqs[0].slot + 1].copy_(values[:1, 0])
        prompt_parts = []  # (seq, index of its first tensor in the read, entries)
        reads = list(chosen)
        for seqs, *_, first in groups:
            if not first:
                continue
            for seq in seqs:
                prompt_parts.append((seq, len(reads), seq.pending_prompt))
                for entry in seq.pending_prompt:
                    reads += [t for t in entry if t is not None]
                seq.pending_prompt = []
        meta = [(seqs, rows, first) for seqs, rows, *_, first in groups]
        flat = [t.reshape(-1).double() for t in reads]
        whole = flat[0] if len(flat) == 1 else torch.cat(flat)
        turn = self._reads % 2
        self._reads += 1
        if self.on_cuda:
            size = whole.numel()
            self._read_events[turn].synchronize()  # this buffer's read of two steps ago was taken
            buffer = self._read_buffers[turn]
            if buffer is None or buffer.numel() < size:
                buffer = self._read_buffers[turn] = torch.empty(max(size, 4096), dtype=torch.float64,
                                                                pin_memory=True)
            host = buffer[:size]
            host.copy_(whole, non_blocking=True)
            self._read_events[turn].record()
            event = self._read_events[turn]
        else:
            host, event = whole, None
        return meta, prompt_parts, (host, event, [t.shape for t in reads])

    def _read(self, read) -> List[torch.Tensor]:
        """Wait for a queued read (its copy alone) -> the tensors it holds, on the host, float64."""
        host, event, shapes = read
        if event is not None:
            event.synchronize()
        out, at = [], 0
        for shape in shapes:
            size = 1
            for extent in shape:
                size *= extent
            out.append(host[at: at + size].view(shape))
            at += size
        return out

    def _apply(self, meta, prompt_parts, read, ended: List[Sequence]) -> None:
        """Take a step's tokens from its read and apply the stop rules on the host. A sequence
        that ended meanwhile (withdrawn, or a stop seen in the step before, which the static step
        learns one step late) ignores its token."""
        engine = self.engine
        host = self._read(read)
        for seq, at, entries in prompt_parts:
            for _, ids, _ in entries:
                seq.prompt_logprobs += host[at].tolist()
                at += 1
                if ids is not None:
                    ids_list = [[int(i) for i in row] for row in host[at].tolist()]
                    seq.prompt_top_logprobs += [dict(zip(i, v)) for i, v in zip(ids_list, host[at + 1].tolist())]
                    at += 2
        for (seqs, rows, first), values in zip(meta, host):
            table = values.tolist()  # [R][2 + 2n]
            n = (len(table[0]) - 2) // 2
            for seq, r in zip(seqs, rows):
                if seq.done:
                    continue
                params = seq.params
                entry = table[r]
                token, logprob = int(entry[0]), entry[1]
                top = None
                if params.top_logprobs > 0:
                    k = min(params.top_logprobs, engine.vocab_size, n)
                    top = dict(zip((int(i) for i in entry[2: 2 + k]), entry[2 + n: 2 + n + k]))
                    seq.top_logprobs.append(top)
                seq.generated.append(token)
                seq.logprobs.append(logprob)
                stop = False
                if seq.on_token is not None:
                    prompt_scores = ((seq.prompt_logprobs,
                                      seq.prompt_top_logprobs if params.prompt_top_logprobs else None)
                                     if first else None)
                    stop = bool(seq.on_token(token, logprob, top, prompt_scores))
                if (stop or (params.stop_at_eod and token == engine.eod)
                        or len(seq.generated) >= params.tokens_to_generate
                        or (seq.withdrawn is not None and seq.withdrawn())):
                    self._end(seq, ended)
