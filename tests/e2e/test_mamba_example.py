"""examples/train_mamba_hybrid.sh (Megatron's Mamba example recipe, flags unchanged) runs on CPU
with its sizes shrunk: two processes under torchrun (tp=2 with sequence parallelism and the
distributed optimizer, bf16), real indexed data and a SentencePiece tokenizer; the run trains,
evaluates and saves the hybrid pattern the ratios allocate; relaunched after its checkpoint of
iteration 2 (as after a crash), it resumes there and logs the same losses."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "train_mamba_hybrid.sh")

# 13 layers at ratios 0.08 / 0.5: one attention layer, six MLP layers, six Mamba layers (the 8B
# hybrid's proportions); hidden 256 gives 8 Mamba heads of 64 in Megatron's default 8 groups.
SIZES = {"NUM_LAYERS": "13", "HIDDEN_SIZE": "256", "NUM_ATTENTION_HEADS": "8", "TENSOR_MODEL_PARALLEL_SIZE": "2",
         "NPROC": "2", "GLOBAL_BATCH_SIZE": "4", "MICRO_BATCH_SIZE": "2", "SEQ_LEN": "64", "LR_WARMUP_SAMPLES": "4",
         "LR_DECAY_SAMPLES": "8", "LOG_INTERVAL": "1", "SAVE_INTERVAL": "2", "EVAL_INTERVAL": "2", "EVAL_ITERS": "1"}


def _data(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    words = ("the quick brown fox jumps over the lazy dog while language models read many books and "
             "tokenizers split words into pieces state space models scan sequences").split()
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(words, size=int(rng.integers(40, 120)))) for _ in range(300)]
    (tmp_path / "corpus.txt").write_text("\n".join(docs), encoding="utf-8")
    with open(tmp_path / "corpus.jsonl", "w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps({"text": doc}) + "\n")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tok"),
                                   vocab_size=48, model_type="unigram", character_coverage=1.0, bos_id=1, eos_id=2,
                                   unk_id=0, pad_id=-1, minloglevel=2)
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input",
                    str(tmp_path / "corpus.jsonl"), "--output-prefix", str(tmp_path / "data"), "--tokenizer-type",
                    "GPTSentencePieceTokenizer", "--tokenizer-model", str(tmp_path / "tok.model"), "--append-eod",
                    "--workers", "1"], check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT))
    return str(tmp_path / "data_text_document"), str(tmp_path / "tok.model")


def _launch(tmp_path, data, tokenizer, train_samples):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TRAIN_SAMPLES=str(train_samples), **SIZES)
    result = subprocess.run(["bash", SCRIPT, data, tokenizer], capture_output=True, text=True, timeout=600,
                            env=env, cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="needs torchrun")
def test_megatron_mamba_recipe_shrunk_runs_on_cpu(tmp_path):
    from gigatron.core.checkpoint.dist import read_model
    from gigatron.core.transformer.mamba.config import hybrid_layer_types

    data, tokenizer = _data(tmp_path)
    out = _launch(tmp_path, data, tokenizer, 16)
    losses = re.findall(r"iteration +(\d+)/ +4 \| .*? lm loss: (\S+) \|", out)
    assert [int(i) for i, _ in losses] == [1, 2, 3, 4] and all(np.isfinite([float(x) for _, x in losses])), out
    assert "validation loss at iteration 2" in out
    tracker = tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt"
    assert tracker.read_text() == "4"

    state = read_model(str(tmp_path / "checkpoints" / "iter_0000004"))
    assert state.args["hybrid_attention_ratio"] == 0.08 and state.args["hybrid_mlp_ratio"] == 0.5
    kinds = []
    for i in range(13):
        names = [n for n in state.tensors if n.startswith(f"decoder.layers.{i}.")]
        kinds.append("M" if any(".mixer." in n for n in names) else
                     "*" if any(".self_attention." in n for n in names) else "-")
    assert kinds == hybrid_layer_types(13, 0.08, 0.5)
    assert kinds.count("*") == 1 and kinds.count("-") == 6 and kinds.count("M") == 6
    assert "output_layer.weight" in state.tensors  # --untie-embeddings-and-output-weights

    tracker.write_text("2")  # as if the run had stopped after its checkpoint of iteration 2
    resumed = _launch(tmp_path, data, tokenizer, 16)
    again = re.findall(r"iteration +(\d+)/ +4 \| .*? lm loss: (\S+) \|", resumed)
    assert again == losses[2:], resumed
