"""Saver for HuggingFace folders: model.safetensors (sharded above --max-shard-size-gb), config.json
and the tokenizer files. The family (gpt2, llama, mistral, mixtral; mamba2, nemotron_h or bamba for a Mamba /
hybrid model) is the source model's, or the one the checkpoint's args fit, unless --hf-family names it."""

from __future__ import annotations

import torch

from gigatron.core.convert.hf import FAMILIES, save_hf_checkpoint


def add_arguments(parser) -> None:
    group = parser.add_argument_group("HuggingFace saver")
    group.add_argument("--hf-family", type=str, choices=list(FAMILIES), default=None,
                       help="HuggingFace model_type to write (default: from the checkpoint).")
    group.add_argument("--max-shard-size-gb", type=float, default=5.0,
                       help="Largest safetensors file; bigger models are split with an index file.")
    group.add_argument("--saver-params-dtype", type=str, choices=["float32", "bfloat16", "float16"], default=None,
                       help="Cast the saved weights (default: keep the loaded dtype).")


def save_checkpoint(messages, args):
    if args.max_shard_size_gb <= 0:
        raise ValueError("--max-shard-size-gb must be positive")
    dtype = getattr(torch, args.saver_params_dtype) if args.saver_params_dtype else None
    return save_hf_checkpoint(messages, args.save_dir, checking=args.checking, family=args.hf_family,
                              params_dtype=dtype, max_shard_bytes=int(args.max_shard_size_gb * 1024 ** 3))
