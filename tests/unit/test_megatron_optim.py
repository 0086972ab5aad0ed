"""Megatron-Core's optimizer state in its own torch_dist checkpoints: megatron-core 0.16.1 trains
a GPT model in a subprocess (its DistributedDataParallel, get_megatron_optimizer with torch's
AdamW, its OptimizerParamScheduler; tests/megatron_oracle.py `train`), saves the full training
state at iteration 3 with dist_checkpointing the way Megatron-LM's loop does, and trains on to
iteration 6. Gigatron's load_checkpoint resumes from that directory and its next three losses
match Megatron's within fp32 rounding: for the plain optimizer, and for the distributed optimizer
saved "fully_reshardable" at data-parallel size 2 (resumed at size 1, with the plain and the
distributed optimizer). Without the optimizer state the losses differ, so the comparison sees it."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import megatron_oracle as oracle  # noqa: E402

from gigatron.core.checkpoint.io import CheckpointError  # noqa: E402
from tests.parallel.harness import free_port  # noqa: E402
from tests.unit._megatron_optim_fixtures import SAVED_AT, T, TOTAL  # noqa: E402
from tests.unit._megatron_optim_fixtures import build_training as _ours  # noqa: E402
from tests.unit._megatron_optim_fixtures import megatron_losses as _megatron_losses  # noqa: E402
from tests.unit._megatron_optim_fixtures import resume as _resume  # noqa: E402

pytestmark = pytest.mark.skipif(not oracle.megatron_available(), reason="megatron-core is not installed")


def _train(root, processes, *extra):
    oracle.run_oracle("train", "--root", str(root), "--iteration", str(SAVED_AT), "--total", str(TOTAL), *extra,
                      processes=processes, port=free_port())
    return root


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("mcore_plain"), 1), 1


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("mcore_distopt"), 2, "--optim", "distributed", "--sharding",
                  "fully_reshardable"), 2


@pytest.mark.parametrize("use_distributed_optimizer", [False, True], ids=["plain", "distopt"])
@pytest.mark.parametrize("which", ["plain", "distributed"])
def test_resume_continues_megatrons_loss_trajectory(which, use_distributed_optimizer, request):
    root, dp = request.getfixturevalue(which)
    loaded, ours = _resume(root, dp, use_distributed_optimizer)
    assert (loaded.iteration, loaded.consumed_train_samples) == (SAVED_AT, SAVED_AT * T["micro_batch"] * dp)
    torch.testing.assert_close(ours, _megatron_losses(root), rtol=0, atol=2e-5)


def test_without_optimizer_state_the_trajectory_differs(plain):
    """--no-load-optim takes the weights alone: fresh Adam moments give other losses after the
    first step (the comparison above does see the optimizer state)."""
    root, dp = plain
    loaded, ours = _resume(root, dp, False, load_optim=False)
    assert loaded.iteration == SAVED_AT
    reference = _megatron_losses(root)
    torch.testing.assert_close(ours[0], reference[0], rtol=0, atol=2e-5)  # same weights
    assert (ours[1:] - reference[1:]).abs().max() > 1e-3


def test_optimizer_state_and_step_are_megatrons(distributed):
    """The Adam step count and the moments come from the checkpoint (distributed optimizer at dp 2,
    read by the plain optimizer at dp 1)."""
    from gigatron.training.checkpointing import load_checkpoint

    root, dp = distributed
    groups, ddp, optimizer, scheduler = _ours(root, dp, False)
    load_checkpoint(str(root), [ddp], optimizer, scheduler, groups)
    states = list(optimizer.optimizer.state.values())
    assert states and all(int(st["step"]) == SAVED_AT for st in states)
    assert all(st["exp_avg_sq"].abs().sum() > 0 for st in states)
    assert scheduler.num_steps == SAVED_AT * T["micro_batch"] * dp


def test_finetune_takes_the_weights_only(plain):
    from gigatron.training.checkpointing import load_checkpoint

    root, dp = plain
    groups, ddp, optimizer, scheduler = _ours(root, dp, False)
    loaded = load_checkpoint(str(root), [ddp], optimizer, scheduler, groups, finetune=True)
    assert loaded.iteration == 0 and not optimizer.optimizer.state and scheduler.num_steps == 0


def test_dp_reshardable_optimizer_state_is_refused_with_the_fix(tmp_path):
    """Megatron-LM's bucket-layout distributed-optimizer state: one clear error naming the flag
    that re-saves it in model space, and --no-load-optim still loads the weights."""
    from gigatron.training.checkpointing import load_checkpoint

    root = tmp_path
    oracle.run_oracle("train", "--root", str(root), "--iteration", "1", "--total", "2", "--optim", "distributed",
                      "--sharding", "dp_reshardable", processes=2, port=free_port())
    groups, ddp, optimizer, scheduler = _ours(root, 2, True)
    with pytest.raises(CheckpointError, match="dp_reshardable.*--dist-ckpt-optim-fully-reshardable"):
        load_checkpoint(str(root), [ddp], optimizer, scheduler, groups)
    assert load_checkpoint(str(root), [ddp], optimizer, scheduler, groups, load_optim=False).iteration == 1


@pytest.fixture(scope="module")
def plain_bf16(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("mcore_bf16"), 1, "--bf16"), 1


@pytest.mark.parametrize("use_distributed_optimizer", [False, True], ids=["plain", "distopt"])
def test_bf16_resume_reads_megatrons_fp32_main_params(plain_bf16, use_distributed_optimizer):
    """bf16 parameters: Megatron's Float16OptimizerWithFloat16Params stores the fp32 main params as
    optimizer.state.fp32_param.*; they are read (not rebuilt from the bf16 weights), and the resumed
    losses follow Megatron's within bf16 rounding."""
    from gigatron.training.checkpointing import load_checkpoint

    root, dp = plain_bf16
    groups, ddp, optimizer, scheduler = _ours(root, dp, use_distributed_optimizer, bf16=True)
    load_checkpoint(str(root), [ddp], optimizer, scheduler, groups)
    carried = [(e.main_param.float() - e.model_param.detach().reshape(-1)[e.start:e.end].view_as(e.main_param)
                .float()).abs().max() for e in optimizer.entries]
    assert max(carried) > 0  # fp32 precision the bf16 weights do not hold
    _, ours = _resume(root, dp, use_distributed_optimizer, bf16=True)
    _, fresh = _resume(root, dp, use_distributed_optimizer, load_optim=False, bf16=True)
    reference = _megatron_losses(root)
    assert (ours - reference).abs().max() < (fresh - reference).abs().max() / 10
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-3)


@pytest.mark.parametrize("which,use_distributed_optimizer", [("plain", False), ("distributed", True)],
                         ids=["plain", "distopt"])
def test_megatron_resumes_what_our_training_saves(which, use_distributed_optimizer, request, tmp_path):
    """Both directions: we resume Megatron's checkpoint, train one iteration and save
    --ckpt-format megatron_torch_dist; Megatron-Core loads model, optimizer and scheduler from it
    (strict) and its next losses are the ones our uninterrupted run computes."""
    import argparse

    from gigatron.core.checkpoint import formats
    from gigatron.core.distributed import finalize_model_grads
    from gigatron.training.checkpointing import load_checkpoint, save_checkpoint

    root, dp = request.getfixturevalue(which)
    groups, ddp, optimizer, scheduler = _ours(root, dp, use_distributed_optimizer)
    loaded = load_checkpoint(str(root), [ddp], optimizer, scheduler, groups)
    args = argparse.Namespace(**formats.read_args(str(root)))
    ours, mine = [], tmp_path / "ours"
    for it in range(loaded.iteration, TOTAL):
        if it == SAVED_AT + 1:
            save_checkpoint(str(mine), it, [ddp], optimizer, scheduler, args, groups, ckpt_format="megatron_torch_dist",
                            consumed_train_samples=it * T["micro_batch"] * dp)
        batch = torch.cat([oracle.train_batch(it, r, dp) for r in range(dp)])
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = ddp(batch[:, :-1], None, None, labels=batch[:, 1:]).float().mean()
        loss.backward()
        finalize_model_grads([ddp], groups)
        optimizer.step()
        scheduler.step(T["micro_batch"] * dp)
        ours.append(loss.item())
    optim = ["--optim", "distributed"] if use_distributed_optimizer else []
    oracle.run_oracle("resume", "--root", str(mine), "--iteration", str(SAVED_AT + 1), "--total", str(TOTAL), *optim,
                      processes=dp, port=free_port())
    megatron = torch.load(mine / "resumed_losses.pt", weights_only=True)["losses"]
    torch.testing.assert_close(megatron, torch.tensor(ours[1:], dtype=torch.float64), rtol=0, atol=2e-5)
