"""The Triton decode-attention kernel (gigatron/core/ops/decode_attention.py) run on CPU by Triton's
interpreter (TRITON_INTERPRET=1): rows of different lengths in one call, as continuous batching
gives it, split over slot ranges or not, read only their own valid slots and equal the reference."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent("""
    import torch
    import triton.runtime.interpreter as interpreter

    # The interpreter holds scalars as one-element arrays, which numpy >= 2 refuses to turn into a
    # Python int (a loop bound); read the element instead.
    _patch = interpreter._patch_lang_tensor
    def _patch_lang_tensor(tensor):
        _patch(tensor)
        tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])
    interpreter._patch_lang_tensor = _patch_lang_tensor

    from gigatron.core.ops import decode_attention as da

    torch.manual_seed(0)
    # (rows, query heads, groups, head dim, slots): split ranges (rows x heads below the GPU's
    # programs) with GQA, one row, and one range per (row, head).
    for b, nq, ng, d, S in [(5, 4, 2, 16, 300), (1, 4, 4, 16, 200), (40, 4, 1, 16, 96)]:
        q, k, v = torch.randn(b, nq, d), torch.randn(b, ng, d), torch.randn(b, ng, d)
        positions = torch.randint(0, S, (b,))
        positions[0] = S - 1
        if b > 1:
            positions[1] = 0
        if b > 2:
            positions[2] = 1
        key_cache, value_cache = torch.randn(b + 2, S, ng, d), torch.randn(b + 2, S, ng, d)
        # Slots past a row's position must never be read: NaN there for the kernel, zeros for the reference.
        hidden = torch.arange(S)[None, :] > positions[:, None]
        kc, vc = key_cache.clone(), value_cache.clone()
        kc[:b][hidden], vc[:b][hidden] = float("nan"), float("nan")
        key_cache[:b][hidden], value_cache[:b][hidden] = 0.0, 0.0
        splits = da.decode_attention_splits(b, nq, S)
        got = da._triton_decode_attention(q, k, v, kc, vc, positions, S, d ** -0.5, False)
        want = da.reference_decode_attention(q, k, v, key_cache, value_cache, positions, S, d ** -0.5)
        err = float((got - want).abs().max())
        assert err < 1e-5, (b, splits, err)
        rows = torch.arange(b)
        assert torch.equal(kc[rows, positions], k) and torch.equal(vc[rows, positions], v)
        print("ok", b, splits, err)
""")


def test_decode_attention_kernel_reads_only_each_rows_valid_slots_and_equals_the_reference():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("ok")]
    assert len(lines) == 3
    assert [int(line.split()[2]) for line in lines] == [5, 4, 1]  # split ranges were exercised (and one range)
