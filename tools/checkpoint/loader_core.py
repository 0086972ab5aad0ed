"""Loader for Gigatron/Megatron checkpoints in any format the checkpoint registry reads (`torch` saved
at any tensor/pipeline/expert parallel size, torch_dist, Megatron-LM's own `torch` files): a save
directory with latest_checkpointed_iteration.txt, or an iteration directory."""

from __future__ import annotations

from gigatron.core.convert.encoder_models import ENCODER_MODEL_TYPES, encoder_checkpoint_messages
from gigatron.core.convert.torch_format import torch_checkpoint_messages


def add_arguments(parser) -> None:
    group = parser.add_argument_group("torch-format loader")
    group.add_argument("--true-vocab-size", type=int, default=None,
                       help="Vocabulary size without padding (default: from the checkpoint's args or tokenizer).")
    group.add_argument("--allow-pickle", action="store_true",
                       help="Also accept args stored as an argparse Namespace in a file that otherwise looks like "
                            "Gigatron's. Checkpoints written by Megatron-LM itself are read without it, through an "
                            "allow-list of what Megatron stores: no other object is built, no code runs.")


def load_checkpoint(args):
    if getattr(args, "model_type", "GPT") in ENCODER_MODEL_TYPES:  # Megatron-Core's BertModel / T5Model
        return encoder_checkpoint_messages(args.load_dir, args.model_type)
    return torch_checkpoint_messages(args.load_dir, args.true_vocab_size, args.allow_pickle)
