"""Pretrain a GPT model: `python pretrain_gpt.py <Megatron flags>` or `torchrun ... pretrain_gpt.py ...`."""

import sys

from gigatron.cli import run_cli
from gigatron.training.entry import pretrain_gpt_main

if __name__ == "__main__":
    sys.exit(run_cli(pretrain_gpt_main))
