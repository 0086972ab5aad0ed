"""Training throughput of a ~1.3B hybrid Mamba model against the 1.3B GPT on one GPU, at long
sequences: tokens/s, model TFLOP/s, the ratio hybrid / GPT and peak memory.

The models (bf16 parameters, fp32 master weights and gradient accumulation, Adam, no dropout,
vocabulary 50257 padded to 50304, tied embeddings):

  GPT     24 layers, hidden 2048, 16 heads, GeLU MLP of 4h, LayerNorm, rotary positions (the 1.3B
          of bench_gpt_1p3b.py with RoPE in place of learned positions, which would grow with the
          sequence), 1.312B parameters;
  hybrid  Megatron's 8B hybrid recipe scaled down (examples/train_mamba_hybrid.sh): the pattern is
          our own allocation (gigatron/core/transformer/mamba/config.py) of --hybrid-attention-ratio
          0.08 --hybrid-mlp-ratio 0.5 over 40 layers at hidden 2048 (3 attention, 20 MLP,
          17 Mamba-2 layers; 40 rather than 48 layers gives the GPT's parameter count: 1.314B),
          Mamba head dim 64 (64 heads), state 128, 8 groups; attention with 16 heads in 8 GQA
          groups and no position embedding; squared-ReLU MLP of 4h; RMSNorm.
          --hybrid-layers 48 runs the 48-layer shape (1.549B).

Each row trains with the product's pieces (GPTModel / MambaModel, DistributedDataParallel, the
mixed-precision optimizer, the no-pipelining schedule) on random tokens: the Triton SSD scan and
causal conv1d kernels on CUDA, attention through --attention-backend auto (flash / cuDNN SDPA), the
output layer and loss fused in chunks (--cross-entropy-loss-fusion: no [s, V] logits in memory).
Every iteration holds the same number of tokens (--tokens-per-iter, default 32768: micro-batches
of two sequences at 4k and 16k, of one at 32k). A row that runs out of memory is retried with full
activation recompute (uniform, one layer per chunk), and the row says so (Megatron-Core has no
selective recompute module for Mamba layers; the mixer itself keeps only the inputs of its conv1d,
scan and gated norm, see gigatron/core/memory.py). Whole iterations
(forward, backward, gradient reduction, optimizer step) are timed with CUDA events after warm-up.

Model FLOPs are gigatron.core.flops.num_floating_point_operations (Megatron's convention; for
the hybrid, each layer by its kind, the Mamba scan as 7*I*N per token per pass); recompute is not
counted. MFU is against the dense bf16 peak of the card found.

    python bench/bench_hybrid.py                    # one GPU: seq 4096, 16384, 32768 (sized for < 4 min on an H100)
    python bench/bench_hybrid.py --seqs 4096 16384 --json out.json
    python bench/bench_hybrid.py --tiny             # CPU smoke test in seconds (tiny shapes)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gigatron.core.distributed import DDPConfig, DistributedDataParallel, finalize_model_grads  # noqa: E402
from gigatron.core.flops import device_peak_flops, num_floating_point_operations  # noqa: E402
from gigatron.core.models.gpt import GPTModel  # noqa: E402
from gigatron.core.models.mamba import MambaModel  # noqa: E402
from gigatron.core.optim import OptimizerConfig, get_optimizer  # noqa: E402
from gigatron.core.parallel.groups import ParallelGroups  # noqa: E402
from gigatron.core.pipeline import get_forward_backward_func  # noqa: E402
from gigatron.core.transformer.config import TransformerConfig  # noqa: E402
from gigatron.core.transformer.mamba.config import MambaConfig, allocate_hybrid_layers  # noqa: E402

VOCAB, PADDED_VOCAB = 50257, 50304
FULL = dict(hidden=2048, heads=16, gpt_layers=24, hybrid_layers=40, mamba_head_dim=64, mamba_state=128,
            mamba_groups=8, query_groups=8, vocab=VOCAB, padded_vocab=PADDED_VOCAB)
# --tiny: the same structure at toy sizes, on the CPU in fp32.
TINY = dict(hidden=64, heads=4, gpt_layers=2, hybrid_layers=12, mamba_head_dim=16, mamba_state=16,
            mamba_groups=2, query_groups=2, vocab=250, padded_vocab=256)
ATTENTION_RATIO, MLP_RATIO = 0.08, 0.5


def hybrid_pattern(layers: int, attention_ratio: float = ATTENTION_RATIO, mlp_ratio: float = MLP_RATIO) -> str:
    """Our allocation of the ratios over `layers` layers (Megatron-Core's algorithm)."""
    return "".join(allocate_hybrid_layers(layers, attention_ratio, mlp_ratio))


def hybrid_configs(sizes: dict, seq: int, dtype: torch.dtype, pattern: str, **extra):
    """(TransformerConfig, MambaConfig) of the ~1.3B hybrid (the one definition that this bench and
    bench_mamba_decode.py use): `sizes` as FULL (or TINY), `pattern` from hybrid_pattern, `extra`
    further TransformerConfig fields (recompute, loss fusion, CPU initialization)."""
    config = TransformerConfig(
        num_layers=len(pattern), hidden_size=sizes["hidden"], num_attention_heads=sizes["heads"],
        group_query_attention=True, num_query_groups=sizes["query_groups"], ffn_hidden_size=4 * sizes["hidden"],
        squared_relu=True, normalization="RMSNorm", add_bias_linear=False, position_embedding_type="none",
        seq_length=seq, max_position_embeddings=seq, attention_dropout=0.0, hidden_dropout=0.0,
        bf16=dtype == torch.bfloat16, params_dtype=dtype, **extra)
    mamba = MambaConfig(mamba_state_dim=sizes["mamba_state"], mamba_head_dim=sizes["mamba_head_dim"],
                        mamba_num_groups=sizes["mamba_groups"], hybrid_override_pattern=pattern, is_hybrid_model=True)
    return config, mamba


def build_configs(kind: str, sizes: dict, seq: int, dtype: torch.dtype, recompute: bool, pattern: str):
    """(TransformerConfig, MambaConfig or None) of the `kind` ("gpt" or "hybrid") model."""
    extra = dict(cross_entropy_loss_fusion=True)
    if recompute:
        extra.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if kind == "hybrid":
        return hybrid_configs(sizes, seq, dtype, pattern, **extra)
    config = TransformerConfig(
        num_layers=sizes["gpt_layers"], hidden_size=sizes["hidden"], num_attention_heads=sizes["heads"],
        position_embedding_type="rope", seq_length=seq, max_position_embeddings=seq, attention_dropout=0.0,
        hidden_dropout=0.0, bf16=dtype == torch.bfloat16, params_dtype=dtype, ffn_hidden_size=4 * sizes["hidden"],
        **extra)
    return config, None


def _oom_error():
    return getattr(torch.cuda, "OutOfMemoryError", RuntimeError)


def run_row(kind: str, sizes: dict, seq: int, tokens_per_iter: int, device: torch.device, dtype: torch.dtype,
            recompute: bool, pattern: str, warmup: int, iters: int) -> dict:
    config, mamba = build_configs(kind, sizes, seq, dtype, recompute, pattern)
    groups = ParallelGroups.single()
    mbs = max(1, min(2, tokens_per_iter // seq))
    num_micro = max(1, tokens_per_iter // (mbs * seq))
    with torch.device(device):
        model = (GPTModel(config, groups, vocab_size=sizes["padded_vocab"]) if mamba is None
                 else MambaModel(config, mamba, groups, sizes["padded_vocab"]))
    ddp = DistributedDataParallel(DDPConfig(), model, groups)
    optimizer = get_optimizer(OptimizerConfig(lr=1e-4, bf16=dtype == torch.bfloat16, params_dtype=dtype), [ddp],
                              groups)
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [torch.randint(0, sizes["vocab"], (mbs, seq + 1), device=device, generator=gen)
               for _ in range(num_micro)]
    positions = torch.arange(seq, device=device).unsqueeze(0).expand(mbs, seq)
    schedule = get_forward_backward_func(1)

    def forward_step(data_iterator, chunk):
        text = next(data_iterator)
        per_token = chunk(text[:, :-1], positions, None, labels=text[:, 1:])  # [b, s] fp32

        def loss_func(output):
            total = output.sum()
            count = torch.tensor(float(output.numel()), device=output.device)
            return total / count, {"lm loss": torch.stack([total.detach(), count])}

        return per_token, loss_func

    def step():
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        schedule(forward_step_func=forward_step, data_iterator=iter(batches), model=ddp,
                 num_microbatches=num_micro, seq_length=seq, micro_batch_size=mbs, groups=groups,
                 config=config, forward_only=False, grad_scale_func=optimizer.scale_loss,
                 finalize_model_grads_func=lambda chunks: finalize_model_grads(chunks, groups, config))
        optimizer.step()

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    warmup_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(iters):
        step()
    if cuda:
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / iters
    else:
        ms = (time.perf_counter() - t1) * 1e3 / iters
    tokens = mbs * num_micro * seq
    flops = num_floating_point_operations(config, sizes["padded_vocab"], mbs * num_micro, seq, mamba_config=mamba)
    peak = device_peak_flops(device, dtype) if cuda else None
    tflops = flops / (ms / 1e3) / 1e12
    row = dict(model=kind, seq=seq, mbs=mbs, micro=num_micro, recompute="full" if recompute else "none",
               params=params, ms=ms, tokens_s=tokens / (ms / 1e3), tflops=tflops,
               mfu=tflops / peak[0] if peak else None, peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda
               else None, warmup_s=warmup_s, attention=config.resolved_attention_backend)
    del ddp, optimizer, model, batches
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def run_fitting(kind, sizes, seq, tokens_per_iter, device, dtype, pattern, warmup, iters, recompute_mode) -> dict:
    """The row without recompute, or with full recompute when that runs out of memory (--recompute auto)."""
    if recompute_mode != "auto":
        return run_row(kind, sizes, seq, tokens_per_iter, device, dtype, recompute_mode == "full", pattern, warmup,
                       iters)
    try:
        return run_row(kind, sizes, seq, tokens_per_iter, device, dtype, False, pattern, warmup, iters)
    except _oom_error():
        pass  # retried below, once the exception (and the failed model its traceback holds) is gone
    gc.collect()
    torch.cuda.empty_cache()
    print(f"  ({kind} at sequence {seq} does not fit without activation recompute: retrying with full recompute)",
          flush=True)
    return run_row(kind, sizes, seq, tokens_per_iter, device, dtype, True, pattern, warmup, iters)


def _fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="hybrid Mamba vs GPT training throughput")
    parser.add_argument("--seqs", type=int, nargs="+", default=None, help="sequence lengths (default 4096 16384 32768)")
    parser.add_argument("--tokens-per-iter", type=int, default=None, help="tokens per iteration (default 32768)")
    parser.add_argument("--hybrid-layers", type=int, default=None, help="layers of the hybrid (default 40)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 2)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default 3)")
    parser.add_argument("--recompute", choices=["auto", "none", "full"], default="auto",
                        help="auto: full activation recompute only for a row that runs out of memory without it")
    parser.add_argument("--models", nargs="+", choices=["gpt", "hybrid"], default=["gpt", "hybrid"])
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU in fp32 (a smoke test)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)

    sizes = dict(TINY if args.tiny else FULL)
    if args.hybrid_layers:
        sizes["hybrid_layers"] = args.hybrid_layers
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        seqs, tokens_per_iter = args.seqs or [64, 128], args.tokens_per_iter or 256
        warmup, iters = args.warmup or 1, args.iters or 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_hybrid.py needs a CUDA GPU (use --tiny for a CPU smoke test)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        seqs, tokens_per_iter = args.seqs or [4096, 16384, 32768], args.tokens_per_iter or 32768
        warmup, iters = args.warmup or 2, args.iters or 3
    pattern = hybrid_pattern(sizes["hybrid_layers"])
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {card}; dtype {str(dtype).replace('torch.', '')}; hybrid pattern ({len(pattern)} layers: "
          f"{pattern.count('M')} Mamba, {pattern.count('*')} attention, {pattern.count('-')} MLP) {pattern}", flush=True)
    rows = []
    header = (f"{'model':>7} {'seq':>6} {'mbs x micro':>11} {'recompute':>9} {'params':>8} {'ms/iter':>9} "
              f"{'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8} {'hybrid/GPT':>10}")
    print(header, flush=True)
    for seq in seqs:
        by_kind = {}
        for kind in args.models:
            row = run_fitting(kind, sizes, seq, tokens_per_iter, device, dtype, pattern, warmup, iters, args.recompute)
            by_kind[kind] = row
            if kind == "hybrid" and "gpt" in by_kind:
                row["ratio_vs_gpt"] = row["tokens_s"] / by_kind["gpt"]["tokens_s"]
            rows.append(row)
            print(f"{kind:>7} {seq:>6} {row['mbs']:>5} x {row['micro']:<3} {row['recompute']:>9} "
                  f"{row['params'] / 1e6:>7.1f}M {row['ms']:>9.1f} {row['tokens_s']:>10.0f} {row['tflops']:>8.1f} "
                  f"{_fmt(row['mfu'], '6.1%'):>6} {_fmt(row['peak_gib'], '8.1f'):>8} "
                  f"{_fmt(row.get('ratio_vs_gpt'), '10.2f'):>10}", flush=True)
    if args.json:
        result = {"device": card, "dtype": str(dtype), "hybrid_pattern": pattern, "rows": rows}
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
