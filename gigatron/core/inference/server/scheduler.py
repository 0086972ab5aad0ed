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

__all__ = ["Job", "Scheduler"]


@dataclasses.dataclass
class Job:
    """prompt_tokens: token ids per prompt; on_step(step, tokens, active, offset) per sampled token
    for rows offset.. of this job (may return bools ending those rows); beam: (width, stop_token,
    length_penalty); withdrawn: the client went away (see withdraw)."""
    prompt_tokens: List[List[int]]
    params: SamplingParams
    on_step: Optional[Callable] = None
    beam: Optional[tuple] = None
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    withdrawn: bool = False

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
                            top_logprobs=cat("top_logprobs"))


class Scheduler:
    """Scheduler(runner, max_batch_size).submit(job) -> job.future (a GenerationResult or BeamResult)."""

    def __init__(self, runner, max_batch_size: int):
        self.runner = runner
        self.max_batch_size = int(max_batch_size)
        self._queue: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.batches_run = 0
        self.largest_batch = 0
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
        """Finish the queued jobs, then stop the worker and the runner (followers leave their loop)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        self.runner.shutdown()

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
                    job = batch[0]
                    width, stop_token, length_penalty = job.beam
                    result = self.runner.beam_search_tokens(job.prompt_tokens[0], job.params.tokens_to_generate,
                                                            width, stop_token, length_penalty)
                    job.future.set_result(result)
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
            def on_step(step, tokens, active):
                stop = [False] * len(tokens)
                for job, (lo, hi) in zip(batch, bounds):
                    if job.on_step is None:
                        continue
                    extra = job.on_step(step, tokens[lo:hi], active[lo:hi], offset=0)
                    if extra is not None:
                        stop[lo:hi] = list(extra)
                return stop
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(prompts))
        # Same batch key; the outputs asked for are the union of what the jobs want.
        params = dataclasses.replace(batch[0].params,
                                     return_log_probs=any(job.params.return_log_probs for job in batch),
                                     top_logprobs=max(job.params.top_logprobs for job in batch))
        result = self.runner.generate_tokens(prompts, params, on_step, cancelled)
        for job, (lo, hi) in zip(batch, bounds):
            job.future.set_result(_slice(result, lo, hi))

    def _run_in_chunks(self, job: Job) -> None:
        results = []
        n = self.max_batch_size
        for lo in range(0, len(job.prompt_tokens), n):
            if job.withdrawn:
                job.future.set_exception(concurrent.futures.CancelledError("the client went away"))
                return
            chunk = job.prompt_tokens[lo: lo + n]
            on_step = None
            if job.on_step is not None:
                # Streaming a request split into batches: rows are reported with their offset.
                def on_step(step, tokens, active, lo=lo):
                    return job.on_step(step, tokens, active, offset=lo)
            self.batches_run += 1
            self.largest_batch = max(self.largest_batch, len(chunk))
            results.append(self.runner.generate_tokens(chunk, job.params, on_step,
                                                       lambda size=len(chunk): [True] * size if job.withdrawn else None))
        job.future.set_result(_merge(results))


def _slice(result: GenerationResult, lo: int, hi: int) -> GenerationResult:
    def part(value):
        return None if value is None else value[lo:hi]
    return GenerationResult(tokens=result.tokens[lo:hi], texts=result.texts[lo:hi], segments=result.segments[lo:hi],
                            logprobs=part(result.logprobs), prompt_lengths=result.prompt_lengths[lo:hi],
                            top_logprobs=part(result.top_logprobs))
