"""Generation from Mamba and hybrid models with the recurrent state cache
(gigatron/core/inference/state_cache.py): every step's logits and the greedy tokens equal the
full-sequence forward on the growing sequence (fp32), for pure Mamba and hybrid patterns, batches of
prompts of different lengths (right padding must not reach a row's state), prefill in chunks,
continuous batching with reused slots, beam search, and the cached states against the sequential
references of the scan and the convolution."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from gigatron.core.inference.continuous import ContinuousBatcher, Sequence, slot_bytes
from gigatron.core.inference.engine import InferenceEngine, SamplingParams
from gigatron.core.inference.state_cache import (
    HybridInferenceContext,
    MambaStateCache,
    inference_context_for,
    is_recurrent_model,
    mamba_state_bytes_per_row,
)
from gigatron.core.models.mamba import MambaModel
from gigatron.core.ops.ssd import reference_ssd_scan
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.transformer.config import TransformerConfig
from gigatron.core.transformer.mamba.config import MambaConfig, allocate_hybrid_layers

sys.path.insert(0, os.path.dirname(__file__))
from _inference_fixtures import (PADDED_VOCAB, CharTokenizer, assert_engine_generation_equals_full_forward,  # noqa: E402
                                 cached_greedy, full_logits, reference_greedy, tiny_model)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOK = CharTokenizer()
PROMPTS = ["the cat sat on", "ab", "hello world", "x"]


def hybrid_model(pattern="M*M-", seed=3, chunk_size=4, groups=None, tp=1, **kw):
    """A tiny fp32 Mamba / hybrid model; chunk_size 4 makes every prompt span several scan chunks."""
    base = dict(num_layers=len(pattern), hidden_size=32, num_attention_heads=4, seq_length=64,
                attention_dropout=0.0, hidden_dropout=0.0, normalization="RMSNorm", position_embedding_type="none",
                add_bias_linear=False, swiglu=True, use_cpu_initialization=True, tensor_model_parallel_size=tp)
    base.update(kw)
    mc = MambaConfig(mamba_state_dim=8, mamba_head_dim=8, mamba_num_groups=2, hybrid_override_pattern=pattern,
                     is_hybrid_model=True)
    model = MambaModel(TransformerConfig(**base), mc, groups or ParallelGroups.single(), PADDED_VOCAB, seed=seed)
    for layer in model.decoder.layers:
        if hasattr(layer, "mixer"):
            layer.mixer.chunk_size = chunk_size
    return model.eval()





@pytest.mark.parametrize("pattern", ["MMMM", "M*M-", "*MM*"])
def test_cached_steps_equal_the_full_forward(pattern):
    """Each step's logits of a batch of prompts of different lengths (right-padded, prefill over
    several scan chunks) equal the full forward on each row's growing sequence; so do the tokens."""
    model = hybrid_model(pattern)
    engine = InferenceEngine(model, TOK, max_batch_size=4, max_sequence_length=64)
    prompts = [TOK.tokenize(p) for p in PROMPTS]
    got, logits = cached_greedy(engine, prompts, 8)
    for i, p in enumerate(prompts):
        ids, want = reference_greedy(model, p, 8)
        assert got[i] == ids
        torch.testing.assert_close(logits[i], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", ["MMM", "M*M-"])
def test_engine_greedy_and_logprobs_equal_the_full_forward(pattern):
    """generate_tokens (the engine's own loop) gives the full forward's greedy tokens and
    log-probabilities, batched and one prompt at a time."""
    model = hybrid_model(pattern, seed=11)
    engine = InferenceEngine(model, TOK, max_batch_size=4, max_sequence_length=64)
    assert_engine_generation_equals_full_forward(model, engine, [TOK.tokenize(p) for p in PROMPTS], 10)


def test_padding_does_not_reach_the_state():
    """After a right-padded prefill, a short row's cached states equal those of its prompt alone,
    and its SSM state equals the sequential scan's final state over its real tokens."""
    model = hybrid_model("MM", seed=5)
    engine = InferenceEngine(model, TOK, max_batch_size=2, max_sequence_length=64)
    short, long = TOK.tokenize("abc"), TOK.tokenize("the quick brown")
    ctx = engine.context()
    tokens = torch.tensor([long, short + [0] * (len(long) - len(short))])
    engine._forward(ctx, tokens, torch.arange(len(long)).expand(2, -1), len(long),
                    lengths=torch.tensor([len(long), len(short)]))
    padded = {k: (c[1].clone(), s[1].clone()) for (k, c), s in zip(ctx.mamba_states.conv.items(),
                                                                    ctx.mamba_states.ssm.values())}
    alone = inference_context_for(model, 1, 64)
    engine._forward(alone, torch.tensor([short]), torch.arange(len(short))[None], len(short))
    for k, (conv, ssm) in padded.items():
        torch.testing.assert_close(conv, alone.mamba_states.conv[k][0], rtol=0, atol=1e-6)
        torch.testing.assert_close(ssm, alone.mamba_states.ssm[k][0], rtol=1e-5, atol=1e-6)

    # The first layer's states against the references, from its own input (the embedded tokens).
    mixer = model.decoder.layers[0].mixer
    with torch.no_grad():
        hidden = model.decoder.layers[0].norm(model.embedding(torch.tensor([short]), None))  # [s, 1, h]
        zxbcdt, _ = mixer.in_proj(hidden)
        _, xbc, dt = torch.split(zxbcdt, [mixer.d_inner, mixer.conv_dim, mixer.num_heads], dim=-1)
        conv_in = xbc.transpose(0, 1)  # [1, s, C]
        x, B, C = mixer._split_xbc(mixer.conv1d(conv_in))
        dt = F.softplus(dt.float() + mixer.dt_bias.float()).transpose(0, 1)
        _, final = reference_ssd_scan(x, dt, -torch.exp(mixer.A_log.float()), B, C, mixer.D)
    first = mixer.layer_number
    torch.testing.assert_close(padded[first][1], final[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(padded[first][0], conv_in[0, -3:].transpose(0, 1), rtol=0, atol=0)


def test_prefill_in_chunks_continues_the_state():
    """A prompt read in chunks (each from the states the previous one left), as continuous batching
    does, gives the logits of the whole prompt at once."""
    model = hybrid_model("M*M-", seed=2)
    engine = InferenceEngine(model, TOK, max_batch_size=1, max_sequence_length=64)
    ids = TOK.tokenize("a long prompt read in pieces")
    ctx = engine.context()
    pieces = []
    for lo, hi in ((0, 5), (5, 6), (6, 17), (17, len(ids))):
        pieces.append(engine._forward(ctx, torch.tensor([ids[lo:hi]]), torch.arange(lo, hi)[None], hi)[0])
    torch.testing.assert_close(torch.cat(pieces), full_logits(model, ids), rtol=1e-5, atol=1e-5)


def test_continuous_batching_with_reused_slots_equals_one_at_a_time():
    """Two slots, five sequences: slots are reused (a new sequence starts from zero states), prompts
    are read in chunks of 3 while other slots decode (their padding must not reach a prefilling
    slot's state); every sequence's greedy tokens equal those of the full forward."""
    model = hybrid_model("M*M-", seed=4)
    engine = InferenceEngine(model, TOK, max_batch_size=2, max_sequence_length=64)
    batcher = ContinuousBatcher(engine, max_requests=2, prefill_chunk=3)
    assert isinstance(batcher.ctx, HybridInferenceContext)
    prompts = ["the cat sat on", "ab", "hello world", "x", "mamba layers"]
    seqs = [Sequence(TOK.tokenize(p), SamplingParams(tokens_to_generate=4 + i, top_k=1, stop_at_eod=False))
            for i, p in enumerate(prompts)]
    for seq in seqs:
        batcher.add(seq)
    while batcher.busy():
        batcher.step()
    assert batcher.admissions == 5 and batcher.largest_batch == 2
    for i, seq in enumerate(seqs):
        ids, _ = reference_greedy(model, seq.prompt, 4 + i)
        assert seq.prompt + seq.generated == ids, prompts[i]


def test_beam_search_of_width_one_is_greedy_and_beams_follow_their_states():
    model = hybrid_model("M*M", seed=6)
    engine = InferenceEngine(model, TOK, max_batch_size=3, max_sequence_length=64)
    prompt = TOK.tokenize("the cat")
    ids, _ = reference_greedy(model, prompt, 6)
    assert engine.beam_search_tokens(prompt, 6, 1, stop_token=-1).tokens[0] == ids
    # Width 3: every returned beam's score is its log-probability under the full forward.
    result = engine.beam_search_tokens(prompt, 5, 3, stop_token=-1, length_penalty=0.0)
    for beam, score in zip(result.tokens, result.scores):
        lp = F.log_softmax(full_logits(model, beam[:-1]), -1)
        want = sum(float(lp[j - 1, beam[j]]) for j in range(len(prompt), len(beam)))
        assert abs(score - want) < 1e-4


def test_state_cache_is_constant_per_sequence_and_reset():
    """The state cache's memory does not depend on the sequence length, the KV cache holds the
    attention layers only, and reset / rows / reorder act on the rows asked for."""
    model = hybrid_model("M*M-")
    short, long = inference_context_for(model, 2, 16), inference_context_for(model, 2, 64)
    assert is_recurrent_model(model) and not is_recurrent_model(tiny_model())
    assert short.mamba_states.nbytes() == long.mamba_states.nbytes() == 2 * mamba_state_bytes_per_row(model)
    assert sorted(long.key_cache) == [1]  # the one attention layer
    mixer = model.decoder.layers[0].mixer
    assert long.mamba_states.conv[0].shape == (2, mixer.conv_dim, 3)
    assert long.mamba_states.ssm[0].shape == (2, mixer.num_heads, mixer.head_dim, mixer.state_dim)
    assert slot_bytes(model, 64) == 2 * 64 * 4 * 8 * 4 + mamba_state_bytes_per_row(model)
    cache = MambaStateCache({0: (3, 4, 2, 2, 2)}, 3, torch.float32, "cpu")
    for t in cache.tensors():
        t.copy_(torch.arange(3, dtype=t.dtype).view(3, *[1] * (t.dim() - 1)).expand_as(t) + 1)
    cache.reorder(torch.tensor([2, 2]))
    assert cache.conv[0][:, 0, 0].tolist() == [3, 3, 3]
    view = cache.rows(1, 2)
    view.reset()
    assert cache.ssm[0][:, 0, 0, 0].tolist() == [3, 0, 3]
    cache.reset([0])
    assert cache.conv[0][:, 0, 0].tolist() == [0, 0, 3]
    with pytest.raises(ValueError, match="rows"):
        cache.set_lengths(torch.zeros(4, dtype=torch.long))


def test_compiled_decode_of_a_hybrid_model_equals_eager_on_cpu():
    model = hybrid_model("M*M-", seed=8)
    params = SamplingParams(tokens_to_generate=5, top_k=1, stop_at_eod=False)
    prompts = [TOK.tokenize(p) for p in PROMPTS[:2]]
    eager = InferenceEngine(model, TOK, max_batch_size=2, max_sequence_length=64).generate_tokens(prompts, params)
    compiled = InferenceEngine(model, TOK, max_batch_size=2, max_sequence_length=64,
                               decode_mode="compiled").generate_tokens(prompts, params)
    assert compiled.tokens == eager.tokens


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["cuda_graph", "compiled"])
def test_captured_decode_of_a_hybrid_model_equals_eager_on_gpu(mode):
    """CUDA graphs (the warm-up must not advance the cached states) and the compiled step give the
    eager engine's tokens and log-probabilities."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = hybrid_model("M*M-", seed=8, chunk_size=128).cuda()
    params = SamplingParams(tokens_to_generate=12, top_k=1, stop_at_eod=False, return_log_probs=True)
    prompts = [TOK.tokenize(p) for p in PROMPTS]
    eager = InferenceEngine(model, TOK, max_batch_size=4, max_sequence_length=64).generate_tokens(prompts, params)
    captured = InferenceEngine(model, TOK, max_batch_size=4, max_sequence_length=64,
                               decode_mode=mode).generate_tokens(prompts, params)
    assert captured.tokens == eager.tokens
    for a, b in zip(captured.logprobs, eager.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-4)
    for i, p in enumerate(prompts):
        ids, steps = reference_greedy(model, p, 12)
        assert eager.tokens[i] == ids


def test_decode_bench_cpu_smoke(capsys):
    """bench/bench_mamba_decode.py --cpu-smoke times both models' decode and checks the hybrid's
    cached greedy tokens against its full forward; the full-size hybrid is ~1.3B parameters with
    ~8% attention layers."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "bench_mamba_decode.py")
    spec = importlib.util.spec_from_file_location("bench_mamba_decode", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--cpu-smoke", "--prompt-length", "24", "--new-tokens", "3", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "card: cpu" in out and "cpu smoke: ok" in out and "hybrid pattern: M-MM*-M-" in out
    full = bench.FULL
    pattern = allocate_hybrid_layers(full["hybrid_layers"], full["attention_ratio"], full["mlp_ratio"])
    assert (pattern.count("M"), pattern.count("-"), pattern.count("*")) == (17, 20, 3)  # bench_hybrid's model
