"""The training loop reads device values on the host only at log intervals (Megatron's behaviour):
counted by wrapping every way a tensor reaches the host (Tensor.item / tolist / cpu / __float__ /
__int__ / __bool__ / numpy, torch.cuda.synchronize) during a short run of pretrain_gpt on the CPU,
per phase of each iteration. The NaN semantics stay those of a per-iteration check: the first
non-finite gradient norm raises naming its own iteration, and non-finite norms are counted as nan
iterations when the check is off, though both are read only at the log interval."""

import os
import sys
import tempfile

import pytest
import torch

from gigatron.training import gpt
from gigatron.training import loop as loop_module
from gigatron.training.arguments import parse_args
from gigatron.training.logging import TrainingLog
from gigatron.training.loop import NonFiniteLossError, pretrain

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3",
        "--mock-data", "--vocab-size", "256", "--num-workers", "0", "--eval-iters", "0",
        "--eval-interval", "1000", "--attention-dropout", "0", "--hidden-dropout", "0", "--clip-grad", "1.0",
        "--no-loss-curve"]

_SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


class SyncCounter:
    """Records (phase, iteration) for each host read while installed."""

    def __init__(self, monkeypatch):
        self.phase = ("setup", 0)
        self.events: list[tuple[str, int, str]] = []
        for name in _SYNC_METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(original, name))
        monkeypatch.setattr(torch.cuda, "synchronize", self._wrap(lambda *a, **k: None, "cuda.synchronize"))
        train_step = loop_module.train_step
        add_iteration = TrainingLog.add_iteration
        counter = self

        def step(ctx, *args, **kwargs):
            counter.phase = ("step", ctx.iteration + 1)
            return train_step(ctx, *args, **kwargs)

        def added(log, *args, **kwargs):
            counter.phase = ("after", counter.phase[1])
            return add_iteration(log, *args, **kwargs)

        monkeypatch.setattr(loop_module, "train_step", step)
        monkeypatch.setattr(TrainingLog, "add_iteration", added)

    def _wrap(self, original, name):
        counter = self

        def wrapped(*args, **kwargs):
            phase, iteration = counter.phase
            # torch.optim's foreach AdamW (the CPU optimizer) reads its CPU step counters; on CUDA
            # the optimizer is the fused AdamW, whose step counters live on the device.
            caller = sys._getframe(1).f_code.co_filename.replace(os.sep, "/")
            if phase != "setup" and "/torch/optim/" not in caller:
                counter.events.append((phase, iteration, name))
            return original(*args, **kwargs)

        return wrapped


def _run(extra, forward_step=gpt.forward_step):
    with tempfile.TemporaryDirectory() as directory:
        args = parse_args(TINY + extra + ["--data-cache-path", os.path.join(directory, "cache")])
        return pretrain(gpt.datasets_provider, gpt.model_provider, forward_step, args=args)


def test_no_host_reads_between_log_intervals(monkeypatch):
    counter = SyncCounter(monkeypatch)
    ctx = _run(["--train-iters", "8", "--log-interval", "4"])
    assert ctx.iteration == 8 and len(ctx.log.train_history) == 2
    # The first step may initialize things once; every later step and every iteration's
    # bookkeeping outside the log intervals (4, 8) reads nothing back from the device.
    bad = [(phase, it, name) for phase, it, name in counter.events
           if not (phase == "step" and it == 1) and not (phase == "after" and it % 4 == 0)]
    assert bad == [], f"host reads outside the log interval: {bad}"
    assert any(phase == "after" and it == 4 for phase, it, _ in counter.events)  # the log line reads


def test_old_loop_behaviour_would_be_caught(monkeypatch):
    """The counter sees a per-iteration read (as the grad-norm .item() of every step was)."""
    counter = SyncCounter(monkeypatch)
    step = loop_module.train_step

    def syncing_step(ctx, *args, **kwargs):
        out = step(ctx, *args, **kwargs)
        float(out[2])  # the gradient norm read every iteration
        return out

    monkeypatch.setattr(loop_module, "train_step", syncing_step)
    _run(["--train-iters", "3", "--log-interval", "3"])
    assert any(phase == "step" and it == 2 for phase, it, _ in counter.events)


def _nan_from(iteration):
    calls = {"n": 0}

    def forward_step(data_iterator, model):
        output, loss_func = gpt.forward_step(data_iterator, model)
        calls["n"] += 1
        if calls["n"] > 2 * (iteration - 1):  # two micro-batches per iteration
            output = output * float("nan")
        return output, loss_func

    return forward_step


def test_nan_raises_naming_its_iteration_though_read_at_the_log_interval():
    with pytest.raises(NonFiniteLossError, match="iteration 2: the gradient norm is nan"):
        _run(["--train-iters", "6", "--log-interval", "5"], forward_step=_nan_from(2))


def test_nan_iterations_counted_with_the_check_off(capsys):
    ctx = _run(["--train-iters", "4", "--log-interval", "4", "--no-check-for-nan-in-loss-and-grad"],
               forward_step=_nan_from(3))
    assert ctx.iteration == 4
    assert "number of nan iterations:   2" in capsys.readouterr().out
