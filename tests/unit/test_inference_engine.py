"""Generation engine: KV-cached decoding against full recomputation, batching, sampling masks,
seeds, stop rules, scoring, padded vocabulary and beam search against brute force; rows that stop
at different steps against a step-by-step reference loop (with the all-stopped check read at once
and one step late); the kv-bucket choice; a decode step that never reads the device on the host."""

import contextlib
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _inference_fixtures import PADDED_VOCAB, CharTokenizer, assert_decode_steps_never_synchronize, tiny_model  # noqa: E402

import gigatron.core.inference.engine as engine_module  # noqa: E402
from gigatron.core.inference.engine import InferenceEngine, PromptTooLongError, SamplingParams  # noqa: E402
from gigatron.core.inference.kv_cache import InferenceContext, decode_kv_bucket, decode_kv_buckets  # noqa: E402
from gigatron.core.inference.sampling import draw_from, greedy_tokens, sample, top_k_mask, top_p_mask  # noqa: E402

TOK = CharTokenizer()
V = TOK.vocab_size


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


MODELS = {
    "learned": dict(),
    "rope_gqa_swiglu": dict(position_embedding_type="rope", num_query_groups=2, group_query_attention=True,
                            swiglu=True, normalization="RMSNorm", add_bias_linear=False),
}


def _model(kind="learned", seed=7):
    return tiny_model(seed=seed, **MODELS[kind])


@torch.no_grad()
def naive_generate(model, prompt, steps, pick):
    """Reference: recompute the whole sequence every step; stop after the end-of-document token."""
    tokens = list(prompt)
    logprobs = []
    for _ in range(steps):
        logits = model(torch.tensor([tokens]))[-1, 0, :V].float()  # [V]
        token = int(pick(logits))
        logprobs.append(float(F.log_softmax(logits, -1)[token]))
        tokens.append(token)
        if token == TOK.eod:
            break
    return tokens, logprobs


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_cached_greedy_equals_recompute(kind):
    model = _model(kind)
    engine = InferenceEngine(model, TOK, max_batch_size=4)
    prompt = TOK.tokenize("hello there")
    out = engine.generate_tokens([prompt], SamplingParams(tokens_to_generate=20, top_k=1, return_log_probs=True))
    ref_tokens, ref_lp = naive_generate(model, prompt, 20, lambda logits: logits.argmax())
    assert out.tokens[0] == ref_tokens
    torch.testing.assert_close(torch.tensor(out.logprobs[0][len(prompt) - 1:]), torch.tensor(ref_lp),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_cached_sampling_equals_recompute(kind):
    model = _model(kind)
    engine = InferenceEngine(model, TOK, max_batch_size=4)
    prompt = TOK.tokenize("a cat: ")
    params = SamplingParams(tokens_to_generate=25, temperature=0.8, top_p=0.95, random_seed=11,
                            return_log_probs=True, stop_at_eod=True)
    out = engine.generate_tokens([prompt], params)
    gen = torch.Generator().manual_seed(11)
    ref_tokens, ref_lp = naive_generate(
        model, prompt, 25, lambda logits: sample(logits[None], top_p=0.95, temperature=0.8, generator=gen)[0])
    assert out.tokens[0] == ref_tokens
    torch.testing.assert_close(torch.tensor(out.logprobs[0][len(prompt) - 1:]), torch.tensor(ref_lp),
                               rtol=1e-4, atol=1e-4)


def test_batch_of_different_lengths_equals_one_at_a_time():
    model = _model("rope_gqa_swiglu")
    engine = InferenceEngine(model, TOK, max_batch_size=4)
    prompts = ["a", "the quick brown fox", "hi: ", "jumps over the"]
    params = SamplingParams(tokens_to_generate=12, top_k=1, return_log_probs=True)
    batched = engine.generate(prompts, params)
    for i, prompt in enumerate(prompts):
        single = engine.generate([prompt], params)
        assert batched.tokens[i] == single.tokens[0]
        assert batched.texts[i] == single.texts[0]
        assert batched.segments[i] == [TOK.detokenize([t]) for t in single.tokens[0]]
        torch.testing.assert_close(torch.tensor(batched.logprobs[i]), torch.tensor(single.logprobs[0]),
                                   rtol=1e-4, atol=1e-4)
        assert len(single.logprobs[0]) == len(single.tokens[0]) - 1


def test_seeded_sampling_repeats_and_seeds_differ():
    engine = InferenceEngine(_model(), TOK, max_batch_size=4)
    params = dict(tokens_to_generate=30, temperature=1.5, stop_at_eod=False)
    a = engine.generate(["abc", "xyz"], SamplingParams(random_seed=5, **params))
    b = engine.generate(["abc", "xyz"], SamplingParams(random_seed=5, **params))
    c = engine.generate(["abc", "xyz"], SamplingParams(random_seed=6, **params))
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_top_k_and_top_p_masks_against_formulas():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 17, generator=g)
    for k in (1, 3, 17):
        mask = top_k_mask(logits, k)
        for row in range(5):
            kept = set(torch.argsort(logits[row], descending=True)[:k].tolist())
            assert {i for i in range(17) if not mask[row, i]} == kept
    for p in (0.05, 0.5, 0.9, 1.0):
        mask = top_p_mask(logits, p)
        probs = torch.softmax(logits, -1)
        for row in range(5):
            order = torch.argsort(probs[row], descending=True).tolist()
            kept, mass = set(), 0.0
            for i in order:  # keep tokens until the kept mass reaches p
                kept.add(i)
                mass += float(probs[row, i])
                if mass > p:
                    break
            assert {i for i in range(17) if not mask[row, i]} == kept
    # Sampling with top_k=2 only ever draws the two most likely tokens.
    draws = torch.stack([sample(logits, top_k=2, generator=g) for _ in range(50)])  # [50, 5]
    top2 = torch.topk(logits, 2, -1).indices  # [5, 2]
    assert bool(((draws[..., None] == top2[None]).any(-1)).all())
    assert torch.equal(sample(logits, top_k=1), logits.argmax(-1))


def _force(model, token_ids, bonus=1e4):
    """Forward hook that makes the given (padded-vocabulary) logits win."""
    def hook(module, args, output):
        logits, bias = output
        logits = logits.clone()
        logits[..., token_ids] += bonus
        return logits, bias
    return model.output_layer.register_forward_hook(hook)


def test_padded_vocabulary_never_sampled():
    model = _model()
    handle = _force(model, list(range(V, PADDED_VOCAB)))
    engine = InferenceEngine(model, TOK, max_batch_size=2)
    out = engine.generate(["abc", "de"], SamplingParams(tokens_to_generate=20, temperature=2.0, random_seed=1,
                                                         return_log_probs=True, stop_at_eod=False))
    handle.remove()
    assert all(0 <= t < V for row in out.tokens for t in row)
    assert all(math.isfinite(x) for row in out.logprobs for x in row)


def test_stop_rules_per_row():
    model = _model()
    newline, colon = TOK.index["\n"], TOK.index[":"]
    handle = _force(model, [newline])
    engine = InferenceEngine(model, TOK, max_batch_size=2)
    out = engine.generate(["ab", "cdef"], SamplingParams(tokens_to_generate=10, top_k=1, stop_on_eol=True))
    assert out.texts == ["ab\n", "cdef\n"]
    out = engine.generate(["ab"], SamplingParams(tokens_to_generate=10, top_k=1, stop_on_double_eol=True))
    assert out.texts == ["ab\n\n"]
    out = engine.generate(["ab:"], SamplingParams(tokens_to_generate=3, top_k=1, prevent_newline_after_colon=True))
    row = out.tokens[0]
    assert all(not (a == colon and b == newline) for a, b in zip(row, row[1:]))
    assert row[3] != newline
    handle.remove()
    # End of document stops one row while the other goes on.
    handle = _force(model, [TOK.eod])
    out = engine.generate(["ab", "cd"], SamplingParams(tokens_to_generate=5, top_k=1))
    handle.remove()
    assert out.texts == ["ab<eod>", "cd<eod>"]
    assert colon in TOK.tokenize("x:")


def test_scoring_mode_and_add_bos():
    model = _model()
    engine = InferenceEngine(model, TOK, max_batch_size=2)
    out = engine.generate(["hello", "hi"], SamplingParams(tokens_to_generate=0, return_log_probs=True, add_BOS=True))
    for text, tokens, lps in zip(["hello", "hi"], out.tokens, out.logprobs):
        ids = [TOK.eod] + TOK.tokenize(text)
        assert tokens == ids
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[:, 0, :V].float()  # [s, V]
        ref = F.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(lps), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="scoring"):
        engine.generate(["hi"], SamplingParams(tokens_to_generate=0))
    with pytest.raises(ValueError, match="add_BOS"):
        engine.generate([""], SamplingParams(tokens_to_generate=3))
    with pytest.raises(PromptTooLongError, match="positions"):
        engine.generate(["a" * 60], SamplingParams(tokens_to_generate=10))
    with pytest.raises(ValueError, match="cannot be combined"):
        engine.generate(["a"], SamplingParams(top_k=3, top_p=0.5))


def test_top_p_decay_and_top_logprobs():
    engine = InferenceEngine(_model(), TOK, max_batch_size=2)
    out = engine.generate(["abc"], SamplingParams(tokens_to_generate=6, top_p=0.9, top_p_decay=0.5, top_p_bound=0.1,
                                                  random_seed=3, return_log_probs=True, top_logprobs=3,
                                                  stop_at_eod=False))
    assert len(out.top_logprobs[0]) == 6
    for step, (entry, lp) in enumerate(zip(out.top_logprobs[0], out.logprobs[0][2:])):
        assert len(entry) == 3
        token = out.tokens[0][3 + step]
        # From the second step top_p <= 0.45 and the nucleus rarely holds more than the best token.
        assert lp <= max(entry.values()) + 1e-6
        if token in entry:
            assert abs(entry[token] - lp) < 1e-5


def test_beam_search_against_brute_force():
    model = _model(seed=3)
    engine = InferenceEngine(model, TOK, max_batch_size=V)
    prompt = TOK.tokenize("ab")
    # Beam width = vocabulary: after one step every prefix is kept, so two steps are exact.
    beams = engine.beam_search_tokens(prompt, 2, beam_width=V, stop_token=10 ** 6, length_penalty=1.0)
    with torch.no_grad():
        first = F.log_softmax(model(torch.tensor([prompt]))[-1, 0, :V].float(), -1)  # [V]
        seqs = [prompt + [a] for a in range(V)]
        second = F.log_softmax(model(torch.tensor(seqs))[-1, :, :V].float(), -1)  # [V, V]
    total = first[:, None] + second  # [V, V]
    best = torch.topk(total.view(-1), V)
    ref = [(prompt + list(divmod(int(i), V)), float(s) / (len(prompt) + 2)) for s, i in zip(best.values, best.indices)]
    assert [t for t, _ in ref] == beams.tokens
    torch.testing.assert_close(torch.tensor(beams.scores), torch.tensor([s for _, s in ref]), rtol=1e-4, atol=1e-4)


def test_beam_search_stop_token_finishes_hypotheses():
    model = _model(seed=3)
    handle = _force(model, [TOK.eod], bonus=5.0)
    engine = InferenceEngine(model, TOK, max_batch_size=4)
    beams = engine.beam_search("ab", 6, beam_width=3, stop_token=TOK.eod, length_penalty=1.0)
    handle.remove()
    assert len(beams.tokens) == 3
    assert beams.tokens[0] == TOK.tokenize("ab") + [TOK.eod]
    assert beams.scores == sorted(beams.scores, reverse=True)
    assert beams.texts[0] == "ab<eod>"


def test_kv_cache_writes_in_place():
    model = _model()
    ctx = InferenceContext.for_model(model, 2, 16)
    pointers = [t.data_ptr() for t in ctx.key_cache.values()]
    engine = InferenceEngine(model, TOK, max_batch_size=2, max_sequence_length=16)
    engine._context = ctx
    engine.generate(["abc"], SamplingParams(tokens_to_generate=4, top_k=1))
    assert [t.data_ptr() for t in ctx.key_cache.values()] == pointers
    assert ctx.key_cache[0].shape == (2, 16, 4, 8)
    assert float(ctx.key_cache[0][0, :7].abs().sum()) > 0


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_decode_equals_eager():
    model = _model("rope_gqa_swiglu").cuda()
    eager = InferenceEngine(model, TOK, max_batch_size=4)
    graph = InferenceEngine(model, TOK, max_batch_size=4, decode_mode="cuda_graph")
    params = SamplingParams(tokens_to_generate=20, top_k=1, return_log_probs=True)
    a = eager.generate(["hello", "a b c: x"], params)
    b = graph.generate(["hello", "a b c: x"], params)
    assert a.tokens == b.tokens
    torch.testing.assert_close(torch.tensor(a.logprobs[0]), torch.tensor(b.logprobs[0]), rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------- rows stopping at different steps
NEWLINE, COLON = TOK.index["\n"], TOK.index[":"]


@torch.no_grad()
def reference_batch_generate(model, prompts, params):
    """Reference loop: every step recomputes each row's whole sequence (no cache), draws the tokens
    of all rows at once from one generator seeded like the engine's, and applies the stop rules
    row by row; a stopped row takes no more tokens. Returns (tokens, generated-token log-probs,
    top log-probs) per row."""
    generator = torch.Generator().manual_seed(params.random_seed)
    rows = [list(p) for p in prompts]
    logprobs = [[] for _ in prompts]
    tops = [[] for _ in prompts]
    active = [True] * len(prompts)
    top_p = params.top_p
    for _ in range(params.tokens_to_generate):
        logits = torch.stack([model(torch.tensor([row]))[-1, 0, :V].float() for row in rows])  # [b, V]
        if params.prevent_newline_after_colon:
            for i, row in enumerate(rows):
                if row[-1] == COLON:
                    logits[i, NEWLINE] = float("-inf")
        new = sample(logits, top_k=params.top_k, top_p=top_p, temperature=params.temperature, generator=generator)
        lp = F.log_softmax(logits, dim=-1)  # [b, V]
        for i, row in enumerate(rows):
            if not active[i]:
                continue
            token = int(new[i])
            row.append(token)
            logprobs[i].append(float(lp[i, token]))
            if params.top_logprobs:
                values, ids = lp[i].topk(params.top_logprobs)
                tops[i].append(dict(zip(ids.tolist(), values.tolist())))
            if ((params.stop_at_eod and token == TOK.eod) or (params.stop_on_eol and token == NEWLINE)
                    or (params.stop_on_double_eol and token == NEWLINE and row[-2] == NEWLINE)):
                active[i] = False
        if params.top_p_decay > 0.0 and top_p > 0.0:
            top_p = max(top_p * params.top_p_decay, params.top_p_bound)
        if not any(active):
            break
    return rows, logprobs, tops


STOP_CASES = {
    # greedy: the longest prompt's row stops first, one row runs to the end
    "greedy": dict(kind="learned", bonus=0.4, forced=[TOK.eod], params=dict(top_k=1), all_stop=False),
    # nucleus sampling: every row stops before the end, each at its own step
    "top_p": dict(kind="rope_gqa_swiglu", bonus=1.5, forced=[TOK.eod, NEWLINE],
                  params=dict(temperature=0.9, top_p=0.9, top_p_decay=0.95, top_p_bound=0.5), all_stop=True),
}
STOP_PROMPTS = ["the cat", "a", "hello: wor", "xy z:"]


@contextlib.contextmanager
def deferred_stop_check(monkeypatch, deferred: bool):
    """Make the engine read the all-rows-stopped flag one step late (as on CUDA) or at once."""
    with monkeypatch.context() as patch:
        patch.setattr(engine_module, "_defer_stop_check",
                      lambda device, on_step, tp_size: deferred and on_step is None and tp_size == 1)
        yield


def test_stop_check_is_read_at_once_under_tensor_parallelism():
    """Only the serving rank has the callback: reading the flag one step late on the other ranks
    would run them one decode step (and its collectives) past the serving rank."""
    cuda = torch.device("cuda")
    assert engine_module._defer_stop_check(cuda, None, 1)
    assert not engine_module._defer_stop_check(cuda, None, 2)
    assert not engine_module._defer_stop_check(cuda, lambda *args: None, 1)
    assert not engine_module._defer_stop_check(torch.device("cpu"), None, 1)


@pytest.mark.parametrize("case", sorted(STOP_CASES))
def test_rows_stopping_at_different_steps_equal_reference_loop(case, monkeypatch):
    spec = STOP_CASES[case]
    model = _model(spec["kind"])
    handle = _force(model, spec["forced"], bonus=spec["bonus"])
    try:
        engine = InferenceEngine(model, TOK, max_batch_size=4)
        params = SamplingParams(tokens_to_generate=16, return_log_probs=True, top_logprobs=3, stop_on_eol=True,
                                prevent_newline_after_colon=True, random_seed=5, **spec["params"])
        prompt_tokens = [TOK.tokenize(p) for p in STOP_PROMPTS]
        results = {}
        for deferred in (False, True):
            with deferred_stop_check(monkeypatch, deferred):
                results[deferred] = engine.generate_tokens(prompt_tokens, params)
        # A callback may end rows after each step (it ends none here): the same results.
        results["callback"] = engine.generate_tokens(prompt_tokens, params, on_step=lambda *args: None)
        ref_tokens, ref_logprobs, ref_tops = reference_batch_generate(model, prompt_tokens, params)
    finally:
        handle.remove()
    exact, late, callback = results[False], results[True], results["callback"]
    # Reading the flag one step late runs one more step in which no row is active: same results.
    assert (late.tokens, late.logprobs, late.top_logprobs) == (exact.tokens, exact.logprobs, exact.top_logprobs)
    assert (callback.tokens, callback.logprobs, callback.top_logprobs) == (exact.tokens, exact.logprobs,
                                                                           exact.top_logprobs)
    generated = [len(t) - len(p) for t, p in zip(exact.tokens, prompt_tokens)]
    assert len(set(generated)) >= 3, generated  # the rows really stop at different steps
    if spec["all_stop"]:
        assert max(generated) < params.tokens_to_generate, generated  # all stop early: the late check ends it
    else:
        # The longest prompt's row stops while another runs to the end: later steps attend over
        # more slots than the longest position (the host's bound), which the mask makes exact.
        longest = max(range(len(prompt_tokens)), key=lambda i: len(prompt_tokens[i]))
        assert generated[longest] < max(generated) == params.tokens_to_generate, generated
    assert exact.tokens == ref_tokens
    for i, prompt in enumerate(prompt_tokens):
        torch.testing.assert_close(torch.tensor(exact.logprobs[i][len(prompt) - 1:]), torch.tensor(ref_logprobs[i]),
                                   rtol=1e-4, atol=1e-4)
        assert len(exact.top_logprobs[i]) == generated[i] == len(ref_tops[i])
        for got, want in zip(exact.top_logprobs[i], ref_tops[i]):
            assert list(got) == list(want)
            torch.testing.assert_close(torch.tensor(list(got.values())), torch.tensor(list(want.values())),
                                       rtol=1e-4, atol=1e-4)


def test_deferred_stop_check_with_on_step_reads_at_once(monkeypatch):
    """An on_step callback that ends rows is obeyed at once whichever way the flag is read."""
    model = _model()
    engine = InferenceEngine(model, TOK, max_batch_size=2)
    params = SamplingParams(tokens_to_generate=10, top_k=1, stop_at_eod=False)
    calls = []

    def on_step(step, tokens, active):
        calls.append((step, list(active)))
        return [step == 1, step == 3]

    with deferred_stop_check(monkeypatch, True):
        out = engine.generate(["ab", "cde"], params, on_step=on_step)
    assert [len(t) for t in out.tokens] == [2 + 2, 3 + 4]
    assert calls == [(0, [True, True]), (1, [True, True]), (2, [False, True]), (3, [False, True])]


def test_greedy_tokens_equal_argmax_with_ties_and_padding():
    torch.manual_seed(0)
    for v in (1, 127, 128, 129, 50257):
        logits = torch.randn(3, v)
        logits[1] = torch.randint(0, 3, (v,)).float()  # many ties: the first maximum wins
        logits[2, -1] = 100.0  # the maximum in the padded last chunk
        assert torch.equal(greedy_tokens(logits), torch.argmax(logits, dim=-1)), v
        if v in (129, 50257):
            assert torch.equal(torch.compile(greedy_tokens)(logits), torch.argmax(logits, dim=-1)), v


def test_draw_from_equals_multinomial():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        logits = torch.randn(3, 50, generator=g) * 3
        logits[:, :10] = float("-inf")
        probs = torch.softmax(logits, -1)
        a, b = torch.Generator().manual_seed(trial), torch.Generator().manual_seed(trial)
        assert torch.equal(draw_from(probs, a), torch.multinomial(probs, 1, generator=b).view(-1))
        assert torch.equal(a.get_state(), b.get_state())


# ---------------------------------------------------------------------- kv buckets
def test_decode_kv_bucket():
    assert [decode_kv_bucket(n, 2048) for n in (1, 255, 256, 257, 512, 513, 1024, 1025, 2047, 2048)] == \
        [256, 256, 256, 512, 512, 1024, 1024, 2048, 2048, 2048]
    assert [decode_kv_bucket(n, 1500) for n in (1, 256, 300, 1024, 1025, 1500)] == [256, 256, 512, 1024, 1500, 1500]
    assert decode_kv_bucket(10, 64) == 64  # a cache shorter than the smallest bucket has one bucket
    assert decode_kv_bucket(5, 100, smallest=16) == 16
    for S in (64, 258, 1000, 2048):  # smallest covering bucket of the set {256 * 2^k < S} | {S}
        buckets = sorted({b for b in (256 * 2 ** k for k in range(8)) if b < S} | {S})
        for n in range(1, S + 1):
            assert decode_kv_bucket(n, S) == min(b for b in buckets if b >= n)
        assert decode_kv_buckets(S) == buckets
    with pytest.raises(ValueError, match="outside"):
        decode_kv_bucket(0, 64)
    with pytest.raises(ValueError, match="outside"):
        decode_kv_bucket(65, 64)
    with pytest.raises(ValueError, match="smallest"):
        decode_kv_bucket(5, 64, smallest=0)


# ---------------------------------------------------------------------- no host reads in a decode step
class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that make the host wait for a CUDA device: reading a value (item, bool(),
    int()), nonzero, masked_select, boolean-mask indexing and multinomial (whose validity check
    reads the tensor); reads of the tensors in `allowed` (host memory) are fine."""

    SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero",
               "aten::multinomial", "aten::equal", "aten::allclose"}
    INDEXING = {"aten::index", "aten::index_put_", "aten::index_put", "aten::_index_put_impl_"}

    def __init__(self, allowed):
        super().__init__()
        self.allowed = allowed
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.SYNCING:
            if not (name == "aten::_local_scalar_dense" and args[0].data_ptr() in self.allowed):
                self.reads.append(name)
        if name in self.INDEXING and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.reads.append(name + " with a boolean mask")
        return func(*args, **(kwargs or {}))


def _watch_decode_steps(monkeypatch):
    """Run the engine's step loop under _HostReads (and count .tolist() calls); returns the list
    that collects what was read."""
    reads = []
    allowed = set()

    class Check(engine_module._AllStoppedCheck):  # its flags live in host memory: reading them is free
        def __init__(self, device, deferred):
            super().__init__(device, deferred)
            if deferred:
                allowed.update(flag.data_ptr() for flag in self.flags)

    steps = InferenceEngine._decode_steps
    tolist = torch.Tensor.tolist

    def watched(self, *args, **kwargs):
        mode = _HostReads(allowed)

        def counting_tolist(tensor):
            reads.append("tolist")
            return tolist(tensor)

        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "tolist", counting_tolist)
            with mode:
                out = steps(self, *args, **kwargs)
        reads.extend(mode.reads)
        return out

    monkeypatch.setattr(engine_module, "_AllStoppedCheck", Check)
    monkeypatch.setattr(InferenceEngine, "_decode_steps", watched)
    return reads


@pytest.mark.parametrize("sampling", [dict(top_k=1), dict(top_p=0.9, temperature=0.8),
                                      dict(top_k=4, temperature=1.2)])
def test_decode_steps_read_nothing_on_the_host(sampling, monkeypatch):
    model = _model("rope_gqa_swiglu")
    handle = _force(model, [TOK.eod, NEWLINE], bonus=1.5)
    engine = InferenceEngine(model, TOK, max_batch_size=4)
    params = SamplingParams(tokens_to_generate=16, return_log_probs=True, top_logprobs=2, stop_on_eol=True,
                            prevent_newline_after_colon=True, random_seed=5, **sampling)
    prompts = [TOK.tokenize(p) for p in STOP_PROMPTS]
    try:
        expected = engine.generate_tokens(prompts, params)
        with deferred_stop_check(monkeypatch, True):
            reads = _watch_decode_steps(monkeypatch)
            out = engine.generate_tokens(prompts, params)
            assert reads == []
            assert (out.tokens, out.logprobs, out.top_logprobs) == (expected.tokens, expected.logprobs,
                                                                    expected.top_logprobs)
            # The watch sees host reads where there are some: a callback gets every step's tokens.
            engine.generate_tokens(prompts, params, on_step=lambda step, tokens, active: None)
            assert "tolist" in reads
    finally:
        handle.remove()


# ---------------------------------------------------------------------- CUDA
def _assert_greedy_equal(eager, other, prompts, steps, tolerance):
    """`other` gives eager's greedy tokens and log-probabilities, running to the end and stopping
    at end of line (rows that stop at different steps)."""
    for params in (SamplingParams(tokens_to_generate=steps, top_k=1, return_log_probs=True, stop_at_eod=False),
                   SamplingParams(tokens_to_generate=steps, top_k=1, return_log_probs=True, stop_on_eol=True)):
        a = eager.generate(prompts, params)
        b = other.generate(prompts, params)
        assert a.tokens == b.tokens
        for x, y in zip(a.logprobs, b.logprobs):
            torch.testing.assert_close(torch.tensor(x), torch.tensor(y), rtol=tolerance, atol=tolerance)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_buckets_equal_eager_across_a_bucket_boundary():
    """Positions cross the 256-slot bucket mid-generation: two graphs (256 and 512 slots) in one
    memory pool give eager's greedy tokens; rows stop at different steps."""
    model = _model("rope_gqa_swiglu").cuda()
    kwargs = dict(max_batch_size=2, max_sequence_length=600)
    eager = InferenceEngine(model, TOK, **kwargs)
    graph = InferenceEngine(model, TOK, decode_mode="cuda_graph", **kwargs)
    prompts = [("the quick brown fox jumps over the lazy dog. " * 6)[:245], "a b c: x"]
    _assert_greedy_equal(eager, graph, prompts, 24, tolerance=1e-3)
    assert {bucket for _, bucket in graph._graphs} == {256, 512}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["eager", "cuda_graph"])
def test_decode_steps_do_not_synchronize_on_cuda(mode, monkeypatch):
    """torch.cuda.set_sync_debug_mode('error') raises on any synchronizing CUDA call (item,
    nonzero, a blocking device-to-host copy) made during the decode steps."""
    model = _model("rope_gqa_swiglu").cuda()
    engine = InferenceEngine(model, TOK, max_batch_size=2, decode_mode=mode)
    prompts = [TOK.tokenize("hello there"), TOK.tokenize("a b c: x")]
    params = SamplingParams(tokens_to_generate=12, top_p=0.9, random_seed=1, return_log_probs=True, top_logprobs=2,
                            prevent_newline_after_colon=True)
    assert_decode_steps_never_synchronize(engine, prompts, params, monkeypatch)


# ---------------------------------------------------------------------- compiled decode step
@pytest.mark.slow
def test_compiled_decode_equals_eager_on_cpu(caplog):
    """decode_mode "compiled" (torch.compile of the step; on CPU without a CUDA graph) gives eager's
    greedy tokens and log-probabilities, for rows of different lengths that stop at different steps;
    it says when it compiles a shape and how long that took, once per shape."""
    model = _model("rope_gqa_swiglu")
    eager = InferenceEngine(model, TOK, max_batch_size=2)
    compiled = InferenceEngine(model, TOK, max_batch_size=2, decode_mode="compiled")
    prompts = ["hello there", "a b c: x"]
    with caplog.at_level("INFO", logger="gigatron.inference.engine"):
        _assert_greedy_equal(eager, compiled, prompts, 12, tolerance=1e-4)
    assert compiled._compiled_step is not None
    messages = [r.getMessage() for r in caplog.records if r.name == "gigatron.inference.engine"]
    assert messages[0] == ("compiling the decode step for 2 rows and 64 cache slots (torch.compile, "
                           "once per shape) ...")
    assert messages[1].startswith("compiled the decode step for 2 rows and 64 cache slots in ")
    assert len(messages) == 2  # the second generation reuses the compiled shape


@pytest.mark.slow
def test_compiled_decode_step_with_the_decode_kernels_equals_eager_on_cpu():
    """The compiled step through the engine's own decode step (decode_step.py; on CUDA the one a
    captured step runs, here with the kernels' plain-PyTorch references): one row, so every
    layer runs as fused GEMVs around the attention op and the head folds the final norm; eager's
    greedy tokens and log-probabilities."""
    from gigatron.core.inference.decode_step import DecodeStep

    model = _model("rope_gqa_swiglu")
    eager = InferenceEngine(model, TOK, max_batch_size=1)
    compiled = InferenceEngine(model, TOK, max_batch_size=1, decode_mode="compiled")
    assert compiled._decode_model is model  # on CPU captured steps run the model's own forward
    compiled._decode_model = step = DecodeStep(model)
    calls = []
    fused_layer = step._fused_layer
    step._fused_layer = lambda *a: calls.append(1) or fused_layer(*a)  # counted while traced
    _assert_greedy_equal(eager, compiled, ["hello there"], 12, tolerance=1e-4)
    assert calls


def test_decode_kernels_are_a_private_engine_option():
    from gigatron.core.inference.decode_step import DecodeKernels

    model = _model()
    with pytest.raises(TypeError):
        InferenceEngine(model, TOK, gemv=False)  # no longer public
    engine = InferenceEngine(model, TOK, _decode_kernels=DecodeKernels(gemv=False))
    assert engine._decode_model is model


@pytest.mark.parametrize("with_callback", [False, True])
def test_withdrawn_rows_end_and_a_fully_withdrawn_generation_stops(with_callback):
    """cancelled() (host only) ends the rows it names at that step; once every row is withdrawn the
    loop stops; the other rows are unchanged."""
    model = _model()
    engine = InferenceEngine(model, TOK, max_batch_size=3)
    prompts = [TOK.tokenize(p) for p in ["hello", "a cat: the", "xy"]]
    params = SamplingParams(tokens_to_generate=10, top_k=1, stop_at_eod=False)
    full = engine.generate_tokens(prompts, params).tokens
    calls = []

    def cancelled():
        calls.append(1)
        step = len(calls) - 1
        return [True] * 3 if step >= 5 else ([False, True, False] if step >= 2 else None)

    on_step = (lambda step, tokens, active: None) if with_callback else None
    out = engine.generate_tokens(prompts, params, on_step, cancelled).tokens
    assert [len(t) - len(p) for t, p in zip(out, prompts)] == [6, 3, 6]
    assert len(calls) == 6  # stopped at the step where every row was withdrawn
    assert all(o == f[:len(o)] for o, f in zip(out, full))


def test_unknown_decode_mode_is_refused():
    with pytest.raises(ValueError, match="decode_mode must be one of eager, cuda_graph, compiled"):
        InferenceEngine(_model(), TOK, decode_mode="graph")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["cuda_graph", "compiled"])
def test_bf16_graph_decode_with_gemv_scores_like_eager(mode, monkeypatch):
    """bf16 at batch 1 on CUDA: the captured step runs the Triton GEMV (counted), and the tokens it
    picks score, under eager recomputation, the log-probabilities it reported."""
    import gigatron.core.ops.gemv as gemv_module

    calls = []
    original = gemv_module._launch  # every Triton GEMV launch, plain or fused
    monkeypatch.setattr(gemv_module, "_launch", lambda *a: calls.append(1) or original(*a))
    model = _model("rope_gqa_swiglu").cuda().to(torch.bfloat16)
    engine = InferenceEngine(model, TOK, max_batch_size=1, decode_mode=mode)
    params = SamplingParams(tokens_to_generate=16, top_k=1, return_log_probs=True, stop_at_eod=False)
    out = engine.generate(["hello there"], params)
    assert calls, "the decode step did not use the Triton GEMV"
    scored = InferenceEngine(model, TOK, max_batch_size=1).generate_tokens(
        out.tokens, SamplingParams(tokens_to_generate=0, return_log_probs=True))
    torch.testing.assert_close(torch.tensor(out.logprobs[0]), torch.tensor(scored.logprobs[0]), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_sliding_window_rows_at_different_positions_equal_recompute(kind):
    """--window-size over the KV cache is counted from each row's own position: in a batch whose
    prompts differ in length, every row's cached greedy steps equal the full forward's."""
    model = tiny_model(seed=5, window_size=(3, 0), **MODELS[kind])
    engine = InferenceEngine(model, TOK, max_batch_size=2)
    prompts = [TOK.tokenize("the quick brown fox"), TOK.tokenize("ab")]
    params = SamplingParams(tokens_to_generate=8, top_k=1, return_log_probs=True, stop_at_eod=False)
    out = engine.generate_tokens(prompts, params)
    for i, prompt in enumerate(prompts):
        ref_tokens, ref_lp = naive_generate(model, prompt, 8, lambda logits: logits.argmax())
        assert out.tokens[i][:len(ref_tokens)] == ref_tokens
        torch.testing.assert_close(torch.tensor(out.logprobs[i][len(prompt) - 1:len(ref_tokens) - 1]),
                                   torch.tensor(ref_lp), rtol=1e-4, atol=1e-4)


def test_decode_step_keeps_the_sliding_window():
    """The engine's decode step (what CUDA graphs capture; on CPU the kernels' references) honours
    --window-size for rows at different positions: its logits equal the model's cached forward."""
    from gigatron.core.inference.decode_step import DecodeKernels, DecodeStep
    from gigatron.core.inference.kv_cache import causal_cache_mask

    model = tiny_model(seed=3, window_size=(2, 0), **MODELS["rope_gqa_swiglu"])
    step = DecodeStep(model, DecodeKernels())
    prompts = [TOK.tokenize("hello there"), TOK.tokenize("abc")]
    tokens = torch.tensor([prompts[0], prompts[1] + [0] * 8])
    positions = torch.arange(11).expand(2, 11)
    new, new_positions = torch.tensor([[5], [9]]), torch.tensor([[11], [3]])
    outs = []
    with torch.no_grad():
        for run in (model, step):
            ctx = InferenceContext.for_model(model, 2, 32)
            ctx.set_positions(positions, 11)
            model(tokens, positions, causal_cache_mask(positions, 11, (2, 0)), inference_context=ctx)
            ctx.set_positions(new_positions, 32)
            outs.append(run(new, new_positions, causal_cache_mask(new_positions, 32, (2, 0)), inference_context=ctx))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    full = model(torch.tensor([prompts[1] + [9]]))[-1, 0]  # row 1's new token at position 3, no cache
    torch.testing.assert_close(outs[0][-1, 1], full, rtol=1e-5, atol=1e-5)
