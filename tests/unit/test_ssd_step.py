"""The Mamba-2 decode step (gigatron/core/ops/ssd_step.py): the plain-PyTorch step, run token by
token from zero states, equals the sequential references of the convolution and the scan over the
whole sequence (outputs at every position and the final states); `fresh` and `keep` rows; the
Triton kernels (the step and the gated norm) against the reference under Triton's interpreter on
the CPU (fp32 and bf16, strided inputs as the mixer passes them) and on the GPU (marked `gpu`)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gigatron.core.ops.causal_conv1d import reference_causal_conv1d
from gigatron.core.ops.ssd import reference_ssd_scan
from gigatron.core.ops.ssd_step import gated_rmsnorm, mamba_decode_step, reference_mamba_decode_step

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make(b=3, h=4, p=8, g=2, n=16, k=4, seed=0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    c = h * p + 2 * g * n

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    return dict(weight=r(c, k, scale=0.5).to(dtype), bias=r(c, scale=0.1).to(dtype), A_log=r(h, scale=0.5),
                D=r(h).to(dtype), dt_bias=r(h, scale=0.5), groups=g, dims=(b, h, p, g, n, k, c))


def test_steps_equal_the_sequential_references():
    m = make()
    b, h, p, g, n, k, c = m["dims"]
    length = 9
    gen = torch.Generator().manual_seed(1)
    xbc = torch.randn(b, length, c, generator=gen)
    dt_raw = torch.randn(b, length, h, generator=gen)
    conv = reference_causal_conv1d(xbc, m["weight"], m["bias"], silu=True)  # [b, l, C]
    x = conv[..., : h * p].unflatten(-1, (h, p))
    B = conv[..., h * p: h * p + g * n].unflatten(-1, (g, n))
    C = conv[..., h * p + g * n:].unflatten(-1, (g, n))
    dt = F.softplus(dt_raw + m["dt_bias"])
    y_ref, final = reference_ssd_scan(x, dt, -torch.exp(m["A_log"]), B, C, m["D"])
    conv_state = torch.randn(b, c, k - 1)  # garbage: `fresh` must ignore it
    ssm_state = torch.randn(b, h, p, n)
    for t in range(length):
        fresh = torch.full((b,), t == 0)
        y = reference_mamba_decode_step(xbc[:, t], dt_raw[:, t], conv_state, m["weight"], m["bias"], ssm_state,
                                        m["A_log"], m["D"], m["dt_bias"], g, fresh=fresh)
        torch.testing.assert_close(y, y_ref[:, t].reshape(b, h * p), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ssm_state, final, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv_state, xbc[:, -(k - 1):].transpose(1, 2), rtol=0, atol=0)


def test_kept_rows_do_not_change():
    m = make()
    b, h, p, g, n, k, c = m["dims"]
    conv_state, ssm_state = torch.randn(b, c, k - 1), torch.randn(b, h, p, n)
    before = conv_state.clone(), ssm_state.clone()
    keep = torch.tensor([False, True, False])
    reference_mamba_decode_step(torch.randn(b, c), torch.randn(b, h), conv_state, m["weight"], m["bias"], ssm_state,
                                m["A_log"], m["D"], m["dt_bias"], g, keep=keep)
    assert torch.equal(conv_state[1], before[0][1]) and torch.equal(ssm_state[1], before[1][1])
    assert not torch.equal(conv_state[0], before[0][0]) and not torch.equal(ssm_state[2], before[1][2])
    with pytest.raises(ValueError, match="conv channels"):
        reference_mamba_decode_step(torch.randn(b, c + 1), torch.randn(b, h), torch.randn(b, c + 1, k - 1),
                                    torch.randn(c + 1, k), None, ssm_state, m["A_log"], m["D"], m["dt_bias"], g)


def compare_triton_with_reference(device: str) -> None:
    """Triton against the reference: fp32 and bf16, xbc and dt as strided views of one projection
    (as the mixer passes them), fresh and kept rows, two consecutive steps."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        m = make(b=3, h=4, p=40, g=2, n=24, dtype=dtype, device=device)  # P and N not powers of two
        b, h, p, g, n, k, c = m["dims"]
        gen = torch.Generator().manual_seed(2)
        states = {name: (torch.randn(b, c, k - 1, generator=gen).to(device, dtype),
                         torch.randn(b, h, p, n, generator=gen).to(device)) for name in ("ref", "tri")}
        states["tri"] = tuple(t.clone() for t in states["ref"])
        for step in range(2):
            proj = torch.randn(1, b, 7 + c + h, generator=gen).to(device, dtype)  # [s, b, z | xBC | dt] stand-in
            xbc, dt = proj[0, :, 7: 7 + c], proj[0, :, 7 + c:]
            fresh = torch.tensor([True, False, False], device=device) if step == 0 else None
            keep = torch.tensor([False, False, True], device=device)
            out = {}
            for name, kernel in (("ref", "reference"), ("tri", "triton")):
                conv_state, ssm_state = states[name]
                out[name] = mamba_decode_step(xbc, dt, conv_state, m["weight"], m["bias"], ssm_state, m["A_log"],
                                              m["D"], m["dt_bias"], g, fresh=fresh, keep=keep, kernel=kernel)
            torch.testing.assert_close(out["tri"].float(), out["ref"].float(), rtol=tol, atol=tol)
            for a, r in zip(states["tri"], states["ref"]):
                torch.testing.assert_close(a.float(), r.float(), rtol=tol, atol=tol)
        # The gated norm of the step's output with z, a strided view of the projection (2 groups of 80).
        y = out["ref"]
        z = torch.randn(1, b, 3 + h * p + 5, generator=gen).to(device, dtype)[0, :, 3: 3 + h * p]
        weight = torch.randn(h * p, generator=gen).to(device, dtype)
        normed = {kernel: gated_rmsnorm(y, z, weight, h * p // g, kernel=kernel) for kernel in ("reference", "triton")}
        torch.testing.assert_close(normed["triton"].float(), normed["reference"].float(), rtol=tol, atol=tol)


def generate_with_the_triton_step() -> None:
    """A hybrid model's greedy generation with its mixers' step on the Triton kernels equals the
    full forward on the growing sequence (batch of different prompt lengths)."""
    from test_mamba_generation import PROMPTS, TOK, cached_greedy, hybrid_model, reference_greedy

    from gigatron.core.inference.engine import InferenceEngine

    model = hybrid_model("M*M-", seed=12)
    for layer in model.decoder.layers:
        if hasattr(layer, "mixer"):
            layer.mixer.decode_kernel = "triton"
    prompts = [TOK.tokenize(p) for p in PROMPTS]
    got, logits = cached_greedy(InferenceEngine(model, TOK, max_batch_size=4, max_sequence_length=64), prompts, 5)
    for i, p in enumerate(prompts):
        ids, want = reference_greedy(model, p, 5)
        assert got[i] == ids
        torch.testing.assert_close(logits[i], want, rtol=1e-5, atol=1e-5)


def test_triton_step_equals_the_reference_under_the_interpreter():
    pytest.importorskip("triton")
    code = ("import sys; sys.path.insert(0, 'tests/unit'); import torch; torch.set_num_threads(1); "
            "from test_ssd_step import compare_triton_with_reference as c, generate_with_the_triton_step as g; "
            "c('cpu'); g(); print('ok')")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.gpu
def test_triton_step_equals_the_reference_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    compare_triton_with_reference("cuda")
