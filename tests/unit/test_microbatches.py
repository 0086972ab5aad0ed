"""The micro-batch calculator (gigatron/training/microbatches.py) and the validation of
--step-batch-size-schedule: Megatron's syntax and semantics, and one clear error per malformed schedule."""

import pytest

from gigatron.training import validate as V
from gigatron.training.arguments import parse_args
from gigatron.training.microbatches import MicroBatchCalculator, parse_step_batch_size_schedule


def test_schedule_syntax_suffixes_separators_and_token_thresholds():
    # Thresholds are tokens, floor-divided by the sequence length into samples; sorted by threshold.
    assert parse_step_batch_size_schedule("0:768 250B:1536 500B:3072", 2048) == [
        (0, 768), (250_000_000_000 // 2048, 1536), (500_000_000_000 // 2048, 3072)]
    # Commas separate too; suffixes are case-blind and take a decimal; entries in any order.
    assert parse_step_batch_size_schedule("1.5k:8, 0:4,3K:16", 10) == [(0, 4), (150, 8), (300, 16)]
    assert parse_step_batch_size_schedule("2M:1 0:2 1t:3 4b:4", 1) == [
        (0, 2), (2_000_000, 1), (4_000_000_000, 4), (10 ** 12, 3)]
    # Without a sequence length the thresholds are samples.
    assert parse_step_batch_size_schedule("0:2 64:4", None) == [(0, 2), (64, 4)]


@pytest.mark.parametrize("text, message", [
    ("", "is empty"),
    ("0:4 128", "'128' is not THRESHOLD:BATCH"),
    ("0:4 x:8", "threshold of entry 'x:8' is 'x', not a number"),
    ("0:4 64:eight", "batch size of entry '64:eight'"),
    ("0:4 64:0", "batch size 0; every batch size must be positive"),
    ("0:4 -64:8", "negative threshold"),
    ("64:4 128:8", "must start at 0.*add a 0:BATCH entry"),
    ("0:4 0:8", "strictly increasing"),
    ("0:4 10:8", "strictly increasing"),  # 10 tokens at seq 16 round to sample 0
    ("0:4 nan:8", "not a finite number"),
])
def test_malformed_schedules_name_the_flag_and_the_fix(text, message):
    with pytest.raises(ValueError, match="--step-batch-size-schedule") as info:
        parse_step_batch_size_schedule(text, 16)
    assert __import__("re").search(message, str(info.value)), str(info.value)


def test_calculator_follows_the_schedule():
    calc = MicroBatchCalculator(None, micro_batch_size=2, data_parallel_size=2,
                                step_batch_size_schedule="0:4 320:8 640:16", seq_length=32)  # samples 0, 10, 20
    assert calc.global_batch_size == 16  # the last entry's batch
    assert [calc.global_batch_size_at(n) for n in (0, 9, 10, 19, 20, 1000)] == [4, 4, 8, 8, 16, 16]
    assert [calc.num_microbatches_at(n) for n in (0, 10, 20)] == [1, 2, 4]
    # 3 steps of 4 (0..12), 1 of 8 (12..20), then 16s: 100 samples -> 3 + 1 + 5 = 9 iterations.
    assert calc.train_iters_for_samples(100) == 9
    assert calc.train_iters_for_samples(12) == 3
    assert "global batch size >= 0 samples: 4 (1 micro-batches)" in calc.describe()
    assert MicroBatchCalculator(8, 2, 2).describe() is None


def test_a_batch_size_is_checked_when_the_run_reaches_it():
    calc = MicroBatchCalculator(None, 2, 2, step_batch_size_schedule="0:2 10:8 20:12", seq_length=1)
    with pytest.raises(ValueError, match=r"global batch size 2 of --step-batch-size-schedule \(from 0 consumed"):
        calc.check_reachable(0, 100)
    with pytest.raises(ValueError, match="not a multiple of --micro-batch-size \\(2\\) x data-parallel size"):
        calc.num_microbatches_at(5)
    calc.check_reachable(10, 100)  # resumed past the small entry (on more ranks): 8 and 12 divide by 4
    calc.check_reachable(10, None)
    bad_end = MicroBatchCalculator(None, 2, 2, step_batch_size_schedule="0:4 10:6", seq_length=1)
    bad_end.check_reachable(0, 10)  # the run ends before the batch of 6
    with pytest.raises(ValueError, match="global batch size 6"):
        bad_end.check_reachable(0, 11)


def test_schedule_and_rampup_exclude_each_other():
    with pytest.raises(ValueError, match="give one of them"):
        MicroBatchCalculator(8, 2, 1, rampup_batch_size=[2, 2, 8], step_batch_size_schedule="0:8")


BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--max-position-embeddings", "16", "--micro-batch-size", "2", "--lr", "1e-3", "--mock-data"]


def test_validation_sets_the_global_batch_size_and_refuses_conflicts():
    args = V.validate_args(parse_args(BASE + ["--train-samples", "100", "--step-batch-size-schedule", "0:4 320:8"]),
                           world_size=2)
    assert args.global_batch_size == 8 and args.num_microbatches == 2
    V.validate_args(args, world_size=2)  # validating again is fine (the batch size came from the schedule)
    with pytest.raises(ValueError, match="--global-batch-size \\(8\\) and --step-batch-size-schedule.*drop "
                                         "--global-batch-size"):
        V.validate_args(parse_args(BASE + ["--train-samples", "100", "--global-batch-size", "8",
                                           "--step-batch-size-schedule", "0:4 320:8"]), world_size=1)
    with pytest.raises(ValueError, match="--rampup-batch-size.*give one of them"):
        V.validate_args(parse_args(BASE + ["--train-samples", "100", "--rampup-batch-size", "2", "2", "8",
                                           "--step-batch-size-schedule", "0:4 320:8"]), world_size=1)
    with pytest.raises(ValueError, match="needs --train-samples instead of --train-iters"):
        V.validate_args(parse_args(BASE + ["--train-iters", "10", "--step-batch-size-schedule", "0:4 320:8"]),
                        world_size=1)
    with pytest.raises(ValueError, match="must start at 0"):
        V.validate_args(parse_args(BASE + ["--train-samples", "100", "--step-batch-size-schedule", "16:4"]),
                        world_size=1)


def test_help_shows_the_flag():
    from gigatron.training.arguments import build_parser

    text = build_parser().format_help()
    assert "--step-batch-size-schedule" in text and "THRESHOLD:BS" in text
