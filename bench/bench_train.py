"""Training speed through `pretrain_gpt.py` itself: ms/iter, tokens/s, TFLOP/s, MFU and peak memory.

Each configuration runs `pretrain_gpt.py` in a subprocess with Megatron's flags, --mock-data, bf16
and --log-interval 1, and reads the per-iteration times the training log prints. The row's
ms/iter is the median over the steady iterations (the first --warmup iterations, and with
--torch-compile the compiling ones, are dropped). FLOPs per iteration come from the product's
formula (gigatron/core/flops.py, Megatron's convention: causal attention at half, no recompute),
and MFU divides by `device_peak_flops` of the card found (H100 SXM / H200 bf16: 989.4 TFLOP/s).
Peak memory is the largest "peak allocated memory" the log reports; the last loss (lm loss of the
last iteration, same seed and data in every row of a configuration) shows that an option kept the
numerics.

    python bench/bench_train.py                          # every configuration (one H100: ~8 min)
    python bench/bench_train.py --configs gpt1p3b_mb4,gpt1p3b_mb4_compile --iters 20
    python bench/bench_train.py --configs gpt1p3b_mb4 --extra-args="--cross-entropy-loss-fusion"
    python bench/bench_train.py --profile gpt1p3b_mb4    # + top kernels grouped by kind
    python bench/bench_train.py --tiny                   # a tiny CPU run (seconds; the smoke test)
    python bench/bench_train.py --list

The configurations (issue 21):
  gpt1p3b_mb{1,2,4,8}[_compile]  GPT 1.3B: 24 layers, hidden 2048, 16 heads, seq 2048, global
                                 batch 16, vocabulary 50257 (padded 50304), LayerNorm, GeLU, learned
                                 positions, tied embeddings, no dropout
  gpt350m_mb{4}[_compile]        GPT 350M: 24 layers, hidden 1024, 16 heads, seq 1024, global batch 16
  llama8b_8l                     Llama-3-8B-shaped stack of 8 layers: hidden 4096, FFN 14336, 32
                                 heads, GQA 8 groups, RMSNorm, SwiGLU, RoPE, no biases, untied
                                 embeddings, seq 4096, vocabulary 128256, micro batch 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@dataclass
class Shape:
    """What the FLOP formula needs of a model (the fields of TransformerConfig it reads)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    seq_length: int
    padded_vocab: int
    ffn_hidden_size: Optional[int] = None
    num_query_groups: Optional[int] = None
    swiglu: bool = False

    def flops_config(self) -> SimpleNamespace:
        ffn = self.ffn_hidden_size or 4 * self.hidden_size
        groups = self.num_query_groups or self.num_attention_heads
        return SimpleNamespace(
            hidden_size=self.hidden_size, num_layers=self.num_layers, num_attention_heads=self.num_attention_heads,
            num_query_groups=groups, group_query_attention=self.num_query_groups is not None,
            kv_channels=self.hidden_size // self.num_attention_heads, swiglu=self.swiglu, ffn_hidden_size=ffn)

    def flags(self) -> list[str]:
        out = ["--num-layers", str(self.num_layers), "--hidden-size", str(self.hidden_size),
               "--num-attention-heads", str(self.num_attention_heads), "--seq-length", str(self.seq_length),
               "--max-position-embeddings", str(self.seq_length)]
        if self.ffn_hidden_size is not None:
            out += ["--ffn-hidden-size", str(self.ffn_hidden_size)]
        if self.num_query_groups is not None:
            out += ["--group-query-attention", "--num-query-groups", str(self.num_query_groups)]
        return out


@dataclass
class BenchConfig:
    name: str
    shape: Shape
    micro_batch_size: int
    global_batch_size: int
    vocab_size: int  # the NullTokenizer's --vocab-size (the tokenizer adds one end-of-document id)
    flags: list[str] = field(default_factory=list)
    compile: bool = False
    bf16: bool = True

    def command(self, iters: int, extra: list[str]) -> list[str]:
        cmd = [sys.executable, os.path.join(ROOT, "pretrain_gpt.py")] + self.shape.flags() + [
            "--micro-batch-size", str(self.micro_batch_size), "--global-batch-size", str(self.global_batch_size),
            "--train-iters", str(iters), "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000000",
            "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(self.vocab_size),
            "--lr", "1.0e-4", "--min-lr", "1.0e-5", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
            "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--clip-grad", "1.0",
            "--init-method-std", "0.02", "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
            "--seed", "1234", "--no-loss-curve"]
        if self.bf16:
            cmd.append("--bf16")
        if self.compile:
            cmd.append("--torch-compile")
        return cmd + self.flags + extra


GPT_1P3B = Shape(24, 2048, 16, 2048, padded_vocab=50304)
GPT_350M = Shape(24, 1024, 16, 1024, padded_vocab=50304)
LLAMA_8B_8L = Shape(8, 4096, 32, 4096, padded_vocab=128256, ffn_hidden_size=14336, num_query_groups=8, swiglu=True)
LLAMA_FLAGS = ["--normalization", "RMSNorm", "--norm-epsilon", "1e-5", "--swiglu", "--position-embedding-type",
               "rope", "--rotary-base", "500000", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
               "--make-vocab-size-divisible-by", "128"]
TINY = Shape(2, 64, 4, 64, padded_vocab=1024)


def all_configs() -> dict[str, BenchConfig]:
    configs = {}
    for mbs in (1, 2, 4, 8):
        for compiled in (False, True):
            name = f"gpt1p3b_mb{mbs}" + ("_compile" if compiled else "")
            configs[name] = BenchConfig(name, GPT_1P3B, mbs, 16, 50256, compile=compiled)
    for compiled in (False, True):
        name = "gpt350m_mb4" + ("_compile" if compiled else "")
        configs[name] = BenchConfig(name, GPT_350M, 4, 16, 50256, compile=compiled)
    configs["llama8b_8l"] = BenchConfig("llama8b_8l", LLAMA_8B_8L, 1, 8, 128255, flags=list(LLAMA_FLAGS))
    return configs


def tiny_config() -> BenchConfig:
    return BenchConfig("tiny_cpu", TINY, 2, 4, 1000, bf16=False)


# ------------------------------------------------------------------ the training log

_ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+)")
_PEAK = re.compile(r"peak allocated memory \(GiB\): ([0-9.]+)")
_RSS = re.compile(r"peak RSS \(GiB\): ([0-9.]+)")
_LOSS = re.compile(r"lm loss: ([0-9.Ee+-]+)")


def parse_log(text: str) -> dict:
    """Per-iteration times {iteration: ms}, the largest peak memory (GiB) and the last loss."""
    times, peak, loss = {}, None, None
    for line in text.splitlines():
        m = _ITERATION.search(line)
        if m is None:
            continue
        times[int(m.group(1))] = float(m.group(2))
        mem = _PEAK.search(line) or _RSS.search(line)
        if mem is not None:
            peak = max(peak or 0.0, float(mem.group(1)))
        lm = _LOSS.search(line)
        if lm is not None:
            loss = float(lm.group(1))
    return {"times": times, "peak_gib": peak, "loss": loss}


def steady_median(times: dict[int, float], warmup: int) -> Optional[float]:
    steady = [ms for it, ms in sorted(times.items()) if it > warmup]
    if not steady:
        steady = list(times.values())
    return statistics.median(steady) if steady else None


# ------------------------------------------------------------------ one run

def iteration_flops(config: BenchConfig) -> float:
    from gigatron.core.flops import num_floating_point_operations

    shape = config.shape
    return num_floating_point_operations(shape.flops_config(), shape.padded_vocab, config.global_batch_size,
                                         shape.seq_length)


def run_config(config: BenchConfig, iters: int, warmup: int, extra: list[str], timeout: float,
               profile_dir: Optional[str] = None, verbose: bool = False) -> dict:
    cmd = config.command(iters, extra)
    if profile_dir is not None:
        start = max(warmup, iters - 3)
        cmd += ["--profile", "--use-pytorch-profiler", "--profile-step-start", str(start),
                "--profile-step-end", str(start + 2), "--profile-ranks", "0", "--tensorboard-dir", profile_dir]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    began = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
        output, status = done.stdout, done.returncode
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        status = "timeout"
    wall = time.perf_counter() - began
    if verbose:
        print(output)
    parsed = parse_log(output)
    row = {"config": config.name, "status": status, "wall_s": wall, "command": shlex.join(cmd)}
    if status != 0:
        row["error"] = "\n".join(output.splitlines()[-15:])
    skip = warmup + (2 if config.compile else 0)
    ms = steady_median(parsed["times"], skip)
    if ms is None:
        return row
    tokens = config.global_batch_size * config.shape.seq_length
    flops = iteration_flops(config)
    row.update(ms_per_iter=ms, tokens_per_s=tokens / (ms / 1000.0), tflops=flops / (ms / 1000.0) / 1e12,
               peak_gib=parsed["peak_gib"], loss=parsed["loss"], iterations=len(parsed["times"]))
    return row


# ------------------------------------------------------------------ profile breakdown

_CATEGORIES = (
    ("other", re.compile(r"nccl", re.I)),  # communication
    ("optimizer", re.compile(r"multi_tensor|foreach|adam|_amp_|optimizer|lerp", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|attn|sdpa|cudnn_generated_fort_native_sdpa", re.I)),
    ("GEMM", re.compile(r"gemm|xmma|cutlass|cublas|nvjet|matmul|sm\d+_|splitk|_mm_|wgmma", re.I)),
    ("norm+elementwise", re.compile(r"norm|elementwise|vectorized|triton|gelu|silu|swiglu|softmax|reduce|"
                                    r"copy|fill|cat|index|dropout|cross_entropy|unrolled|scatter|gather|"
                                    r"memcpy|memset|embedding|add|mul", re.I)),
)


def kernel_category(name: str) -> str:
    for category, pattern in _CATEGORIES:
        if pattern.search(name):
            return category
    return "other"


def profile_breakdown(trace_path: str, steps: int, top: int = 25) -> tuple[dict, list]:
    """(ms per step by category, the top kernels as (name, ms per step, launches, category))."""
    from gigatron.training.profiling import top_kernels

    kernels = top_kernels(trace_path, steps=steps, n=100000)
    by_category: dict[str, float] = {}
    for name, ms, _ in kernels:
        category = kernel_category(name)
        by_category[category] = by_category.get(category, 0.0) + ms
    rows = [(name, ms, launches, kernel_category(name)) for name, ms, launches in kernels[:top]]
    return by_category, rows


def print_profile(trace_dir: str, ms_per_iter: Optional[float]) -> None:
    traces = sorted(f for f in os.listdir(trace_dir) if f.endswith(".pt.trace.json"))
    if not traces:
        print(f"no trace written under {trace_dir}")
        return
    by_category, rows = profile_breakdown(os.path.join(trace_dir, traces[-1]), steps=2)
    busy = sum(by_category.values())
    total = busy or 1.0
    print(f"\nkernel time per iteration by kind (trace {traces[-1]}; device busy {busy:.1f} ms"
          + (f", iteration {ms_per_iter:.1f} ms" if ms_per_iter else "") + ")")
    for category in ("GEMM", "attention", "norm+elementwise", "optimizer", "other"):
        ms = by_category.get(category, 0.0)
        print(f"  {category:<18} {ms:9.2f} ms  {100.0 * ms / total:5.1f}%")
    print("\ntop kernels (ms per iteration, launches per iteration, kind):")
    for name, ms, launches, category in rows:
        print(f"  {ms:8.2f}  {launches:6.0f}  {category:<16}  {name[:90]}")


# ------------------------------------------------------------------ the table

def device_description() -> tuple[str, Optional[float]]:
    import torch

    from gigatron.core.flops import device_peak_flops

    if not torch.cuda.is_available():
        return "cpu", None
    peak = device_peak_flops(torch.device("cuda", 0), torch.bfloat16)
    return torch.cuda.get_device_name(0), (peak[0] if peak else None)


def format_table(rows: list[dict], card: str, peak_tflops: Optional[float]) -> str:
    header = (f"{'config':<22} {'ms/iter':>9} {'tokens/s':>11} {'TFLOP/s':>9} {'MFU':>7} {'peak GiB':>9} "
              f"{'last loss':>10}  card")
    lines = [header, "-" * len(header)]
    for row in rows:
        if "ms_per_iter" not in row:
            lines.append(f"{row['config']:<22} {'failed (' + str(row['status']) + ')':>9}")
            continue
        mfu = f"{100.0 * row['tflops'] / peak_tflops:6.1f}%" if peak_tflops else "    n/a"
        peak = f"{row['peak_gib']:9.2f}" if row.get("peak_gib") is not None else f"{'n/a':>9}"
        loss = f"{row['loss']:10.4f}" if row.get("loss") is not None else f"{'n/a':>10}"
        lines.append(f"{row['config']:<22} {row['ms_per_iter']:9.1f} {row['tokens_per_s']:11.0f} "
                     f"{row['tflops']:9.1f} {mfu:>7} {peak} {loss}  {card}")
    return "\n".join(lines)


def select(names: Optional[str], configs: dict[str, BenchConfig]) -> list[BenchConfig]:
    if not names:
        return list(configs.values())
    chosen = []
    for name in names.split(","):
        name = name.strip()
        if name not in configs:
            raise SystemExit(f"unknown configuration {name!r}; choose from: {', '.join(configs)} (--list)")
        chosen.append(configs[name])
    return chosen


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", help="comma-separated configuration names (default: all; see --list)")
    parser.add_argument("--iters", type=int, default=None, help="training iterations per run (default 12; tiny 6)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="iterations left out of the median (default 3; tiny 2)")
    parser.add_argument("--extra-args", default="", help="flags appended to every pretrain_gpt.py command")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run before it is stopped")
    parser.add_argument("--profile", metavar="CONFIG", help="run CONFIG once more with --profile "
                        "--use-pytorch-profiler and print its kernels grouped by kind")
    parser.add_argument("--tiny", action="store_true", help="one tiny fp32 configuration (runs on a CPU)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    parser.add_argument("--verbose", action="store_true", help="print each run's log")
    args = parser.parse_args(argv)

    configs = {"tiny_cpu": tiny_config()} if args.tiny else all_configs()
    if args.list:
        for config in configs.values():
            print(f"{config.name:<22} {shlex.join(config.command(args.iters or 12, []))}")
        return 0
    iters = args.iters or (6 if args.tiny else 12)
    warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 3)
    extra = shlex.split(args.extra_args)
    card, peak = device_description()
    rows = []
    chosen = select(args.configs, configs) if not (args.profile and not args.configs) else []
    for config in chosen:
        row = run_config(config, iters, warmup, extra, args.timeout, verbose=args.verbose)
        rows.append(row)
        status = f"{row['ms_per_iter']:.1f} ms/iter" if "ms_per_iter" in row else f"FAILED ({row['status']})"
        print(f"# {config.name}: {status}, run took {row['wall_s']:.0f} s", flush=True)
        if "error" in row:
            print(row["error"], flush=True)
    if rows:
        print()
        print(format_table(rows, card, peak))
    if args.profile:
        config = select(args.profile, configs)[0]
        with tempfile.TemporaryDirectory(prefix="bench_train_profile_") as trace_dir:
            row = run_config(config, max(iters, warmup + 4), warmup, extra, args.timeout, profile_dir=trace_dir,
                             verbose=args.verbose)
            if "error" in row:
                print(row["error"])
            print(f"\nprofile of {config.name} ({card}): {row.get('ms_per_iter', float('nan')):.1f} ms/iter "
                  "(profiled iterations included)")
            print_profile(trace_dir, row.get("ms_per_iter"))
        rows.append(dict(row, profiled=True))
    if args.json:
        payload = {"card": card, "peak_tflops": peak, "rows": rows}
        temporary = args.json + ".tmp"
        with open(temporary, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(temporary, args.json)
    failed = [r for r in rows if r["status"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
