"""Combined parallel layouts through the full `pretrain` path train like one process.

Each layout runs GPT pretraining on mock data (gloo, CPU, dropout off) and its training and
validation losses must equal those of the single-process run with the same global batch
(rel 1e-5). Two-way layouts alone (dp2, tp2, cp2, pp2) are covered by
tests/e2e/test_pretrain_gpt.py; here are their combinations, the interleaved pipeline schedule,
the distributed optimizer with overlapped communication, and resuming a data-parallel
distributed-optimizer checkpoint at another data-parallel size.
"""

import os

import pytest
import torch

from gigatron.training import gpt
from gigatron.training.arguments import parse_args
from gigatron.training.loop import pretrain
from tests.parallel.harness import run_distributed

# Global batch 8 of micro-batches of 2: every layout accumulates over more than one micro-batch
# (4 per rank without data parallelism, 2 with dp=2), so the pipeline schedules run in earnest.
BASE = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "64",
        "--max-position-embeddings", "64", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-2",
        "--min-lr", "1e-3", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--mock-data",
        "--vocab-size", "4351", "--num-workers", "0", "--log-interval", "1", "--eval-interval", "2",
        "--eval-iters", "1", "--attention-dropout", "0", "--hidden-dropout", "0", "--train-iters", "4",
        "--distributed-backend", "gloo"]

REL, ABS = 1e-5, 1e-6

_CACHE = {}  # "path": mock-data index cache shared by every run of this module; serial results by argv


@pytest.fixture(scope="module", autouse=True)
def _data_cache(tmp_path_factory):
    _CACHE["path"] = str(tmp_path_factory.mktemp("data-cache"))
    yield
    _CACHE.clear()


def _argv(extra):
    return BASE + list(extra) + ["--data-cache-path", _CACHE["path"]]


def _pretrain(argv):
    ctx = pretrain(gpt.datasets_provider, gpt.model_provider, gpt.forward_step, args=parse_args(argv))
    return ctx


def _rank_run(rank, world_size, argv):
    torch.set_num_threads(1)
    ctx = _pretrain(argv)
    g = ctx.groups
    return {"train": ctx.log.train_history, "valid": ctx.log.valid_history, "iteration": ctx.iteration,
            "sizes": {"tp": g.tp.size, "pp": g.pp.size, "dp": g.dp.size, "cp": g.cp.size},
            "pp_rank": g.pp.rank,
            "ddp": {name: getattr(ctx.model[0].ddp_config, name)
                    for name in ("use_distributed_optimizer", "overlap_grad_reduce", "overlap_param_gather")}}


def _serial(extra=()):
    """Train and validation histories of the one-process run with BASE + `extra`."""
    key = tuple(extra)
    if key not in _CACHE:
        torch.set_num_threads(1)
        ctx = _pretrain(_argv(extra))
        _CACHE[key] = (ctx.log.train_history, ctx.log.valid_history)
    return _CACHE[key]


def _assert_same_curve(ours, theirs, what):
    assert [i for i, _ in ours] == [i for i, _ in theirs], (what, ours, theirs)
    assert len(theirs) > 0, what
    for (i, a), (_, b) in zip(ours, theirs):
        assert a == pytest.approx(b, rel=REL, abs=ABS), f"{what} at iteration {i}: {a!r} != {b!r}\n{ours}\n{theirs}"


def _check_layout(extra, world_size, sizes, serial_extra=()):
    serial_train, serial_valid = _serial(serial_extra)
    assert [i for i, _ in serial_train] == [1, 2, 3, 4]
    results = run_distributed(_rank_run, world_size, _argv(list(serial_extra) + list(extra)), timeout=300)
    for result in results:
        assert result["sizes"] == sizes
        assert result["iteration"] == 4
        assert result["ddp"] == {"use_distributed_optimizer": "--use-distributed-optimizer" in extra,
                                 "overlap_grad_reduce": "--overlap-grad-reduce" in extra,
                                 "overlap_param_gather": "--overlap-param-gather" in extra}
    last_stage = [r for r in results if r["pp_rank"] == sizes["pp"] - 1]
    assert last_stage
    for result in last_stage:  # the ranks that compute the loss all log the same curve
        _assert_same_curve(result["train"], serial_train, "training loss")
        _assert_same_curve(result["valid"], serial_valid, "validation loss")


# A small bucket size splits the gradient buffer into several buckets, reduced as they fill.
DIST_OPT_OVERLAP = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
                    "--ddp-bucket-size", "2000"]


@pytest.mark.slow
@pytest.mark.parametrize("extra, sizes", [
    (["--tensor-model-parallel-size", "2"], {"tp": 2, "pp": 1, "dp": 2, "cp": 1}),
    (["--tensor-model-parallel-size", "2"] + DIST_OPT_OVERLAP, {"tp": 2, "pp": 1, "dp": 2, "cp": 1}),
    (["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2"],
     {"tp": 2, "pp": 2, "dp": 1, "cp": 1}),
    (["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"], {"tp": 1, "pp": 2, "dp": 2, "cp": 1}),
    (["--context-parallel-size", "2", "--tensor-model-parallel-size", "2"], {"tp": 2, "pp": 1, "dp": 1, "cp": 2}),
], ids=["tp2-dp2", "tp2-dp2-distopt-overlap", "pp2-tp2", "pp2-dp2-distopt", "cp2-tp2"])
def test_world_of_four_matches_one_process(extra, sizes):
    _check_layout(extra, 4, sizes)


def test_interleaved_pipeline_matches_one_process():
    """pp=2 with two virtual stages per rank (4 layers, one per virtual stage): the interleaved
    1F1B schedule over 4 micro-batches."""
    _check_layout(["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"], 2,
                  {"tp": 1, "pp": 2, "dp": 1, "cp": 1}, serial_extra=["--num-layers", "4"])


RESUME = ["--train-iters", "8", "--ckpt-format", "torch_dist"]


@pytest.mark.parametrize("resume_extra", [["--use-distributed-optimizer"], []],
                         ids=["distopt", "plain-optimizer"])
def test_dp2_distributed_optimizer_checkpoint_resumes_at_dp1(tmp_path, resume_extra):
    """Iterations 1-4 at dp=2 with the distributed optimizer, saved (torch_dist) and resumed in one
    process for iterations 5-8: the loss curve is that of 8 uninterrupted single-process
    iterations (model, sharded optimizer state, scheduler and data position all carried over)."""
    full_train, full_valid = _serial(RESUME)
    assert [i for i, _ in full_train] == list(range(1, 9))
    save = str(tmp_path / "ckpt")
    first = run_distributed(_rank_run, 2, _argv(RESUME + ["--use-distributed-optimizer", "--save", save,
                                                         "--exit-interval", "4"]), timeout=300)
    assert [r["sizes"]["dp"] for r in first] == [2, 2] and all(r["iteration"] == 4 for r in first)
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as handle:
        assert handle.read().strip() == "4"
    assert os.path.exists(os.path.join(save, "iter_0000004", "metadata.json"))
    _assert_same_curve(first[0]["train"], full_train[:4], "training loss before the checkpoint")

    torch.set_num_threads(1)
    resumed = _pretrain(_argv(RESUME + resume_extra + ["--load", save, "--save", save]))
    assert resumed.iteration == 8 and resumed.consumed_train_samples == 64
    assert resumed.groups.dp.size == 1
    _assert_same_curve(resumed.log.train_history, full_train, "training loss across the resume")
    _assert_same_curve(resumed.log.valid_history, full_valid, "validation loss across the resume")


def test_tp2_checkpoint_continues_in_one_process_with_use_checkpoint_args(tmp_path):
    """A tp=2 run saved (torch_dist) and taken up by one process with --use-checkpoint-args and no
    model flags: the model comes from the checkpoint, the parallel layout (tp=1) is the run's, and
    the losses continue those of one uninterrupted tp=1 process."""
    full_train, _ = _serial(RESUME)
    save = str(tmp_path / "ckpt")
    first = run_distributed(_rank_run, 2, _argv(RESUME + ["--tensor-model-parallel-size", "2", "--save", save,
                                                         "--exit-interval", "4"]), timeout=300)
    assert [r["sizes"]["tp"] for r in first] == [2, 2] and all(r["iteration"] == 4 for r in first)
    model_flags = ("--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length",
                   "--max-position-embeddings")
    argv = _argv(RESUME + ["--load", save, "--use-checkpoint-args"])
    for flag in model_flags:
        i = argv.index(flag)
        argv = argv[:i] + argv[i + 2:]
    torch.set_num_threads(1)
    resumed = _pretrain(argv)
    assert resumed.groups.tp.size == 1 and resumed.iteration == 8
    assert resumed.configs.transformer.num_layers == 2 and resumed.configs.transformer.hidden_size == 16
    _assert_same_curve(resumed.log.train_history, full_train[4:], "training loss after taking up the tp=2 run")
