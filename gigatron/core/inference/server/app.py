"""The HTTP server: Megatron's `PUT /api`, OpenAI-style `POST /v1/completions`, `GET /health`.

    app = build_app(runner, tokenizer, max_batch_size=8, max_sequence_length=2048,
                    max_request_bytes=DEFAULT_MAX_REQUEST_BYTES)
    serve(app, host="127.0.0.1", port=5000)          # blocks; binds to localhost unless told

The app owns a Scheduler (one worker thread runs the model); handlers read the body (HTTP 413 above
max_request_bytes, refused from Content-Length before reading where the client sends one),
validate the request (HTTP 400 {"error", "field"} on anything wrong, before any model work),
tokenize, check that the prompts plus the tokens to generate fit the model, queue the job and
wait for its result. Parsing, logging and tokenizing a body run in a worker thread, never on the
event loop, so a large request does not hold up /health or other clients. A client that
disconnects before its answer withdraws its job (scheduler.Job.withdraw): queued, it never runs;
running, its rows end at the next decode step.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import threading
import time
import uuid
from typing import Any, List

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gigatron.core.inference.engine import PromptTooLongError
from gigatron.core.inference.server.scheduler import Job, Scheduler
from gigatron.core.inference.server.validation import (
    DEFAULT_MAX_REQUEST_BYTES,
    RequestError,
    ServerDefaults,
    parse_api_request,
    parse_completion_request,
)

__all__ = ["build_app", "serve", "CompletionTracker", "DEFAULT_MAX_REQUEST_BYTES"]

log = logging.getLogger("gigatron.inference.server")

_DISCONNECTED = object()


def _error(exc: RequestError):
    return JSONResponse(status_code=exc.status, content={"error": exc.message, "field": exc.field})


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body; RequestError (HTTP 413) above `limit` bytes, checked from Content-Length
    before anything is read and while the body streams in (chunked uploads)."""
    too_large = RequestError("body", f"the request body is larger than the server's limit of {limit} bytes "
                                     "(--max-request-bytes); send fewer or shorter prompts", status=413)
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise RequestError("body", f"Content-Length {length!r} is not a number of bytes")
        if int(length) > limit:
            raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise RequestError("body", "the request body nests JSON arrays/objects too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError("body", f"the request body is not valid JSON: {exc}") from None


class _LoopQueue:
    """Events the generation thread puts and the event loop reads (no thread waits on them)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the server has stopped: nobody reads any more
            pass


async def _until_disconnected(request: Request) -> None:
    """Returns once the client has gone (the body has been read, so the next ASGI message is the
    disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # a server that repeats empty body messages: do not spin


class CompletionTracker:
    """Follows the generated tokens of a completion's rows: ends a row at end-of-document or at a
    stop string, and yields the text that is safe to stream (never a partial character, never the
    start of a possible stop string). The same object finalizes streamed and non-streamed answers,
    so both give the same text."""

    def __init__(self, tokenizer, num_rows: int, stop: List[str], events=None):
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
              defaults: ServerDefaults = ServerDefaults(), model_name: str = "gigatron",
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
    """The FastAPI app; `runner` is a LocalRunner or LeaderRunner (gigatron.core.inference.broadcast)."""
    if max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes must be >= 1, got {max_request_bytes}")
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
                try:
                    ids = list(tokenizer.tokenize(prompt)) if prompt else []
                except Exception as exc:  # noqa: BLE001 - text the tokenizer cannot encode is bad input
                    raise RequestError(field, f"prompt {i} cannot be tokenized: {type(exc).__name__}: {exc}") from None
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

    async def wait(job: Job, request: Request):
        """The job's result, or _DISCONNECTED once the client has gone (the job is then withdrawn)."""
        result = asyncio.wrap_future(scheduler.submit(job))
        gone = asyncio.ensure_future(_until_disconnected(request))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not result.done():  # the client went away (or this handler was cancelled)
                job.withdraw()
        if not result.done():
            result.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody reads it
            log.info("client %s went away; its generation was withdrawn",
                     request.client.host if request.client else "?")
            return _DISCONNECTED
        return result.result()

    async def read_request(request: Request, parse):
        """Body -> (the parsed request, its prompt token ids), off the event loop."""
        body = await _read_body(request, max_request_bytes)

        def prepare():
            payload = _parse_json(body)
            req = parse(payload, defaults)
            if parse is parse_api_request and not req.no_log:
                try:
                    text = json.dumps(payload)[:2000]
                except (RecursionError, ValueError):
                    text = "(a body that cannot be shown)"
                log.info("request from %s at %s: %s", request.client.host if request.client else "?",
                         datetime.datetime.now().isoformat(), text)
            add_BOS = req.params.add_BOS if parse is parse_api_request else False
            field = "prompts" if parse is parse_api_request else "prompt"
            return req, tokenize(req.prompts, add_BOS, field)

        return await asyncio.to_thread(prepare)

    @app.get("/health")
    @app.get("/v1/health")
    async def health():
        return {"status": "ok", "max_batch_size": max_batch_size, "max_sequence_length": max_sequence_length}

    @app.put("/api")
    async def api(request: Request):
        req, prompt_tokens = await read_request(request, parse_api_request)
        if req.params.top_k > engine.vocab_size:
            raise RequestError("top_k", f"top_k ({req.params.top_k}) is larger than the vocabulary ({engine.vocab_size})")
        check_fits(prompt_tokens, req.params.tokens_to_generate, "tokens_to_generate", "prompts")
        if req.beam_width is not None:
            if req.beam_width > max_batch_size:
                raise RequestError("beam_width", f"beam_width {req.beam_width} exceeds the server's "
                                                 f"--max-batch-size {max_batch_size}")
            result = await wait(Job(prompt_tokens, req.params,
                                    beam=(req.beam_width, req.stop_token, req.length_penalty)), request)
            if result is _DISCONNECTED:
                return Response(status_code=499)
            return {"text": result.texts, "segments": result.segments, "scores": result.scores}
        try:
            result = await wait(Job(prompt_tokens, req.params), request)
        except ValueError as exc:
            return JSONResponse(status_code=400, content={"error": str(exc), "field": None})
        if result is _DISCONNECTED:
            return Response(status_code=499)
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
        req, prompt_tokens = await read_request(request, parse_completion_request)
        if req.params.top_k > engine.vocab_size:
            raise RequestError("top_k", f"top_k ({req.params.top_k}) is larger than the vocabulary ({engine.vocab_size})")
        check_fits(prompt_tokens, req.params.tokens_to_generate, "max_tokens", "prompt")
        created = int(time.time())
        ident = f"cmpl-{uuid.uuid4().hex}"
        events = _LoopQueue(asyncio.get_running_loop()) if req.stream else None
        tracker = CompletionTracker(tokenizer, len(prompt_tokens), req.stop, events)
        job = Job(prompt_tokens, req.params, on_step=tracker.on_step)

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
                result = await wait(job, request)
            except ValueError as exc:
                return JSONResponse(status_code=400, content={"error": str(exc), "field": None})
            if result is _DISCONNECTED:
                return Response(status_code=499)
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

        future = scheduler.submit(job)
        future.add_done_callback(on_done)

        def chunk(choices):
            return "data: " + json.dumps({"id": ident, "object": "text_completion", "created": created,
                                          "model": model_name, "choices": choices}) + "\n\n"

        async def next_event():
            """The next event of the generation; None once the client has gone."""
            while True:
                try:
                    return await asyncio.wait_for(events.queue.get(), 0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return None

        async def stream():
            finished = False
            try:
                if req.echo:
                    for row, (prompt, ids) in enumerate(zip(req.prompts, prompt_tokens)):
                        text = prompt if isinstance(prompt, str) else tokenizer.detokenize(ids)
                        yield chunk([{"index": row, "text": text, "logprobs": None, "finish_reason": None}])
                while True:
                    item = await next_event()
                    if item is None:  # the client went away
                        return
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
                finished = True
                yield "data: [DONE]\n\n"
            finally:  # the client went away (the response was cancelled or closed): stop generating
                if not finished:
                    job.withdraw()

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
