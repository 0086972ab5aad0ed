"""Saver for Megatron-LM's pre-Megatron-Core ("legacy") GPT layout at a target tensor/pipeline
size: `language_model.embedding…`, `language_model.encoder.layers.N.self_attention.query_key_value…`
(gigatron/core/checkpoint/legacy.py), `args` as an argparse.Namespace of plain values (Megatron-LM
reads `args.<flag>`), checkpoint_version 3.0. A checkpoint without an iteration is written as
`release/` with the tracker `release`, like the published 345M model.
--model-type BERT (Megatron's BERT layout, e.g. the published 345M BERT) goes through
gigatron/core/convert/encoder_models.py."""

from __future__ import annotations

import torch

from gigatron.core.checkpoint.legacy import legacy_file_content
from gigatron.core.convert.encoder_models import ENCODER_MODEL_TYPES, save_encoder_checkpoint
from gigatron.core.convert.torch_format import save_torch_checkpoint


def add_arguments(parser) -> None:
    group = parser.add_argument_group("legacy saver")
    group.add_argument("--target-tensor-parallel-size", type=int, default=1,
                       help="Tensor parallel size of the saved checkpoint.")
    group.add_argument("--target-pipeline-parallel-size", type=int, default=1,
                       help="Pipeline parallel size of the saved checkpoint.")
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                       help="Pad the vocabulary to a multiple of this times the tensor parallel size "
                            "(default: the source's).")
    group.add_argument("--saver-params-dtype", type=str, choices=["float32", "bfloat16", "float16"], default=None,
                       help="Cast the saved weights (default: keep the loaded dtype).")


def _content(header: dict, state_dict: dict, md: dict) -> dict:
    if md.get("num_experts"):
        raise ValueError("the legacy layout has no mixture-of-experts names; save MoE models with --saver core")
    if md.get("mamba_model"):
        raise ValueError("the legacy layout has no Mamba / hybrid layer names; save Mamba models with --saver core")
    return legacy_file_content(header, state_dict, tied_head=not md["untie_embeddings_and_output_weights"])


def save_checkpoint(messages, args):
    if getattr(args, "model_type", "GPT") in ENCODER_MODEL_TYPES:  # Megatron-Core's BertModel / T5Model
        return save_encoder_checkpoint(messages, args.save_dir, args.model_type, "legacy",
                                       getattr(args, "target_tensor_parallel_size", 1), args.saver_params_dtype,
                                       transformer_engine=False)
    for flag in ("target_tensor_parallel_size", "target_pipeline_parallel_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    dtype = getattr(torch, args.saver_params_dtype) if args.saver_params_dtype else None
    return save_torch_checkpoint(messages, args.save_dir, args.target_tensor_parallel_size,
                                 args.target_pipeline_parallel_size, checking=args.checking,
                                 make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, params_dtype=dtype,
                                 file_content=_content)
