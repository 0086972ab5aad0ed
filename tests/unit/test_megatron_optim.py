"""Megatron-Core's optimizer state in its own torch_dist checkpoints: megatron-core 0.16.1 trains
a GPT model in a subprocess (its DistributedDataParallel, get_megatron_optimizer with torch's
AdamW, its OptimizerParamScheduler; tests/megatron_oracle.py `train`), saves the full training
state at iteration 3 with dist_checkpointing the way Megatron-LM's loop does, and trains on to
iteration 6. Gigatron's load_checkpoint resumes from that directory and its next three losses
match Megatron's within fp32 rounding: for the plain optimizer, and for the distributed optimizer
saved "fully_reshardable" at data-parallel size 2 (resumed at size 1, with the plain and the
distributed optimizer), and for the distributed optimizer saved "dp_reshardable" (Megatron-LM's
default: flat gradient-bucket tensors, megatron_dp_buffers.py) by the same run (resumed at size 1,
and at size 2 in two processes into our distributed optimizer), by a bf16 run with several
buckets and padded parameters, and at tensor- and pipeline-parallel size 2 (compared with the
fully_reshardable layout of the same state). Without the optimizer state the losses differ, so the
comparison sees it."""

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
def _distributed_run(tmp_path_factory):
    """One Megatron run at dp 2 with the distributed optimizer, its iteration-3 state saved twice:
    fully_reshardable under fully/, dp_reshardable under dp/."""
    base = tmp_path_factory.mktemp("mcore_distopt")
    _train(base / "fully", 2, "--optim", "distributed", "--sharding", "fully_reshardable",
           "--also-save", "dp_reshardable", str(base / "dp"))
    return base


@pytest.fixture(scope="module")
def distributed(_distributed_run):
    return _distributed_run / "fully", 2


@pytest.fixture(scope="module")
def dp_reshardable(_distributed_run):
    return _distributed_run / "dp", 2


@pytest.fixture(scope="module")
def dp_reshardable_bf16(tmp_path_factory):
    """bf16 parameters, fp32 gradient buffer split into several buckets (--overlap-grad-reduce with a
    small --ddp-bucket-size), ffn 200 so that parameters are padded to Megatron's 64-element starts."""
    return _train(tmp_path_factory.mktemp("mcore_dp_bf16"), 2, "--optim", "distributed", "--sharding",
                  "dp_reshardable", "--bf16", "--ffn", "200", "--bucket-size", "20000"), 2


def _resume_at_dp2(rank, world_size, root):
    from gigatron.core.parallel import ParallelConfig
    from gigatron.core.parallel.groups import ParallelGroups

    groups = ParallelGroups.build(ParallelConfig())
    assert groups.dp.size == world_size == 2
    loaded, losses = _resume(root, world_size, True, groups=groups)
    return loaded.iteration, losses


@pytest.mark.parametrize("use_distributed_optimizer", [False, True], ids=["plain", "distopt"])
@pytest.mark.parametrize("which", ["plain", "distributed", "dp_reshardable"])
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


def test_dp_reshardable_bf16_buckets_and_padding_resume(dp_reshardable_bf16):
    """Several buckets and padded parameter starts: each parameter is found in its bucket (the
    layout is not one flat concatenation), the fp32 main params are Megatron's (not the bf16
    weights) and the resumed losses follow Megatron's within bf16 rounding, into the plain and
    the distributed optimizer."""
    from gigatron.core.checkpoint.dist.metadata import read_dcp_metadata
    from gigatron.training.checkpointing import load_checkpoint

    root, dp = dp_reshardable_bf16
    metadata = read_dcp_metadata(str(root / f"iter_{SAVED_AT:07d}"))
    buckets = {k for k in metadata.state_dict_metadata if k.endswith(".param") and ".bucket_idx_" in k}
    assert len(buckets) > 2
    groups, ddp, optimizer, scheduler = _ours(root, dp, True, bf16=True)
    load_checkpoint(str(root), [ddp], optimizer, scheduler, groups)
    carried = [(e.main_param.float() - e.model_param.detach().reshape(-1)[e.start:e.end].view_as(e.main_param)
                .float()).abs().max() for e in optimizer.entries]
    assert max(carried) > 0  # fp32 precision the bf16 weights do not hold
    assert all(int(st["step"]) == SAVED_AT for st in optimizer.optimizer.state.values())
    reference = _megatron_losses(root)
    _, fresh = _resume(root, dp, False, load_optim=False, bf16=True)
    for use_distributed_optimizer in (False, True):
        _, ours = _resume(root, dp, use_distributed_optimizer, bf16=True)
        assert (ours - reference).abs().max() < (fresh - reference).abs().max() / 10
        torch.testing.assert_close(ours, reference, rtol=0, atol=2e-3)


def test_dp_reshardable_resumes_into_our_distributed_optimizer_at_dp2(dp_reshardable):
    """The same data-parallel size as the writer, in two processes: each rank's distributed
    optimizer shard is cut out of Megatron's buckets, and the losses continue Megatron's."""
    from tests.parallel.harness import run_distributed

    root, dp = dp_reshardable
    results = run_distributed(_resume_at_dp2, 2, str(root), timeout=300)
    for iteration, losses in results:
        assert iteration == SAVED_AT
        torch.testing.assert_close(losses, _megatron_losses(root), rtol=0, atol=2e-5)


@pytest.fixture(scope="module")
def tp2_pp2(tmp_path_factory):
    """Megatron-Core's distributed optimizer at tensor- and pipeline-parallel size 2 (four processes)
    takes two steps on fixed gradients; the same state saved dp_reshardable (dp/KIND) and
    fully_reshardable (fully/KIND), for a GPT with biases and tied embeddings (the last stage keeps
    its own copy of the embedding in a bucket of its own) and a Llama-style model (SwiGLU's
    [gate; up] fc1 split per rank, GQA, untied output layer)."""
    base = tmp_path_factory.mktemp("mcore_tp2pp2")
    oracle.run_oracle("step-save", "--root", str(base / "dp"), "--tp", "2", "--pp", "2", "--kinds", "gpt,llama",
                      "--layers", "4", "--iteration", "2", "--sharding", "dp_reshardable",
                      "--also-save", "fully_reshardable", str(base / "fully"), processes=4, port=free_port(),
                      timeout=600)
    return base


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_dp_reshardable_from_tensor_and_pipeline_parallel_writers(tp2_pp2, kind):
    """Each (tensor, pipeline) rank's buckets hold its local shards: put together they give exactly
    the optimizer state Megatron's own fully_reshardable layout of the same state gives."""
    from gigatron.training.checkpointing import load_checkpoint

    loaded = {}
    for sharding in ("fully", "dp"):
        root = tp2_pp2 / sharding / kind
        groups, ddp, optimizer, _ = _ours(root, 1, True)
        load_checkpoint(str(root), [ddp], optimizer, None, groups)
        loaded[sharding] = [(e.main_param, optimizer.optimizer.state[e.main_param]) for e in optimizer.entries]
    assert len(loaded["dp"]) == len(loaded["fully"]) > 0
    for (main, state), (reference_main, reference) in zip(loaded["dp"], loaded["fully"]):
        assert torch.equal(main, reference_main)
        assert int(state["step"]) == int(reference["step"]) == 2
        assert torch.equal(state["exp_avg"], reference["exp_avg"])
        assert torch.equal(state["exp_avg_sq"], reference["exp_avg_sq"])
    assert all(state["exp_avg_sq"].abs().sum() > 0 for _, state in loaded["dp"])


def test_dp_reshardable_layout_guessed_wrong_is_an_error(dp_reshardable, monkeypatch):
    """The bucket offsets are re-derived from Megatron's buffer rules; a parameter order that fits
    the stored chunk boundaries but is wrong (fc1 and fc2 weights have the same size) is caught by
    the main params differing from the checkpoint's weights, not loaded silently."""
    from gigatron.core.checkpoint import megatron_dp_buffers as buffers
    from gigatron.training.checkpointing import load_checkpoint

    local = list(buffers.LAYER_ORDERS["local"])
    i, j = local.index("mlp.linear_fc1.weight"), local.index("mlp.linear_fc2.weight")
    local[i], local[j] = local[j], local[i]
    monkeypatch.setattr(buffers, "LAYER_ORDERS", {"local": tuple(local)})
    root, dp = dp_reshardable
    groups, ddp, optimizer, scheduler = _ours(root, dp, False)
    with pytest.raises(CheckpointError, match="is not the checkpoint's decoder.layers.*--dist-ckpt-optim-fully"):
        load_checkpoint(str(root), [ddp], optimizer, scheduler, groups)


def test_dp_reshardable_writers_not_placed_are_refused_with_the_fix(dp_reshardable, plain):
    """Writers whose buffers this reader does not place (experts, uneven pipeline stages, args that
    disagree with the stored data-parallel groups), a model that does not fit the buckets, and the
    deprecated dp_zero_gather_scatter layout get one error naming --dist-ckpt-optim-fully-reshardable;
    --no-load-optim still loads the weights."""
    from gigatron.core.checkpoint import megatron_dist
    from gigatron.core.checkpoint.dist.metadata import read_dcp_metadata
    from gigatron.core.checkpoint.megatron_dp_buffers import bucket_layout
    from gigatron.training.checkpointing import load_checkpoint

    root, dp = dp_reshardable
    iter_dir = str(root / f"iter_{SAVED_AT:07d}")
    metadata = read_dcp_metadata(iter_dir)
    read = megatron_dist._dp_reshardable_read(metadata, {}, megatron_dist._model_entries(metadata))
    shapes = {name: slot.shape for name, slot in read.slots.items()}
    assert len(shapes) == 2 * 12 + 4  # every parameter placed
    for args, why in (({"num_experts": 4}, "--num-experts 4"),
                      ({"pipeline_model_parallel_size": 2, "num_layers": 2, "decoder_first_pipeline_num_layers": 1},
                       "--pipeline-model-parallel-size 2 with --decoder-first-pipeline-num-layers"),
                      ({"tensor_model_parallel_size": 2}, r"data-parallel groups \[0\] for tensor/pipeline")):
        with pytest.raises(CheckpointError, match=f"'dp_reshardable'.*saved with {why}.*--dist-ckpt-optim-fully"):
            bucket_layout(metadata, args, shapes)
    del shapes["decoder.layers.1.mlp.linear_fc2.bias"]
    with pytest.raises(CheckpointError, match="do not match this model's parameters.*--dist-ckpt-optim-fully"):
        bucket_layout(metadata, {}, shapes)

    plain_root, _ = plain
    groups, ddp, optimizer, scheduler = _ours(plain_root, 1, True)
    plain_dir = str(plain_root / f"iter_{SAVED_AT:07d}")
    common = megatron_dist.read_common(plain_dir)
    common["optimizer"] = {"param_state_sharding_type": "dp_zero_gather_scatter"}
    with pytest.raises(CheckpointError, match="'dp_zero_gather_scatter'.*--dist-ckpt-optim-fully-reshardable"):
        megatron_dist.megatron_optimizer_common(plain_dir, common, read_dcp_metadata(plain_dir), optimizer)
    groups, ddp, optimizer, scheduler = _ours(root, dp, True)
    assert load_checkpoint(str(root), [ddp], optimizer, scheduler, groups, load_optim=False).iteration == SAVED_AT


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
