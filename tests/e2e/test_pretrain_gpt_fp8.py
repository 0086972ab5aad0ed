"""pretrain_gpt.py with Megatron's Llama-3 8B FP8 recipe flags (sizes shrunk for the CPU): the
script runs the FP8 path end to end and says so; an FP8 flag it cannot honour is one error line."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Megatron's Llama-3 8B recipe: the FP8 flags unchanged, the model shrunk (8B: 32 layers, hidden 4096, FFN 14336, 32 heads, 8 groups, sequence 8192).
LLAMA3_8B_FP8_SHRUNK = [
    "--fp8-format", "hybrid", "--fp8-amax-history-len", "1024", "--fp8-amax-compute-algo", "max",
    "--fp8-param-gather", "--bf16", "--use-distributed-optimizer", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "224",
    "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2", "--seq-length", "32",
    "--max-position-embeddings", "32", "--position-embedding-type", "rope", "--rotary-base", "500000",
    "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--attention-dropout", "0", "--hidden-dropout", "0", "--init-method-std", "0.02", "--clip-grad", "1.0",
    "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--lr", "3e-4", "--min-lr", "3e-5", "--lr-decay-style", "cosine",
    "--lr-warmup-iters", "1", "--train-iters", "3", "--mock-data", "--vocab-size", "4096",
    "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0", "--no-loss-curve",
]


def _run(argv, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *argv,
           "--data-cache-path", str(tmp_path / "cache")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))


def test_llama3_8b_fp8_recipe_runs_from_the_script(tmp_path):
    result = _run(LLAMA3_8B_FP8_SHRUNK, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "8 of the 8 transformer-layer linears of this stage in FP8" in result.stdout
    losses = [float(v) for v in re.findall(r"lm loss: ([0-9.E+-]+)", result.stdout)]
    assert len(losses) == 3 and all(0 < v < 20 for v in losses), result.stdout[-2000:]


def test_fp8_param_gather_with_blockwise_is_refused_with_one_line(tmp_path):
    argv = list(LLAMA3_8B_FP8_SHRUNK)
    for flag in ("--fp8-amax-history-len", "--fp8-amax-compute-algo"):  # delayed-only flags
        i = argv.index(flag)
        del argv[i:i + 2]
    result = _run(argv + ["--fp8-recipe", "blockwise"], tmp_path)
    assert result.returncode == 2
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--fp8-param-gather" in errors[0] and "blockwise" in errors[0], errors
