"""The fused kernels of issue 21 against their plain-PyTorch references.

- LayerNorm/RMSNorm + residual add and bias + GeLU/SwiGLU (Triton): on the CPU through the Triton
  interpreter (a child process with TRITON_INTERPRET=1, small sizes, fp32), including a whole
  TransformerLayer with the fused paths on against the same layer unfused; on a GPU (marked `gpu`)
  at the real sizes in bf16 and fp32.
- The chunked output layer + cross entropy with the loss mask (gradients made in forward): CPU fp32
  against the plain logits path, masked tokens, every token masked, no-grad use; the GPT model and
  the training loss function end to end.
- The CPU path is the unfused code (the stored loss trace, tests/unit/test_loss_trace.py, checks
  it bitwise); the flags parse into the config.

GPU: python -m pytest -q -m gpu tests/unit/test_fused_kernels.py
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from gigatron.core.ops.cross_entropy import chunked_output_cross_entropy, reference_output_cross_entropy
from gigatron.core.ops.fused_activation import fused_activation_available, reference_bias_activation
from gigatron.core.ops.fused_norm import fused_norm_available, reference_add_norm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.usefixtures("one_thread")


def _interpret(check: str):
    triton = pytest.importorskip("triton")  # noqa: F841
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "unit", "_fused_interpret.py"), check],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{check} ok" in done.stdout


@pytest.mark.parametrize("check", ["norm", "activation", "layer"])
def test_triton_kernels_in_the_interpreter(check):
    _interpret(check)


# ------------------------------------------------------------------ the CPU path is unchanged

def test_cpu_uses_the_plain_path():
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.core.transformer.config import TransformerConfig
    from gigatron.core.transformer.layer import TransformerLayer, bias_dropout_add

    x = torch.randn(4, 2, 16)
    assert not fused_norm_available(x) and not fused_activation_available(x)
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=4,
                               max_position_embeddings=4, hidden_dropout=0.0, use_cpu_initialization=True)
    assert config.persist_layer_norm and config.bias_gelu_fusion and config.bias_swiglu_fusion
    layer = TransformerLayer(config, ParallelGroups.single(), 0)
    assert layer.mlp.fused_kind is None and not layer.mlp.linear_fc1.skip_bias_add
    assert not layer._fuse_add_and_norm(x)
    norm = layer.pre_mlp_layernorm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    bias, residual = torch.randn(16), torch.randn(4, 2, 16)
    normed, new = norm.add_and_norm(x, bias, residual)
    expected = bias_dropout_add(x, bias, residual, 0.0, False)
    assert torch.equal(new, expected) and torch.equal(normed, norm(expected))


def test_flags_parse_into_the_config():
    from gigatron.training.arguments import parse_args

    base = ["--num-layers", "2", "--hidden-size", "8", "--num-attention-heads", "2"]
    args = parse_args(base)
    assert args.persist_layer_norm and args.bias_gelu_fusion and args.bias_swiglu_fusion
    assert args.cross_entropy_fusion_impl == "native"
    args = parse_args(base + ["--no-persist-layer-norm", "--no-bias-gelu-fusion", "--no-bias-swiglu-fusion",
                              "--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "te"])
    assert not (args.persist_layer_norm or args.bias_gelu_fusion or args.bias_swiglu_fusion)
    assert args.cross_entropy_loss_fusion and args.cross_entropy_fusion_impl == "te"


def test_unknown_cross_entropy_fusion_impl_is_refused():
    from gigatron.core.transformer.config import TransformerConfig

    with pytest.raises(ValueError, match="cross_entropy_fusion_impl|cross-entropy-fusion-impl"):
        TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, cross_entropy_fusion_impl="liger")


# ------------------------------------------------------------------ chunked output layer + cross entropy

def _ce_case(s=7, b=3, h=16, v=50, seed=0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(s, b, h, generator=gen).to(device, dtype)
    weight = (torch.randn(v, h, generator=gen) * 0.3).to(device, dtype)
    target = torch.randint(0, v, (s, b), generator=gen).to(device)
    mask = (torch.rand(s, b, generator=gen) > 0.3).float().to(device)
    return hidden, weight, target, mask


def _masked_mean_and_grads(fn, hidden, weight, target, mask, scale=3.0):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    losses = fn(h, w, target, mask)
    loss = scale * (losses.float() * mask).sum() / mask.sum().clamp(min=1)
    gh, gw = torch.autograd.grad(loss, [h, w])
    return losses.detach(), gh, gw


def _reference(h, w, target, mask):
    return reference_output_cross_entropy(h, w, target)


@pytest.mark.parametrize("chunk", [1, 5, 21, 64])
def test_chunked_cross_entropy_gradients_in_forward_match_reference(chunk):
    hidden, weight, target, mask = _ce_case()
    fused = _masked_mean_and_grads(
        lambda h, w, t, m: chunked_output_cross_entropy(h, w, t, chunk_tokens=chunk, loss_weights=m),
        hidden, weight, target, mask)
    want = _masked_mean_and_grads(_reference, hidden, weight, target, mask)
    for got, expected in zip(fused, want):
        assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_all_masked_gives_zero_gradients():
    hidden, weight, target, mask = _ce_case()
    mask = torch.zeros_like(mask)
    losses, gh, gw = _masked_mean_and_grads(
        lambda h, w, t, m: chunked_output_cross_entropy(h, w, t, chunk_tokens=4, loss_weights=m),
        hidden, weight, target, mask)
    assert torch.isfinite(losses).all() and not gh.any() and not gw.any()


def test_chunked_cross_entropy_with_weights_under_no_grad():
    hidden, weight, target, mask = _ce_case()
    with torch.no_grad():
        got = chunked_output_cross_entropy(hidden, weight, target, chunk_tokens=4, loss_weights=mask)
    assert_close(got, reference_output_cross_entropy(hidden, weight, target), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="loss_weights"):
        chunked_output_cross_entropy(hidden, weight, target, loss_weights=mask[:, :1])


def _tiny_gpt(fusion: bool):
    from gigatron.core.models.gpt import GPTModel
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.core.transformer.config import TransformerConfig

    config = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2, seq_length=8,
                               max_position_embeddings=8, hidden_dropout=0.0, attention_dropout=0.0,
                               cross_entropy_loss_fusion=fusion, use_cpu_initialization=True)
    return GPTModel(config, ParallelGroups.single(), vocab_size=64, seed=7)


def test_gpt_training_step_with_fused_loss_matches_plain_path():
    from gigatron.training.gpt import _fused_loss_takes_mask, loss_func

    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 64, (2, 8), generator=gen)
    labels = torch.randint(0, 64, (2, 8), generator=gen)
    loss_mask = (torch.rand(2, 8, generator=gen) > 0.25).float()
    results = []
    for fusion in (False, True):
        model = _tiny_gpt(fusion)
        assert _fused_loss_takes_mask(model) == fusion
        extra = {"loss_mask": loss_mask} if fusion else {}
        losses = model(tokens, None, None, labels=labels, **extra)
        loss, _ = loss_func(loss_mask, losses)
        (loss * 4.0).backward()
        results.append([losses.detach()] + [p.grad for p in model.parameters()])
    for got, expected in zip(results[1], results[0]):
        assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ GPU (real sizes)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cuda_grads(fn, inputs, seed=1):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen, device="cuda")).sum() for o in outs)
    return list(outs) + list(torch.autograd.grad(loss, [t for t in leaves if t is not None]))


def _relative_error(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-12)).item()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rms,zero_centered,hidden", [(False, False, 2048), (True, False, 4096), (False, True, 1024),
                                                      (True, True, 5120)])
def test_gpu_fused_add_norm(dtype, rms, zero_centered, hidden):
    from gigatron.core.ops.fused_norm import fused_add_norm

    torch.manual_seed(0)
    rows = 8192
    x = torch.randn(rows, hidden, device="cuda", dtype=dtype)
    residual = torch.randn(rows, hidden, device="cuda", dtype=dtype)
    add_bias = torch.randn(hidden, device="cuda", dtype=dtype)
    weight = torch.rand(hidden, device="cuda", dtype=dtype) + 0.5
    bias = None if rms else torch.randn(hidden, device="cuda", dtype=dtype)
    inputs = [x, residual, add_bias, weight, bias]
    for with_residual in (True, False):
        def run(kernel):
            def fn(x, r, ab, w, b):
                if not with_residual:
                    return kernel(x, None, None, w, b, 1e-5, rms, zero_centered)[0]
                return kernel(x, r, ab, w, b, 1e-5, rms, zero_centered)
            return fn
        ins = inputs if with_residual else [x, None, None, weight, bias]
        got = _cuda_grads(run(fused_add_norm), ins)
        want = _cuda_grads(run(reference_add_norm), ins)
        limit = 2e-2 if dtype == torch.bfloat16 else 1e-5
        for g, w in zip(got, want):
            assert _relative_error(g, w) < limit


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind,width", [("gelu", 8192), ("gelu_tanh", 8192), ("swiglu", 2 * 14336)])
def test_gpu_fused_bias_activation(dtype, kind, width):
    from gigatron.core.ops.fused_activation import fused_bias_activation

    torch.manual_seed(0)
    x = torch.randn(2048, 2, width, device="cuda", dtype=dtype)
    bias = torch.randn(width, device="cuda", dtype=dtype)
    for b in (bias, None):
        got = _cuda_grads(lambda x, b: fused_bias_activation(x, b, kind), [x, b])
        want = _cuda_grads(lambda x, b: reference_bias_activation(x, b, kind), [x, b])
        limit = 2e-2 if dtype == torch.bfloat16 else 1e-5
        for g, w in zip(got, want):
            assert _relative_error(g, w) < limit


@pytest.mark.gpu
@cuda
def test_gpu_chunked_cross_entropy_bf16_gradients_in_forward():
    hidden, weight, target, mask = _ce_case(s=2048, b=4, h=2048, v=50304, dtype=torch.bfloat16, device="cuda")
    fused = _masked_mean_and_grads(
        lambda h, w, t, m: chunked_output_cross_entropy(h, w, t, loss_weights=m), hidden, weight, target, mask)
    want = _masked_mean_and_grads(_reference, hidden, weight, target, mask)
    assert_close(fused[0], want[0], rtol=2e-2, atol=2e-2)
    for got, expected in zip(fused[1:], want[1:]):
        assert _relative_error(got, expected) < 2e-2


@pytest.mark.gpu
@cuda
def test_gpu_gpt_layers_fused_against_unfused():
    """A bf16 GPT (LayerNorm/GeLU) and a Llama-style one (RMSNorm/SwiGLU, no biases) on CUDA: the
    default fused path against --no-persist-layer-norm --no-bias-*-fusion, same weights."""
    from gigatron.core.models.gpt import GPTModel
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.core.transformer.config import TransformerConfig

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1024, (2, 256), generator=gen).cuda()
    labels = torch.randint(0, 1024, (2, 256), generator=gen).cuda()
    for llama in (False, True):
        results = []
        for fused in (True, False):
            extra = dict(normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                         position_embedding_type="rope") if llama else {}
            config = TransformerConfig(
                num_layers=2, hidden_size=512, num_attention_heads=8, seq_length=256, max_position_embeddings=256,
                hidden_dropout=0.0, attention_dropout=0.0, bf16=True, params_dtype=torch.bfloat16,
                persist_layer_norm=fused, bias_gelu_fusion=fused, bias_swiglu_fusion=fused, **extra)
            model = GPTModel(config, ParallelGroups.single(), vocab_size=1024, seed=5).cuda()
            assert (model.decoder.layers[0].mlp.fused_kind is not None) == fused
            losses = model(tokens, None, None, labels=labels)
            losses.mean().backward()
            results.append([losses.detach()] + [p.grad for p in model.parameters()])
        for got, want in zip(*results):
            assert _relative_error(got, want) < 3e-2
