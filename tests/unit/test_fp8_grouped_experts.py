"""FP8 GroupedMLP experts (--moe-grouped-gemm) on the CPU, through the emulated grouped GEMM (the
reference path: the FP8 values and scales of the Hopper kernel path, dequantized GEMMs expert by
expert):

- forward, dgrad and wgrad against a float32 computation that quantizes each expert's rows, weight
  and gradient with explicitly given scales (tensorwise: from each expert's amax; delayed: the
  state's scales, saturating what lies beyond them), and against the bf16 grouped experts;
- experts without tokens; the kernel path's padded layout and rowwise scales, run on the CPU with a
  stand-in for torch._scaled_grouped_mm that checks the kernel's requirements;
- GroupedMLP in FP8 equals SequentialMLP in FP8 (same experts, same per-expert scales, same names);
- delayed-scaling state and checkpoints by global expert number: expert-parallel size 1 and 2
  (gloo, 2 processes) record, update, save and resume the same state;
- a tiny MoE GPT trains with --moe-grouped-gemm in FP8 (tensorwise, delayed) from pretrain_gpt's path.

GPU tests (marked gpu): torch._scaled_grouped_mm equals the emulated path within FP8 rounding, and
one training step on the card.
"""

import pytest
import torch
from torch.testing import assert_close

from gigatron.core.fp8 import FP8Config, FP8LinearState, FP8Recipe, fp8_grouped_mm
from gigatron.core.fp8.grouped import GROUPED_DTYPE, _FP8GroupedFunction
from gigatron.core.fp8.model import (gather_fp8_state_dict, load_fp8_state_dict, update_model_fp8_states)
from gigatron.core.fp8.state import GRAD_OUTPUT, INPUT, WEIGHT
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.parallel.init import initialize_parameters
from gigatron.core.transformer.config import TransformerConfig
from gigatron.core.transformer.moe import MoEConfig
from gigatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP
from gigatron.core.transformer.moe.grouped_gemm import grouped_mm

COUNTS = [5, 0, 9, 3]  # expert 1 gets no tokens
G, K, M = 4, 32, 48
FP8_MAX = 448.0


def _recipe(kind, fmt="hybrid", **kw):
    extra = dict(fp8_amax_history_len=3, fp8_amax_compute_algo="max") if kind == "delayed" else {}
    return FP8Config(fp8=fmt, fp8_recipe=kind, **extra, **kw)


def _data(seed, dtype=torch.float32, counts=COUNTS):
    gen = torch.Generator().manual_seed(seed)
    n = sum(counts)
    x = torch.randn(n, K, generator=gen) * 3.0
    w = torch.randn(G, K, M, generator=gen) * torch.tensor([1.0, 8.0, 0.25, 2.0])[:, None, None]
    dy = torch.randn(n, M, generator=gen) * 1e-3  # small gradients: their scales are far from 1
    return x.to(dtype), w.to(dtype), dy.to(dtype)


def _qdq(t, scale):
    """fp32 quantize -> dequantize with one scale, E4M3, saturating."""
    scale = torch.as_tensor(scale, dtype=torch.float32)
    return (t.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale.reciprocal()


def _current_scale(t):
    amax = t.abs().max().float() if t.numel() else torch.tensor(0.0)
    return torch.tensor(FP8_MAX) / amax if amax > 0 else torch.tensor(1.0)


def _explicit_reference(x, w, dy, counts, scales=None):
    """(y, dx, dw) in fp32, each expert quantized with `scales[g]` (x, w, dy) or its current amax."""
    ys, dxs, dws = [], [], []
    start = 0
    for g, n in enumerate(counts):
        xg, dyg = x[start:start + n].float(), dy[start:start + n].float()
        start += n
        sx, sw, sdy = (scales[g, INPUT], scales[g, WEIGHT], scales[g, GRAD_OUTPUT]) if scales is not None else (
            _current_scale(xg), _current_scale(w[g]), _current_scale(dyg))
        xq, wq, dyq = _qdq(xg, sx), _qdq(w[g], sw), _qdq(dyg, sdy)
        ys.append(xq @ wq)
        dxs.append(dyq @ wq.t())
        dws.append(xq.t() @ dyq)
    return torch.cat(ys), torch.cat(dxs), torch.stack(dws)


def _run(x, w, dy, counts, recipe, history=None, scale=None):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    y = fp8_grouped_mm(x, w, torch.tensor(counts), recipe, history, scale)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    return y, dx, dw


TIGHT = dict(rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the math
def test_tensorwise_equals_explicit_fp32_quantization_per_expert():
    x, w, dy = _data(0)
    recipe = FP8Recipe.for_device(_recipe("tensorwise"), "cpu")
    assert recipe.grouped_backend == "emulate"
    y, dx, dw = _run(x, w, dy, COUNTS, recipe)
    ry, rdx, rdw = _explicit_reference(x, w, dy, COUNTS)
    assert_close(y, ry, **TIGHT)
    assert_close(dx, rdx, **TIGHT)
    assert_close(dw, rdw, **TIGHT)
    assert torch.equal(dw[1], torch.zeros(K, M))  # the expert without tokens has no gradient
    # One scale per expert, not per tensor: one scale for all rows would differ (the experts'
    # weights differ by 32x in magnitude).
    whole = _qdq(x, _current_scale(x))[:5] @ _qdq(w[0], _current_scale(w))
    assert not torch.allclose(y[:5], whole, **TIGHT)


def test_delayed_uses_the_states_scales_saturates_and_records_each_experts_amax():
    x, w, dy = _data(1)
    recipe = FP8Recipe.for_device(_recipe("delayed"), "cpu")
    history = torch.zeros(G, 3, 3)
    history[:, 1] = 7.0  # an earlier step's amaxes stay where they are
    # Scales from stale amaxes: expert 0's input scale assumes an amax 4x too small (saturates).
    amax_x = torch.stack([x[:5].abs().max(), torch.tensor(1.0), x[5:14].abs().max(), x[14:].abs().max()])
    scale = torch.stack([FP8_MAX / (amax_x * torch.tensor([0.25, 1, 2, 1])),
                         torch.tensor([2.0 ** -1, 2.0 ** -4, 2.0 ** 5, 2.0 ** 2]),
                         torch.tensor([2.0 ** 16, 3.0, 2.0 ** 17, 2.0 ** 15])], dim=1)  # [G, 3]
    y, dx, dw = _run(x, w, dy, COUNTS, recipe, history, scale)
    ry, rdx, rdw = _explicit_reference(x, w, dy, COUNTS, scales=scale)
    assert (x[:5] * scale[0, INPUT]).abs().max() > FP8_MAX  # the reference did saturate
    assert_close(y, ry, **TIGHT)
    assert_close(dx, rdx, **TIGHT)
    assert_close(dw, rdw, **TIGHT)
    starts = [0, 5, 5, 14]
    for g, n in enumerate(COUNTS):
        rows = slice(starts[g], starts[g] + n)
        expect_x = x[rows].abs().max() if n else torch.tensor(0.0)
        expect_dy = dy[rows].abs().max() if n else torch.tensor(0.0)
        assert torch.equal(history[g, 0], torch.stack([expect_x, w[g].abs().max(), expect_dy]))
    assert bool((history[:, 1] == 7.0).all()) and bool((history[:, 2] == 0).all())


def test_close_to_the_bf16_grouped_experts():
    x, w, dy = _data(2, torch.bfloat16)
    ref_x, ref_w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref_y = grouped_mm(ref_x, ref_w, torch.tensor(COUNTS), use_kernel=False)
    ref_dx, ref_dw = torch.autograd.grad(ref_y, (ref_x, ref_w), dy)
    for kind in ("tensorwise", "delayed", "blockwise"):
        recipe = FP8Recipe.for_device(_recipe(kind, fmt="e4m3" if kind == "blockwise" else "hybrid"), "cpu")
        state = (torch.zeros(G, 3, 3), torch.ones(G, 3)) if kind == "delayed" else (None, None)
        if kind == "delayed":  # the scales of a previous step of the same data
            _run(x, w, dy, COUNTS, recipe, *state)
            update = FP8LinearState(3, GROUPED_DTYPE, GROUPED_DTYPE, amax_compute_algo="max")
            for g in range(G):
                update.amax_history.copy_(state[0][g])
                update.scale.copy_(state[1][g])
                update.update_scales()
                state[0][g].copy_(update.amax_history)
                state[1][g].copy_(update.scale)
        y, dx, dw = _run(x, w, dy, COUNTS, recipe, *state)
        assert y.dtype == dx.dtype == dw.dtype == torch.bfloat16
        for got, ref in ((y, ref_y), (dx, ref_dx), (dw, ref_dw)):
            err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            assert 1e-3 < err < 0.06, (kind, err)  # FP8 rounding, not bf16 rounding, and no more


def test_no_tokens_at_all():
    _, w, _ = _data(3)
    for kind in ("tensorwise", "delayed", "blockwise"):
        recipe = FP8Recipe.for_device(_recipe(kind), "cpu")
        history, scale = torch.zeros(G, 3, 3), torch.ones(G, 3)
        x = torch.zeros(0, K, requires_grad=True)
        wp = w.clone().requires_grad_(True)
        y = fp8_grouped_mm(x, wp, torch.zeros(G, dtype=torch.long), recipe, history, scale)
        assert y.shape == (0, M)
        y.sum().backward()
        assert wp.grad is None or not wp.grad.any()
        if kind == "delayed":
            assert not history[:, 0, INPUT].any() and not history[:, 0, GRAD_OUTPUT].any()
            assert torch.equal(history[:, 0, WEIGHT], w.abs().amax(dim=(1, 2)))


def test_bad_shapes_and_missing_state_are_refused():
    recipe = FP8Recipe.for_device(_recipe("delayed"), "cpu")
    x, w, _ = _data(0)
    with pytest.raises(ValueError, match="group sizes"):
        fp8_grouped_mm(x, w, torch.tensor([17]), recipe, torch.zeros(G, 3, 3), torch.ones(G, 3))
    with pytest.raises(ValueError, match="needs the experts' stacked amax history"):
        fp8_grouped_mm(x, w, torch.tensor(COUNTS), recipe)


def test_the_log_line_says_how_the_grouped_experts_run():
    import dataclasses

    from gigatron.core.fp8.grouped import grouped_experts_note

    tensorwise = FP8Recipe.for_device(_recipe("tensorwise"), "cpu")
    assert "emulated" in grouped_experts_note(tensorwise)
    kernel = dataclasses.replace(tensorwise, grouped_backend="scaled_grouped_mm")
    assert grouped_experts_note(kernel).endswith(": torch._scaled_grouped_mm")
    assert "E4M3 for activations, weights and gradients" in grouped_experts_note(kernel)
    blockwise = grouped_experts_note(FP8Recipe.for_device(_recipe("blockwise"), "cpu"))
    assert "expert by expert" in blockwise and "use --fp8-recipe tensorwise or delayed" in blockwise


# ------------------------------------------------------------------ the kernel path's layout
def _stand_in_scaled_grouped_mm(mat_a, mat_b, scale_a, scale_b, offs=None, bias=None, scale_result=None,
                                out_dtype=None, use_fast_accum=False):
    """torch._scaled_grouped_mm's rowwise FP8 contract on the CPU, with the CUDA kernel's checks."""
    assert mat_a.dtype == mat_b.dtype == torch.float8_e4m3fn, "E4M3 operands only"
    assert mat_a.stride(-1) == 1 and mat_b.stride(-2) == 1, "mat_a row-major, mat_b column-major"
    assert mat_a.shape[-1] % 16 == 0 and mat_b.shape[-2] % 16 == 0 and mat_b.shape[-1] % 16 == 0
    assert scale_a.dtype == scale_b.dtype == torch.float32 and scale_a.is_contiguous()
    assert offs.dtype == torch.int32 and offs.dim() == 1 and bias is None and out_dtype in (None, torch.bfloat16)
    a, b = mat_a.float(), mat_b.float()
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    groups = len(ends)
    if mat_a.dim() == 2 and mat_b.dim() == 3:
        assert tuple(scale_a.shape) == (a.shape[0],) and tuple(scale_b.shape) == (groups, b.shape[-1])
        out = torch.full((a.shape[0], b.shape[-1]), float("nan"))  # rows of no group: undefined
        for g, (s, e) in enumerate(zip(starts, ends)):
            out[s:e] = (a[s:e] * scale_a[s:e, None]) @ (b[g] * scale_b[g][None, :])
    else:
        assert mat_a.dim() == 2 and mat_b.dim() == 2
        assert all(e % 16 == 0 for e in ends), "groups along the contraction dim start 16-byte aligned"
        m, n = a.shape[0], b.shape[1]
        assert tuple(scale_a.shape) == (groups * m,) and tuple(scale_b.shape) == (groups * n,)
        out = torch.full((groups, m, n), float("nan"))  # an empty group's slot: undefined
        for g, (s, e) in enumerate(zip(starts, ends)):
            if e > s:
                out[g] = (a[:, s:e] * scale_a[g * m:(g + 1) * m, None]) @ (b[s:e] * scale_b[g * n:(g + 1) * n][None, :])
    return out.to(torch.bfloat16)


@pytest.mark.parametrize("kind", ["tensorwise", "delayed"])
@pytest.mark.parametrize("fp8_wgrad", [True, False])
def test_kernel_path_layout_equals_the_emulated_path(monkeypatch, kind, fp8_wgrad):
    """The padded layout (expert groups at multiples of 16, zero rows between), the per-expert
    scales expanded to rowwise factors and the column-major operands give the emulated result."""
    monkeypatch.setattr(torch, "_scaled_grouped_mm", _stand_in_scaled_grouped_mm, raising=False)
    x, w, dy = _data(4, torch.bfloat16)
    counts = torch.tensor(COUNTS)
    results = []
    for use_kernel in (True, False):
        history, scale = (torch.zeros(G, 3, 3), torch.full((G, 3), 2.0 ** 4)) if kind == "delayed" else (None, None)
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = _FP8GroupedFunction.apply(xi, wi, counts, history, scale, use_kernel, fp8_wgrad)
        dx, dw = torch.autograd.grad(y, (xi, wi), dy)
        results.append((y, dx, dw, history))
    (y, dx, dw, hist), (ry, rdx, rdw, rhist) = results
    for got, ref in ((y, ry), (dx, rdx), (dw, rdw)):
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        assert_close(got.float(), ref.float(), rtol=1.6e-2, atol=1e-2 * ref.float().abs().max().item())
    assert torch.equal(dw[1], torch.zeros(K, M, dtype=torch.bfloat16))
    if kind == "delayed":
        assert torch.equal(hist, rhist)


# ------------------------------------------------------------------ the module
H, FFN = 32, 48


def _config(**kw):
    return TransformerConfig(num_layers=2, hidden_size=H, num_attention_heads=2, ffn_hidden_size=64, seq_length=16,
                             add_bias_linear=False, swiglu=True, **kw)


def _enable(experts, config, recipe):
    """What gigatron.core.fp8.model.enable_fp8 does for one expert module: {name: state}."""
    states = {}
    if isinstance(experts, GroupedMLP):
        linears = list(experts.fp8_slots())
    else:
        linears = [(sub.fp8_key, sub) for sub in experts.modules() if getattr(sub, "fp8_key", None)]
    for name, linear in linears:
        state = FP8LinearState.from_config(config) if recipe.kind == "delayed" else None
        linear.enable_fp8(recipe, state)
        if state is not None:
            states[name] = state
    return states


def test_grouped_mlp_in_fp8_equals_sequential_mlp_in_fp8():
    """Same experts, same per-expert scales, same state names: with E4M3 gradients (the grouped
    experts' format) the two implementations agree up to FP8 rounding flips of single elements."""
    config = _recipe("tensorwise", fmt="e4m3")
    recipe = FP8Recipe.for_device(config, "cpu")
    groups = ParallelGroups.single()
    seq = SequentialMLP(_config(), MoEConfig(num_experts=G, moe_ffn_hidden_size=FFN), groups, 1)
    grp = GroupedMLP(_config(), MoEConfig(num_experts=G, moe_ffn_hidden_size=FFN, moe_grouped_gemm=True), groups, 1)
    initialize_parameters(seq, 3)
    initialize_parameters(grp, 3)
    assert sorted(name for name, _ in grp.fp8_slots()) == sorted(
        sub.fp8_key for sub in seq.modules() if getattr(sub, "fp8_key", None))
    _enable(seq, config, recipe)
    _enable(grp, config, recipe)
    gen = torch.Generator().manual_seed(5)
    counts = torch.tensor([6, 0, 11, 4])
    rows = torch.randn(21, H, generator=gen)
    grad = torch.randn(21, H, generator=gen)
    outs = []
    for experts in (seq, grp):
        x = rows.clone().requires_grad_(True)
        y = experts(x, counts)
        y.backward(grad)
        outs.append((y, x.grad))
    for got, ref in zip(outs[1], outs[0]):
        assert ((got - ref).norm() / ref.norm()).item() < 2e-3
    g1 = grp.weight1.grad.view(G, H, -1)
    for j, expert in enumerate(seq.local_experts):
        ref = expert.linear_fc1.weight.grad
        assert ((g1[j].t() - ref).norm() / ref.norm().clamp(min=1e-12)).item() < 2e-3 or not ref.any()
    bf16 = GroupedMLP(_config(), MoEConfig(num_experts=G, moe_ffn_hidden_size=FFN, moe_grouped_gemm=True), groups, 1)
    initialize_parameters(bf16, 3)
    assert not torch.allclose(bf16(rows, counts), outs[1][0], rtol=1e-4, atol=1e-5)  # FP8 did run


# ------------------------------------------------------------------ delayed state over expert parallelism
STEPS = 3


def _step_data(step):
    gen = torch.Generator().manual_seed(100 + step)
    counts = torch.tensor([[4, 0, 7, 3], [2, 5, 0, 6], [3, 3, 1, 8]][step])
    n = int(counts.sum())
    return counts, torch.randn(n, H, generator=gen), torch.randn(n, H, generator=gen)


def _run_steps(groups, steps, saved=None):
    """A GroupedMLP (4 experts, this rank's share) in FP8 delayed; `saved` loaded first. Returns
    ({global expert: (output, input grad)} of the last step, gathered state dict)."""
    config = _recipe("delayed")
    recipe = FP8Recipe.for_device(config, "cpu")
    experts = GroupedMLP(_config(), MoEConfig(num_experts=G, moe_ffn_hidden_size=FFN, moe_grouped_gemm=True),
                         groups, 1)
    initialize_parameters(experts, 3)
    states = _enable(experts, config, recipe)
    assert len(states) == 2 * experts.num_local_experts
    if saved is not None:
        restored, fresh = load_fp8_state_dict(states, saved)
        assert not fresh and len(restored) == len(states)
    local = experts.local_expert_ids
    by_expert = {}
    for step in steps:
        counts, rows, grad = _step_data(step)
        pieces = torch.split(rows, counts.tolist())
        grads = torch.split(grad, counts.tolist())
        x = torch.cat([pieces[g] for g in local]).requires_grad_(True)
        y = experts(x, counts[local])
        y.backward(torch.cat([grads[g] for g in local]))
        update_model_fp8_states(states, groups)
        out_pieces = torch.split(y.detach(), counts[local].tolist())
        dx_pieces = torch.split(x.grad, counts[local].tolist())
        by_expert = {g: (out_pieces[i], dx_pieces[i]) for i, g in enumerate(local)}
    return by_expert, gather_fp8_state_dict(states, groups.tp_ep_pp)


def _ep_worker(rank, world_size, saved):
    from gigatron.core.parallel.config import ParallelConfig

    groups = ParallelGroups.build(ParallelConfig(expert_model_parallel_size=world_size))
    assert groups.ep.size == world_size and groups.expt_dp.size == 1
    _, after_two = _run_steps(groups, range(2))  # fresh: steps 0 and 1
    resumed, after_three = _run_steps(groups, [2], saved=saved)  # the one-process checkpoint, then step 2
    return after_two, resumed, after_three


def _assert_same_state(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        for key in ("amax_history", "scale"):
            assert torch.equal(a[name][key], b[name][key]), (name, key)


def test_delayed_expert_state_by_global_expert_number_at_ep1_and_ep2():
    from tests.parallel.harness import run_distributed

    single = ParallelGroups.single()
    _, saved_two = _run_steps(single, range(2))
    outputs, saved_three = _run_steps(single, range(3))
    assert "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2" in saved_two
    assert len(saved_two) == 2 * G
    # Expert 1 had no tokens in step 0 and two in step 1: its history has one row of input amax.
    hist = saved_two["decoder.layers.1.mlp.experts.local_experts.1.linear_fc1"]["amax_history"]
    assert hist[-1, INPUT] > 0 and hist[-2, INPUT] == 0 and hist[-2, WEIGHT] > 0
    resumed_single, _ = _run_steps(single, [2], saved=saved_two)
    for g in range(G):
        for a, b in zip(resumed_single[g], outputs[g]):
            assert torch.equal(a, b)  # resuming from the saved state is exact
    ranks = run_distributed(_ep_worker, 2, saved_two, timeout=180)
    for after_two, resumed, after_three in ranks:
        _assert_same_state(after_two, saved_two)  # gathered over ep=2 = the one-process state
        _assert_same_state(after_three, saved_three)
        for g, (out, dx) in resumed.items():  # the one-process checkpoint resumed at ep=2 is exact
            assert torch.equal(out, outputs[g][0]) and torch.equal(dx, outputs[g][1])
    assert sorted(g for _, resumed, _ in ranks for g in resumed) == list(range(G))
    # And back: the ep=2 checkpoint resumes in one process.
    back, _ = _run_steps(single, [2], saved=ranks[0][0])
    for g in range(G):
        assert torch.equal(back[g][0], outputs[g][0])


# ------------------------------------------------------------------ training through pretrain_gpt
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32", "--moe-grouped-gemm"]
TRAIN = ["--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-2", "--min-lr", "3e-3",
         "--lr-warmup-iters", "1", "--lr-decay-style", "cosine", "--train-iters", "4", "--log-interval", "1",
         "--eval-interval", "4", "--eval-iters", "0", "--num-workers", "0", "--seed", "1234", "--no-loss-curve",
         "--mock-data", "--vocab-size", "4096", "--seq-length", "16", "--max-position-embeddings", "16",
         "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--position-embedding-type", "rope",
         "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
         "--attention-dropout", "0", "--hidden-dropout", "0"]


def _pretrain(extra, tmp_path):
    from gigatron.training import gpt
    from gigatron.training.arguments import parse_args
    from gigatron.training.loop import pretrain

    args = parse_args(TRAIN + MOE + list(extra) + ["--data-cache-path", str(tmp_path / "cache")])
    return pretrain(gpt.datasets_provider, gpt.model_provider, gpt.forward_step, args=args)


@pytest.fixture(scope="module")
def _bf16_losses(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ctx = _pretrain([], tmp_path_factory.mktemp("bf16"))
    yield [loss for _, loss in ctx.log.train_history]
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["tensorwise", "delayed"])
def test_tiny_moe_gpt_trains_with_fp8_grouped_experts(kind, _bf16_losses, tmp_path, capsys):
    from gigatron.core.fp8.model import fp8_linears

    flags = ["--fp8-format", "hybrid", "--fp8-recipe", kind]
    if kind == "delayed":
        flags += ["--fp8-amax-history-len", "4", "--fp8-amax-compute-algo", "max"]
    ctx = _pretrain(flags, tmp_path)
    out = capsys.readouterr().out
    assert f"--moe-grouped-gemm experts in FP8 ({kind}" in out and "emulated" in out
    names = {name: linear.fp8_recipe for chunk in ctx.model for name, linear in fp8_linears(chunk.module)}
    experts = [n for n in names if ".experts." in n]
    assert len(experts) == 2 * 4 * 2 and all(names[n] is not None and names[n].kind == kind for n in experts)
    assert "decoder.layers.1.mlp.experts.local_experts.2.linear_fc1" in experts
    losses = [loss for _, loss in ctx.log.train_history]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses != _bf16_losses  # the experts (and the attention linears) ran in FP8
    assert max(abs(a - b) for a, b in zip(losses, _bf16_losses)) < 0.25, (losses, _bf16_losses)
    if kind == "delayed":
        expert_states = {n: s for n, s in ctx.fp8_states.items() if ".experts." in n}
        assert sorted(expert_states) == sorted(experts)
        # Every expert's weight amax was recorded and turned into a scale; the history rolled.
        assert all(bool(s.scale[WEIGHT] != 1) and bool(s.amax_history[1:, WEIGHT].gt(0).all())
                   for s in expert_states.values())
        grouped = [m for chunk in ctx.model for m in chunk.module.modules()
                   if isinstance(m, GroupedMLP) and m.key == "decoder.layers.1.mlp.experts"]
        history, scale = grouped[0].fp8_stacks["fc1"]
        state = ctx.fp8_states["decoder.layers.1.mlp.experts.local_experts.3.linear_fc1"]
        assert state.amax_history.data_ptr() == history[3].data_ptr()  # the state views the stack


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["tensorwise", "delayed"])
def test_gpu_scaled_grouped_mm_equals_the_emulated_path(kind):
    device = torch.device("cuda")
    recipe = FP8Recipe.for_device(_recipe(kind), device)
    assert recipe.grouped_backend == "scaled_grouped_mm", "torch._scaled_grouped_mm did not pass the probe"
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([37, 0, 300, 129, 1, 64, 200, 17])
    k, m = 256, 512
    x = torch.randn(int(counts.sum()), k, generator=gen).to(device, torch.bfloat16)
    w = (torch.randn(len(counts), k, m, generator=gen) / k ** 0.5).to(device, torch.bfloat16)
    dy = torch.randn(x.shape[0], m, generator=gen).to(device, torch.bfloat16)
    results = []
    for use_kernel in (True, False):
        history = torch.zeros(len(counts), 2, 3, device=device) if kind == "delayed" else None
        scale = torch.full((len(counts), 3), 64.0, device=device) if kind == "delayed" else None
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = _FP8GroupedFunction.apply(xi, wi, counts.to(device), history, scale, use_kernel, True)
        results.append((y, *torch.autograd.grad(y, (xi, wi), dy)))
    for got, ref in zip(*results):
        assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.float().abs().max().item())
    assert not results[0][2][1].any()


@pytest.mark.gpu
def test_gpu_torch_compile_of_the_fp8_grouped_gemm():
    device = torch.device("cuda")
    recipe = FP8Recipe.for_device(_recipe("tensorwise"), device)
    gen = torch.Generator().manual_seed(1)
    counts = torch.tensor([100, 0, 3, 250]).to(device)
    x = torch.randn(353, 128, generator=gen).to(device, torch.bfloat16)
    w = (torch.randn(4, 128, 256, generator=gen) / 128 ** 0.5).to(device, torch.bfloat16)
    dy = torch.randn(353, 256, generator=gen).to(device, torch.bfloat16)
    results = []
    for fn in (fp8_grouped_mm, torch.compile(fp8_grouped_mm)):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = fn(xi, wi, counts, recipe)
        results.append((y, *torch.autograd.grad(y, (xi, wi), dy)))
    for got, ref in zip(*results):
        assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.float().abs().max().item())


@pytest.mark.gpu
def test_gpu_one_training_step_with_fp8_grouped_experts(tmp_path, capsys):
    ctx = _pretrain(["--fp8-format", "hybrid", "--fp8-recipe", "delayed", "--bf16", "--train-iters", "2",
                     "--hidden-size", "64", "--moe-ffn-hidden-size", "64"], tmp_path)
    assert "torch._scaled_grouped_mm" in capsys.readouterr().out
    losses = [loss for _, loss in ctx.log.train_history]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
