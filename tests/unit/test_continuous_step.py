"""The continuous batch's static-shape decode step (continuous.SlotDecodeStep): rows padded to a
batch-size bucket, tokens and positions in one static buffer, the decode-attention kernel over
each row's own valid slots; captured in CUDA graphs on a GPU. It must give what the eager step (the
model's forward over the slots in use) gives, with one read of the device per step."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _inference_fixtures import CharTokenizer, tiny_model  # noqa: E402

from gigatron.core.inference.continuous import ContinuousBatcher, Sequence, step_buckets  # noqa: E402
from gigatron.core.inference.engine import InferenceEngine, SamplingParams  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOK = CharTokenizer()
PROMPTS = ["hello", "a much longer prompt than the others, read in chunks", "ab", "the cat", "x", "zzz top",
           "one two three four", "q"]


def _params(i):
    if i == 3:
        return SamplingParams(tokens_to_generate=9, temperature=0.9, top_p=0.9, random_seed=11, top_logprobs=2)
    if i == 5:
        return SamplingParams(tokens_to_generate=7, top_k=1, frequency_penalty=1.0, presence_penalty=0.5,
                              logit_bias=((TOK.tokenize("e")[0], 2.0),))
    return SamplingParams(tokens_to_generate=3 + (5 * i) % 11, top_k=1, stop_at_eod=i % 2 == 0,
                          return_log_probs=True, top_logprobs=2 if i % 3 else 0, prompt_top_logprobs=i == 1)


def _run(engine, static: bool, max_requests=5, **kw):
    """The same joins and leaves: two sequences now, the others one every other step."""
    batcher = ContinuousBatcher(engine, max_requests=max_requests, prefill_chunk=6, static_step=static, **kw)
    seqs = [Sequence(TOK.tokenize(p), _params(i), seed=_params(i).random_seed) for i, p in enumerate(PROMPTS)]
    pending = list(seqs)
    batcher.add(pending.pop(0))
    batcher.add(pending.pop(0))
    step = 0
    while batcher.busy() or pending:
        if pending and step % 2 == 1:
            batcher.add(pending.pop(0))
        batcher.step()
        step += 1
    return batcher, seqs


def _assert_same(seqs, want, tol):
    for got, ref in zip(seqs, want):
        assert got.done and got.generated == ref.generated, got.prompt
        assert got.logprobs == pytest.approx(ref.logprobs, abs=tol)
        assert got.prompt_logprobs == pytest.approx(ref.prompt_logprobs, abs=tol)
        assert [sorted(t) for t in got.top_logprobs] == [sorted(t) for t in ref.top_logprobs]
        assert [sorted(t) for t in got.prompt_top_logprobs] == [sorted(t) for t in ref.prompt_top_logprobs]


@pytest.fixture(scope="module", params=["rope", "learned_absolute"])
def engine(request):
    return InferenceEngine(tiny_model(seed=3, position_embedding_type=request.param), TOK, max_batch_size=4)


def test_step_buckets():
    assert step_buckets(1) == [1]
    assert step_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert step_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert step_buckets(64, 4) == [16, 32, 48, 64]  # --inference-dynamic-batching-num-cuda-graphs 4
    assert step_buckets(3, 8) == [1, 2, 3]
    with pytest.raises(ValueError, match="num-cuda-graphs"):
        step_buckets(8, 0)


def test_static_step_equals_the_eager_step_as_sequences_join_and_leave(engine):
    """Tokens equal (greedy, seeded sampling, penalties and bias), log-probabilities to float
    rounding, while the running rows change bucket (1, 2, 4 and the padded 5)."""
    _, want = _run(engine, static=False)
    batcher, seqs = _run(engine, static=True)
    assert batcher.decoder is not None and batcher.decoder.compiled >= {1, 2, 4}
    assert max(batcher.decoder.compiled) == 5
    _assert_same(seqs, want, 1e-5)


def test_static_step_with_fewer_buckets_pads_more_rows(engine):
    """--inference-dynamic-batching-num-cuda-graphs 1: every step runs all 5 rows, the same results."""
    _, want = _run(engine, static=False)
    batcher, seqs = _run(engine, static=True, graph_buckets=[5])
    assert batcher.decoder.compiled == {5}
    _assert_same(seqs, want, 1e-5)


def test_bad_buckets_are_refused(engine):
    with pytest.raises(ValueError, match="rise from >= 1 to --inference-max-requests 5"):
        ContinuousBatcher(engine, max_requests=5, static_step=True, graph_buckets=[2, 4])


def test_each_step_reads_the_device_once(engine, monkeypatch):
    """Tokens, log-probabilities, top log-probabilities and the prompt scores of sequences taking
    their first token arrive in one read per step (one copy into pinned memory on a GPU)."""
    reads = []
    original = ContinuousBatcher._read

    def counted(self, tensors):
        reads.append(self.steps)
        return original(self, tensors)

    monkeypatch.setattr(ContinuousBatcher, "_read", counted)
    batcher, seqs = _run(engine, static=True)
    assert len(reads) == len(set(reads))  # never twice in a step
    assert len(reads) >= max(len(s.generated) for s in seqs)  # and in every step that made tokens
    assert len(reads) < batcher.steps  # steps that only read a prompt chunk read nothing


def test_the_engine_decode_mode_picks_the_step():
    """decode_mode "compiled" (on CPU: the compiled step, no graph) decodes through the static
    step by default; "eager" through the model's own forward."""
    model = tiny_model(seed=3, position_embedding_type="rope")
    assert ContinuousBatcher(InferenceEngine(model, TOK), max_requests=2).decoder is None
    assert ContinuousBatcher(InferenceEngine(model, TOK, decode_mode="compiled"), max_requests=2).decoder is not None


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["cuda_graph", "compiled"])
def test_graph_step_equals_the_eager_step_on_gpu(mode):
    """On a GPU (fp32 model): the CUDA-graph step gives the eager step's tokens and, to float
    rounding, its log-probabilities."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    model = tiny_model(seed=3, position_embedding_type="rope").cuda()
    _, want = _run(InferenceEngine(model, TOK), static=False)
    batcher, seqs = _run(InferenceEngine(model, TOK, decode_mode=mode), static=None)
    assert set(batcher.decoder.graphs) >= {1, 2, 4}
    _assert_same(seqs, want, 1e-4)


@pytest.mark.gpu
def test_graph_steps_do_not_synchronise_the_gpu():
    """After the graphs are captured, greedy decode steps never synchronise implicitly (a
    .item()/.tolist() on a device tensor, a copy from pageable memory): the only wait is for the
    step's one copy into pinned memory (torch.cuda.set_sync_debug_mode turns the others into
    errors)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    model = tiny_model(seed=3, position_embedding_type="rope").cuda()
    engine = InferenceEngine(model, TOK, decode_mode="cuda_graph")
    batcher = ContinuousBatcher(engine, max_requests=4, prefill_chunk=64)
    params = SamplingParams(tokens_to_generate=30, top_k=1, stop_at_eod=False, top_logprobs=2)
    for prompt in ("hello", "ab", "the cat", "xyz"):
        batcher.add(Sequence(TOK.tokenize(prompt), params))
    for _ in range(3):  # prefill, then capture the 4-row graph
        batcher.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            batcher.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(len(s.generated) == 22 for s in batcher.slots)  # the static step's tokens are taken one step late


def test_megatron_dynamic_batching_flags_reach_the_scheduler(engine):
    """--inference-dynamic-batching-max-requests (another name of --inference-max-requests),
    --inference-dynamic-batching-num-cuda-graphs and --inference-dynamic-batching-max-tokens parse
    in the server tool and arrive in the continuous batcher."""
    import argparse

    from gigatron.core.inference.broadcast import LocalRunner
    from gigatron.core.inference.server.app import build_app

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                    "tools"))
    from run_text_generation_server import add_text_generate_args

    parser = add_text_generate_args(argparse.ArgumentParser())
    args = parser.parse_args(["--inference-dynamic-batching", "--inference-dynamic-batching-max-requests", "6",
                              "--inference-dynamic-batching-num-cuda-graphs", "3",
                              "--inference-dynamic-batching-max-tokens", "9"])
    assert (args.inference_max_requests, args.inference_dynamic_batching_num_cuda_graphs,
            args.inference_dynamic_batching_max_tokens) == (6, 3, 9)
    app = build_app(LocalRunner(engine), TOK, max_batch_size=4, max_sequence_length=64, dynamic_batching=True,
                    max_requests=args.inference_max_requests, num_cuda_graphs=3, max_step_tokens=9)
    try:
        batcher = app.state.scheduler.batcher
        assert batcher.max_requests == 6 and batcher.graph_buckets == [2, 4, 6] and batcher.max_step_tokens == 9
    finally:
        app.state.scheduler.close()
    with pytest.raises(ValueError, match="--inference-dynamic-batching-max-tokens 3 is below the 4 sequences"):
        ContinuousBatcher(engine, max_requests=4, max_step_tokens=3)


def test_max_step_tokens_counts_decoded_and_prompt_tokens(engine):
    """With --inference-dynamic-batching-max-tokens 6 and two sequences decoding, a step reads at
    most 4 prompt tokens (the prefill chunk alone would allow 20)."""
    batcher = ContinuousBatcher(engine, max_requests=3, prefill_chunk=20, max_step_tokens=6)
    params = SamplingParams(tokens_to_generate=20, top_k=1, stop_at_eod=False)
    short = [Sequence(TOK.tokenize(p), params) for p in ("ab", "cd")]
    for seq in short:
        batcher.add(seq)
    batcher.step()  # both prompts (4 tokens) read, first tokens taken
    long = Sequence(TOK.tokenize("a long prompt of many characters"), params)
    batcher.add(long)
    batcher.step()
    assert long.prefilled == 4 and [len(s.generated) for s in short] == [2, 2]
    batcher.step()
    assert long.prefilled == 8


def test_warm_up_runs_every_bucket_before_any_sequence(engine):
    """The server prepares every batch size's step before it listens (a GPU captures the graphs
    there); the results after it are unchanged."""
    _, want = _run(engine, static=False)
    batcher = ContinuousBatcher(engine, max_requests=5, prefill_chunk=6, static_step=True)
    batcher.warm_up()
    assert batcher.decoder.compiled == {1, 2, 4, 5}
    seq = Sequence(TOK.tokenize(PROMPTS[0]), _params(0))
    batcher.add(seq)
    with pytest.raises(RuntimeError, match="before any sequence"):
        batcher.step()
        batcher.warm_up()
    while batcher.busy():
        batcher.step()
    assert seq.generated == want[0].generated and batcher.slots == [None] * 5


def test_static_step_learns_of_stops_one_step_late_and_reuses_the_slot(engine):
    """The static step takes a step's tokens while the next step runs: a sequence ended by its
    callback (a stop string) or by end-of-document decodes once more, and that token is dropped;
    the waiting sequence then takes the slot. Everything equals the eager step."""
    def run(static):
        batcher = ContinuousBatcher(engine, max_requests=1, prefill_chunk=4, static_step=static)
        seen = []
        first = Sequence(TOK.tokenize("hello"), SamplingParams(tokens_to_generate=20, top_k=1, stop_at_eod=False),
                         on_token=lambda token, lp, top, prompt: seen.append(token) or len(seen) == 3)
        second = Sequence(TOK.tokenize("the cat"), SamplingParams(tokens_to_generate=6, top_k=1, logit_bias=(
            (TOK.eod, 100.0),)))  # the end-of-document token at once: ends after one token
        third = Sequence(TOK.tokenize("ab"), SamplingParams(tokens_to_generate=5, top_k=1, stop_at_eod=False))
        for seq in (first, second, third):
            batcher.add(seq)
        steps = 0
        while batcher.busy():
            batcher.step()
            steps += 1
        return [first, second, third], steps

    want, _ = run(False)
    got, steps = run(True)
    assert [len(s.generated) for s in got] == [3, 1, 5] and got[1].generated == [TOK.eod]
    for g, w in zip(got, want):
        assert g.generated == w.generated and g.logprobs == pytest.approx(w.logprobs, abs=1e-5)
    assert steps < 20


def test_clear_forgets_pending_results(engine):
    """After a failed step the server forgets every sequence, including results the static step has
    not taken yet; the batcher is idle and serves the next sequence."""
    batcher = ContinuousBatcher(engine, max_requests=2, prefill_chunk=8, static_step=True)
    batcher.add(Sequence(TOK.tokenize("hello"), SamplingParams(tokens_to_generate=5, top_k=1)))
    batcher.step()
    assert batcher._pending is not None
    batcher.clear()
    assert not batcher.busy()
    seq = Sequence(TOK.tokenize("ab"), SamplingParams(tokens_to_generate=3, top_k=1, stop_at_eod=False))
    batcher.add(seq)
    while batcher.busy():
        batcher.step()
    assert seq.done and len(seq.generated) == 3


def test_server_answers_equal_with_the_static_step(engine, monkeypatch):
    """The OpenAI route through --inference-dynamic-batching answers the same with the static step
    (tokens taken one step late, stop strings seen one step late) as with the eager step: texts,
    finish reasons, usage and log-probabilities, streamed or not, with requests joining and leaving."""
    import json

    from fastapi.testclient import TestClient

    from gigatron.core.inference import continuous
    from gigatron.core.inference.broadcast import LocalRunner
    from gigatron.core.inference.server.app import build_app

    requests = [
        {"prompt": "hello", "max_tokens": 9, "temperature": 0, "logprobs": 2, "stop": ["e"]},
        {"prompt": "the cat", "max_tokens": 6, "temperature": 0, "echo": True, "logprobs": 1},
        {"prompt": "ab", "max_tokens": 12, "temperature": 0.8, "seed": 5, "n": 2},
        {"prompt": "one two", "max_tokens": 7, "temperature": 0, "stream": True, "logprobs": 2,
         "stream_options": {"include_usage": True}},
        {"prompt": "x", "max_tokens": 5, "temperature": 0, "frequency_penalty": 1.0, "stop": ["a", "b"]},
    ]

    def serve(static):
        if static:
            class Static(continuous.ContinuousBatcher):
                def __init__(self, *args, **kw):
                    super().__init__(*args, static_step=True, **kw)

            monkeypatch.setattr(continuous, "ContinuousBatcher", Static)
        app = build_app(LocalRunner(engine), TOK, max_batch_size=4, max_sequence_length=64, dynamic_batching=True,
                        max_requests=3, prefill_chunk=4)
        try:
            client = TestClient(app)
            assert (app.state.scheduler.batcher.decoder is not None) == static
            answers = []
            for body in requests:
                r = client.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                if body.get("stream"):
                    chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                              if line.startswith("data: ") and line != "data: [DONE]"]
                    answers.append([(c["choices"][0]["text"] if c["choices"] else None, c.get("usage"))
                                    for c in chunks])
                else:
                    answer = r.json()
                    answers.append([(c["text"], c["finish_reason"], c["logprobs"]) for c in answer["choices"]]
                                   + [answer["usage"]])
            return answers
        finally:
            app.state.scheduler.close()
            monkeypatch.undo()

    def close(a, b):
        if isinstance(a, float) or isinstance(b, float):
            return a == pytest.approx(b, abs=1e-5)
        if isinstance(a, (list, tuple)):
            return isinstance(b, (list, tuple)) and len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
        return a == b

    want = serve(False)
    got = serve(True)
    assert len(got) == len(want) == len(requests)
    for g, w in zip(got, want):
        assert close(g, w), (g, w)


@pytest.mark.slow
def test_compiled_static_step_equals_the_eager_step():
    """decode_mode "compiled" (on CPU: the step compiled by torch.compile, no graph; about a
    minute): the same tokens and log-probabilities as the eager step. The compiled step mutates the
    whole cache tensors it is given (no row views)."""
    model = tiny_model(seed=3, position_embedding_type="rope")

    def run(mode):
        batcher = ContinuousBatcher(InferenceEngine(model, TOK, decode_mode=mode), max_requests=2, prefill_chunk=8,
                                    graph_buckets=[2], static_step=True)
        seqs = [Sequence(TOK.tokenize(p), SamplingParams(tokens_to_generate=6, top_k=1, stop_at_eod=False,
                                                         top_logprobs=2)) for p in ("hello", "ab", "xyz")]
        for seq in seqs:
            batcher.add(seq)
        while batcher.busy():
            batcher.step()
        return seqs

    for got, want in zip(run("compiled"), run("eager")):
        assert got.generated == want.generated and got.logprobs == pytest.approx(want.logprobs, abs=1e-5)


def test_a_hybrid_model_keeps_the_eager_step():
    """The static step is the GPT decode step: a Mamba / hybrid model decodes through the eager
    step even under a captured decode mode, and asking for the static step names the fix."""
    from test_mamba_generation import hybrid_model

    engine = InferenceEngine(hybrid_model("M*"), TOK, decode_mode="compiled")
    assert ContinuousBatcher(engine, max_requests=2).decoder is None
    with pytest.raises(ValueError, match="Mamba or hybrid model decodes through the eager step"):
        ContinuousBatcher(engine, max_requests=2, static_step=True)
