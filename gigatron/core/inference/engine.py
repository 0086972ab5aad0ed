"""Text generation with a KV cache: batched prefill, then one token per step.

Shape legend: b = rows (prompts), L = longest prompt, s = new tokens in a forward, S = the cache's
max sequence, V = true vocabulary, Vp = padded vocabulary, tp = tensor-parallel size, n = top
log-probabilities asked for.

Prompts of different lengths are right-padded into one [b, L] batch whose position ids are
0..L-1 in every row. The prefill writes each token's key/value at the cache slot equal to its
position; row r's first generated token is sampled from the logits at its last prompt token
(index len_r - 1) and goes to slot len_r, overwriting the padding there. Every query attends only
to slots at or before its own position, so padding is never attended by a real token. Decode steps
feed one token per row ([b, 1]) at that row's own position.

A MambaModel's Mamba layers keep recurrent states instead of keys and values (state_cache.py):
the prefill is told each row's prompt length, so that the right padding does not advance a row's
state, and a decode step advances every row's state by its new token.

With tensor parallelism every rank runs the same steps; the vocab-parallel logits are gathered
over the tensor-parallel group and the sampled tokens are broadcast from its first rank, so all
ranks keep identical sequences. Only the true vocabulary is ever scored or sampled (the padded
entries are cut off).

The decode step and host synchronisation
----------------------------------------
A step only queues device work, so the host can run ahead of the device and prepare the next step
while the current one computes. Per step, in order:

1. sample the next token of every row from the logits [b, V] (greedy: their argmax, which a
   captured step computes itself; see sampling.py, which never reads a tensor on the host);
2. rows that already stopped get the padding token (torch.where, not a boolean mask);
3. write every row's token (and log-probability) at its column `cur` with full-row index tensors;
   a finished row writes padding at its end column, which is never returned;
4. stop rules give `stopped` [b]; `cur` advances for the rows still active; `active` drops the
   stopped rows;
5. is every row done? On CUDA the step writes active.any() into pinned host memory, records an
   event behind it and reads the flag of the previous step (one step late: the host is one step
   ahead; at once with a callback or under tensor parallelism).
   When it says that every row had stopped, the loop ends; the work queued since (one more
   decode and one sampling step, in which no row is active) changes nothing that is returned;
6. the next decode feeds each row's new token at position cur - 1 (a finished row re-feeds
   padding at its last slot, which nothing reads again). The attention length is bounded on the
   host: after step t no position exceeds L + t, so kv_len = L + t + 1 (exact while the longest
   prompt's row runs; beyond that the mask hides every slot past a row's position, so a longer
   kv_len attends exactly the same slots).

Steps 2-4 and 6 are one kernel (advance.py): it updates tokens, cur, active and the last tokens
in place, writes the next decode's tokens and positions straight into the captured steps' input
buffers (shared by every graph of a batch size, so a replay needs no copy before it) and, when
step 5 reads one step late, the all-done flag straight into the pinned host memory it reads. An
on_step callback may then end more rows (under tensor parallelism the serving rank's choice,
broadcast to every rank).

The host reads the device only where the caller asks for per-step values: an `on_step` callback
gets each step's tokens as lists (and then the all-done check is read at once), and everything
else (tokens, lengths, log-probabilities, top log-probabilities) is read once after the loop.

decode_mode "cuda_graph" captures the decode step (static [b, 1] inputs, logits [b, V] out) in one
CUDA graph per (batch size, attention length), the attention length being the smallest of the
buckets 256, 512, 1024, ... (capped at S) that covers the step's positions
(kv_cache.decode_kv_bucket): a step early in a long cache reads only the slots it may need. The
graphs share one memory pool; this is safe because they replay one at a time on one stream and
each step consumes the logits of a replay before the next replay. "compiled" does the same with
the step compiled by torch.compile first (one compilation per batch size and attention length):
Inductor fuses the norms, residual adds, bias and activation epilogues, the KV-cache writes and
the logits' slicing and casting, so the captured graph holds fewer, larger kernels (283 against
456 per step for the 1.3B GPT at batch 1 with DecodeKernels(fused=False)). On CPU "compiled" runs the
compiled step without a graph. "eager" (default) runs the model each step and attends over the
bounded kv_len above.

On CUDA a captured step is the engine's own decode step (decode_step.py, built from the model's
weights; the model's layers carry no inference switch): at batch 1 it runs each layer as four
fused Triton GEMVs (gigatron/core/ops/gemv.py: weight rows streamed once with wide loads, no
split-K pass, the norm in the prologue, bias, activation and residual add in the epilogue) and one
decode-attention kernel that also writes the new key/value into the cache
(gigatron/core/ops/decode_attention.py, used at any batch whose rows and heads do not fill the
GPU); the final norm runs inside the output layer's GEMV. On Hopper GPUs these kernels are
launched with programmatic dependent launch, so each one streams its weights while the one before
it finishes. For the 1.3B GPT a step is 127 kernels (the bookkeeping kernel included) instead of
271, and 1,015 against 775 tokens/s on one H200. Benchmarks switch kernels off through the
private `_decode_kernels` argument (decode_step.DecodeKernels): `fused=False` keeps one plain GEMV
per linear layer with the rest compiled around it, `gemv=False` keeps cuBLAS (and cuDNN attention).
Eager steps, the prefill and CPU steps run the model's own forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from gigatron.core.inference.advance import StopTokens, advance
from gigatron.core.inference.decode_step import DecodeKernels, DecodeStep
from gigatron.core.inference.kv_cache import InferenceContext, causal_cache_mask, decode_kv_bucket, decode_kv_buckets
from gigatron.core.inference.sampling import check_sampling_params, greedy_tokens, sample
from gigatron.core.inference.state_cache import inference_context_for, is_recurrent_model

__all__ = ["InferenceEngine", "SamplingParams", "GenerationResult", "BeamResult", "PromptTooLongError",
           "DECODE_MODES"]

DECODE_MODES = ("eager", "cuda_graph", "compiled")

log = logging.getLogger("gigatron.inference.engine")


class PromptTooLongError(ValueError):
    """A prompt plus the tokens to generate do not fit the model's maximum sequence length."""


@dataclasses.dataclass
class SamplingParams:
    """How to pick the next token and when to stop (Megatron's /api fields)."""
    tokens_to_generate: int = 64
    """Tokens to generate after each prompt (0 = scoring: log-probabilities of the prompt only)."""
    return_log_probs: bool = False
    """Return the log-probability of every token after the first."""
    temperature: float = 1.0
    """Divides the logits before sampling (> 0)."""
    top_k: int = 0
    """Sample among the k most likely tokens; 1 = greedy; 0 = off."""
    top_p: float = 0.0
    """Sample from the smallest set of tokens whose probability reaches top_p; 0 = off."""
    top_p_decay: float = 0.0
    """After each step top_p *= top_p_decay (0 = off)."""
    top_p_bound: float = 0.0
    """Lower bound of the decayed top_p (0 = none)."""
    add_BOS: bool = False
    """Prepend the end-of-document token to every prompt."""
    stop_on_eol: bool = False
    """A row stops after a newline (or double newline) token."""
    stop_on_double_eol: bool = False
    """A row stops after two newlines."""
    prevent_newline_after_colon: bool = False
    """Never generate a newline right after a colon."""
    random_seed: int = -1
    """Seed of the sampling generator (>= 0 makes sampling reproducible; -1 = random)."""
    top_logprobs: int = 0
    """Also return the n most likely tokens and their log-probabilities at each generated step."""
    stop_at_eod: bool = True
    """A row stops after generating the end-of-document token."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token the row has generated so far (OpenAI's
    presence_penalty, in [-2, 2]); the prompt does not count."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time the row has generated it (OpenAI's
    frequency_penalty, in [-2, 2])."""
    logit_bias: Tuple[Tuple[int, float], ...] = ()
    """(token id, bias) pairs added to those logits before sampling (OpenAI's logit_bias; -100
    bans a token, 100 all but forces it)."""
    prompt_top_logprobs: bool = False
    """Also return the top_logprobs most likely tokens at every prompt position after the first
    (GenerationResult.prompt_top_logprobs)."""

    def batch_key(self):
        """Requests with the same key can share a batch (everything but the seed decides a step)."""
        return (self.tokens_to_generate, self.temperature, self.top_k, self.top_p, self.top_p_decay,
                self.top_p_bound, self.stop_on_eol, self.stop_on_double_eol, self.prevent_newline_after_colon,
                self.stop_at_eod, self.presence_penalty, self.frequency_penalty, tuple(self.logit_bias))

    def shapes_logits(self) -> bool:
        """Whether penalties or biases change the logits before sampling (the greedy token is
        then the argmax of the changed logits)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


@dataclasses.dataclass
class GenerationResult:
    """Per prompt: the token ids (prompt + generated, up to and including a stop token), the
    detokenized text, one string per token, and the log-probability of each token after the first
    (None unless asked), the prompt length, and per generated step the top log-probabilities."""
    tokens: List[List[int]]
    texts: List[str]
    segments: List[List[str]]
    logprobs: Optional[List[List[float]]]
    prompt_lengths: List[int]
    top_logprobs: Optional[List[List[Dict[int, float]]]] = None
    prompt_top_logprobs: Optional[List[List[Dict[int, float]]]] = None
    """Per row, per prompt token after the first, {token id: log-probability} of the top n
    (SamplingParams.prompt_top_logprobs)."""


@dataclasses.dataclass
class BeamResult:
    """The best beams, best first: token ids, texts, segments and length-normalized scores."""
    tokens: List[List[int]]
    texts: List[str]
    segments: List[List[str]]
    scores: List[float]


def _single_token(tokenizer, text: str) -> Optional[int]:
    try:
        ids = tokenizer.tokenize(text)
    except Exception:  # a tokenizer that cannot encode the text has no such token
        return None
    return ids[0] if len(ids) == 1 else None


class InferenceEngine:
    """Generation from a GPTModel, or a MambaModel (Mamba / hybrid: its Mamba layers keep a
    recurrent state cache beside the attention layers' KV cache, state_cache.py), one pipeline
    stage holding every layer.

    InferenceEngine(model, tokenizer, *, groups=None, vocab_size=None, max_batch_size=8,
                    max_sequence_length=None, decode_mode="eager")
      model: a GPTModel in eval mode (pre_process and post_process, no sequence parallelism).
      tokenizer: gigatron.core.tokenizers tokenizer (tokenize, detokenize, eod).
      vocab_size: the true vocabulary (default tokenizer.vocab_size); logits past it are ignored.
      max_sequence_length: the cache length (default config.max_position_embeddings or seq_length).
      decode_mode: "eager", "cuda_graph" or "compiled" (see the module docstring); captured
        steps on CUDA use every Triton decode kernel (decode_step.py).
      _decode_kernels: private, for benchmarks: a decode_step.DecodeKernels naming the kernels the
        captured steps use (default: all).

    generate(prompts, params) -> GenerationResult
    generate_tokens(prompt_tokens, params, on_step=None, cancelled=None) -> GenerationResult
    beam_search(prompt, tokens_to_generate, beam_width, stop_token, length_penalty, add_BOS) -> BeamResult
    """

    def __init__(self, model, tokenizer, *, groups=None, vocab_size: Optional[int] = None,
                 max_batch_size: int = 8, max_sequence_length: Optional[int] = None, decode_mode: str = "eager",
                 _decode_kernels: Optional[DecodeKernels] = None):
        config = model.config
        groups = groups if groups is not None else model.groups
        if not (model.pre_process and model.post_process) or groups.pp.size != 1:
            raise ValueError("generation needs the whole model on each rank: build it with "
                             "--pipeline-model-parallel-size 1")
        if groups.cp.size != 1:
            raise ValueError("generation does not support --context-parallel-size > 1; set it to 1")
        if getattr(model, "sequence_parallel", False):
            raise ValueError("generation runs one token per step, which --sequence-parallel cannot split; "
                             "build the model without --sequence-parallel")
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {', '.join(DECODE_MODES)}, got {decode_mode!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.groups = groups
        self.config = config
        self.vocab_size = int(vocab_size if vocab_size is not None else tokenizer.vocab_size)
        if self.vocab_size > model.vocab_size:
            raise ValueError(f"the true vocabulary ({self.vocab_size}) is larger than the model's "
                             f"padded vocabulary ({model.vocab_size})")
        self.max_batch_size = int(max_batch_size)
        limit = max_sequence_length or config.max_position_embeddings or config.seq_length
        if config.position_embedding_type == "learned_absolute" and config.max_position_embeddings:
            limit = min(limit, config.max_position_embeddings)
        self.max_sequence_length = int(limit)
        param = next(model.parameters())
        self.device = param.device
        if decode_mode == "cuda_graph" and self.device.type != "cuda":
            raise ValueError("decode_mode='cuda_graph' needs the model on a CUDA device; use 'eager' on CPU")
        self.decode_mode = decode_mode
        kernels = _decode_kernels if _decode_kernels is not None else DecodeKernels()
        self.decode_kernels = kernels  # also what the continuous batch's captured step builds on
        # What a captured decode step runs: the decode step with the Triton kernels on CUDA, the
        # model's own forward elsewhere (and with the kernels off, and for models with Mamba layers,
        # whose recurrent step is the mixer's own).
        self._decode_model = (DecodeStep(model, kernels) if self.device.type == "cuda" and kernels.gemv
                              and not is_recurrent_model(model) else model)
        self._compiled_step = None  # torch.compile of _decode_forward (decode_mode "compiled")
        self.eod = tokenizer.eod
        self.newline = _single_token(tokenizer, "\n")
        self.double_newline = _single_token(tokenizer, "\n\n")
        self.colon = _single_token(tokenizer, ":")
        self._context: Optional[InferenceContext] = None
        self._graphs: Dict[Tuple[int, int], "_DecodeGraph"] = {}  # (batch, attention length) -> graph
        self._graph_pool = None  # one memory pool for every captured decode graph
        self._graph_inputs: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}  # batch -> tokens, positions
        self._compiled_shapes = set()  # (batch, attention length) of the compiled steps run on CPU

    # ------------------------------------------------------------------ helpers
    def context(self) -> InferenceContext:
        if self._context is None:
            self._context = inference_context_for(self.model, self.max_batch_size, self.max_sequence_length)
        return self._context

    def tokenize_prompts(self, prompts: Sequence[str], add_BOS: bool = False) -> List[List[int]]:
        out = []
        for prompt in prompts:
            ids = list(self.tokenizer.tokenize(prompt)) if prompt else []
            if add_BOS:
                ids = [self.eod] + ids
            if not ids:
                raise ValueError("an empty prompt needs add_BOS=true (the generation must start from a token)")
            out.append(ids)
        return out

    def check_fits(self, prompt_tokens: Sequence[Sequence[int]], tokens_to_generate: int) -> None:
        """Raise PromptTooLongError if a prompt plus the generation exceeds the max sequence length."""
        for i, ids in enumerate(prompt_tokens):
            need = len(ids) + tokens_to_generate
            if need > self.max_sequence_length:
                raise PromptTooLongError(
                    f"prompt {i} has {len(ids)} tokens; with tokens_to_generate={tokens_to_generate} it needs "
                    f"{need} positions but the model holds {self.max_sequence_length}; shorten the prompt or "
                    "generate fewer tokens")

    def _full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits [s, b, Vp/tp] -> [b, s, V] fp32 over the true vocabulary."""
        if self.groups.tp.size > 1:
            from gigatron.core.parallel.mappings import gather_from_tensor_parallel_region
            logits = gather_from_tensor_parallel_region(logits, self.groups.tp)  # [s, b, Vp]
        return logits[..., : self.vocab_size].transpose(0, 1).float()  # [b, s, V]

    def _sync_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Make every tensor-parallel rank use the first rank's tokens."""
        tp = self.groups.tp
        if tp.size > 1:
            torch.distributed.broadcast(tokens, src=tp.ranks[0], group=tp.group)
        return tokens

    def _forward(self, ctx: InferenceContext, tokens: torch.Tensor, positions: torch.Tensor,
                 kv_len: int, model=None, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens, positions [b, s] -> logits [b, s, V] (fp32), through `model` (default: the
        model's own forward; captured decode steps pass the decode step). lengths [b]: the real
        tokens of each row (the rest is right padding), for the recurrent states of Mamba layers
        (state_cache.py); None: all s."""
        ctx.set_positions(positions, kv_len)
        states = getattr(ctx, "mamba_states", None)
        if states is not None:
            states.set_lengths(lengths)
        mask = causal_cache_mask(positions, kv_len, getattr(self.config, "window_size", None))  # [b, 1, s, kv_len]
        logits = (self.model if model is None else model)(tokens, positions, mask, inference_context=ctx)  # [s, b, Vp/tp]
        return self._full_logits(logits)

    def _decode_forward(self, ctx, tokens, positions, kv_len: int) -> torch.Tensor:
        """An eager decode step's computation: tokens, positions [b, 1] -> logits [b, V] (fp32)."""
        return self._forward(ctx, tokens, positions, kv_len)[:, -1]

    def _graph_step(self, ctx, tokens, positions, kv_len: int):
        """What a captured decode step computes: (logits [b, V] fp32, their argmax [b]: the greedy
        token, so greedy decoding needs no reduction outside the graph)."""
        logits = self._forward(ctx, tokens, positions, kv_len, self._decode_model)[:, -1]
        return logits, greedy_tokens(logits)

    def _step_function(self):
        """What a captured decode step runs: _graph_step, or its torch.compile."""
        if self.decode_mode != "compiled":
            return self._graph_step
        if self._compiled_step is None:
            # One compilation per (batch size, attention length); let dynamo keep all of them.
            buckets = len(decode_kv_buckets(self.max_sequence_length))
            config = torch._dynamo.config
            name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
            setattr(config, name, max(getattr(config, name), 2 * self.max_batch_size * buckets))
            self._compiled_step = torch.compile(self._graph_step, dynamic=False)
        return self._compiled_step

    def _decode(self, ctx, tokens, positions, kv_len: int):
        """One decode step: tokens, positions [b, 1] (the buffers of _decode_inputs(b)), kv_len >=
        every position + 1 -> (logits [b, V], their argmax [b] or None in eager mode). With CUDA
        graphs both are the graph's output buffers, valid until the next replay."""
        b = tokens.shape[0]
        if self.decode_mode == "eager":
            return self._decode_forward(ctx, tokens, positions, kv_len), None
        bucket = decode_kv_bucket(kv_len, ctx.max_sequence_length)
        if self.device.type != "cuda":  # "compiled" on CPU: the compiled step, no graph
            if (b, bucket) in self._compiled_shapes:
                return self._step_function()(ctx, tokens, positions, bucket)
            with self._compiling(b, bucket):
                out = self._step_function()(ctx, tokens, positions, bucket)
            self._compiled_shapes.add((b, bucket))
            return out
        graph = self._graphs.get((b, bucket))
        if graph is None:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            with self._compiling(b, bucket) if self.decode_mode == "compiled" else contextlib.nullcontext():
                graph = self._graphs[(b, bucket)] = _DecodeGraph(self, ctx, bucket, self._graph_pool,
                                                                 *self._decode_inputs(b))
        if tokens is not graph.tokens or positions is not graph.positions:
            raise ValueError("a captured decode step reads its own inputs: pass the buffers of _decode_inputs(b)")
        return graph.run()

    @contextlib.contextmanager
    def _compiling(self, b: int, kv_len: int):
        """Say (log level INFO) that the decode step of this shape is being compiled, which takes
        tens of seconds once per shape, and how long it took."""
        log.info("compiling the decode step for %d row%s and %d cache slots (torch.compile, once per shape) ...",
                 b, "" if b == 1 else "s", kv_len)
        start = time.perf_counter()
        yield
        log.info("compiled the decode step for %d row%s and %d cache slots in %.1f s",
                 b, "" if b == 1 else "s", kv_len, time.perf_counter() - start)

    def _decode_inputs(self, b: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Buffers for a decode step's tokens and positions [b, 1]: with CUDA graphs the inputs
        every captured step of batch size b reads (written there, a step needs no copy before its
        replay); otherwise new ones."""
        captured = self.decode_mode != "eager" and self.device.type == "cuda"
        if not captured or b not in self._graph_inputs:
            inputs = tuple(torch.zeros(b, 1, dtype=torch.long, device=self.device) for _ in range(2))
            if not captured:
                return inputs
            self._graph_inputs[b] = inputs
        return self._graph_inputs[b]

    def _stop_tokens(self, params: SamplingParams) -> StopTokens:
        """The tokens that end a row under params."""
        singles = [self.eod] if params.stop_at_eod else []
        pair = None
        if params.stop_on_double_eol or params.stop_on_eol:
            if self.double_newline is not None:
                singles.append(self.double_newline)
            if self.newline is not None:
                if params.stop_on_eol:
                    singles.append(self.newline)
                else:
                    pair = self.newline
        return StopTokens(tuple(singles), pair)

    # ------------------------------------------------------------------ sampling generation
    def generate(self, prompts: Sequence[str], params: SamplingParams,
                 on_step: Optional[Callable] = None) -> GenerationResult:
        return self.generate_tokens(self.tokenize_prompts(prompts, params.add_BOS), params, on_step)

    @torch.no_grad()
    def generate_tokens(self, prompt_tokens: Sequence[Sequence[int]], params: SamplingParams,
                        on_step: Optional[Callable] = None,
                        cancelled: Optional[Callable[[], Optional[Sequence[bool]]]] = None) -> GenerationResult:
        """on_step(step, tokens [b] list, active [b] list of bool) is called after each sampled token
        (tokens of inactive rows are padding); it may return a list of b bools naming rows to end.
        An on_step with the attribute wants_logprobs=True (and params.return_log_probs) also gets
        the keywords logprobs (b floats: each sampled token's log-probability) and top_logprobs
        (b dicts {token id: log-probability}, or None without params.top_logprobs), and at step 0
        prompt_logprobs (per row, the log-probability of each prompt token after the first) and
        prompt_top_logprobs (per row, a dict per such token, or None); a streamed answer sends
        them with each token.
        cancelled() is called on the host after each sampled token and reads nothing from the
        device: None, or b bools naming the rows whose requests were withdrawn (a client that went
        away). Those rows end there; once every row is withdrawn the generation stops. Under
        tensor parallelism only the serving rank passes it (its choice is broadcast)."""
        b = len(prompt_tokens)
        if b == 0:
            raise ValueError("no prompts to generate from")
        if b > self.max_batch_size:
            raise ValueError(f"{b} prompts exceed max_batch_size {self.max_batch_size}; split them into batches")
        if params.tokens_to_generate < 0:
            raise ValueError(f"tokens_to_generate must be >= 0, got {params.tokens_to_generate}")
        if params.tokens_to_generate == 0 and not params.return_log_probs:
            raise ValueError("tokens_to_generate=0 is scoring mode and needs return_log_probs=true")
        check_sampling_params(params.top_k, params.top_p, params.temperature, self.vocab_size)
        self._check_logit_shaping(params)
        if any(len(p) == 0 for p in prompt_tokens):
            raise ValueError("every prompt needs at least one token (use add_BOS for an empty prompt)")
        self.check_fits(prompt_tokens, params.tokens_to_generate)
        self.model.eval()
        device = self.device
        prompt_lengths = [len(p) for p in prompt_tokens]
        longest = max(prompt_lengths)
        total = longest + params.tokens_to_generate
        table = torch.full((b, total), self.eod, dtype=torch.long)  # [b, L + T], built on the host
        for i, ids in enumerate(prompt_tokens):
            table[i, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        tokens = table.to(device)  # [b, L + T]
        lengths = torch.tensor(prompt_lengths, device=device)  # [b]
        seed = params.random_seed if params.random_seed >= 0 else random.randrange(2 ** 62)
        generator = torch.Generator(device=device).manual_seed(seed)

        ctx = self.context()
        positions = torch.arange(longest, device=device).expand(b, longest)  # [b, L]
        logits = self._forward(ctx, tokens[:, :longest], positions, longest, lengths=lengths)  # [b, L, V]
        token_logprobs = torch.zeros(b, total, device=device)  # [b, L + T]; entry j: log p(token j)
        num_top = min(params.top_logprobs, self.vocab_size)
        prompt_top = None  # (values, ids) [b, L-1, n]: the top n at every prompt position after the first
        if params.return_log_probs and longest > 1:
            lp = F.log_softmax(logits[:, :-1], dim=-1)  # [b, L-1, V]
            token_logprobs[:, 1:longest] = lp.gather(-1, tokens[:, 1:longest, None]).squeeze(-1)
            if params.prompt_top_logprobs and num_top > 0:
                prompt_top = lp.topk(num_top, dim=-1)
            del lp
        rows = torch.arange(b, device=device)
        next_logits = logits[rows, lengths - 1]  # [b, V]
        del logits

        def prompt_scores():
            """Per row: log p of each prompt token after the first, and the top n there (or None)."""
            lps = [token_logprobs[i, 1: prompt_lengths[i]].tolist() for i in range(b)] if params.return_log_probs else None
            tops = None
            if params.prompt_top_logprobs and num_top > 0:
                tops = [[] for _ in range(b)]
                if prompt_top is not None:
                    values, ids = prompt_top[0].tolist(), prompt_top[1].tolist()  # [b, L-1, n]
                    tops = [[dict(zip(ids[i][j], values[i][j])) for j in range(prompt_lengths[i] - 1)]
                            for i in range(b)]
            return lps, tops

        cur, top_steps = self._decode_steps(ctx, tokens, token_logprobs, next_logits, lengths, longest, params,
                                            generator, on_step, cancelled, prompt_scores)

        lengths_out = cur.tolist()
        tokens_out = [tokens[i, : lengths_out[i]].tolist() for i in range(b)]
        logprobs_out = None
        if params.return_log_probs:
            logprobs_out = [token_logprobs[i, 1: lengths_out[i]].tolist() for i in range(b)]
        return GenerationResult(
            tokens=tokens_out,
            texts=[self.tokenizer.detokenize(t) for t in tokens_out],
            segments=[[self.tokenizer.detokenize([t]) for t in row] for row in tokens_out],
            logprobs=logprobs_out,
            prompt_lengths=prompt_lengths,
            top_logprobs=_top_logprobs_lists(top_steps, b) if params.top_logprobs > 0 else None,
            prompt_top_logprobs=prompt_scores()[1] if params.prompt_top_logprobs and num_top > 0 else None,
        )

    def _check_logit_shaping(self, params: SamplingParams) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(params, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        for token, bias in params.logit_bias:
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"logit_bias names token {token}, outside the vocabulary [0, {self.vocab_size})")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias of token {token} must be in [-100, 100], got {bias}")

    def _shaped_logits(self, logits: torch.Tensor, counts: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], params: SamplingParams) -> torch.Tensor:
        """logits [b, V] with the penalties (counts [b, V]: each token's count in the row's
        generation so far) and the bias [V] applied; a new tensor."""
        if counts is not None:
            logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
        if bias is not None:
            logits = logits + bias
        return logits

    def _decode_steps(self, ctx: InferenceContext, tokens: torch.Tensor, token_logprobs: torch.Tensor,
                      next_logits: torch.Tensor, lengths: torch.Tensor, longest: int, params: SamplingParams,
                      generator: torch.Generator, on_step: Optional[Callable],
                      cancelled: Optional[Callable[[], Optional[Sequence[bool]]]] = None,
                      prompt_scores: Optional[Callable] = None):
        """The sampling loop after the prefill (the step the module docstring lays out). Writes the
        generated tokens and their log-probabilities into tokens and token_logprobs [b, L + T] in
        place; returns (cur [b]: each row's final length, top_steps: per step (values [b, n],
        ids [b, n], active [b]) on the device, empty unless params.top_logprobs > 0)."""
        b = tokens.shape[0]
        device = tokens.device
        rows = torch.arange(b, device=device)  # [b]
        cur = lengths.clone()  # [b] column of each row's next token
        active = torch.ones(b, dtype=torch.bool, device=device)  # [b] rows still generating
        last = tokens[rows, cur - 1]  # [b] each row's latest token
        want_logprobs = params.return_log_probs
        num_top = min(params.top_logprobs, self.vocab_size) if params.top_logprobs > 0 else 0
        top_steps: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        block_newline = (params.prevent_newline_after_colon and self.colon is not None
                         and self.newline is not None)
        stops = self._stop_tokens(params)
        all_stopped = _AllStoppedCheck(device, deferred=_defer_stop_check(device, on_step, self.groups.tp.size))
        caller_ends_rows = on_step is not None or self.groups.tp.size > 1
        next_tokens, next_positions = self._decode_inputs(b)  # [b, 1] each, written by advance()
        top_p = params.top_p
        greedy = None  # the decode step's argmax of next_logits, where it computes one
        # Penalties count each row's generated tokens; the bias is one row [V] for the batch.
        counts = (torch.zeros(b, self.vocab_size, device=device)
                  if params.presence_penalty or params.frequency_penalty else None)  # [b, V]
        bias = None
        if params.logit_bias:
            bias = torch.zeros(self.vocab_size, device=device)  # [V]
            for token, value in params.logit_bias:
                bias[token] = float(value)
        # An on_step that asks for them gets each step's log-probabilities (and the prompt's at step 0).
        step_scores = on_step is not None and getattr(on_step, "wants_logprobs", False) and want_logprobs
        for step in range(params.tokens_to_generate):
            if block_newline:  # no newline right after a colon
                column = next_logits[:, self.newline]  # [b]
                next_logits[:, self.newline] = column.masked_fill(last == self.colon, float("-inf"))
            shaped = self._shaped_logits(next_logits, counts, bias, params) if params.shapes_logits() else next_logits
            if greedy is not None and params.top_k == 1 and not block_newline and shaped is next_logits:
                new = greedy  # the step's own argmax of next_logits
            else:
                new = sample(shaped, top_k=params.top_k, top_p=top_p, temperature=params.temperature,
                             generator=generator)  # [b]
            new = self._sync_tokens(new)
            if counts is not None:
                counts.scatter_add_(1, new[:, None], active[:, None].float())
            # Log-probabilities are the model's own (before penalties and bias). A stopped row's
            # land past its end (never returned), whatever its token.
            chosen = values = ids = None
            if want_logprobs or num_top:
                lp = F.log_softmax(next_logits, dim=-1)  # [b, V]
                if want_logprobs:
                    chosen = lp.gather(-1, new[:, None]).squeeze(-1)  # [b]
                    token_logprobs[rows, cur] = chosen
                if num_top:
                    values, ids = lp.topk(num_top, dim=-1)  # [b, n]
                    top_steps.append((values, ids, active.clone()))
            last_step = step == params.tokens_to_generate - 1
            was_active = active.clone() if on_step is not None else None
            scores = {}
            if step_scores:
                scores["logprobs"] = chosen.tolist()
                scores["top_logprobs"] = ([dict(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
                                          if num_top else None)
                if step == 0 and prompt_scores is not None:
                    scores["prompt_logprobs"], scores["prompt_top_logprobs"] = prompt_scores()
            # Steps 2-4 and 6; a stopped row writes padding past its end (never returned) and
            # re-feeds it at its last slot. The flag is written only where it is read late, which
            # excludes callbacks and tensor parallelism (whose rows may end below).
            advance(new, active, cur, last, tokens, next_tokens, next_positions, stops, self.eod,
                    flag=None if last_step else all_stopped.next_flag())
            withdrawn = cancelled() if cancelled is not None else None  # host only: no device read
            withdrawn = list(withdrawn) if withdrawn is not None and any(withdrawn) else None
            if caller_ends_rows:  # the callback may end rows (e.g. a stop string appeared)
                ends = torch.zeros(b, dtype=torch.long, device=device)
                extra = on_step(step, last.tolist(), was_active.tolist(), **scores) if on_step is not None else None
                if extra is not None or withdrawn is not None:
                    extra = extra if extra is not None else [False] * b
                    withdrawn = withdrawn if withdrawn is not None else [False] * b
                    ends = torch.tensor([int(bool(e) or bool(w)) for e, w in zip(extra, withdrawn)], device=device)
                # Only the serving rank has the callbacks: every rank follows its choice.
                active &= ~self._sync_tokens(ends).bool()
            elif withdrawn is not None:
                active &= ~torch.tensor([bool(w) for w in withdrawn], device=device)
            if params.top_p_decay > 0.0 and top_p > 0.0:
                top_p = top_p * params.top_p_decay
                if params.top_p_bound > 0.0:
                    top_p = max(top_p, params.top_p_bound)
            if last_step or (withdrawn is not None and all(withdrawn)) or all_stopped(active):
                break
            # No position exceeds longest + step, so longest + step + 1 slots cover them all.
            next_logits, greedy = self._decode(ctx, next_tokens, next_positions, longest + step + 1)  # [b, V], [b]
        return cur, top_steps

    # ------------------------------------------------------------------ beam search
    @torch.no_grad()
    def beam_search(self, prompt: str, tokens_to_generate: int, beam_width: int, stop_token: int = 50256,
                    length_penalty: float = 1.0, add_BOS: bool = False) -> BeamResult:
        return self.beam_search_tokens(self.tokenize_prompts([prompt], add_BOS)[0], tokens_to_generate,
                                       beam_width, stop_token, length_penalty)

    @torch.no_grad()
    def beam_search_tokens(self, prompt_tokens: Sequence[int], tokens_to_generate: int, beam_width: int,
                           stop_token: int = 50256, length_penalty: float = 1.0) -> BeamResult:
        """Beam search from one prompt. Each step extends every beam by every token, ranks the
        2 * beam_width best extensions by summed log-probability and keeps the first beam_width that
        do not end in stop_token; an extension ending in stop_token that ranks within the first
        beam_width is a finished hypothesis, scored sum / length ** length_penalty (length = all
        tokens, prompt included). The search ends when no running beam can beat the worst of
        beam_width finished ones; unfinished beams then compete on the same score."""
        if beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {beam_width}")
        if beam_width > self.max_batch_size:
            raise ValueError(f"beam_width {beam_width} exceeds max_batch_size {self.max_batch_size}")
        if tokens_to_generate < 1:
            raise ValueError("beam search needs tokens_to_generate >= 1")
        self.check_fits([prompt_tokens], tokens_to_generate)
        self.model.eval()
        device = self.device
        n = len(prompt_tokens)
        V = self.vocab_size
        ctx = self.context()
        prompt = torch.tensor(list(prompt_tokens), dtype=torch.long, device=device)
        tokens = prompt.expand(beam_width, n).clone()  # [bw, n]; grows by one column per step
        positions = torch.arange(n, device=device).expand(beam_width, n)
        logits = self._forward(ctx, tokens, positions, n)[:, -1]  # [bw, V]
        scores = torch.zeros(beam_width, device=device)
        finished: List[tuple] = []  # (normalized score, token list)

        def add(hyp: List[int], total: float):
            finished.append((total / (len(hyp) ** length_penalty), hyp))
            finished.sort(key=lambda x: -x[0])
            del finished[beam_width:]

        done = False
        for step in range(tokens_to_generate):
            lp = F.log_softmax(logits, dim=-1)  # [bw, V]
            if step == 0:
                flat = lp[0]  # all beams are the prompt: extend only the first
            else:
                flat = (scores[:, None] + lp).view(-1)  # [bw * V]
            best, idx = torch.topk(flat, min(2 * beam_width, flat.numel()))
            best, idx = self._sync_tokens(best), self._sync_tokens(idx)
            next_beams = []
            for rank, (score, index) in enumerate(zip(best.tolist(), idx.tolist())):
                beam, token = divmod(index, V)
                if token == stop_token:
                    if rank < beam_width:
                        add(tokens[beam].tolist() + [token], score)
                else:
                    next_beams.append((beam, token, score))
                if len(next_beams) == beam_width:
                    break
            cur_len = n + step + 1
            if len(finished) >= beam_width:
                best_running = max(s for _, _, s in next_beams) if next_beams else float("-inf")
                if finished[-1][0] >= best_running / (cur_len ** length_penalty):
                    done = True
            if done or not next_beams or step == tokens_to_generate - 1:
                if not done:
                    for beam, token, score in next_beams:
                        add(tokens[beam].tolist() + [token], score)
                break
            while len(next_beams) < beam_width:  # too few candidates (tiny vocabulary): repeat the last
                next_beams.append(next_beams[-1])
            beam_idx = torch.tensor([x[0] for x in next_beams], device=device)
            new = torch.tensor([x[1] for x in next_beams], device=device)
            scores = torch.tensor([x[2] for x in next_beams], device=device)
            tokens = torch.cat([tokens[beam_idx], new[:, None]], dim=1)  # [bw, cur_len]
            for cache in ctx.tensors():
                cache[:beam_width] = cache[beam_idx]  # reorder rows to follow their beams
            if getattr(ctx, "mamba_states", None) is not None:
                ctx.mamba_states.reorder(beam_idx)
            pos = torch.full((beam_width, 1), cur_len - 1, device=device, dtype=torch.long)
            logits = self._forward(ctx, new[:, None], pos, cur_len)[:, -1]  # [bw, V]
        out_tokens = [hyp for _, hyp in finished]
        return BeamResult(
            tokens=out_tokens,
            texts=[self.tokenizer.detokenize(t) for t in out_tokens],
            segments=[[self.tokenizer.detokenize([t]) for t in row] for row in out_tokens],
            scores=[s for s, _ in finished],
        )


def _defer_stop_check(device: torch.device, on_step: Optional[Callable], tp_size: int) -> bool:
    """Read the all-rows-stopped flag one step late (without stalling) on CUDA, unless an on_step
    callback reads every step's tokens anyway; on CPU reading it costs nothing. Never under
    tensor parallelism: the serving rank has the callback and the other ranks do not, and every
    rank must leave the loop after the same step (each decode step holds collectives)."""
    return device.type == "cuda" and on_step is None and tp_size == 1


class _AllStoppedCheck:
    """check(active [b]) -> True once every row has stopped.

    Exact (deferred=False): reads active.any() at once. Deferred: the step has written any(active)
    into next_flag() (pinned host memory on CUDA, see advance.py); the check records an event
    behind it and answers from the previous call's flag, waiting for that event only (the device
    has by then finished the previous step's bookkeeping, and the decode queued after it keeps it
    busy). So it answers one call late: after the step in which the last row stopped, one more
    step runs in which no row is active."""

    def __init__(self, device: torch.device, deferred: bool):
        self.deferred = deferred
        self.calls = 0
        if deferred:
            on_cuda = device.type == "cuda"
            self.flags = [torch.zeros((), dtype=torch.bool, pin_memory=on_cuda) for _ in range(2)]
            self.events = [torch.cuda.Event() for _ in range(2)] if on_cuda else None

    def next_flag(self) -> Optional[torch.Tensor]:
        """Deferred: the 0-dim bool (pinned host memory on CUDA) that the next call reads, for the
        device to write any(active) into; None when exact."""
        return self.flags[self.calls % 2] if self.deferred else None

    def __call__(self, active: torch.Tensor) -> bool:
        if not self.deferred:
            return not bool(active.any())
        slot = self.calls % 2
        if self.events is not None:
            self.events[slot].record()
        self.calls += 1
        if self.calls == 1:
            return False
        previous = 1 - slot
        if self.events is not None:
            self.events[previous].synchronize()
        return not bool(self.flags[previous])


def _top_logprobs_lists(top_steps, b: int) -> List[List[Dict[int, float]]]:
    """Per row, per step in which the row was active, {token id: log-probability} of the top n."""
    top: List[List[Dict[int, float]]] = [[] for _ in range(b)]
    if not top_steps:
        return top
    values = torch.stack([v for v, _, _ in top_steps]).tolist()  # [steps, b, n]
    ids = torch.stack([i for _, i, _ in top_steps]).tolist()  # [steps, b, n]
    active = torch.stack([a for _, _, a in top_steps]).tolist()  # [steps, b]
    for step_values, step_ids, step_active in zip(values, ids, active):
        for i in range(b):
            if step_active[i]:
                top[i].append(dict(zip(step_ids[i], step_values[i])))
    return top


class _DecodeGraph:
    """The decode step for a fixed batch size and attention length captured in a CUDA graph:
    static inputs tokens, positions [b, 1] (every position < kv_len), outputs logits [b, V] and their argmax [b]."""

    def __init__(self, engine: InferenceEngine, ctx: InferenceContext, kv_len: int, pool,
                 tokens: torch.Tensor, positions: torch.Tensor):
        device = engine.device
        batch = tokens.shape[0]
        self.kv_len = kv_len
        self.tokens, self.positions = tokens, positions  # [b, 1] each, shared by the graphs of this batch size
        # The warm-up and the capture run position 0 and write slot 0 of the cache; save and
        # restore the inputs (which may hold the next step's) and that slot around them.
        saved_inputs = (tokens.clone(), positions.clone())
        tokens.zero_()
        positions.zero_()
        saved = [t[:batch, :1].clone() for t in ctx.tensors()]
        states = getattr(ctx, "mamba_states", None)  # the Mamba layers' recurrent states advance too
        saved_states = [t[:batch].clone() for t in states.tensors()] if states is not None else []
        step = engine._step_function()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        # The warm-up compiles (decode_mode "compiled") and autotunes the GEMV, neither of which
        # may happen during the capture.
        with torch.cuda.stream(stream):
            for _ in range(2):
                step(ctx, self.tokens, self.positions, kv_len)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits, self.greedy = step(ctx, self.tokens, self.positions, kv_len)  # [b, V], [b]
        for t, kept in zip(ctx.tensors(), saved):
            t[:batch, :1].copy_(kept)
        if states is not None:
            for t, kept in zip(states.tensors(), saved_states):
                t[:batch].copy_(kept)
        tokens.copy_(saved_inputs[0])
        positions.copy_(saved_inputs[1])

    def run(self):
        """Replay on the inputs self.tokens, self.positions [b, 1] -> (logits [b, V], greedy tokens
        [b]): the graph's output buffers, overwritten by the next replay of any decode graph (the
        caller consumes them first, in stream order)."""
        self.graph.replay()
        return self.logits, self.greedy
