"""Pipeline bubble of 1F1B and interleaved 1F1B on the 1.3B GPT, measured next to the theory.

    torchrun --nproc-per-node 4 bench/bench_pipeline.py             # pp = 4 (world size = pp, dp = 1)
    torchrun --nproc-per-node 2 bench/bench_pipeline.py --json bench/results/pipeline_pp2.json
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 bench/bench_pipeline.py --cpu-smoke   # self-check

The model is the 1.3B GPT of bench/bench_gpt_1p3b.py (24 layers, hidden 2048, 16 heads, sequence
2048, vocabulary 50304, LayerNorm, GeLU, tied embeddings, no dropout, cuDNN attention, fused
output-layer cross entropy, bf16 with fp32 gradients and master weights, Adam), split into
pp = world-size stages and trained with the product's pieces (GPTModel per stage or per virtual
stage, DistributedDataParallel, the mixed precision optimizer, the pipeline schedules) on random
tokens. For each schedule -- 1F1B, and interleaved 1F1B with v = 2 and 3 model chunks per rank
where the layers divide -- the stages are built once; then for each number of micro-batches m
(interleaving only where `check_interleaved_num_microbatches` allows it) every rank runs
--warmup iterations and --iters timed ones.

A timed iteration: all ranks meet at a barrier, synchronise the device and start the clock
together; forward_backward runs with a `ComputeTimer` (gigatron.core.pipeline) and the device is
synchronised again (this rank's forward_backward time); then the gradients are finalised (the
tied-embedding all-reduce), the optimizer steps and the gradients are zeroed, and the device is
synchronised (this rank's iteration time). ms/iter and tokens/s come from the slowest rank's
iteration time; tokens/s per GPU = m * micro-batch * sequence / iteration time / pp.
MFU = 6 * T * (L * (12 h^2 + s h) + h V) FLOPs per iteration (T tokens; gigatron.core.flops.paper_flops,
as bench_gpt_1p3b.py) / iteration time / pp / the dense bf16 peak of the card (device_peak_flops).

Measured bubble. The compute timer brackets every forward and backward step of a micro-batch
(CUDA events, opened after the received activation or gradient has been waited for), so its busy
time is the time this rank computed. The pipeline's forward_backward time F is the slowest rank's
(all started together), and for rank r

    bubble_r = (F - busy_r) / busy_r

-- the time rank r spent not computing (waiting for its neighbours, communication, the schedule's
bookkeeping) per unit of compute, the quantity that theory puts at (p - 1) / (m v) for equal
stages. The table reports it for the rank with the most busy time (the bottleneck stage: its idle
time is the bubble that the pipeline pays) and the mean over ranks, and the busy time per
micro-batch of every rank (forward + backward over its chunks), which shows the imbalance of
the stages: the embedding on the first, the output layer and the loss on the last.

--cpu-smoke: a tiny model (12 layers, hidden 64) in fp32 on the CPU over gloo, m in {4, 8}.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gigatron.core.checkpoint.io import atomic_write_text  # noqa: E402
from gigatron.core.distributed import DDPConfig, DistributedDataParallel, finalize_model_grads  # noqa: E402
from gigatron.core.flops import device_peak_flops, paper_flops  # noqa: E402
from gigatron.core.models.gpt import GPTModel  # noqa: E402
from gigatron.core.optim import OptimizerConfig, get_optimizer  # noqa: E402
from gigatron.core.parallel.config import ParallelConfig  # noqa: E402
from gigatron.core.parallel.groups import ParallelGroups  # noqa: E402
from gigatron.core.parallel.random import model_parallel_seed  # noqa: E402
from gigatron.core.pipeline import (  # noqa: E402
    ComputeTimer,
    check_interleaved_num_microbatches,
    get_forward_backward_func,
)
from gigatron.core.transformer.config import TransformerConfig  # noqa: E402

SMOKE_SHAPE = dict(num_layers=12, hidden_size=64, num_attention_heads=4, seq_length=64, vocab_size=256)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-layers", type=int, default=24)
    parser.add_argument("--hidden-size", type=int, default=2048)
    parser.add_argument("--num-attention-heads", type=int, default=16)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=50304, help="padded vocabulary size")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--num-microbatches", type=int, nargs="+", default=[4, 8, 16],
                        help="micro-batch counts m per iteration to sweep")
    parser.add_argument("--virtual-stages", type=int, nargs="*", default=[2, 3],
                        help="model chunks per rank of the interleaved rows (1F1B always runs); "
                             "counts whose layers do not divide are skipped")
    parser.add_argument("--attention-backend", default="cudnn", help="as bench_gpt_1p3b.py's default")
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer layer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per (schedule, m)")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per (schedule, m)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results here (atomically)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny model in fp32 on the CPU over gloo, m in {4, 8} (self-check; replaces the "
                             "shape, micro-batch, micro-batch-count and iteration flags)")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        for key, value in SMOKE_SHAPE.items():
            setattr(args, key, value)
        args.micro_batch_size, args.num_microbatches, args.attention_backend = 2, [4, 8], "auto"
        args.warmup, args.iters = 1, 2
    for flag in ("micro_batch_size", "iters", "num_layers", "hidden_size", "seq_length", "vocab_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    bad = [m for m in args.num_microbatches if m < 1] + [v for v in args.virtual_stages if v < 2]
    if bad:
        parser.error(f"--num-microbatches must be >= 1 and --virtual-stages >= 2; got {bad}")
    return args


# ====================================================================== one schedule


def model_config(args, pp: int, vp, cpu: bool) -> TransformerConfig:
    """The model of one schedule; raises ValueError (the product's check) when the layers do not
    split into pp * vp stages."""
    dtype = torch.float32 if cpu else torch.bfloat16
    return TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        seq_length=args.seq_length, max_position_embeddings=args.seq_length, attention_dropout=0.0,
        hidden_dropout=0.0, bf16=not cpu, params_dtype=dtype, attention_backend=args.attention_backend,
        cross_entropy_loss_fusion=True, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vp)


class Pipeline:
    """This rank's model chunks (DDP-wrapped), optimizer and schedule for pp stages x vp chunks."""

    def __init__(self, config: TransformerConfig, groups: ParallelGroups, vocab_size: int, device, compile_layers):
        self.config, self.groups = config, groups
        vp = config.virtual_pipeline_model_parallel_size
        model_parallel_seed(1234, groups)
        chunks = []
        with torch.device(device):  # built and initialised directly on the device
            for chunk in range(vp or 1):
                stage = None if vp is None else chunk
                chunks.append(GPTModel(config, groups, vocab_size, pre_process=groups.is_pipeline_first_stage(stage),
                                       post_process=groups.is_pipeline_last_stage(stage), vp_stage=stage))
        if compile_layers:
            for model in chunks:
                for layer in model.decoder.layers:
                    layer.compile()
        self.chunks = [DistributedDataParallel(DDPConfig(), model, groups) for model in chunks]
        self.optimizer = get_optimizer(OptimizerConfig(lr=1e-4, bf16=config.bf16, params_dtype=config.params_dtype),
                                       self.chunks, groups)
        self.schedule = get_forward_backward_func(groups.pp.size, vp)
        self.num_parameters = sum(p.numel() for model in chunks for p in model.parameters())

    def train_step(self, batches, micro_batch_size: int, timer: ComputeTimer, device) -> tuple:
        """One iteration started together on all ranks: (forward_backward seconds, iteration seconds)."""
        seq = self.config.seq_length

        def forward_step(data_iterator, model):
            tokens, labels, positions, count = next(data_iterator)
            per_token = model(tokens, positions, None, labels=labels)  # last stage: [b, s] fp32; else [s, b, h]

            def loss_func(output):
                total = output.sum()
                return total / count, {"lm loss": torch.stack([total.detach(), count])}

            return per_token, loss_func

        vp = len(self.chunks)
        data = [iter(batches) for _ in self.chunks]
        dist.barrier()
        _synchronize(device)
        start = time.perf_counter()
        self.schedule(forward_step_func=forward_step, data_iterator=data if vp > 1 else data[0],
                      model=self.chunks if vp > 1 else self.chunks[0], num_microbatches=len(batches),
                      seq_length=seq, micro_batch_size=micro_batch_size, groups=self.groups, config=self.config,
                      grad_scale_func=self.optimizer.scale_loss, compute_timer=timer)
        _synchronize(device)
        forward_backward = time.perf_counter() - start
        # What the schedule would call after its last backward, kept out of the bubble's clock.
        finalize_model_grads(self.chunks, self.groups, self.config)
        self.optimizer.step()
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        _synchronize(device)
        return forward_backward, time.perf_counter() - start


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batches(num_microbatches: int, micro_batch_size: int, seq: int, vocab: int, device, seed: int):
    """Per micro-batch (tokens [b, s], labels [b, s], positions [b, s], token count), contiguous."""
    generator = torch.Generator(device=device).manual_seed(seed)
    positions = torch.arange(seq, device=device)[None].expand(micro_batch_size, seq).contiguous()  # [b, s]
    count = torch.tensor(float(micro_batch_size * seq), device=device)
    batches = []
    for _ in range(num_microbatches):
        text = torch.randint(0, vocab, (micro_batch_size, seq + 1), device=device, generator=generator)  # [b, s+1]
        batches.append((text[:, :-1].contiguous(), text[:, 1:].contiguous(), positions, count))
    return batches


def measure(pipeline: Pipeline, args, num_microbatches: int, device) -> dict:
    """This rank's timings of (warm-up, then) --iters iterations with m micro-batches."""
    batches = random_batches(num_microbatches, args.micro_batch_size, args.seq_length, args.vocab_size, device,
                             seed=1000 + num_microbatches)
    timer = ComputeTimer(device)
    for _ in range(args.warmup):
        pipeline.train_step(batches, args.micro_batch_size, timer, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer.reset()
    forward_backward, iteration = [], []
    for _ in range(args.iters):
        fb, it = pipeline.train_step(batches, args.micro_batch_size, timer, device)
        forward_backward.append(fb)
        iteration.append(it)
    steps = num_microbatches * len(pipeline.chunks)
    if timer.num_forward_steps != args.iters * steps or timer.num_backward_steps != args.iters * steps:
        raise RuntimeError(f"compute timer counted {timer.num_forward_steps} forward / {timer.num_backward_steps} "
                           f"backward steps, expected {args.iters * steps} each")
    return dict(rank=dist.get_rank(), forward_backward=forward_backward, iteration=iteration,
                busy=timer.busy_seconds() / args.iters, forward=timer.forward_seconds() / args.iters,
                backward=timer.backward_seconds() / args.iters,
                peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)


def summarize(per_rank: list, *, schedule: str, pp: int, vp: int, m: int, args, config, peak) -> dict:
    """One table row from every rank's measurements."""
    iters = len(per_rank[0]["iteration"])
    # All ranks start each iteration together: the pipeline's time is the slowest rank's.
    fb = sum(max(r["forward_backward"][i] for r in per_rank) for i in range(iters)) / iters
    iteration = sum(max(r["iteration"][i] for r in per_rank) for i in range(iters)) / iters
    bubbles = [(fb - r["busy"]) / r["busy"] for r in per_rank]
    bottleneck = max(range(pp), key=lambda rank: per_rank[rank]["busy"])
    theory = (pp - 1) / (m * vp)
    tokens = m * args.micro_batch_size * args.seq_length
    flops = paper_flops(config, args.vocab_size, m * args.micro_batch_size, args.seq_length)
    return dict(
        schedule=schedule, pp=pp, vp=vp, m=m, micro_batch_size=args.micro_batch_size,
        ms_per_iter=1e3 * iteration, forward_backward_ms=1e3 * fb, tokens_per_s_per_gpu=tokens / iteration / pp,
        tflops_per_gpu=flops / iteration / pp / 1e12,
        mfu=flops / iteration / pp / (peak * 1e12) if peak else None,
        theory_bubble=theory, bottleneck_rank=bottleneck, measured_bubble=bubbles[bottleneck],
        measured_over_theory=bubbles[bottleneck] / theory, mean_bubble=sum(bubbles) / pp,
        bubble_per_rank=bubbles,
        busy_ms_per_microbatch=[1e3 * r["busy"] / m for r in per_rank],
        forward_ms_per_microbatch=[1e3 * r["forward"] / m for r in per_rank],
        backward_ms_per_microbatch=[1e3 * r["backward"] / m for r in per_rank],
        peak_gib=[r["peak_gib"] for r in per_rank],
    )


# ====================================================================== output


TABLE_HEADER = ("| schedule | pp | v | m | ms/iter | tokens/s/GPU | MFU | theory (p-1)/(m v) | measured bubble "
                "(bottleneck rank) | measured/theory | mean bubble over ranks | "
                "busy ms per micro-batch, rank 0..p-1 |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_line(row: dict) -> str:
    mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
    busy = " / ".join(f"{ms:.1f}" for ms in row["busy_ms_per_microbatch"])
    return (f"| {row['schedule']} | {row['pp']} | {row['vp']} | {row['m']} | {row['ms_per_iter']:.1f} | "
            f"{row['tokens_per_s_per_gpu']:.0f} | {mfu} | {row['theory_bubble']:.3f} | "
            f"{row['measured_bubble']:.3f} (rank {row['bottleneck_rank']}) | {row['measured_over_theory']:.2f} | "
            f"{row['mean_bubble']:.3f} | {busy} |")


def progress_line(row: dict) -> str:
    ranks = " | ".join(f"r{rank} {busy:.1f} (f {fwd:.1f} b {bwd:.1f}) bubble {bubble:.3f}"
                       for rank, (busy, fwd, bwd, bubble) in enumerate(zip(
                           row["busy_ms_per_microbatch"], row["forward_ms_per_microbatch"],
                           row["backward_ms_per_microbatch"], row["bubble_per_rank"])))
    mfu = "" if row["mfu"] is None else f" MFU {100 * row['mfu']:.1f}%"
    memory = ""
    if row["peak_gib"][0] is not None:
        memory = " peak GiB " + "/".join(f"{gib:.1f}" for gib in row["peak_gib"])
    return (f"{row['schedule']:11s} pp={row['pp']} v={row['vp']} m={row['m']:<3d} {row['ms_per_iter']:9.1f} ms/iter "
            f"(forward_backward {row['forward_backward_ms']:.1f}) {row['tokens_per_s_per_gpu']:9.0f} tok/s/GPU{mfu} "
            f"bubble {row['measured_bubble']:.3f} vs theory {row['theory_bubble']:.3f} "
            f"(x{row['measured_over_theory']:.2f}){memory}\n    busy ms per micro-batch: {ranks}")


# ====================================================================== main


def init_distributed(cpu: bool):
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise SystemExit("bench_pipeline.py runs one pipeline stage per process: launch it with "
                         "torchrun --nproc-per-node P bench/bench_pipeline.py (P >= 2 stages)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cpu:
        torch.set_num_threads(1)
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_pipeline.py measures GPUs: run it where CUDA is available (or use --cpu-smoke)")
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"local rank {local_rank} but only {torch.cuda.device_count()} GPUs: "
                             "lower --nproc-per-node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        dist.init_process_group("nccl", device_id=device)
    return device


def schedules(args) -> list:
    return [("1F1B", None)] + [("interleaved", v) for v in args.virtual_stages]


def main(argv=None) -> int:
    args = parse_args(argv)
    device = init_distributed(args.cpu_smoke)
    pp, rank = dist.get_world_size(), dist.get_rank()
    base_groups = ParallelGroups.build(ParallelConfig(pipeline_model_parallel_size=pp))
    peak_info = device_peak_flops(device, torch.bfloat16) if device.type == "cuda" else None
    peak = peak_info[0] if peak_info else None
    say = print if rank == 0 else (lambda *a, **k: None)
    name = "CPU (gloo, fp32)" if device.type == "cpu" else torch.cuda.get_device_name(device)
    say(f"device: {name}, pp = {pp} ranks, torch {torch.__version__}; peak "
        f"{peak_info[1] if peak_info else 'unknown (no MFU)'}")
    say(f"model: {args.num_layers} layers, hidden {args.hidden_size}, {args.num_attention_heads} heads, "
        f"seq {args.seq_length}, vocab {args.vocab_size}; micro batch {args.micro_batch_size}; "
        f"warm-up {args.warmup}, timed {args.iters} iterations per row")
    say("measured bubble of rank r = (pipeline forward_backward time - rank r's busy compute time) / "
        "rank r's busy compute time; theory (p - 1) / (m v)\n", flush=True)

    rows, skipped = [], []
    for schedule, vp in schedules(args):
        label = "1F1B" if vp is None else f"interleaved v={vp}"
        try:
            config = model_config(args, pp, vp, args.cpu_smoke)
        except ValueError as error:
            skipped.append(f"{label}: {error}")
            say(f"skip {label}: {error}", flush=True)
            continue
        groups = dataclasses.replace(base_groups, vp_size=vp)
        build_start = time.perf_counter()
        pipeline = Pipeline(config, groups, args.vocab_size, device, args.compile)
        say(f"{label}: stages built in {time.perf_counter() - build_start:.1f} s "
            f"({pipeline.num_parameters / 1e6:.1f}M parameters on rank 0)", flush=True)
        for m in args.num_microbatches:
            if vp is not None:
                try:
                    check_interleaved_num_microbatches(m, pp, pp)
                except ValueError as error:
                    skipped.append(f"{label} m={m}: {error}")
                    say(f"skip {label} m={m}: {error}", flush=True)
                    continue
            mine = measure(pipeline, args, m, device)
            per_rank = [None] * pp
            dist.all_gather_object(per_rank, mine)
            row = summarize(per_rank, schedule=schedule, pp=pp, vp=vp or 1, m=m, args=args, config=config, peak=peak)
            rows.append(row)
            say(progress_line(row), flush=True)
        del pipeline
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    say(f"\n{TABLE_HEADER}")
    for row in rows:
        say(table_line(row))
    if skipped:
        say("\nskipped:\n" + "\n".join(f"- {reason}" for reason in skipped))
    if rank == 0 and args.json:
        atomic_write_text(args.json, json.dumps(dict(
            device=name, torch=torch.__version__, pp=pp, peak_tflops=peak,
            model=dict(num_layers=args.num_layers, hidden_size=args.hidden_size,
                       num_attention_heads=args.num_attention_heads, seq_length=args.seq_length,
                       vocab_size=args.vocab_size),
            micro_batch_size=args.micro_batch_size, warmup=args.warmup, iters=args.iters,
            bubble_definition="(pipeline forward_backward time - busy compute time) / busy compute time",
            rows=rows, skipped=skipped), indent=1) + "\n")
        say(f"\nwrote {args.json}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
