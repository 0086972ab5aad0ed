"""Upstream Megatron-Core's ``--mock-data`` samples as a test oracle.

Builds Megatron-Core's ``MockGPTDataset`` splits with its own ``BlendedMegatronDatasetBuilder`` and
``NullTokenizer`` (what Megatron-LM's ``pretrain_gpt.py --mock-data --tokenizer-type NullTokenizer``
builds) and writes the first samples of each split to an ``.npz`` file. Run it in a subprocess
(``run_mock_oracle``): importing megatron.core changes PyTorch's weights-only allow-list, which must
not leak into the test process (see tests/megatron_oracle.py).

    python tests/megatron_mock_oracle.py --out FILE --seq-length 32 --seed 1234 --vocab-size 4096 \
        --sizes 400,40,40 --count 100 [--split 98,1,1] [--reset-position-ids] [--reset-attention-mask] \
        [--eod-mask-loss] [--no-create-attention-mask]

FILE holds, per split name (train, valid, test) with samples, ``{split}_{key}`` arrays stacked over
the first ``count`` samples for key in tokens, labels, loss_mask, position_ids (and attention_mask
when created), and ``{split}_len`` (the split's number of samples).
"""

from __future__ import annotations

import argparse
import os
import warnings

warnings.filterwarnings("ignore")

KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")


def _main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--seq-length", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--sizes", required=True, help="train,valid,test numbers of samples")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--split", default=None)
    parser.add_argument("--reset-position-ids", action="store_true")
    parser.add_argument("--reset-attention-mask", action="store_true")
    parser.add_argument("--eod-mask-loss", action="store_true")
    parser.add_argument("--no-create-attention-mask", action="store_true")
    opts = parser.parse_args(argv)

    import numpy as np
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    config = GPTDatasetConfig(
        random_seed=opts.seed, sequence_length=opts.seq_length, blend=None, blend_per_split=None,
        split=opts.split, path_to_cache=None, tokenizer=NullTokenizer(opts.vocab_size),
        reset_position_ids=opts.reset_position_ids, reset_attention_mask=opts.reset_attention_mask,
        eod_mask_loss=opts.eod_mask_loss, create_attention_mask=not opts.no_create_attention_mask)
    sizes = [int(s) for s in opts.sizes.split(",")]
    datasets = BlendedMegatronDatasetBuilder(MockGPTDataset, sizes, lambda: True, config).build()
    arrays = {}
    for name, dataset in zip(("train", "valid", "test"), datasets):
        if dataset is None:
            continue
        arrays[f"{name}_len"] = np.array(len(dataset))
        samples = [dataset[i] for i in range(min(opts.count, len(dataset)))]
        for key in KEYS:
            if key in samples[0]:
                arrays[f"{name}_{key}"] = np.stack([s[key].numpy() for s in samples])
    tmp = opts.out + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, opts.out)


def run_mock_oracle(out: str, *argv: str, timeout: int = 300) -> None:
    """Run this file with ``--out out`` and ``argv`` in a fresh Python process (forked from a server
    that has imported megatron.core once, tests/script_server.py)."""
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    from megatron_oracle import _script_server

    [(code, output)] = _script_server().run_script(__file__, ["--out", out, *argv],
                                                   [dict(os.environ, PYTHONWARNINGS="ignore")], timeout=timeout)
    if code != 0:
        raise RuntimeError(f"Megatron-Core mock-data oracle exited {code}:\n{output[-6000:]}")


if __name__ == "__main__":
    _main()
