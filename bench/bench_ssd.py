"""The SSD scan (Mamba-2's sequence mixer) against attention (PyTorch SDPA, FlashAttention-class)
at sequence 4k, 16k and 64k: time of forward + backward and achieved TFLOP/s, on one GPU.

Shapes: one layer of a ~1.3B model (hidden 2048). SSD: 64 heads of dim 64 (2 * 2048 / 64), 8
groups, state 128, chunk 128 (Megatron's mixer defaults), bf16 x/B/C, fp32 dt. Attention: 16 heads
of dim 128, causal, bf16. Each sequence length runs batch = max(1, 65536 / seq) rows, so every row
of the table processes the same number of tokens.

FLOPs (2 per multiply-add; backward = 2 x forward, so forward + backward = 3 x forward):
  SSD (gigatron.core.ops.ssd.ssd_flops), per chunk of Q and head:
      2 Q^2 N (C B^T) + 2 Q^2 P (scores x) + 2 Q P N (chunk state) + 2 Q P N (state read-out),
      the causal Q x Q products counted in full as the kernel computes them;
  attention: 4 b h s^2 d / 2 forward (Q K^T and P V, causal half).
TFLOP/s = FLOPs / time; "vs SDPA" = SDPA's time / the op's time (above 1: faster than attention).
The SSD's work grows linearly with s, attention's quadratically.

    python bench/bench_ssd.py                   # GPU, Triton scan vs SDPA
    python bench/bench_ssd.py --with-chunked    # also the plain-PyTorch chunked scan
    python bench/bench_ssd.py --cpu-smoke       # tiny shapes on the CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gigatron.core.ops.ssd import ssd_flops, ssd_scan  # noqa: E402


def attention_flops(batch: int, heads: int, seq: int, head_dim: int) -> int:
    return 3 * 4 * batch * heads * seq * seq * head_dim // 2


def _timer(device: torch.device, fn, warmup: int, iters: int) -> float:
    """Mean seconds per call of fn (CUDA events on the GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def ssd_step(batch, seq, heads, head_dim, groups, state, chunk, dtype, device, kernel):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq, heads, head_dim, generator=gen).to(device, dtype).requires_grad_()
    dt = F.softplus(torch.randn(batch, seq, heads, generator=gen) - 2).to(device).requires_grad_()
    A = (-torch.rand(heads, generator=gen) * 8 - 1).to(device).requires_grad_()
    B = (torch.randn(batch, seq, groups, state, generator=gen) * 0.3).to(device, dtype).requires_grad_()
    C = (torch.randn(batch, seq, groups, state, generator=gen) * 0.3).to(device, dtype).requires_grad_()
    D = torch.ones(heads, device=device).requires_grad_()
    grad = torch.randn(batch, seq, heads, head_dim, generator=gen).to(device, dtype)

    def step():
        y, _ = ssd_scan(x, dt, A, B, C, D, chunk_size=chunk, kernel=kernel)
        y.backward(grad)
    return step


def attention_step(batch, seq, heads, head_dim, dtype, device):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, generator=gen).to(device, dtype).requires_grad_()
               for _ in range(3))
    grad = torch.randn(batch, heads, seq, head_dim, generator=gen).to(device, dtype)

    def step():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(grad)
    return step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lengths", default="4096,16384,65536")
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per step (batch = tokens / seq)")
    parser.add_argument("--with-chunked", action="store_true", help="also time the plain-PyTorch chunked scan")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        device, dtype = torch.device("cpu"), torch.float32
        seqs, tokens = [64, 256], 256
        ssd_shape = dict(heads=4, head_dim=16, groups=2, state=16, chunk=32)
        attn_shape = dict(heads=2, head_dim=32)
        kernels = ["chunked"]
        warmup, iters = 1, 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("error: no CUDA device; run with --cpu-smoke on a machine without a GPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
        seqs, tokens = [int(s) for s in args.seq_lengths.split(",")], args.tokens
        ssd_shape = dict(heads=64, head_dim=64, groups=8, state=128, chunk=128)
        attn_shape = dict(heads=16, head_dim=128)
        kernels = ["triton"] + (["chunked"] if args.with_chunked else [])
        warmup, iters = args.warmup, args.iters

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; dtype {str(dtype).replace('torch.', '')}; {tokens} tokens per step")
    print(f"SSD: heads {ssd_shape['heads']} x dim {ssd_shape['head_dim']}, groups {ssd_shape['groups']}, "
          f"state {ssd_shape['state']}, chunk {ssd_shape['chunk']}; attention: heads {attn_shape['heads']} x dim "
          f"{attn_shape['head_dim']}, causal")
    print(f"{'seq':>7} {'batch':>5} {'op':<16} {'fwd+bwd ms':>11} {'TFLOP/s':>8} {'vs SDPA':>8}")
    for seq in seqs:
        batch = max(1, tokens // seq)
        attn = attention_step(batch, seq, attn_shape["heads"], attn_shape["head_dim"], dtype, device)
        t_attn = _timer(device, attn, warmup, iters)
        f_attn = attention_flops(batch, attn_shape["heads"], seq, attn_shape["head_dim"])
        print(f"{seq:>7} {batch:>5} {'sdpa (causal)':<16} {t_attn * 1e3:>11.3f} {f_attn / t_attn / 1e12:>8.2f} {1.0:>8.2f}")
        del attn
        for kernel in kernels:
            step = ssd_step(batch, seq, dtype=dtype, device=device, kernel=kernel, **ssd_shape)
            t = _timer(device, step, warmup, iters)
            flops = ssd_flops(batch, seq, ssd_shape["heads"], ssd_shape["head_dim"], ssd_shape["state"],
                              ssd_shape["chunk"])
            print(f"{seq:>7} {batch:>5} {'ssd ' + kernel:<16} {t * 1e3:>11.3f} {flops / t / 1e12:>8.2f} "
                  f"{t_attn / t:>8.2f}")
            del step
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
