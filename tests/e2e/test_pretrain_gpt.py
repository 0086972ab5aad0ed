"""GPT pretraining end to end on mock data: the log line, exact resume, and parallel == serial."""

import math
import os
import re
import subprocess
import sys

import pytest
import torch

from gigatron.training import gpt
from gigatron.training.arguments import parse_args
from gigatron.training.loop import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "64",
        "--max-position-embeddings", "64", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-2",
        "--min-lr", "1e-3", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--mock-data",
        "--vocab-size", "4096", "--num-workers", "0", "--log-interval", "1", "--eval-interval", "5",
        "--eval-iters", "1", "--attention-dropout", "0", "--hidden-dropout", "0.1"]

# Mock-data indices are cached here once for the whole module (building them takes seconds).
_CACHE = {}


@pytest.fixture(scope="module", autouse=True)
def _data_cache(tmp_path_factory):
    _CACHE["path"] = str(tmp_path_factory.mktemp("data-cache"))
    yield
    _CACHE.clear()


def _with_cache(argv):
    return list(argv) + ["--data-cache-path", _CACHE["path"]]


LOG_LINE = re.compile(
    r"^ \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] iteration +(\d+)/ +(\d+) \| consumed samples: +(\d+) \| "
    r"elapsed time per iteration \(ms\): \d+\.\d \| throughput per GPU \(TFLOP/s/GPU\): \d+\.\d \| "
    r"learning rate: \d\.\d{6}E[+-]\d\d \| global batch size: +(\d+) \| lm loss: (\d\.\d{6}E[+-]\d\d) \| "
    r"loss scale: 1\.0 \| grad norm: \d+\.\d{3} \| number of skipped iterations: +0 \| "
    r"number of nan iterations: +0 \| tokens per second: [\d.]+ \| tokens per second per device: [\d.]+ \| "
    r"model TFLOP/s per device: [\d.]+ \| peak RSS \(GiB\): [\d.]+ \|$")


def test_pretrain_gpt_script_log_format(tmp_path):
    save = tmp_path / "ckpt"
    tb = tmp_path / "tb"
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *_with_cache(TINY), "--train-iters", "5",
           "--log-interval", "2", "--log-throughput", "--save", str(save), "--tensorboard-dir", str(tb)]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "iteration" in line and "consumed samples" in line]
    assert len(lines) == 2, result.stdout
    for line, (iteration, consumed) in zip(lines, [(2, 8), (4, 16)]):
        match = LOG_LINE.match(line)
        assert match, line
        assert int(match.group(1)) == iteration and int(match.group(2)) == 5 and int(match.group(3)) == consumed
        assert int(match.group(4)) == 4 and math.isfinite(float(match.group(5)))
    assert re.search(r"^-+\n validation loss at iteration 5 \| lm loss value: \d\.\d{6}E[+-]\d\d \| "
                     r"lm loss PPL: \d\.\d{6}E[+-]\d\d \| \n-+$", result.stdout, re.M), result.stdout
    assert "validation loss at iteration 5 on test set" in result.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "5"
    assert (save / "iter_0000005" / "metadata.json").is_file()  # torch_dist, the default format
    assert (save / "loss_curve.png").stat().st_size > 1000
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tb))


def _run(argv):
    if "--data-cache-path" not in argv and _CACHE:
        argv = _with_cache(argv)
    ctx = pretrain(gpt.datasets_provider, gpt.model_provider, gpt.forward_step, args=parse_args(argv))
    return ctx.log.train_history, ctx.log.valid_history, ctx


@pytest.fixture(scope="module")
def full_run():
    """The uninterrupted 12-iteration run (one intra-op thread) that every resume test compares
    with: (train history, validation history), computed once for the module."""
    torch.set_num_threads(1)
    train, valid, _ = _run(TINY + ["--train-iters", "12"])
    return train, valid


def test_resume_is_exact(tmp_path, full_run):
    torch.set_num_threads(1)
    full_train, full_valid = full_run
    save = str(tmp_path / "ckpt")
    first_train, first_valid, first = _run(TINY + ["--train-iters", "12", "--save", save, "--exit-interval", "6"])
    assert first.iteration == 6
    second_train, second_valid, second = _run(TINY + ["--train-iters", "12", "--save", save, "--load", save])
    assert second.iteration == 12 and second.consumed_train_samples == 48
    assert [i for i, _ in second_train] == list(range(1, 13))  # history continues from loss_curve.json
    assert second_train == full_train  # bitwise: same floats
    assert second_valid == full_valid
    assert first_train == full_train[:6]


def test_skip_train_and_finetune(tmp_path):
    save = str(tmp_path / "ckpt")
    _run(TINY + ["--train-iters", "3", "--save", save])
    _, valid, ctx = _run(TINY + ["--train-iters", "3", "--load", save, "--skip-train"])
    assert ctx.iteration == 3 and valid == []
    train, _, ctx = _run(TINY + ["--train-iters", "3", "--load", save, "--finetune", "--eval-iters", "0"])
    assert ctx.iteration == 3 and [i for i, _ in train] == [1, 2, 3] and ctx.consumed_train_samples == 12


PARALLEL = [a for a in TINY] + ["--train-iters", "4", "--hidden-dropout", "0", "--attention-dropout", "0",
                                "--vocab-size", "4351",
                                "--eval-interval", "2", "--distributed-backend", "gloo"]


@pytest.fixture(scope="module")
def serial_run():
    """The one-process run that each two-process layout must match, computed once for the module."""
    torch.set_num_threads(1)
    train, valid, _ = _run(PARALLEL)
    return train, valid


def _parallel_rank(rank, world_size, extra):
    torch.set_num_threads(1)
    train, valid, ctx = _run(PARALLEL + extra)
    return {"train": train, "valid": valid, "rank": ctx.run.rank, "groups": (ctx.groups.tp.size, ctx.groups.dp.size)}


@pytest.mark.slow
@pytest.mark.parametrize("extra, sizes", [([], (1, 2)), (["--tensor-model-parallel-size", "2"], (2, 1)),
                                          (["--context-parallel-size", "2"], (1, 1)),
                                          (["--pipeline-model-parallel-size", "2"], (1, 1))],
                         ids=["dp2", "tp2", "cp2", "pp2"])
def test_two_processes_match_one(serial_run, extra, sizes):
    from tests.parallel.harness import run_distributed

    torch.set_num_threads(1)
    serial_train, serial_valid = serial_run
    results = run_distributed(_parallel_rank, 2, _with_cache(extra), timeout=300)
    last = results[-1]
    assert last["groups"] == sizes
    assert [i for i, _ in last["train"]] == [i for i, _ in serial_train] == [1, 2, 3, 4]
    for (_, ours), (_, theirs) in zip(last["train"], serial_train):
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    assert len(last["valid"]) == len(serial_valid) > 0
    for (_, ours), (_, theirs) in zip(last["valid"], serial_valid):
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)


def test_plot_loss_tool_reads_the_log(tmp_path):
    from tools.plot_loss import main, parse_log

    line = (" [2026-11-28 05:00:00] iteration      100/    1000 | consumed samples:        12800 | elapsed time per "
            "iteration (ms): 412.3 | learning rate: 2.999910E-04 | global batch size:   128 | lm loss: 6.412345E+00 | "
            "loss scale: 1.0 | grad norm: 1.234 | number of skipped iterations:   0 | number of nan iterations:   0 |")
    box = " validation loss at iteration 100 | lm loss value: 6.100000E+00 | lm loss PPL: 4.4E+02 | "
    test = " validation loss at iteration 100 on test set | lm loss value: 9.0E+00 | lm loss PPL: 8.1E+03 | "
    train, valid = parse_log([line, box, test])
    assert train == {100: 6.412345} and valid == {100: 6.1}
    log = tmp_path / "train.log"
    log.write_text("\n".join([line, box, test]) + "\n")
    out = tmp_path / "curve.png"
    assert main([str(log), "--output", str(out)]) == 0 and out.stat().st_size > 1000


def test_minimal_core_example_trains():
    import ast
    import importlib.util

    path = os.path.join(ROOT, "examples", "minimal_core_loop.py")
    spec = importlib.util.spec_from_file_location("minimal_core_loop", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    main = example.main
    source = open(path, encoding="utf-8").read()
    imported = [n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom) and n.module]
    assert all(not m.startswith("gigatron.training") for m in imported)
    losses = main(3)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_micro_batch_calculator_rampup():
    from gigatron.training.loop import MicroBatchCalculator

    calc = MicroBatchCalculator(global_batch_size=16, micro_batch_size=2, data_parallel_size=2,
                                rampup_batch_size=[4, 4, 60])
    # 3 increments over 60 samples: +4 every 20 samples.
    assert [calc.global_batch_size_at(n) for n in (0, 19, 20, 40, 59, 60, 61, 1000)] == [4, 4, 8, 12, 12, 16, 16, 16]
    assert calc.num_microbatches_at(0) == 1 and calc.num_microbatches_at(100) == 4
    # 5 x 4 (0..20) + 3 x 8 (20..44) + 2 x 12 (44..68) then 16s: 100 samples -> 5 + 3 + 2 + 2 = 12 iterations.
    assert calc.train_iters_for_samples(100) == 12
    assert MicroBatchCalculator(16, 2, 2).train_iters_for_samples(100) == 6


def test_rampup_run_trains_by_samples():
    argv = [a for a in TINY] + ["--global-batch-size", "8", "--rampup-batch-size", "4", "4", "8",
                                "--train-samples", "32", "--eval-iters", "0"]
    i = argv.index("--lr-warmup-iters")
    argv[i:i + 2] = ["--lr-warmup-samples", "8"]
    train, _, ctx = _run(argv)
    assert ctx.consumed_train_samples == 32 and ctx.iteration == 5  # 4 + 4 + 8 + 8 + 8


def _sigterm_at_iteration(stop_after):
    calls = {"n": 0}

    def forward_step(data_iterator, model):
        calls["n"] += 1
        if calls["n"] == stop_after * 2:  # two micro-batches per iteration
            os.kill(os.getpid(), __import__("signal").SIGTERM)
        return gpt.forward_step(data_iterator, model)

    return forward_step


def test_exit_signal_handler_saves_and_stops(tmp_path):
    save = str(tmp_path / "ckpt")
    args = parse_args(_with_cache(TINY) + ["--train-iters", "10", "--save", save, "--exit-signal-handler",
                                           "--eval-iters", "0"])
    ctx = pretrain(gpt.datasets_provider, gpt.model_provider, _sigterm_at_iteration(3), args=args)
    assert ctx.iteration == 3
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "3"


def test_nan_loss_stops_with_a_clear_error():
    from gigatron.training.loop import NonFiniteLossError

    def forward_step(data_iterator, model):
        output, loss_func = gpt.forward_step(data_iterator, model)
        return output * float("nan"), loss_func

    args = parse_args(_with_cache(TINY) + ["--train-iters", "3", "--eval-iters", "0"])
    with pytest.raises(NonFiniteLossError, match="iteration 1: the gradient norm is nan"):
        pretrain(gpt.datasets_provider, gpt.model_provider, forward_step, args=args)


def test_use_checkpoint_args_takes_model_shape(tmp_path):
    save = str(tmp_path / "ckpt")
    _run(TINY + ["--train-iters", "3", "--save", save, "--eval-iters", "0"])
    argv = [a for a in TINY]
    argv[argv.index("--num-layers") + 1] = "5"
    _, _, ctx = _run(argv + ["--train-iters", "3", "--load", save, "--use-checkpoint-args", "--skip-train",
                             "--eval-iters", "0"])
    assert ctx.configs.transformer.num_layers == 2 and ctx.iteration == 3


def test_collective_timeout_names_rank_and_operation():
    from gigatron.training.initialize import CollectiveTimeout, collective_phase

    with pytest.raises(CollectiveTimeout, match="rank 0: a collective timed out during the optimizer step"):
        with collective_phase("the optimizer step"):
            raise RuntimeError("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(OpType=ALLREDUCE)")
    with pytest.raises(RuntimeError, match="unrelated"):
        with collective_phase("the optimizer step"):
            raise RuntimeError("unrelated")


def test_attention_dropout_with_evaluation():
    from gigatron.core.transformer import attention

    attention._checked_probe.cache_clear()  # probe results are cached per process
    argv = [a for a in TINY]
    argv[argv.index("--attention-dropout") + 1] = "0.1"
    train, valid, _ = _run(argv + ["--train-iters", "3", "--eval-interval", "3"])
    assert valid and len(train) == 3


@pytest.mark.slow
def test_torch_compile_trains_like_eager():
    """--torch-compile compiles every transformer layer and trains to the same losses as eager
    (dropout off, so both draw no random numbers)."""
    from gigatron.core.transformer.layer import TransformerLayer

    torch.set_num_threads(1)
    argv = [a for a in TINY]
    argv[argv.index("--hidden-dropout") + 1] = "0"
    eager, _, _ = _run(argv + ["--train-iters", "3", "--eval-interval", "100"])
    compiled, _, ctx = _run(argv + ["--train-iters", "3", "--eval-interval", "100", "--torch-compile"])
    layers = [m for chunk in ctx.model for m in chunk.module.modules() if isinstance(m, TransformerLayer)]
    assert layers and all(hasattr(layer, "_compiled_call_impl") and layer._compiled_call_impl is not None
                          for layer in layers)
    for (i, a), (j, b) in zip(eager, compiled):
        assert i == j and abs(a - b) <= 1e-4 * abs(a), (eager, compiled)


@pytest.mark.parametrize("fmt, extra", [("torch_dist", []), ("torch_dist", ["--async-save"]), ("torch", [])],
                         ids=["torch_dist", "torch_dist-async", "torch"])
def test_resume_is_exact_in_each_checkpoint_format(tmp_path, full_run, fmt, extra):
    """6 + resume + 6 iterations equal 12 in one run, for each format (the default is torch_dist);
    with --async-save the tracker names the iteration only once its files are complete."""
    torch.set_num_threads(1)
    full_train, _ = full_run
    save = str(tmp_path / "ckpt")
    argv = TINY + ["--train-iters", "12", "--save", save, "--ckpt-format", fmt] + extra
    _run(argv + ["--exit-interval", "6"])
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as handle:
        assert handle.read().strip() == "6"
    marker = os.path.join(save, "iter_0000006", "metadata.json")
    assert os.path.exists(marker) == (fmt == "torch_dist")
    second_train, _, second = _run(argv + ["--load", save])
    assert second.iteration == 12 and second_train == full_train


def test_ckpt_convert_format_round_trip(tmp_path):
    """--ckpt-convert-format: torch -> torch_dist, and the converted checkpoint resumes the run."""
    torch.set_num_threads(1)
    save = str(tmp_path / "ckpt")
    full_train, _, _ = _run(TINY + ["--train-iters", "8"])
    _run(TINY + ["--train-iters", "8", "--save", save, "--ckpt-format", "torch", "--exit-interval", "4"])
    converted = str(tmp_path / "converted")
    pretrain(gpt.datasets_provider, gpt.model_provider, gpt.forward_step,
             args=parse_args(_with_cache(TINY + ["--train-iters", "8", "--load", save, "--ckpt-convert-format",
                                                 "torch_dist", "--ckpt-convert-save", converted])))
    target = os.path.join(converted, "torch_dist")
    assert os.path.exists(os.path.join(target, "iter_0000004", "metadata.json"))
    resumed, _, ctx = _run(TINY + ["--train-iters", "8", "--load", target, "--save", target])
    assert ctx.iteration == 8 and resumed == full_train[4:]  # the converted folder holds no earlier history


def test_from_pretrained_reads_both_checkpoint_formats(tmp_path):
    """gigatron.from_pretrained merges a torch_dist checkpoint and a torch one of the same run into
    the same model, and its logits equal the training model's over the true vocabulary."""
    import gigatron

    torch.set_num_threads(1)
    logits = {}
    for fmt in ("torch_dist", "torch"):
        save = str(tmp_path / fmt)
        _, _, ctx = _run(TINY + ["--train-iters", "3", "--save", save, "--ckpt-format", fmt])
        model = gigatron.from_pretrained(save)
        ids = torch.arange(16).reshape(2, 8) % model.vocab_size
        logits[fmt] = model(ids)
        assert logits[fmt].shape == (2, 8, model.vocab_size)
        trained = ctx.model[0].module.eval()
        with torch.no_grad():
            reference = trained(ids, None, None).transpose(0, 1)[..., :model.vocab_size]  # [b, s, V]
        torch.testing.assert_close(logits[fmt], reference, rtol=1e-5, atol=1e-5)
    assert logits["torch_dist"].shape == logits["torch"].shape, {k: v.shape for k, v in logits.items()}
    assert torch.equal(logits["torch_dist"], logits["torch"])


def test_final_validation_says_why_it_differs_from_the_evaluation_just_before(capsys):
    """At the end of a run whose last iteration also evaluated, the final validation (other batches)
    is labelled, so the two values at the same iteration are not mistaken for one."""
    _run(TINY + ["--train-iters", "5"])
    out = capsys.readouterr().out
    assert re.search(r"^ validation loss at iteration 5 \| lm loss value", out, re.M), out
    assert ("validation loss at iteration 5 on validation set (final evaluation, on the next 1 validation batch; "
            "the evaluation at iteration 5 above used earlier ones) | lm loss value") in out
    _run(TINY + ["--train-iters", "4"])  # no evaluation at iteration 4: Megatron's plain label
    out = capsys.readouterr().out
    assert "validation loss at iteration 4 on validation set | lm loss value" in out


def test_torch_compile_says_it_is_compiling_and_how_long_it_took(capsys, monkeypatch):
    compiled = []
    # The message is what is tested here; compiling for real takes about a minute on a CPU.
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    _run(TINY + ["--train-iters", "3", "--torch-compile"])
    out = capsys.readouterr().out
    assert compiled == ["TransformerLayer", "TransformerLayer"]
    assert out.count("> compiling the transformer layers (--torch-compile) during the first iteration") == 1
    assert re.search(r"^> compiled: the first iteration, compilation included, took \d+\.\d s$", out, re.M), out
    assert out.index("compiling the transformer layers") < out.index("compiled: the first iteration")
