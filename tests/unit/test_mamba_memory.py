"""What the Mamba-2 mixer keeps for backward, counted on the CPU with saved-tensor hooks.

The mixer's conv1d, scan and gated norm keep only their inputs (gigatron/core/ops/ssd_recompute.py
on the CPU, the Triton kernels on CUDA) and recompute the rest in backward. Checked here:
- outputs and gradients are bitwise those of the plain composition of the same ops (the mixer as
  it was before, with every intermediate kept), in fp32 and bf16;
- each piece keeps no storage of its own beyond its inputs;
- per layer kind (Mamba, attention, MLP) at the bench's width ratios, the bytes kept per token are
  the estimate of gigatron/core/memory.py, and the Mamba layer keeps exactly the listed minimum;
- a Mamba layer's backward transient (the gated norm recomputed in fp32) is the estimate's;
- (GPU) the Triton scan and the fused conv1d + scan keep only their inputs too.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gigatron.core import memory
from gigatron.core.models.mamba import MambaModel
from gigatron.core.ops.causal_conv1d import causal_conv1d, reference_causal_conv1d
from gigatron.core.ops.ssd import chunked_ssd_scan, conv_ssd_scan, ssd_scan
from gigatron.core.ops.ssd_recompute import keep_inputs_only
from gigatron.core.ops.ssd_step import reference_gated_rmsnorm
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.parallel.init import initialize_parameters
from gigatron.core.parallel.random import model_parallel_seed
from gigatron.core.transformer.config import TransformerConfig
from gigatron.core.transformer.mamba.config import MambaConfig
from gigatron.core.transformer.mamba.mixer import MambaMixer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def saved_bytes(run, exclude=()) -> int:
    """Bytes of the distinct storages that run() saves for backward, not counting the storages of
    `exclude` (parameters, inputs)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    kept, seen = [], {}

    def pack(t):
        kept.append(t)  # keeps every storage alive, so no address is reused while counting
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and ptr not in seen:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    return sum(seen.values())


def _mixer(dtype, hidden=32, chunk=16):
    cfg = TransformerConfig(num_layers=2, hidden_size=hidden, num_attention_heads=4, seq_length=40,
                            normalization="RMSNorm", add_bias_linear=False, params_dtype=dtype)
    mc = MambaConfig(mamba_state_dim=8, mamba_head_dim=8, mamba_num_groups=2)
    mixer = MambaMixer(cfg, mc, ParallelGroups.single(), layer_number=0, chunk_size=chunk)
    initialize_parameters(mixer, seed=5)
    return mixer


def plain_mixer_forward(mixer, hidden):
    """The mixer's training forward with the plain ops, every intermediate kept by autograd."""
    zxbcdt, _ = mixer.in_proj(hidden)
    s, b = zxbcdt.shape[:2]
    z, xbc, dt = torch.split(zxbcdt, [mixer.d_inner, mixer.conv_dim, mixer.num_heads], dim=-1)
    xbc = reference_causal_conv1d(xbc.transpose(0, 1), mixer.conv1d.weight[:, 0, :], mixer.conv1d.bias, silu=True)
    x, B, C = mixer._split_xbc(xbc)
    dt = F.softplus(dt.float() + mixer.dt_bias.float()).transpose(0, 1)
    A = -torch.exp(mixer.A_log.float())
    y, _ = chunked_ssd_scan(x, dt, A, B, C, mixer.D, chunk_size=mixer.chunk_size)
    y = y.transpose(0, 1).reshape(s, b, mixer.d_inner)
    y = reference_gated_rmsnorm(y, z, mixer.norm.weight, mixer.norm.group_size, mixer.norm.eps)
    return mixer.out_proj(y)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq", [40, 48], ids=["padded", "whole-chunks"])
def test_mixer_is_bitwise_the_plain_composition(dtype, seq):
    mixer = _mixer(dtype)
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(seq, 3, 32, generator=g).to(dtype)
    grad = torch.randn(seq, 3, 32, generator=g).to(dtype)
    results = []
    for forward in (lambda h: mixer(h)[0], lambda h: plain_mixer_forward(mixer, h)):
        mixer.zero_grad(set_to_none=True)
        h = hidden.clone().requires_grad_()
        out = forward(h)
        out.backward(grad)
        results.append([out.detach(), h.grad] + [p.grad for p in mixer.parameters()])
    names = ["out", "input grad"] + [n + " grad" for n, _ in mixer.named_parameters()]
    for name, lean, plain in zip(names, *results):
        assert torch.equal(lean, plain), name


def test_each_piece_keeps_only_its_inputs():
    g = torch.Generator().manual_seed(0)
    b, l, h, p, gr, n = 2, 40, 4, 8, 2, 8
    xbc = torch.randn(b, l, h * p + 2 * gr * n, generator=g, requires_grad=True)
    w, bias = torch.randn(h * p + 2 * gr * n, 4, generator=g), torch.randn(h * p + 2 * gr * n, generator=g)
    assert saved_bytes(lambda: causal_conv1d(xbc, w, bias), exclude=(xbc, w, bias)) == 0
    # The plain reference keeps fp32 copies of x and of the pre-activation.
    assert saved_bytes(lambda: reference_causal_conv1d(xbc.bfloat16(), w, bias), exclude=(w, bias)) > 0

    x, B, C = torch.split(xbc, [h * p, gr * n, gr * n], dim=-1)
    x, B, C = x.unflatten(-1, (h, p)), B.unflatten(-1, (gr, n)), C.unflatten(-1, (gr, n))
    dt = torch.rand(b, l, h, generator=g, requires_grad=True)
    A, D = -torch.rand(h, generator=g) - 0.5, torch.ones(h)
    inputs = (xbc, dt, A, D)
    assert saved_bytes(lambda: ssd_scan(x, dt, A, B, C, D, chunk_size=16, kernel="chunked"), exclude=inputs) == 0
    plain = saved_bytes(lambda: chunked_ssd_scan(x, dt, A, B, C, D, chunk_size=16), exclude=inputs)
    assert plain > 5 * xbc.numel() * 4  # the per-chunk Q x Q matrices, for scale

    y = torch.randn(l, b, h * p, generator=g, requires_grad=True)
    z = torch.randn(l, b, h * p, generator=g, requires_grad=True)
    weight = torch.ones(h * p, requires_grad=True)
    norm = functools.partial(reference_gated_rmsnorm, group_size=16, eps=1e-5)
    assert saved_bytes(lambda: keep_inputs_only(norm, y, z, weight), exclude=(y, z, weight)) == 0
    assert saved_bytes(lambda: norm(y, z, weight), exclude=(y, z, weight)) >= 3 * y.numel() * 4


def test_recompute_passes_gradients_only_where_needed():
    g = torch.Generator().manual_seed(1)
    y, z = torch.randn(6, 16, generator=g, requires_grad=True), torch.randn(6, 16, generator=g)
    weight = torch.randn(16, generator=g)
    norm = functools.partial(reference_gated_rmsnorm, group_size=8, eps=1e-5)
    out = keep_inputs_only(norm, y, z, weight)
    out.sum().backward()
    y2 = y.detach().requires_grad_()
    norm(y2, z, weight).sum().backward()
    assert torch.equal(y.grad, y2.grad) and z.grad is None
    with torch.no_grad():  # nothing recorded: the function itself
        assert not keep_inputs_only(norm, y, z, weight).requires_grad


# The bench's hybrid (hidden 2048, Mamba head dim 64, state 128, 8 groups, attention with 16 heads in
# 8 GQA groups, squared-ReLU MLP of 4h, RMSNorm) scaled down with the same width ratios:
# I = 2h, G N = h / 2 (8 groups), heads = h / 32 (head dim 64), kv width = h / 2.
HIDDEN, SEQ, MBS = 256, 256, 2


def _bench_like(dtype=torch.bfloat16):
    cfg = TransformerConfig(num_layers=3, hidden_size=HIDDEN, num_attention_heads=16, group_query_attention=True,
                            num_query_groups=8, seq_length=SEQ, attention_dropout=0.0, hidden_dropout=0.0,
                            normalization="RMSNorm", position_embedding_type="none", add_bias_linear=False,
                            squared_relu=True, ffn_hidden_size=4 * HIDDEN, params_dtype=dtype, bf16=True)
    mc = MambaConfig(mamba_state_dim=HIDDEN // 16, mamba_head_dim=64, mamba_num_groups=8,
                     hybrid_override_pattern="M*-", is_hybrid_model=True)
    return cfg, mc


def mamba_minimum_bytes_per_token(h, I, G, N, H, a=2):
    """What a Mamba-2 layer needs for backward without recomputing a GEMM or the scan's forward, per
    token: the residual norm (unfused RMSNorm: fp32 input and normalized input, fp32 rsqrt), in_proj's
    input, the in_proj output (the conv input; z and dt are views of it; the conv output, the scan's
    x, B, C, is recomputed from it), softplus's fp32 input and output (dt), the gated norm's input y
    and out_proj's input."""
    return (8 * h + 4) + a * h + a * (2 * I + 2 * G * N + H) + 2 * 4 * H + a * I + a * I


def test_bytes_per_token_per_layer_kind_are_the_estimate():
    cfg, mc = _bench_like()
    groups = ParallelGroups.single()
    model_parallel_seed(1, groups)
    model = MambaModel(cfg, mc, groups, 64).to(torch.bfloat16)
    model.train()
    params = list(model.parameters())
    I, G, N, H = 2 * HIDDEN, 8, HIDDEN // 16, HIDDEN // 32
    tokens = SEQ * MBS
    for layer, kind in zip(model.decoder.layers, "M*-"):
        hidden = torch.randn(SEQ, MBS, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
        layer(hidden).sum().backward()  # the attention backend probe runs outside the counter
        got = saved_bytes(lambda: layer(hidden), exclude=params + [hidden])
        terms = memory.hybrid_layer_activation_bytes(cfg, mc, kind, MBS, SEQ, device_type="cpu")
        # The layer's input is the norm's input: counted by the estimate when the norm keeps it
        # (fp32 here: an fp32 copy, a new storage), so nothing is double counted.
        assert got == sum(terms.values()), (kind, got, terms)
        if kind == "M":
            fixed = 2 * H * 4 + 4 * HIDDEN  # -exp(A_log) fp32 twice, the RMSNorm's fp32 weight
            assert got == tokens * mamba_minimum_bytes_per_token(HIDDEN, I, G, N, H) + fixed


@pytest.mark.gpu
def test_triton_scan_keeps_only_its_inputs():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator(device="cuda").manual_seed(0)
    b, l, h, p, gr, n = 2, 200, 8, 16, 2, 16
    xbc = torch.randn(b, l, h * p + 2 * gr * n, device="cuda", generator=g, dtype=torch.bfloat16,
                      requires_grad=True)
    x, B, C = torch.split(xbc, [h * p, gr * n, gr * n], dim=-1)
    x, B, C = x.unflatten(-1, (h, p)), B.unflatten(-1, (gr, n)), C.unflatten(-1, (gr, n))
    dt = (torch.rand(b, l, h, device="cuda", generator=g) * 0.1).requires_grad_()
    A, D = -torch.rand(h, device="cuda", generator=g) - 0.5, torch.ones(h, device="cuda")
    assert saved_bytes(lambda: ssd_scan(x, dt, A, B, C, D, chunk_size=64, kernel="triton"),
                       exclude=(xbc, dt, A, D)) == 0
    # and its gradients are still the chunked path's
    y, _ = ssd_scan(x, dt, A, B, C, D, chunk_size=64, kernel="triton")
    gy = torch.randn(y.shape, device="cuda", generator=g, dtype=y.dtype)
    got = torch.autograd.grad(y, (xbc, dt), gy)
    xf = xbc.detach().float().requires_grad_()
    xr, Br, Cr = torch.split(xf, [h * p, gr * n, gr * n], dim=-1)
    yr, _ = chunked_ssd_scan(xr.unflatten(-1, (h, p)), dt, A, Br.unflatten(-1, (gr, n)), Cr.unflatten(-1, (gr, n)),
                             D, chunk_size=64)
    want = torch.autograd.grad(yr, (xf, dt), gy.float())
    for a, w in zip(got, want):
        assert ((a.float() - w).abs().max() / w.abs().max()) < 3e-2


class _LiveBytes(TorchDispatchMode):
    """The peak of the bytes of the tensors created inside the mode and still alive (each new
    storage counted once, freed when the tensor that brought it dies)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.seen = 0, 0, set()

    def _freed(self, ptr, n):
        self.seen.discard(ptr)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.seen:
                ptr, n = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                self.seen.add(ptr)
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._freed, ptr, n)
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gated_norm_backward_transient_is_the_estimate(dtype):
    cfg, mc = _bench_like(dtype)
    mixer = MambaMixer(cfg, mc, ParallelGroups.single(), layer_number=0)
    T = 1024
    g = torch.Generator().manual_seed(3)
    y = torch.randn(T, 1, mixer.d_inner, generator=g).to(dtype).requires_grad_()
    z = torch.randn(T, 1, mixer.d_inner, generator=g).to(dtype).requires_grad_()
    out = mixer.norm(y, z)
    grad = torch.randn(out.shape, generator=g).to(dtype)
    tracker = _LiveBytes()
    with tracker:
        out.backward(grad)
    terms = memory.temporary_bytes(cfg, 1, T, 64, device_type="cpu", mamba_config=mc)
    estimate = terms["backward of a Mamba layer (gated norm recomputed)"]
    assert abs(tracker.peak - estimate) <= 0.03 * estimate, (tracker.peak, estimate)


def _grads_of(fn, inputs, outs_grads):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    with torch.enable_grad():
        outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, outs_grads) if g is not None]
    wanted = [t for t in leaves if t is not None]
    got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
    return [next(got) if t is not None else None for t in leaves]


def check_conv_scan_glue(cpu_conv: bool) -> None:
    """The CUDA conv1d + scan Function (ops/ssd_triton.py _ConvSSDScan) on CPU tensors, the scan's
    kernel entry points (and with cpu_conv the convolution's) replaced by the CPU references,
    against the chunked path: the recomputed convolution, the split into x, B, C and the gradients'
    way back through the convolution. Without cpu_conv the Triton convolution kernels run, which
    needs TRITON_INTERPRET=1."""
    from gigatron.core.ops import causal_conv1d_triton, ssd_triton

    replaced = {(ssd_triton, "scan_forward"): lambda x, dt, A, B, C, D, init, chunk: chunked_ssd_scan(
                    x, dt, A, B, C, D, init, chunk),
                (ssd_triton, "scan_backward"): lambda x, dt, A, B, C, D, init, chunk, dy, dfinal: tuple(
                    _grads_of(lambda *a: chunked_ssd_scan(*a, chunk_size=chunk), (x, dt, A, B, C, D, init),
                              (dy, dfinal)))}
    if cpu_conv:
        replaced[(causal_conv1d_triton, "conv_forward")] = (
            lambda x, w, b, silu: reference_causal_conv1d(x, w, b, silu))
        replaced[(causal_conv1d_triton, "conv_backward")] = lambda x, w, b, silu, dout, wd: tuple(
            _grads_of(lambda x, w, b: reference_causal_conv1d(x, w, b, silu), (x, w, b), (dout,)))
    originals = {key: getattr(*key) for key in replaced}
    try:
        for (module, name), fn in replaced.items():
            setattr(module, name, fn)
        g = torch.Generator().manual_seed(4)
        H, P, G, N, b, l = 4, 8, 2, 8, 2, 40
        width = H * P + 2 * G * N
        zxbcdt = torch.randn(l, b, width + 5, generator=g, requires_grad=True)
        xbc = zxbcdt[..., 3:3 + width].transpose(0, 1)  # a strided view, as in the mixer
        weight = torch.randn(width, 4, generator=g, requires_grad=True)
        bias = torch.randn(width, generator=g, requires_grad=True)
        dt = (torch.rand(b, l, H, generator=g) * 0.3 + 0.01).requires_grad_()
        A = (-torch.rand(H, generator=g) - 0.5).requires_grad_()
        D = torch.randn(H, generator=g, requires_grad=True)
        dy = torch.randn(b, l, H, P, generator=g)
        leaves = (zxbcdt, weight, bias, dt, A, D)
        results = []
        for run in (lambda: ssd_triton._ConvSSDScan.apply(xbc, weight, bias, dt, A, D, (H, P, G, N), 16),
                    lambda: conv_ssd_scan(xbc, weight, bias, dt, A, D, (H, P, G, N), chunk_size=16, kernel="chunked")):
            y = run()
            results.append([y.detach()] + list(torch.autograd.grad(y, leaves, dy)))
        tol = 1e-6 if cpu_conv else 1e-4
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    finally:
        for (module, name), fn in originals.items():
            setattr(module, name, fn)


def test_fused_conv_scan_glue_routes_every_gradient():
    pytest.importorskip("triton")
    check_conv_scan_glue(cpu_conv=True)


def test_fused_conv_scan_with_the_triton_conv_under_the_interpreter():
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import sys; sys.path.insert(0, 'tests/unit'); import torch; torch.set_num_threads(1); "
            "from test_mamba_memory import check_conv_scan_glue; check_conv_scan_glue(False); print('ok')")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.gpu
def test_triton_conv_scan_keeps_only_its_inputs_and_matches_the_chunked_path():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator(device="cuda").manual_seed(1)
    H, P, G, N, b, l = 8, 16, 2, 16, 2, 200
    width = H * P + 2 * G * N
    results = []
    for kernel in ("triton", "chunked"):
        g.manual_seed(1)
        zxbcdt = torch.randn(l, b, width + 7, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
        xbc = zxbcdt[..., 3:3 + width].transpose(0, 1)
        weight = (torch.randn(width, 4, device="cuda", generator=g) * 0.5).to(torch.bfloat16).requires_grad_()
        bias = (torch.randn(width, device="cuda", generator=g) * 0.1).to(torch.bfloat16).requires_grad_()
        dt = (torch.rand(b, l, H, device="cuda", generator=g) * 0.1 + 0.01).requires_grad_()
        A = (-torch.rand(H, device="cuda", generator=g) - 0.5).requires_grad_()
        D = torch.ones(H, device="cuda").requires_grad_()
        leaves = (zxbcdt, weight, bias, dt, A, D)
        run = functools.partial(conv_ssd_scan, xbc, weight, bias, dt, A, D, (H, P, G, N), chunk_size=64, kernel=kernel)
        assert saved_bytes(run, exclude=leaves) == 0
        y = run()
        dy = torch.randn(y.shape, device="cuda", generator=g, dtype=y.dtype)
        results.append([y.detach()] + list(torch.autograd.grad(y, leaves, dy)))
    for got, want in zip(*results):
        scale = want.float().abs().max().clamp(min=1e-3)
        assert (got.float() - want.float()).abs().max() / scale < 3e-2
