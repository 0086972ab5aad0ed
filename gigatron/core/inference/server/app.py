"""The HTTP server: Megatron's `PUT /api`; OpenAI's `POST /v1/completions`, `POST /v1/chat/completions`
and `GET /v1/models`; `GET /tokenizer_info`, `POST /tokenize` and `POST /detokenize` (what
lm-evaluation-harness's remote tokenizer backend reads); `GET /health`.

    app = build_app(runner, tokenizer, max_batch_size=8, max_sequence_length=2048,
                    max_request_bytes=DEFAULT_MAX_REQUEST_BYTES, model_name="gigatron",
                    chat_template=None, dynamic_batching=False)
    serve(app, host="127.0.0.1", port=5000)          # blocks; binds to localhost unless told

The app owns a scheduler (one worker thread runs the model: whole batches, or with
dynamic_batching one continuous batch); handlers read the body (HTTP 413 above max_request_bytes,
refused from Content-Length before reading where the client sends one), validate the request
(HTTP 400 naming the field, before any model work: `{"error", "field"}` on /api, OpenAI's
`{"error": {"message", "type", "param", "code"}}` elsewhere), tokenize, check that the prompts plus
the tokens to generate fit the model, queue the job and wait for its result. Parsing, logging and
tokenizing a body run in a worker thread, never on the event loop, so a large request does not
hold up /health or other clients. A client that disconnects before its answer withdraws its job
(scheduler.Job.withdraw): queued, it never runs; running, its rows end at the next decode step.
What the OpenAI routes answer is built by server/completions.py (CompletionTracker).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
import re
import time
import uuid
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gigatron.core.inference.engine import PromptTooLongError
from gigatron.core.inference.server.chat import ChatTemplate, ChatTemplateError
from gigatron.core.inference.server.completions import (
    CompletionTracker,
    chat_logprobs,
    completion_logprobs,
    json_logprob,
)
from gigatron.core.inference.server.scheduler import ContinuousScheduler, Job, Scheduler
from gigatron.core.inference.server.validation import (
    DEFAULT_MAX_REQUEST_BYTES,
    RequestError,
    ServerDefaults,
    parse_api_request,
    parse_chat_request,
    parse_completion_request,
)

__all__ = ["build_app", "serve", "CompletionTracker", "DEFAULT_MAX_REQUEST_BYTES"]

log = logging.getLogger("gigatron.inference.server")

_DISCONNECTED = object()


def _error(exc: RequestError, openai: bool = True):
    """The error response: OpenAI's {"error": {"message", "type", "param", "code"}} on the OpenAI
    routes, Megatron-style {"error": message, "field": field} on PUT /api."""
    if not openai:
        return JSONResponse(status_code=exc.status, content={"error": exc.message, "field": exc.field})
    return JSONResponse(status_code=exc.status, content=openai_error_body(exc.message, exc.status, exc.field,
                                                                          exc.code))


def openai_error_body(message: str, status: int, param=None, code=None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _is_megatron_route(request: Request) -> bool:
    return request.url.path.rstrip("/") == "/api"


def _join(first: dict, second: dict) -> dict:
    """Two /v1/completions logprobs blocks, one after the other."""
    return {key: None if first[key] is None or second[key] is None else first[key] + second[key] for key in first}


def _special_text(tokenizer, name: str) -> str:
    """The text of the tokenizer's bos/eod token for a chat template ("" where it has none)."""
    try:
        token = getattr(tokenizer, name)
        return tokenizer.detokenize([token]) if isinstance(token, int) and token >= 0 else ""
    except Exception:  # noqa: BLE001 - a tokenizer without that token
        return ""


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


# Deepest JSON nesting a request may have (Python's default recursion limit). Checked before
# parsing, because json.loads's own limit follows sys.getrecursionlimit(), which libraries in the
# same process (torch.compile among them) raise.
MAX_JSON_DEPTH = 1000
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def _json_depth(body: bytes) -> int:
    """The deepest nesting of arrays/objects in `body` (brackets inside strings not counted)."""
    raw = np.frombuffer(_JSON_STRING.sub(b'""', body), dtype=np.uint8)
    steps = np.zeros(raw.shape, dtype=np.int32)
    steps[(raw == ord("[")) | (raw == ord("{"))] = 1
    steps[(raw == ord("]")) | (raw == ord("}"))] = -1
    return int(np.cumsum(steps).max(initial=0))


def _parse_json(body: bytes) -> Any:
    try:
        if _json_depth(body) > MAX_JSON_DEPTH:
            raise RecursionError
        return json.loads(body)
    except RecursionError:
        raise RequestError("body", f"the request body nests JSON arrays/objects more than {MAX_JSON_DEPTH} "
                                   "deep") from None
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


def build_app(runner, tokenizer, *, max_batch_size: int, max_sequence_length: int,
              defaults: ServerDefaults = ServerDefaults(), model_name: str = "gigatron",
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, chat_template: Optional[str] = None,
              dynamic_batching: bool = False, max_requests: Optional[int] = None, prefill_chunk: int = 256,
              max_tokens_to_oom: Optional[int] = None, num_cuda_graphs: Optional[int] = None,
              max_step_tokens: Optional[int] = None):
    """The FastAPI app; `runner` is a LocalRunner or LeaderRunner (gigatron.core.inference.broadcast).
    model_name: the id of GET /v1/models (a request naming another model gets 404); chat_template:
    the Jinja chat template of /v1/chat/completions (server/chat.py; None: that route answers 400).
    dynamic_batching: requests join and leave one running batch at every step (ContinuousScheduler,
    max_requests slots, default max_batch_size; prompts read prefill_chunk tokens a step, and a
    step holds at most max_step_tokens tokens; on a GPU its decode step is captured in CUDA graphs
    of num_cuda_graphs batch sizes, default 1, 2, 4, ... max_requests);
    otherwise compatible requests are batched whole (Scheduler), and a request whose rows (up to
    max_batch_size) times its longest prompt plus the tokens to generate exceed max_tokens_to_oom
    is refused with 400 (Megatron's --max-tokens-to-oom; continuous batching queues instead)."""
    if max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes must be >= 1, got {max_request_bytes}")
    if max_tokens_to_oom is not None and max_tokens_to_oom < 1:
        raise ValueError(f"--max-tokens-to-oom must be >= 1, got {max_tokens_to_oom}")
    template = None
    if chat_template is not None:
        template = ChatTemplate(chat_template, bos_token=_special_text(tokenizer, "bos"),
                                eos_token=_special_text(tokenizer, "eod"))
    if dynamic_batching:
        scheduler = ContinuousScheduler(runner, max_requests or max_batch_size, prefill_chunk,
                                        num_cuda_graphs=num_cuda_graphs, max_step_tokens=max_step_tokens)
    else:
        scheduler = Scheduler(runner, max_batch_size)
    app = FastAPI(title="Gigatron text generation")
    app.state.scheduler = scheduler
    engine = runner.engine
    model_card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "gigatron",
                  "max_model_len": max_sequence_length}

    @app.exception_handler(RequestError)
    async def _on_request_error(request, exc: RequestError):
        return _error(exc, openai=not _is_megatron_route(request))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request, exc: StarletteHTTPException):  # unknown route, wrong method
        if _is_megatron_route(request):
            return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail), "field": None})
        return JSONResponse(status_code=exc.status_code,
                            content=openai_error_body(f"{exc.detail}: {request.method} {request.url.path}",
                                                      exc.status_code))

    @app.exception_handler(Exception)
    async def _on_failure(request, exc: Exception):  # a bug or a failed device: 500, said plainly
        log.exception("request %s %s failed", request.method, request.url.path)
        message = f"the server failed: {type(exc).__name__}: {exc}"
        if _is_megatron_route(request):
            return JSONResponse(status_code=500, content={"error": message, "field": None})
        return JSONResponse(status_code=500, content=openai_error_body(message, 500))

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

    def check_fits(prompt_tokens, tokens_to_generate: int, tokens_field: str, prompt_field: str, copies: int = 1):
        longest = max(len(p) for p in prompt_tokens)
        if longest > max_sequence_length:
            raise RequestError(prompt_field, f"a prompt has {longest} tokens but the model holds "
                                             f"{max_sequence_length}; shorten the prompt")
        if max_tokens_to_oom is not None and not dynamic_batching:  # Megatron's guard of whole batches
            rows = min(len(prompt_tokens) * copies, max_batch_size)
            total = rows * (longest + tokens_to_generate)
            if total > max_tokens_to_oom:
                raise RequestError(tokens_field, f"too many tokens: {rows} rows x ({longest} prompt + "
                                                 f"{tokens_to_generate} generated) = {total} exceeds the server's "
                                                 f"--max-tokens-to-oom {max_tokens_to_oom}; send fewer or shorter "
                                                 "prompts or generate fewer tokens")
        try:
            engine.check_fits(prompt_tokens, tokens_to_generate)
        except PromptTooLongError as exc:  # named as the route names the count
            raise RequestError(tokens_field, str(exc).replace("tokens_to_generate", tokens_field)) from None

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
        check_fits(prompt_tokens, req.params.tokens_to_generate, "tokens_to_generate", "prompts",
                   copies=req.beam_width or 1)
        if req.beam_width is not None:
            if req.beam_width > max_batch_size:
                raise RequestError("beam_width", f"beam_width {req.beam_width} exceeds the server's "
                                                 f"--max-batch-size {max_batch_size}")
            result = await wait(Job(prompt_tokens, req.params,
                                    beam=(req.beam_width, req.stop_token, req.length_penalty)), request)
            if result is _DISCONNECTED:
                return Response(status_code=499)
            return {"text": result.texts, "segments": result.segments, "scores": result.scores,
                    "tokens": result.tokens}
        try:
            result = await wait(Job(prompt_tokens, req.params), request)
        except RequestError:
            raise
        except ValueError as exc:
            return JSONResponse(status_code=400, content={"error": str(exc), "field": None})
        if result is _DISCONNECTED:
            return Response(status_code=499)
        logprobs = None
        if req.params.return_log_probs:
            logprobs = [[json_logprob(lp) for lp in row] for row in result.logprobs]
        return {"text": result.texts, "segments": result.segments, "logprobs": logprobs, "tokens": result.tokens}

    def check_model(name):
        if name is not None and name != model_name:
            raise RequestError("model", f"The model `{name}` does not exist: this server serves `{model_name}` "
                                        "(GET /v1/models)", status=404, code="model_not_found")

    def check_top_k(params):
        if params.top_k > engine.vocab_size:
            raise RequestError("top_k", f"top_k ({params.top_k}) is larger than the vocabulary ({engine.vocab_size})")
        for token, _ in params.logit_bias:
            if not 0 <= token < engine.vocab_size:
                raise RequestError("logit_bias", f"logit_bias names token {token}, outside the vocabulary "
                                                 f"[0, {engine.vocab_size})")

    def usage(prompt_tokens, tracker):
        prompt = sum(len(p) for p in prompt_tokens)
        completion = sum(tracker.generated)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def sse(obj) -> str:
        return "data: " + json.dumps(obj) + "\n\n"

    def chunk_writer(object_name: str, ident: str, created: int, include_usage: bool):
        """chunk(choices, **extra) -> the SSE text of one chunk of a streamed answer; with
        stream_options.include_usage every chunk has a "usage" key (null but in the closing one)."""
        def chunk(choices, **extra):
            body = {"id": ident, "object": object_name, "created": created, "model": model_name,
                    "choices": choices, **extra}
            if include_usage and "usage" not in body:
                body["usage"] = None
            return sse(body)
        return chunk

    def streamed(request: Request, job: Job, events: "_LoopQueue", render, on_result, closing):
        """The StreamingResponse of a streamed OpenAI request: the worker thread's events (put by
        the tracker, then by on_result(result) once the job is done) become chunks through
        render(item) -> list of SSE strings; closing() gives the chunks before [DONE]. A client
        that goes away withdraws the job."""
        done = object()

        def on_done(fut):
            try:
                on_result(fut.result())
            except BaseException as exc:  # reported to the client inside the stream
                status = 400 if isinstance(exc, ValueError) else 500
                events.put(("error", openai_error_body(f"{type(exc).__name__}: {exc}" if status == 500 else str(exc),
                                                       status)))
            events.put(done)

        scheduler.submit(job).add_done_callback(on_done)

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
                for text in render(("start",)):
                    yield text
                while True:
                    item = await next_event()
                    if item is None:  # the client went away
                        return
                    if item is done:
                        break
                    if item[0] == "error":
                        yield sse(item[1])
                        continue
                    for text in render(item):
                        yield text
                for text in closing():
                    yield text
                finished = True
                yield "data: [DONE]\n\n"
            finally:  # the client went away (the response was cancelled or closed): stop generating
                if not finished:
                    job.withdraw()

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def run_job(job: Job, request: Request):
        """The job's result (a ValueError from the engine is the request's fault: 400), or
        _DISCONNECTED."""
        try:
            return await wait(job, request)
        except RequestError:
            raise
        except ValueError as exc:
            raise RequestError(None, str(exc)) from None

    eos_text = _special_text(tokenizer, "eod")

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        """The tokenizer, as lm-evaluation-harness's remote tokenizer backend reads it."""
        return {"tokenizer_class": type(tokenizer).__name__, "eos_token": eos_text or None,
                "bos_token": _special_text(tokenizer, "bos") or None, "pad_token": None,
                "vocab_size": engine.vocab_size, "model_max_length": max_sequence_length,
                "chat_template": template.source if template is not None else None}

    @app.post("/tokenize")
    async def tokenize_route(request: Request):
        """{"prompt": text} -> {"tokens", "count", "max_model_len"}; the end-of-document token's own text
        is that token (as tokenizers that parse special tokens give it)."""
        body = await _read_body(request, max_request_bytes)

        def run():
            payload = _parse_json(body)
            if not isinstance(payload, dict) or not isinstance(payload.get("prompt"), str):
                raise RequestError("prompt", "prompt must be a string")
            text = payload["prompt"]
            ids = [tokenizer.eod] if eos_text and text == eos_text else tokenize([text], False, "prompt")[0] if text else []
            return {"tokens": ids, "count": len(ids), "max_model_len": max_sequence_length}

        return await asyncio.to_thread(run)

    @app.post("/detokenize")
    async def detokenize_route(request: Request):
        """{"tokens": ids} -> {"prompt": text}."""
        body = await _read_body(request, max_request_bytes)
        payload = _parse_json(body)
        ids = payload.get("tokens") if isinstance(payload, dict) else None
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise RequestError("tokens", "tokens must be a list of token ids")
        bad = [t for t in ids if not 0 <= t < engine.vocab_size]
        if bad:
            raise RequestError("tokens", f"token ids outside the vocabulary [0, {engine.vocab_size}): {bad[:5]}")
        return {"prompt": await asyncio.to_thread(tokenizer.detokenize, ids) if ids else ""}

    @app.get("/v1/models")
    @app.get("/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        check_model(name)
        return model_card

    @app.post("/v1/completions")
    @app.post("/completions")
    async def completions(request: Request):
        req, prompt_tokens = await read_request(request, parse_completion_request)
        check_model(req.model)
        check_top_k(req.params)
        check_fits(prompt_tokens, req.params.tokens_to_generate, "max_tokens", "prompt", copies=req.best_of)
        created = int(time.time())
        ident = f"cmpl-{uuid.uuid4().hex}"
        rows = [ids for ids in prompt_tokens for _ in range(req.best_of)]  # best_of rows per prompt
        texts = [p for p in req.prompts for _ in range(req.best_of)]
        events = _LoopQueue(asyncio.get_running_loop()) if req.stream else None
        tracker = CompletionTracker(tokenizer, len(rows), req.stop, events)
        job = Job(rows, req.params, on_step=tracker.on_step,
                  wants_logprobs=req.logprobs is not None or req.best_of > req.n)
        n_top = req.logprobs or 0

        def prompt_text(row):
            return texts[row] if isinstance(texts[row], str) else tokenizer.detokenize(rows[row])

        def base(row):  # characters of the choice's text before its generated text
            return len(prompt_text(row)) if req.echo else 0

        def prompt_block(row):
            lps, tops = tracker.prompt[row]
            segs = [tokenizer.detokenize([t]) for t in rows[row]]
            tops = list(tops) if tops is not None else [None] * (len(segs) - 1)
            return completion_logprobs(tokenizer, segs, [None] + list(lps), [None] + tops, n_top, 0)

        def generated_block(row, first, end, with_end_token):
            segs = tracker.segments[row]
            block = completion_logprobs(tokenizer, segs[first:end], tracker.logprobs[row][first:end],
                                        tracker.top_logprobs[row][first:end], n_top,
                                        base(row) + sum(len(x) for x in segs[:first]))
            if with_end_token and tracker.end_token[row] is not None:  # the end-of-document token: no text
                seg, lp, top = tracker.end_token[row]
                extra = completion_logprobs(tokenizer, [seg], [lp], [top], n_top, base(row) + len(tracker.text(row)))
                block = _join(block, extra)
            return block

        def record_prompts(result):
            if req.echo and req.logprobs is not None:
                for row in range(len(rows)):
                    n_prompt = result.prompt_lengths[row]
                    tops = result.prompt_top_logprobs[row] if result.prompt_top_logprobs is not None else None
                    if tracker.set_prompt(row, result.logprobs[row][: n_prompt - 1], tops) and events is not None:
                        events.put(("prompt", row))

        def choice(row, index):
            text = (prompt_text(row) if req.echo else "") + tracker.text(row)
            logprobs = None
            if req.logprobs is not None:
                logprobs = generated_block(row, 0, tracker.kept(row), True)
                if req.echo:
                    logprobs = _join(prompt_block(row), logprobs)
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": tracker.finish[row] or "length"}

        if not req.stream:
            result = await run_job(job, request)
            if result is _DISCONNECTED:
                return Response(status_code=499)
            record_prompts(result)
            choices = []
            for p in range(len(prompt_tokens)):
                group = list(range(p * req.best_of, (p + 1) * req.best_of))
                for row in group:
                    tracker.finalize(row, "length")
                if req.best_of > req.n:  # the n rows with the highest mean log-probability per token
                    group = sorted(group, key=lambda r: -tracker.mean_logprob(r))[: req.n]
                choices += [choice(row, p * req.n + j) for j, row in enumerate(group)]
            return {"id": ident, "object": "text_completion", "created": created, "model": model_name,
                    "choices": choices, "usage": usage(prompt_tokens, tracker)}

        chunk = chunk_writer("text_completion", ident, created, req.include_usage)

        def render(item):
            if item[0] == "start":  # echoed prompts without log-probabilities need no model work
                if req.echo and req.logprobs is None:
                    return [chunk([{"index": row, "text": prompt_text(row), "logprobs": None, "finish_reason": None}])
                            for row in range(len(rows))]
                return []
            if item[0] == "prompt":
                row = item[1]
                return [chunk([{"index": row, "text": prompt_text(row), "logprobs": prompt_block(row),
                                "finish_reason": None}])]
            row, delta, reason, first, end = item
            logprobs = generated_block(row, first, end, reason is not None) if req.logprobs is not None else None
            return [chunk([{"index": row, "text": delta, "logprobs": logprobs, "finish_reason": reason}])]

        def on_result(result):
            record_prompts(result)
            for row in range(len(rows)):
                tracker.finalize(row, "length")

        def closing():
            if req.include_usage:
                return [chunk([], usage=usage(prompt_tokens, tracker))]
            return []

        return streamed(request, job, events, render, on_result, closing)

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        if template is None:
            raise RequestError("messages", "this server has no chat template: the tokenizer does not carry one; "
                                           "restart it with --chat-template FILE (a Jinja chat template, or a "
                                           "tokenizer_config.json holding one), or use /v1/completions")
        body = await _read_body(request, max_request_bytes)

        def prepare():
            req = parse_chat_request(_parse_json(body), defaults)
            try:
                text = template.render(req.messages)
            except ChatTemplateError as exc:
                raise RequestError("messages", str(exc)) from None
            try:
                ids = list(tokenizer.tokenize(text))
            except Exception as exc:  # noqa: BLE001 - text the tokenizer cannot encode is bad input
                raise RequestError("messages", f"the messages cannot be tokenized: {type(exc).__name__}: {exc}") from None
            if not ids:
                raise RequestError("messages", "the chat template made an empty prompt of these messages")
            bos = getattr(tokenizer, "bos", None)
            if isinstance(bos, int) and bos >= 0 and len(ids) > 1 and ids[0] == ids[1] == bos:
                ids = ids[1:]  # the template wrote the BOS and the tokenizer added another
            return req, ids

        req, ids = await asyncio.to_thread(prepare)
        check_model(req.model)
        check_top_k(req.params)
        if len(ids) >= max_sequence_length:
            raise RequestError("messages", f"the conversation takes {len(ids)} tokens but the model holds "
                                           f"{max_sequence_length}, leaving none to answer; shorten it")
        tokens_to_generate = req.max_tokens if req.max_tokens is not None else max_sequence_length - len(ids)
        params = dataclasses.replace(req.params, tokens_to_generate=tokens_to_generate)
        field = "max_completion_tokens" if req.max_tokens is not None else "messages"
        check_fits([ids], tokens_to_generate, field, "messages", copies=req.n)
        created = int(time.time())
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        rows = [ids] * req.n
        events = _LoopQueue(asyncio.get_running_loop()) if req.stream else None
        tracker = CompletionTracker(tokenizer, len(rows), req.stop, events)
        job = Job(rows, params, on_step=tracker.on_step, wants_logprobs=req.logprobs)

        def block(row, first, end):
            return chat_logprobs(tokenizer, tracker.segments[row][first:end], tracker.logprobs[row][first:end],
                                 tracker.top_logprobs[row][first:end], req.top_logprobs)

        if not req.stream:
            result = await run_job(job, request)
            if result is _DISCONNECTED:
                return Response(status_code=499)
            choices = []
            for row in range(len(rows)):
                tracker.finalize(row, "length")
                choices.append({"index": row, "message": {"role": "assistant", "content": tracker.text(row)},
                                "logprobs": block(row, 0, tracker.kept(row)) if req.logprobs else None,
                                "finish_reason": tracker.finish[row] or "length"})
            return {"id": ident, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": choices, "usage": usage([ids], tracker)}

        chunk = chunk_writer("chat.completion.chunk", ident, created, req.include_usage)

        def render(item):
            if item[0] == "start":
                return [chunk([{"index": row, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}]) for row in range(len(rows))]
            if item[0] == "prompt":
                return []
            row, delta, reason, first, end = item
            out = []
            if delta or end > first:
                out.append(chunk([{"index": row, "delta": {"content": delta},
                                   "logprobs": block(row, first, end) if req.logprobs else None,
                                   "finish_reason": None}]))
            if reason is not None:
                out.append(chunk([{"index": row, "delta": {}, "logprobs": None, "finish_reason": reason}]))
            return out

        def on_result(result):
            for row in range(len(rows)):
                tracker.finalize(row, "length")

        def closing():
            return [chunk([], usage=usage([ids], tracker))] if req.include_usage else []

        return streamed(request, job, events, render, on_result, closing)

    return app


def serve(app, host: str = "127.0.0.1", port: int = 5000, log_level: str = "info") -> None:
    """Run the app with uvicorn (blocks until the server stops), then stop the generation worker
    (which releases the other ranks of a tensor-parallel run)."""
    import uvicorn
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        app.state.scheduler.close()
