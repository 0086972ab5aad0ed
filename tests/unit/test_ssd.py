"""The SSD scan and the causal conv1d: the chunked PyTorch path and the Triton kernels against the
sequential reference (outputs, final states and every input gradient).

CPU: chunked vs sequential in fp32 within 1e-4 (several shapes, chunk sizes that do not divide
the length, with and without initial states and D), and in bf16 within 2% of the output's scale.
GPU (marked `gpu`): each Triton kernel vs the references, fp32 and bf16, forward and backward;
run with `pytest -m gpu tests/unit/test_ssd*.py tests/unit/test_mamba*.py`.
"""

import pytest
import torch
import torch.nn.functional as F

from gigatron.core.ops.causal_conv1d import causal_conv1d, reference_causal_conv1d
from gigatron.core.ops.ssd import chunked_ssd_scan, reference_ssd_scan, ssd_flops, ssd_scan

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_inputs(b, l, h, p, g, n, dtype=torch.float32, device="cpu", seed=0, with_d=True, with_init=True):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    x = randn(b, l, h, p)
    dt = F.softplus(torch.randn(b, l, h, generator=gen) - 1.0).to(device)  # fp32, > 0
    A = -torch.exp(torch.rand(h, generator=gen) * 2.0).to(device)  # [-e^2, -1]
    B = randn(b, l, g, n, scale=0.5)
    C = randn(b, l, g, n, scale=0.5)
    D = torch.randn(h, generator=gen).to(device) if with_d else None
    init = randn(b, h, p, n).float() if with_init else None
    return x, dt, A, B, C, D, init


def run_with_grads(fn, inputs, seed=1):
    """fn(*inputs) -> (y, final); backward of a random projection of both; returns outputs and the
    gradient of every tensor input (None where the input is None)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    y, final = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=gen).to(y.device, y.dtype)
    gf = torch.randn(final.shape, generator=gen).to(final.device, final.dtype)
    ((y.float() * gy.float()).sum() + (final * gf).sum()).backward()
    return y.detach(), final.detach(), [t.grad if t is not None else None for t in leaves]


NAMES = ["x", "dt", "A", "B", "C", "D", "initial_state"]


def assert_all_close(got, want, rtol, atol, what=""):
    y, final, grads = got
    y_ref, final_ref, grads_ref = want
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=rtol, atol=atol, msg=f"{what} y")
    torch.testing.assert_close(final.float(), final_ref.float(), rtol=rtol, atol=atol, msg=f"{what} final state")
    for name, a, b in zip(NAMES, grads, grads_ref):
        if b is None:
            assert a is None, name
            continue
        scale = b.float().abs().max().clamp(min=1.0)
        torch.testing.assert_close(a.float() / scale, b.float() / scale, rtol=rtol, atol=atol,
                                   msg=f"{what} grad of {name}")


@pytest.mark.parametrize("shape,chunk", [
    ((2, 37, 4, 8, 2, 16), 8),    # 37 = 4 chunks + 5: padding
    ((1, 64, 2, 4, 1, 8), 16),    # divides
    ((2, 19, 6, 5, 3, 7), 7),     # odd sizes, chunk does not divide
    ((1, 10, 2, 4, 2, 4), 64),    # one chunk longer than the sequence
])
@pytest.mark.parametrize("with_init", [True, False])
def test_chunked_equals_sequential_fp32(shape, chunk, with_init):
    inputs = make_inputs(*shape, with_init=with_init)
    want = run_with_grads(reference_ssd_scan, inputs)
    got = run_with_grads(lambda *a: chunked_ssd_scan(*a, chunk_size=chunk), inputs)
    assert_all_close(got, want, rtol=1e-4, atol=1e-4, what=f"{shape} chunk {chunk}")


def test_chunked_without_skip():
    inputs = make_inputs(2, 21, 4, 4, 2, 8, with_d=False)
    want = run_with_grads(reference_ssd_scan, inputs)
    got = run_with_grads(lambda *a: chunked_ssd_scan(*a, chunk_size=8), inputs)
    assert_all_close(got, want, rtol=1e-4, atol=1e-4)


def test_chunked_bf16_within_bound():
    """bf16 inputs: both paths compute in fp32 from the same bf16 numbers, so the outputs differ
    by the final rounding to bf16 (2^-8 relative) at most; the bound is 2% of the output's scale."""
    inputs = make_inputs(2, 45, 4, 8, 2, 16, dtype=torch.bfloat16)
    y_ref, f_ref = reference_ssd_scan(*inputs)
    y, f = chunked_ssd_scan(*inputs, chunk_size=16)
    assert y.dtype == torch.bfloat16
    scale = y_ref.float().abs().max()
    assert (y.float() - y_ref.float()).abs().max() <= 0.02 * scale
    torch.testing.assert_close(f, f_ref, rtol=1e-4, atol=1e-4)


def test_final_state_continues_the_scan():
    """Scanning the first part, then the rest from its final state, equals one scan."""
    x, dt, A, B, C, D, init = make_inputs(1, 30, 2, 4, 1, 8)
    y_all, f_all = chunked_ssd_scan(x, dt, A, B, C, D, init, chunk_size=8)
    y1, f1 = chunked_ssd_scan(x[:, :13], dt[:, :13], A, B[:, :13], C[:, :13], D, init, chunk_size=8)
    y2, f2 = chunked_ssd_scan(x[:, 13:], dt[:, 13:], A, B[:, 13:], C[:, 13:], D, f1, chunk_size=8)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_all, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f2, f_all, rtol=1e-5, atol=1e-5)


def test_reference_is_the_recurrence():
    """One head, one group, state 1: y_t = sum_{s<=t} C_t B_s prod_{s<r<=t} e^{dt_r A} dt_s x_s + D x_t."""
    x, dt, A, B, C, D, _ = make_inputs(1, 6, 1, 1, 1, 1, dtype=torch.float64, with_init=False)
    y, _ = reference_ssd_scan(x, dt, A, B, C, D)
    for t in range(6):
        want = D[0] * x[0, t, 0, 0]
        for s in range(t + 1):
            decay = torch.exp(A[0] * dt[0, s + 1:t + 1, 0].double().sum())
            want = want + C[0, t, 0, 0] * B[0, s, 0, 0] * decay * dt[0, s, 0] * x[0, s, 0, 0]
        torch.testing.assert_close(y[0, t, 0, 0], want.double(), rtol=1e-10, atol=1e-10)


def test_bad_shapes_are_refused():
    x, dt, A, B, C, D, init = make_inputs(1, 8, 4, 4, 2, 8)
    with pytest.raises(ValueError, match="heads"):
        chunked_ssd_scan(x, dt, A, B[:, :, :1].expand(1, 8, 3, 8), C[:, :, :1].expand(1, 8, 3, 8))
    with pytest.raises(ValueError, match="dt must be"):
        chunked_ssd_scan(x, dt[:, :4], A, B, C)
    with pytest.raises(ValueError, match="kernel"):
        ssd_scan(x, dt, A, B, C, kernel="fast")
    with pytest.raises(ValueError, match="CUDA"):
        ssd_scan(x, dt, A, B, C, kernel="triton")


def test_ssd_flops_counts_the_chunk_products():
    # one chunk of 128, one head, p = 64, n = 128: 2*128^2*128 + 2*128^2*64 + 4*128*64*128 forward
    assert ssd_flops(1, 128, 1, 64, 128, backward=False) == 2 * 128**2 * 128 + 2 * 128**2 * 64 + 4 * 128 * 64 * 128
    assert ssd_flops(2, 256, 3, 64, 128) == 3 * 2 * 3 * 2 * ssd_flops(1, 128, 1, 64, 128, backward=False)


def test_conv1d_reference_is_the_sum_of_taps():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 5, generator=gen)
    w = torch.randn(5, 4, generator=gen)
    bias = torch.randn(5, generator=gen)
    out = reference_causal_conv1d(x, w, bias, silu=False)
    for t in range(9):
        want = bias.clone()
        for k in range(4):
            src = t - 3 + k
            if src >= 0:
                want = want + w[:, k] * x[:, src]
        torch.testing.assert_close(out[:, t], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference_causal_conv1d(x, w, bias), F.silu(out))
    # A sequence-major view is read through its strides.
    seq_major = x.transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(causal_conv1d(seq_major, w, bias), reference_causal_conv1d(x, w, bias))


# ----------------------------------------------------------------------------------------- GPU
GPU_SHAPES = [
    ((2, 300, 4, 64, 2, 128), 128),   # Megatron's head and state dims; 300 = 2 chunks + 44
    ((1, 256, 8, 32, 8, 16), 64),     # one group per head
    ((2, 100, 6, 16, 1, 32), 32),     # one group for all heads, padding
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape,chunk", GPU_SHAPES)
@pytest.mark.parametrize("with_init", [True, False])
def test_triton_ssd_fp32(shape, chunk, with_init):
    inputs = make_inputs(*shape, device="cuda", with_init=with_init)
    want = run_with_grads(lambda *a: chunked_ssd_scan(*a, chunk_size=chunk), [t.double() if t is not None
                                                                              else None for t in inputs])
    got = run_with_grads(lambda *a: ssd_scan(*a, chunk_size=chunk, kernel="triton"), inputs)
    assert_all_close(got, want, rtol=1e-4, atol=1e-4, what=f"{shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("shape,chunk", GPU_SHAPES)
def test_triton_ssd_bf16(shape, chunk):
    """bf16 inputs against the fp64 scan of the same bf16 numbers: products of bf16-rounded
    intermediates (scores, states) bound the error to 3% of each tensor's scale (measured on an
    H100: at most 0.5% for A's and dt's gradients)."""
    inputs = make_inputs(*shape, dtype=torch.bfloat16, device="cuda")
    want = run_with_grads(lambda *a: chunked_ssd_scan(*a, chunk_size=chunk),
                          [t.double() if t is not None else None for t in inputs])
    got = run_with_grads(lambda *a: ssd_scan(*a, chunk_size=chunk, kernel="triton"), inputs)
    y, final, grads = got
    y_ref, final_ref, grads_ref = want
    for name, a, b in [("y", y, y_ref), ("final", final, final_ref)] + list(zip(NAMES, grads, grads_ref)):
        if b is None:
            continue
        scale = b.double().abs().max()
        err = (a.double() - b.double()).abs().max()
        assert err <= 0.03 * scale, f"{name}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.gpu
def test_triton_ssd_matches_sequential_reference():
    inputs = make_inputs(1, 70, 2, 16, 1, 16, device="cuda")
    want = run_with_grads(reference_ssd_scan, inputs)
    got = run_with_grads(lambda *a: ssd_scan(*a, chunk_size=32, kernel="triton"), inputs)
    assert_all_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("seq_major", [True, False])
def test_triton_causal_conv1d(dtype, tol, seq_major):
    gen = torch.Generator().manual_seed(5)
    b, l, d = 3, 150, 200
    x = torch.randn(l, b, d, generator=gen).to("cuda", dtype).transpose(0, 1) if seq_major else \
        torch.randn(b, l, d, generator=gen).to("cuda", dtype)
    w = (torch.randn(d, 4, generator=gen) * 0.5).to("cuda", dtype)
    bias = torch.randn(d, generator=gen).to("cuda", dtype)
    grad = torch.randn(b, l, d, generator=gen).to("cuda", dtype)
    for silu in (True, False):
        results = []
        for kernel in ("reference", "triton"):
            leaves = [t.detach().clone().requires_grad_() for t in (x, w, bias)]
            out = causal_conv1d(*leaves, silu=silu, kernel=kernel)
            (out.float() * grad.float()).sum().backward()
            results.append([out.detach()] + [t.grad for t in leaves])
        for name, a, b_ in zip(["out", "dx", "dweight", "dbias"], results[1], results[0]):
            scale = b_.float().abs().max().clamp(min=1.0)
            torch.testing.assert_close(a.float() / scale, b_.float() / scale, rtol=tol, atol=tol,
                                       msg=f"{name} silu={silu}")
        if seq_major:
            assert results[1][0].stride(0) < results[1][0].stride(1)  # the layout is kept


def test_bench_cpu_smoke(capsys):
    """bench/bench_ssd.py --cpu-smoke times the chunked scan and SDPA at tiny shapes."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "bench_ssd.py")
    spec = importlib.util.spec_from_file_location("bench_ssd", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--cpu-smoke"])
    out = capsys.readouterr().out
    assert "sdpa (causal)" in out and "ssd chunked" in out
    # Causal attention: 3 passes x 4 b h s^2 d / 2.
    assert bench.attention_flops(1, 16, 4096, 128) == 3 * 2 * 16 * 4096 * 4096 * 128
