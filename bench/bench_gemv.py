"""One-row matrix-vector products of a decode step: the Triton GEMV against cuBLAS (F.linear).

For each weight shape of the 1.3B GPT (QKV 6144 x 2048, attention output 2048 x 2048, MLP
8192 x 2048 and 2048 x 8192, logits 50304 x 2048) and of a Llama-style 7B-class layer (for scale),
both kernels run 50 times inside one CUDA graph (launches cost what they cost in the engine's
captured decode step), cycling through copies of the weight that together exceed the L2 cache, so
every call reads its weight from HBM as a decode step does. The table gives microseconds per
call, the weight-read bandwidth (weight bytes / time) and that bandwidth as a fraction of a large
device-to-device copy measured in the same run. The outputs are compared (max abs difference relative to the output's
scale) before timing.

    python bench/bench_gemv.py                 # GPU, bf16
    python bench/bench_gemv.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_decode import measure_bandwidth  # noqa: E402  (this script's folder is on sys.path)
from gigatron.core.checkpoint.io import atomic_write_text  # noqa: E402
from gigatron.core.ops.gemv import linear_one_row  # noqa: E402

L2_FLUSH_BYTES = 400 * 10**6  # the weight copies one timed graph cycles through

SHAPES = [  # (name, N, K, bias)
    ("1.3B qkv", 6144, 2048, True),
    ("1.3B proj", 2048, 2048, False),
    ("1.3B fc1", 8192, 2048, True),
    ("1.3B fc2", 2048, 8192, False),
    ("1.3B logits", 50304, 2048, False),
    ("7B qkv", 12288, 4096, False),
    ("7B fc2", 4096, 11008, False),
]


def graph_time(fn, calls: int = 50, repeats: int = 5) -> float:
    """Seconds per call of fn(i), i = 0..calls-1, replayed from one CUDA graph (best of repeats)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000.0 / calls)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="also write the rows here (atomically)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gemv.py needs a GPU (the Triton GEMV is CUDA-only)")
    torch.manual_seed(0)
    bandwidth = measure_bandwidth(torch.device("cuda"), 4.0)
    print(f"device {torch.cuda.get_device_name()} | copy bandwidth {bandwidth / 1e9:.1f} GB/s | bf16, one row")
    print("| shape | N x K | MB | cuBLAS us | cuBLAS GB/s | cuBLAS frac | Triton us | Triton GB/s | Triton frac "
          "| speed-up | max rel diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    with torch.no_grad():
        for name, n, k, has_bias in SHAPES:
            # Enough copies of the weight that each call reads it from HBM, not from the 50 MB L2
            # (as in a decode step, where every layer's weights differ).
            copies = max(2, -(-L2_FLUSH_BYTES // (n * k * 2)))
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
            w = ws[0]
            b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if has_bias else None
            x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, w, b)
            out = linear_one_row(x, w, b)
            diff = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
            t_cublas = graph_time(lambda i: F.linear(x, ws[i % copies], b))
            t_triton = graph_time(lambda i: linear_one_row(x, ws[i % copies], b))
            del ws
            nbytes = w.numel() * 2
            row = dict(shape=name, n=n, k=k, megabytes=nbytes / 1e6, cublas_us=t_cublas * 1e6,
                       cublas_gbps=nbytes / t_cublas / 1e9, triton_us=t_triton * 1e6,
                       triton_gbps=nbytes / t_triton / 1e9, max_rel_diff=diff)
            rows.append(row)
            print(f"| {name} | {n} x {k} | {nbytes / 1e6:.1f} | {t_cublas * 1e6:.2f} | {row['cublas_gbps']:.0f} | "
                  f"{nbytes / t_cublas / bandwidth:.3f} | {t_triton * 1e6:.2f} | {row['triton_gbps']:.0f} | "
                  f"{nbytes / t_triton / bandwidth:.3f} | {t_cublas / t_triton:.2f}x | {diff:.1e} |", flush=True)
    if args.json:
        atomic_write_text(args.json, json.dumps({"device": torch.cuda.get_device_name(),
                                                 "copy_bandwidth_bytes_per_s": bandwidth, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
