"""The training scripts report a user's mistake as one `error:` line (exit status 2), not a traceback."""

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from script_server import run_python  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "16",
         "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3", "--mock-data", "--vocab-size", "4096"]


def _run(argv, env_extra=None):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("GIGATRON_DEBUG", None)
    env.update(env_extra or {})
    if argv[0] == "-m":
        return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    return run_python(argv, timeout=120, env=env, cwd=ROOT)  # a script forked with torch imported already


@pytest.mark.parametrize("script, argv, message", [
    ("pretrain_gpt.py", MODEL + ["--fp16", "--bf16"], "--bf16 and --fp16 cannot both be set"),
    ("pretrain_gpt.py", MODEL + ["--tensor-model-parallel-size", "2"], "world size (1) is not divisible"),
    ("pretrain_bert.py", MODEL + ["--num-tokentypes", "-1", "--tokenizer-type", "BertWordPieceLowerCase",
                                  "--vocab-file", "/nonexistent/vocab.txt"], "vocab"),
    ("pretrain_t5.py", MODEL, "T5 needs --decoder-seq-length"),
    # Without a tokenizer flag, pretrain_gpt.py takes Megatron's default GPT2BPETokenizer, which needs its files.
    ("pretrain_gpt.py", MODEL[:-2], "--tokenizer-type GPT2BPETokenizer needs --vocab-file"),
    ("pretrain_gpt.py", MODEL + ["--use-checkpoint-args"], "--use-checkpoint-args reads the model flags from the "
                                                           "checkpoint in --load; give --load DIR"),
    ("-m", ["gigatron.training.entry"] + MODEL + ["--min-lr", "1"], "--min-lr (1.0) must not exceed --lr"),
], ids=["gpt-precision", "gpt-world-size", "bert-missing-vocab", "t5-lengths", "gpt-no-tokenizer",
        "use-checkpoint-args-without-load",
        "entry-module"])
def test_a_bad_flag_combination_is_one_error_line(script, argv, message):
    result = _run([script, *argv] if script != "-m" else ["-m", *argv])
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback():
    result = _run(["pretrain_gpt.py", *MODEL, "--fp16", "--bf16"], {"GIGATRON_DEBUG": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr
