"""Generation engine: KV-cached decoding against full recomputation, batching, sampling masks,
seeds, stop rules, scoring, padded vocabulary and beam search against brute force."""

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _inference_fixtures import PADDED_VOCAB, CharTokenizer, tiny_model  # noqa: E402

from gigatron.core.inference.engine import InferenceEngine, PromptTooLongError, SamplingParams  # noqa: E402
from gigatron.core.inference.kv_cache import InferenceContext  # noqa: E402
from gigatron.core.inference.sampling import sample, top_k_mask, top_p_mask  # noqa: E402

TOK = CharTokenizer()
V = TOK.vocab_size


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager():
    model = _model("rope_gqa_swiglu").cuda()
    eager = InferenceEngine(model, TOK, max_batch_size=4)
    graph = InferenceEngine(model, TOK, max_batch_size=4, decode_mode="cuda_graph")
    params = SamplingParams(tokens_to_generate=20, top_k=1, return_log_probs=True)
    a = eager.generate(["hello", "a b c: x"], params)
    b = graph.generate(["hello", "a b c: x"], params)
    assert a.tokens == b.tokens
    torch.testing.assert_close(torch.tensor(a.logprobs[0]), torch.tensor(b.logprobs[0]), rtol=1e-3, atol=1e-3)
