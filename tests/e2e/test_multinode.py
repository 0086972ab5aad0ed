"""A two-node data-parallel run, simulated on one machine, trains like one process.

Two `torchrun --nnodes 2 --nproc-per-node 1 --node-rank 0|1` launches of pretrain_gpt.py join one
gloo process group over 127.0.0.1 (dp=2). Their logged training and validation losses must equal
those of one `torchrun --nproc-per-node 2` launch and of a plain single-process run with the same
global batch (rel 1e-5; the log prints six decimals of the mantissa).
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.parallel.harness import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "pretrain_gpt.py")

ARGS = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "64",
        "--max-position-embeddings", "64", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-2",
        "--min-lr", "1e-3", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--mock-data",
        "--vocab-size", "4351", "--num-workers", "0", "--log-interval", "1", "--eval-interval", "2",
        "--eval-iters", "1", "--attention-dropout", "0", "--hidden-dropout", "0", "--train-iters", "4",
        "--distributed-backend", "gloo", "--distributed-timeout-minutes", "2"]

TIMEOUT_S = 180

TRAIN_LINE = re.compile(r"\biteration +(\d+)/ +\d+ \|.* lm loss: ([0-9.]+E[+-]\d+) \|")
# Periodic evaluations ("... at iteration 2 |") and the final ones ("... at iteration 4 on test set |").
VALID_LINE = re.compile(r"\bvalidation loss at iteration (\d+)( on \w+ set)?(?: \([^)]*\))? \| lm loss value: "
                        r"([0-9.]+E[+-]\d+) \|")


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # each launch describes its own group
    return env


def _torchrun(*launcher_args):
    return [sys.executable, "-m", "torch.distributed.run", *launcher_args, SCRIPT]


def _run_together(commands, cwd):
    """Start every command at once (each in its own session), wait for all of them within
    TIMEOUT_S, and return their (returncode, stdout+stderr). On timeout or error every process
    group started here is killed."""
    procs = []
    try:
        for command in commands:
            procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          env=_env(), cwd=cwd, start_new_session=True))
        deadline = time.monotonic() + TIMEOUT_S
        outputs = []
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{' '.join(proc.args[-12:])} did not finish within {TIMEOUT_S} s")
            outputs.append((proc.returncode, out))
        return outputs
    finally:
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=30)
            if proc.stdout is not None:
                proc.stdout.close()


def _curves(outputs):
    """Training losses {iteration: loss} and validation losses {"<iteration><split>": loss} parsed
    from the launches' combined log."""
    for code, out in outputs:
        assert code == 0, out[-4000:]
    text = "\n".join(out for _, out in outputs)
    train, valid = {}, {}
    for line in text.splitlines():
        match = TRAIN_LINE.search(line)
        if match and "consumed samples" in line:
            assert int(match.group(1)) not in train, f"iteration {match.group(1)} logged twice:\n{text[-4000:]}"
            train[int(match.group(1))] = float(match.group(2))
        match = VALID_LINE.search(line)
        if match:
            key = match.group(1) + (match.group(2) or "")
            assert key not in valid, f"validation {key} logged twice:\n{text[-4000:]}"
            valid[key] = float(match.group(3))
    assert sorted(train) == [1, 2, 3, 4], text[-4000:]
    assert sorted(valid) == ["2", "4", "4 on test set", "4 on validation set"], text[-4000:]
    return train, valid


def _assert_same(ours, theirs, what):
    assert sorted(ours) == sorted(theirs), what
    for i in sorted(ours):
        assert ours[i] == pytest.approx(theirs[i], rel=1e-5), f"{what} at iteration {i}: {ours} vs {theirs}"


@pytest.mark.slow
def test_two_nodes_match_one_node_and_one_process(tmp_path):
    cache = str(tmp_path / "data-cache")
    args = ARGS + ["--data-cache-path", cache]
    # One process first: it also builds the mock-data index cache the launches below read.
    serial = _curves(_run_together([[sys.executable, SCRIPT, *args]], str(tmp_path)))

    port = free_port()
    nodes = [
        _torchrun("--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node), "--master-addr", "127.0.0.1",
                  "--master-port", str(port)) + args
        for node in (0, 1)
    ]
    two_nodes = _curves(_run_together(nodes, str(tmp_path)))

    one_node = _curves(_run_together(
        [_torchrun("--standalone", "--nnodes", "1", "--nproc-per-node", "2") + args], str(tmp_path)))

    for name, (train, valid) in {"two nodes": two_nodes, "one node": one_node}.items():
        _assert_same(train, serial[0], f"training loss, {name} vs one process")
        _assert_same(valid, serial[1], f"validation loss, {name} vs one process")
