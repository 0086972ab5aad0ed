"""torch_dist checkpoints of grouped-GEMM experts (--moe-grouped-gemm) at expert-parallel size 2
(gloo, CPU, pretrain_gpt's path).

GroupedMLP's weight1/weight2 hold all local experts in one tensor each; torch_dist splits them into
their expert blocks and stores each under the expert's global number with SequentialMLP's key and
shape, so a save at ep=2 resumes at ep=1 and ep=2, with either expert implementation, and takes the
next iterations with the losses of the uninterrupted single-process run (optimizer state included).
"""

import os

import pytest
from torch.distributed.checkpoint import FileSystemReader

from gigatron.training.arguments import parse_args
from gigatron.training.validate import validate_args
from tests.parallel.harness import run_distributed
from tests.parallel.test_torch_dist_moe import TORCH_DIST, _assert_continues, _losses, _rank_fn, _train

GROUPED = TORCH_DIST + ["--moe-grouped-gemm", "--swiglu", "--ffn-hidden-size", "32"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("grouped-torch-dist")
    cache = str(root / "cache")
    history, _ = _train(GROUPED + ["--data-cache-path", cache])
    serial = _losses(history)
    assert sorted(serial) == [1, 2, 3, 4]
    save = str(root / "ep2")
    saved = run_distributed(_rank_fn, 2, GROUPED + ["--data-cache-path", cache, "--expert-model-parallel-size", "2",
                                                    "--use-distributed-optimizer", "--save", save,
                                                    "--exit-interval", "2"], timeout=300)
    _assert_continues(saved, serial, (1, 2))
    return {"cache": cache, "serial": serial, "save": save}


def test_grouped_gemm_torch_dist_at_ep2_is_accepted(tmp_path):
    args = parse_args(GROUPED + ["--expert-model-parallel-size", "2", "--save", str(tmp_path)])
    validate_args(args, world_size=2)


def test_ep2_grouped_save_stores_every_expert_once_under_its_global_number(runs):
    reader = FileSystemReader(os.path.join(runs["save"], "iter_0000002"))
    metadata = reader.read_metadata().state_dict_metadata
    for layer in (0, 1):
        for state in ("", "optimizer.state.exp_avg.", "optimizer.state.exp_avg_sq."):
            stored = {k for k in metadata if k.startswith(f"{state}decoder.layers.{layer}.mlp.experts.")}
            assert stored == {f"{state}decoder.layers.{layer}.mlp.experts.local_experts.{g}.linear_fc{n}.weight"
                              for g in range(4) for n in (1, 2)}
            # SequentialMLP's shapes: fc1 [2f, h] ([gate; up]), fc2 [h, f]
            prefix = f"{state}decoder.layers.{layer}.mlp.experts.local_experts.3"
            fc1 = tuple(metadata[f"{prefix}.linear_fc1.weight"].size)
            fc2 = tuple(metadata[f"{prefix}.linear_fc2.weight"].size)
            assert fc1[1] == fc2[0] == 16 and fc1[0] == 2 * fc2[1] > 0, (fc1, fc2)


def test_ep2_grouped_save_resumes_at_ep1(runs):
    history, _ = _train(GROUPED + ["--data-cache-path", runs["cache"], "--load", runs["save"]])
    _assert_continues([(history, True)], runs["serial"])


def test_ep2_grouped_save_resumes_at_ep2(runs):
    resumed = run_distributed(_rank_fn, 2, GROUPED + ["--data-cache-path", runs["cache"],
                                                      "--expert-model-parallel-size", "2", "--load", runs["save"]],
                              timeout=300)
    _assert_continues(resumed, runs["serial"])


def test_ep2_grouped_save_resumes_as_sequential_experts(runs):
    """The same per-expert keys load into SequentialMLP experts (one process)."""
    sequential = [a for a in GROUPED if a != "--moe-grouped-gemm"]
    history, _ = _train(sequential + ["--data-cache-path", runs["cache"], "--load", runs["save"]])
    _assert_continues([(history, True)], runs["serial"])


def test_expert_tensor_parallel_grouped_save_resumes_as_one_process(runs, tmp_path):
    """--expert-tensor-parallel-size 2 at tp=1 (world 2): each rank's weight1 blocks hold its
    [gate_r; up_r] rows (transposed) and weight2 blocks its fc2 columns; stored whole per expert."""
    save = str(tmp_path / "etp2")
    base = GROUPED + ["--data-cache-path", runs["cache"]]
    saved = run_distributed(_rank_fn, 2, base + ["--expert-tensor-parallel-size", "2", "--use-distributed-optimizer",
                                                 "--save", save, "--exit-interval", "2"], timeout=300)
    _assert_continues(saved, runs["serial"], (1, 2))
    history, _ = _train(base + ["--load", save])
    _assert_continues([(history, True)], runs["serial"])
