"""Saver for Megatron-LM's own `torch` layout at a target tensor/pipeline/expert size: the files of
`--saver core`, but written for Megatron-LM's loader — `args` as an argparse.Namespace (it reads
`args.<flag>`), the `_extra_state` entries Megatron-Core's modules expect, and with
`--saver-transformer-impl transformer_engine` (Megatron's default) the fused-norm names of its
Transformer Engine layer spec (gigatron/core/checkpoint/megatron_torch.py; always for a Mamba / hybrid
model, whose only Megatron-Core spec it is). Gigatron reads the
result back like any Megatron-LM checkpoint. No optimizer or RNG state: load it in Megatron-LM with
--finetune, or --no-load-optim --no-load-rng.
--model-type BERT and T5 (Megatron-Core's BertModel / T5Model) go through
gigatron/core/convert/encoder_models.py."""

from __future__ import annotations

import torch

from gigatron.core.checkpoint.megatron_torch import megatron_file_content
from gigatron.core.convert.encoder_models import ENCODER_MODEL_TYPES, save_encoder_checkpoint
from gigatron.core.convert.torch_format import save_torch_checkpoint


def add_arguments(parser) -> None:
    group = parser.add_argument_group("Megatron-LM torch saver")
    group.add_argument("--target-tensor-parallel-size", type=int, default=1,
                       help="Tensor parallel size of the saved checkpoint.")
    group.add_argument("--target-pipeline-parallel-size", type=int, default=1,
                       help="Pipeline parallel size of the saved checkpoint.")
    group.add_argument("--target-expert-parallel-size", type=int, default=1,
                       help="Expert parallel size of the saved checkpoint (mixture-of-experts models).")
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                       help="Pad the vocabulary to a multiple of this times the tensor parallel size "
                            "(default: the source's).")
    group.add_argument("--saver-params-dtype", type=str, choices=["float32", "bfloat16", "float16"], default=None,
                       help="Cast the saved weights (default: keep the loaded dtype).")
    group.add_argument("--saver-transformer-impl", choices=["transformer_engine", "local"],
                       default="transformer_engine",
                       help="Megatron-LM's --transformer-impl the checkpoint is written for: transformer_engine "
                            "fuses the layer norms' names into the following linear layer.")


def save_checkpoint(messages, args):
    if getattr(args, "model_type", "GPT") in ENCODER_MODEL_TYPES:  # Megatron-Core's BertModel / T5Model
        return save_encoder_checkpoint(messages, args.save_dir, args.model_type, "megatron_torch",
                                       getattr(args, "target_tensor_parallel_size", 1), args.saver_params_dtype,
                                       transformer_engine=args.saver_transformer_impl == "transformer_engine")
    for flag in ("target_tensor_parallel_size", "target_pipeline_parallel_size", "target_expert_parallel_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    dtype = getattr(torch, args.saver_params_dtype) if args.saver_params_dtype else None

    def content(header: dict, state_dict: dict, md: dict) -> dict:
        # Megatron-Core's one Mamba stack spec is Transformer Engine's: a MambaModel gets its names
        impl = "transformer_engine" if md.get("mamba_model") else args.saver_transformer_impl
        header = dict(header, args=dict(header["args"], transformer_impl=impl))
        return megatron_file_content(header, state_dict, transformer_engine=impl == "transformer_engine")

    return save_torch_checkpoint(messages, args.save_dir, args.target_tensor_parallel_size,
                                 args.target_pipeline_parallel_size, checking=args.checking,
                                 make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, params_dtype=dtype,
                                 target_ep=args.target_expert_parallel_size, file_content=content)
