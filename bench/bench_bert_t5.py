"""Training throughput of BERT-large and T5-base on one GPU: tokens/s, TFLOP/s and MFU.

Models (Megatron's published shapes):
  BERT-large (345M): 24 layers, hidden 1024, 16 heads, sequence 512, Megatron's pre-LN layer, binary
      (sentence-order) head, 2 token types; vocabulary 30,524 (BERT uncased + [BOS]/[EOS]) padded to 30,592.
  T5-base (220M): 12 encoder + 12 decoder layers, hidden 768, 12 heads, kv channels 64, ffn 3072,
      encoder sequence 512, decoder sequence 128; vocabulary 30,624 (+100 sentinels) padded to 30,720.
Both: bf16 parameters with fp32 master weights and fp32 gradient accumulation (the product's mixed
precision optimizer, Adam), DistributedDataParallel and the no-pipelining schedule, no dropout,
torch.compile per transformer layer (unless --no-compile). Batches are random tokens: BERT with a
padding mask of real tokens only and 15% of positions in the loss; T5 with every encoder key
visible and the causal decoder mask (the fast causal kernel path).

FLOPs follow Megatron's convention (3 passes x 2 FLOPs per multiply-add, no recompute):
  per encoder token and layer: 8 h q (QKV + output projections, q = heads * kv_channels)
                               + 4 s q (bidirectional attention, counted in full) + 4 h f (MLP)
  BERT per token adds the LM head: 2 h^2 (dense) + 2 h V (logits).
  T5 per decoder token and layer: 8 h q + 2 s_d q (causal self-attention at half)
                               + 4 h q (cross-attention query and output projections)
                               + 4 s_e q (cross-attention scores and values) + 4 h f;
      per encoder token and decoder layer: 4 h q (cross-attention keys and values);
      per decoder token: 2 h V (logits).
Tokens/s counts the tokens of --seq-length / --encoder-seq-length (Megatron's convention; T5's
decoder tokens are not counted). MFU divides by the dense bf16 peak of the device found.

    python bench/bench_bert_t5.py                    # both models, GPU
    python bench/bench_bert_t5.py --model bert --micro-batch-sizes 16
    python bench/bench_bert_t5.py --cpu-smoke        # tiny shapes on the CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gigatron.core.distributed import DDPConfig, DistributedDataParallel, finalize_model_grads  # noqa: E402
from gigatron.core.flops import device_peak_flops  # noqa: E402
from gigatron.core.models.bert import BertModel  # noqa: E402
from gigatron.core.models.t5 import T5Model  # noqa: E402
from gigatron.core.optim import OptimizerConfig, get_optimizer  # noqa: E402
from gigatron.core.parallel.groups import ParallelGroups  # noqa: E402
from gigatron.core.parallel.random import model_parallel_seed  # noqa: E402
from gigatron.core.pipeline import get_forward_backward_func  # noqa: E402
from gigatron.core.transformer.config import TransformerConfig  # noqa: E402
from gigatron.core.transformer.layer import TransformerLayer  # noqa: E402


@dataclass
class Shape:
    name: str
    layers: int
    hidden: int
    heads: int
    ffn: int
    seq: int
    dec_seq: int  # 0 for BERT
    vocab: int  # padded


BERT_LARGE = Shape("BERT-large", 24, 1024, 16, 4096, 512, 0, 30592)
T5_BASE = Shape("T5-base", 12, 768, 12, 3072, 512, 128, 30720)
BERT_SMOKE = Shape("BERT (smoke)", 2, 64, 4, 256, 32, 0, 128)
T5_SMOKE = Shape("T5 (smoke)", 2, 64, 4, 256, 32, 16, 128)


def bert_flops_per_sample(sh: Shape) -> float:
    h, q, f, s, v = sh.hidden, sh.hidden, sh.ffn, sh.seq, sh.vocab
    per_token = sh.layers * (8 * h * q + 4 * s * q + 4 * h * f) + 2 * h * h + 2 * h * v
    return 3.0 * s * per_token


def t5_flops_per_sample(sh: Shape) -> float:
    h, q, f, se, sd, v = sh.hidden, sh.hidden, sh.ffn, sh.seq, sh.dec_seq, sh.vocab
    encoder = se * (sh.layers * (8 * h * q + 4 * se * q + 4 * h * f) + sh.layers * 4 * h * q)
    decoder = sd * (sh.layers * (8 * h * q + 2 * sd * q + 4 * h * q + 4 * se * q + 4 * h * f) + 2 * h * v)
    return 3.0 * (encoder + decoder)


def _config(sh: Shape, device_type: str) -> TransformerConfig:
    bf16 = device_type == "cuda"
    return TransformerConfig(
        num_layers=sh.layers, hidden_size=sh.hidden, num_attention_heads=sh.heads, ffn_hidden_size=sh.ffn,
        seq_length=sh.seq, max_position_embeddings=max(sh.seq, sh.dec_seq), attention_dropout=0.0,
        hidden_dropout=0.0, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32)


def _batches(kind: str, sh: Shape, mbs: int, num_micro: int, device):
    gen = torch.Generator(device=device).manual_seed(0)
    out = []
    for _ in range(num_micro):
        if kind == "bert":
            ids = torch.randint(0, sh.vocab, (mbs, sh.seq), device=device, generator=gen)
            loss_mask = (torch.rand(mbs, sh.seq, device=device, generator=gen) < 0.15).float()
            types = (torch.arange(sh.seq, device=device) >= sh.seq // 2).long().expand(mbs, sh.seq)
            order = torch.randint(0, 2, (mbs,), device=device, generator=gen)
            out.append((ids, torch.ones_like(ids), types, ids, loss_mask, order))
        else:
            enc = torch.randint(0, sh.vocab, (mbs, sh.seq), device=device, generator=gen)
            dec = torch.randint(0, sh.vocab, (mbs, sh.dec_seq), device=device, generator=gen)
            labels = torch.randint(0, sh.vocab, (mbs, sh.dec_seq), device=device, generator=gen)
            out.append((enc, dec, labels, torch.ones(mbs, sh.dec_seq, device=device)))
    return out


def _forward_step(kind: str):
    from gigatron.training import bert as bert_training
    from gigatron.training import t5 as t5_training

    def step(data_iterator, model):
        batch = next(data_iterator)
        if kind == "bert":
            ids, padding, types, labels, loss_mask, order = batch
            output = model(ids, padding, types, lm_labels=labels)
            return output, lambda out: bert_training.loss_func(loss_mask, order, out)
        enc, dec, labels, loss_mask = batch
        output = model(enc, dec, None, None, None, lm_labels=labels)
        return output, lambda out: t5_training.loss_func(loss_mask, out)

    return step


def run(kind: str, sh: Shape, mbs: int, num_micro: int, compile_layers: bool, warmup: int, iters: int,
        device: torch.device) -> dict:
    config = _config(sh, device.type)
    groups = ParallelGroups.single()
    model_parallel_seed(1234, groups)
    with torch.device(device):
        model = BertModel(config, groups, sh.vocab) if kind == "bert" else T5Model(config, groups, sh.vocab)
    model.to(device)
    if compile_layers:
        for layer in model.modules():
            if isinstance(layer, TransformerLayer):
                layer.compile()
    ddp = DistributedDataParallel(DDPConfig(), model, groups)
    optimizer = get_optimizer(OptimizerConfig(lr=1e-4, bf16=config.bf16, params_dtype=config.params_dtype),
                              [ddp], groups)
    batches = _batches(kind, sh, mbs, num_micro, device)
    schedule = get_forward_backward_func(1)
    forward_step = _forward_step(kind)
    losses = []

    def step():
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reports = schedule(forward_step_func=forward_step, data_iterator=iter(batches), model=ddp,
                           num_microbatches=num_micro, seq_length=sh.seq, micro_batch_size=mbs, groups=groups,
                           config=config, forward_only=False, grad_scale_func=optimizer.scale_loss,
                           finalize_model_grads_func=lambda chunks: finalize_model_grads(chunks, groups, config))
        optimizer.step()
        losses.append(reports[-1]["lm loss"])

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for _ in range(warmup):
        step()
    sync()
    warmup_s = time.time() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    ms = (time.perf_counter() - t0) * 1e3 / iters
    samples = mbs * num_micro
    flops = (bert_flops_per_sample(sh) if kind == "bert" else t5_flops_per_sample(sh)) * samples
    tflops = flops / (ms / 1e3) / 1e12
    peak = device_peak_flops(device, config.params_dtype)
    last = losses[-1]
    result = dict(model=sh.name, mbs=mbs, micro=num_micro, compile=compile_layers, ms=ms,
                  tokens_s=samples * sh.seq / (ms / 1e3), tflops=tflops,
                  mfu=tflops / peak[0] if peak else float("nan"), peak_name=peak[1] if peak else "no known peak",
                  params=sum(p.numel() for p in model.parameters()), warmup_s=warmup_s,
                  peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
                  loss=float(last[0] / last[1]))
    del ddp, optimizer, model, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["bert", "t5", "both"], default="both")
    parser.add_argument("--micro-batch-sizes", type=int, nargs="+", default=None,
                        help="tried largest first, out-of-memory sizes skipped (default: BERT 32 16 8, T5 64 32 16)")
    parser.add_argument("--num-microbatches", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="run without torch.compile per layer")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--stop-at-first-fit", action="store_true", help="stop at the largest micro batch that fits")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU, 1 warm-up + 2 iterations")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        device = torch.device("cpu")
        shapes = {"bert": BERT_SMOKE, "t5": T5_SMOKE}
        args.micro_batch_sizes = args.micro_batch_sizes or [2]
        args.warmup, args.iters, compile_layers = 1, 2, False
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_bert_t5.py needs a CUDA GPU (or --cpu-smoke)")
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        shapes = {"bert": BERT_LARGE, "t5": T5_BASE}
        compile_layers = not args.no_compile
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    kinds = ["bert", "t5"] if args.model == "both" else [args.model]
    rows = []
    for kind in kinds:
        sizes = args.micro_batch_sizes or ([32, 16, 8] if kind == "bert" else [64, 32, 16])
        for mbs in sizes:
            try:
                r = run(kind, shapes[kind], mbs, args.num_microbatches, compile_layers, args.warmup, args.iters,
                        device)
            except torch.OutOfMemoryError:
                print(f"{shapes[kind].name} mbs {mbs}: out of memory", flush=True)
                gc.collect()
                torch.cuda.empty_cache()
                continue
            if not math.isfinite(r["loss"]):
                raise SystemExit(f"{r['model']} mbs {mbs}: the loss is {r['loss']}")
            rows.append(r)
            print(f"{r['model']:12s} mbs {mbs:3d} x{r['micro']} compile={compile_layers!s:5s} {r['ms']:8.1f} ms/iter "
                  f"{r['tokens_s']:9.0f} tok/s {r['tflops']:6.1f} TFLOP/s MFU {100 * r['mfu']:5.1f}% "
                  f"loss {r['loss']:.3f} (warm-up {r['warmup_s']:.0f} s)", flush=True)
            if args.stop_at_first_fit:
                break
    if not rows:
        raise SystemExit("no configuration fitted")
    print(f"\npeak: {rows[0]['peak_name']}; FLOPs: Megatron's convention (see the module docstring)")
    print("| model | params | micro batch | micro-batches | compile | ms/iter | tokens/s | TFLOP/s | MFU | peak mem GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:.0f}M | {r['mbs']} | {r['micro']} | {'yes' if r['compile'] else 'no'} | "
              f"{r['ms']:.1f} | {r['tokens_s']:.0f} | {r['tflops']:.1f} | {100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
