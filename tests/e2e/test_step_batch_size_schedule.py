"""--step-batch-size-schedule through the whole training path: each step's global batch size, its
number of micro-batches, the consumed samples, the learning-rate schedule's sample count and the log
line follow the schedule, and a run resumed from a checkpoint inside the schedule crosses the next
boundary exactly as the uninterrupted run does."""

import re

import pytest
import torch

from gigatron.training import gpt
from gigatron.training.arguments import parse_args
from gigatron.training.loop import pretrain

# seq 64: the token thresholds 512 and 1K (1000) are samples 8 and 15. 40 samples: 4 steps of 2,
# 2 of 4 (to 16 samples), 3 of 8.
SCHEDULE = "0:2 512:4 1K:8"
ARGV = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "64",
        "--max-position-embeddings", "64", "--micro-batch-size", "2", "--lr", "1e-2", "--min-lr", "1e-3",
        "--lr-warmup-samples", "8", "--lr-decay-style", "cosine", "--mock-data", "--vocab-size", "4096",
        "--num-workers", "0", "--log-interval", "1", "--eval-interval", "5", "--eval-iters", "1",
        "--attention-dropout", "0", "--hidden-dropout", "0.1", "--train-samples", "40",
        "--step-batch-size-schedule", SCHEDULE]
BATCHES = [2, 2, 2, 2, 4, 4, 8, 8, 8]
LOG = re.compile(r"iteration +(\d+)/ +(\d+) \| consumed samples: +(\d+) \|.* global batch size: +(\d+) \|")


def _run(argv, calls=None):
    def forward_step(data_iterator, model):
        if calls is not None and model.training:  # training micro-batches (not the evaluation's)
            calls.append(ctx_iteration[0])
        return gpt.forward_step(data_iterator, model)

    ctx_iteration = [0]
    args = parse_args(argv)
    from gigatron.training import loop

    original = loop.train_step

    def counting_train_step(ctx, forward_step_func, data_iterator, num_microbatches):
        ctx_iteration[0] = ctx.iteration + 1
        return original(ctx, forward_step_func, data_iterator, num_microbatches)

    loop.train_step = counting_train_step
    try:
        return pretrain(gpt.datasets_provider, gpt.model_provider, forward_step, args=args)
    finally:
        loop.train_step = original


@pytest.fixture
def argv(tmp_path):
    return ARGV + ["--data-cache-path", str(tmp_path / "cache")]


def test_logged_batch_sizes_micro_batches_and_lr_samples_follow_the_schedule(argv, capsys):
    torch.set_num_threads(1)
    calls = []
    ctx = _run(argv, calls)
    out = capsys.readouterr().out
    rows = [tuple(int(g) for g in m.groups()) for m in LOG.finditer(out)]
    assert [r[0] for r in rows] == list(range(1, 10)) and {r[1] for r in rows} == {9}  # 9 iterations in all
    assert [r[3] for r in rows] == BATCHES
    consumed = [sum(BATCHES[:i + 1]) for i in range(len(BATCHES))]
    assert [r[2] for r in rows] == consumed
    # Micro-batches per step (one process, micro-batch 2): 1, 2 and 4.
    assert [calls.count(i) for i in range(1, 10)] == [b // 2 for b in BATCHES]
    assert ctx.iteration == ctx.train_iters == 9 and ctx.consumed_train_samples == 40
    assert ctx.configs.training.global_batch_size == 8  # the schedule's last batch
    assert ctx.scheduler.num_steps == 40  # the learning-rate schedule counted every sample
    assert "--step-batch-size-schedule: global batch size >= 0 samples: 2 (1 micro-batches); >= 8 samples: 4" in out


def test_resume_across_a_schedule_boundary_is_exact(argv, tmp_path):
    torch.set_num_threads(1)
    full = _run(argv).log.train_history
    save = str(tmp_path / "ckpt")
    first = _run(argv + ["--save", save, "--exit-interval", "5"])  # stops at 12 samples, among the batches of 4
    assert first.iteration == 5 and first.consumed_train_samples == 12
    second = _run(argv + ["--save", save, "--load", save])
    assert second.iteration == 9 and second.consumed_train_samples == 40
    assert second.scheduler.num_steps == 40
    assert first.log.train_history == full[:5]
    assert second.log.train_history == full  # bitwise (the history is kept in the checkpoint), across the boundary


def test_a_batch_size_that_does_not_split_stops_before_training(argv):
    bad = [a if a != SCHEDULE else "0:3 512:4" for a in argv]
    with pytest.raises(ValueError, match=r"global batch size 3 of --step-batch-size-schedule.*--micro-batch-size"):
        _run(bad)
