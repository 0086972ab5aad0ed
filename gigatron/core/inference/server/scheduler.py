"""The request queue: one worker thread owns the model and runs batches.

Requests are queued in arrival order. The worker takes the oldest one and adds every other queued
request with the same sampling parameters (`SamplingParams.batch_key`) while the prompts fit
max_batch_size, so concurrent requests share one generation. A request with more prompts than
max_batch_size runs alone, in consecutive batches; a request with a random seed runs alone (so the
same seed gives the same text whatever else is queued); beam search runs alone.

A job whose client went away is withdrawn (`Job.withdraw`): still queued, it never runs; running,
its rows end at the next decode step (the engine's `cancelled` callback, read on the host), and a
generation whose every row is withdrawn stops there, so the next request does not wait for it.
A beam search runs to its end.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
from typing import Callable, List, Optional

from gigatron.core.inference.engine import GenerationResult, SamplingParams

__all__ = ["Job", "Scheduler", "ContinuousScheduler"]


@dataclasses.dataclass
class Job:
    """prompt_tokens: token ids per prompt; on_step(step, tokens, active, offset) per sampled token
    for rows offset.. of this job (may return bools ending those rows; with wants_logprobs also the
    engine's log-probability keywords, sliced to the job's rows); beam: (width, stop_token,
    length_penalty); withdrawn: the client went away (see withdraw)."""
    prompt_tokens: List[List[int]]
    params: SamplingParams
    on_step: Optional[Callable] = None
    beam: Optional[tuple] = None
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    withdrawn: bool = False
    wants_logprobs: bool = False
    """on_step takes the engine's per-step log-probability keywords (engine.generate_tokens)."""

    def alone(self) -> bool:
        return self.beam is not None or self.params.random_seed >= 0

    def withdraw(self) -> None:
        """Nobody waits for the result any more: a queued job is dropped, a running one ends its
        rows at the next decode step."""
        self.withdrawn = True
        self.future.cancel()  # succeeds only while the job is still queued


def _merge(results: List[GenerationResult]) -> GenerationResult:
    def cat(name):
        values = [getattr(r, name) for r in results]
        return None if any(v is None for v in values) else [x for v in values for x in v]
    return GenerationResult(tokens=cat("tokens"), texts=cat("texts"), segments=cat("segments"),
                            logprobs=cat("logprobs"), prompt_lengths=cat("prompt_lengths"),
                            top_logprobs=cat("top_logprobs"), prompt_top_logprobs=cat("prompt_top_logprobs"))


class _QueueWorker:
    """The queue both schedulers share: submit appends a job and wakes the one worker thread, which
    runs the subclass's _work; close finishes the queued (and running) jobs, then stops the worker
    and the runner (followers leave their loop). A subclass defines _work and sets its own state
    before calling __init__, which starts the thread."""

    def __init__(self, runner, max_batch_size: int):
        self.runner = runner
        self.max_batch_size = int(max_batch_size)
        self._queue: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="generation-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        with self._cond:
            if self._closed:
                raise RuntimeError("the generation worker has stopped")
            self._queue.append(job)
            self._cond.notify()
        return job.future

    def close(self) -> None:
        """Finish the queued and running jobs, then stop the worker and the runner (followers leave
        their loop)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        self.runner.shutdown()


def _beam_search(runner, job: Job):
    width, stop_token, length_penalty = job.beam
    return runner.beam_search_tokens(job.prompt_tokens[0], job.params.tokens_to_generate, width, stop_token,
                                     length_penalty)


def _chunk_calls(job: Job, size: int):
    """For each batch of at most size of the job's prompts: (prompts, on_step, cancelled) for
    runner.generate_tokens, the job's on_step told the batch's row offset."""
    for lo in range(0, len(job.prompt_tokens), size):
        chunk = job.prompt_tokens[lo: lo + size]
        on_step = None
        if job.on_step is not None:
            # Streaming a request split into batches: rows are reported with their offset.
            def on_step(step, tokens, active, lo=lo, **scores):
                return job.on_step(step, tokens, active, offset=lo, **scores)
            on_step.wants_logprobs = job.wants_logprobs
        yield chunk, on_step, lambda size=len(chunk): [True] * size if job.withdrawn else None


class Scheduler(_QueueWorker):
    """Scheduler(runner, max_batch_size).submit(job) -> job.future (a GenerationResult or BeamResult)."""

    def __init__(self, runner, max_batch_size: int):
        self.batches_run = 0
        self.largest_batch = 0
        super().__init__(runner, max_batch_size)

    def _next_batch(self) -> Optional[List[Job]]:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            first = self._queue.popleft()
            batch = [first]
            if first.alone() or len(first.prompt_tokens) >= self.max_batch_size:
                return batch
            rows = len(first.prompt_tokens)
            key = first.params.batch_key()
            for job in list(self._queue):
                if job.alone() or job.params.batch_key() != key:
                    continue
                if rows + len(job.prompt_tokens) > self.max_batch_size:
                    continue
                self._queue.remove(job)
                batch.append(job)
                rows += len(job.prompt_tokens)
            return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                if batch[0].beam is not None:
                    batch[0].future.set_result(_beam_search(self.runner, batch[0]))
                elif len(batch) == 1 and len(batch[0].prompt_tokens) > self.max_batch_size:
                    self._run_in_chunks(batch[0])
                else:
                    self._run_together(batch)
            except BaseException as exc:  # every waiting request hears about the failure
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)

    def _run_together(self, batch: List[Job]) -> None:
        prompts = [p for job in batch for p in job.prompt_tokens]
        bounds, start = [], 0
        for job in batch:
            bounds.append((start, start + len(job.prompt_tokens)))
            start += len(job.prompt_tokens)
        def cancelled():
            if not any(job.withdrawn for job in batch):
                return None
            return [job.withdrawn for job, (lo, hi) in zip(batch, bounds) for _ in range(hi - lo)]

        on_step = None
        if any(job.on_step is not None for job in batch):
            def on_step(step, tokens, active, **scores):
                stop = [False] * len(tokens)
                for job, (lo, hi) in zip(batch, bounds):
                    if job.on_step is None:
                        continue
                    mine = ({k: None if v is None else v[lo:hi] for k, v in scores.items()}
                            if job.wants_logprobs else {})
                    extra = job.on_step(step, tokens[lo:hi], active[lo:hi], offset=0, **mine)
                    if extra is not None:
                        stop[lo:hi] = list(extra)
                return stop
            on_step.wants_logprobs = any(job.wants_logprobs for job in batch)
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(prompts))
        # Same batch key; the outputs asked for are the union of what the jobs want.
        params = dataclasses.replace(batch[0].params,
                                     return_log_probs=any(job.params.return_log_probs for job in batch),
                                     top_logprobs=max(job.params.top_logprobs for job in batch),
                                     prompt_top_logprobs=any(job.params.prompt_top_logprobs for job in batch))
        result = self.runner.generate_tokens(prompts, params, on_step, cancelled)
        for job, (lo, hi) in zip(batch, bounds):
            job.future.set_result(_slice(result, lo, hi))

    def _run_in_chunks(self, job: Job) -> None:
        results = []
        for chunk, on_step, cancelled in _chunk_calls(job, self.max_batch_size):
            if job.withdrawn:
                job.future.set_exception(concurrent.futures.CancelledError("the client went away"))
                return
            self.batches_run += 1
            self.largest_batch = max(self.largest_batch, len(chunk))
            results.append(self.runner.generate_tokens(chunk, job.params, on_step, cancelled))
        job.future.set_result(_merge(results))


def _slice(result: GenerationResult, lo: int, hi: int) -> GenerationResult:
    def part(value):
        return None if value is None else value[lo:hi]
    return GenerationResult(tokens=result.tokens[lo:hi], texts=result.texts[lo:hi], segments=result.segments[lo:hi],
                            logprobs=part(result.logprobs), prompt_lengths=result.prompt_lengths[lo:hi],
                            top_logprobs=part(result.top_logprobs),
                            prompt_top_logprobs=part(result.prompt_top_logprobs))


class ContinuousScheduler(_QueueWorker):
    """ContinuousScheduler(runner, max_requests, prefill_chunk, num_cuda_graphs=None,
    max_step_tokens=None).submit(job) -> job.future: the rows
    of every request join one running batch (gigatron.core.inference.continuous) as slots free up
    and leave it when they end, so a short request does not wait for a long one. Jobs the
    continuous batch does not run (beam search, scoring with max_tokens=0, Megatron's newline rules
    and top_p decay) run between two of its steps in the static engine, with its own cache.
    One process only (tensor parallelism keeps the static Scheduler)."""

    def __init__(self, runner, max_requests: int, prefill_chunk: int = 256, num_cuda_graphs: Optional[int] = None,
                 max_step_tokens: Optional[int] = None):
        from gigatron.core.inference.continuous import ContinuousBatcher, step_buckets

        buckets = step_buckets(max_requests, num_cuda_graphs) if num_cuda_graphs is not None else None
        self.batcher = ContinuousBatcher(runner.engine, max_requests, prefill_chunk, graph_buckets=buckets,
                                         max_step_tokens=max_step_tokens)
        super().__init__(runner, max_requests)

    @property
    def batches_run(self) -> int:
        return self.batcher.steps

    @property
    def largest_batch(self) -> int:
        return self.batcher.largest_batch

    def _work(self) -> None:
        from gigatron.core.inference.continuous import continuous_capable

        running: List[Job] = []
        while True:
            with self._cond:
                while not self._queue and not self.batcher.busy() and not self._closed:
                    self._cond.wait()
                if self._closed and not self._queue and not self.batcher.busy():
                    return
                arrived = list(self._queue)
                self._queue.clear()
            for job in arrived:
                if not job.future.set_running_or_notify_cancel():
                    continue  # withdrawn while queued
                if job.beam is not None or job.params.tokens_to_generate == 0 or not continuous_capable(job.params):
                    self._run_static(job)
                else:
                    self._admit(job, running)
            if not self.batcher.busy():
                continue
            try:
                self.batcher.step()
            except BaseException as exc:  # every request in the batch hears about the failure
                for job in running:
                    if not job.future.done():
                        job.future.set_exception(exc)
                running.clear()
                self.batcher.clear()
            running[:] = [job for job in running if not job.future.done()]

    def _run_static(self, job: Job) -> None:
        try:
            if job.beam is not None:
                job.future.set_result(_beam_search(self.runner, job))
                return
            results = [self.runner.generate_tokens(chunk, job.params, on_step, cancelled)
                       for chunk, on_step, cancelled in _chunk_calls(job, self.runner.engine.max_batch_size)]
            job.future.set_result(_merge(results))
        except BaseException as exc:
            job.future.set_exception(exc)

    def _admit(self, job: Job, running: List[Job]) -> None:
        from gigatron.core.inference.continuous import Sequence

        params = job.params
        rows = len(job.prompt_tokens)
        seqs: List[Sequence] = []
        finished = [0]

        def on_done(seq, job=job):
            finished[0] += 1
            if finished[0] == rows and not job.future.done():
                job.future.set_result(_sequences_result(self.runner.engine.tokenizer, seqs, params))

        for i, prompt in enumerate(job.prompt_tokens):
            on_token = None
            if job.on_step is not None:
                def on_token(token, logprob, top, prompt_scores, i=i, seq_list=seqs):
                    scores = {}
                    if job.wants_logprobs:
                        scores = {"logprobs": [logprob], "top_logprobs": None if top is None else [top]}
                        if prompt_scores is not None:
                            scores["prompt_logprobs"] = [prompt_scores[0]]
                            scores["prompt_top_logprobs"] = None if prompt_scores[1] is None else [prompt_scores[1]]
                    stop = job.on_step(len(seq_list[i].generated) - 1, [token], [True], offset=i, **scores)
                    return bool(stop and stop[0])
            seqs.append(Sequence(list(prompt), params, seed=(params.random_seed + i) % 2 ** 63 if params.random_seed >= 0 else -1,
                                 on_token=on_token, withdrawn=lambda: job.withdrawn, on_done=on_done))
        added = []
        try:
            for seq in seqs:
                self.batcher.add(seq)
                added.append(seq)
        except ValueError as exc:  # a row that can never fit: the request is refused before it runs
            self.batcher.waiting = collections.deque(s for s in self.batcher.waiting
                                                     if not any(s is a for a in added))
            job.future.set_exception(exc)
            return
        running.append(job)


def _sequences_result(tokenizer, seqs, params: SamplingParams) -> GenerationResult:
    tokens = [seq.prompt + seq.generated for seq in seqs]
    return GenerationResult(
        tokens=tokens, texts=[tokenizer.detokenize(t) for t in tokens],
        segments=[[tokenizer.detokenize([t]) for t in row] for row in tokens],
        logprobs=[seq.prompt_logprobs + seq.logprobs for seq in seqs] if params.return_log_probs else None,
        prompt_lengths=[len(seq.prompt) for seq in seqs],
        top_logprobs=[seq.top_logprobs for seq in seqs] if params.top_logprobs > 0 else None,
        prompt_top_logprobs=[seq.prompt_top_logprobs for seq in seqs]
        if params.prompt_top_logprobs and params.top_logprobs > 0 else None)
