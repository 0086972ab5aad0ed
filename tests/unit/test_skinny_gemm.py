"""The few-row linear kernel (gigatron/core/ops/skinny_gemm.py): Triton's interpreter on CPU
(TRITON_INTERPRET=1) checks the kernel's indexing and masking against F.linear; on a GPU (marked
gpu) the autotuned kernel in bf16/fp16 and the decode step that uses it."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    import triton.runtime.interpreter as interpreter

    # The interpreter holds scalars as one-element arrays, which numpy >= 2 refuses to turn into a
    # Python int (a loop bound); read the element instead.
    _patch = interpreter._patch_lang_tensor
    def _patch_lang_tensor(tensor):
        _patch(tensor)
        tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])
    interpreter._patch_lang_tensor = _patch_lang_tensor

    from gigatron.core.ops import skinny_gemm

    torch.manual_seed(0)
    # Rows from 2 to 16, output features and input features that are not multiples of the tiles.
    for m, n, k, bias, tiling in [(2, 48, 64, True, (16, 64)), (5, 100, 200, False, (32, 64)),
                                  (16, 33, 96, True, (16, 128)), (8, 64, 130, True, (64, 64))]:
        x, w = torch.randn(m, k), torch.randn(n, k)
        b = torch.randn(n) if bias else None
        y = torch.full((m, n), float("nan"))
        skinny_gemm._launch(x, w, b, y, tiling=tiling)
        err = float((y - F.linear(x, w, b)).abs().max())
        assert err < 1e-4, (m, n, k, err)
        print("ok", m, n, k, err)
""")


def test_skinny_kernel_equals_f_linear_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len([line for line in out.stdout.splitlines() if line.startswith("ok")]) == 4


def test_skinny_applies_only_where_it_should():
    from gigatron.core.ops.skinny_gemm import skinny_applies, skinny_linear

    x, w = torch.randn(4, 8), torch.randn(6, 8)
    assert not skinny_applies(x, w)  # CPU
    torch.testing.assert_close(skinny_linear(x, w), torch.nn.functional.linear(x, w))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 2048, 2048), (8, 6144, 2048), (16, 2048, 8192), (5, 50304, 2048),
                                   (3, 100, 72)])
def test_skinny_kernel_on_gpu(dtype, shape):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from gigatron.core.ops.skinny_gemm import skinny_applies, skinny_linear

    m, n, k = shape
    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(1, m, k, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=dtype, generator=g) / k ** 0.5
    b = torch.randn(n, device="cuda", dtype=dtype, generator=g)
    assert skinny_applies(x, w)
    got = skinny_linear(x, w, b)
    want = torch.nn.functional.linear(x.float(), w.float(), b.float())
    assert got.shape == (1, m, n)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_continuous_step_with_the_skinny_kernel_on_gpu():
    """bf16 tiny model on a GPU: the continuous batch's captured step with DecodeKernels(skinny=True)
    gives the tokens of the one without it (the same greedy argmax up to bf16 rounding: compared on
    the first tokens only) and log-probabilities within bf16 tolerance."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    sys.path.insert(0, os.path.dirname(__file__))
    from _inference_fixtures import CharTokenizer, tiny_model

    from gigatron.core.inference.continuous import ContinuousBatcher, Sequence
    from gigatron.core.inference.decode_step import DecodeKernels
    from gigatron.core.inference.engine import InferenceEngine, SamplingParams

    tok = CharTokenizer()
    model = tiny_model(seed=3, position_embedding_type="rope", bf16=True, params_dtype=torch.bfloat16).cuda()
    runs = []
    for skinny in (False, True):
        engine = InferenceEngine(model, tok, decode_mode="cuda_graph", _decode_kernels=DecodeKernels(skinny=skinny))
        batcher = ContinuousBatcher(engine, max_requests=8)
        seqs = [Sequence(tok.tokenize(p), SamplingParams(tokens_to_generate=4, top_k=1, stop_at_eod=False))
                for p in ("hello", "ab", "the cat", "xyz", "one two")]
        for seq in seqs:
            batcher.add(seq)
        while batcher.busy():
            batcher.step()
        runs.append(seqs)
    for a, b in zip(*runs):
        assert a.generated[0] == b.generated[0]
        assert a.logprobs[:2] == pytest.approx(b.logprobs[:2], abs=5e-2)
