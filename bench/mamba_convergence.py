"""Convergence of a hybrid Mamba model against a GPT of about the same size, on the same real text
for the same tokens, on the CPU.

    python bench/mamba_convergence.py --work-dir conv_out [--iters 150] \
        [--png bench/results/mamba_convergence_cpu.png]

The data is the quickstart's (quickstart.sh): the pydoc corpus of tools/make_corpus.py, a 4096-entry
byte-level BPE tokenizer trained on it and a Megatron .bin/.idx dataset (each step is skipped when
its output already exists in --work-dir). Then two runs with the same data flags, batch, learning
rate schedule and seed:

  GPT     pretrain_gpt.py: 4 layers, hidden 192, 4 heads, learned positions (the quickstart's model);
  hybrid  pretrain_mamba.py: 8 layers, hidden 192 allocated by --hybrid-attention-ratio 0.125
          --hybrid-mlp-ratio 0.375 (Megatron's hybrid recipe shape: Mamba-2 layers with one attention
          layer and MLP layers between them), Mamba head dim 32, state 32, 2 groups, no position
          embedding (as Megatron's hybrid recipe).

Both validation-loss curves (and the training losses, thin) are drawn into one PNG with matplotlib;
a JSON beside it holds the curves, the parameter counts, the wall time and the final losses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

HIDDEN = 192
COMMON_MODEL = ["--hidden-size", str(HIDDEN), "--num-attention-heads", "4", "--seq-length", "128",
                "--max-position-embeddings", "128", "--attention-dropout", "0", "--hidden-dropout", "0"]
GPT_MODEL = ["--num-layers", "4"]
HYBRID_MODEL = ["--num-layers", "8", "--hybrid-attention-ratio", "0.125", "--hybrid-mlp-ratio", "0.375",
                "--is-hybrid-model", "--mamba-head-dim", "32", "--mamba-state-dim", "32", "--mamba-num-groups", "2",
                "--position-embedding-type", "none", "--normalization", "RMSNorm"]


def _run(cmd, log_path=None, env=None):
    print("+", " ".join(cmd), flush=True)
    if log_path is None:
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        return
    with open(log_path, "w", encoding="utf-8") as log:
        result = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        with open(log_path, encoding="utf-8") as log:
            tail = log.read()[-3000:]
        raise SystemExit(f"{cmd[1]} failed (exit {result.returncode}); the end of {log_path}:\n{tail}")


def build_data(work: str) -> tuple[str, str]:
    """The quickstart's corpus, tokenizer and dataset in `work` -> (data prefix, tokenizer.json)."""
    corpus = os.path.join(work, "corpus.jsonl")
    tokenizer = os.path.join(work, "tokenizer", "tokenizer.json")
    prefix = os.path.join(work, "data", "pydoc")
    if not (os.path.exists(corpus) and os.path.getsize(corpus) > 0):
        _run([sys.executable, "tools/make_corpus.py", "--output", corpus, "--target-mb", "6"])
    if not os.path.exists(tokenizer):
        _run([sys.executable, "tools/train_tokenizer.py", "--input", corpus, "--vocab-size", "4096",
              "--output-dir", os.path.dirname(tokenizer)])
    if not os.path.exists(prefix + "_text_document.idx"):
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        _run([sys.executable, "tools/preprocess_data.py", "--input", corpus, "--output-prefix", prefix,
              "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer, "--append-eod",
              "--workers", "1", "--log-interval", "1000"])
    return prefix + "_text_document", tokenizer


def train_flags(data: str, tokenizer: str, iters: int, eval_interval: int, out: str) -> list:
    return ["--micro-batch-size", "16", "--global-batch-size", "16", "--train-iters", str(iters),
            "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", str(max(1, min(20, iters // 5))),
            "--weight-decay", "0.1", "--clip-grad", "1.0", "--seed", "1234",
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer,
            "--data-path", data, "--split", "95,5,0", "--num-workers", "0", "--data-cache-path",
            os.path.join(out, "cache"), "--log-interval", "10", "--eval-interval", str(eval_interval),
            "--eval-iters", "10", "--no-loss-curve"]


def parameter_count(log_path: str) -> int | None:
    """The model's parameter count as the training log states it."""
    import re

    with open(log_path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            match = re.search(r"number of parameters[^:]*:\s*([0-9,]+)", line)
            if match:
                return int(match.group(1).replace(",", ""))
    return None


def plot(curves: dict, path: str, title: str) -> None:
    """Both runs' training and validation curves in one PNG."""
    from gigatron.training.logging import write_loss_curves

    write_loss_curves(path, {label: (sorted(c["train"].items()), sorted(c["valid"].items()))
                             for label, c in curves.items()}, title, xlabel="iteration (16 x 128 tokens each)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="mamba_convergence_out", help="data, logs and checkpoints")
    parser.add_argument("--iters", type=int, default=150, help="training iterations of each model")
    parser.add_argument("--eval-interval", type=int, default=25)
    parser.add_argument("--png", default=os.path.join(HERE, "results", "mamba_convergence_cpu.png"))
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the training runs")
    args = parser.parse_args(argv)
    from tools.plot_loss import parse_log

    work = os.path.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    data, tokenizer = build_data(work)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=ROOT)
    runs = {"GPT": ("pretrain_gpt.py", GPT_MODEL), "hybrid": ("pretrain_mamba.py", HYBRID_MODEL)}
    curves, summary = {}, {}
    for label, (script, model) in runs.items():
        out = os.path.join(work, label)
        os.makedirs(out, exist_ok=True)
        log_path = os.path.join(out, "train.log")
        start = time.time()
        _run([sys.executable, script] + COMMON_MODEL + model
             + train_flags(data, tokenizer, args.iters, args.eval_interval, out), log_path, env)
        seconds = time.time() - start
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            train, valid = parse_log(handle)
        if not valid:
            raise SystemExit(f"{log_path} holds no validation loss")
        curves[label] = {"train": train, "valid": valid}
        last = max(valid)
        summary[label] = {"script": script, "flags": COMMON_MODEL + model, "parameters": parameter_count(log_path),
                          "seconds": round(seconds, 1), "final_validation_loss": valid[last],
                          "final_iteration": last, "validation": valid, "training": train}
        print(f"{label}: validation loss {valid[last]:.4f} at iteration {last} ({seconds:.0f} s)", flush=True)
    tokens = args.iters * 16 * 128
    plot(curves, args.png, f"hybrid Mamba vs GPT on the pydoc corpus ({tokens:,} tokens each, CPU)")
    json_path = os.path.splitext(args.png)[0] + ".json"
    with open(json_path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump({"tokens_per_model": tokens, "runs": summary}, handle, indent=1)
    os.replace(json_path + ".tmp", json_path)
    print(f"wrote {args.png} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
