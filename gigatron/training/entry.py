"""Console entry points (`pretrain_gpt`)."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

__all__ = ["pretrain_gpt_main"]


def pretrain_gpt_main(argv: Optional[Sequence[str]] = None) -> int:
    """Pretrain a GPT model from Megatron-style flags (`pretrain_gpt --help` lists them)."""
    from gigatron.training import gpt
    from gigatron.training.arguments import parse_args
    from gigatron.training.loop import pretrain

    import torch.distributed as dist

    args = parse_args(argv)
    try:
        pretrain(gpt.datasets_provider, gpt.model_provider, gpt.forward_step, args=args)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(pretrain_gpt_main())
