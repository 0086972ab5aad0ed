"""The OpenAI routes driven by the official `openai` client against a uvicorn on 127.0.0.1, on a
tiny model, checked against direct engine calls: completions (n, best_of, echo with prompt
log-probabilities and top_logprobs, per-chunk stream log-probabilities, stop, usage, penalties,
logit_bias, seed, stream_options.include_usage), chat completions with a chat template, models,
and OpenAI's error bodies."""

import os
import sys

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

sys.path.insert(0, os.path.dirname(__file__))
from _inference_fixtures import CharTokenizer, tiny_model  # noqa: E402

from gigatron.core.inference.broadcast import LocalRunner  # noqa: E402
from gigatron.core.inference.engine import InferenceEngine, SamplingParams  # noqa: E402
from gigatron.core.inference.server.app import build_app  # noqa: E402
from gigatron.core.inference.server.background import serve_in_background  # noqa: E402
from gigatron.core.inference.server.validation import ServerDefaults  # noqa: E402

TOK = CharTokenizer()
MODEL = "tiny-gpt"
TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module", params=["static", "continuous"])
def served(request):
    """The server with whole-batch scheduling, and with continuous batching (3 slots, prompts read
    4 tokens a step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = tiny_model(seed=11, position_embedding_type="rope")
    engine = InferenceEngine(model, TOK, max_batch_size=8)
    reference = InferenceEngine(model, TOK, max_batch_size=8)  # its own KV cache
    app = build_app(LocalRunner(engine), TOK, max_batch_size=8, max_sequence_length=engine.max_sequence_length,
                    defaults=ServerDefaults(tokens_to_generate=8), model_name=MODEL, chat_template=TEMPLATE,
                    dynamic_batching=request.param == "continuous", max_requests=3, prefill_chunk=4)
    assert type(app.state.scheduler).__name__ == ("ContinuousScheduler" if request.param == "continuous" else "Scheduler")
    with serve_in_background(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        yield client, Reference(reference, request.param == "continuous"), srv.url
    torch.set_num_threads(threads)


class Reference:
    """The engine, called directly: generate_tokens as the server's scheduler runs a request. With
    continuous batching row i of a seeded request draws alone from seed + i."""

    def __init__(self, engine, continuous):
        self.engine = engine
        self.continuous = continuous

    def generate_tokens(self, rows, params):
        if not self.continuous or params.random_seed < 0 or len(rows) == 1:
            return self.engine.generate_tokens(rows, params)
        import dataclasses

        from gigatron.core.inference.server.scheduler import _merge
        return _merge([self.engine.generate_tokens([row], dataclasses.replace(params, random_seed=params.random_seed + i))
                       for i, row in enumerate(rows)])


def _greedy(reference, prompt, n, **kw):
    return reference.generate_tokens([TOK.tokenize(prompt)], SamplingParams(tokens_to_generate=n, top_k=1, **kw))


def test_models_list(served):
    client, _, url = served
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_tokenizer_routes(served):
    """/tokenizer_info, /tokenize and /detokenize: what lm-evaluation-harness's remote tokenizer reads."""
    _, _, url = served
    info = httpx.get(url + "/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == "<eod>" and info["model_max_length"] == 64 and info["chat_template"] == TEMPLATE
    r = httpx.post(url + "/tokenize", json={"prompt": "abc", "add_special_tokens": False}, timeout=10).json()
    assert r["tokens"] == TOK.tokenize("abc") and r["count"] == 3
    assert httpx.post(url + "/tokenize", json={"prompt": "<eod>"}, timeout=10).json()["tokens"] == [TOK.eod]
    assert httpx.post(url + "/detokenize", json={"tokens": TOK.tokenize("abc")}, timeout=10).json() == {"prompt": "abc"}
    r = httpx.post(url + "/detokenize", json={"tokens": [1, 999]}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    r = httpx.post(url + "/tokenize", json={"prompt": "ABC"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_n_and_seed_equal_the_engine(served):
    client, reference, _ = served
    out = client.completions.create(model=MODEL, prompt=["ab", "cd"], n=3, max_tokens=6, temperature=1.2, seed=7)
    assert [c.index for c in out.choices] == list(range(6))
    rows = [TOK.tokenize(p) for p in ("ab", "cd") for _ in range(3)]
    ref = reference.generate_tokens(rows, SamplingParams(tokens_to_generate=6, temperature=1.2, random_seed=7))
    for choice, tokens, row in zip(out.choices, ref.tokens, rows):
        generated = [t for t in tokens[len(row):] if t != TOK.eod]
        assert choice.text == TOK.detokenize(generated)
    assert len({c.text for c in out.choices}) > 1  # the rows drew differently
    again = client.completions.create(model=MODEL, prompt=["ab", "cd"], n=3, max_tokens=6, temperature=1.2, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    assert out.usage.prompt_tokens == 4  # each prompt counted once
    assert out.usage.completion_tokens == sum(len(t) - len(r) for t, r in zip(ref.tokens, rows))


def test_best_of_returns_the_rows_with_the_best_mean_logprob(served):
    client, reference, _ = served
    out = client.completions.create(model=MODEL, prompt="ab", n=2, best_of=5, max_tokens=5, temperature=1.5,
                                    seed=3, logprobs=0)
    rows = [TOK.tokenize("ab")] * 5
    ref = reference.generate_tokens(rows, SamplingParams(tokens_to_generate=5, temperature=1.5, random_seed=3,
                                                         return_log_probs=True))
    means = []
    for tokens, lps in zip(ref.tokens, ref.logprobs):
        gen = lps[1:]  # after the two prompt tokens (log-probabilities start at token 1)
        kept = [lp for t, lp in zip(tokens[2:], gen) if t != TOK.eod]
        means.append(sum(kept) / len(kept) if kept else 0.0)
    best = sorted(range(5), key=lambda i: -means[i])[:2]
    texts = [TOK.detokenize([t for t in ref.tokens[i][2:] if t != TOK.eod]) for i in best]
    assert [c.text for c in out.choices] == texts and [c.index for c in out.choices] == [0, 1]
    assert out.usage.completion_tokens == sum(len(t) - 2 for t in ref.tokens)  # every row generated counts


def test_echo_scores_the_prompt_with_top_logprobs(served):
    client, reference, _ = served
    out = client.completions.create(model=MODEL, prompt="hello there", max_tokens=1, echo=True, logprobs=2,
                                    temperature=0)
    lp = out.choices[0].logprobs
    ref = reference.generate_tokens([TOK.tokenize("hello there")],
                                    SamplingParams(tokens_to_generate=1, top_k=1, return_log_probs=True,
                                                   top_logprobs=32, prompt_top_logprobs=True))
    assert lp.tokens[:11] == list("hello there") and len(lp.tokens) == 12
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(ref.logprobs[0], abs=1e-5)
    for i, top in enumerate(lp.top_logprobs[1:11]):  # the echoed tokens have their top 2 too
        full = ref.prompt_top_logprobs[0][i]
        want = sorted(full.items(), key=lambda x: -x[1])[:2]
        assert top == pytest.approx({TOK.detokenize([t]): v for t, v in want}, abs=1e-5)
    # Greedy: the generated token is the top one, with exactly the same number.
    assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())
    assert lp.text_offset == list(range(12))


def test_stream_sends_logprobs_with_every_chunk(served):
    client, _, _ = served
    kw = dict(model=MODEL, prompt=["hello", "ab: "], n=2, max_tokens=12, temperature=0.9, seed=5, logprobs=2,
              stop=[" x", "q"], echo=True)
    plain = client.completions.create(**kw)
    streamed = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert streamed[-1].choices == [] and streamed[-1].usage == plain.usage
    assert all(chunk.usage is None for chunk in streamed[:-1])
    got = {i: {"text": "", "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
           for i in range(4)}
    reasons = {}
    for chunk in streamed[:-1]:
        for c in chunk.choices:
            if c.text:
                assert c.logprobs is not None and c.logprobs.tokens  # a chunk with text has its tokens' logprobs
            got[c.index]["text"] += c.text
            if c.logprobs is not None:
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    got[c.index][key] += getattr(c.logprobs, key)
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    for c in plain.choices:
        assert got[c.index]["text"] == c.text
        assert reasons[c.index] == c.finish_reason
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert got[c.index][key] == getattr(c.logprobs, key), key


def test_usage_counts_the_tokens_a_stop_string_ends(served):
    client, reference, _ = served
    ref = reference.generate_tokens([TOK.tokenize("hello")], SamplingParams(tokens_to_generate=20, random_seed=4))
    generated = ref.tokens[0][5:]
    gen = TOK.detokenize(generated)
    # A two-character stop string whose first occurrence ends at generated token k (before any end-of-document).
    k = next(k for k in range(2, len(gen)) if gen.find(gen[k - 1: k + 1]) == k - 1 and TOK.eod not in generated[: k + 1])
    stop = gen[k - 1: k + 1]
    out = client.completions.create(model=MODEL, prompt="hello", max_tokens=20, temperature=1.0, seed=4, stop=stop)
    assert out.choices[0].text == gen[: k - 1] and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == k + 1  # the tokens generated, the one completing the stop string included
    assert out.usage.prompt_tokens == 5 and out.usage.total_tokens == 5 + k + 1


def _shaped_greedy(reference, prompt, steps, presence=0.0, frequency=0.0, bias=None):
    """Greedy decoding with penalties and bias computed from the model's full distribution at each
    step (one token at a time, no shared state with the server)."""
    ids = TOK.tokenize(prompt)
    counts = {}
    out = []
    for _ in range(steps):
        r = reference.generate_tokens([ids], SamplingParams(tokens_to_generate=1, top_k=1, top_logprobs=32,
                                                            stop_at_eod=False))
        full = r.top_logprobs[0][0]  # every token's log-probability (= logit - a constant)
        scores = {t: v - frequency * counts.get(t, 0) - presence * (counts.get(t, 0) > 0) + (bias or {}).get(t, 0.0)
                  for t, v in full.items()}
        token = max(sorted(scores), key=lambda t: scores[t])
        if token == TOK.eod:
            break
        out.append(token)
        counts[token] = counts.get(token, 0) + 1
        ids = ids + [token]
    return TOK.detokenize(out)


def test_penalties_and_logit_bias(served):
    client, reference, _ = served
    plain = client.completions.create(model=MODEL, prompt="abab", max_tokens=10, temperature=0).choices[0].text
    for presence, frequency in ((0.0, 2.0), (1.5, 0.0), (-1.0, 0.5)):
        out = client.completions.create(model=MODEL, prompt="abab", max_tokens=10, temperature=0,
                                        presence_penalty=presence, frequency_penalty=frequency).choices[0].text
        assert out == _shaped_greedy(reference, "abab", 10, presence, frequency)
    penalised = client.completions.create(model=MODEL, prompt="abab", max_tokens=10, temperature=0,
                                          frequency_penalty=2.0).choices[0].text
    assert penalised != plain
    z = TOK.tokenize("z")[0]
    out = client.completions.create(model=MODEL, prompt="abab", max_tokens=6, temperature=0, logit_bias={str(z): 100})
    assert out.choices[0].text == "zzzzzz"
    first = TOK.tokenize(plain[0])[0]
    out = client.completions.create(model=MODEL, prompt="abab", max_tokens=4, temperature=0,
                                    logit_bias={str(first): -100})
    assert out.choices[0].text == _shaped_greedy(reference, "abab", 4, bias={first: -100.0})
    assert not out.choices[0].text.startswith(plain[0])
    # Sampling with a ban never draws the banned token.
    out = client.completions.create(model=MODEL, prompt="abab", max_tokens=30, temperature=1.0, seed=1,
                                    logit_bias={str(first): -100})
    assert plain[0] not in out.choices[0].text


def test_errors_have_openais_shape(served):
    client, _, url = served
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="ab", suffix="cd")
    assert info.value.status_code == 400 and "suffix" in info.value.message
    assert info.value.body["param"] == "suffix" and info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.completions.create(model=MODEL, prompt="ab", presence_penalty=3)
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-9", prompt="ab")
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="ab", max_tokens=1000)
    r = httpx.get(url + "/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_chat_completions(served):
    client, reference, _ = served
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    prompt = "system: be brief\nuser: hi there\nassistant:"
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                         logprobs=True, top_logprobs=2)
    ref = _greedy(reference, prompt, 8, return_log_probs=True)
    gen = [t for t in ref.tokens[0][len(prompt):] if t != TOK.eod]
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == TOK.detokenize(gen)
    assert [e.token for e in choice.logprobs.content] == [TOK.detokenize([t]) for t in gen]
    assert [e.logprob for e in choice.logprobs.content] == pytest.approx(ref.logprobs[0][len(prompt) - 1:][:len(gen)],
                                                                          abs=1e-5)
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == e.logprob for e in choice.logprobs.content)
    assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == len(ref.tokens[0]) - len(prompt)
    assert out.object == "chat.completion" and out.model == MODEL
    # Streamed: the same text, a usage chunk at the end.
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == out.usage
    # Streamed with log-probabilities: each content chunk carries its tokens' entries.
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True))
    entries = []
    for c in chunks:
        if c.choices and c.choices[0].delta.content:
            assert c.choices[0].logprobs is not None and c.choices[0].logprobs.content
            entries += c.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob) for e in choice.logprobs.content]
    # n choices; without max_tokens the answer may run to the model's length.
    many = client.chat.completions.create(model=MODEL, messages=messages, n=3, temperature=1.0, seed=2)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.usage.completion_tokens <= 3 * (64 - len(prompt))
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "HI"}])  # not encodable


def test_chat_without_a_template_is_a_clear_400():
    model = tiny_model(seed=11)
    engine = InferenceEngine(model, TOK, max_batch_size=2)
    app = build_app(LocalRunner(engine), TOK, max_batch_size=2, max_sequence_length=64, model_name=MODEL)
    with serve_in_background(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError, match="--chat-template"):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])


def test_chat_templates_from_files(tmp_path):
    import json

    from gigatron.core.inference.server.chat import ChatTemplate, ChatTemplateError, find_chat_template, load_chat_template

    (tmp_path / "t.jinja").write_text(TEMPLATE)
    assert load_chat_template(str(tmp_path / "t.jinja")) == TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": "</s>"}))
    assert load_chat_template(str(tmp_path / "tokenizer_config.json")) == TEMPLATE
    assert find_chat_template(object(), str(tmp_path)) == TEMPLATE  # the tokenizer folder's own
    assert find_chat_template(object(), str(tmp_path / "elsewhere")) is None
    with pytest.raises(ChatTemplateError, match="no such file"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    strict = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}x")
    with pytest.raises(ChatTemplateError, match="user first"):
        strict.render([{"role": "system", "content": "s"}])
    sandboxed = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        sandboxed.render([{"role": "user", "content": "s"}])
