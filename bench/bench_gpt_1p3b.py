"""Training throughput of a 1.3B-parameter GPT on one GPU: tokens/s, TFLOP/s and MFU.

The model is Megatron's classic 1.3B GPT: 24 layers, hidden 2048, 16 heads, sequence 2048,
vocabulary 50257 padded to 50304, learned absolute positions, LayerNorm, GeLU, tied embeddings,
no dropout, bf16 parameters with fp32 master weights and fp32 gradient accumulation, Adam.

Each row trains with the product's own pieces (GPTModel, DistributedDataParallel, the mixed
precision optimizer, the no-pipelining schedule) on random tokens, and times whole iterations
(forward, backward, gradient reduction and optimizer step) with CUDA events after warm-up.

FLOPs are counted with the formula of the 1.3B issue / Megatron's code for this model:
    FLOPs per iteration = 6 * T * (L * (12 h^2 + s h) + h V)      (T tokens per iteration)
which counts causal attention at half and no recompute. MFU divides by the dense bf16 peak of
the device found (H100 SXM / H200: 989.4 TFLOP/s).

    python bench/bench_gpt_1p3b.py                       # the default sweep
    python bench/bench_gpt_1p3b.py --micro-batch-sizes 8 --backends cudnn --iters 10
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gigatron.core.distributed import DDPConfig, DistributedDataParallel, finalize_model_grads  # noqa: E402
from gigatron.core.flops import device_peak_flops  # noqa: E402
from gigatron.core.models.gpt import GPTModel  # noqa: E402
from gigatron.core.optim import OptimizerConfig, get_optimizer  # noqa: E402
from gigatron.core.parallel.groups import ParallelGroups  # noqa: E402
from gigatron.core.pipeline import get_forward_backward_func  # noqa: E402
from gigatron.core.transformer.config import TransformerConfig  # noqa: E402

LAYERS, HIDDEN, HEADS, SEQ, VOCAB, PADDED_VOCAB = 24, 2048, 16, 2048, 50257, 50304


def issue_flops_per_token() -> float:
    """6 * (L * (12 h^2 + s h) + h V) per token."""
    return 6.0 * (LAYERS * (12 * HIDDEN**2 + SEQ * HIDDEN) + HIDDEN * PADDED_VOCAB)


def build(backend: str, compile_layers: bool, fused_loss: bool):
    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, seq_length=SEQ,
        max_position_embeddings=SEQ, attention_dropout=0.0, hidden_dropout=0.0, bf16=True,
        params_dtype=torch.bfloat16, attention_backend=backend, cross_entropy_loss_fusion=fused_loss,
    )
    groups = ParallelGroups.single()
    with torch.device("cuda"):
        model = GPTModel(config, groups, vocab_size=PADDED_VOCAB)
    if compile_layers:
        for layer in model.decoder.layers:
            layer.compile()
    ddp = DistributedDataParallel(DDPConfig(), model, groups)
    optimizer = get_optimizer(OptimizerConfig(lr=1e-4, bf16=True, params_dtype=torch.bfloat16), [ddp], groups)
    return config, groups, ddp, optimizer


def run_config(mbs: int, num_micro: int, backend: str, compile_layers: bool, fused_loss: bool,
               warmup: int, iters: int) -> dict:
    config, groups, ddp, optimizer = build(backend, compile_layers, fused_loss)
    n_params = sum(p.numel() for p in ddp.module.parameters())
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, VOCAB, (mbs, SEQ + 1), device="cuda", generator=gen) for _ in range(num_micro)]
    positions = torch.arange(SEQ, device="cuda").unsqueeze(0).expand(mbs, SEQ)
    schedule = get_forward_backward_func(1)

    def forward_step(data_iterator, model):
        text = next(data_iterator)
        tokens, labels = text[:, :-1], text[:, 1:]
        per_token = model(tokens, positions, None, labels=labels)  # [b, s] fp32

        def loss_func(output):
            total = output.sum()
            count = torch.tensor(float(output.numel()), device=output.device)
            return total / count, {"lm loss": torch.stack([total.detach(), count])}

        return per_token, loss_func

    def step():
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        schedule(forward_step_func=forward_step, data_iterator=iter(batches), model=ddp,
                 num_microbatches=num_micro, seq_length=SEQ, micro_batch_size=mbs, groups=groups,
                 config=config, forward_only=False, grad_scale_func=optimizer.scale_loss,
                 finalize_model_grads_func=lambda chunks: finalize_model_grads(chunks, groups, config))
        optimizer.step()

    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warmup_s = time.time() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / iters
    tokens = mbs * num_micro * SEQ
    tflops = issue_flops_per_token() * tokens / (ms / 1e3) / 1e12
    peak, peak_name = device_peak_flops(torch.device("cuda"), torch.bfloat16) or (None, "unknown card")
    result = dict(mbs=mbs, micro=num_micro, backend=backend, compile=compile_layers, fused_loss=fused_loss,
                  ms=ms, tokens_s=tokens / (ms / 1e3), tflops=tflops, mfu=tflops / peak if peak else float("nan"),
                  peak_gib=torch.cuda.max_memory_allocated() / 2**30, params=n_params, warmup_s=warmup_s,
                  peak_name=peak_name, peak_tflops=peak)
    del ddp, optimizer, batches
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[16, 12, 8],
                        help="tried largest first; sizes that run out of memory are reported and skipped")
    parser.add_argument("--num-microbatches", type=int, default=2, help="micro-batches per iteration")
    parser.add_argument("--backends", nargs="+", default=["cudnn", "flash"])
    parser.add_argument("--no-compile", action="store_true", help="also run without torch.compile per layer")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--stop-at-first-fit", action="store_true",
                        help="per backend, stop at the largest micro batch that fits")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpt_1p3b.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    rows = []
    variants = [(b, True) for b in args.backends] + ([(args.backends[0], False)] if args.no_compile else [])
    for backend, compiled in variants:
        for mbs in args.micro_batch_sizes:
            try:
                r = run_config(mbs, args.num_microbatches, backend, compiled, True, args.warmup, args.iters)
            except torch.OutOfMemoryError:
                print(f"mbs {mbs} backend {backend} compile {compiled}: out of memory", flush=True)
                gc.collect()
                torch.cuda.empty_cache()
                continue
            rows.append(r)
            print(f"mbs {mbs:3d} x{r['micro']} {backend:6s} compile={compiled!s:5s} {r['ms']:8.1f} ms/iter "
                  f"{r['tokens_s']:9.0f} tok/s {r['tflops']:6.1f} TFLOP/s MFU {100 * r['mfu']:5.1f}% "
                  f"peak {r['peak_gib']:.1f} GiB (warm-up {r['warmup_s']:.0f} s)", flush=True)
            if args.stop_at_first_fit:
                break
    if not rows:
        raise SystemExit("no configuration fitted")
    r0 = rows[0]
    print(f"\n1.3B GPT ({r0['params'] / 1e9:.3f}B parameters), seq {SEQ}, bf16, Adam; "
          f"peak {r0['peak_tflops']} TFLOP/s ({r0['peak_name']})")
    print("| micro batch | micro-batches | attention | compile | ms/iter | tokens/s | TFLOP/s | MFU | peak mem GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mbs']} | {r['micro']} | {r['backend']} | {'yes' if r['compile'] else 'no'} | {r['ms']:.1f} | "
              f"{r['tokens_s']:.0f} | {r['tflops']:.1f} | {100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} |")


if __name__ == "__main__":
    main()
