"""Context-parallel attention throughput: forward + backward of one layer's core attention.

    torchrun --nproc-per-node 4 bench/bench_context_parallel.py                 # cp 1, 2, 4 on 4 GPUs
    torchrun --nproc-per-node 2 bench/bench_context_parallel.py --cp-sizes 1 2
    torchrun --nproc-per-node 2 bench/bench_context_parallel.py --cpu-smoke     # tiny, gloo, CPU

Shapes default to the 1.3B GPT (24 layers, hidden 2048, 16 heads of 128, micro-batch 1, bf16) at
sequence lengths 8192, 16384 and 32768. For each (comm type, seq length, cp size) the world is cut
into groups of cp consecutive ranks; each group runs ring_attention on one sequence split in the
load-balanced layout (cp 1 is plain local attention on the whole sequence: the baseline, run in
the same launch). The time of a step is the slowest rank's.

Reported per GPU:
  tokens/s   sequence tokens / (cp x time of the 24 layers' attention forward + backward)
  TFLOP/s    Megatron's attention FLOPs: per layer 6 * b * S^2 * (heads * head_dim) (QK^T and AV,
             half of the S x S matrix under the causal mask, x3 for forward + backward; the forward
             recomputed in backward is not counted), divided over the cp ranks
  MFU        TFLOP/s / the dense bf16 peak of the card (gigatron.core.flops.device_peak_flops)
With --cpu-smoke: hidden 64, 4 heads, 2 layers, seq 64 and 128, fp32, gloo, math kernel, and each
cp result is checked against full attention on the gathered sequence.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gigatron.core.flops import device_peak_flops  # noqa: E402
from gigatron.core.parallel.groups import Group  # noqa: E402
from gigatron.core.transformer.context_parallel import (  # noqa: E402
    COMM_TYPES,
    gather_cp_splits,
    ring_attention,
    split_for_cp_rank,
)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-layers", type=int, default=24)
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--num-attention-heads", type=int, default=16)
    p.add_argument("--num-query-groups", type=int, default=None, help="GQA groups (default: MHA)")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--cp-sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--comm-types", nargs="+", default=["p2p"], choices=COMM_TYPES)
    p.add_argument("--kernel", default="auto", choices=["auto", "cudnn", "flash", "math"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU with gloo, results checked")
    args = p.parse_args()
    if args.cpu_smoke:
        args.num_layers, args.hidden_size, args.num_attention_heads = 2, 64, 4
        args.seq_lengths = [64, 128]
        args.comm_types = list(COMM_TYPES)
        args.kernel = "math"
        args.warmup, args.iters = 1, 2
    return args


def init(args):
    if "RANK" not in os.environ:
        raise SystemExit("launch with torchrun, e.g. torchrun --nproc-per-node 2 bench/bench_context_parallel.py")
    backend = "gloo" if args.cpu_smoke else "nccl"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    return torch.device("cpu") if args.cpu_smoke else torch.device("cuda", torch.cuda.current_device())


def cp_groups(cp_size: int, world_size: int, rank: int):
    """Groups of cp_size consecutive ranks (every rank creates every group, as torch requires)."""
    mine = None
    for start in range(0, world_size, cp_size):
        ranks = list(range(start, start + cp_size))
        handle = dist.new_group(ranks) if cp_size > 1 else None
        if rank in ranks:
            mine = Group(group=handle, size=cp_size, rank=ranks.index(rank), ranks=ranks)
    return mine


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def full_attention(q, k, v):
    nq, ng = q.shape[1], k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(nq // ng, 1), v.repeat_interleave(nq // ng, 1),
                                          is_causal=True)


def run_case(args, device, dtype, cp: Group, seq: int, comm_type: str):
    """Seconds per forward + backward of one layer's attention (slowest rank), and the check error."""
    heads = args.num_attention_heads
    groups = args.num_query_groups or heads
    head_dim = args.hidden_size // heads
    b = args.micro_batch_size
    gen = torch.Generator(device="cpu").manual_seed(1234 + cp.ranks[0])  # same sequence in a cp group
    full = [torch.randn(b, n, seq, head_dim, generator=gen) for n in (heads, groups, groups)]  # [b, n, S, d]
    dout_full = torch.randn(b, heads, seq, head_dim, generator=gen)  # [b, nq, S, d]
    local = [split_for_cp_rank(t, cp.size, cp.rank, 2).to(device, dtype).requires_grad_() for t in full]
    dout = split_for_cp_rank(dout_full, cp.size, cp.rank, 2).to(device, dtype)

    def step():
        for t in local:
            t.grad = None
        out = ring_attention(*local, cp, causal=True, comm_type=comm_type, kernel=args.kernel)
        out.backward(dout)
        return out

    for _ in range(args.warmup):
        out = step()
    sync(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.iters):
        out = step()
    sync(device)
    elapsed = torch.tensor([(time.perf_counter() - start) / args.iters], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)

    error = None
    if args.cpu_smoke:
        parts = [torch.empty_like(out) for _ in range(cp.size)]
        if cp.size > 1:
            dist.all_gather(parts, out.detach().contiguous(), group=cp.group)
        else:
            parts = [out.detach()]
        gathered = gather_cp_splits(parts, seq_dim=2)
        reference = full_attention(*(t.to(device, dtype) for t in full))
        error = (gathered - reference).abs().max().item()
        if error > 1e-4:
            raise RuntimeError(f"{comm_type} cp {cp.size} seq {seq}: max error {error:.3g} against full attention")
    return float(elapsed.item()), error


def main():
    args = parse_args()
    device = init(args)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    peak = device_peak_flops(device, dtype)
    query_size = args.hidden_size  # heads x head_dim
    rows = []
    groups_by_size = {}
    for comm_type in args.comm_types:
        for cp_size in args.cp_sizes:
            if world_size % cp_size:
                if rank == 0:
                    print(f"skipping cp {cp_size}: world size {world_size} is not a multiple")
                continue
            if comm_type == "a2a" and args.num_attention_heads % cp_size:
                continue
            if cp_size not in groups_by_size:
                groups_by_size[cp_size] = cp_groups(cp_size, world_size, rank)
            cp = groups_by_size[cp_size]
            for seq in args.seq_lengths:
                if seq % (2 * cp_size):
                    continue
                seconds, error = run_case(args, device, dtype, cp, seq, comm_type)
                tokens = args.micro_batch_size * seq
                stack_seconds = seconds * args.num_layers
                flops = 6.0 * args.micro_batch_size * seq * seq * query_size * args.num_layers
                tflops_per_gpu = flops / cp_size / stack_seconds / 1e12
                rows.append((comm_type, seq, cp_size, seconds * 1e3, tokens / cp_size / stack_seconds,
                             tflops_per_gpu, 100.0 * tflops_per_gpu / peak[0] if peak else None, error))
    if rank == 0:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"device: {name} x {world_size}; dtype {dtype}; kernel {args.kernel}; "
              f"layers {args.num_layers}, hidden {args.hidden_size}, heads {args.num_attention_heads}, "
              f"groups {args.num_query_groups or args.num_attention_heads}, micro-batch {args.micro_batch_size}")
        print(f"peak: {peak[1] if peak else 'unknown (no MFU)'}; FLOPs: Megatron causal attention, 6*b*S^2*h per layer")
        header = (f"{'comm':>10} {'seq':>7} {'cp':>3} {'ms/layer':>10} {'tok/s/GPU':>11} {'TFLOP/s/GPU':>12} "
                  f"{'MFU %':>7}")
        if args.cpu_smoke:
            header += f" {'max err':>9}"
        print(header)
        for comm_type, seq, cp_size, ms, tok, tf, mfu, error in rows:
            line = (f"{comm_type:>10} {seq:>7} {cp_size:>3} {ms:>10.3f} {tok:>11.0f} {tf:>12.3g} "
                    f"{(f'{mfu:.1f}' if mfu is not None else '-'):>7}")
            if error is not None:
                line += f" {error:>9.2e}"
            print(line)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
