"""WikiText-style zero-shot evaluation throughput of the 1.3B GPT on one GPU.

Runs the product's evaluation path (tasks/zeroshot_gpt: overlapping windows, forward-only
schedule, padded-vocabulary masking, vocab-parallel cross-entropy) on a synthetic token stream
of WikiText-103-test size (about 280k GPT-2 tokens; random ids, random weights: only the speed
is measured). The model is the classic 1.3B GPT (24 layers, hidden 2048, 16 heads, vocabulary
50257 padded to 50304, bf16, no dropout).

Two figures per row:
    window tokens/s  = windows x seq_length / seconds   (tokens the model reads)
    targets/s        = counted targets / seconds        (text evaluated per second; with stride S
                       a window counts only S targets, so this is what --overlapping-eval costs)

    python bench/bench_wikitext_eval.py                            # seq 1024; strides 32 and 1024
    python bench/bench_wikitext_eval.py --strides 32 --max-windows 2048 --micro-batch-sizes 8 16
    python bench/bench_wikitext_eval.py --cpu-smoke                # tiny model on CPU, self-check
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gigatron.core.models.gpt import GPTModel  # noqa: E402
from gigatron.core.parallel.groups import ParallelGroups  # noqa: E402
from gigatron.core.transformer.config import TransformerConfig  # noqa: E402
from tasks.zeroshot_gpt.datasets import LMWindowDataset  # noqa: E402
from tasks.zeroshot_gpt.evaluate import evaluate_sums, wikitext_results  # noqa: E402

WIKITEXT_TEST_TOKENS = 280_000  # GPT-2 BPE tokens of wiki.test.tokens, roughly


class _Subset:
    """The first `n` windows of a window dataset."""

    def __init__(self, dataset, n):
        self.dataset, self.n = dataset, min(n, len(dataset))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i >= self.n:
            raise IndexError(i)
        return self.dataset[i]


def build_model(shape: dict, device: str, dtype: torch.dtype, attention_backend: str, compile_layers: bool):
    config = TransformerConfig(
        num_layers=shape["layers"], hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
        seq_length=shape["seq"], max_position_embeddings=shape["seq"], attention_dropout=0.0, hidden_dropout=0.0,
        bf16=dtype == torch.bfloat16, params_dtype=dtype, attention_backend=attention_backend,
        use_cpu_initialization=device == "cpu")
    with torch.device(device):
        model = GPTModel(config, ParallelGroups.single(), vocab_size=shape["padded_vocab"])
    if compile_layers:
        for layer in model.decoder.layers:
            layer.compile()
    return model.eval(), config


def run_row(model, config, tokens, shape, stride, mbs, max_windows, device) -> dict:
    dataset = LMWindowDataset(tokens, shape["seq"], pad_id=0, stride=stride)
    subset = _Subset(dataset, max_windows) if max_windows else dataset
    kw = dict(groups=ParallelGroups.single(), config=config, micro_batch_size=mbs, vocab_size=shape["vocab"],
              device=torch.device(device))
    evaluate_sums([model], _Subset(dataset, 2 * mbs), "loss", **kw)  # warm-up (kernels, compile)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    sums = evaluate_sums([model], subset, "loss", **kw)
    nll, counted = float(sums[0]), float(sums[1])  # host sync
    seconds = time.perf_counter() - start
    windows = len(subset)
    return {"stride": stride, "mbs": mbs, "windows": windows, "seconds": seconds,
            "window_tokens_per_s": windows * shape["seq"] / seconds, "targets_per_s": counted / seconds,
            "nll": nll, "counted": counted, "all_windows": len(dataset)}


def cpu_smoke() -> None:
    """A tiny model on CPU: checks the full stream's counts and the result formula, prints one row."""
    shape = dict(layers=2, hidden=64, heads=4, seq=64, vocab=1000, padded_vocab=1024)
    model, config = build_model(shape, "cpu", torch.float32, "auto", False)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape["vocab"], (3000,), generator=g).tolist()
    row = run_row(model, config, tokens, shape, stride=16, mbs=4, max_windows=0, device="cpu")
    assert row["counted"] == len(tokens) - 1, row
    res = wikitext_results(row["nll"], row["counted"], len(tokens), num_original_tokens=2500)
    # Random weights at init std 0.02: close to uniform over the true vocabulary.
    assert abs(res["avg_loss"] - math.log(shape["vocab"])) < 0.5, res
    print(f"cpu smoke ok: {row['windows']} windows, {row['window_tokens_per_s']:.0f} window tokens/s, "
          f"loss {res['avg_loss']:.4f} (ln V = {math.log(shape['vocab']):.4f}), ppl {res['ppl']:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--strides", type=int, nargs="+", default=[32, 1024], help="--overlapping-eval values")
    parser.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--num-tokens", type=int, default=WIKITEXT_TEST_TOKENS)
    parser.add_argument("--max-windows", type=int, default=1024,
                        help="time the first N windows only (0: all; stride 32 over 280k tokens is ~8.7k windows)")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer layer")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: self-check and exit")
    args = parser.parse_args()
    if args.cpu_smoke:
        cpu_smoke()
        return
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device (or --cpu-smoke)")
    shape = dict(layers=24, hidden=2048, heads=16, seq=args.seq_length, vocab=50257, padded_vocab=50304)
    model, config = build_model(shape, "cuda", torch.bfloat16, args.attention_backend, args.compile)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape["vocab"], (args.num_tokens,), generator=g).tolist()
    print(f"device: {torch.cuda.get_device_name()} | params {n_params / 1e9:.3f}B | seq {args.seq_length} | "
          f"{args.num_tokens} tokens | attention {args.attention_backend} | compile {args.compile}")
    print(f"{'stride':>6} {'mbs':>4} {'windows':>13} {'seconds':>8} {'window tok/s':>13} {'targets/s':>10} "
          f"{'full pass est. s':>16} {'peak GiB':>8}")
    for stride in args.strides:
        for mbs in args.micro_batch_sizes:
            torch.cuda.reset_peak_memory_stats()
            try:
                row = run_row(model, config, tokens, shape, stride, mbs, args.max_windows, "cuda")
            except torch.OutOfMemoryError:
                print(f"{stride:>6} {mbs:>4} out of memory")
                torch.cuda.empty_cache()
                continue
            full = row["seconds"] * row["all_windows"] / row["windows"]
            print(f"{stride:>6} {mbs:>4} {row['windows']:>6}/{row['all_windows']:<6} {row['seconds']:>8.2f} "
                  f"{row['window_tokens_per_s']:>13.0f} {row['targets_per_s']:>10.0f} {full:>16.1f} "
                  f"{torch.cuda.max_memory_allocated() / 2**30:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
