"""FP8 training through pretrain_gpt's path on the CPU: the flags, which linears run in FP8, each
recipe's loss against fp32, activation recompute, checkpoints (exact FP8 resume in both formats, a
bf16 checkpoint resumed in FP8 and back) and Megatron's Llama-3 8B FP8 recipe with tiny sizes.

torch._scaled_mm runs on the CPU, so these runs take the same FP8 code path as a Hopper card
(the GEMMs are emulated; no speed is measured here)."""

import os

import pytest
import torch

from gigatron.training import gpt
from gigatron.training.arguments import parse_args
from gigatron.training.loop import pretrain, setup

ITERS = 8
BASE = ["--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-2", "--min-lr", "3e-3",
        "--lr-warmup-iters", "1", "--lr-decay-style", "cosine", "--train-iters", str(ITERS), "--log-interval", "1",
        "--eval-interval", "4", "--eval-iters", "1", "--num-workers", "0", "--seed", "1234", "--no-loss-curve",
        "--mock-data", "--vocab-size", "4096", "--seq-length", "16", "--max-position-embeddings", "16",
        "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--position-embedding-type", "rope",
        "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
        "--attention-dropout", "0", "--hidden-dropout", "0"]
DELAYED = ["--fp8-format", "hybrid", "--fp8-recipe", "delayed", "--fp8-amax-history-len", "4",
           "--fp8-amax-compute-algo", "max"]
RECIPES = {
    "tensorwise": ["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"],
    "delayed": DELAYED,
    "blockwise": ["--fp8-format", "e4m3", "--fp8-recipe", "blockwise"],
}

_CACHE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _CACHE["data"] = str(tmp_path_factory.mktemp("data-cache"))
    yield
    torch.set_num_threads(threads)
    _CACHE.clear()


def _args(extra):
    return parse_args(BASE + list(extra) + ["--data-cache-path", _CACHE["data"]])


def _train(extra):
    ctx = pretrain(gpt.datasets_provider, gpt.model_provider, gpt.forward_step, args=_args(extra))
    return ctx


def _losses(ctx):
    return [loss for _, loss in ctx.log.train_history]


def _fp32_losses():
    if "fp32" not in _CACHE:
        _CACHE["fp32"] = _losses(_train([]))
    return _CACHE["fp32"]


def _fp8_layers(ctx):
    """{global linear name: recipe kind or None} over every linear of the transformer layers."""
    from gigatron.core.fp8.model import fp8_linears

    out = {}
    for chunk in ctx.model:
        for name, linear in fp8_linears(chunk.module):
            out[name] = None if linear.fp8_recipe is None else linear.fp8_recipe.kind
    return out


# ------------------------------------------------------------------ flags


def test_megatron_flag_names_reach_the_fp8_config():
    from gigatron.training.arguments import configs_from_args
    from gigatron.training.validate import validate_args

    args = _args(DELAYED + ["--fp8-margin", "1", "--first-last-layers-bf16", "--num-layers-at-start-in-bf16", "2",
                            "--num-layers-at-end-in-bf16", "1", "--no-fp8-wgrad", "--fp8-interval", "8"])
    fp8 = configs_from_args(validate_args(args, 1)).fp8
    assert (fp8.fp8, fp8.fp8_recipe, fp8.fp8_amax_history_len, fp8.fp8_amax_compute_algo, fp8.fp8_margin) == (
        "hybrid", "delayed", 4, "max", 1)
    assert (fp8.first_last_layers_bf16, fp8.num_layers_at_start_in_bf16, fp8.num_layers_at_end_in_bf16) == (True, 2, 1)
    assert fp8.fp8_wgrad is False and fp8.fp8_interval == 8
    assert configs_from_args(validate_args(_args([]), 1)).fp8.enabled is False
    with pytest.raises(SystemExit):  # Megatron has no --fp8 flag: --fp8-format is the only spelling
        parse_args(BASE + ["--fp8", "hybrid"])


@pytest.mark.parametrize("extra, message", [
    (["--fp8-format", "hybrid", "--fp8-recipe", "mxfp8"], "--fp8-recipe mxfp8 needs a Blackwell GPU"),
    (DELAYED + ["--fp8-param-gather"], "--fp8-param-gather all-gathers FP8 weights in the distributed optimizer"),
    (RECIPES["blockwise"] + ["--fp8-param-gather", "--use-distributed-optimizer"],
     "--fp8-recipe blockwise scales 128x128 weight blocks"),
    (DELAYED + ["--first-last-layers-bf16", "--num-layers-at-start-in-bf16", "2",
                "--num-layers-at-end-in-bf16", "2"], "no layer would run in FP8"),
    (["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise", "--fp8-amax-history-len", "8"],
     "only apply to --fp8-recipe delayed"),
])
def test_unsupported_fp8_runs_fail_with_one_clear_error(extra, message):
    with pytest.raises(ValueError, match=message):
        setup(gpt.model_provider, _args(extra))


def test_a_card_without_fp8_tensor_cores_is_named(monkeypatch):
    from gigatron.core.fp8 import FP8Config, check_fp8_device

    with pytest.raises(ValueError, match=r"NVIDIA A100.*compute capability 8\.0"):
        check_fp8_device(FP8Config(fp8="hybrid"), device_name="NVIDIA A100-SXM4-80GB", capability=(8, 0))


# ------------------------------------------------------------------ which linears


def test_first_last_layers_bf16_selects_the_linears():
    ctx = setup(gpt.model_provider, _args(DELAYED + ["--first-last-layers-bf16", "--num-layers-at-end-in-bf16", "2"]))
    layers = _fp8_layers(ctx)
    per_layer = {}
    for name, kind in layers.items():
        per_layer.setdefault(int(name.split(".")[2]), set()).add(kind)
    assert per_layer == {0: {None}, 1: {"delayed"}, 2: {None}, 3: {None}}
    assert sorted(n for n, k in layers.items() if k) == [
        "decoder.layers.1.mlp.linear_fc1", "decoder.layers.1.mlp.linear_fc2",
        "decoder.layers.1.self_attention.linear_proj", "decoder.layers.1.self_attention.linear_qkv"]
    assert sorted(ctx.fp8_states) == sorted(n for n, k in layers.items() if k)
    model = ctx.model[0].module
    assert model.output_layer.fp8_recipe is None  # the output layer stays in the parameters' dtype
    # Not a parameter, not a buffer, not in the model's state_dict.
    assert not any("amax" in k or "fp8" in k for k in model.state_dict())
    assert not any("amax" in n for n, _ in model.named_buffers())


def test_moe_sequential_and_grouped_experts_run_in_fp8(capsys):
    moe = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32"]
    ctx = setup(gpt.model_provider, _args(DELAYED + moe))
    layers = _fp8_layers(ctx)
    experts = sorted(n for n in layers if ".experts." in n)
    assert "decoder.layers.0.mlp.experts.local_experts.3.linear_fc2" in experts
    assert len(experts) == 4 * 4 * 2 and all(layers[n] == "delayed" for n in experts)
    assert "40 of the 40 transformer-layer linears of this stage in FP8" in capsys.readouterr().out
    grouped = setup(gpt.model_provider, _args(DELAYED + moe + ["--moe-grouped-gemm"]))
    out = capsys.readouterr().out
    assert "--moe-grouped-gemm experts in FP8 (delayed" in out
    assert "40 of the 40 transformer-layer linears of this stage in FP8" in out
    # The grouped experts' states carry the same names as the SequentialMLP's (global expert number).
    assert sorted(n for n in _fp8_layers(grouped) if ".experts." in n) == experts
    assert all(kind == "delayed" for kind in _fp8_layers(grouped).values())


# ------------------------------------------------------------------ training


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_each_recipe_trains_close_to_fp32(recipe):
    reference = _fp32_losses()
    ctx = _train(RECIPES[recipe])
    losses = _losses(ctx)
    assert len(losses) == ITERS and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    # The first iterations agree closely (same weights, FP8 rounding only); later ones drift apart as
    # any two trajectories of a noisy high-learning-rate run do, so the bound there is looser.
    assert losses[:3] == pytest.approx(reference[:3], abs=0.02), (recipe, losses, reference)
    assert max(abs(a - b) for a, b in zip(losses, reference)) < 0.25, (recipe, losses, reference)
    assert abs(sum(losses) - sum(reference)) / ITERS < 0.05, (recipe, losses, reference)
    assert losses != reference  # the GEMMs did run in FP8
    if recipe == "delayed":
        states = list(ctx.fp8_states.values())
        assert len(states) == 4 * 4
        assert all(bool((s.scale != 1).all()) for s in states)  # scales were updated from the amaxes
        # history 4: the last 3 iterations fill every row but row 0 (the next step's, empty)
        assert all(bool((s.amax_history[1:] > 0).all()) and bool((s.amax_history[0] == 0).all()) for s in states)


def test_recompute_reuses_the_scales_bitwise():
    """Full recompute re-runs each layer's forward with the same scales (they change only after
    the iteration) and records the same amaxes: the losses equal the run without recompute."""
    plain = _losses(_train(DELAYED))
    recomputed = _losses(_train(DELAYED + ["--recompute-granularity", "full", "--recompute-method", "uniform",
                                           "--recompute-num-layers", "1"]))
    assert recomputed == plain


@pytest.mark.slow
def test_torch_compile_matches_eager():
    """--torch-compile compiles each layer with its FP8 linears (the delayed state's in-place
    updates included); bf16 and FP8 layers give two graphs, not one per layer."""
    extra = DELAYED + ["--first-last-layers-bf16", "--train-iters", "2", "--eval-iters", "0"]
    eager = _losses(_train(extra))
    compiled = _train(extra + ["--torch-compile"])
    assert _losses(compiled) == eager


def test_evaluation_leaves_the_training_scales_alone():
    """Validation forwards run with the training scales but record no amax: a run that evaluates
    every 2 iterations trains bitwise like one that never evaluates."""
    evaluated = _train(DELAYED + ["--eval-interval", "2"])
    silent = _train(DELAYED + ["--eval-iters", "0"])
    assert len(evaluated.log.valid_history) > 0 and len(silent.log.valid_history) == 0
    assert _losses(evaluated) == _losses(silent)


def test_megatron_llama3_8b_fp8_recipe_shrunk():
    """Megatron's Llama-3 8B FP8 flags, unchanged but for the sizes."""
    llama3 = ["--fp8-format", "hybrid", "--fp8-amax-history-len", "1024", "--fp8-amax-compute-algo", "max",
              "--fp8-param-gather", "--group-query-attention", "--num-query-groups", "2", "--rotary-base", "500000",
              "--use-distributed-optimizer", "--bf16", "--attention-backend", "unfused"]
    ctx = _train(llama3)
    losses = _losses(ctx)
    assert len(losses) == ITERS and all(torch.isfinite(torch.tensor(losses)))
    state = next(iter(ctx.fp8_states.values()))
    assert state.history_len == 1024 and state.amax_compute_algo == "max"
    gathered = [p for chunk in ctx.model for buf in chunk.grad_buffers if buf.fp8_params for p in buf.params]
    assert len(gathered) == 16 and all(p.dtype == torch.bfloat16 for p in gathered)


# ------------------------------------------------------------------ --fp8-param-gather

GATHER = ["--use-distributed-optimizer", "--fp8-param-gather"]


def _fp8_weights(ctx):
    return {name: p for chunk in ctx.model for name, p in chunk.module.named_parameters() if hasattr(p, "fp8_data")}


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_fp8_param_gather_trains_like_fp8_compute_and_keeps_weights_equal_to_their_fp8_copy(recipe):
    """The distributed optimizer casts the 16 FP8 linears' weights into FP8 storage after each step;
    the linears read that copy, the parameters hold it read back. The losses stay within FP8
    precision of fp32's (abs 0.05; measured <= 0.035 for both recipes) and of the run without
    --fp8-param-gather (whose weight roundings differ: abs 0.15, delayed's last step differs most,
    and there the gathered run is the one nearer fp32)."""
    ctx = _train(RECIPES[recipe] + GATHER)
    weights = _fp8_weights(ctx)
    assert len(weights) == 16
    storage = [buf for chunk in ctx.model for buf in chunk.grad_buffers if buf.fp8_params]
    assert storage and all(buf.param_data.dtype == torch.uint8 for buf in storage)
    for name, w in weights.items():
        assert w.fp8_data.dtype == torch.float8_e4m3fn and w.fp8_data.shape == w.shape, name
        assert torch.equal((w.fp8_data.float() * w.fp8_scale_inv).to(w.dtype), w.detach()), name
        # each weight scaled by its current amax: its largest element sits at the top of E4M3's range
        assert float(w.fp8_data.float().abs().max()) == 448.0, name
    other = [p for chunk in ctx.model for buf in chunk.grad_buffers if not buf.fp8_params for p in buf.params]
    assert other and not any(hasattr(p, "fp8_data") for p in other)
    plain = _losses(_train(RECIPES[recipe] + ["--use-distributed-optimizer"]))
    assert _losses(ctx) == pytest.approx(_fp32_losses(), abs=0.05)
    assert _losses(ctx) == pytest.approx(plain, abs=0.15)


def test_fp8_param_gather_resume_is_exact_and_finetune_refreshes_the_fp8_copies(tmp_path):
    save = str(tmp_path / "ckpt")
    full = _train(DELAYED + GATHER + ["--save-interval", "2", "--save", save])
    resumed = _train(DELAYED + GATHER + ["--load", save, "--ckpt-step", "2"])
    assert _losses(resumed) == _losses(full)[2:]
    for name, w in _fp8_weights(full).items():
        assert torch.equal(_fp8_weights(resumed)[name].fp8_data.view(torch.uint8), w.fp8_data.view(torch.uint8))
    # Weights alone (--finetune): the FP8 copies are recast from the loaded weights before training.
    tuned = setup(gpt.model_provider, _args(DELAYED + GATHER + ["--load", save, "--ckpt-step", "2", "--finetune"]))
    for name, w in _fp8_weights(tuned).items():
        assert torch.equal((w.fp8_data.float() * w.fp8_scale_inv).to(w.dtype), w.detach()), name


# ------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_fp8_resume_is_exact(tmp_path, fmt):
    save = str(tmp_path / "ckpt")
    full = _train(DELAYED + ["--ckpt-format", fmt, "--save-interval", "2", "--save", save])
    resumed = _train(DELAYED + ["--ckpt-format", fmt, "--load", save, "--ckpt-step", "2"])
    assert [i for i, _ in resumed.log.train_history] == list(range(3, ITERS + 1))
    assert _losses(resumed) == _losses(full)[2:]
    for name, state in full.fp8_states.items():
        assert torch.equal(resumed.fp8_states[name].amax_history, state.amax_history), name
        assert torch.equal(resumed.fp8_states[name].scale, state.scale), name


def test_bf16_checkpoint_resumes_in_fp8_with_fresh_state_and_back(tmp_path, capsys):
    bf16_dir, fp8_dir = str(tmp_path / "bf16"), str(tmp_path / "fp8")
    _train(["--save", bf16_dir, "--save-interval", "2", "--train-iters", "2"])
    ctx = setup(gpt.model_provider, _args(DELAYED + ["--load", bf16_dir, "--train-iters", "2"]))
    assert ctx.iteration == 2 and len(ctx.fp8_states) == 16
    for state in ctx.fp8_states.values():
        assert bool((state.amax_history == 0).all()) and bool((state.scale == 1).all())
    assert "start with a fresh amax history" in capsys.readouterr().out

    trained = _train(DELAYED + ["--save", fp8_dir, "--save-interval", "2", "--train-iters", "2"])
    back = setup(gpt.model_provider, _args(["--load", fp8_dir, "--train-iters", "2"]))
    assert back.iteration == 2 and back.fp8_states == {}
    weights = {k: v for k, v in trained.model[0].module.state_dict().items() if isinstance(v, torch.Tensor)}
    for key, value in back.model[0].module.state_dict().items():
        if key in weights:
            assert torch.equal(value, weights[key]), key
    assert not any(getattr(linear, "fp8_recipe", None) for linear in back.model[0].module.modules())
    # ... and the FP8 run picks its state up again where it left it.
    again = setup(gpt.model_provider, _args(DELAYED + ["--load", fp8_dir, "--train-iters", "2"]))
    for name, state in trained.fp8_states.items():
        assert torch.equal(again.fp8_states[name].scale, state.scale)
        assert torch.equal(again.fp8_states[name].amax_history, state.amax_history)


def test_multi_latent_attention_and_mtp_layers_run_in_fp8():
    """DeepSeek-V3-style layers: MLA's tensor-parallel projections and the multi-token prediction
    block's layer (named by its own path, after the decoder's layers) run in FP8; the delayed
    states of the MTP layer do not collide with the decoder's."""
    mla = ["--multi-latent-attention", "--q-lora-rank", "16", "--kv-lora-rank", "16", "--qk-head-dim", "8",
           "--qk-pos-emb-head-dim", "8", "--v-head-dim", "8", "--qk-layernorm", "--mtp-num-layers", "1",
           "--train-iters", "2", "--eval-iters", "0"]
    ctx = _train(DELAYED + mla)
    layers = _fp8_layers(ctx)
    mtp = [name for name in layers if name.startswith("mtp.layers.0.transformer_layer.")]
    assert mtp and all(layers[name] == "delayed" for name in mtp)
    assert set(mtp) <= set(ctx.fp8_states) and len(ctx.fp8_states) == sum(kind is not None for kind in layers.values())
    assert all(torch.isfinite(torch.tensor(_losses(ctx))))
