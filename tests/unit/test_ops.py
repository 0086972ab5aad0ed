"""Fast paths against their plain-PyTorch references on random inputs."""

import pytest
import torch

from gigatron.core.ops.cross_entropy import (chunked_output_cross_entropy, default_chunk_tokens,
                                             reference_output_cross_entropy)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _inputs(dtype, s=9, b=3, h=16, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(s, b, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.5).to(dtype).requires_grad_()
    target = torch.randint(0, v, (s, b), generator=g)
    grad = torch.rand(s, b, generator=g)  # an uneven upstream gradient, like a loss mask
    return hidden, weight, target, grad


def _run(fn, hidden, weight, target, grad, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = fn(h, w, target, **kw)
    (loss * grad).sum().backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 4, 7, 27, 1000])
def test_chunked_output_cross_entropy_matches_reference_fp32(chunk):
    hidden, weight, target, grad = _inputs(torch.float32)
    ref = _run(reference_output_cross_entropy, hidden, weight, target, grad)
    got = _run(chunked_output_cross_entropy, hidden, weight, target, grad, chunk_tokens=chunk)
    assert got[0].shape == (9, 3) and got[0].dtype == torch.float32
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_output_cross_entropy_bf16_close_to_reference():
    hidden, weight, target, grad = _inputs(torch.bfloat16, s=32, b=2, h=64, v=300)
    exact = _run(reference_output_cross_entropy, hidden.float(), weight.float(), target, grad)
    plain = _run(reference_output_cross_entropy, hidden, weight, target, grad)
    got = _run(chunked_output_cross_entropy, hidden, weight, target, grad, chunk_tokens=10)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], plain[0], rtol=1e-2, atol=1e-2)
    # At least as close to the fp32 result as the plain bf16 path (the weight gradient is
    # accumulated over chunks in fp32).
    for a, b, e in zip(got[1:], plain[1:], exact[1:]):
        err_fused = (a.float() - e).abs().max()
        err_plain = (b.float() - e).abs().max()
        assert err_fused <= 1.5 * err_plain + 1e-4, (err_fused, err_plain)


def test_chunked_output_cross_entropy_checks_and_chunk_size():
    hidden, weight, target, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match="disagree"):
        chunked_output_cross_entropy(hidden, weight, target[:, :2])
    with pytest.raises(ValueError, match="hidden size"):
        chunked_output_cross_entropy(hidden, weight[:, :8], target)
    # About 256 MiB of fp32 logits per chunk for a GPT-2 vocabulary.
    assert default_chunk_tokens(50304) == 1334


@pytest.mark.gpu
def test_chunked_output_cross_entropy_cuda_compiled_kernels_match_reference():
    hidden, weight, target, grad = _inputs(torch.float32, s=64, b=4, h=128, v=1000)
    hidden, weight, target, grad = hidden.cuda(), weight.cuda(), target.cuda(), grad.cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = _run(reference_output_cross_entropy, hidden, weight, target, grad)
    for chunk in (50, 256):  # the last chunk is shorter: the compiled kernels take any chunk length
        got = _run(chunked_output_cross_entropy, hidden, weight, target, grad, chunk_tokens=chunk)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- one-row GEMV (decode)
def test_gemv_falls_back_to_linear_where_it_does_not_apply():
    from gigatron.core.ops.gemv import gemv_applies, maybe_gemv

    x = torch.randn(1, 1, 16)
    w = torch.randn(8, 16)
    b = torch.randn(8)
    assert not gemv_applies(x, w)  # CPU, fp32
    torch.testing.assert_close(maybe_gemv(x, w, b), torch.nn.functional.linear(x, w, b), rtol=0, atol=0)


def test_linear_one_row_refuses_inputs_it_cannot_run():
    from gigatron.core.ops.gemv import linear_one_row

    with pytest.raises(ValueError, match="use F.linear"):
        linear_one_row(torch.randn(2, 16), torch.randn(8, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(6144, 2048, True), (2048, 8192, False), (1000, 520, True), (50304, 2048, False)])
def test_gemv_matches_linear_on_random_inputs(dtype, shape):
    from gigatron.core.ops.gemv import gemv_applies, linear_one_row, maybe_gemv, reference_linear_one_row

    n, k, has_bias = shape
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    w = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).to(dtype)
    b = torch.randn(n, device="cuda", generator=gen).to(dtype) if has_bias else None
    x = torch.randn(1, 1, k, device="cuda", generator=gen).to(dtype)
    assert gemv_applies(x, w)
    want = reference_linear_one_row(x.float(), w.float(), None if b is None else b.float())
    got = linear_one_row(x, w, b)
    assert got.shape == (1, 1, n) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
    torch.testing.assert_close(maybe_gemv(x, w, b), got, rtol=0, atol=0)
    torch.testing.assert_close(linear_one_row(x, w, b, pdl=True), got, rtol=0, atol=0)  # only the launch differs
    # More than one row is not a GEMV: maybe_gemv keeps cuBLAS.
    x2 = torch.randn(2, 1, k, device="cuda", generator=gen).to(dtype)
    assert not gemv_applies(x2, w)
