"""Multi-GPU training throughput of whole models through pretrain_gpt.py: data, tensor, sequence,
expert and context parallelism side by side with the one-GPU run of the same model and flags.

Each row launches `torchrun --standalone --nproc-per-node N pretrain_gpt.py <model> <layout>` on
synthetic data (--mock-data), trains a few iterations and reads the training log's last interval
(after the warm-up interval): milliseconds per iteration, tokens/s per GPU, model TFLOP/s per GPU
and MFU as the product logs them (Megatron's FLOPs formula: causal attention at half, MoE active
parameters, context parallel counted on whole sequences), and peak allocated memory of the last
rank. "vs base" is the row's tokens/s per GPU over the suite's first row (one GPU, same model, same
per-replica batch), the scaling efficiency the issue targets are stated in.

Suites (rows needing more GPUs than --gpus are skipped):
  scaling  the 1.3B GPT (24 x 2048, 16 heads, seq 2048, vocab 50257, bf16, Adam, cuDNN attention,
           --torch-compile): dp 1/2/4 with and without overlapped gradient reduction, dp 2 with the
           distributed optimizer with and without overlapped reduce-scatter / parameter all-gather,
           dp 4 with the distributed optimizer and overlapped parameter gather, tp 2/4 with sequence parallelism,
           tp 2 x dp 2; tp 2 at micro batch 16; dp 1/2 without compile, with and without overlap.
           Every replica takes micro batch x micro-batches sequences.
  moe      a Mixtral-style MoE GPT (16 layers, hidden 2048, 16 heads / 8 query groups, RoPE,
           RMSNorm, SwiGLU, 8 experts of ffn 4096, top-2, aux loss, vocab 32000, untied, eager):
           ep 1 with the grouped GEMM and with the sequential experts, and compiled, also at micro
           batch 8 x 4 micro-batches (the per-step work on 3.6B parameters -- optimizer, gradient
           buffers -- spread over 4x the tokens); ep 2 and ep 4 (all-to-all), ep 2 and ep 4 with the
           all-gather dispatcher. Expert parallelism runs inside data parallelism.
  cp       the 1.3B GPT at seq 8192 / 16384 / 32768 (micro batch 1, eager) at cp 1, 2, 4 with the
           ring attention (--cp-comm-type p2p).

    python bench/bench_parallel.py --suite scaling moe cp --log-dir logs   # on a 4-GPU host
    python bench/bench_parallel.py --suite scaling --rows dp1 tp2-sp        # some rows
    python bench/bench_parallel.py --cpu-smoke                              # tiny models, gloo, CPU
    python bench/bench_parallel.py --suite scaling --profile --log-dir logs # plus hidden/exposed communication

--cpu-smoke runs every suite with tiny shapes on the CPU (gloo, --gpus processes at most, default 2) to check
that each row's flags train; its figures are not measurements.

--profile runs each row 3 iterations longer, after the measured interval (so neither the profiler nor
writing its trace touches the timings; --lr-decay-iters keeps the measured iterations' learning rate):
one profiler warm-up iteration, then two iterations traced on rank 0 with Gigatron's --profile
--use-pytorch-profiler, into <log-dir>/<suite>_<row>/ (a temporary directory without --log-dir).
gigatron.training.profiling.overlap_summary reads the trace and adds two columns, per iteration:
"comm ms/iter", the time the GPU runs NCCL kernels (every collective: gradient reduce-scatter /
all-reduce, parameter all-gather, and the row's tp/sp/ep/cp collectives), and "exposed comm
ms/iter", the part of it no compute kernel overlaps. On the CPU (--cpu-smoke) the same figures come
from the gloo worker threads against the operators' CPU time (not measurements either).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # gigatron.training.profiling for --profile

GPT_1P3B = ["--num-layers", "24", "--hidden-size", "2048", "--num-attention-heads", "16",
            "--vocab-size", "50257", "--attention-backend", "cudnn"]
MOE_SMALL = ["--num-layers", "16", "--hidden-size", "2048", "--num-attention-heads", "16",
             "--group-query-attention", "--num-query-groups", "8", "--position-embedding-type", "rope",
             "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
             "--untie-embeddings-and-output-weights", "--ffn-hidden-size", "4096", "--num-experts", "8",
             "--moe-router-topk", "2", "--moe-router-load-balancing-type", "aux_loss",
             "--moe-aux-loss-coeff", "1e-2", "--vocab-size", "32000", "--attention-backend", "cudnn"]
SMOKE_GPT = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--vocab-size", "4096"]
SMOKE_MOE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--group-query-attention",
             "--num-query-groups", "2", "--position-embedding-type", "rope", "--normalization", "RMSNorm",
             "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
             "--ffn-hidden-size", "128", "--num-experts", "4", "--moe-router-topk", "2",
             "--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", "1e-2", "--vocab-size", "4096"]
OVERLAP = ["--overlap-grad-reduce"]
DIST_OPT = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]


@dataclass
class Row:
    name: str
    gpus: int
    flags: list = field(default_factory=list)
    tp: int = 1
    cp: int = 1
    seq: Optional[int] = None
    compile: Optional[bool] = None
    """--torch-compile for this row (None: the suite's choice)."""
    mbs: Optional[int] = None
    """Micro batch of this row (None: the suite's)."""
    m: Optional[int] = None
    """Micro-batches per replica per iteration (None: the suite's)."""

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.cp)

    def layout(self) -> str:
        parts = [f"dp{self.dp}"]
        if self.tp > 1:
            parts.append(f"tp{self.tp}")
        if self.cp > 1:
            parts.append(f"cp{self.cp}")
        ep = _flag_value(self.flags, "--expert-model-parallel-size")
        if ep:
            parts.append(f"ep{ep}")
        return " x ".join(parts)


def _flag_value(flags: list, name: str) -> Optional[str]:
    return flags[flags.index(name) + 1] if name in flags else None


def _tp(n: int) -> list:
    return ["--tensor-model-parallel-size", str(n), "--sequence-parallel"]


def _ep(n: int) -> list:
    return ["--expert-model-parallel-size", str(n)]


def _cp(n: int) -> list:
    return ["--context-parallel-size", str(n), "--cp-comm-type", "p2p"]


SUITES = {
    "scaling": [
        Row("dp1", 1),
        Row("dp2", 2, OVERLAP),
        Row("dp2-no-overlap", 2),
        Row("dp2-dist-opt", 2, DIST_OPT),
        Row("dp2-dist-opt-no-overlap", 2, ["--use-distributed-optimizer"]),
        Row("dp4", 4, OVERLAP),
        Row("dp4-no-overlap", 4),
        Row("dp4-distopt", 4, DIST_OPT),
        Row("tp2-sp", 2, _tp(2), tp=2),
        Row("tp2-sp-mbs16", 2, _tp(2), tp=2, mbs=16),
        Row("dp2-eager", 2, OVERLAP, compile=False),
        Row("dp2-no-overlap-eager", 2, compile=False),
        Row("dp1-eager", 1, compile=False),
        Row("tp4-sp", 4, _tp(4), tp=4),
        Row("tp2-sp-dp2", 4, _tp(2) + OVERLAP, tp=2),
    ],
    "moe": [
        Row("ep1-grouped", 1, ["--moe-grouped-gemm", "--moe-token-dispatcher-type", "alltoall"]),
        Row("ep1-sequential", 1, ["--moe-token-dispatcher-type", "alltoall"]),
        Row("ep1-grouped-compile", 1, ["--moe-grouped-gemm", "--moe-token-dispatcher-type", "alltoall"], compile=True),
        Row("ep1-grouped-compile-mbs8x4", 1, ["--moe-grouped-gemm", "--moe-token-dispatcher-type", "alltoall"],
            compile=True, mbs=8, m=4),
        Row("ep2-alltoall", 2, _ep(2) + ["--moe-grouped-gemm", "--moe-token-dispatcher-type", "alltoall"] + OVERLAP),
        Row("ep4-alltoall", 4, _ep(4) + ["--moe-grouped-gemm", "--moe-token-dispatcher-type", "alltoall"] + OVERLAP),
        Row("ep2-allgather", 2, _ep(2) + ["--moe-grouped-gemm", "--moe-token-dispatcher-type", "allgather"] + OVERLAP),
        Row("ep4-allgather", 4, _ep(4) + ["--moe-grouped-gemm", "--moe-token-dispatcher-type", "allgather"] + OVERLAP),
    ],
    "cp": [
        Row("cp1-8k", 1, seq=8192),
        Row("cp1-16k", 1, seq=16384),
        Row("cp1-32k", 1, seq=32768),
        Row("cp2-16k", 2, _cp(2), cp=2, seq=16384),
        Row("cp2-32k", 2, _cp(2), cp=2, seq=32768),
        Row("cp4-8k", 4, _cp(4), cp=4, seq=8192),
        Row("cp4-16k", 4, _cp(4), cp=4, seq=16384),
        Row("cp4-32k", 4, _cp(4), cp=4, seq=32768),
    ],
}

# Per suite: model flags, sequence length, micro batch, micro-batches per replica, torch.compile.
FULL = {
    "scaling": dict(model=GPT_1P3B, seq=2048, mbs=8, m=2, compile=True),
    "moe": dict(model=MOE_SMALL, seq=2048, mbs=4, m=2, compile=False),
    "cp": dict(model=GPT_1P3B, seq=8192, mbs=1, m=2, compile=False),
}
SMOKE = {
    "scaling": dict(model=SMOKE_GPT, seq=64, mbs=2, m=2, compile=False),
    "moe": dict(model=SMOKE_MOE, seq=64, mbs=2, m=2, compile=False),
    "cp": dict(model=SMOKE_GPT, seq=64, mbs=1, m=2, compile=False),
}
SMOKE_SEQ = {8192: 64, 16384: 128, 32768: 256}

_FIELDS = {
    "ms_per_iter": r"elapsed time per iteration \(ms\): ([\d.]+)",
    "tokens_per_gpu": r"tokens per second per device: ([\d.]+)",
    "tflops_per_gpu": r"model TFLOP/s per device: ([\d.]+)",
    "mfu": r"MFU: ([\d.]+)%",
    "peak_gib": r"peak allocated memory \(GiB\): ([\d.]+)",
    "loss": r"lm loss: ([\d.E+-]+)",
}


def parse_log(text: str, iteration: Optional[int] = None) -> Optional[dict]:
    """The figures of the last training log line, or of the line of `iteration` (None when the run
    logged no such iteration)."""
    lines = [line for line in text.splitlines() if re.search(r"iteration\s+\d+/\s*\d+ \|", line)]
    if iteration is not None:
        lines = [line for line in lines if re.search(rf"iteration\s+{iteration}/", line)]
    if not lines:
        return None
    result = {}
    for key, pattern in _FIELDS.items():
        match = re.search(pattern, lines[-1])
        result[key] = float(match.group(1)) if match else None
    return result


def profile_window(args) -> tuple[int, int]:
    """--profile: the iteration counts [start, end) traced, after the measured interval and one
    profiler warm-up iteration."""
    return args.train_iters + 1, args.train_iters + 3


def row_seq(row: Row, suite: dict, smoke: bool) -> int:
    """The sequence length a row trains at (rows with their own length run a short one in --smoke)."""
    if smoke and row.seq:
        return SMOKE_SEQ.get(row.seq, 64)
    return row.seq or suite["seq"]


def command(row: Row, suite: dict, args, smoke: bool, trace_dir: Optional[str] = None) -> list:
    seq = row_seq(row, suite, smoke)
    mbs = row.mbs or suite["mbs"]
    gbs = mbs * (row.m or suite["m"]) * row.dp
    log_interval = args.train_iters // 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={row.gpus}",
           os.path.join(ROOT, "pretrain_gpt.py"), *suite["model"],
           "--seq-length", str(seq), "--max-position-embeddings", str(seq),
           "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs),
           "--train-iters", str(args.train_iters), "--log-interval", str(log_interval),
           "--eval-iters", "0", "--mock-data", "--lr", "1e-4", "--min-lr", "1e-5", "--lr-decay-style", "cosine",
           "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--log-throughput", "--seed", "1234",
           "--distributed-timeout-minutes", "5", *row.flags]
    if trace_dir is not None:
        start, end = profile_window(args)
        cmd[cmd.index("--train-iters") + 1] = str(end)
        cmd += ["--lr-decay-iters", str(args.train_iters), "--profile", "--use-pytorch-profiler",
                "--profile-step-start", str(start), "--profile-step-end", str(end), "--profile-ranks", "0",
                "--tensorboard-dir", trace_dir]
    if smoke:
        cmd += ["--attention-backend", "math"]
    else:
        cmd += ["--bf16"]
        if suite["compile"] if row.compile is None else row.compile:
            cmd += ["--torch-compile"]
    return cmd


def run_row(row: Row, suite_name: str, suite: dict, args, smoke: bool, trace_root: Optional[str] = None) -> dict:
    trace_dir = trace_path = None
    if trace_root is not None:
        from gigatron.training.profiling import trace_file_name

        trace_dir = os.path.join(trace_root, f"{suite_name}_{row.name}")
        trace_path = os.path.join(trace_dir, trace_file_name(0, *profile_window(args)))
        if os.path.exists(trace_path):  # an earlier run's trace must not stand in for this one's
            os.remove(trace_path)
    cmd = command(row, suite, args, smoke, trace_dir)
    env = dict(os.environ)
    if smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        output, returncode = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        output += (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        returncode = "timeout"
    wall = time.perf_counter() - start
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
        with open(os.path.join(args.log_dir, f"{suite_name}_{row.name}.log"), "w") as f:
            f.write(" ".join(cmd) + "\n\n" + output)
    figures = parse_log(output, args.train_iters) or {}
    status = "ok" if returncode == 0 and figures else f"failed ({returncode})"
    if trace_path is not None:
        figures.update(profile_figures(trace_path, args.log_dir is not None))
        if status == "ok" and figures["comm_ms_per_iter"] is None:
            status = "no trace"
    if status != "ok":
        tail = "\n".join(line for line in output.splitlines()[-400:] if "Error" in line or "error" in line)
        print(f"  {row.name}: {status}; {tail[-1500:] or output[-1500:]}", flush=True)
    return dict(suite=suite_name, row=row.name, gpus=row.gpus, layout=row.layout(), seq=row_seq(row, suite, smoke),
                status=status, wall_s=round(wall, 1), **figures)


def profile_figures(trace_path: str, keep: bool) -> dict:
    """The communication columns of one row from its rank-0 trace (None when there is no trace)."""
    from gigatron.training.profiling import overlap_summary

    if not os.path.exists(trace_path):
        return dict(comm_ms_per_iter=None, exposed_comm_ms_per_iter=None, comm_timeline=None, trace=None)
    summary = overlap_summary(trace_path)
    return dict(comm_ms_per_iter=round(summary["comm_ms"], 3),
                exposed_comm_ms_per_iter=round(summary["exposed_comm_ms"], 3),
                comm_timeline=summary["timeline"], trace=trace_path if keep else None)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: list, device: str) -> str:
    lines = [f"device: {device}", ""]
    for suite_name in dict.fromkeys(r["suite"] for r in results):
        rows = [r for r in results if r["suite"] == suite_name]
        base = next((r for r in rows if r["status"] == "ok" and r["gpus"] == 1), None)
        profiled = any("comm_ms_per_iter" in r for r in rows)
        lines.append(f"suite {suite_name}")
        lines.append("| row | GPUs | layout | seq | ms/iter | tokens/s/GPU | TFLOP/s/GPU | MFU % | vs base | "
                     + ("comm ms/iter | exposed comm ms/iter | " if profiled else "") + "peak alloc GiB | status |")
        lines.append("|---" * (13 if profiled else 11) + "|")
        for r in rows:
            tok = r.get("tokens_per_gpu")
            if base is not None and tok is not None and base.get("tokens_per_gpu"):
                ratio = tok / base["tokens_per_gpu"]
                if suite_name == "cp":  # the cp target compares with the shortest sequence at cp 1
                    ratio = r.get("tflops_per_gpu", 0) / base["tflops_per_gpu"] if base.get("tflops_per_gpu") else None
                vs = _fmt(None if ratio is None else 100 * ratio, ".1f") + ("%" if ratio is not None else "")
            else:
                vs = "-"
            comm = (f"{_fmt(r.get('comm_ms_per_iter'), '.2f')} | {_fmt(r.get('exposed_comm_ms_per_iter'), '.2f')} | "
                    if profiled else "")
            lines.append(f"| {r['row']} | {r['gpus']} | {r['layout']} | {r['seq']} | {_fmt(r.get('ms_per_iter'), '.1f')} | "
                         f"{_fmt(tok, '.0f')} | {_fmt(r.get('tflops_per_gpu'), '.1f')} | {_fmt(r.get('mfu'), '.1f')} | "
                         f"{vs} | {comm}{_fmt(r.get('peak_gib'), '.1f')} | {r['status']} |")
        lines.append("")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", nargs="+", default=["scaling"], choices=sorted(SUITES))
    parser.add_argument("--rows", nargs="+", default=None, help="names of rows to run (default: all of the suites)")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs available (default: all visible)")
    parser.add_argument("--train-iters", type=int, default=10,
                        help="iterations per row; the log's second half (after warm-up) is reported")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a row is abandoned")
    parser.add_argument("--log-dir", default=None, help="write each row's full output here")
    parser.add_argument("--json", default=None, help="also write the results here (atomically)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU (gloo): checks the rows run")
    parser.add_argument("--profile", action="store_true",
                        help="trace two more iterations on rank 0 after the measured ones (torch.profiler) and add "
                             "the columns 'comm ms/iter' and 'exposed comm ms/iter' (communication no compute hides)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="print one table from the --json files of earlier runs (e.g. the one-GPU rows "
                             "run apart from the multi-GPU rows) and run nothing")
    args = parser.parse_args()
    if args.merge:
        results, devices = [], []
        for path in args.merge:
            with open(path) as f:
                data = json.load(f)
            results += data["results"]
            devices.append(data["device"])
        order = {name: i for i, name in enumerate(r.name for rows in SUITES.values() for r in rows)}
        results.sort(key=lambda r: (list(SUITES).index(r["suite"]), order.get(r["row"], len(order))))
        print_table(results, "; ".join(dict.fromkeys(devices)))
        return
    if args.train_iters < 4 or args.train_iters % 2:
        parser.error("--train-iters must be an even number >= 4 (half warm-up, half measured)")

    smoke = args.cpu_smoke
    if smoke:
        gpus, device = args.gpus or 2, "CPU (smoke: not a measurement)"
    else:
        import torch
        if not torch.cuda.is_available():
            parser.error("no CUDA device; use --cpu-smoke on a machine without GPUs")
        gpus = args.gpus or torch.cuda.device_count()
        device = f"{torch.cuda.get_device_name(0)} x {gpus}"
    trace_root, temporary = None, None
    if args.profile:
        if args.log_dir:
            trace_root = args.log_dir
        else:
            temporary = tempfile.TemporaryDirectory(prefix="bench_parallel_traces_")
            trace_root = temporary.name
            print("--profile without --log-dir: the traces are deleted at the end; add --log-dir to keep them",
                  flush=True)
    results = []
    for suite_name in args.suite:
        suite = (SMOKE if smoke else FULL)[suite_name]
        for row in SUITES[suite_name]:
            if args.rows and row.name not in args.rows:
                continue
            if row.gpus > gpus:
                print(f"skipping {suite_name}/{row.name}: needs {row.gpus} GPUs, {gpus} available", flush=True)
                continue
            print(f"running {suite_name}/{row.name} on {row.gpus} {'processes' if smoke else 'GPUs'} ...", flush=True)
            result = run_row(row, suite_name, suite, args, smoke, trace_root)
            comm = ""
            if args.profile:
                comm = (f"{_fmt(result.get('comm_ms_per_iter'), '.2f')} comm ms/iter "
                        f"({_fmt(result.get('exposed_comm_ms_per_iter'), '.2f')} exposed), ")
            print(f"  {row.name}: {result['status']}, {_fmt(result.get('tokens_per_gpu'), '.0f')} tokens/s/GPU, "
                  f"{_fmt(result.get('mfu'), '.1f')}% MFU, {comm}{result['wall_s']} s", flush=True)
            results.append(result)
    if temporary is not None:
        temporary.cleanup()
    table = print_table(results, device)
    if args.json:
        from gigatron.core.checkpoint.io import atomic_write_text  # the parent only launches: torch on demand
        atomic_write_text(args.json, json.dumps(dict(device=device, results=results, table=table), indent=1))
    if any(r["status"] != "ok" for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
