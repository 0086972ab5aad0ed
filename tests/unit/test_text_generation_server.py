"""The text generation server on 127.0.0.1: validation (HTTP 400 naming the field), concurrent
batched requests against direct engine calls, SSE streaming, beam search and the CLI."""

import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _inference_fixtures import CharTokenizer, tiny_model  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from script_server import run_python  # noqa: E402

from gigatron.core.inference.broadcast import LocalRunner  # noqa: E402
from gigatron.core.inference.engine import InferenceEngine, SamplingParams  # noqa: E402
from gigatron.core.inference.server.app import build_app  # noqa: E402
from gigatron.core.inference.server.background import serve_in_background  # noqa: E402
from gigatron.core.inference.server.validation import ServerDefaults  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOK = CharTokenizer()
MAX_BATCH = 4


@pytest.fixture(scope="module")
def server():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = tiny_model(seed=5, position_embedding_type="rope")
    engine = InferenceEngine(model, TOK, max_batch_size=MAX_BATCH)
    reference = InferenceEngine(model, TOK, max_batch_size=MAX_BATCH)  # its own KV cache
    app = build_app(LocalRunner(engine), TOK, max_batch_size=MAX_BATCH, max_sequence_length=engine.max_sequence_length,
                    defaults=ServerDefaults(tokens_to_generate=8))
    with serve_in_background(app) as srv:
        yield srv.url, reference, app
    torch.set_num_threads(threads)


class SlowTokenizer(CharTokenizer):
    """Takes 2 s to tokenize a prompt that starts with "zz"."""

    def tokenize(self, text):
        if text.startswith("zz"):
            time.sleep(2.0)
        return super().tokenize(text)


class SlowRunner(LocalRunner):
    """At least 20 ms a decode step, no row ever stops on its own (no end-of-document stop, the
    token never shown to a callback), and a record of each generation's steps."""

    def __init__(self, engine):
        super().__init__(engine)
        self.steps = []
        self.finished = threading.Event()

    def generate_tokens(self, prompt_tokens, params, on_step=None, cancelled=None):
        import dataclasses

        steps = [0]

        def slow():
            steps[0] += 1
            time.sleep(0.02)
            return cancelled() if cancelled is not None else None

        shown = None
        if on_step is not None:
            def shown(step, tokens, active, **kw):
                return on_step(step, [t or 1 for t in tokens], active, **kw)
        try:
            return super().generate_tokens(prompt_tokens, dataclasses.replace(params, stop_at_eod=False), shown, slow)
        finally:
            self.steps.append(steps[0])
            self.finished.set()


GUARDED_LIMIT = 2000


@pytest.fixture(scope="module")
def guarded():
    """A server with a small body limit, a slow tokenizer and slow decode steps."""
    model = tiny_model(seed=5, position_embedding_type="rope")
    runner = SlowRunner(InferenceEngine(model, TOK, max_batch_size=MAX_BATCH))
    app = build_app(runner, SlowTokenizer(), max_batch_size=MAX_BATCH, max_sequence_length=64,
                    defaults=ServerDefaults(tokens_to_generate=4), max_request_bytes=GUARDED_LIMIT)
    with serve_in_background(app) as srv:
        yield srv.url, runner


def test_bodies_over_the_limit_get_413(guarded):
    url, _ = guarded
    big = b'{"prompts": ["' + b"a" * GUARDED_LIMIT + b'"]}'
    headers = {"Content-Type": "application/json"}
    r = httpx.put(url + "/api", content=big, headers=headers, timeout=30)  # with a Content-Length
    assert r.status_code == 413 and r.json()["field"] == "body"
    assert f"limit of {GUARDED_LIMIT} bytes (--max-request-bytes)" in r.json()["error"]
    r = httpx.post(url + "/v1/completions", content=iter([big[:1000], big[1000:]]), headers=headers,
                   timeout=30)  # chunked: no Content-Length
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"  # OpenAI's error shape
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.put(url + "/api", json={"prompts": ["ab"], "tokens_to_generate": 2}, timeout=30)
    assert r.status_code == 200


MALFORMED = [
    (b'{"prompts": ["a"], "beam_width": 2, "length_penalty": NaN}', "/api", "length_penalty"),
    (b'{"prompts": ["a"], "length_penalty": Infinity}', "/api", "length_penalty"),
    (b'{"prompts": ["a"], "temperature": NaN}', "/api", "temperature"),
    (b'{"prompts": ["a"], "top_p": NaN}', "/api", "top_p"),
    (b'{"prompt": "a", "temperature": NaN}', "/v1/completions", "temperature"),
    (b'{"prompt": "a", "top_p": -Infinity}', "/v1/completions", "top_p"),
    (b"[" * 1500 + b"]" * 1500, "/api", "body"),
    (b'{"prompts": ' + b"[" * 1500 + b"]" * 1500 + b"}", "/api", "body"),
    (b'{"prompt": ' + b"[" * 1500 + b"]" * 1500 + b"}", "/v1/completions", "body"),
    (b'{"prompts": ["a"], "stop_token": ' + b"[" * 900 + b"]" * 900 + b"}", "/api", "stop_token"),
    (b'{"prompts": ["ABC"]}', "/api", "prompts"),  # the tokenizer cannot encode it
    (b'{"prompt": "ABC"}', "/v1/completions", "prompt"),
    (b'{"prompts": ["a"], "random_seed": 18446744073709551616}', "/api", "random_seed"),
    (b'{"prompt": "a", "seed": 18446744073709551616}', "/v1/completions", "seed"),
    (b'{"prompts": ["a"], "length_penalty": 1e999}', "/api", "length_penalty"),
    (b'{"prompts": ["a"], "beam_width": 2, "length_penalty": ' + b"9" * 400 + b"}", "/api", "length_penalty"),
    (b'{"prompts": ["a"], "top_k": 100}', "/api", "top_k"),  # more than the 32 tokens
    (b'{"prompt": "a", "top_k": 100}', "/v1/completions", "top_k"),
]


def test_malformed_requests_get_4xx_naming_the_field(server):
    url, _, _ = server
    for body, path, field in MALFORMED:
        method = httpx.put if path == "/api" else httpx.post
        r = method(url + path, content=body, headers={"Content-Type": "application/json"}, timeout=60)
        assert 400 <= r.status_code < 500, (body[:80], path, r.status_code, r.text)
        assert error_field(r) == field, (body[:80], r.json())
    assert httpx.get(url + "/health", timeout=5).status_code == 200


def test_nesting_limit_holds_when_the_recursion_limit_was_raised(server):
    """json.loads's own depth limit follows sys.getrecursionlimit(), which torch.compile and other
    libraries raise in the serving process: the server checks the depth itself."""
    import sys

    from gigatron.core.inference.server.app import MAX_JSON_DEPTH

    url = server[0]
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)
    try:
        body = b'{"prompts": ' + b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1) + b"}"
        r = httpx.put(url + "/api", content=body, headers={"Content-Type": "application/json"}, timeout=60)
    finally:
        sys.setrecursionlimit(old)
    assert r.status_code == 400 and error_field(r) == "body", r.text
    assert f"more than {MAX_JSON_DEPTH} deep" in r.text


def test_tokenizing_does_not_hold_up_the_event_loop(guarded):
    url, _ = guarded
    slow = threading.Thread(target=lambda: httpx.put(url + "/api", json={"prompts": ["zzab"], "tokens_to_generate": 1},
                                                     timeout=60))
    slow.start()
    time.sleep(0.3)  # the request is being tokenized (2 s)
    start = time.perf_counter()
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    assert time.perf_counter() - start < 1.0
    slow.join()


def test_a_client_that_goes_away_stops_its_generation(guarded):
    url, runner = guarded
    for streamed in (False, True):
        runner.finished.clear()
        before = len(runner.steps)
        if streamed:
            payload = {"prompt": "ab", "max_tokens": 55, "temperature": 0, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=payload, timeout=30) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        break  # the first token arrived; the client leaves
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.put(url + "/api", json={"prompts": ["ab"], "tokens_to_generate": 55, "top_k": 1}, timeout=0.4)
        assert runner.finished.wait(10)
        assert runner.steps[before] < 40, runner.steps  # of 55 (each at least 20 ms)
        start = time.perf_counter()
        r = httpx.put(url + "/api", json={"prompts": ["ab"], "tokens_to_generate": 2, "top_k": 1}, timeout=30)
        assert r.status_code == 200 and time.perf_counter() - start < 1.0


def test_a_queued_job_withdrawn_never_runs():
    from gigatron.core.inference.server.scheduler import Job, Scheduler

    gate = threading.Event()
    calls = []

    class GatedRunner(LocalRunner):
        def generate_tokens(self, prompt_tokens, params, on_step=None, cancelled=None):
            gate.wait(30)
            calls.append(prompt_tokens)
            return super().generate_tokens(prompt_tokens, params, on_step, cancelled)

    scheduler = Scheduler(GatedRunner(InferenceEngine(tiny_model(seed=5), TOK, max_batch_size=4)), max_batch_size=4)
    try:
        greedy = SamplingParams(tokens_to_generate=2, top_k=1)
        first = scheduler.submit(Job([TOK.tokenize("ab")], greedy))
        time.sleep(0.2)  # the worker holds the first job
        gone = Job([TOK.tokenize("cd")], SamplingParams(tokens_to_generate=3, top_k=1))
        scheduler.submit(gone)
        gone.withdraw()
        gate.set()
        first.result(timeout=60)
    finally:
        scheduler.close()
    assert gone.future.cancelled() and calls == [[TOK.tokenize("ab")]]


def error_field(r):
    """The field an error names: PUT /api answers {"error", "field"}, the OpenAI routes
    {"error": {"message", "type", "param", "code"}}."""
    body = r.json()
    if isinstance(body["error"], dict):
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
        return body["error"]["param"]
    return body["field"]


def put(url, payload, **kw):
    return httpx.put(url + "/api", json=payload, timeout=60, **kw)


BAD_API = [
    ({"sentences": ["a"]}, "sentences"),
    ({"prompts": ["a"], "max_len": 3}, "max_len"),
    ({}, "prompts"),
    ({"prompts": "abc"}, "prompts"),
    ({"prompts": []}, "prompts"),
    ({"prompts": ["a"] * 129}, "prompts"),
    ({"prompts": [""]}, "prompts"),
    ({"prompts": ["a"], "tokens_to_generate": -1}, "tokens_to_generate"),
    ({"prompts": ["a"], "tokens_to_generate": "5"}, "tokens_to_generate"),
    ({"prompts": ["a"], "tokens_to_generate": 0}, "tokens_to_generate"),
    ({"prompts": ["a"], "logprobs": "yes"}, "logprobs"),
    ({"prompts": ["a"], "temperature": 0}, "temperature"),
    ({"prompts": ["a"], "temperature": 101}, "temperature"),
    ({"prompts": ["a"], "top_k": -1}, "top_k"),
    ({"prompts": ["a"], "top_k": 1001}, "top_k"),
    ({"prompts": ["a"], "top_p": 1.5}, "top_p"),
    ({"prompts": ["a"], "top_p": 0.5, "top_k": 3}, "top_p"),
    ({"prompts": ["a"], "top_p_decay": 0.5}, "top_p_decay"),
    ({"prompts": ["a"], "top_p": 0.5, "top_p_decay": 2.0}, "top_p_decay"),
    ({"prompts": ["a"], "top_p_bound": 0.1}, "top_p_bound"),
    ({"prompts": ["a"], "top_p": 0.5, "top_p_bound": 0.9}, "top_p_bound"),
    ({"prompts": ["a"], "add_BOS": 1}, "add_BOS"),
    ({"prompts": ["a"], "stop_on_eol": "no"}, "stop_on_eol"),
    ({"prompts": ["a"], "random_seed": 1.5}, "random_seed"),
    ({"prompts": ["a"], "random_seed": -5}, "random_seed"),
    ({"prompts": ["a", "b"], "beam_width": 2}, "beam_width"),
    ({"prompts": ["a"], "beam_width": 0}, "beam_width"),
    ({"prompts": ["a"], "beam_width": MAX_BATCH + 1}, "beam_width"),
    ({"prompts": ["a"], "beam_width": 2, "stop_token": "x"}, "stop_token"),
    ({"prompts": ["a" * 60], "tokens_to_generate": 10}, "tokens_to_generate"),
    ({"prompts": ["a" * 70], "tokens_to_generate": 1}, "prompts"),
    ([1, 2], "body"),
]


def test_invalid_api_requests_get_400_naming_the_field(server):
    url, _, _ = server
    for payload, field in BAD_API:
        r = put(url, payload)
        assert r.status_code == 400, (payload, r.text)
        body = r.json()
        assert body["field"] == field, (payload, body)
        assert body["error"]
    r = httpx.put(url + "/api", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["field"] == "body"
    # Megatron's own messages.
    assert put(url, {}).json()["error"] == "prompts argument required"
    assert put(url, {"prompts": []}).json()["error"] == "prompts is empty"
    assert put(url, {"prompts": ["a"] * 129}).json()["error"] == "Maximum number of prompts is 128"
    # Still serving after all of that.
    r = put(url, {"prompts": ["abc"], "tokens_to_generate": 3, "top_k": 1})
    assert r.status_code == 200 and r.json()["text"][0].startswith("abc")


BAD_COMPLETIONS = [
    ({}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "a", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "temperature": -1}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "logprobs": 21}, "logprobs"),
    ({"prompt": "a", "stop": 3}, "stop"),
    ({"prompt": "a", "seed": -2}, "seed"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "n": 2, "best_of": 1}, "best_of"),
    ({"prompt": "a", "best_of": 3, "stream": True}, "best_of"),
    ({"prompt": "a", "suffix": "b"}, "suffix"),
    ({"prompt": "a", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "a", "frequency_penalty": "x"}, "frequency_penalty"),
    ({"prompt": "a", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"prompt": "a", "logit_bias": {"1": 101}}, "logit_bias"),
    ({"prompt": "a", "logit_bias": {"999": 1}}, "logit_bias"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "a", "stream": "yes"}, "stream"),
    ({"prompt": [1, 999]}, "prompt"),
    ({"prompt": "a" * 60, "max_tokens": 10}, "max_tokens"),
]


def test_invalid_completion_requests_get_400(server):
    url, _, _ = server
    for payload, field in BAD_COMPLETIONS:
        r = httpx.post(url + "/v1/completions", json=payload, timeout=60)
        assert r.status_code == 400, (payload, r.text)
        assert error_field(r) == field, (payload, r.json())
    r = httpx.post(url + "/v1/completions", json={"prompt": "a", "model": "other"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_api_matches_engine_and_response_shape(server):
    url, reference, _ = server
    prompts = ["hello", "a longer prompt: x"]
    r = put(url, {"prompts": prompts, "tokens_to_generate": 6, "top_k": 1, "logprobs": True})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"text", "segments", "logprobs", "tokens"}
    ref = reference.generate(prompts, SamplingParams(tokens_to_generate=6, top_k=1, return_log_probs=True))
    assert body["text"] == ref.texts and body["segments"] == ref.segments and body["tokens"] == ref.tokens
    for a, b in zip(body["logprobs"], ref.logprobs):
        assert a == pytest.approx(b, abs=1e-5)
    r = put(url, {"prompts": ["hello"], "tokens_to_generate": 2, "top_k": 1})
    assert r.json()["logprobs"] is None
    # Scoring mode.
    r = put(url, {"prompts": ["hello"], "tokens_to_generate": 0, "logprobs": True})
    assert r.json()["text"] == ["hello"] and len(r.json()["logprobs"][0]) == 4
    # More prompts than --max-batch-size: served in consecutive batches.
    many = [f"p{c}" for c in "abcdefghij"]
    r = put(url, {"prompts": many, "tokens_to_generate": 4, "top_k": 1})
    ref = reference.generate(many[:4], SamplingParams(tokens_to_generate=4, top_k=1))
    assert r.status_code == 200 and len(r.json()["text"]) == 10 and r.json()["text"][:4] == ref.texts
    # Seeded sampling repeats.
    seeded = {"prompts": ["abc"], "tokens_to_generate": 10, "random_seed": 42, "temperature": 1.3}
    assert put(url, seeded).json() == put(url, seeded).json()


def test_beam_search_request(server):
    url, reference, _ = server
    r = put(url, {"prompts": ["ab"], "tokens_to_generate": 4, "beam_width": 3, "stop_token": 0})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"text", "segments", "scores", "tokens"}
    ref = reference.beam_search("ab", 4, 3, stop_token=0)
    assert body["text"] == ref.texts and body["tokens"] == ref.tokens
    assert body["scores"] == pytest.approx(ref.scores, abs=1e-5)


def test_concurrent_requests_are_batched_and_correct(server):
    url, reference, app = server
    prompts = [("abcdefghij"[i % 10] * (1 + i % 5)) + " x" for i in range(20)]
    lengths = [5 if i % 2 else 7 for i in range(20)]
    expected = []
    for p, n in zip(prompts, lengths):
        expected.append(reference.generate([p], SamplingParams(tokens_to_generate=n, top_k=1)).texts[0])
    before = app.state.scheduler.batches_run
    barrier = threading.Barrier(20)

    def one(i):
        barrier.wait()
        r = put(url, {"prompts": [prompts[i]], "tokens_to_generate": lengths[i], "top_k": 1, "no_log": True})
        return r.status_code, r.json()

    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, range(20)))
    for (status, body), want in zip(results, expected):
        assert status == 200
        assert body["text"] == [want]
    runs = app.state.scheduler.batches_run - before
    assert runs < 20 and app.state.scheduler.largest_batch > 1  # requests shared batches


def _sse(url, payload):
    chunks = []
    with httpx.stream("POST", url + "/v1/completions", json=payload, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                chunks.append(None)
                break
            chunks.append(json.loads(data))
    assert chunks[-1] is None
    return chunks[:-1]


@pytest.mark.parametrize("extra", [{}, {"stop": [" x", "q"]}, {"echo": True, "logprobs": 2}])
def test_streaming_equals_non_streamed(server, extra):
    url, _, _ = server
    payload = {"prompt": ["hello", "ab: "], "max_tokens": 12, "temperature": 0, **extra}
    plain = httpx.post(url + "/v1/completions", json=payload, timeout=60).json()
    chunks = _sse(url, {**payload, "stream": True})
    texts, reasons = ["", ""], [None, None]
    for c in chunks:
        for choice in c["choices"]:
            texts[choice["index"]] += choice["text"]
            reasons[choice["index"]] = choice["finish_reason"] or reasons[choice["index"]]
    assert texts == [c["text"] for c in plain["choices"]]
    assert reasons == [c["finish_reason"] for c in plain["choices"]]
    if "stop" in extra:
        for c in plain["choices"]:
            assert " x" not in c["text"] and "q" not in c["text"]


def test_completions_logprobs_and_echo_scoring(server):
    url, reference, _ = server
    r = httpx.post(url + "/v1/completions", json={"prompt": "hello", "max_tokens": 0, "echo": True, "logprobs": 0},
                   timeout=60).json()
    choice = r["choices"][0]
    assert choice["text"] == "hello"
    ref = reference.generate(["hello"], SamplingParams(tokens_to_generate=0, return_log_probs=True))
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(ref.logprobs[0], abs=1e-5)
    assert choice["logprobs"]["tokens"] == list("hello")
    r = httpx.post(url + "/v1/completions", json={"prompt": [[8, 5, 12]], "max_tokens": 3, "temperature": 0,
                                                  "logprobs": 3}, timeout=60).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
    assert all(len(t) == 3 for t in lp["top_logprobs"])
    assert r["usage"]["prompt_tokens"] == 3


def _cli():
    import importlib.util
    spec = importlib.util.spec_from_file_location("text_generation_cli", os.path.join(ROOT, "tools", "text_generation_cli.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_one_shot_and_interactive(server, capsys, monkeypatch):
    import io

    url, reference, _ = server
    host = url[len("http://"):]
    ref = reference.generate(["hello"], SamplingParams(tokens_to_generate=5, top_k=1)).texts[0]
    # One shot, as a script would run it.
    out = run_python([os.path.join(ROOT, "tools", "text_generation_cli.py"), host, "--prompt", "hello", "--tokens",
                      "5", "--top-k", "1"], timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n") == ref
    cli = _cli()
    # The server's default sampling is random; the text starts with the prompt.
    assert cli.main([host, "--prompt", "hello", "--tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("hello")
    assert cli.main([host, "--prompt", "hello", "--tokens", "-3"]) == 1
    assert "tokens_to_generate" in capsys.readouterr().err
    # Interactive: prompt, number of tokens, then end of input.
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n5\n"))
    assert cli.main([host, "--top-k", "1"]) == 0
    assert ref in capsys.readouterr().out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny GPT trained for one iteration and saved in the `torch` format (NullTokenizer, 4096 ids)."""
    from gigatron.training import gpt
    from gigatron.training.arguments import parse_args
    from gigatron.training.loop import pretrain

    tmp_path = tmp_path_factory.mktemp("generation_checkpoint")
    save = str(tmp_path / "ckpt")
    flags = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "32",
             "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-3",
             "--mock-data", "--vocab-size", "4096", "--num-workers", "0", "--eval-iters", "0", "--train-iters", "1",
             "--save", save, "--data-cache-path", str(tmp_path / "cache"), "--log-interval", "1",
             "--ckpt-format", "torch"]
    pretrain(gpt.datasets_provider, gpt.model_provider, gpt.forward_step, args=parse_args(flags))
    return save


def test_generate_text_tool_from_a_checkpoint(checkpoint, tmp_path):
    """tools/generate_text.py loads a saved checkpoint and prints the same greedy text as the
    engine on the same weights (loaded with gigatron.from_pretrained)."""
    import gigatron
    from gigatron.core.tokenizers import NullTokenizer

    save = checkpoint
    out = run_python([os.path.join(ROOT, "tools", "generate_text.py"), "--load", save, "--use-checkpoint-args",
                      "--vocab-size", "4096", "--prompt", "1 2 3", "--prompt", "7", "--tokens-to-generate", "4",
                      "--greedy"], timeout=300)
    assert out.returncode == 0, out.stderr
    loaded = gigatron.from_pretrained(save)
    engine = InferenceEngine(loaded.model, NullTokenizer(4096), max_batch_size=2)
    ref = engine.generate(["1 2 3", "7"], SamplingParams(tokens_to_generate=4, top_k=1)).texts
    assert [block for block in out.stdout.split("\n\n") if block.strip()] == ref
    bad = run_python([os.path.join(ROOT, "tools", "generate_text.py"), "--load", str(tmp_path / "missing"),
                      "--use-checkpoint-args", "--vocab-size", "4096", "--prompt", "1"], timeout=300)
    assert bad.returncode == 2 and "latest_checkpointed_iteration" in bad.stderr
    assert "error: " in bad.stderr and "Traceback" not in bad.stderr  # gigatron.cli.run_cli: one line


@pytest.mark.slow
def test_generate_text_tool_says_when_it_compiles(checkpoint):
    """--compile-decode: standard error says that the decode step compiles, for which shape, and
    how long it took; the text is the same as without it."""
    run = [sys.executable, os.path.join(ROOT, "tools", "generate_text.py"), "--load", checkpoint,
           "--use-checkpoint-args", "--vocab-size", "4096", "--prompt", "1 2 3", "--tokens-to-generate", "4", "--greedy"]
    plain = subprocess.run(run, capture_output=True, text=True, timeout=300)
    compiled = subprocess.run(run + ["--compile-decode"], capture_output=True, text=True, timeout=600)
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == plain.stdout
    assert "compiling the decode step for 1 row and 32 cache slots (torch.compile, once per shape) ..." in compiled.stderr
    assert "compiled the decode step for 1 row and 32 cache slots in " in compiled.stderr
    assert "compiling" not in plain.stderr


def test_from_pretrained_generate_equals_the_engine(checkpoint):
    """gigatron.from_pretrained(path).generate(ids, max_new_tokens=...) is the engine's greedy
    generation by default and passes sampling options through; the checkpoint's tokenizer comes
    with the model."""
    import gigatron
    from gigatron.core.tokenizers import NullTokenizer

    model = gigatron.from_pretrained(checkpoint)
    engine = InferenceEngine(model.model, NullTokenizer(4096), max_batch_size=2)
    prompts = [[1, 2, 3], [7]]
    greedy = engine.generate_tokens(prompts, SamplingParams(tokens_to_generate=5, top_k=1)).tokens
    assert model.generate([1, 2, 3], max_new_tokens=5) == greedy[0]
    assert model.generate(prompts, max_new_tokens=5) == greedy
    assert model.generate(torch.tensor([1, 2, 3]), max_new_tokens=5) == greedy[0]
    sampled = engine.generate_tokens(prompts, SamplingParams(tokens_to_generate=5, temperature=0.7, top_p=0.9,
                                                             random_seed=3)).tokens
    assert model.generate(prompts, max_new_tokens=5, temperature=0.7, top_p=0.9, seed=3) == sampled
    tokenizer = model.tokenizer()
    assert tokenizer.tokenize("1 2 3") == [1, 2, 3] and tokenizer.eod == 4096
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate([5000], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_ids must be token ids"):
        model.generate("1 2 3", max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate([1], max_new_tokens=0)


def test_scheduler_batches_compatible_jobs_and_unions_outputs():
    from gigatron.core.inference.server.scheduler import Job, Scheduler

    model = tiny_model(seed=5)
    engine = InferenceEngine(model, TOK, max_batch_size=4)
    gate = threading.Event()
    calls = []

    class GatedRunner(LocalRunner):
        def generate_tokens(self, prompt_tokens, params, on_step=None, cancelled=None):
            gate.wait(30)
            calls.append((len(prompt_tokens), params.return_log_probs))
            return super().generate_tokens(prompt_tokens, params, on_step, cancelled)

    scheduler = Scheduler(GatedRunner(engine), max_batch_size=4)
    try:
        greedy = SamplingParams(tokens_to_generate=3, top_k=1)
        first = scheduler.submit(Job([TOK.tokenize("ab")], greedy))  # the worker takes it and waits
        time.sleep(0.2)
        jobs = [
            Job([TOK.tokenize("cd")], greedy),
            Job([TOK.tokenize("ef"), TOK.tokenize("g")], SamplingParams(tokens_to_generate=3, top_k=1,
                                                                        return_log_probs=True)),
            Job([TOK.tokenize("hi")], SamplingParams(tokens_to_generate=5, top_k=1)),  # other key
            Job([TOK.tokenize("jk")], SamplingParams(tokens_to_generate=3, top_k=1, random_seed=1)),  # alone
            Job([TOK.tokenize("l")], greedy),
        ]
        futures = [scheduler.submit(job) for job in jobs]
        gate.set()
        results = [f.result(timeout=60) for f in [first] + futures]
    finally:
        scheduler.close()
    assert calls == [(1, False), (4, True), (1, False), (1, False)]
    for job, result in zip(jobs, results[1:]):
        alone = engine.generate_tokens(job.prompt_tokens, job.params)
        assert result.tokens == alone.tokens
    assert results[2].logprobs is not None and len(results[2].logprobs) == 2


def test_server_tool_reports_user_errors_in_one_line():
    """tools/run_text_generation_server.py runs through gigatron.cli.run_cli: a user error is one
    'error:' line and exit status 2, not a traceback."""
    tool = os.path.join(ROOT, "tools", "run_text_generation_server.py")
    for flags, message in ((["--vocab-size", "100"], "error: give the checkpoint to serve with --load"),
                           (["--load", "ckpt", "--vocab-size", "100", "--max-request-bytes", "0"],
                            "error: --max-request-bytes must be >= 1, got 0"),
                           (["--load", "ckpt", "--vocab-size", "100", "--chat-template", "missing.jinja"],
                            "error: --chat-template missing.jinja: no such file"),
                           (["--load", "ckpt", "--vocab-size", "100", "--inference-dynamic-batching",
                             "--inference-max-requests", "0"],
                            "error: --inference-max-requests must be >= 1, got 0")):
        out = run_python([tool, *flags], timeout=300)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_decode_mode_flags_of_the_tools():
    import argparse

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from run_text_generation_server import decode_mode_from_args

    def mode(**kw):
        return decode_mode_from_args(argparse.Namespace(**{"cuda_graphs": False, "compile_decode": False, **kw}))

    assert mode() == "eager"
    assert mode(cuda_graphs=True) == "cuda_graph"
    assert mode(compile_decode=True) == "compiled"
    assert mode(cuda_graphs=True, compile_decode=True) == "compiled"


@pytest.mark.slow
def test_server_compiles_the_one_row_step_before_serving(capsys):
    """--compile-decode: the server compiles (on a GPU also captures) the decode step of one row
    before it listens, printing that it does and how long it took; the first request of one row
    then reuses it."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from run_text_generation_server import warm_up_decode

    engine = InferenceEngine(tiny_model(seed=5), TOK, max_batch_size=2, decode_mode="compiled")
    seconds = warm_up_decode(engine)
    out = capsys.readouterr().out
    assert "compiling the decode step (--compile-decode; once per batch size, tens of seconds) ..." in out
    assert f"compiled the decode step in {seconds:.1f} s" in out
    assert engine._compiled_shapes == {(1, 64)}  # one row, the 64-slot cache of the tiny model
    engine.generate(["hello"], SamplingParams(tokens_to_generate=3, top_k=1))
    assert engine._compiled_shapes == {(1, 64)}
