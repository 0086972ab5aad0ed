"""The fused decode path: the inference engine's decode step (gigatron/core/inference/decode_step.py)
runs one-row layers as four fused GEMVs plus the decode-attention kernel.

On CPU the custom ops run their plain-PyTorch references, which checks the decode step's wiring
(norm into the GEMV, bias/activation/residual epilogues, the cache written by the attention op,
also under torch.compile) against the model's own forward; the GPU tests compare the Triton
kernels with those references on random inputs and shapes of a 1.3B GPT.
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _inference_fixtures import tiny_model  # noqa: E402
from test_layering import ROOT, _imports  # noqa: E402

from gigatron.core.inference.decode_step import DecodeKernels, DecodeStep  # noqa: E402
from gigatron.core.inference.kv_cache import InferenceContext, causal_cache_mask  # noqa: E402
from gigatron.core.ops.decode_attention import (decode_attention, decode_attention_preferred,  # noqa: E402
                                                decode_attention_splits, reference_decode_attention)
from gigatron.core.ops.gemv import ACT_CODES, NORM_CODES, fused_gemv, reference_fused_gemv  # noqa: E402
from gigatron.core.transformer.norm import LayerNorm, RMSNorm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

KINDS = {
    "gpt2": dict(),  # LayerNorm, GeLU, biases, learned positions
    "llama": dict(position_embedding_type="rope", num_query_groups=2, group_query_attention=True, swiglu=True,
                  normalization="RMSNorm", add_bias_linear=False),
    "variants": dict(squared_relu=True, apply_layernorm_1p=True, qk_layernorm=True, add_qkv_bias=True,
                     add_bias_linear=False, position_embedding_type="rope"),
    "openai_gelu": dict(openai_gelu=True, num_query_groups=1, group_query_attention=True),
}


class Counted:
    """Counts the decode step's fused layers and whether each call's head ran as one fused GEMV."""

    def __init__(self, step: DecodeStep, monkeypatch):
        self.layers, self.heads = 0, []
        fused_layer = step._fused_layer

        def count_layer(*args):
            self.layers += 1
            return fused_layer(*args)

        monkeypatch.setattr(step, "_fused_layer", count_layer)
        call = step.__call__
        one_row = step._one_row

        def count_head(*args, **kwargs):
            self.heads.append(False)
            return call(*args, **kwargs)

        def record(hidden, weight):
            applies = one_row(hidden, weight)
            if weight is step.model.output_weight():
                self.heads[-1] = applies
            return applies

        monkeypatch.setattr(step, "_one_row", record)
        self.step = count_head


@torch.no_grad()
def _decode_logits(model, step, prompt, steps: int):
    """Prefill `prompt` (the model's forward), then `steps` greedy decode steps (one row) through
    `step` (the model itself, or a decode step); returns the logits of each."""
    ctx = InferenceContext.for_model(model, 1, 32)
    tokens = torch.tensor([prompt])
    n = len(prompt)
    positions = torch.arange(n)[None]
    ctx.set_positions(positions, n)
    logits = model(tokens, positions, causal_cache_mask(positions, n), inference_context=ctx)[-1, 0]
    out = [logits]
    for i in range(steps):
        token = logits.argmax()[None, None]
        positions = torch.tensor([[n + i]])
        kv_len = 32  # a static bucket larger than the positions, as the captured steps use
        ctx.set_positions(positions, kv_len)
        logits = step(token, positions, causal_cache_mask(positions, kv_len), inference_context=ctx)[-1, 0]
        out.append(logits)
    return torch.stack(out), ctx


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fused_one_row_decode_equals_the_model_forward(kind, monkeypatch):
    model = tiny_model(**KINDS[kind])
    want, want_ctx = _decode_logits(model, model, [3, 1, 4, 1, 5], 6)
    counted = Counted(DecodeStep(model), monkeypatch)
    got, got_ctx = _decode_logits(model, counted.step, [3, 1, 4, 1, 5], 6)
    assert counted.layers == 6 * model.config.num_layers
    # Every decode step ran the final norm inside the output layer's GEMV.
    assert counted.heads == [True] * 6
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for layer in want_ctx.key_cache:  # the attention op wrote the same cache slots
        torch.testing.assert_close(got_ctx.key_cache[layer], want_ctx.key_cache[layer], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_ctx.value_cache[layer], want_ctx.value_cache[layer], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernels", [DecodeKernels(fused=False, attention=False, pdl=False),
                                     DecodeKernels(fused=False), DecodeKernels(attention=False)])
def test_decode_step_without_the_fused_layers_is_the_model_forward(kernels, monkeypatch):
    """Without fused layers the decode step walks the layers op for op as the model does (on CPU
    F.linear stands in for the GEMV): bitwise the same logits and cache without the attention
    kernel either, the attention op's rounding with it."""
    model = tiny_model(**KINDS["llama"])
    want, want_ctx = _decode_logits(model, model, [3, 1, 4], 4)
    step = DecodeStep(model, kernels)
    counted = Counted(step, monkeypatch)
    got, got_ctx = _decode_logits(model, counted.step, [3, 1, 4], 4)
    assert counted.layers == 0
    assert counted.heads == [kernels.fused] * 4  # the head fuses without the attention kernel
    if not (kernels.fused or kernels.attention):
        assert torch.equal(got, want)
        for layer in want_ctx.key_cache:
            assert torch.equal(got_ctx.key_cache[layer], want_ctx.key_cache[layer])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_path_is_not_taken_where_it_does_not_apply(monkeypatch):
    model = tiny_model(apply_residual_connection_post_layernorm=True)
    want, _ = _decode_logits(model, model, [1, 2, 3], 2)
    counted = Counted(DecodeStep(model), monkeypatch)
    got, _ = _decode_logits(model, counted.step, [1, 2, 3], 2)
    assert counted.layers == 0 and counted.heads == [True] * 2  # the head still fuses
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    model = tiny_model()
    counted = Counted(DecodeStep(model), monkeypatch)
    with torch.no_grad():  # two rows: not a GEMV (the attention kernel still applies)
        ctx = InferenceContext.for_model(model, 2, 16)
        positions = torch.tensor([[0], [0]])
        ctx.set_positions(positions, 16)
        counted.step(torch.tensor([[1], [2]]), positions, causal_cache_mask(positions, 16), inference_context=ctx)
    assert counted.layers == 0 and counted.heads == [False]


def test_decode_step_refuses_a_model_in_training_mode():
    model = tiny_model().train()
    ctx = InferenceContext.for_model(model, 1, 8)
    positions = torch.tensor([[0]])
    ctx.set_positions(positions, 8)
    with pytest.raises(RuntimeError, match="eval mode"):
        DecodeStep(model)(torch.tensor([[1]]), positions, causal_cache_mask(positions, 8), inference_context=ctx)


@pytest.mark.slow
def test_fused_one_row_decode_compiles_and_writes_the_cache():
    """Under torch.compile the cache mutation of the attention op survives functionalization."""
    model = tiny_model(**KINDS["llama"])
    want, want_ctx = _decode_logits(model, model, [3, 1, 4], 3)
    ctx = InferenceContext.for_model(model, 1, 32)
    decode = DecodeStep(model)
    with torch.no_grad():
        positions = torch.arange(3)[None]
        ctx.set_positions(positions, 3)
        logits = model(torch.tensor([[3, 1, 4]]), positions, causal_cache_mask(positions, 3), inference_context=ctx)

        def step(token, positions):
            ctx.set_positions(positions, 32)
            return decode(token, positions, causal_cache_mask(positions, 32), inference_context=ctx)[-1, 0]

        compiled = torch.compile(step, dynamic=False)
        out = [logits[-1, 0]]
        for i in range(3):
            out.append(compiled(out[-1].argmax()[None, None], torch.tensor([[3 + i]])))
    torch.testing.assert_close(torch.stack(out), want, rtol=1e-4, atol=1e-4)
    for layer in want_ctx.key_cache:
        torch.testing.assert_close(ctx.key_cache[layer], want_ctx.key_cache[layer], rtol=1e-4, atol=1e-5)


def _core_modules(*parts):
    root = os.path.join(ROOT, "gigatron", "core", *parts)
    for directory, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(directory, name)


def test_ops_import_nothing_else_from_core_and_layers_no_decode_kernels():
    """The ops are the bottom of gigatron.core (no import cycle through them), and the training
    layers never reach for the decode kernels: only the inference engine's decode step does."""
    offenders = []
    for path in _core_modules("ops"):
        offenders += [f"{path}: {m}" for _, m in _imports(path)
                      if m.startswith("gigatron.") and not m.startswith("gigatron.core.ops")]
    for part in ("transformer", "parallel", "models"):
        for path in _core_modules(part):
            offenders += [f"{path}: {m}" for _, m in _imports(path)
                          if m.startswith(("gigatron.core.ops.gemv", "gigatron.core.ops.decode_attention",
                                           "gigatron.core.inference"))]
    assert offenders == []


def test_fused_gemv_reference_equals_the_unfused_layers():
    torch.manual_seed(0)
    k, n = 24, 40
    x = torch.randn(1, 1, k)
    w = torch.randn(n, k)
    b = torch.randn(n)
    norm = LayerNorm(k, eps=1e-5, zero_centered_gamma=True)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    got = fused_gemv(x, w, b, norm=norm, activation="swiglu")
    gate, up = torch.chunk(F.linear(norm(x), w, b), 2, dim=-1)
    torch.testing.assert_close(got, F.silu(gate) * up)
    residual = torch.randn(1, 1, n)
    rms = RMSNorm(k)
    torch.testing.assert_close(fused_gemv(x, w, b, norm=rms, residual=residual), residual + (F.linear(rms(x), w) + b))
    torch.testing.assert_close(fused_gemv(x, w, None, activation="gelu_tanh"), F.gelu(F.linear(x, w), approximate="tanh"))


def test_fused_gemv_refuses_what_it_cannot_fold():
    x, w = torch.randn(1, 1, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        fused_gemv(x, w, activation="relu")
    with pytest.raises(ValueError, match="adds a residual only to a plain linear output"):
        fused_gemv(x, w, activation="gelu", residual=torch.randn(1, 1, 4))
    with pytest.raises(ValueError, match="LayerNorm or RMSNorm, not GroupNorm"):
        fused_gemv(x, w, norm=torch.nn.GroupNorm(1, 8))


def _attention_inputs(b, nq, ng, d, slots, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, nq, d, generator=gen, device=device).to(dtype)
    k = torch.randn(b, ng, d, generator=gen, device=device).to(dtype)
    v = torch.randn(b, ng, d, generator=gen, device=device).to(dtype)
    key_cache = torch.randn(b + 1, slots, ng, d, generator=gen, device=device).to(dtype)
    value_cache = torch.randn(b + 1, slots, ng, d, generator=gen, device=device).to(dtype)
    return q, k, v, key_cache, value_cache


def test_decode_attention_reference_equals_cache_store_and_core_attention():
    from gigatron.core.transformer.attention import core_attention

    q, k, v, key_cache, value_cache = _attention_inputs(3, 4, 2, 8, 20)
    positions = torch.tensor([5, 0, 11])
    kc, vc = key_cache.clone(), value_cache.clone()
    got = decode_attention(q, k, v, kc, vc, positions, 16)
    rows = torch.arange(3)
    key_cache[rows, positions] = k
    value_cache[rows, positions] = v
    mask = causal_cache_mask(positions[:, None], 16)  # [b, 1, 1, kv_len]
    want = core_attention(q[:, :, None], key_cache[:3, :16].transpose(1, 2), value_cache[:3, :16].transpose(1, 2),
                          mask, backend="local")[:, :, 0]
    torch.testing.assert_close(got, want)
    assert torch.equal(kc, key_cache) and torch.equal(vc, value_cache)


def test_decode_attention_refuses_bad_shapes():
    q, k, v, key_cache, value_cache = _attention_inputs(2, 4, 2, 8, 16)
    positions = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="not a multiple"):
        decode_attention(q[:, :3], k, v, key_cache, value_cache, positions, 8)
    with pytest.raises(ValueError, match="positions must be"):
        decode_attention(q, k, v, key_cache, value_cache, positions[:1], 8)
    with pytest.raises(ValueError, match="kv_len 17 is outside"):
        decode_attention(q, k, v, key_cache, value_cache, positions, 17)


def test_decode_attention_splits_fill_the_gpu():
    assert decode_attention_splits(1, 16, 256) == 4  # one 64-slot tile per program
    assert decode_attention_splits(1, 16, 512) == 8
    assert decode_attention_splits(1, 16, 4096) == 9  # about one program per SM
    assert decode_attention_splits(8, 16, 256) == 2
    assert decode_attention_splits(64, 16, 4096) == 1
    assert decode_attention_splits(1, 1, 40) == 1



def test_decode_attention_is_used_while_rows_and_heads_do_not_fill_the_gpu(monkeypatch):
    assert decode_attention_preferred(1, 16) and decode_attention_preferred(8, 16)
    assert not decode_attention_preferred(64, 16)  # cuDNN attention is faster there
    calls = []
    original = InferenceContext.attend
    monkeypatch.setattr(InferenceContext, "attend", lambda *a, **k: calls.append(a[2].shape[1]) or original(*a, **k))
    model = tiny_model()
    step = DecodeStep(model)
    heads = model.config.num_attention_heads
    for rows in (2, -(-132 // heads)):
        with torch.no_grad():
            ctx = InferenceContext.for_model(model, rows, 16)
            positions = torch.zeros(rows, 1, dtype=torch.long)
            ctx.set_positions(positions, 16)
            step(torch.ones(rows, 1, dtype=torch.long), positions, causal_cache_mask(positions, 16),
                 inference_context=ctx)
    assert calls == [2] * model.config.num_layers  # the second batch fills the GPU: SDPA


# ---------------------------------------------------------------------- Triton kernels (GPU)
@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    (6144, 2048, "LayerNorm", None, False, torch.bfloat16), (8192, 2048, "LayerNorm", "gelu", False, torch.bfloat16),
    (2048, 8192, None, None, True, torch.bfloat16), (2048, 2048, None, None, True, torch.float16),
    (2 * 5504, 2048, "RMSNorm", "swiglu", False, torch.bfloat16), (1000, 520, "RMSNorm", "gelu_tanh", False, torch.float16),
    (520, 1000, "LayerNorm", "squared_relu", False, torch.bfloat16), (96, 64, "LayerNorm", "swiglu", False, torch.bfloat16)])
def test_triton_fused_gemv_matches_reference(case):
    n, k, norm_kind, act, with_residual, dtype = case
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    w = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).to(dtype)
    b = torch.randn(n, device="cuda", generator=gen).to(dtype)
    x = (torch.randn(1, 1, k, device="cuda", generator=gen) * 2 + 0.5).to(dtype)
    n_out = n // 2 if act == "swiglu" else n
    residual = torch.randn(1, 1, n_out, device="cuda", generator=gen).to(dtype) if with_residual else None
    norm_weight = (torch.rand(k, device="cuda", generator=gen) + 0.5).to(dtype) if norm_kind else None
    norm_bias = torch.randn(k, device="cuda", generator=gen).to(dtype) if norm_kind == "LayerNorm" else None
    args = (b, residual, norm_weight, norm_bias, NORM_CODES[norm_kind], 1e-5, 0.0, ACT_CODES[act])
    got = torch.ops.gigatron.fused_gemv(x, w, *args)
    assert got.shape == (1, 1, n_out) and got.dtype == dtype
    want = reference_fused_gemv(x, w, *args)
    truth = reference_fused_gemv(x.double(), w.double(), *(a.double() if torch.is_tensor(a) else a for a in args))
    # As close to the fp64 result as the bf16/fp16 reference is (rounding points are the same).
    scale = float(truth.abs().max())
    err_got = float((got.double() - truth).abs().max()) / scale
    err_want = float((want.double() - truth).abs().max()) / scale
    assert err_got <= 2 * err_want + 2e-3, (err_got, err_want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 16, 16, 128, 256), (1, 32, 8, 128, 4096), (8, 16, 16, 128, 512),
                                   (64, 16, 16, 128, 256), (3, 6, 2, 80, 1024), (2, 4, 1, 64, 2048)])
def test_triton_decode_attention_matches_reference(dtype, shape):
    b, nq, ng, d, kv_len = shape
    q, k, v, key_cache, value_cache = _attention_inputs(b, nq, ng, d, kv_len + 8, dtype, "cuda", seed=kv_len)
    positions = torch.randint(0, kv_len, (b,), device="cuda")
    positions[0] = kv_len - 1
    if b > 1:
        positions[1] = 0
    kc, vc = key_cache.clone(), value_cache.clone()
    got = decode_attention(q, k, v, kc, vc, positions, kv_len)
    want = reference_decode_attention(q, k, v, key_cache, value_cache, positions, kv_len, d ** -0.5)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(kc, key_cache) and torch.equal(vc, value_cache)
