"""Pretrain a BERT model: `python pretrain_bert.py <Megatron flags>` or `torchrun ... pretrain_bert.py ...`.

Needs a sentence-level dataset (tools/preprocess_data.py --split-sentences) and a WordPiece
tokenizer (--tokenizer-type BertWordPieceLowerCase --vocab-file vocab.txt)."""

import sys

from gigatron.cli import run_cli
from gigatron.training.bert import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
