"""Time the GPT dataset index builders on a synthetic corpus (default 1e8 tokens).

    python bench/bench_gpt_indices.py [--tokens 1e8] [--seq-length 2048] [--epochs 1 3] [--on-disk]

Prints one table row per stage: the document index (tile + shuffle), the sample index (cumulative
sum + searchsorted), the shuffle index, a two-dataset weighted blend and an exhaustive blend. With
--on-disk it also writes the corpus as a real .bin/.idx pair (uint16) and times opening it and
building a GPTDataset end to end, cache files included.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gigatron.core.data.gpt_dataset import GPTDataset, GPTDatasetConfig, num_epochs_for  # noqa: E402
from gigatron.core.data.index_helpers import (  # noqa: E402
    build_blending_indices,
    build_document_index,
    build_exhaustive_blending_indices,
    build_sample_index,
    build_shuffle_index,
)
from gigatron.core.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder  # noqa: E402
from gigatron.core.data.utils import Split  # noqa: E402


def synthetic_lengths(num_tokens: int, seed: int = 0) -> np.ndarray:
    """Document lengths drawn log-normally (median ~ 400 tokens, long tail), summing to num_tokens."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.lognormal(mean=6.0, sigma=1.0, size=int(num_tokens / 500) + 1000)).astype(np.int64)
    cum = np.cumsum(lengths)
    n = int(np.searchsorted(cum, num_tokens)) + 1
    lengths = lengths[:n]
    lengths[-1] -= int(cum[n - 1]) - num_tokens
    if lengths[-1] <= 0:
        lengths = lengths[:-1]
    return lengths.astype(np.int32)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_indices(lengths, seq_length, epochs, seed, rows):
    indices = np.arange(len(lengths), dtype=np.int32)
    tokens_per_epoch = int(lengths.sum(dtype=np.int64))
    num_samples = (epochs * tokens_per_epoch - 1) // seq_length
    num_epochs = num_epochs_for(tokens_per_epoch, num_samples, seq_length, 1)
    rng = np.random.RandomState(seed)
    doc, t_doc = timed(lambda: build_document_index(indices, num_epochs, rng, False))
    smp, t_smp = timed(lambda: build_sample_index(lengths, doc, seq_length, num_epochs, tokens_per_epoch))
    shf, t_shf = timed(lambda: build_shuffle_index(smp.shape[0] - 1, smp.shape[0] - 1, rng))
    tag = f"{epochs} epoch{'s' if epochs > 1 else ''}"
    rows.append((f"document_index ({tag})", f"{len(doc):,} docs", t_doc))
    rows.append((f"sample_index ({tag})", f"{smp.shape[0] - 1:,} samples", t_smp))
    rows.append((f"shuffle_index ({tag})", f"{len(shf):,} samples", t_shf))
    rows.append((f"all three ({tag})", f"{epochs * tokens_per_epoch:,} tokens", t_doc + t_smp + t_shf))
    return smp.shape[0] - 1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=float, default=1e8)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--blend-samples", type=float, default=1e7)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--on-disk", action="store_true")
    args = parser.parse_args()

    num_tokens = int(args.tokens)
    lengths = synthetic_lengths(num_tokens)
    print(f"corpus: {num_tokens:,} tokens in {len(lengths):,} documents (mean {lengths.mean():.0f}, "
          f"max {lengths.max():,}); seq_length {args.seq_length}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, numpy {np.__version__}")
    rows = []
    for e in args.epochs:
        bench_indices(lengths, args.seq_length, e, args.seed, rows)

    size = int(args.blend_samples)
    build_blending_indices([0.5, 0.5], 10)  # compile the helper outside the timing
    (di, _), t = timed(lambda: build_blending_indices([0.3, 0.7], size))
    share = np.bincount(di) / size
    rows.append(("blend 2 datasets (0.3/0.7)", f"{size:,} samples", t))
    (di5, _), t = timed(lambda: build_blending_indices([0.1, 0.2, 0.3, 0.25, 0.15], size))
    rows.append(("blend 5 datasets", f"{size:,} samples", t))
    half = size // 2
    _, t = timed(lambda: build_exhaustive_blending_indices([half - half // 3, half + half // 3]))
    rows.append(("exhaustive blend 2 datasets", f"{size:,} samples", t))
    small = min(size, 10**6)
    _, t = timed(lambda: build_blending_indices([0.3, 0.7], small, use_native=False))
    rows.append(("blend 2 datasets, pure-Python fallback", f"{small:,} samples", t))

    if args.on_disk:
        with tempfile.TemporaryDirectory() as tmp:
            prefix = os.path.join(tmp, "synthetic_text_document")
            rng = np.random.default_rng(0)

            def write():
                b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
                chunk_docs = 20000
                for beg in range(0, len(lengths), chunk_docs):
                    part = lengths[beg : beg + chunk_docs]
                    tokens = rng.integers(0, 50000, size=int(part.sum()), dtype=np.uint16)
                    for start, n in zip(np.cumsum(part) - part, part):  # one add_document per document
                        b.add_document(tokens[start : start + n], [int(n)])
                b.finalize(prefix + ".idx")

            _, t = timed(write)
            rows.append(("write .bin/.idx (add_document)", f"{len(lengths):,} docs", t))
            ds, t = timed(lambda: IndexedDataset(prefix))
            rows.append(("open + validate IndexedDataset", f"{os.path.getsize(prefix + '.bin') / 2**20:.0f} MiB", t))

            class Tok:
                eod, pad, vocab_size = 0, None, 50000

            config = GPTDatasetConfig(random_seed=args.seed, sequence_length=args.seq_length, tokenizer=Tok(),
                                      split="1,0,0", path_to_cache=os.path.join(tmp, "cache"))
            n_samples = (num_tokens - 1) // args.seq_length
            idx = np.arange(len(ds), dtype=np.int32)
            built, t = timed(lambda: GPTDataset(ds, prefix, idx, n_samples, Split.train, config))
            assert built.built_anew_on_cache_miss
            rows.append(("GPTDataset build + save cache", f"{len(built):,} samples", t))
            loaded, t = timed(lambda: GPTDataset(ds, prefix, idx, n_samples, Split.train, config))
            assert not loaded.built_anew_on_cache_miss
            rows.append(("GPTDataset load from cache", f"{len(loaded):,} samples", t))
            _, t = timed(lambda: [loaded[i] for i in range(1000)])
            rows.append(("GPTDataset __getitem__ x1000", f"seq {args.seq_length}", t))

    width = max(len(r[0]) for r in rows)
    print(f"\n{'stage':<{width}}  {'size':>22}  {'seconds':>8}")
    print("-" * (width + 34))
    for name, what, secs in rows:
        print(f"{name:<{width}}  {what:>22}  {secs:8.3f}")
    print(f"\n2-dataset blend share: {share.round(4).tolist()} (target [0.3, 0.7])")


if __name__ == "__main__":
    main()
