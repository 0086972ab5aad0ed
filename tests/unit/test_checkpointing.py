"""Megatron `torch` checkpoint layout: round trip, atomicity and clear errors."""

import argparse
import dataclasses
import os
import random

import numpy as np
import pytest
import torch

from gigatron.core.checkpoint import io as ckpt_io
from gigatron.core.checkpoint.io import CheckpointError, atomic_write_text, safe_torch_load
from gigatron.core.optim.config import OptimizerConfig, SchedulerConfig
from gigatron.core.optim.scheduler import OptimizerParamScheduler
from gigatron.core.parallel.groups import Group, ParallelGroups
from gigatron.training import checkpointing as C


def _setup(seed=0, hidden=8):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = OptimizerParamScheduler(optimizer, SchedulerConfig(lr_warmup_iters=2), OptimizerConfig(lr=1e-3),
                                        global_batch_size=4, train_iters=10)
    model(torch.randn(2, hidden)).sum().backward()
    optimizer.step()
    scheduler.step(4)
    return model, optimizer, scheduler


def _args(**kw):
    base = dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, num_layers=2, hidden_size=8,
                params_dtype=torch.float32, _flag_owners={"x": ["y"]})
    base.update(kw)
    return argparse.Namespace(**base)


def _save(root, iteration, model, optimizer, scheduler, groups=None, **kw):
    groups = groups or ParallelGroups.single()
    return C.save_checkpoint(str(root), iteration, [model], optimizer, scheduler, kw.pop("args", _args()), groups,
                             num_floating_point_operations_so_far=1.5e12, consumed_train_samples=40,
                             consumed_valid_samples=8, **kw)


def test_round_trip_restores_model_optimizer_scheduler_and_rng(tmp_path):
    model, optimizer, scheduler = _setup()
    _save(tmp_path, 7, model, optimizer, scheduler)
    path = tmp_path / "iter_0000007" / "mp_rank_00" / "model_optim_rng.pt"
    assert path.is_file()
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "7"
    expected_random = (random.random(), np.random.rand(), torch.rand(3))

    state = torch.load(path, weights_only=True)
    assert state["checkpoint_version"] == 3.0 and state["iteration"] == 7
    assert isinstance(state["args"], dict) and state["args"]["consumed_train_samples"] == 40
    assert "_flag_owners" not in state["args"] and state["args"]["params_dtype"] == "torch.float32"
    assert {"model", "optimizer", "opt_param_scheduler", "rng_state", "num_floating_point_operations_so_far"} <= set(state)
    assert len(state["rng_state"]) == 1

    model2, optimizer2, scheduler2 = _setup(seed=1)
    random.random(), np.random.rand(), torch.rand(5)
    loaded = C.load_checkpoint(str(tmp_path), [model2], optimizer2, scheduler2, ParallelGroups.single())
    assert loaded.iteration == 7 and loaded.consumed_train_samples == 40 and loaded.consumed_valid_samples == 8
    assert loaded.num_floating_point_operations_so_far == 1.5e12
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        s1, s2 = optimizer.state[p1], optimizer2.state[p2]
        assert torch.equal(s1["exp_avg"], s2["exp_avg"]) and torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"])
    assert scheduler2.num_steps == scheduler.num_steps and scheduler2.get_lr() == scheduler.get_lr()
    assert random.random() == expected_random[0]
    assert np.random.rand() == expected_random[1]
    assert torch.equal(torch.rand(3), expected_random[2])


def test_virtual_chunks_saved_as_model0_model1(tmp_path):
    chunks = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 3)]
    C.save_checkpoint(str(tmp_path), 1, chunks, None, None, _args(), ParallelGroups.single(vp_size=2))
    state = safe_torch_load(C.checkpoint_file(str(tmp_path), 1, 0, 0, 1))
    assert "model0" in state and "model1" in state and "model" not in state
    fresh = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 3)]
    C.load_checkpoint(str(tmp_path), fresh, None, None, ParallelGroups.single(vp_size=2), load_rng=False)
    assert torch.equal(fresh[1].weight, chunks[1].weight)


def test_truncated_file_is_named(tmp_path):
    model, optimizer, scheduler = _setup()
    _save(tmp_path, 3, model, optimizer, scheduler)
    path = C.checkpoint_file(str(tmp_path), 3, 0, 0, 1)
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"corrupt: .*mp_rank_00/model_optim_rng.pt has \d+ bytes, \d+ were written"):
        C.load_checkpoint(str(tmp_path), [model], optimizer, scheduler, ParallelGroups.single())
    os.unlink(tmp_path / "iter_0000003" / "checksums.json")  # a checkpoint from before the manifest
    with pytest.raises(CheckpointError, match=r"mp_rank_00/model_optim_rng.pt .*truncated or corrupt"):
        C.load_checkpoint(str(tmp_path), [model], optimizer, scheduler, ParallelGroups.single())


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer, scheduler = _setup()
    _save(tmp_path, 1, model, optimizer, scheduler)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def failing_save(obj, handle):
        handle.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_io.torch, "save", failing_save)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2, model, optimizer, scheduler)
    monkeypatch.undo()
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "1"
    leftovers = [f for _, _, files in os.walk(tmp_path / "iter_0000002") for f in files]
    assert leftovers == []  # no partial file under the final or a temporary name
    model2, optimizer2, scheduler2 = _setup(seed=3)
    loaded = C.load_checkpoint(str(tmp_path), [model2], optimizer2, scheduler2, ParallelGroups.single())
    assert loaded.iteration == 1
    for key, value in model2.state_dict().items():
        assert torch.equal(value, before[key])


def test_shape_mismatch_names_file_and_parameter(tmp_path):
    model, optimizer, scheduler = _setup()
    _save(tmp_path, 1, model, optimizer, scheduler)
    bigger, opt2, sched2 = _setup(hidden=16)
    with pytest.raises(CheckpointError, match=r"model_optim_rng.pt \[model\].*0.weight: checkpoint \(8, 8\) vs model \(16, 16\)"):
        C.load_checkpoint(str(tmp_path), [bigger], opt2, sched2, ParallelGroups.single())


def test_tensor_parallel_mismatch(tmp_path):
    model, optimizer, scheduler = _setup()
    groups = dataclasses.replace(ParallelGroups.single(), tp=Group(group=None, size=2, rank=0, ranks=[0, 1]))
    _save(tmp_path, 1, model, optimizer, scheduler, groups=groups, args=_args(tensor_model_parallel_size=2))
    with pytest.raises(CheckpointError, match="--tensor-model-parallel-size 2 but this run uses 1"):
        C.load_checkpoint(str(tmp_path), [model], optimizer, scheduler, ParallelGroups.single())


def test_pipeline_layout_mismatch_lists_what_exists(tmp_path):
    model, optimizer, scheduler = _setup()
    groups = dataclasses.replace(ParallelGroups.single(), pp=Group(group=None, size=2, rank=0, ranks=[0, 1]))
    _save(tmp_path, 1, model, optimizer, scheduler, groups=groups, args=_args(pipeline_model_parallel_size=2))
    assert (tmp_path / "iter_0000001" / "mp_rank_00_000" / "model_optim_rng.pt").is_file()
    with pytest.raises(CheckpointError, match=r"mp_rank_00/model_optim_rng.pt does not exist.*mp_rank_00_000.*pp=1"):
        C.load_checkpoint(str(tmp_path), [model], optimizer, scheduler, ParallelGroups.single())


def test_no_save_optim_no_load_optim_and_finetune(tmp_path):
    model, optimizer, scheduler = _setup()
    _save(tmp_path, 5, model, optimizer, scheduler, save_optim=False, save_rng=False)
    state = safe_torch_load(C.checkpoint_file(str(tmp_path), 5, 0, 0, 1))
    assert "optimizer" not in state and "rng_state" not in state
    with pytest.raises(CheckpointError, match="--no-load-optim"):
        C.load_checkpoint(str(tmp_path), [model], optimizer, scheduler, ParallelGroups.single(), load_rng=False)
    with pytest.raises(CheckpointError, match="--no-load-rng"):
        C.load_checkpoint(str(tmp_path), [model], optimizer, scheduler, ParallelGroups.single(), load_optim=False)
    loaded = C.load_checkpoint(str(tmp_path), [model], optimizer, scheduler, ParallelGroups.single(),
                               load_optim=False, load_rng=False)
    assert loaded.iteration == 5
    loaded = C.load_checkpoint(str(tmp_path), [model], optimizer, scheduler, ParallelGroups.single(), finetune=True)
    assert loaded.iteration == 0 and loaded.consumed_train_samples == 0


def test_missing_checkpoint_and_ckpt_step(tmp_path):
    model, optimizer, scheduler = _setup()
    assert C.load_checkpoint(str(tmp_path), [model], optimizer, scheduler, ParallelGroups.single()).iteration == 0
    with pytest.raises(CheckpointError, match="--exit-on-missing-checkpoint"):
        C.load_checkpoint(str(tmp_path), [model], optimizer, scheduler, ParallelGroups.single(),
                          exit_on_missing_checkpoint=True)
    _save(tmp_path, 2, model, optimizer, scheduler)
    _save(tmp_path, 4, model, optimizer, scheduler)
    loaded = C.load_checkpoint(str(tmp_path), [model], optimizer, scheduler, ParallelGroups.single(), ckpt_step=2)
    assert loaded.iteration == 2
    with pytest.raises(CheckpointError, match="--ckpt-step 3"):
        C.load_checkpoint(str(tmp_path), [model], optimizer, scheduler, ParallelGroups.single(), ckpt_step=3)
    atomic_write_text(str(tmp_path / "latest_checkpointed_iteration.txt"), "garbage")
    with pytest.raises(CheckpointError, match="tracker file"):
        C.load_checkpoint(str(tmp_path), [model], optimizer, scheduler, ParallelGroups.single())


def test_use_checkpoint_args(tmp_path):
    model, optimizer, scheduler = _setup()
    _save(tmp_path, 1, model, optimizer, scheduler, args=_args(num_layers=6, hidden_size=8))
    args = argparse.Namespace(load=str(tmp_path), ckpt_step=None, num_layers=2, hidden_size=4, lr=0.1)
    C.load_args_from_checkpoint(args)
    assert args.num_layers == 6 and args.hidden_size == 8 and args.lr == 0.1


def test_use_checkpoint_args_keeps_the_runs_parallel_layout_and_explicit_tokenizer(tmp_path):
    """Megatron's rule: the checkpoint's model description wins, the parallel layout is the run's, and
    so are tokenizer settings given for this run."""
    from gigatron.training.arguments import parse_args

    model, optimizer, scheduler = _setup()
    saved = _args(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, num_layers=6, hidden_size=8,
                  tokenizer_type="NullTokenizer", vocab_size=300, make_vocab_size_divisible_by=64)
    _save(tmp_path, 1, model, optimizer, scheduler, args=saved)
    args = parse_args(["--load", str(tmp_path), "--use-checkpoint-args", "--num-layers", "2",
                       "--make-vocab-size-divisible-by", "32"])
    C.load_args_from_checkpoint(args)
    assert args.num_layers == 6 and args.hidden_size == 8  # the model is the checkpoint's, even over a flag
    assert args.tensor_model_parallel_size == 1 and args.pipeline_model_parallel_size == 1  # the run's layout
    assert args.vocab_size == 300 and args.tokenizer_type == "NullTokenizer"
    assert args.make_vocab_size_divisible_by == 32  # given for this run


def _tokenizer_checkpoint(tmp_path, monkeypatch):
    """A checkpoint saved from tmp_path/run with --vocab-file vocab.json (relative)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "vocab.json").write_text("{}")
    (run / "merges.txt").write_text("#version: 0.2\n")
    monkeypatch.chdir(run)
    model, optimizer, scheduler = _setup()
    _save(tmp_path / "ckpt", 1, model, optimizer, scheduler,
          args=_args(tokenizer_type="GPT2BPETokenizer", vocab_file="vocab.json", merge_file="merges.txt"))
    return run


def test_tokenizer_paths_are_stored_absolute(tmp_path, monkeypatch):
    run = _tokenizer_checkpoint(tmp_path, monkeypatch)
    saved = safe_torch_load(C.checkpoint_file(str(tmp_path / "ckpt"), 1, 0, 0, 1))["args"]
    assert saved["vocab_file"] == str(run / "vocab.json") and saved["merge_file"] == str(run / "merges.txt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the stored absolute path still works from another directory
    args = argparse.Namespace(load=str(tmp_path / "ckpt"), ckpt_step=None, vocab_file=None, merge_file=None)
    C.load_args_from_checkpoint(args)
    assert args.vocab_file == str(run / "vocab.json")


def test_tokenizer_paths_fall_back_to_the_checkpoint_directory(tmp_path, monkeypatch):
    run = _tokenizer_checkpoint(tmp_path, monkeypatch)
    for name in ("vocab.json", "merges.txt"):
        (run / name).rename(tmp_path / "ckpt" / name)  # the checkpoint was moved with its tokenizer
    args = argparse.Namespace(load=str(tmp_path / "ckpt"), ckpt_step=None, vocab_file=None, merge_file=None)
    C.load_args_from_checkpoint(args)
    assert args.vocab_file == str(tmp_path / "ckpt" / "vocab.json")
    assert args.merge_file == str(tmp_path / "ckpt" / "merges.txt")
    (tmp_path / "ckpt" / "merges.txt").unlink()
    args = argparse.Namespace(load=str(tmp_path / "ckpt"), ckpt_step=None, vocab_file=None, merge_file=None)
    with pytest.raises(CheckpointError, match=r"--merge-file .*merges.txt was not found, nor was .*ckpt/merges.txt"):
        C.load_args_from_checkpoint(args)


def test_weights_only_refuses_pickled_objects(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"args": argparse.Namespace(a=1)}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        safe_torch_load(str(path))
    with pytest.raises(CheckpointError, match="does not exist"):
        safe_torch_load(str(tmp_path / "none.pt"))


def test_rng_tracker_states_round_trip_through_a_file(tmp_path):
    from gigatron.core.parallel.random import MODEL_PARALLEL_RNG, RNGStatesTracker, model_parallel_seed

    tracker = model_parallel_seed(1234, ParallelGroups.single(), RNGStatesTracker())
    with tracker.fork(MODEL_PARALLEL_RNG):
        torch.rand(3)
    model, optimizer, scheduler = _setup()
    _save(tmp_path, 1, model, optimizer, scheduler, rng_tracker=tracker)
    with tracker.fork(MODEL_PARALLEL_RNG):
        expected = torch.rand(4)
    other = model_parallel_seed(99, ParallelGroups.single(), RNGStatesTracker())
    C.load_checkpoint(str(tmp_path), [model], optimizer, scheduler, ParallelGroups.single(), rng_tracker=other)
    with other.fork(MODEL_PARALLEL_RNG):
        assert torch.equal(torch.rand(4), expected)


def test_loading_weights_without_optimizer_state_refreshes_bf16_main_params(tmp_path):
    """--no-load-optim / --finetune into a mixed-precision optimizer: the fp32 main params must
    follow the loaded weights, or the first step writes the initial weights back."""
    from gigatron.core.distributed import DDPConfig, DistributedDataParallel
    from gigatron.core.optim import get_optimizer

    def build(seed):
        torch.manual_seed(seed)
        module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)).to(torch.bfloat16)
        groups = ParallelGroups.single()
        ddp = DistributedDataParallel(DDPConfig(), module, groups)
        opt = get_optimizer(OptimizerConfig(lr=0.0, weight_decay=0.0, bf16=True, params_dtype=torch.bfloat16),
                            [ddp], groups)
        sched = OptimizerParamScheduler(opt, SchedulerConfig(), OptimizerConfig(lr=0.0), global_batch_size=1,
                                        train_iters=10)
        return ddp, opt, sched, groups

    saved, opt_a, sched_a, groups = build(seed=1)
    C.save_checkpoint(str(tmp_path), 3, [saved], opt_a, sched_a, _args(params_dtype=torch.bfloat16), groups,
                      num_floating_point_operations_so_far=0.0, consumed_train_samples=3, consumed_valid_samples=0)
    for finetune in (False, True):
        fresh, opt_b, sched_b, _ = build(seed=2)
        C.load_checkpoint(str(tmp_path), [fresh], opt_b, sched_b, groups, load_optim=False, load_rng=False,
                          finetune=finetune)
        fresh.zero_grad_buffer()
        for p in fresh.module.parameters():
            p.main_grad.zero_()
        opt_b.step()  # lr 0: the weights must stay the loaded ones
        for a, b in zip(saved.module.parameters(), fresh.module.parameters()):
            assert torch.equal(a, b)
