"""--mock-data gives Megatron-Core's MockGPTDataset samples, in its order, bit for bit.

Megatron-Core (when installed) builds its mock splits in a subprocess (tests/megatron_mock_oracle.py;
importing it in this process would change PyTorch's weights-only allow-list) and writes the first
samples of each split; ours must match them exactly: tokens, labels, loss mask, position ids and
attention mask, and the length of each split.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_mock_oracle import run_mock_oracle  # noqa: E402
from megatron_oracle import megatron_available  # noqa: E402

from gigatron.core.data import build_gpt_datasets  # noqa: E402
from gigatron.core.data.config import DataConfig  # noqa: E402
from gigatron.core.tokenizers.null import NullTokenizer  # noqa: E402

COUNT = 120
FLAGS = ("reset_position_ids", "reset_attention_mask", "eod_mask_loss")

# (seq_length, seed, vocab_size, sizes, split, flags): each shapes the indices or the tokens.
CASES = {
    "trace": (32, 1234, 4096, (32, 8, 4), None, ()),
    # Megatron-Core splits mock documents 1,1,1 whatever --split says
    "split_ignored": (32, 1234, 4096, (400, 40, 40), "98,1,1", ()),
    # ids wrap at the tokenizer's vocabulary size (1001 with --vocab-size 1000)
    "small_vocab": (64, 7, 1000, (200, 20, 20), None, ()),
    "resets": (16, 99, 4096, (300, 30, 30), "1,1,1", FLAGS),
    "eod_loss_no_mask": (128, 5, 50000, (150, 150, 10), None, ("eod_mask_loss", "no_create_attention_mask")),
}


@pytest.mark.skipif(not megatron_available(), reason="megatron-core is not installed")
@pytest.mark.parametrize("name", sorted(CASES))
def test_mock_samples_match_megatron(name, tmp_path):
    seq, seed, vocab, sizes, split, flags = CASES[name]
    out = str(tmp_path / "megatron.npz")
    argv = ["--seq-length", str(seq), "--seed", str(seed), "--vocab-size", str(vocab),
            "--sizes", ",".join(map(str, sizes)), "--count", str(COUNT)]
    argv += ["--split", split] if split else []
    argv += ["--" + f.replace("_", "-") for f in flags]
    run_mock_oracle(out, *argv)
    theirs = np.load(out)

    config = DataConfig(mock_data=True, seq_length=seq, seed=seed, split=split,
                        create_attention_mask_in_dataloader="no_create_attention_mask" not in flags,
                        **{f: True for f in flags if f in FLAGS})
    ours = build_gpt_datasets(config, NullTokenizer(vocab), list(sizes))
    compared = 0
    for split_name, dataset, size in zip(("train", "valid", "test"), ours, sizes):
        assert len(dataset) == int(theirs[f"{split_name}_len"]), split_name
        keys = [k for k in ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")
                if f"{split_name}_{k}" in theirs]
        assert ("attention_mask" in keys) == ("no_create_attention_mask" not in flags)
        for i in range(COUNT):
            sample = dataset[i]
            assert sorted(sample) == sorted(keys), (split_name, i)
            for key in keys:
                mine, reference = sample[key].numpy(), theirs[f"{split_name}_{key}"][i]
                assert mine.dtype == reference.dtype and np.array_equal(mine, reference), (split_name, i, key)
            compared += 1
    assert compared >= 2 * COUNT


def test_mock_run_with_a_small_vocabulary_trains():
    """Mock ids wrap at the tokenizer's vocabulary, so a vocabulary below the 4095 ids of the longest
    mock document trains (as in Megatron) instead of being refused."""
    from gigatron.training.entry import pretrain_gpt_main

    pretrain_gpt_main(["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "16",
                       "--max-position-embeddings", "16", "--micro-batch-size", "1", "--global-batch-size", "1",
                       "--vocab-size", "1000", "--mock-data", "--lr", "1e-3", "--train-iters", "1", "--eval-iters", "0",
                       "--num-workers", "0", "--no-loss-curve"])
    dataset = build_gpt_datasets(DataConfig(mock_data=True, seq_length=4096), NullTokenizer(1000), [4, 0, 0])[0]
    tokens = np.concatenate([dataset[i]["tokens"].numpy() for i in range(4)])
    assert tokens.max() == 1000 and tokens.min() >= 0  # eod is 1000, the last id of a 1001-id vocabulary
