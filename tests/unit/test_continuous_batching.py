"""Continuous batching (gigatron/core/inference/continuous.py and the server's
--inference-dynamic-batching): sequences that join and leave the running batch at different steps,
with chunked prefill and fewer slots than requests, give what each request gives alone."""

import os
import sys
import threading

import httpx
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _inference_fixtures import CharTokenizer, tiny_model  # noqa: E402

from gigatron.core.inference.continuous import ContinuousBatcher, Sequence  # noqa: E402
from gigatron.core.inference.engine import InferenceEngine, SamplingParams  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOK = CharTokenizer()


@pytest.fixture(scope="module")
def engines():
    model = tiny_model(seed=5, position_embedding_type="rope")
    return InferenceEngine(model, TOK, max_batch_size=4), InferenceEngine(model, TOK, max_batch_size=4)


def _alone(engine, prompt, params):
    r = engine.generate_tokens([TOK.tokenize(prompt)], params)
    return r.tokens[0][len(prompt):], r


PROMPTS = ["hello", "a much longer prompt than the others, read in chunks", "ab", "the cat", "x", "zzz top",
           "one two three four"]


def test_joining_and_leaving_equals_each_request_alone(engines):
    engine, reference = engines
    batcher = ContinuousBatcher(engine, max_requests=3, prefill_chunk=4)
    seqs = []
    for i, prompt in enumerate(PROMPTS):
        params = SamplingParams(tokens_to_generate=3 + (5 * i) % 9, top_k=1, stop_at_eod=i % 2 == 0,
                                return_log_probs=True, top_logprobs=2)
        seqs.append(Sequence(TOK.tokenize(prompt), params))
    # Requests arrive while others run: two now, the rest one every other step.
    batcher.add(seqs[0])
    batcher.add(seqs[1])
    pending = list(seqs[2:])
    step = 0
    while batcher.busy() or pending:
        if pending and step % 2 == 1:
            batcher.add(pending.pop(0))
        batcher.step()
        assert batcher.running() <= 3
        step += 1
    assert batcher.largest_batch == 3  # the slots were shared
    for prompt, seq in zip(PROMPTS, seqs):
        want, ref = _alone(reference, prompt, seq.params)
        assert seq.done and seq.generated == want, prompt
        lps = ref.logprobs[0][len(prompt) - 1:]
        assert seq.logprobs == pytest.approx(lps, abs=1e-4)
        assert seq.prompt_logprobs == pytest.approx(ref.logprobs[0][: len(prompt) - 1], abs=1e-4)
        assert [max(t, key=t.get) for t in seq.top_logprobs] == [max(t, key=t.get) for t in ref.top_logprobs[0]]


def test_seeded_sampling_and_penalties_equal_alone(engines):
    engine, reference = engines
    batcher = ContinuousBatcher(engine, max_requests=2, prefill_chunk=3)
    cases = [("hello", SamplingParams(tokens_to_generate=12, temperature=0.8, top_p=0.9, random_seed=7)),
             ("abc", SamplingParams(tokens_to_generate=10, temperature=1.3, top_k=5, random_seed=3)),
             ("the cat", SamplingParams(tokens_to_generate=8, top_k=1, frequency_penalty=1.5, presence_penalty=0.5,
                                        logit_bias=((TOK.tokenize("q")[0], 3.0),)))]
    seqs = [Sequence(TOK.tokenize(p), params, seed=params.random_seed) for p, params in cases]
    for seq in seqs:
        batcher.add(seq)
    while batcher.busy():
        batcher.step()
    for (prompt, params), seq in zip(cases, seqs):
        want, _ = _alone(reference, prompt, params)
        assert seq.generated == want, prompt


def test_withdrawn_and_stopped_sequences_free_their_slots(engines):
    engine, _ = engines
    batcher = ContinuousBatcher(engine, max_requests=1, prefill_chunk=8)
    gone = {"flag": False}
    long = Sequence(TOK.tokenize("ab"), SamplingParams(tokens_to_generate=40, top_k=1, stop_at_eod=False),
                    withdrawn=lambda: gone["flag"])
    stops = []
    short = Sequence(TOK.tokenize("cd"), SamplingParams(tokens_to_generate=40, top_k=1, stop_at_eod=False),
                     on_token=lambda token, lp, top, prompt: stops.append(token) or len(stops) == 3)
    batcher.add(long)
    batcher.add(short)  # waits: one slot
    for _ in range(5):
        batcher.step()
    assert batcher.running() == 1 and len(short.generated) == 0 and len(long.generated) == 5
    gone["flag"] = True
    while batcher.busy():
        batcher.step()
    assert long.done and len(long.generated) == 5  # ended at the next step
    assert short.done and len(short.generated) == 3  # its callback ended it
    with pytest.raises(ValueError, match="inference-max-seq-length"):
        batcher.add(Sequence([1] * 60, SamplingParams(tokens_to_generate=10, top_k=1)))


def test_server_with_dynamic_batching_serves_concurrent_clients(engines):
    """--inference-dynamic-batching: 12 clients at once (more than the 3 slots), through PUT /api
    and /v1/completions, get what each request gives alone; the rows shared decode steps."""
    import concurrent.futures

    from gigatron.core.inference.broadcast import LocalRunner
    from gigatron.core.inference.server.app import build_app
    from gigatron.core.inference.server.background import serve_in_background

    engine, reference = engines
    app = build_app(LocalRunner(engine), TOK, max_batch_size=4, max_sequence_length=64, dynamic_batching=True,
                    max_requests=3, prefill_chunk=5)
    with serve_in_background(app) as srv:
        url = srv.url
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(12)]
        lengths = [3 + (7 * i) % 11 for i in range(12)]
        barrier = threading.Barrier(12)

        def one(i):
            barrier.wait()
            if i % 2:
                r = httpx.put(url + "/api", json={"prompts": [prompts[i]], "tokens_to_generate": lengths[i], "top_k": 1},
                              timeout=120)
                return r.json()["tokens"][0][len(prompts[i]):]
            r = httpx.post(url + "/v1/completions", json={"prompt": prompts[i], "max_tokens": lengths[i],
                                                          "temperature": 0}, timeout=120)
            return TOK.tokenize(r.json()["choices"][0]["text"])

        with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
            got = list(pool.map(one, range(12)))
        for i, tokens in enumerate(got):
            want, _ = _alone(reference, prompts[i], SamplingParams(tokens_to_generate=lengths[i], top_k=1))
            assert tokens == [t for t in want if t != TOK.eod], i
        assert app.state.scheduler.largest_batch > 1
        # Beam search and scoring still work (static engine between steps).
        r = httpx.put(url + "/api", json={"prompts": ["ab"], "tokens_to_generate": 3, "beam_width": 2, "stop_token": 0},
                      timeout=60)
        assert r.status_code == 200 and r.json()["text"] == reference.beam_search("ab", 3, 2, stop_token=0).texts
        r = httpx.post(url + "/v1/completions", json={"prompt": "hello", "max_tokens": 0, "echo": True, "logprobs": 1},
                       timeout=60)
        assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["tokens"]) == 5


def test_serving_benchmark_cpu_smoke(tmp_path, capsys):
    """bench/bench_serving.py --cpu-smoke runs both schedulers end to end and writes its rows."""
    import json

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                    "bench"))
    import bench_serving

    out = tmp_path / "serving.json"
    assert bench_serving.main(["--cpu-smoke", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["scheduler"] for r in rows] == ["static", "continuous"]
    for row in rows:
        assert row["requests"] == 8 and row["output_tokens_per_s"] > 0 and row["ttft_p99_ms"] >= row["ttft_p50_ms"]
    assert "itl_p99_ms" in capsys.readouterr().out


def test_slots_from_a_memory_buffer(engines):
    """--inference-dynamic-batching-buffer-size-gb: as many slots as the buffer holds, capped by
    --inference-max-requests; a buffer too small for one sequence is an error naming the flag."""
    import argparse

    from gigatron.core.inference.continuous import slot_bytes, slots_for_buffer

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                    "tools"))
    from run_text_generation_server import dynamic_slots

    engine, _ = engines
    per_slot = slot_bytes(engine.model, 64)
    assert per_slot == 2 * 2 * 64 * 4 * 8 * 4  # k and v, 2 layers, 64 positions, 4 groups, head dim 8, fp32
    gib = 10.5 * per_slot / 2 ** 30
    assert slots_for_buffer(engine.model, 64, gib) == 10
    assert engine.context().nbytes() == engine.max_batch_size * per_slot  # the same count as the cache holds
    args = argparse.Namespace(inference_max_requests=None, inference_dynamic_batching_buffer_size_gb=gib)
    assert dynamic_slots(args, engine) == 10
    args.inference_max_requests = 4
    assert dynamic_slots(args, engine) == 4
    with pytest.raises(ValueError, match="--inference-dynamic-batching-buffer-size-gb .* holds no sequence"):
        slots_for_buffer(engine.model, 64, per_slot / 2 / 2 ** 30)


def test_prefill_budget_spreads_long_prompts_and_groups_short_ones(engines):
    """A step reads at most --inference-prefill-chunk-size prompt tokens, oldest prompt first: three
    short prompts start in one step; a long one takes several steps while the others decode."""
    engine, _ = engines
    batcher = ContinuousBatcher(engine, max_requests=4, prefill_chunk=10)
    short = [Sequence(TOK.tokenize(p), SamplingParams(tokens_to_generate=20, top_k=1, stop_at_eod=False))
             for p in ("abc", "de", "fgh")]
    long = Sequence(TOK.tokenize("a prompt of thirty five characters"),
                    SamplingParams(tokens_to_generate=5, top_k=1, stop_at_eod=False))
    for seq in short + [long]:
        batcher.add(seq)
    batcher.step()
    assert [len(s.generated) for s in short] == [1, 1, 1] and long.prefilled == 2  # 3 + 2 + 3 + 2 = 10
    batcher.step()
    assert [len(s.generated) for s in short] == [2, 2, 2] and long.prefilled == 12
    for _ in range(3):
        batcher.step()
    assert long.prefilled == len(long.prompt) and len(long.generated) == 1 and len(short[0].generated) == 5


def test_max_tokens_to_oom_refuses_whole_batches_that_are_too_large(engines):
    """--max-tokens-to-oom (static scheduling): rows x (longest prompt + tokens) above it is a 400
    naming the token count; smaller requests run."""
    from fastapi.testclient import TestClient

    from gigatron.core.inference.broadcast import LocalRunner
    from gigatron.core.inference.server.app import build_app

    engine, _ = engines
    app = build_app(LocalRunner(engine), TOK, max_batch_size=4, max_sequence_length=64, max_tokens_to_oom=40)
    try:
        client = TestClient(app)
        r = client.put("/api", json={"prompts": ["abcd", "ab"], "tokens_to_generate": 20, "top_k": 1})
        assert r.status_code == 400 and r.json()["field"] == "tokens_to_generate"
        assert "2 rows x (4 prompt + 20 generated) = 48 exceeds the server's --max-tokens-to-oom 40" in r.json()["error"]
        r = client.post("/v1/completions", json={"prompt": "abcd", "max_tokens": 10, "n": 3, "temperature": 0})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        r = client.post("/v1/completions", json={"prompt": "abcd", "max_tokens": 10, "n": 2, "temperature": 0})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
    finally:
        app.state.scheduler.close()


def test_a_client_that_goes_away_frees_its_slot(engines):
    """With --inference-dynamic-batching a streaming client that disconnects ends its row at the next
    step (slow steps: 20 ms each) and a waiting request takes the slot."""
    import time

    from gigatron.core.inference.broadcast import LocalRunner
    from gigatron.core.inference.server.app import build_app
    from gigatron.core.inference.server.background import serve_in_background

    engine, _ = engines
    app = build_app(LocalRunner(engine), TOK, max_batch_size=4, max_sequence_length=64, dynamic_batching=True,
                    max_requests=1)
    batcher = app.state.scheduler.batcher
    step, ended = batcher.step, []

    def slow_step():
        time.sleep(0.02)
        out = step()
        ended.extend(out)
        return out

    batcher.step = slow_step
    with serve_in_background(app) as srv:
        url = srv.url
        ban = {str(TOK.eod): -100}  # no early end-of-document
        payload = {"prompt": "ab", "max_tokens": 55, "temperature": 0, "stream": True, "logit_bias": ban}
        with httpx.stream("POST", url + "/v1/completions", json=payload, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and '"text": ""' not in line:
                    break  # the first token arrived; the client leaves
        r = httpx.post(url + "/v1/completions", json={"prompt": "cd", "max_tokens": 3, "temperature": 0,
                                                      "logit_bias": ban}, timeout=30)
        assert r.status_code == 200 and len(r.json()["choices"][0]["text"]) == 3
        # The first row ended long before its 55 tokens (at 20 ms a step), which freed the one slot.
        assert ended[0].prompt == TOK.tokenize("ab") and len(ended[0].generated) < 40
