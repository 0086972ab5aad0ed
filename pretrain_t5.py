"""Pretrain a T5 model: `python pretrain_t5.py <Megatron flags>` or `torchrun ... pretrain_t5.py ...`.

Needs a sentence-level dataset (tools/preprocess_data.py --split-sentences), a tokenizer with
sentinel tokens (--vocab-extra-ids 100), --encoder-seq-length and --decoder-seq-length."""

import sys

from gigatron.cli import run_cli
from gigatron.training.t5 import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
