"""Hybrid Mamba pretraining end to end on mock data (pretrain_mamba.py): the script trains and
saves, a resumed run continues bitwise in both checkpoint formats, two processes (tp=2, pp=2, dp=2
with the distributed optimizer) match one, and the flags a Mamba run cannot take are refused."""

import os
import re
import subprocess
import sys

import pytest
import torch

from gigatron.training import mamba
from gigatron.training.arguments import parse_args
from gigatron.training.loop import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-2",
        "--min-lr", "1e-3", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--mock-data",
        "--vocab-size", "4096", "--num-workers", "0", "--log-interval", "1", "--eval-interval", "3",
        "--eval-iters", "1", "--attention-dropout", "0", "--hidden-dropout", "0.1",
        "--hybrid-override-pattern", "M*M-", "--mamba-state-dim", "8", "--mamba-head-dim", "8",
        "--mamba-num-groups", "2", "--position-embedding-type", "none", "--normalization", "RMSNorm",
        "--disable-bias-linear", "--is-hybrid-model",
        "--spec", "megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec"]

_CACHE = {}


@pytest.fixture(scope="module", autouse=True)
def _data_cache(tmp_path_factory):
    _CACHE["path"] = str(tmp_path_factory.mktemp("data-cache"))
    yield
    _CACHE.clear()


def _run(argv, cache=None):
    argv = list(argv) + ["--data-cache-path", cache or _CACHE["path"]]
    args = parse_args(argv, extra_args_provider=mamba.extra_args_provider)
    mamba.check_mamba_args(args)
    ctx = pretrain(mamba.datasets_provider, mamba.model_provider, mamba.forward_step, args=args)
    return ctx.log.train_history, ctx.log.valid_history, ctx


def test_pretrain_mamba_script_trains_and_saves(tmp_path):
    save = tmp_path / "ckpt"
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_mamba.py"), *TINY, "--train-iters", "3",
           "--save", str(save), "--data-cache-path", _CACHE["path"]]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = re.findall(r"iteration +\d+/ +3 \| .* lm loss: (\d\.\d{6}E[+-]\d\d)", result.stdout)
    assert len(losses) == 3, result.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert (save / "iter_0000003" / "metadata.json").is_file()
    from gigatron.core.checkpoint.dist import read_model
    state = read_model(str(save / "iter_0000003"))
    assert state.args["hybrid_override_pattern"] == "M*M-" and state.args["mamba_state_dim"] == 8
    assert "decoder.layers.0.mixer.in_proj.weight" in state.tensors
    assert "decoder.final_norm.weight" in state.tensors


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_mamba_resume_is_exact(tmp_path, fmt):
    torch.set_num_threads(1)
    argv = TINY + ["--train-iters", "6", "--ckpt-format", fmt]
    full_train, full_valid, _ = _run(argv)
    save = str(tmp_path / "ckpt")
    first_train, _, first = _run(argv + ["--save", save, "--exit-interval", "3"])
    assert first.iteration == 3 and first_train == full_train[:3]
    second_train, second_valid, second = _run(argv + ["--save", save, "--load", save])
    assert second.iteration == 6
    assert second_train == full_train  # bitwise
    assert second_valid == full_valid


PARALLEL = TINY + ["--train-iters", "3", "--hidden-dropout", "0", "--vocab-size", "4351",
                   "--distributed-backend", "gloo"]


def _parallel_rank(rank, world_size, extra, cache):
    torch.set_num_threads(1)
    train, valid, ctx = _run(PARALLEL + extra, cache)
    return {"train": train, "valid": valid}


@pytest.mark.parametrize("extra", [["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                                   ["--pipeline-model-parallel-size", "2"],
                                   ["--use-distributed-optimizer"]],
                         ids=["tp2-sp", "pp2", "dp2-distopt"])
def test_two_processes_match_one(extra):
    from tests.parallel.harness import run_distributed

    torch.set_num_threads(1)
    reference, reference_valid, _ = _run(PARALLEL)
    results = run_distributed(_parallel_rank, 2, extra, _CACHE["path"], timeout=600)
    last = results[-1]  # the last pipeline stage logs the loss
    assert [i for i, _ in last["train"]] == [i for i, _ in reference] == [1, 2, 3]
    for (_, got), (_, want) in zip(last["train"], reference):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), (last["train"], reference)
    assert len(last["valid"]) == len(reference_valid) > 0
    for (_, got), (_, want) in zip(last["valid"], reference_valid):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--spec", "megatron.core.models.gpt.gpt_layer_specs", "get_gpt_layer_local_spec"], "not the Mamba stack"),
    (["--context-parallel-size", "2"], "context parallelism is not supported for Mamba"),
    (["--reset-attention-mask"], "--reset-attention-mask"),
])
def test_mamba_refuses_what_it_cannot_do(extra, message):
    args = parse_args(TINY + ["--train-iters", "1"] + extra, extra_args_provider=mamba.extra_args_provider)
    with pytest.raises(ValueError, match=message):
        mamba.check_mamba_args(args)


def test_script_reports_a_refused_flag_in_one_line(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_mamba.py"), *TINY, "--train-iters", "1",
           "--context-parallel-size", "2"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))
    assert result.returncode == 2
    assert "error: --context-parallel-size 2: context parallelism is not supported for Mamba" in result.stderr


def test_hybrid_layer_pattern_is_megatrons_newer_spelling():
    args = parse_args(["--hybrid-layer-pattern", "M-M*"], extra_args_provider=mamba.extra_args_provider)
    assert args.hybrid_override_pattern == "M-M*"
    args = parse_args(["--mamba-num-heads", "16", "--hybrid-attention-ratio", "0.25", "--hybrid-mlp-ratio", "0.5"])
    assert (args.mamba_num_heads, args.hybrid_attention_ratio, args.hybrid_mlp_ratio) == (16, 0.25, 0.5)


def test_use_checkpoint_args_takes_the_mamba_flags(tmp_path):
    torch.set_num_threads(1)
    save = str(tmp_path / "ckpt")
    _run(TINY + ["--train-iters", "3", "--save", save, "--eval-iters", "0", "--exit-interval", "2"])
    other = [a for a in TINY]
    other[other.index("--hybrid-override-pattern") + 1] = "MMMM"
    other[other.index("--mamba-state-dim") + 1] = "16"
    _, _, ctx = _run(other + ["--train-iters", "3", "--load", save, "--use-checkpoint-args", "--eval-iters", "0"])
    assert ctx.iteration == 3
    assert ctx.configs.mamba.hybrid_override_pattern == "M*M-" and ctx.configs.mamba.mamba_state_dim == 8


def _save_tp2_torch_then_convert(rank, world_size, save, converted, cache):
    torch.set_num_threads(1)
    tp2 = PARALLEL_6 + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    _run(tp2 + ["--save", save, "--ckpt-format", "torch", "--exit-interval", "3"], cache)
    argv = tp2 + ["--load", save, "--ckpt-convert-format", "torch_dist", "--ckpt-convert-save", converted,
                  "--data-cache-path", cache]
    pretrain(mamba.datasets_provider, mamba.model_provider, mamba.forward_step,
             args=parse_args(argv, extra_args_provider=mamba.extra_args_provider))
    return True


PARALLEL_6 = list(PARALLEL)
PARALLEL_6[PARALLEL_6.index("--train-iters") + 1] = "6"


@pytest.mark.slow
def test_tp2_torch_checkpoint_converted_resumes_at_tp1():
    """The whole path of a checkpoint across tensor-parallel sizes: saved at tp=2 in Megatron's
    `torch` layout (the mixer's fused rows split segment by segment), converted to torch_dist by
    --ckpt-convert-format, resumed in one process: the remaining iterations give the losses of an
    uninterrupted single-process run (model and Adam state resharded through the segments)."""
    from tests.parallel.harness import run_distributed

    torch.set_num_threads(1)
    reference, _, _ = _run(PARALLEL_6)
    save, converted = os.path.join(_CACHE["path"], "tp2-torch"), os.path.join(_CACHE["path"], "tp2-converted")
    run_distributed(_save_tp2_torch_then_convert, 2, save, converted, _CACHE["path"], timeout=600)
    target = os.path.join(converted, "torch_dist")
    resumed, _, ctx = _run(PARALLEL_6 + ["--load", target, "--distributed-backend", "gloo"])
    assert ctx.iteration == 6
    assert [i for i, _ in resumed] == [4, 5, 6]
    for (_, got), (_, want) in zip(resumed, reference[3:]):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), (resumed, reference)


def test_pretrain_gpt_refuses_the_mamba_flags():
    from gigatron.training.entry import pretrain_gpt_main

    with pytest.raises(ValueError, match="--hybrid-override-pattern, --mamba-state-dim describe a Mamba / hybrid "
                                         "model, which pretrain_gpt.py does not build; train it with pretrain_mamba"):
        pretrain_gpt_main(["--num-layers", "2", "--hybrid-override-pattern", "M*", "--mamba-state-dim", "16"])
