"""Pretrain a Mamba-2 or hybrid Mamba-Transformer model: `python pretrain_mamba.py <Megatron flags>`
or `torchrun ... pretrain_mamba.py ...` (the layer pattern: --hybrid-override-pattern, or
--hybrid-attention-ratio / --hybrid-mlp-ratio)."""

import sys

from gigatron.cli import run_cli
from gigatron.training.mamba import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
