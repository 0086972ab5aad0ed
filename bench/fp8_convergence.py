"""FP8 against bf16 convergence: the same GPT trained on the same text in bf16 and in each FP8 recipe.

Runs `pretrain_gpt.py` once per variant (all at once on one GPU by default: a ~350M model leaves
room for four), on a Megatron dataset of real text, with the same seed, data order and schedule,
then prints the validation losses side by side and draws them into one PNG.

Model (the issue's ~350M GPT): 24 layers, hidden 1024, 16 heads, sequence 1024, learned positions,
LayerNorm, GeLU, tied embeddings, bf16 with fp32 master weights, Adam, cosine schedule.

    python bench/fp8_convergence.py --data-path DIR/pydoc_text_document --tokenizer-model DIR/tok/tokenizer.json \\
        --iters 2000 --out fp8_conv
    python bench/fp8_convergence.py ... --variants bf16,tensorwise --sequential
    python bench/fp8_convergence.py --cpu-smoke --data-path ... --tokenizer-model ...   # tiny, on the CPU

The corpus used for the README figure: `tools/make_corpus.py --target-mb 30`, a 16384-entry BPE
from `tools/train_tokenizer.py`, `tools/preprocess_data.py --append-eod` (about 6.5M tokens).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from plot_loss import parse_log  # noqa: E402

VARIANTS = {
    "bf16": [],
    "tensorwise": ["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"],
    "delayed": ["--fp8-format", "hybrid", "--fp8-recipe", "delayed", "--fp8-amax-history-len", "1024",
                "--fp8-amax-compute-algo", "max"],
    "blockwise": ["--fp8-format", "e4m3", "--fp8-recipe", "blockwise"],
}

MODEL_350M = ["--num-layers", "24", "--hidden-size", "1024", "--num-attention-heads", "16", "--seq-length", "1024",
              "--max-position-embeddings", "1024", "--micro-batch-size", "4", "--global-batch-size", "8", "--bf16"]
MODEL_TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
              "--max-position-embeddings", "64", "--micro-batch-size", "2", "--global-batch-size", "4"]


def command(variant: str, args) -> list[str]:
    iters = args.iters
    model = MODEL_TINY if args.cpu_smoke else MODEL_350M
    return [sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *model, *VARIANTS[variant],
            "--train-iters", str(iters), "--lr", "3e-4", "--min-lr", "3e-5", "--lr-decay-style", "cosine",
            "--lr-warmup-iters", str(max(1, iters // 20)), "--weight-decay", "0.1", "--clip-grad", "1.0",
            "--adam-beta2", "0.95", "--attention-dropout", "0", "--hidden-dropout", "0", "--seed", "1234",
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", args.tokenizer_model,
            "--data-path", args.data_path, "--split", "98,2,0", "--num-workers", "0",
            "--log-interval", str(max(1, iters // 100)), "--eval-interval", str(args.eval_interval or max(1, iters // 20)),
            "--eval-iters", str(args.eval_iters), "--no-loss-curve",
            "--data-cache-path", os.path.join(args.out, "cache")] + ([] if args.cpu_smoke or args.no_compile
                                                                      else ["--torch-compile"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", required=True, help="Megatron dataset prefix (…_text_document)")
    parser.add_argument("--tokenizer-model", required=True, help="HuggingFace tokenizer.json of that dataset")
    parser.add_argument("--variants", default="bf16,tensorwise,delayed,blockwise",
                        help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--eval-interval", type=int, default=None, help="default: iters / 20")
    parser.add_argument("--eval-iters", type=int, default=10)
    parser.add_argument("--sequential", action="store_true", help="one run after the other instead of all at once")
    parser.add_argument("--no-compile", action="store_true", help="without --torch-compile")
    parser.add_argument("--out", default="fp8_convergence", help="logs, table and PNG go here")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU (checks the script)")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    os.makedirs(args.out, exist_ok=True)

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.time()
    procs = {}
    for variant in variants:
        log = open(os.path.join(args.out, f"{variant}.log"), "w")
        cmd = command(variant, args)
        procs[variant] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=args.out), log)
        print(f"started {variant}: {' '.join(cmd[1:6])} ...", flush=True)
        if args.sequential:
            procs[variant][0].wait()
    failed = []
    for variant, (proc, log) in procs.items():
        code = proc.wait()
        log.close()
        if code != 0:
            failed.append(variant)
    minutes = (time.time() - started) / 60
    curves = {}
    for variant in variants:
        with open(os.path.join(args.out, f"{variant}.log")) as f:
            curves[variant] = parse_log(f)
    if failed:
        print(f"runs failed: {failed} (see {args.out}/<variant>.log)")
    print(f"\nFP8 convergence, {args.iters} iterations, {minutes:.1f} min wall")
    base = curves.get("bf16", (None, {}))[1]
    header = f"{'iteration':>9} | " + " | ".join(f"{v:>10}" for v in variants)
    print(header + ("" if not base else " | vs bf16 at the end"))
    iterations = sorted({i for _, valid in curves.values() for i in valid})
    for it in iterations:
        print(f"{it:>9} | " + " | ".join(f"{curves[v][1].get(it, float('nan')):>10.4f}" for v in variants))
    if base and iterations:
        last = iterations[-1]
        for v in variants:
            if v != "bf16" and last in curves[v][1] and last in base:
                diff = (curves[v][1][last] - base[last]) / base[last] * 100
                print(f"  {v}: final validation loss {curves[v][1][last]:.4f} vs bf16 {base[last]:.4f} ({diff:+.2f}%)")
    _plot(curves, os.path.join(args.out, "fp8_convergence.png"), args.iters)
    return 1 if failed else 0


def _plot(curves: dict, path: str, iters: int) -> None:
    from gigatron.training.logging import write_loss_curves

    write_loss_curves(path, {variant: (sorted(train.items()), sorted(valid.items()))
                             for variant, (train, valid) in curves.items()},
                      f"GPT ~350M, bf16 vs FP8 recipes ({iters} iterations)")
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
