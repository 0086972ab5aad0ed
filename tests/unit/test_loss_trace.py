"""The stored loss trace: a refactor that is not meant to change numerics keeps these losses bitwise.

Each variant is a short fixed training run on the CPU in fp32 through the real training path
(`pretrain` with the command-line flags, mock data or a tiny indexed corpus made here, one thread).
Its per-iteration training losses, the validation loss and every micro-batch's reported loss sums
and token counts (all keys: BERT's sentence-order loss too) are compared bit for bit with
tests/data/loss_trace.json, where the floats are stored as `float.hex()`.

A change that is meant to change numerics re-records the file and says so in its commit message:

    PYTHONPATH=$PWD python tests/unit/test_loss_trace.py --record            # every variant
    PYTHONPATH=$PWD python tests/unit/test_loss_trace.py --record gpt2 moe   # some of them
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRACE_FILE = os.path.join(ROOT, "tests", "data", "loss_trace.json")

ITERATIONS = 8

# One run per variant: small enough that the whole file stays well under a minute on two cores.
COMMON = ["--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3", "--min-lr", "3e-4",
          "--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--train-iters", str(ITERATIONS),
          "--log-interval", "1", "--eval-interval", str(ITERATIONS), "--eval-iters", "1", "--num-workers", "0",
          "--seed", "1234", "--no-loss-curve", "--weight-decay", "0.01", "--clip-grad", "1.0"]

GPT_DATA = ["--mock-data", "--vocab-size", "4096", "--seq-length", "32", "--max-position-embeddings", "32"]

VARIANTS: dict[str, list[str]] = {
    # GPT-2: learned absolute positions, LayerNorm, GeLU, biases, tied embeddings, dropout on.
    "gpt2": GPT_DATA + ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                        "--attention-dropout", "0.1", "--hidden-dropout", "0.1"],
    # Llama: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied output layer.
    "llama": GPT_DATA + ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                         "--group-query-attention", "--num-query-groups", "2", "--position-embedding-type", "rope",
                         "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
                         "--untie-embeddings-and-output-weights", "--attention-dropout", "0",
                         "--hidden-dropout", "0"],
    # A tiny mixture of experts: top-2 of 4 experts with the aux loss, every second layer dense.
    "moe": GPT_DATA + ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                       "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
                       "--disable-bias-linear", "--num-experts", "4", "--moe-router-topk", "2",
                       "--moe-ffn-hidden-size", "32", "--moe-aux-loss-coeff", "0.01", "--moe-layer-freq", "[1,0]",
                       "--attention-dropout", "0", "--hidden-dropout", "0"],
    # BERT with the sentence-order head on a tiny sentence-level corpus (WordPiece vocabulary made here).
    "bert": ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
             "--max-position-embeddings", "32", "--tokenizer-type", "BertWordPieceLowerCase",
             "--split", "90,8,2", "--attention-dropout", "0.1", "--hidden-dropout", "0.1"],
    # T5 with learned positions on the same corpus.
    "t5": ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--encoder-seq-length", "32",
           "--decoder-seq-length", "16", "--max-position-embeddings", "32", "--tokenizer-type",
           "BertWordPieceLowerCase", "--vocab-extra-ids", "20", "--split", "90,8,2", "--attention-dropout", "0.1",
           "--hidden-dropout", "0.1"],
}

_WORDS = ("the model reads every sentence of the document and learns which words belong together while "
          "optimizer lowers loss step by step on a small machine").split()


def _vocab(path: str) -> None:
    special = ["[PAD]"] + [f"[unused{i}]" for i in range(4)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["."]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(special + letters + sorted(set(_WORDS))) + "\n")


def _sentence_corpus(directory: str) -> str:
    """A sentence-level indexed dataset of 40 documents, written in-process (deterministic)."""
    from types import SimpleNamespace

    from gigatron.core.data.indexed_dataset import IndexedDatasetBuilder
    from gigatron.core.tokenizers import build_tokenizer

    vocab = os.path.join(directory, "vocab.txt")
    _vocab(vocab)
    tokenizer = build_tokenizer(SimpleNamespace(tokenizer_type="BertWordPieceLowerCase", vocab_file=vocab,
                                                merge_file=None, tokenizer_model=None, vocab_size=None,
                                                vocab_extra_ids=0))
    prefix = os.path.join(directory, "corpus_text_sentence")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
    rng = torch.Generator().manual_seed(0)
    for _ in range(40):
        for _ in range(int(torch.randint(4, 9, (1,), generator=rng))):
            n = int(torch.randint(5, 12, (1,), generator=rng))
            words = [_WORDS[int(i)] for i in torch.randint(0, len(_WORDS), (n,), generator=rng)]
            builder.add_item(torch.tensor(tokenizer.tokenize(" ".join(words) + "."), dtype=torch.int32))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix, vocab


def _argv(name: str, directory: str) -> list[str]:
    argv = COMMON + VARIANTS[name] + ["--data-cache-path", os.path.join(directory, "cache")]
    if name in ("bert", "t5"):
        prefix, vocab = _sentence_corpus(directory)
        argv += ["--data-path", prefix, "--vocab-file", vocab]
    return argv


def run_variant(name: str) -> dict:
    """Train variant `name` and return {"train": [loss per iteration], "valid": [final validation losses]}."""
    from gigatron.training import bert, gpt, t5
    from gigatron.training.arguments import parse_args
    from gigatron.training.loop import pretrain

    module = {"bert": bert, "t5": t5}.get(name, gpt)
    reports: list = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as directory:
            extra = getattr(module, "extra_args_provider", None)
            args = parse_args(_argv(name, directory), extra_args_provider=extra)
            if name == "t5":
                t5.resolve_args(args)
            ctx = pretrain(module.datasets_provider, module.model_provider, _recording(module.forward_step, reports),
                           args=args)
    finally:
        torch.set_num_threads(threads)
    train = [loss for _, loss in ctx.log.train_history]
    valid = [loss for _, loss in ctx.log.valid_history]
    return {"train": [float(v).hex() for v in train], "valid": [float(v).hex() for v in valid],
            "micro_batches": reports}


def _recording(forward_step, reports: list):
    """`forward_step` whose loss functions also append each micro-batch's reported values (every key:
    the loss sum and its count, as hex floats) to `reports`: training and evaluation, in order."""

    def step(data_iterator, model):
        output_tensor, loss_func = forward_step(data_iterator, model)

        def recorded(output):
            loss, report = loss_func(output)
            reports.append({key: [float(v).hex() for v in value.detach().reshape(-1).tolist()]
                            for key, value in sorted(report.items())})
            return loss, report

        return output_tensor, recorded

    return step


def _stored() -> dict:
    with open(TRACE_FILE, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_loss_trace_is_bitwise_unchanged(name):
    stored = _stored()
    assert name in stored, f"{TRACE_FILE} has no trace for {name}; record it (see the module docstring)"
    got = run_variant(name)
    assert len(got["train"]) == ITERATIONS
    expected = stored[name]
    if got != expected:
        lines = [f"{name}: the losses differ from the stored trace ({TRACE_FILE}). If this change is meant to "
                 "change numerics, re-record: python tests/unit/test_loss_trace.py --record " + name]
        if got["micro_batches"] != expected["micro_batches"]:
            first = next((i for i, (a, b) in enumerate(zip(expected["micro_batches"], got["micro_batches"])) if a != b),
                         min(len(expected["micro_batches"]), len(got["micro_batches"])))
            lines.append(f"  micro-batch reports differ from number {first} on")
        for kind in ("train", "valid"):
            for i, (a, b) in enumerate(zip(expected[kind], got[kind])):
                if a != b:
                    lines.append(f"  {kind}[{i}]: stored {float.fromhex(a)!r} ({a}), now {float.fromhex(b)!r} ({b})")
            if len(expected[kind]) != len(got[kind]):
                lines.append(f"  {kind}: stored {len(expected[kind])} values, now {len(got[kind])}")
        pytest.fail("\n".join(lines))


def record(names: list[str]) -> None:
    """Re-run `names` (default: every variant) and write their traces into TRACE_FILE atomically."""
    traces = _stored() if os.path.isfile(TRACE_FILE) else {}
    for name in names or list(VARIANTS):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        traces[name] = run_variant(name)
        print(f"{name}: " + ", ".join(f"{float.fromhex(v):.6f}" for v in traces[name]["train"]), flush=True)
    os.makedirs(os.path.dirname(TRACE_FILE), exist_ok=True)
    temporary = TRACE_FILE + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump({k: traces[k] for k in sorted(traces)}, handle, indent=1)
        handle.write("\n")
    os.replace(temporary, TRACE_FILE)
    print(f"wrote {TRACE_FILE}")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "--record":
        raise SystemExit("usage: python tests/unit/test_loss_trace.py --record [VARIANT ...]")
    record(sys.argv[2:])
