"""Loader for Megatron-LM's pre-Megatron-Core ("legacy") GPT checkpoints (and BERT ones with
--model-type BERT), e.g. the published 345M models (`release/mp_rank_00/model_optim_rng.pt`,
tracker `release`), at any tensor/pipeline size (BERT: one pipeline stage):
`language_model.encoder.layers.N.self_attention.query_key_value.weight` and friends are mapped to
Megatron-Core's names (gigatron/core/checkpoint/legacy.py). Files are read through an allow-list
of what Megatron stores: no code from the checkpoint runs."""

from __future__ import annotations

from gigatron.core.checkpoint import formats
from gigatron.core.checkpoint.io import CheckpointError
from gigatron.core.convert.encoder_models import encoder_checkpoint_messages
from gigatron.core.convert.torch_format import torch_checkpoint_messages


def add_arguments(parser) -> None:
    group = parser.add_argument_group("legacy loader")
    group.add_argument("--true-vocab-size", type=int, default=None,
                       help="Vocabulary size without padding (default: from the checkpoint's args or tokenizer).")


def load_checkpoint(args):
    if getattr(args, "model_type", "GPT") == "BERT":
        return encoder_checkpoint_messages(args.load_dir, "BERT", legacy_only=True)
    _, _, module = formats.locate(args.load_dir)
    if module.NAME != "legacy":
        raise CheckpointError(f"{args.load_dir} is a {module.NAME} checkpoint, not the pre-Megatron-Core (legacy) "
                              "layout: convert it with --loader core")
    return torch_checkpoint_messages(args.load_dir, args.true_vocab_size)
