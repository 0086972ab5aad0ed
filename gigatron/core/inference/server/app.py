"""The HTTP server: Megatron's `PUT /api`, OpenAI-style `POST /v1/completions`, `GET /health`.

    app = build_app(runner, tokenizer, max_batch_size=8, max_sequence_length=2048)
    serve(app, host="127.0.0.1", port=5000)          # blocks; binds to localhost unless told

The app owns a Scheduler (one worker thread runs the model); handlers validate the request
(HTTP 400 {"error", "field"} on anything wrong, before any model work), tokenize, check that the
prompts plus the tokens to generate fit the model, queue the job and wait for its result.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import queue
import threading
import time
import uuid
from typing import Any, List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from gigatron.core.inference.engine import PromptTooLongError
from gigatron.core.inference.server.scheduler import Job, Scheduler
from gigatron.core.inference.server.validation import (
    RequestError,
    ServerDefaults,
    parse_api_request,
    parse_completion_request,
)

__all__ = ["build_app", "serve", "CompletionTracker"]

log = logging.getLogger("gigatron.inference.server")


def _error(exc: RequestError):
    return JSONResponse(status_code=400, content={"error": exc.message, "field": exc.field})


async def _json_body(request) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError("body", f"the request body is not valid JSON: {exc}") from None


class CompletionTracker:
    """Follows the generated tokens of a completion's rows: ends a row at end-of-document or at a
    stop string, and yields the text that is safe to stream (never a partial character, never the
    start of a possible stop string). The same object finalizes streamed and non-streamed answers,
    so both give the same text."""

    def __init__(self, tokenizer, num_rows: int, stop: List[str], events: Optional[queue.Queue] = None):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids = [[] for _ in range(num_rows)]
        self.finish = [None] * num_rows  # "stop" or None (still running / "length" at the end)
        self.emitted = [0] * num_rows
        self.events = events
        self.lock = threading.Lock()

    def text(self, row: int) -> str:
        """Generated text of a row, cut before its first stop string."""
        text = self.tokenizer.detokenize(self.ids[row]) if self.ids[row] else ""
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        return text if cut < 0 else text[:cut]

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

    def on_step(self, step, tokens, active, offset=0):
        stop_rows = [False] * len(tokens)
        with self.lock:
            for i, (token, on) in enumerate(zip(tokens, active)):
                row = offset + i
                if not on or self.finish[row] is not None:
                    continue
                if token == self.tokenizer.eod:
                    self.finish[row] = "stop"
                    stop_rows[i] = True
                else:
                    self.ids[row].append(token)
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
        if delta or finish_reason:
            self.emitted[row] = len(safe)
            self.events.put((row, delta, finish_reason))

    def finalize(self, row: int, finish_reason: str):
        with self.lock:
            if self.finish[row] is None:
                self.finish[row] = finish_reason
            if self.events is not None:
                self._emit(row, self.finish[row])


def build_app(runner, tokenizer, *, max_batch_size: int, max_sequence_length: int,
              defaults: ServerDefaults = ServerDefaults(), model_name: str = "gigatron"):
    """The FastAPI app; `runner` is a LocalRunner or LeaderRunner (gigatron.core.inference.broadcast)."""
    scheduler = Scheduler(runner, max_batch_size)
    app = FastAPI(title="Gigatron text generation")
    app.state.scheduler = scheduler
    engine = runner.engine

    @app.exception_handler(RequestError)
    async def _on_request_error(request, exc: RequestError):
        return _error(exc)

    def tokenize(prompts, add_BOS: bool, field: str):
        out = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, list):
                bad = [t for t in prompt if not 0 <= t < engine.vocab_size]
                if bad:
                    raise RequestError(field, f"prompt {i} has token ids outside the vocabulary [0, {engine.vocab_size}): {bad[:5]}")
                ids = list(prompt)
            else:
                ids = list(tokenizer.tokenize(prompt)) if prompt else []
            if add_BOS:
                ids = [tokenizer.eod] + ids
            if not ids:
                raise RequestError(field, "Empty prompts require add_BOS=true")
            out.append(ids)
        return out

    def check_fits(prompt_tokens, tokens_to_generate: int, tokens_field: str, prompt_field: str):
        longest = max(len(p) for p in prompt_tokens)
        if longest > max_sequence_length:
            raise RequestError(prompt_field, f"a prompt has {longest} tokens but the model holds "
                                             f"{max_sequence_length}; shorten the prompt")
        try:
            engine.check_fits(prompt_tokens, tokens_to_generate)
        except PromptTooLongError as exc:
            raise RequestError(tokens_field, str(exc)) from None

    async def wait(job: Job):
        return await asyncio.wrap_future(scheduler.submit(job))

    @app.get("/health")
    @app.get("/v1/health")
    async def health():
        return {"status": "ok", "max_batch_size": max_batch_size, "max_sequence_length": max_sequence_length}

    @app.put("/api")
    async def api(request: Request):
        payload = await _json_body(request)
        req = parse_api_request(payload, defaults)
        if not req.no_log:
            log.info("request from %s at %s: %s", request.client.host if request.client else "?",
                     datetime.datetime.now().isoformat(), json.dumps(payload)[:2000])
        prompt_tokens = tokenize(req.prompts, req.params.add_BOS, "prompts")
        check_fits(prompt_tokens, req.params.tokens_to_generate, "tokens_to_generate", "prompts")
        if req.beam_width is not None:
            if req.beam_width > max_batch_size:
                raise RequestError("beam_width", f"beam_width {req.beam_width} exceeds the server's "
                                                 f"--max-batch-size {max_batch_size}")
            result = await wait(Job(prompt_tokens, req.params,
                                    beam=(req.beam_width, req.stop_token, req.length_penalty)))
            return {"text": result.texts, "segments": result.segments, "scores": result.scores}
        try:
            result = await wait(Job(prompt_tokens, req.params))
        except ValueError as exc:
            return JSONResponse(status_code=400, content={"error": str(exc), "field": None})
        return {"text": result.texts, "segments": result.segments,
                "logprobs": result.logprobs if req.params.return_log_probs else None}

    def completion_choice(req, row, prompt, prompt_ids, result, tracker, index):
        gen_text = tracker.text(row)
        text = (prompt if isinstance(prompt, str) else tokenizer.detokenize(prompt_ids)) if req.echo else ""
        text += gen_text
        logprobs = None
        if req.logprobs is not None:
            n_prompt = result.prompt_lengths[row]
            all_ids = result.tokens[row]
            gen_ids = tracker.ids[row]
            segs = [tokenizer.detokenize([t]) for t in gen_ids]
            # Keep the generated tokens that make up gen_text (a stop string cuts the rest).
            kept, length = 0, 0
            while kept < len(segs) and length < len(gen_text):
                length += len(segs[kept])
                kept += 1
            lps = result.logprobs[row] if result.logprobs is not None else []
            gen_lps = lps[n_prompt - 1: n_prompt - 1 + kept]
            tops = (result.top_logprobs[row] if result.top_logprobs is not None else [])[:kept]
            tokens = segs[:kept]
            token_logprobs = list(gen_lps)
            top = [{tokenizer.detokenize([t]): lp for t, lp in sorted(d.items(), key=lambda x: -x[1])[: req.logprobs]}
                   for d in tops]
            if req.echo:
                prompt_segs = [tokenizer.detokenize([t]) for t in all_ids[:n_prompt]]
                tokens = prompt_segs + tokens
                token_logprobs = [None] + list(lps[: n_prompt - 1]) + token_logprobs
                top = [None] * n_prompt + top
            offsets, pos = [], 0
            for t in tokens:
                offsets.append(pos)
                pos += len(t)
            logprobs = {"tokens": tokens, "token_logprobs": token_logprobs,
                        "top_logprobs": top if req.logprobs else None, "text_offset": offsets}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": tracker.finish[row] or "length"}

    @app.post("/v1/completions")
    @app.post("/completions")
    async def completions(request: Request):
        payload = await _json_body(request)
        req = parse_completion_request(payload, defaults)
        prompt_tokens = tokenize(req.prompts, False, "prompt")
        check_fits(prompt_tokens, req.params.tokens_to_generate, "max_tokens", "prompt")
        created = int(time.time())
        ident = f"cmpl-{uuid.uuid4().hex}"
        events = queue.Queue() if req.stream else None
        tracker = CompletionTracker(tokenizer, len(prompt_tokens), req.stop, events)
        job = Job(prompt_tokens, req.params, on_step=tracker.on_step)
        future = scheduler.submit(job)

        def finalize(result):
            choices = []
            for row, (prompt, ids) in enumerate(zip(req.prompts, prompt_tokens)):
                tracker.finalize(row, "length")
                choices.append(completion_choice(req, row, prompt, ids, result, tracker, row))
            completion_tokens = sum(len(ids) for ids in tracker.ids) + sum(
                1 for r in tracker.finish if r == "stop")
            usage = {"prompt_tokens": sum(len(p) for p in prompt_tokens), "completion_tokens": completion_tokens,
                     "total_tokens": sum(len(p) for p in prompt_tokens) + completion_tokens}
            return choices, usage

        if not req.stream:
            try:
                result = await asyncio.wrap_future(future)
            except ValueError as exc:
                return JSONResponse(status_code=400, content={"error": str(exc), "field": None})
            choices, usage = finalize(result)
            return {"id": ident, "object": "text_completion", "created": created, "model": model_name,
                    "choices": choices, "usage": usage}

        done = object()

        def on_done(fut):
            try:
                result = fut.result()
                choices, _ = finalize(result)
                events.put(("final", choices))
            except BaseException as exc:  # reported to the client inside the stream
                events.put(("error", str(exc)))
            events.put(done)

        future.add_done_callback(on_done)

        def chunk(choices):
            return "data: " + json.dumps({"id": ident, "object": "text_completion", "created": created,
                                          "model": model_name, "choices": choices}) + "\n\n"

        def stream():
            if req.echo:
                for row, (prompt, ids) in enumerate(zip(req.prompts, prompt_tokens)):
                    text = prompt if isinstance(prompt, str) else tokenizer.detokenize(ids)
                    yield chunk([{"index": row, "text": text, "logprobs": None, "finish_reason": None}])
            while True:
                item = events.get()
                if item is done:
                    break
                if item[0] == "final":
                    if req.logprobs is not None:  # the log-probabilities come with the last chunk
                        yield chunk([{"index": c["index"], "text": "", "logprobs": c["logprobs"],
                                      "finish_reason": c["finish_reason"]} for c in item[1]])
                    continue
                if item[0] == "error":
                    yield "data: " + json.dumps({"error": item[1]}) + "\n\n"
                    continue
                row, delta, reason = item
                if req.logprobs is not None:
                    reason = None  # the finish reason comes with the log-probabilities chunk
                if delta or reason:
                    yield chunk([{"index": row, "text": delta, "logprobs": None, "finish_reason": reason}])
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def serve(app, host: str = "127.0.0.1", port: int = 5000, log_level: str = "info") -> None:
    """Run the app with uvicorn (blocks until the server stops), then stop the generation worker
    (which releases the other ranks of a tensor-parallel run)."""
    import uvicorn
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        app.state.scheduler.close()
