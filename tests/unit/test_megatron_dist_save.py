"""Training saves Megatron-Core's own torch_dist (--ckpt-format megatron_torch_dist): pretrain_gpt's
path on the CPU saves model and Adam state (plain and distributed optimizer, fp32 and bf16) under
Megatron-Core's keys; resuming from it repeats an uninterrupted run's losses bit for bit (FP8
delayed-scaling amax history and RNG included), and megatron-core 0.16.1 (in a subprocess, see
tests/megatron_oracle.py) loads the model into its GPTModel with dist_checkpointing.load and gives
our logits."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import megatron_oracle as oracle  # noqa: E402

import gigatron  # noqa: E402
from gigatron.core.checkpoint import formats  # noqa: E402
from gigatron.core.checkpoint.dist import read_dcp_metadata  # noqa: E402
from gigatron.core.checkpoint.megatron_dist import MEGATRON_RECORD, read_common  # noqa: E402
from gigatron.training import gpt  # noqa: E402
from gigatron.training.arguments import parse_args  # noqa: E402
from gigatron.training.loop import pretrain  # noqa: E402
from tests.parallel.harness import free_port  # noqa: E402

ITERS = 6
# the oracle's "llama" model (RMSNorm, RoPE, SwiGLU, grouped-query attention, untied output)
BASE = ["--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-2", "--min-lr", "3e-3",
        "--lr-warmup-iters", "1", "--lr-decay-style", "cosine", "--train-iters", str(ITERS), "--log-interval", "1",
        "--eval-iters", "0", "--num-workers", "0", "--seed", "1234", "--no-loss-curve", "--mock-data",
        "--vocab-size", "4095", "--make-vocab-size-divisible-by", "4096", "--seq-length", "16",
        "--max-position-embeddings", "32", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "256",
        "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
        "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
        "--untie-embeddings-and-output-weights", "--attention-dropout", "0", "--hidden-dropout", "0",
        "--norm-epsilon", "1e-5"]
FMT = ["--ckpt-format", "megatron_torch_dist"]
DELAYED = ["--fp8-format", "hybrid", "--fp8-recipe", "delayed", "--fp8-amax-history-len", "4",
           "--fp8-amax-compute-algo", "max"]

_CACHE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _CACHE["data"] = str(tmp_path_factory.mktemp("data-cache"))
    yield
    torch.set_num_threads(threads)
    _CACHE.clear()


def _train(extra):
    return pretrain(gpt.datasets_provider, gpt.model_provider, gpt.forward_step,
                    args=parse_args(BASE + list(extra) + ["--data-cache-path", _CACHE["data"]]))


def _losses(ctx):
    return [loss for _, loss in ctx.log.train_history]


OPTIMIZERS = {"plain": [], "distributed": ["--use-distributed-optimizer"], "bf16": ["--bf16"],
              "bf16-distributed": ["--bf16", "--use-distributed-optimizer"]}


@pytest.mark.parametrize("optim", sorted(OPTIMIZERS))
def test_resume_from_megatron_layout_is_exact(tmp_path, optim):
    save = str(tmp_path / "ckpt")
    flags = OPTIMIZERS[optim]
    full = _train(flags + FMT + ["--save-interval", "3", "--save", save])
    iter_dir, iteration, module = formats.locate(save)
    assert module.NAME == "megatron_torch_dist" and iteration == ITERS
    assert json.loads(open(os.path.join(iter_dir, "metadata.json")).read()) == MEGATRON_RECORD
    keys = set(read_dcp_metadata(iter_dir).state_dict_metadata)
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys  # stacked, fused-norm name
    main = "param" if "distributed" in optim else "fp32_param"
    assert f"optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.weight" in keys
    assert (f"optimizer.state.{main}.decoder.layers.mlp.linear_fc1.weight" in keys) == (
        "bf16" in optim or "distributed" in optim)
    common = read_common(iter_dir)
    assert common["iteration"] == ITERS and common["args"]["consumed_train_samples"] == ITERS * 4
    resumed = _train(flags + FMT + ["--load", save, "--ckpt-step", "3"])
    assert [i for i, _ in resumed.log.train_history] == list(range(4, ITERS + 1))
    assert _losses(resumed) == _losses(full)[3:]


def test_fp8_resume_from_megatron_layout_is_exact(tmp_path):
    """The FP8 delayed-scaling amax history and scales travel in common.pt's "gigatron" entry."""
    save = str(tmp_path / "ckpt")
    full = _train(DELAYED + FMT + ["--save-interval", "3", "--save", save])
    resumed = _train(DELAYED + FMT + ["--load", save, "--ckpt-step", "3"])
    assert _losses(resumed) == _losses(full)[3:]
    for name, state in full.fp8_states.items():
        assert torch.equal(resumed.fp8_states[name].amax_history, state.amax_history), name
        assert torch.equal(resumed.fp8_states[name].scale, state.scale), name


@pytest.mark.skipif(not oracle.megatron_available(), reason="megatron-core is not installed")
@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_core_loads_the_training_checkpoint(tmp_path, tp):
    save = tmp_path / "ckpt"
    _train(["--use-distributed-optimizer"] + FMT + ["--save-interval", str(ITERS), "--save", str(save)])
    oracle.run_oracle("logits", "--kind", "llama", "--root", str(save), "--iteration", str(ITERS), "--tp", str(tp),
                      processes=tp, port=free_port())
    megatron = torch.load(save / "reference.pt", weights_only=True)
    with torch.no_grad():
        ours = gigatron.from_pretrained(save)(megatron["tokens"])
    torch.testing.assert_close(megatron["logits"], ours, rtol=0, atol=1e-5)


def test_ckpt_convert_format_writes_megatron_layout(tmp_path):
    """--ckpt-convert-format megatron_torch_dist turns a Gigatron checkpoint into Megatron-Core's
    layout (model, optimizer, schedule) and exits; the result gives the same logits."""
    save, out = str(tmp_path / "ckpt"), str(tmp_path / "converted")
    _train(["--save-interval", str(ITERS), "--save", save])
    _train(["--load", save, "--ckpt-convert-format", "megatron_torch_dist", "--ckpt-convert-save", out])
    converted = os.path.join(out, "megatron_torch_dist")
    iter_dir, iteration, module = formats.locate(converted)
    assert module.NAME == "megatron_torch_dist" and iteration == ITERS
    assert "optimizer.state.exp_avg.decoder.layers.mlp.linear_fc2.weight" in read_dcp_metadata(iter_dir).state_dict_metadata
    tokens = torch.randint(0, 4095, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(gigatron.from_pretrained(converted)(tokens), gigatron.from_pretrained(save)(tokens),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("extra,message", [
    (["--num-experts", "4", "--moe-router-topk", "2"], "mixture-of-experts"),
    (["--optimizer", "sgd"], "Adam's state only"),
    (["--mtp-num-layers", "1"], "multi-token prediction"),
])
def test_what_megatron_layout_does_not_write_is_refused_at_start_up(extra, message):
    from gigatron.training.validate import validate_args

    with pytest.raises(ValueError, match=message):
        validate_args(parse_args(BASE + FMT + extra + ["--save", "x"]))


def test_a_non_gpt_model_is_refused_at_save(tmp_path):
    from gigatron.core.checkpoint.io import CheckpointError
    from gigatron.core.checkpoint.megatron_dist import save_training_state
    from gigatron.core.parallel.groups import ParallelGroups

    with pytest.raises(CheckpointError, match="GPT models only, not Linear"):
        save_training_state(str(tmp_path), 1, [torch.nn.Linear(2, 2)], None, ParallelGroups.single(),
                            {"args": {"num_layers": 1}})
