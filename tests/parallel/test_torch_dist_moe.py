"""torch_dist checkpoints of expert-parallel MoE runs (gloo, CPU, pretrain_gpt's path).

A tiny MoE GPT (4 experts, top-2, dropless) is trained 2 iterations at expert-parallel size 2
(world 2, distributed optimizer) and saved as torch_dist; the checkpoint holds every expert once,
under its global number. Resumed in one process (ep=1, plain optimizer) and at ep=2 (plain
optimizer), both runs take iterations 3-4 with the losses of the uninterrupted single-process run.
The single-process run's own iteration-2 checkpoint resumes at ep=2 (distributed optimizer) with
the same losses.
"""

import os

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from gigatron.training import gpt
from gigatron.training.arguments import parse_args
from gigatron.training.loop import pretrain
from tests.parallel.harness import run_distributed
from tests.parallel.test_moe_training import MOE_TINY

TORCH_DIST = [a if a != "torch" else "torch_dist" for a in MOE_TINY]
assert TORCH_DIST[-2:] == ["--ckpt-format", "torch_dist"]


def _train(argv):
    torch.set_num_threads(1)
    ctx = pretrain(gpt.datasets_provider, gpt.model_provider, gpt.forward_step, args=parse_args(argv))
    return ctx.log.train_history, ctx.groups.pp.rank == ctx.groups.pp.size - 1


def _rank_fn(rank, world_size, argv):
    return _train(argv)


def _losses(history):
    return {i: loss for i, loss in history}


def _assert_continues(results, serial, iterations=(3, 4)):
    history = [h for h, last in results if last][-1]
    ours = _losses(history)
    assert sorted(ours) == list(iterations), ours
    for i in iterations:
        assert ours[i] == pytest.approx(serial[i], rel=1e-5), (i, ours[i], serial[i])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-torch-dist")
    cache = str(root / "cache")
    serial_ckpt = str(root / "serial")
    history, _ = _train(TORCH_DIST + ["--data-cache-path", cache, "--save", serial_ckpt, "--save-interval", "2"])
    return {"cache": cache, "root": root, "serial": _losses(history), "serial_ckpt": serial_ckpt}


def test_ep2_save_resumes_at_ep1_and_ep2(runs):
    cache, serial = runs["cache"], runs["serial"]
    assert sorted(serial) == [1, 2, 3, 4]
    save = str(runs["root"] / "ep2")
    base = TORCH_DIST + ["--data-cache-path", cache]
    saved = run_distributed(_rank_fn, 2, base + ["--expert-model-parallel-size", "2", "--use-distributed-optimizer",
                                                 "--save", save, "--exit-interval", "2"], timeout=300)
    _assert_continues(saved, serial, (1, 2))

    # Every expert of every layer is stored once, under its global number.
    iteration = os.path.join(save, "iter_0000002")
    keys = set(FileSystemReader(iteration).read_metadata().state_dict_metadata)
    for layer in (0, 1):
        for state in ("", "optimizer.state.exp_avg.", "optimizer.state.exp_avg_sq."):
            stored = {k for k in keys if k.startswith(f"{state}decoder.layers.{layer}.mlp.experts.")}
            assert stored == {f"{state}decoder.layers.{layer}.mlp.experts.local_experts.{g}.linear_fc{n}.weight"
                              for g in range(4) for n in (1, 2)}

    # fp32 weights are their own main params: stored once, with the model
    assert not any(k.startswith("optimizer.state.fp32_param.") for k in keys)

    # ep=2 -> ep=1 (one process, plain optimizer)
    history, _ = _train(base + ["--load", save])
    _assert_continues([(history, True)], serial)
    # ep=2 -> ep=2 (plain optimizer: expert state written by the distributed optimizer's shards)
    resumed = run_distributed(_rank_fn, 2, base + ["--expert-model-parallel-size", "2", "--load", save],
                              timeout=300)
    _assert_continues(resumed, serial)


def test_ep1_save_resumes_at_ep2(runs):
    base = TORCH_DIST + ["--data-cache-path", runs["cache"]]
    resumed = run_distributed(_rank_fn, 2, base + ["--expert-model-parallel-size", "2", "--use-distributed-optimizer",
                                                   "--load", runs["serial_ckpt"], "--ckpt-step", "2"], timeout=300)
    _assert_continues(resumed, runs["serial"])


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", [[], ["--use-distributed-optimizer"]], ids=["plain", "distopt"])
def test_world4_ep2_expert_replicas_save_once_and_resume_at_ep1(runs, optimizer):
    """World 4 at ep=2: each expert lives on two expert-data-parallel ranks (replicated, or its
    optimizer state split between them); the save is complete and resumes in one process."""
    save = str(runs["root"] / f"world4{'-'.join(optimizer)}")
    base = TORCH_DIST + ["--data-cache-path", runs["cache"]]
    saved = run_distributed(_rank_fn, 4, base + ["--expert-model-parallel-size", "2", "--save", save,
                                                 "--exit-interval", "2"] + optimizer, timeout=400)
    _assert_continues(saved, runs["serial"], (1, 2))
    history, _ = _train(base + ["--load", save])
    _assert_continues([(history, True)], runs["serial"])


@pytest.mark.slow
def test_expert_tensor_parallel_save_resumes_in_one_process(runs):
    """--expert-tensor-parallel-size 2 at tp=1 (world 2): expert weights are split over the expert
    tensor-parallel ranks (SwiGLU-free fc1 rows, fc2 columns) and stored whole."""
    save = str(runs["root"] / "etp2")
    base = TORCH_DIST + ["--data-cache-path", runs["cache"]]
    saved = run_distributed(_rank_fn, 2, base + ["--expert-tensor-parallel-size", "2", "--save", save,
                                                 "--exit-interval", "2"], timeout=300)
    _assert_continues(saved, runs["serial"], (1, 2))
    history, _ = _train(base + ["--load", save])
    _assert_continues([(history, True)], runs["serial"])
