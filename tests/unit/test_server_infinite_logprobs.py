"""Log-probabilities of -inf (tokens the model or the sampling rules made impossible) reach the
client as -9999.0, as OpenAI sends them: JSON has no infinity, and sending it made a valid
request fail with HTTP 500."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _inference_fixtures import CharTokenizer, tiny_model  # noqa: E402

from gigatron.core.inference.broadcast import LocalRunner  # noqa: E402
from gigatron.core.inference.engine import InferenceEngine  # noqa: E402
from gigatron.core.inference.server.app import build_app  # noqa: E402
from gigatron.core.inference.server.completions import (  # noqa: E402
    LOWEST_LOGPROB,
    chat_logprobs,
    completion_logprobs,
    json_logprob,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOK = CharTokenizer()


def test_json_logprob():
    assert json_logprob(float("-inf")) == LOWEST_LOGPROB == -9999.0
    assert json_logprob(float("nan")) == LOWEST_LOGPROB
    assert json_logprob(-1.5) == -1.5 and json_logprob(None) is None
    block = completion_logprobs(TOK, ["a", "b"], [None, float("-inf")], [None, {1: -0.1, 2: float("-inf")}], 2, 0)
    assert block["token_logprobs"] == [None, -9999.0] and block["top_logprobs"][1] == {"a": -0.1, "b": -9999.0}
    chat = chat_logprobs(TOK, ["b"], [float("-inf")], [{1: -0.1, 2: float("-inf")}], 2)["content"][0]
    assert chat["logprob"] == -9999.0 and [e["logprob"] for e in chat["top_logprobs"]] == [-0.1, -9999.0]


@pytest.fixture(scope="module", params=["static", "continuous"])
def client(request):
    from fastapi.testclient import TestClient

    engine = InferenceEngine(tiny_model(seed=5), TOK, max_batch_size=4)
    full_logits = engine._full_logits

    def only_three_tokens(logits):  # every token but 1, 2 and 3 impossible: -inf logits
        out = full_logits(logits).clone()
        out[..., 4:] = float("-inf")
        out[..., 0] = float("-inf")
        return out

    engine._full_logits = only_three_tokens
    app = build_app(LocalRunner(engine), TOK, max_batch_size=4, max_sequence_length=64,
                    dynamic_batching=request.param == "continuous", max_requests=2)
    try:
        yield TestClient(app)
    finally:
        app.state.scheduler.close()


def _values(x):
    if isinstance(x, dict):
        return [v for value in x.values() for v in _values(value)]
    if isinstance(x, list):
        return [v for value in x for v in _values(value)]
    return [x] if isinstance(x, float) else []


def test_completions_with_top_logprobs_of_impossible_tokens(client):
    r = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 3, "temperature": 0, "logprobs": 5,
                                             "echo": True})
    assert r.status_code == 200, r.text
    block = r.json()["choices"][0]["logprobs"]
    tops = [t for t in block["top_logprobs"] if t]
    assert all(len(t) == 5 for t in tops)
    assert all(sorted(t.values())[:2] == [-9999.0, -9999.0] for t in tops)  # two of the five are impossible
    assert all(math.isfinite(v) for v in _values(block))
    r = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 3, "temperature": 0, "logprobs": 5,
                                             "stream": True})
    assert r.status_code == 200 and "Infinity" not in r.text and "-9999.0" in r.text


def test_megatron_api_logprobs_stay_finite(client):
    r = client.put("/api", json={"prompts": ["ab"], "tokens_to_generate": 2, "top_k": 1, "logprobs": True})
    assert r.status_code == 200 and all(math.isfinite(v) for v in _values(r.json()["logprobs"]))
