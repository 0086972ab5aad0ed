"""FP8 training under tensor and sequence parallelism (gloo, CPU) against one process.

tp=2 with --sequence-parallel runs the column-parallel linears through the FP8 all-gather
(`fp8_linear_with_sequence_parallel_gather`: the input crosses the wire as FP8 bytes) and reduces
the delayed recipe's amaxes over tensor x data x context parallel ranks. Tolerances:
- delayed: the scales come from amaxes reduced over the tensor-parallel group, the same numbers as
  one process sees, so both runs cast with the same scales; they differ only by the fp32
  summation order of the row-parallel partial sums (an FP8 rounding flips now and then):
  rel 2e-3 on every loss.
- tensorwise: each rank scales its weight shard by the shard's own amax, blockwise tiles the
  shard's rows (128x128 blocks of [N/t, K]): other FP8 roundings than one process, so the losses
  agree to FP8 precision, abs 0.02 (the losses are ~8.3).
"""

import pytest
import torch

from gigatron.training import gpt
from gigatron.training.arguments import parse_args
from gigatron.training.loop import pretrain
from tests.parallel.harness import run_distributed

BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--max-position-embeddings", "16", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-2",
        "--min-lr", "1e-3", "--lr-warmup-iters", "1", "--lr-decay-style", "cosine", "--mock-data",
        "--vocab-size", "4351", "--num-workers", "0", "--log-interval", "1", "--eval-interval", "2",
        "--eval-iters", "1", "--attention-dropout", "0", "--hidden-dropout", "0", "--train-iters", "4",
        "--distributed-backend", "gloo", "--position-embedding-type", "rope", "--normalization", "RMSNorm",
        "--swiglu", "--disable-bias-linear", "--no-loss-curve", "--seed", "1234"]
RECIPES = {
    "delayed": (["--fp8-format", "hybrid", "--fp8-recipe", "delayed", "--fp8-amax-history-len", "4",
                 "--fp8-amax-compute-algo", "max"], dict(rel=2e-3)),
    # --no-fp8-wgrad: the sequence-parallel input is gathered in its own dtype, the weight gradient
    # computed from it in high precision.
    "delayed-no-fp8-wgrad": (["--fp8-format", "hybrid", "--fp8-recipe", "delayed", "--fp8-amax-history-len", "4",
                              "--fp8-amax-compute-algo", "max", "--no-fp8-wgrad"], dict(rel=2e-3)),
    "tensorwise": (["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"], dict(abs=0.02)),
    "blockwise": (["--fp8-format", "e4m3", "--fp8-recipe", "blockwise"], dict(abs=0.02)),
}


def _run(argv):
    ctx = pretrain(gpt.datasets_provider, gpt.model_provider, gpt.forward_step, args=parse_args(argv))
    sp_fp8 = [m for m in ctx.model[0].module.modules()
              if getattr(m, "fp8_recipe", None) is not None and getattr(m, "sequence_parallel", False)]
    return {"train": [loss for _, loss in ctx.log.train_history], "sp_fp8_linears": len(sp_fp8),
            "scales": {name: state.scale.clone() for name, state in ctx.fp8_states.items()}}


def _rank_run(rank, world_size, argv):
    return _run(argv)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_fp8_tp2_sequence_parallel_matches_one_process(recipe, tmp_path):
    flags, tolerance = RECIPES[recipe]
    argv = BASE + flags + ["--data-cache-path", str(tmp_path / "cache")]
    torch.set_num_threads(1)
    serial = _run(argv)
    results = run_distributed(_rank_run, 2, argv + ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                              timeout=300)
    for result in results:
        assert result["sp_fp8_linears"] == 2 * 4  # every linear of both layers, sequence-parallel, in FP8
        assert result["train"] == pytest.approx(serial["train"], **tolerance), (recipe, result["train"],
                                                                                serial["train"])
    if recipe.startswith("delayed"):
        # The amax reduction over tp leaves both ranks with the same scales, and nearly the scales of
        # one process (input and weight to 1%; the gradients' amaxes follow the slightly different
        # trajectory: 5%).
        first, second = results
        for name, scale in first["scales"].items():
            assert torch.equal(scale, second["scales"][name]), name
            assert torch.allclose(scale[:2], serial["scales"][name][:2], rtol=1e-2), name
            assert torch.allclose(scale[2], serial["scales"][name][2], rtol=5e-2), name


MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32"]


@pytest.mark.parametrize("layout, flags, model", [
    ("pp2", ["--pipeline-model-parallel-size", "2"], []),
    ("dp2", ["--use-distributed-optimizer", "--overlap-grad-reduce"], []),
    ("ep2", ["--expert-model-parallel-size", "2"], MOE),
])
def test_fp8_delayed_under_pipeline_data_and_expert_parallel(layout, flags, model, tmp_path):
    """Each pipeline stage updates its own layers' states; data-parallel ranks reduce their amaxes
    (max over both ranks' micro-batches, what one process sees) and keep equal scales, also with
    the distributed optimizer and overlapped gradient reduction (FP8 weight gradients go into
    main_grad); with expert parallelism each rank holds its own experts' states."""
    recipe, tolerance = RECIPES["delayed"]
    argv = BASE + model + recipe + ["--data-cache-path", str(tmp_path / "cache")]
    torch.set_num_threads(1)
    serial = _run(argv)
    results = run_distributed(_rank_run, 2, argv + flags, timeout=300)
    if layout in ("pp2", "ep2"):
        assert sorted({n for r in results for n in r["scales"]}) == sorted(serial["scales"])
        last = results[1]
    else:
        assert torch.equal(torch.stack(list(results[0]["scales"].values())),
                           torch.stack(list(results[1]["scales"].values())))
        last = results[0]
    assert last["train"] == pytest.approx(serial["train"], **tolerance), (layout, last["train"], serial["train"])


def _rank_load(rank, world_size, argv):
    from gigatron.training.loop import setup

    ctx = setup(gpt.model_provider, parse_args(argv))
    return {name: (state.amax_history.clone(), state.scale.clone()) for name, state in ctx.fp8_states.items()}


@pytest.mark.parametrize("layout", [["--pipeline-model-parallel-size", "2"],
                                    ["--tensor-model-parallel-size", "2", "--sequence-parallel"]])
def test_fp8_state_of_a_one_process_checkpoint_loads_at_another_layout(layout, tmp_path):
    """States are saved by global linear name: a torch_dist checkpoint of one process resumes at
    pp=2 (each stage takes its layers' states) and tp=2 (each rank takes all of them)."""
    recipe, _ = RECIPES["delayed"]
    save = str(tmp_path / "ckpt")
    argv = BASE + recipe + ["--data-cache-path", str(tmp_path / "cache"), "--train-iters", "2"]
    torch.set_num_threads(1)
    ctx = pretrain(gpt.datasets_provider, gpt.model_provider, gpt.forward_step,
                   args=parse_args(argv + ["--save", save, "--ckpt-format", "torch_dist"]))
    saved = {name: (state.amax_history, state.scale) for name, state in ctx.fp8_states.items()}
    results = run_distributed(_rank_load, 2, argv + ["--load", save] + layout, timeout=300)
    loaded = {}
    for result in results:
        loaded.update(result)
    assert sorted(loaded) == sorted(saved)
    for name, (history, scale) in saved.items():
        assert torch.equal(loaded[name][0], history) and torch.equal(loaded[name][1], scale), name


def _rank_run_gather(rank, world_size, argv):
    return _run_gather(argv)


def _run_gather(argv):
    ctx = pretrain(gpt.datasets_provider, gpt.model_provider, gpt.forward_step, args=parse_args(argv))
    buffers = [buf for chunk in ctx.model for buf in chunk.grad_buffers if buf.fp8_params]
    weights = [p for buf in buffers for p in buf.params]
    exact = all(torch.equal((w.fp8_data.float() * w.fp8_scale_inv).to(w.dtype), w.detach()) for w in weights)
    return {"train": [loss for _, loss in ctx.log.train_history], "fp8_weights": len(weights),
            "storage": sorted({str(buf.param_data.dtype) for buf in buffers}), "read_back_exact": exact,
            "fp8": {n: p.fp8_data.view(torch.uint8).clone() for n, p in ctx.model[0].module.named_parameters()
                    if hasattr(p, "fp8_data")}}


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_fp8_param_gather_dp2_matches_one_process(recipe, tmp_path):
    """--fp8-param-gather with the distributed optimizer at dp=2 (each rank casts its shard with the
    weight's global amax and the ranks all-gather FP8 bytes): both ranks end with the same FP8
    weights, the parameters equal their FP8 copies read back, and the losses are one process's
    (rel 2e-3: the gradients are reduced in another order)."""
    flags, _ = RECIPES[recipe]
    argv = (BASE + flags + ["--use-distributed-optimizer", "--fp8-param-gather", "--overlap-grad-reduce",
                            "--overlap-param-gather", "--data-cache-path", str(tmp_path / "cache")])
    torch.set_num_threads(1)
    serial = _run_gather(argv)
    assert serial["fp8_weights"] == 2 * 4 and serial["storage"] == ["torch.uint8"] and serial["read_back_exact"]
    results = run_distributed(_rank_run_gather, 2, argv, timeout=300)
    for result in results:
        assert result["fp8_weights"] == 2 * 4 and result["read_back_exact"]
        assert result["train"] == pytest.approx(serial["train"], rel=2e-3), (result["train"], serial["train"])
    first, second = results
    assert sorted(first["fp8"]) == sorted(serial["fp8"])
    for name, data in first["fp8"].items():
        assert torch.equal(data, second["fp8"][name]), name
