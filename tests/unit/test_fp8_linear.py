"""fp8_linear: forward and both gradients against a float64 reference for every recipe and format,
main_grad accumulation, delayed-state checkpoints, torch.compile; GPU tests (marked) against bf16.

Error bound: with one scale per tensor (or tile) and the values well inside the format's range,
each operand carries a relative rounding error of at most 2^-4 (E4M3, 3 mantissa bits) or 2^-3
(E5M2); on random data the product's relative Frobenius error is about 3.7% (E4M3 x E4M3) and
6% (E5M2 x E4M3). The tests allow 6% and 10%.
"""

import pytest
import torch
import torch.nn.functional as F

from gigatron.core.fp8 import FP8Config, FP8LinearState, FP8Recipe, fp8_linear, update_fp8_states

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = ("tensorwise", "delayed", "blockwise")
BOUND = {"e4m3": (0.06, 0.06), "hybrid": (0.06, 0.10)}  # (forward, gradients)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _setup(recipe, fmt, device="cpu", **config_kwargs):
    config = FP8Config(fp8=fmt, fp8_recipe=recipe, **config_kwargs)
    state = FP8LinearState.from_config(config, device) if recipe == "delayed" else None
    return FP8Recipe.for_device(config, device), state


def _data(seed=0, s=16, b=2, k=256, n=192, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(s, b, k, generator=gen).to(device, dtype)  # [s, b, K]
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(device, dtype)  # [N, K]
    bias = torch.randn(n, generator=gen).to(device, dtype)
    dy = torch.randn(s, b, n, generator=gen).to(device, dtype)
    return x, w, bias, dy


def _run(recipe, state, x, w, bias, dy, **kwargs):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True)
    y = fp8_linear(x, w, bias, recipe, state, **kwargs)
    gx, gw, gb = torch.autograd.grad(y, (x, w, bias), dy)
    return y, gx, gw, gb


@pytest.mark.parametrize("fmt", ["e4m3", "hybrid"])
@pytest.mark.parametrize("recipe_name", RECIPES)
def test_forward_and_gradients_within_fp8_error(recipe_name, fmt):
    recipe, state = _setup(recipe_name, fmt)
    x, w, bias, dy = _data()
    steps = 3 if state is not None else 1  # delayed: scales come from earlier steps
    for _ in range(steps):
        y, gx, gw, gb = _run(recipe, state, x, w, bias, dy, accumulate_into_main_grad=False)
        if state is not None:
            update_fp8_states([state])
    xr, wr, dyr = x.double(), w.double(), dy.double()
    fwd_bound, grad_bound = BOUND[fmt]
    assert y.dtype == x.dtype and y.shape == (16, 2, 192)
    assert _rel(y, F.linear(xr, wr, bias.double())) < fwd_bound
    assert _rel(gx, dyr @ wr) < grad_bound
    assert _rel(gw, dyr.reshape(-1, 192).t() @ xr.reshape(-1, 256)) < grad_bound
    torch.testing.assert_close(gb, dy.sum(dim=(0, 1)))
    # FP8 error is real: the result is not the exact product.
    assert _rel(y, F.linear(xr, wr, bias.double())) > 1e-3


def test_bf16_activations_give_bf16_outputs_and_gradients():
    recipe, _ = _setup("tensorwise", "hybrid")
    x, w, bias, dy = _data(dtype=torch.bfloat16)
    y, gx, gw, gb = _run(recipe, None, x, w, bias, dy)
    assert (y.dtype, gx.dtype, gw.dtype, gb.dtype) == (torch.bfloat16,) * 4
    assert _rel(y, F.linear(x.double(), w.double(), bias.double())) < 0.06


def test_delayed_uses_earlier_steps_scales_and_records_amaxes():
    recipe, state = _setup("delayed", "hybrid")
    x, w, bias, dy = _data()
    _run(recipe, state, x * 1000, w, bias, dy)  # first step: scale 1, so x * 1000 saturates at 448
    assert state.amax_history[0].tolist() == pytest.approx(
        [(x * 1000).abs().max().item(), w.abs().max().item(), dy.abs().max().item()])
    y_first = fp8_linear(x * 1000, w, None, recipe, state)
    assert y_first.abs().max() < 0.5 * F.linear(x * 1000, w).abs().max()  # saturated
    update_fp8_states([state])
    y, *_ = _run(recipe, state, x * 1000, w, bias, dy)
    assert _rel(y, F.linear((x * 1000).double(), w.double(), bias.double())) < 0.06


def test_delayed_needs_a_state():
    recipe, _ = _setup("delayed", "e4m3")
    x, w, bias, _ = _data()
    with pytest.raises(ValueError, match="FP8LinearState"):
        fp8_linear(x, w, bias, recipe)
    with pytest.raises(ValueError, match="features"):
        fp8_linear(x[..., :128], w, bias, recipe, FP8LinearState(1, torch.float8_e4m3fn, torch.float8_e4m3fn))


@pytest.mark.parametrize("recipe_name", RECIPES)
def test_weight_gradient_accumulates_into_main_grad(recipe_name):
    recipe, state = _setup(recipe_name, "hybrid")
    x, w, bias, dy = _data()
    weight = torch.nn.Parameter(w.to(torch.bfloat16))
    weight.main_grad = torch.zeros(weight.shape, dtype=torch.float32)
    hook_calls = []
    weight.register_post_accumulate_grad_hook(lambda p: hook_calls.append(p.grad))
    grads, single = [], []
    for seed in (1, 2):  # two micro-batches
        xb, _, _, dyb = _data(seed)
        xb, dyb = xb.to(torch.bfloat16), dyb.to(torch.bfloat16)
        fp8_linear(xb, weight, None, recipe, state).backward(dyb)
        alone = torch.nn.Parameter(weight.detach().clone())
        alone.main_grad = torch.zeros_like(weight.main_grad)
        fp8_linear(xb, alone, None, recipe, state).backward(dyb)
        single.append(alone.main_grad)
        grads.append(_run(recipe, state, xb, weight.detach(), bias.to(torch.bfloat16), dyb,
                          accumulate_into_main_grad=False)[2])
    assert weight.grad is None
    assert len(hook_calls) == 2 and hook_calls == [None, None]  # DDP's hook still runs, finds no .grad
    # main_grad is the fp32 sum of the micro-batches' fp32 weight gradients ...
    assert torch.equal(weight.main_grad, single[0] + single[1])
    # ... which, rounded to bf16, is what the layer returns without main_grad.
    assert grads[0].dtype == torch.bfloat16
    assert _rel(weight.main_grad, grads[0].float() + grads[1].float()) < 1e-2
    assert weight.main_grad.dtype == torch.float32


def test_no_fp8_wgrad_computes_the_weight_gradient_in_high_precision():
    recipe, _ = _setup("tensorwise", "e4m3", fp8_wgrad=False)
    x, w, bias, dy = _data()
    _, _, gw, _ = _run(recipe, None, x, w, bias, dy)
    torch.testing.assert_close(gw, dy.reshape(-1, 192).t() @ x.reshape(-1, 256), rtol=1e-5, atol=1e-5)


def test_delayed_state_save_load_gives_identical_next_step():
    recipe, state = _setup("delayed", "hybrid", fp8_amax_history_len=4, fp8_amax_compute_algo="max")
    for seed in range(3):
        x, w, bias, dy = _data(seed)
        _run(recipe, state, x * (seed + 1), w, bias, dy)
        update_fp8_states([state])
    saved = state.state_dict()
    _, restored = _setup("delayed", "hybrid", fp8_amax_history_len=4, fp8_amax_compute_algo="max")
    restored.load_state_dict(saved)
    fresh = FP8LinearState.from_config(FP8Config(fp8="hybrid", fp8_amax_history_len=4, fp8_amax_compute_algo="max"))
    x, w, bias, dy = _data(7)
    for a, b in zip(_run(recipe, state, x, w, bias, dy), _run(recipe, restored, x, w, bias, dy)):
        assert torch.equal(a, b)
    assert torch.equal(state.amax_history, restored.amax_history)
    update_fp8_states([state, restored])
    assert torch.equal(state.scale, restored.scale)
    # Without the restored history the step differs (the scales are not the defaults).
    assert not torch.equal(_run(recipe, fresh, x, w, bias, dy)[0], _run(recipe, state, x, w, bias, dy)[0])


@pytest.mark.parametrize("recipe_name", RECIPES)
def test_torch_compile_matches_eager(recipe_name):
    recipe, state = _setup(recipe_name, "hybrid")
    _, state_eager = _setup(recipe_name, "hybrid")
    x, w, bias, dy = _data()
    weight = torch.nn.Parameter(w.clone())
    weight.main_grad = torch.zeros_like(w)
    compiled = torch.compile(lambda t: fp8_linear(t, weight, bias, recipe, state), backend="aot_eager",
                             fullgraph=True)
    for _ in range(2):
        xc = x.clone().requires_grad_(True)
        weight.main_grad.zero_()
        compiled(xc).backward(dy)
        main_grad_compiled = weight.main_grad.clone()
        xe = x.clone().requires_grad_(True)
        weight.main_grad.zero_()
        fp8_linear(xe, weight, bias, recipe, state_eager).backward(dy)
        assert torch.equal(xc.grad, xe.grad)
        assert torch.equal(main_grad_compiled, weight.main_grad)
        if state is not None:
            assert torch.equal(state.amax_history, state_eager.amax_history)  # incl. dy's amax (backward)
            update_fp8_states([state])
            update_fp8_states([state_eager])


def test_blockwise_uses_the_dequantized_gemm_on_cpu():
    recipe, _ = _setup("blockwise", "e4m3")
    assert recipe.blockwise_backend == "dequantize"


# ---------------------------------------------------------------------- GPU
def _gpu_data(seed=0, m=512, k=1024, n=1024):  # whole 128-tiles, K/128 % 4 == 0: the fast blockwise path
    x, w, bias, dy = _data(seed, s=m // 2, b=2, k=k, n=n, device="cuda", dtype=torch.bfloat16)
    return x, w, bias, dy


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["e4m3", "hybrid"])
@pytest.mark.parametrize("recipe_name", RECIPES)
def test_gpu_gemms_against_bf16(recipe_name, fmt):
    recipe, state = _setup(recipe_name, fmt, device="cuda")
    x, w, bias, dy = _gpu_data()
    for _ in range(3 if state is not None else 1):
        y, gx, gw, gb = _run(recipe, state, x, w, bias, dy, accumulate_into_main_grad=False)
        if state is not None:
            update_fp8_states([state])
    y_ref, gx_ref, gw_ref, gb_ref = (t.float() for t in _bf16_reference(x, w, bias, dy))
    fwd_bound, grad_bound = BOUND[fmt]
    assert y.dtype == torch.bfloat16
    assert _rel(y, y_ref) < fwd_bound
    assert _rel(gx, gx_ref) < grad_bound
    assert _rel(gw, gw_ref) < grad_bound
    assert _rel(gb, gb_ref) < 1e-2


def _bf16_reference(x, w, bias, dy):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True)
    y = F.linear(x, w, bias)
    return (y,) + torch.autograd.grad(y, (x, w, bias), dy)


@pytest.mark.gpu
@pytest.mark.parametrize("recipe_name", RECIPES)
def test_gpu_torch_compile(recipe_name):
    recipe, state = _setup(recipe_name, "hybrid", device="cuda")
    x, w, bias, dy = _gpu_data()
    weight = torch.nn.Parameter(w.clone())
    weight.main_grad = torch.zeros(w.shape, dtype=torch.float32, device="cuda")
    compiled = torch.compile(lambda t: fp8_linear(t, weight, bias, recipe, state))
    xc = x.clone().requires_grad_(True)
    y = compiled(xc)
    y.backward(dy)
    y_ref, gx_ref, gw_ref, _ = _bf16_reference(x, w, bias, dy)
    assert _rel(y, y_ref) < 0.06
    assert _rel(xc.grad, gx_ref) < 0.10
    assert _rel(weight.main_grad, gw_ref) < 0.10
    assert weight.grad is None


@pytest.mark.gpu
def test_gpu_blockwise_runs_scaled_mm_on_hopper():
    """On Hopper with cuBLASLt >= 12.9, the blockwise GEMMs run in torch._scaled_mm (not the
    dequantized fallback)."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("blockwise torch._scaled_mm is a Hopper (9.x) path")
    recipe, _ = _setup("blockwise", "hybrid", device="cuda")
    assert recipe.blockwise_backend == "scaled_mm"



@pytest.mark.parametrize("recipe_name", RECIPES)
def test_activation_recompute_gives_the_same_gradients(recipe_name):
    """The recomputed forward casts with the same scales (delayed: updated only after the step;
    its amaxes are recorded again, a max of equal values)."""
    from gigatron.core.parallel.random import checkpoint

    recipe, _ = _setup(recipe_name, "hybrid")
    x, w1, _, _ = _data()
    w2 = _data(1, n=256, k=192)[1]  # [256, 192]

    def two_linears(t, a, b, states):
        return fp8_linear(torch.relu(fp8_linear(t, a, None, recipe, states[0])), b, None, recipe, states[1])

    results = []
    for recompute in (False, True):
        states = [_setup(recipe_name, "hybrid")[1] for _ in range(2)]
        if recipe_name == "delayed":  # start from scales that are not the defaults
            with torch.no_grad():
                two_linears(x, w1, w2, states)
            update_fp8_states(states)
        xi, ai, bi = (t.clone().requires_grad_(True) for t in (x, w1, w2))
        out = checkpoint(two_linears, False, xi, ai, bi, states) if recompute else two_linears(xi, ai, bi, states)
        out.backward(torch.ones_like(out))
        results.append((xi.grad, ai.grad, bi.grad, [s.amax_history.clone() for s in states if s is not None]))
    for a, b in zip(results[0][:3], results[1][:3]):
        assert torch.equal(a, b)
    for a, b in zip(results[0][3], results[1][3]):
        assert torch.equal(a, b)


def test_bench_cpu_smoke_writes_its_table(tmp_path):
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "bench" / "bench_fp8.py"
    spec = importlib.util.spec_from_file_location("bench_fp8", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "fp8.json"
    assert bench.main(["--cpu-smoke", "--recipes", "delayed,blockwise", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["fp32 (CPU baseline)", "delayed", "blockwise (dequantize)"]
    assert all(r["ms"] > 0 for r in rows)
    assert all(0.01 < r["rel_err_vs_bf16"] < 0.12 for r in rows[1:])


@pytest.mark.parametrize("recipe_name", RECIPES)
def test_no_tokens(recipe_name):
    """An input without rows (an MoE expert that received no tokens) gives empty outputs and zero
    weight gradients."""
    recipe, state = _setup(recipe_name, "hybrid")
    x = torch.randn(0, 2, 256, requires_grad=True)
    w = torch.randn(128, 256, requires_grad=True)
    y = fp8_linear(x, w, None, recipe, state)
    y.sum().backward()
    assert y.shape == (0, 2, 128) and x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w))
