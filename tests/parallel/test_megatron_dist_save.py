"""--ckpt-format megatron_torch_dist written by several ranks (gloo): a tp=2 x dp=2 run with the
distributed optimizer and a pp=2 run save Megatron-Core's layout at iteration 4 (every rank its
chunks of the stacked keys, data-parallel rank 0 of each (pp, tp) its `rng_state` object), and one
process resumes from it: its losses continue those of one uninterrupted process (model, Adam state
in the fully_reshardable / plain layout, schedule and data position carried over)."""


import pytest
import torch

from gigatron.core.checkpoint import formats
from gigatron.core.checkpoint.dist import read_dcp_metadata
from tests.parallel.harness import run_distributed
from tests.parallel.test_training_layouts import _argv, _assert_same_curve, _data_cache, _pretrain, _rank_run, _serial

__all__ = ["_data_cache"]  # the module's data-cache fixture, shared

RESUME = ["--train-iters", "8", "--ckpt-format", "megatron_torch_dist"]


@pytest.mark.parametrize("layout,world,rng_objects", [
    (["--tensor-model-parallel-size", "2", "--use-distributed-optimizer"], 4, {"rng_state/shard_0.0_1.2",
                                                                               "rng_state/shard_0.1_1.2"}),
    (["--pipeline-model-parallel-size", "2"], 2, {"rng_state/shard_0.0_2.1", "rng_state/shard_1.0_2.1"}),
], ids=["tp2-dp2-distopt", "pp2"])
def test_parallel_save_resumes_in_one_process(tmp_path, layout, world, rng_objects):
    full_train, full_valid = _serial(RESUME)
    save = str(tmp_path / "ckpt")
    first = run_distributed(_rank_run, world, _argv(RESUME + layout + ["--save", save, "--exit-interval", "4"]),
                            timeout=300)
    assert all(r["iteration"] == 4 for r in first)
    iter_dir, iteration, module = formats.locate(save)
    assert module.NAME == "megatron_torch_dist" and iteration == 4
    keys = set(read_dcp_metadata(iter_dir).state_dict_metadata)
    assert rng_objects <= keys
    assert "decoder.layers.self_attention.linear_qkv._extra_state/shard_1_2" in keys
    main = "param" if "--use-distributed-optimizer" in layout else None
    assert (f"optimizer.state.{main}.decoder.layers.mlp.linear_fc1.weight" in keys) == (main is not None)
    torch.set_num_threads(1)
    resumed = _pretrain(_argv(RESUME + ["--load", save]))
    assert resumed.iteration == 8 and resumed.consumed_train_samples == 64
    _assert_same_curve(resumed.log.train_history, full_train[4:], "training loss after the resume")
    _assert_same_curve(resumed.log.valid_history, [v for v in full_valid if v[0] > 4],
                       "validation loss after the resume")
