"""Text generation from multi-latent attention (DeepSeek-style) GPT models with the latent cache
(gigatron/core/transformer/mla.py, gigatron/core/inference/kv_cache.py): every step's logits and
the greedy tokens equal the full-sequence forward on the growing sequence (fp32), with and without
--q-lora-rank, with MTP blocks present (unused at inference), YaRN rotary, batches of prompts of
different lengths; the absorbed and expanded attention agree; beam search scores, continuous
batching (eager and static steps) and tp=2 match; the server tool serves a trained MLA checkpoint."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _inference_fixtures import (PADDED_VOCAB, CharTokenizer, assert_decode_steps_never_synchronize,  # noqa: E402
                                 assert_engine_generation_equals_full_forward, assert_server_answers_greedily,
                                 cached_greedy, full_logits, reference_greedy, running_server)

from gigatron.core.inference.continuous import ContinuousBatcher, Sequence, slot_bytes  # noqa: E402
from gigatron.core.inference.engine import InferenceEngine, SamplingParams  # noqa: E402
from gigatron.core.inference.kv_cache import InferenceContext, cache_head_dims  # noqa: E402
from gigatron.core.models.gpt import GPTModel  # noqa: E402
from gigatron.core.parallel.groups import ParallelGroups  # noqa: E402
from gigatron.core.transformer.config import TransformerConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOK = CharTokenizer()
PROMPTS = ["the cat sat on", "ab", "hello world", "x"]

MLA = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, seq_length=64,
           max_position_embeddings=64, attention_dropout=0.0, hidden_dropout=0.0, multi_latent_attention=True,
           kv_lora_rank=8, qk_head_dim=6, qk_pos_emb_head_dim=4, v_head_dim=5, normalization="RMSNorm",
           position_embedding_type="rope", swiglu=True, add_bias_linear=False, rotary_scaling_factor=40.0,
           mscale=1.0, mscale_all_dim=0.7, untie_embeddings_and_output_weights=True, init_method_std=0.05,
           use_cpu_initialization=True)
VARIANTS = {
    "lora_q_mtp": dict(q_lora_rank=12, qk_layernorm=True, mtp_num_layers=2),
    "full_rank_q": dict(q_lora_rank=None, qk_layernorm=False),
    # Trained with selective recomputation, which does not apply at inference (no gradients).
    "lora_q_plain_rope": dict(q_lora_rank=12, qk_layernorm=True, rope_type="rope", mtp_num_layers=1,
                              recompute_granularity="selective", recompute_modules=["mla_up_proj", "core_attn"]),
}


def mla_model(variant="lora_q_mtp", seed=3, groups=None, tp=1, **kw):
    """A tiny fp32 MLA GPT (norms away from 1, so that a misplaced norm shows)."""
    config = TransformerConfig(**{**MLA, **VARIANTS[variant], "tensor_model_parallel_size": tp, **kw})
    model = GPTModel(config, groups or ParallelGroups.single(), PADDED_VOCAB, seed=seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()





@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_steps_equal_the_full_forward(variant):
    """Each step's logits (the prefill through the expanded form, every decode step through the
    absorbed form) of a batch of prompts of different lengths equal the full forward on each row's
    growing sequence within 1e-5; so do the greedy tokens."""
    model = mla_model(variant)
    engine = InferenceEngine(model, TOK, max_batch_size=4, max_sequence_length=64)
    prompts = [TOK.tokenize(p) for p in PROMPTS]
    got, logits = cached_greedy(engine, prompts, 10)
    for i, p in enumerate(prompts):
        ids, want = reference_greedy(model, p, 10)
        assert got[i] == ids
        torch.testing.assert_close(logits[i], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["lora_q_mtp", "full_rank_q"])
def test_engine_greedy_and_logprobs_equal_the_full_forward(variant):
    """generate_tokens (the engine's own loop) gives the full forward's greedy tokens and
    log-probabilities, batched and one prompt at a time; the MTP blocks are never run."""
    model = mla_model(variant, seed=11)
    if model.mtp is not None:
        def refuse(*args, **kwargs):
            raise AssertionError("generation ran a multi-token prediction block")
        for block in model.mtp.layers:
            block.register_forward_pre_hook(refuse)
    engine = InferenceEngine(model, TOK, max_batch_size=4, max_sequence_length=64)
    assert_engine_generation_equals_full_forward(model, engine, [TOK.tokenize(p) for p in PROMPTS], 12)


def test_the_cache_holds_the_latent_only():
    """One tensor per layer, [B, S, 1, kv_lora_rank + qk_pos_emb_head_dim], no values; a decode
    step writes the new token's latent and rotated rotary key at its position."""
    model = mla_model()
    engine = InferenceEngine(model, TOK, max_batch_size=3, max_sequence_length=32)
    ctx = engine.context()
    assert cache_head_dims(model.config) == (1, 8 + 4, 0)
    assert sorted(ctx.key_cache) == [0, 1] and ctx.value_cache == {}
    assert all(t.shape == (3, 32, 1, 12) for t in ctx.tensors())
    assert ctx.nbytes() == 2 * 3 * 32 * 12 * 4
    assert slot_bytes(model, 32) == 2 * 32 * 12 * 4  # per sequence: layers x positions x latent
    ids = TOK.tokenize("hello")
    attention = model.decoder.layers[0].self_attention
    with torch.no_grad():
        engine._forward(ctx, torch.tensor([ids]), torch.arange(len(ids))[None], len(ids))
        hidden = model.embedding(torch.tensor([ids]), torch.arange(len(ids))[None])
        _, c, k_r = attention._latents(model.decoder.layers[0].input_layernorm(hidden))
        rotary = model.rotary_pos_emb(len(ids), torch.arange(len(ids))[None])
        from gigatron.core.transformer.mla import apply_mla_rotary_pos_emb
        k_r = apply_mla_rotary_pos_emb(k_r.unsqueeze(2), rotary, attention.rope_mscale)[:, :, 0]
    torch.testing.assert_close(ctx.key_cache[0][0, : len(ids), 0], torch.cat((c, k_r), -1)[:, 0])
    assert float(ctx.key_cache[0][0, len(ids):].abs().sum()) == 0.0


def test_absorbed_and_expanded_attention_agree():
    """The two ways of attending over the latent cache give the same context for several new tokens
    per row, with a mask that hides different slots per row."""
    model = mla_model("full_rank_q")
    attention = model.decoder.layers[1].self_attention
    g = torch.Generator().manual_seed(0)
    s, b, kv = 3, 2, 7
    q_nope = torch.randn(s, b, 4, 6, generator=g)
    q_r = torch.randn(s, b, 4, 4, generator=g)
    cached = torch.randn(kv, b, 1, 12, generator=g)
    positions = torch.tensor([[4, 5, 6], [1, 2, 3]])
    mask = torch.arange(kv)[None, None, None, :] > positions[:, None, :, None]  # [b, 1, s, kv]
    with torch.no_grad():
        absorbed = attention.absorbed_attention(q_nope, q_r, cached, mask)
        expanded = attention.expanded_attention(q_nope, q_r, cached, mask)
    assert absorbed.shape == (s, b, 4 * 5)
    torch.testing.assert_close(absorbed, expanded, rtol=1e-5, atol=1e-6)


def test_bf16_cache_steps_track_the_full_forward():
    """In bf16 (weights, latent cache, activations) the cached steps stay within bf16 rounding of
    the full forward: the absorbed form reorders the products, so equality is not expected."""
    model = mla_model(seed=4, bf16=True, params_dtype=torch.bfloat16)
    engine = InferenceEngine(model, TOK, max_batch_size=4, max_sequence_length=64)
    assert all(t.dtype == torch.bfloat16 for t in engine.context().tensors())
    prompts = [TOK.tokenize(p) for p in PROMPTS]
    got, logits = cached_greedy(engine, prompts, 4)
    for i, p in enumerate(prompts):
        want = torch.stack([full_logits(model, got[i][:len(p) + t])[-1] for t in range(4)])
        torch.testing.assert_close(logits[i], want, rtol=0, atol=1e-2)


def test_sliding_window_counts_from_each_position():
    """With --window-size the cached steps of rows at different positions equal the full forward."""
    model = mla_model("full_rank_q", seed=5, window_size=(3, 0))
    engine = InferenceEngine(model, TOK, max_batch_size=2, max_sequence_length=64)
    prompts = [TOK.tokenize("the quick brown"), TOK.tokenize("ab")]
    got, logits = cached_greedy(engine, prompts, 6)
    for i, p in enumerate(prompts):
        ids, want = reference_greedy(model, p, 6)
        assert got[i] == ids
        torch.testing.assert_close(logits[i], want, rtol=1e-5, atol=1e-5)


def test_beam_search_scores_are_the_full_forward_log_probabilities():
    """Beam search reorders the latent cache with its beams: each returned hypothesis's score is
    the full forward's summed log-probability of its new tokens over its length."""
    model = mla_model(seed=7)
    engine = InferenceEngine(model, TOK, max_batch_size=3, max_sequence_length=64)
    prompt = TOK.tokenize("the cat")
    result = engine.beam_search_tokens(prompt, tokens_to_generate=6, beam_width=3, stop_token=0, length_penalty=1.0)
    assert len(result.tokens) == 3
    for hyp, score in zip(result.tokens, result.scores):
        lp = F.log_softmax(full_logits(model, hyp[:-1]), -1)
        total = lp[len(prompt) - 1:].gather(-1, torch.tensor(hyp[len(prompt):])[:, None]).sum()
        assert score == pytest.approx(float(total) / len(hyp), abs=1e-5)


@pytest.mark.parametrize("static", [False, True])
def test_continuous_batching_equals_each_request_alone(static):
    """The continuous batch (slots of the latent cache, chunked prefill, rows joining and leaving;
    the eager step and the static step, which runs the engine's decode step) gives each greedy
    request what the static engine gives it alone."""
    model = mla_model(seed=13)
    engine = InferenceEngine(model, TOK, max_batch_size=4, max_sequence_length=64)
    prompts = ["hello", "a longer prompt read in chunks", "ab", "the cat", "x"]
    params = [SamplingParams(tokens_to_generate=3 + 2 * i, top_k=1, stop_at_eod=False, return_log_probs=True)
              for i in range(len(prompts))]
    batcher = ContinuousBatcher(engine, max_requests=3, prefill_chunk=4, static_step=static)
    assert (batcher.decoder is not None) == static
    seqs = [Sequence(TOK.tokenize(p), q) for p, q in zip(prompts, params)]
    pending, step = list(seqs), 0
    while batcher.busy() or pending:
        if pending and step % 2 == 0:
            batcher.add(pending.pop(0))
        batcher.step()
        step += 1
    for seq, p, q in zip(seqs, prompts, params):
        alone = engine.generate_tokens([TOK.tokenize(p)], q)
        assert seq.done and seq.prompt + seq.generated == alone.tokens[0], p
        assert seq.logprobs == pytest.approx(alone.logprobs[0][-len(seq.generated):], abs=1e-5)


def test_decode_step_equals_the_model_forward():
    """The engine's decode step (decode_step.DecodeStep, what the CUDA graphs capture; on CPU the
    kernels' references) runs MLA layers through their own cached forward: equal logits."""
    from gigatron.core.inference.decode_step import DecodeKernels, DecodeStep
    from gigatron.core.inference.kv_cache import causal_cache_mask

    model = mla_model("full_rank_q", seed=2)
    step = DecodeStep(model, DecodeKernels())
    prompts = [TOK.tokenize("hello there"), TOK.tokenize("abc")]
    contexts = [InferenceContext.for_model(model, 2, 32) for _ in range(2)]
    tokens = torch.tensor([prompts[0], prompts[1] + [0] * 8])
    positions = torch.arange(11).expand(2, 11)
    new = torch.tensor([[5], [9]])
    new_positions = torch.tensor([[11], [3]])
    outs = []
    with torch.no_grad():
        for ctx, run in zip(contexts, (model, step)):
            ctx.set_positions(positions, 11)
            model(tokens, positions, causal_cache_mask(positions, 11), inference_context=ctx)
            ctx.set_positions(new_positions, 32)
            outs.append(run(new, new_positions, causal_cache_mask(new_positions, 32), inference_context=ctx))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(contexts[0].tensors(), contexts[1].tensors()):
        assert torch.equal(a, b)


def test_a_cache_and_a_layer_that_disagree_fail_clearly():
    """Keys without values into a standard cache (or the reverse) is one clear error."""
    ctx = InferenceContext([1], 1, 8, 2, 4, torch.float32, "cpu")
    ctx.set_positions(torch.zeros(1, 1, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="holds keys and values but the attention stored keys only"):
        ctx.store(1, torch.zeros(1, 1, 2, 4))
    latent = InferenceContext([1], 1, 8, 1, 6, torch.float32, "cpu", value_head_dim=0)
    latent.set_positions(torch.zeros(1, 1, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="holds keys only but the attention stored keys and values"):
        latent.store(1, torch.zeros(1, 1, 1, 6), torch.zeros(1, 1, 1, 6))
    mixed = InferenceContext([1], 1, 8, 2, 6, torch.float32, "cpu", value_head_dim=3)  # dk != dv
    assert mixed.key_cache[1].shape == (1, 8, 2, 6) and mixed.value_cache[1].shape == (1, 8, 2, 3)
    mixed.set_positions(torch.zeros(1, 1, dtype=torch.long), 8)
    keys, values = mixed.store(1, torch.ones(1, 1, 2, 6), torch.ones(1, 1, 2, 3))
    assert keys.shape == (8, 1, 2, 6) and values.shape == (8, 1, 2, 3) and float(values[0].sum()) == 6.0


# ---------------------------------------------------------------------- GPU: captured decode steps
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["cuda_graph", "compiled"])
def test_captured_decode_equals_the_full_forward_on_cuda(mode):
    """The decode step captured in CUDA graphs (compiled first under "compiled"), MLA layers
    through their absorbed form inside the engine's decode step, gives the full forward's greedy
    tokens (fp32) and eager's log-probabilities."""
    model = mla_model(seed=11).cuda()
    params = SamplingParams(tokens_to_generate=12, top_k=1, stop_at_eod=False, return_log_probs=True)
    prompts = [TOK.tokenize(p) for p in PROMPTS]
    eager = InferenceEngine(model, TOK, max_batch_size=4).generate_tokens(prompts, params)
    captured = InferenceEngine(model, TOK, max_batch_size=4, decode_mode=mode).generate_tokens(prompts, params)
    assert captured.tokens == eager.tokens
    for x, y in zip(captured.logprobs, eager.logprobs):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), rtol=1e-4, atol=1e-4)
    for i, p in enumerate(prompts):
        assert eager.tokens[i] == reference_greedy(model, p, 12)[0]


@pytest.mark.gpu
@needs_cuda
def test_mla_decode_steps_do_not_synchronize_on_cuda(monkeypatch):
    """No synchronizing CUDA call in the decode steps of an MLA model (its position mask is built
    on the device)."""
    model = mla_model(seed=2).cuda()
    engine = InferenceEngine(model, TOK, max_batch_size=2, decode_mode="cuda_graph")
    prompts = [TOK.tokenize("hello there"), TOK.tokenize("ab")]
    params = SamplingParams(tokens_to_generate=10, top_p=0.9, random_seed=1, return_log_probs=True)
    assert_decode_steps_never_synchronize(engine, prompts, params, monkeypatch)


@pytest.mark.gpu
@needs_cuda
def test_captured_continuous_step_equals_eager_on_cuda():
    """The continuous batch's static step captured in CUDA graphs gives the eager step's greedy
    tokens for an MLA model."""
    model = mla_model(seed=13).cuda()
    engine = InferenceEngine(model, TOK, max_batch_size=4, max_sequence_length=64, decode_mode="cuda_graph")
    prompts = ["hello", "a longer prompt read in chunks", "ab", "the cat", "x"]

    def run(static):
        batcher = ContinuousBatcher(engine, max_requests=3, prefill_chunk=4, static_step=static)
        seqs = [Sequence(TOK.tokenize(p), SamplingParams(tokens_to_generate=6 + i, top_k=1, stop_at_eod=False))
                for i, p in enumerate(prompts)]
        for seq in seqs:
            batcher.add(seq)
        while batcher.busy():
            batcher.step()
        return [seq.generated for seq in seqs]

    assert run(True) == run(False)


# ---------------------------------------------------------------------- tensor parallelism
def _tp_generations(engine):
    prompts = [TOK.tokenize(p) for p in PROMPTS]
    out = [cached_greedy(engine, prompts, 6)]
    sampled = SamplingParams(tokens_to_generate=6, top_p=0.9, temperature=0.9, random_seed=4, stop_at_eod=False,
                             return_log_probs=True)
    r = engine.generate_tokens(prompts, sampled)
    out.append((r.tokens, torch.tensor([lp[-6:] for lp in r.logprobs])))
    return out


def _tp_worker(rank, world_size, variant):
    from gigatron.core.parallel.config import ParallelConfig
    from gigatron.core.parallel.random import model_parallel_seed

    groups = ParallelGroups.build(ParallelConfig(tensor_model_parallel_size=world_size))
    model_parallel_seed(1234, groups)
    model = mla_model(variant, seed=9, groups=groups, tp=world_size)
    assert model.decoder.layers[0].self_attention.num_heads == 2  # 4 heads, 2 on each rank
    engine = InferenceEngine(model, TOK, groups=groups, max_batch_size=4, max_sequence_length=64)
    return _tp_generations(engine)


@pytest.mark.parametrize("variant", ["lora_q_mtp", "full_rank_q"])
def test_tp2_generation_equals_tp1(variant):
    """Two gloo ranks (heads and the vocabulary split, each rank caching the whole latent) give
    the one-process engine's step logits, greedy tokens and seeded samples."""
    from tests.parallel.harness import run_distributed

    reference = _tp_generations(InferenceEngine(mla_model(variant, seed=9), TOK, max_batch_size=4,
                                                max_sequence_length=64))
    for result in run_distributed(_tp_worker, 2, variant):  # both ranks hold the same sequences
        for (tokens, values), (ref_tokens, ref_values) in zip(result, reference):
            assert tokens == ref_tokens
            torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- serving a checkpoint
MLA_FLAGS = ("--multi-latent-attention --q-lora-rank 12 --kv-lora-rank 8 --qk-head-dim 6 --qk-pos-emb-head-dim 4 "
             "--v-head-dim 5 --qk-layernorm --normalization RMSNorm --position-embedding-type rope --swiglu "
             "--disable-bias-linear --untie-embeddings-and-output-weights --mtp-num-layers 1 "
             "--rotary-scaling-factor 40 --mscale-all-dim 1.0").split()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny MLA + MTP GPT trained one iteration by pretrain_gpt and saved (`torch` format,
    NullTokenizer of 4096 ids)."""
    from gigatron.training import gpt
    from gigatron.training.arguments import parse_args
    from gigatron.training.loop import pretrain

    tmp_path = tmp_path_factory.mktemp("mla_checkpoint")
    save = str(tmp_path / "ckpt")
    flags = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
             "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-3",
             "--mock-data", "--vocab-size", "4096", "--tokenizer-type", "NullTokenizer", "--num-workers", "0",
             "--eval-iters", "0", "--train-iters", "1", "--save", save, "--data-cache-path", str(tmp_path / "cache"),
             "--log-interval", "1", "--ckpt-format", "torch", "--attention-dropout", "0", "--hidden-dropout", "0",
             *MLA_FLAGS]
    pretrain(gpt.datasets_provider, gpt.model_provider, gpt.forward_step, args=parse_args(flags))
    return save



def _greedy_reference(checkpoint):
    """gigatron.from_pretrained's model of the checkpoint, an engine on it, and its greedy texts
    of two prompts (checked against the full forward on the growing sequence)."""
    import gigatron
    from gigatron.core.tokenizers import NullTokenizer

    loaded = gigatron.from_pretrained(checkpoint)
    assert loaded.model.config.multi_latent_attention and loaded.model.mtp is not None
    engine = InferenceEngine(loaded.model, NullTokenizer(4096), max_batch_size=2)
    want = engine.generate(["1 2 3", "7"], SamplingParams(tokens_to_generate=4, top_k=1)).texts
    grow = [1, 2, 3]
    with torch.no_grad():
        for _ in range(4):
            grow.append(int(loaded.model(torch.tensor([grow]))[-1, 0, :4097].argmax()))
    assert want[0].split() == [str(t) for t in grow]
    return engine, want



def test_server_tool_serves_an_mla_checkpoint(checkpoint):
    """tools/run_text_generation_server.py on the checkpoint answers /api and /v1/completions with
    the greedy text of gigatron.from_pretrained's model."""
    _, want = _greedy_reference(checkpoint)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    args = ["--load", checkpoint, "--use-checkpoint-args", "--vocab-size", "4096", "--max-batch-size", "2"]
    with running_server("run_text_generation_server.py", args, env=env) as url:
        assert_server_answers_greedily(url, want)


def test_continuous_batching_server_serves_an_mla_checkpoint(checkpoint):
    """The server app with continuous batching (--inference-dynamic-batching: slots of the latent
    cache, prompts read 2 tokens a step) gives the same answers."""
    from gigatron.core.inference.broadcast import LocalRunner
    from gigatron.core.inference.server.app import build_app
    from gigatron.core.inference.server.background import serve_in_background

    engine, want = _greedy_reference(checkpoint)
    app = build_app(LocalRunner(engine), engine.tokenizer, max_batch_size=2,
                    max_sequence_length=engine.max_sequence_length, dynamic_batching=True, max_requests=2,
                    prefill_chunk=2)
    assert type(app.state.scheduler).__name__ == "ContinuousScheduler"
    with serve_in_background(app) as server:
        assert_server_answers_greedily(server.url, want)
