"""MoE GPT training through pretrain_gpt's path at expert-parallel layouts (gloo, CPU) gives the
losses (and, at ep=2, the gradients and checkpoint layout) of the single-process run."""

import os
import re

import pytest
import torch

from gigatron.training import gpt
from gigatron.training.arguments import parse_args
from gigatron.training.loop import pretrain
from tests.parallel.harness import run_distributed

# Dropless (no capacity factor), dropout off: every layout computes the same function.
MOE_TINY = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "32",
            "--max-position-embeddings", "32", "--micro-batch-size", "1", "--global-batch-size", "4",
            "--lr", "1e-2", "--min-lr", "1e-3", "--lr-warmup-iters", "1", "--lr-decay-style", "cosine",
            "--mock-data", "--vocab-size", "4351", "--num-workers", "0", "--log-interval", "1",
            "--eval-interval", "100", "--eval-iters", "0", "--attention-dropout", "0", "--hidden-dropout", "0",
            "--train-iters", "4", "--distributed-backend", "gloo",
            "--num-experts", "4", "--moe-router-topk", "2", "--disable-bias-linear", "--moe-aux-loss-coeff", "1e-2",
            "--ckpt-format", "torch"]

_LOCAL_EXPERT = re.compile(r"local_experts\.(\d+)\.")
_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _global_grads(ctx):
    """main_grad of every parameter, by name with global layer and expert numbers."""
    chunk = ctx.model[0]
    ep = ctx.groups.ep
    local = ctx.configs.moe.num_experts // ep.size
    offset = chunk.module.decoder.layer_offset
    grads = {}
    for name, param in chunk.module.named_parameters():
        name = _LOCAL_EXPERT.sub(lambda m: f"local_experts.{max(ep.rank, 0) * local + int(m.group(1))}.", name)
        name = _LOCAL_LAYER.sub(lambda m: f"decoder.layers.{offset + int(m.group(1))}.", name)
        grads[name] = param.main_grad.detach().clone()
    return grads


def _train(argv):
    """pretrain on `argv`; the context gets `grad_norms`, the norm of every optimizer step."""
    from gigatron.core.optim.optimizer import MegatronOptimizer

    torch.set_num_threads(1)
    args = parse_args(argv)
    norms = []
    step = MegatronOptimizer.step

    def recording_step(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        # The loop asks for the norm as a device tensor (no host sync); read it here.
        norms.append(None if result[1] is None else float(result[1]))
        return result

    MegatronOptimizer.step = recording_step
    try:
        ctx = pretrain(gpt.datasets_provider, gpt.model_provider, gpt.forward_step, args=args)
    finally:
        MegatronOptimizer.step = step
    ctx.grad_norms = norms
    return ctx


def _rank_fn(rank, world_size, argv, want_grads):
    ctx = _train(argv)
    out = {"train": ctx.log.train_history, "sizes": (ctx.groups.tp.size, ctx.groups.pp.size, ctx.groups.ep.size,
                                                     ctx.groups.dp.size, ctx.groups.expt_dp.size),
           "last_stage": ctx.groups.pp.rank == ctx.groups.pp.size - 1, "grad_norms": ctx.grad_norms}
    if want_grads:
        out["grads"] = _global_grads(ctx)
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("moe-data-cache"))


@pytest.fixture(scope="module")
def serial(cache_dir, tmp_path_factory):
    save = str(tmp_path_factory.mktemp("moe-serial-ckpt"))
    ctx = _train(MOE_TINY + ["--data-cache-path", cache_dir, "--save", save])
    return {"train": ctx.log.train_history, "grads": _global_grads(ctx), "grad_norms": ctx.grad_norms}


def _compare_losses(results, serial):
    last = [r for r in results if r["last_stage"]][-1]
    assert [i for i, _ in last["train"]] == [i for i, _ in serial["train"]] == [1, 2, 3, 4]
    for (_, ours), (_, theirs) in zip(last["train"], serial["train"]):
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    # The global gradient norm (each expert counted once) is the single-process one on every rank.
    for result in results:
        assert result["grad_norms"] == pytest.approx(serial["grad_norms"], rel=1e-4)
    return last


def test_ep2_matches_serial_losses_grads_and_writes_expert_checkpoints(serial, cache_dir, tmp_path):
    save = str(tmp_path / "ckpt")
    argv = MOE_TINY + ["--data-cache-path", cache_dir, "--expert-model-parallel-size", "2", "--save", save]
    results = run_distributed(_rank_fn, 2, argv, True, timeout=300)
    _compare_losses(results, serial)
    assert results[0]["sizes"] == (1, 1, 2, 2, 1)
    # Every rank's gradients (dense: dp-reduced; its two experts: the full-batch gradient) equal
    # the single-process ones after the same 4 steps.
    for result in results:
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, serial["grads"][name], rtol=1e-4, atol=1e-6, msg=name)
    experts_seen = {n for r in results for n in r["grads"] if "local_experts" in n}
    assert experts_seen == {n for n in serial["grads"] if "local_experts" in n}
    # Megatron's torch layout with the expert-rank suffix: one file per expert-parallel rank, and the
    # checksum manifest beside them.
    iteration_dir = os.path.join(save, "iter_0000004")
    assert sorted(os.listdir(iteration_dir)) == ["checksums.json", "mp_rank_00_000", "mp_rank_00_001"]
    for ep_rank in (0, 1):
        state = torch.load(os.path.join(iteration_dir, f"mp_rank_00_{ep_rank:03d}", "model_optim_rng.pt"),
                           weights_only=False)
        keys = [k for k in state["model"] if "local_experts" in k]
        assert keys and all(re.search(r"local_experts\.[01]\.", k) for k in keys)


# SGD with an active clip: the update depends on the gradients' scale and on the global norm
# (Adam would hide both), so the sharded layouts' expert reduction and norm are checked too.
SGD_CLIPPED = ["--optimizer", "sgd", "--lr", "0.5", "--min-lr", "0.05", "--clip-grad", "0.05"]


@pytest.mark.slow
@pytest.mark.parametrize("extra, sizes, grads", [
    (["--expert-model-parallel-size", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel"]
     + SGD_CLIPPED, (2, 1, 2, 2, 1), False),
    (["--expert-model-parallel-size", "2", "--use-distributed-optimizer"] + SGD_CLIPPED, (1, 1, 2, 4, 2), False),
    (["--expert-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], (1, 2, 2, 2, 1), True),
], ids=["ep2-tp2-sp", "ep2-dp2-distopt", "ep2-pp2"])
def test_world4_layouts_match_serial(serial, cache_dir, extra, sizes, grads):
    argv = MOE_TINY + ["--data-cache-path", cache_dir] + extra
    if "--optimizer" in extra:
        ctx = _train(MOE_TINY + ["--data-cache-path", cache_dir] + SGD_CLIPPED)
        serial = {"train": ctx.log.train_history, "grads": _global_grads(ctx), "grad_norms": ctx.grad_norms}
    results = run_distributed(_rank_fn, 4, argv, grads, timeout=400)
    assert results[0]["sizes"] == sizes
    _compare_losses(results, serial)
    if grads:  # full (unsharded) gradients on every rank: compare those the serial model names alike
        compared = 0
        for result in results:
            for name, grad in result["grads"].items():
                if name in serial["grads"]:
                    torch.testing.assert_close(grad, serial["grads"][name], rtol=1e-4, atol=1e-6, msg=name)
                    compared += 1
        assert compared >= len(serial["grads"])
