"""Each named check of gigatron/training/validate.py."""

import argparse

import pytest

from gigatron.training import validate as V
from gigatron.training.arguments import configs_from_args, parse_args

BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--max-position-embeddings", "16", "--micro-batch-size", "2", "--train-iters", "10", "--lr", "1e-3",
        "--mock-data"]


def _without(flag, takes_value=True):
    i = BASE.index(flag)
    return BASE[:i] + BASE[i + (2 if takes_value else 1):]


def _args(*extra):
    return parse_args(BASE + list(extra))


def _configs(*extra, world_size=1):
    """Validation and the config dataclasses: the rules of one config run when it is built."""
    return configs_from_args(V.validate_args(_args(*extra), world_size=world_size))


def test_valid_arguments_fill_derived_values():
    args = V.validate_args(_args("--tensor-model-parallel-size", "2"), world_size=8)
    assert args.data_parallel_size == 4
    assert args.global_batch_size == 8 and args.num_microbatches == 1
    args = V.validate_args(_args("--global-batch-size", "32"), world_size=2)
    assert args.num_microbatches == 8


def test_world_size_must_divide():
    with pytest.raises(ValueError, match="world size \\(6\\).*--tensor-model-parallel-size \\(4\\)"):
        V.validate_args(_args("--tensor-model-parallel-size", "4"), world_size=6)
    with pytest.raises(ValueError, match="--context-parallel-size"):
        V.validate_args(_args("--pipeline-model-parallel-size", "2", "--context-parallel-size", "2"), world_size=6)


def test_global_batch_must_be_multiple_of_mbs_times_dp():
    with pytest.raises(ValueError, match="--global-batch-size \\(6\\).*--micro-batch-size \\(2\\) x data-parallel size \\(2\\)"):
        V.validate_args(_args("--global-batch-size", "6"), world_size=2)


def test_micro_batch_size_required():
    args = parse_args(_without("--micro-batch-size"))
    with pytest.raises(ValueError, match="--micro-batch-size"):
        V.validate_args(args, world_size=1)


def test_heads_and_query_groups_divide_tp():
    with pytest.raises(ValueError, match="--num-attention-heads \\(4\\).*--tensor-model-parallel-size \\(8\\)"):
        _configs("--tensor-model-parallel-size", "8", world_size=8)
    with pytest.raises(ValueError, match="--num-query-groups \\(1\\).*--tensor-model-parallel-size \\(2\\)"):
        _configs("--group-query-attention", "--num-query-groups", "1", "--tensor-model-parallel-size", "2",
                 world_size=2)


def test_seq_length_fits_learned_positions():
    with pytest.raises(ValueError, match="--seq-length \\(32\\).*--max-position-embeddings \\(16\\)"):
        _configs("--seq-length", "32")
    _configs("--seq-length", "32", "--position-embedding-type", "rope")


def test_context_parallel_needs_seq_length_divisible():
    with pytest.raises(ValueError, match="2 x --context-parallel-size"):
        V.validate_args(_args("--context-parallel-size", "3", "--seq-length", "16"), world_size=3)


def test_train_iters_xor_train_samples():
    with pytest.raises(ValueError, match="mutually exclusive"):
        _configs("--train-samples", "100")
    args = parse_args(_without("--train-iters"))
    with pytest.raises(ValueError, match="--train-iters or --train-samples"):
        V.validate_args(args, world_size=1)


def test_fp16_xor_bf16():
    with pytest.raises(ValueError, match="--bf16 and --fp16 cannot both be set"):
        _configs("--fp16", "--bf16")


def test_lr_required_and_bounded():
    args = parse_args(_without("--lr"))
    with pytest.raises(ValueError, match="--lr"):
        V.validate_args(args, world_size=1)
    with pytest.raises(ValueError, match="--min-lr"):
        _configs("--min-lr", "1")


def test_warmup_options_exclusive():
    with pytest.raises(ValueError, match="--lr-warmup-fraction and --lr-warmup-iters"):
        _configs("--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "3")
    with pytest.raises(ValueError, match="-iters variants.*--lr-warmup-samples"):
        V.validate_args(_args("--lr-warmup-samples", "30"), world_size=1)


def test_overlap_param_gather_needs_dist_opt_and_overlap_grad_reduce():
    with pytest.raises(ValueError, match="--overlap-param-gather needs --use-distributed-optimizer"):
        _configs("--overlap-param-gather")
    with pytest.raises(ValueError, match="--overlap-param-gather needs --overlap-grad-reduce"):
        _configs("--overlap-param-gather", "--use-distributed-optimizer")
    _configs("--overlap-param-gather", "--use-distributed-optimizer", "--overlap-grad-reduce")


def test_sequence_parallel_forced_off_at_tp1():
    args = _args("--sequence-parallel")
    with pytest.warns(UserWarning, match="--sequence-parallel"):
        V.validate_args(args, world_size=1)
    assert args.sequence_parallel is False
    args = V.validate_args(_args("--sequence-parallel", "--tensor-model-parallel-size", "2"), world_size=2)
    assert args.sequence_parallel is True


def test_virtual_pipeline_checks():
    with pytest.raises(ValueError, match="needs --pipeline-model-parallel-size >= 2"):
        V.validate_args(_args("--num-virtual-stages-per-pipeline-rank", "2"), world_size=1)
    with pytest.raises(ValueError, match="pipeline rank 0 holds 1 layers, which do not split into"):
        _configs("--num-virtual-stages-per-pipeline-rank", "2", "--pipeline-model-parallel-size", "2", world_size=2)


def test_exactly_one_data_source():
    with pytest.raises(ValueError, match="--data-path and --mock-data"):
        V.validate_args(_args("--data-path", "prefix"), world_size=1)
    args = parse_args(_without("--mock-data", False))
    with pytest.raises(ValueError, match="no data source"):
        V.validate_args(args, world_size=1)
    args = parse_args(_without("--mock-data", False) + ["--train-data-path", "a", "--split", "1,1,1"])
    with pytest.raises(ValueError, match="--split cannot be combined"):
        V.validate_args(args, world_size=1)


def test_rampup_batch_size():
    with pytest.raises(ValueError, match="three values"):
        V.validate_args(_args("--rampup-batch-size", "2", "2"), world_size=1)
    args = parse_args(_without("--train-iters")
                      + ["--train-samples", "100", "--global-batch-size", "8", "--rampup-batch-size", "2", "4", "50"])
    with pytest.raises(ValueError, match="must reach --global-batch-size 8"):
        V.validate_args(args, world_size=1)
    args.rampup_batch_size = [2, 2, 50]
    V.validate_args(args, world_size=1)


def test_checkpoint_options():
    with pytest.raises(ValueError, match="--ckpt-format zarr is not supported yet.*torch"):
        _configs("--ckpt-format", "zarr")
    with pytest.raises(ValueError, match="--async-save writes torch_dist"):
        _configs("--ckpt-format", "torch", "--async-save", "--save", "x")
    with pytest.raises(ValueError, match="--async-save needs --save"):
        _configs("--async-save")
    with pytest.raises(ValueError, match="--ckpt-convert-format.*--ckpt-convert-save"):
        _configs("--ckpt-convert-format", "torch", "--load", "x")
    with pytest.raises(ValueError, match="--use-checkpoint-args.*--load"):
        _configs("--use-checkpoint-args")
    with pytest.raises(ValueError, match="--ckpt-step.*--load"):
        _configs("--ckpt-step", "3")
    with pytest.raises(ValueError, match="--save-interval needs --save"):
        _configs("--save-interval", "3")


def test_intervals_positive():
    with pytest.raises(ValueError, match="--log-interval must be >= 1"):
        _configs("--log-interval", "0")


def test_checks_work_on_partial_namespaces():
    V.check_context_parallel_seq_length(argparse.Namespace())
    V.check_data_source(argparse.Namespace())


def test_layers_per_virtual_stage_sets_virtual_size():
    args = V.validate_args(_args("--num-layers", "8", "--pipeline-model-parallel-size", "2",
                                 "--num-layers-per-virtual-pipeline-stage", "2"), world_size=2)
    assert args.virtual_pipeline_model_parallel_size == 2
    with pytest.raises(ValueError, match="mutually exclusive"):
        V.validate_args(_args("--num-layers", "8", "--pipeline-model-parallel-size", "2",
                              "--num-layers-per-virtual-pipeline-stage", "2",
                              "--num-virtual-stages-per-pipeline-rank", "2"), world_size=2)
    with pytest.raises(ValueError, match="multiple of --num-layers-per-virtual-pipeline-stage \\(3\\)"):
        V.validate_args(_args("--num-layers", "8", "--pipeline-model-parallel-size", "2",
                              "--num-layers-per-virtual-pipeline-stage", "3"), world_size=2)


def test_each_rule_is_stated_once():
    """The rules of one config are not repeated among the cross-config rules: those names are gone from
    this module, and the config dataclasses raise them when they are built."""
    for name in ("check_attention_heads", "check_query_groups", "check_seq_length_fits_positions", "check_precision",
                 "check_lr_warmup", "check_overlap_param_gather"):
        assert not hasattr(V, name), name
    V.validate_args(_args("--fp16", "--bf16"), world_size=1)  # the namespace rules pass; the config refuses
    with pytest.raises(ValueError, match="--lr-warmup-iters and --lr-warmup-samples are mutually exclusive"):
        from gigatron.core.optim.config import SchedulerConfig
        SchedulerConfig(lr_warmup_iters=3, lr_warmup_samples=30)
