"""Transformer building blocks on one CPU process: config, norms, RoPE, activations, attention,
layer placement over pipeline stages, and activation recompute."""

import math

import pytest
import torch
import torch.nn.functional as F

from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.parallel.init import initialize_parameters
from gigatron.core.parallel.random import model_parallel_seed
from gigatron.core.transformer.attention import (AttentionBackendError, SelfAttention, check_attention_backend,
                                                 core_attention)
from gigatron.core.transformer.block import layer_offset, num_layers_on_stage
from gigatron.core.transformer.config import TransformerConfig
from gigatron.core.transformer.mlp import MLP, openai_gelu, squared_relu, swiglu, gelu
from gigatron.core.transformer.norm import LayerNorm, RMSNorm
from gigatron.core.transformer.rope import RotaryEmbedding, apply_rotary_pos_emb


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(**kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                attention_dropout=0.0, hidden_dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


# ----------------------------------------------------------------------------- config
def test_config_derived_defaults():
    c = tiny()
    assert c.ffn_hidden_size == 128 and c.kv_channels == 8 and c.num_query_groups == 4
    assert c.max_position_embeddings == 16 and c.params_dtype == torch.float32
    c = TransformerConfig(num_layers=24, hidden_size=2048, num_attention_heads=16, swiglu=True, bf16=True,
                          group_query_attention=True, num_query_groups=4, seq_length=2048)
    assert c.ffn_hidden_size == int(4 * 2048 * 2 / 3 / 64) * 64 == 5440
    assert c.num_query_groups == 4 and c.params_dtype == torch.bfloat16
    assert tiny(recompute_granularity="selective").recompute_modules == ["core_attn"]
    assert tiny(sequence_parallel=True).sequence_parallel is False  # no tp -> no sp


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_attention_heads=6, hidden_size=36, tensor_model_parallel_size=4), "--num-attention-heads"),
    (dict(group_query_attention=True, num_query_groups=2, tensor_model_parallel_size=4), "--num-query-groups"),
    (dict(group_query_attention=True, num_query_groups=3), "--num-query-groups"),
    (dict(seq_length=32, max_position_embeddings=16), "--max-position-embeddings"),
    (dict(bf16=True, fp16=True), "--bf16"),
    (dict(swiglu=True, squared_relu=True), "--swiglu"),
    (dict(position_embedding_type="alibi"), "--position-embedding-type"),
    (dict(normalization="BatchNorm"), "--normalization"),
    (dict(attention_backend="xformers"), "--attention-backend"),
    (dict(use_flash_attn=True, attention_backend="local"), "--use-flash-attn"),
    (dict(recompute_granularity="full"), "--recompute-method"),
    (dict(recompute_granularity="full", recompute_method="uniform"), "--recompute-num-layers"),
    (dict(recompute_granularity="selective", recompute_modules=["mla_up_proj"]), "--recompute-modules"),
    (dict(pipeline_model_parallel_size=3), "--num-layers (2)"),
    (dict(num_layers=8, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=3), "virtual"),
    (dict(position_embedding_type="rope", rotary_percent=0.1), "--rotary-percent"),
    (dict(num_layers=None), "--num-layers"),
])
def test_config_validation_names_the_flags(kwargs, words):
    with pytest.raises(ValueError, match=__import__("re").escape(words)):
        tiny(**kwargs)


# ----------------------------------------------------------------------------- pipeline split
def test_layers_per_stage_even_uneven_virtual():
    c = tiny(num_layers=8, pipeline_model_parallel_size=4)
    assert [num_layers_on_stage(c, r, 4) for r in range(4)] == [2, 2, 2, 2]
    assert [layer_offset(c, r, 4) for r in range(4)] == [0, 2, 4, 6]
    c = tiny(num_layers=8, pipeline_model_parallel_size=3, decoder_first_pipeline_num_layers=2,
             decoder_last_pipeline_num_layers=2)
    assert [num_layers_on_stage(c, r, 3) for r in range(3)] == [2, 4, 2]
    assert [layer_offset(c, r, 3) for r in range(3)] == [0, 2, 6]
    c = tiny(num_layers=7, pipeline_model_parallel_size=4, decoder_first_pipeline_num_layers=1)
    assert [num_layers_on_stage(c, r, 4) for r in range(4)] == [1, 2, 2, 2]
    # Interleaved: 8 layers, pp 2, vp 2 -> chunks of 2; (v, r) offsets v*4 + r*2.
    c = tiny(num_layers=8, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    got = {(v, r): (layer_offset(c, r, 2, v, 2), num_layers_on_stage(c, r, 2, v, 2))
           for v in range(2) for r in range(2)}
    assert got == {(0, 0): (0, 2), (0, 1): (2, 2), (1, 0): (4, 2), (1, 1): (6, 2)}
    # Every layer is placed exactly once.
    c = tiny(num_layers=12, pipeline_model_parallel_size=3, virtual_pipeline_model_parallel_size=2,
             decoder_first_pipeline_num_layers=2, decoder_last_pipeline_num_layers=2)
    placed = sorted(layer_offset(c, r, 3, v, 2) + i for v in range(2) for r in range(3)
                    for i in range(num_layers_on_stage(c, r, 3, v, 2)))
    assert placed == list(range(12))
    with pytest.raises(ValueError, match="not divisible"):
        num_layers_on_stage(tiny(num_layers=5), 0, 2)


# ----------------------------------------------------------------------------- norms
def test_layernorm_rmsnorm_and_1p():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 16)
    ln = LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    torch.testing.assert_close(ln(x), F.layer_norm(x, (16,), ln.weight, ln.bias, 1e-5))
    ln1p = LayerNorm(16, zero_centered_gamma=True)
    assert torch.all(ln1p.weight == 0)
    with torch.no_grad():
        ln1p.weight.copy_(ln.weight - 1)
        ln1p.bias.copy_(ln.bias)
    torch.testing.assert_close(ln1p(x), ln(x), rtol=1e-5, atol=1e-5)
    rms = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        rms.weight.normal_()
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * rms.weight
    torch.testing.assert_close(rms(x), expected)
    rms1p = RMSNorm(16, eps=1e-6, zero_centered_gamma=True)
    torch.testing.assert_close(rms1p(x), x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6))
    # fp32 residual stream into bf16 weights: computed in fp32, returned in bf16.
    ln_bf16 = LayerNorm(16, dtype=torch.bfloat16)
    out = ln_bf16(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.layer_norm(x, (16,)), rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------- RoPE
def _rope_reference(t, positions, base, rotary_dim, interleaved):
    """Independent RoPE: treat each rotated channel pair as a complex number times e^{i pos theta}."""
    s, b, n, d = t.shape
    rot, rest = t[..., :rotary_dim], t[..., rotary_dim:]
    half = rotary_dim // 2
    theta = base ** (-torch.arange(half, dtype=torch.float64) * 2 / rotary_dim)  # [r/2]
    angle = positions.double()[..., None] * theta  # [s, b, r/2]
    if interleaved:
        pairs = torch.complex(rot[..., 0::2].double(), rot[..., 1::2].double())
    else:
        pairs = torch.complex(rot[..., :half].double(), rot[..., half:].double())
    rotated = pairs * torch.polar(torch.ones_like(angle), angle)[:, :, None, :]
    if interleaved:
        out = torch.stack((rotated.real, rotated.imag), dim=-1).reshape(s, b, n, rotary_dim)
    else:
        out = torch.cat((rotated.real, rotated.imag), dim=-1)
    return torch.cat((out.to(t.dtype), rest), dim=-1)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("percent", [1.0, 0.5])
def test_rope_matches_complex_reference(interleaved, percent):
    torch.manual_seed(1)
    s, b, n, d = 7, 2, 3, 16
    t = torch.randn(s, b, n, d)
    rope = RotaryEmbedding(d, rotary_percent=percent, rotary_base=500, rotary_interleaved=interleaved)
    freqs = rope(s)
    assert freqs.shape == (s, 1, 1, int(d * percent))
    out = apply_rotary_pos_emb(t, freqs, interleaved)
    positions = torch.arange(s)[:, None].expand(s, b)
    torch.testing.assert_close(out, _rope_reference(t, positions, 500, int(d * percent), interleaved))
    # Explicit position ids [b, s] (e.g. reset per document) and interpolation.
    pos_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3], [5, 6, 7, 8, 9, 10, 11]])
    rope2 = RotaryEmbedding(d, percent, 500, interleaved, seq_len_interpolation_factor=2.0)
    out2 = apply_rotary_pos_emb(t, rope2(s, pos_ids), interleaved)
    torch.testing.assert_close(out2, _rope_reference(t, pos_ids.t() / 2.0, 500, int(d * percent), interleaved))


def test_rope_relative_property():
    """q.k after RoPE depends only on the position difference."""
    torch.manual_seed(2)
    rope = RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    f = rope(20)

    def dot(i, j):
        return (apply_rotary_pos_emb(q, f[i:i + 1]) * apply_rotary_pos_emb(k, f[j:j + 1])).sum()
    torch.testing.assert_close(dot(3, 1), dot(13, 11))


# ----------------------------------------------------------------------------- activations
def test_activations():
    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(gelu(x), x * 0.5 * (1 + torch.erf(x / math.sqrt(2))))
    torch.testing.assert_close(openai_gelu(x), F.gelu(x, approximate="tanh"))
    assert (openai_gelu(x) - gelu(x)).abs().max() > 1e-5  # really the other formula
    torch.testing.assert_close(squared_relu(x), torch.clamp(x, min=0) ** 2)
    g, u = torch.randn(3, 5), torch.randn(3, 5)
    torch.testing.assert_close(swiglu(torch.cat([g, u], -1)), g * torch.sigmoid(g) * u)


def test_swiglu_mlp_uses_gate_then_up():
    c = tiny(swiglu=True, add_bias_linear=False)
    mlp = MLP(c, ParallelGroups.single(), 0)
    f = c.ffn_hidden_size
    torch.manual_seed(3)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(4, 2, 32)
    w1 = mlp.linear_fc1.weight
    gate, up = x @ w1[:f].t(), x @ w1[f:].t()
    expected = (F.silu(gate) * up) @ mlp.linear_fc2.weight.t()
    out, bias = mlp(x)
    assert bias is None
    torch.testing.assert_close(out, expected)


# ----------------------------------------------------------------------------- attention
def _reference_attention(x, attn, cfg, mask=None):
    """Plain multi-head attention from the fused weight, decoding the grouped [q..; k; v] layout
    by hand; keys/values shared by the query heads of their group."""
    nh, ng, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    hpg = nh // ng
    w = attn.linear_qkv.weight
    bqkv = attn.linear_qkv.bias
    s, b, _ = x.shape
    qkv = x @ w.t() + (bqkv if bqkv is not None else 0)  # [s, b, (nh+2ng)d]
    rows_per_group = (hpg + 2) * d
    outs = []
    for head in range(nh):
        g = head // hpg
        base = g * rows_per_group
        qh = qkv[..., base + (head % hpg) * d: base + (head % hpg + 1) * d]
        kh = qkv[..., base + hpg * d: base + (hpg + 1) * d]
        vh = qkv[..., base + (hpg + 1) * d: base + (hpg + 2) * d]
        scores = torch.einsum("sbd,tbd->bst", qh, kh) / math.sqrt(d)
        blocked = torch.ones(s, s, dtype=torch.bool).triu(1) if mask is None else mask[:, 0]
        scores = scores.masked_fill(blocked, float("-inf"))
        outs.append(torch.einsum("bst,tbd->sbd", scores.softmax(-1), vh))
    ctx = torch.cat(outs, dim=-1)  # [s, b, nh*d]
    out = ctx @ attn.linear_proj.weight.t()
    return out


@pytest.mark.parametrize("groups", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("backend", ["auto", "math", "flash", "local"])
def test_attention_gqa_matches_reference(groups, backend):
    cfg = tiny(group_query_attention=True, num_query_groups=groups, attention_backend=backend,
               add_bias_linear=False, add_qkv_bias=True)
    attn = SelfAttention(cfg, ParallelGroups.single(), 0)
    torch.manual_seed(4)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(6, 2, 32)
    out, bias = attn(x)
    assert bias is None and out.shape == (6, 2, 32)
    torch.testing.assert_close(out, _reference_attention(x, attn, cfg), rtol=1e-4, atol=1e-5)


def test_attention_is_causal_and_explicit_mask_path():
    cfg = tiny(group_query_attention=True, num_query_groups=2)
    attn = SelfAttention(cfg, ParallelGroups.single(), 0)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(8, 2, 32)
    y = x.clone()
    y[5:] = torch.randn(3, 2, 32)  # change the future only
    out_x, out_y = attn(x)[0], attn(y)[0]
    torch.testing.assert_close(out_x[:5], out_y[:5])
    assert not torch.allclose(out_x[5:], out_y[5:])
    # An explicit causal mask gives the causal result; a document mask blocks across documents.
    causal = torch.ones(8, 8, dtype=torch.bool).triu(1)[None, None].expand(2, 1, 8, 8)
    torch.testing.assert_close(attn(x, causal)[0], out_x, rtol=1e-5, atol=1e-6)
    doc = causal.clone()
    doc[:, :, 4:, :4] = True  # two documents of 4 tokens
    out_doc = attn(x, doc)[0]
    torch.testing.assert_close(out_doc, _reference_attention(x, attn, cfg, doc), rtol=1e-4, atol=1e-5)
    x2 = x.clone()
    x2[:4] = torch.randn(4, 2, 32)
    torch.testing.assert_close(attn(x2, doc)[0][4:], out_doc[4:])


def test_core_attention_backends_agree_with_dropout_off_and_softmax_fp32():
    torch.manual_seed(6)
    q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    ref = core_attention(q, k, v, backend="local")
    for backend in ("auto", "math", "flash"):
        torch.testing.assert_close(core_attention(q, k, v, backend=backend), ref, rtol=1e-5, atol=1e-5)
    bf = core_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="local", softmax_in_fp32=True)
    torch.testing.assert_close(bf.float(), ref, rtol=5e-2, atol=5e-2)


def test_unavailable_backend_fails_clearly_before_work():
    cfg = tiny(attention_backend="cudnn")
    with pytest.raises(AttentionBackendError, match="--attention-backend cudnn"):
        check_attention_backend(cfg, torch.device("cpu"), torch.float32)
    attn = SelfAttention(cfg, ParallelGroups.single(), 0)
    with pytest.raises(AttentionBackendError, match="attention-backend auto"):
        attn(torch.randn(4, 1, 32))
    # The memory-efficient kernel has no CPU implementation: named in the error too.
    with pytest.raises(AttentionBackendError, match="--attention-backend efficient"):
        check_attention_backend(tiny(attention_backend="efficient"), torch.device("cpu"), torch.float32,
                                with_mask=True)


def test_attention_dropout_uses_model_parallel_stream_and_is_active():
    cfg = tiny(attention_dropout=0.5)
    attn = SelfAttention(cfg, ParallelGroups.single(), 0)
    initialize_parameters(attn, seed=1)
    model_parallel_seed(123, ParallelGroups.single())
    x = torch.randn(6, 2, 32)
    attn.train()
    a, b = attn(x)[0], attn(x)[0]
    assert not torch.allclose(a, b)
    model_parallel_seed(123, ParallelGroups.single())
    torch.testing.assert_close(attn(x)[0], a)
    attn.eval()
    torch.testing.assert_close(attn(x)[0], attn(x)[0])


def test_layernorm_recompute_discards_the_norm_output():
    """The consumer of a recomputed norm keeps no copy of the norm output; backward recomputes it
    and the gradients are unchanged."""
    from gigatron.core.transformer.layer import _DiscardNormOutput

    torch.manual_seed(7)
    norm = RMSNorm(16)
    x = torch.randn(5, 2, 16, requires_grad=True)
    w = torch.randn(16, 8, requires_grad=True)
    ref_y = norm(x)
    (ref_y @ w).square().sum().backward()
    ref = (x.grad.clone(), w.grad.clone())
    x.grad, w.grad = None, None

    y = norm(x)
    discard = _DiscardNormOutput(norm, x, y)
    packed = []
    original_pack = discard.pack
    discard.pack = lambda t: packed.append(original_pack(t)) or packed[-1]
    with discard.hooks():
        out = (y @ w).square().sum()
    assert any(isinstance(p, tuple) for p in packed)  # the matmul's saved input was dropped
    assert all(not (isinstance(p, torch.Tensor) and p.untyped_storage().data_ptr() == y.untyped_storage().data_ptr())
               for p in packed)
    out.backward()
    torch.testing.assert_close(x.grad, ref[0])
    torch.testing.assert_close(w.grad, ref[1])
