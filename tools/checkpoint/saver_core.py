"""Saver for Gigatron/Megatron `torch`-format checkpoints at a target tensor/pipeline parallel size.
Writes `args` so that `--use-checkpoint-args` brings the model up, and copies the tokenizer files
to <save-dir>/tokenizer. --model-type BERT writes BertModel(layer_norm="post") (see
gigatron/core/convert/bert_hf.py)."""

from __future__ import annotations

import torch

from gigatron.core.convert.bert_hf import save_bert_torch_checkpoint
from gigatron.core.convert.torch_format import save_torch_checkpoint


def add_arguments(parser) -> None:
    group = parser.add_argument_group("torch-format saver")
    group.add_argument("--target-tensor-parallel-size", type=int, default=1,
                       help="Tensor parallel size of the saved checkpoint.")
    group.add_argument("--target-pipeline-parallel-size", type=int, default=1,
                       help="Pipeline parallel size of the saved checkpoint.")
    group.add_argument("--target-expert-parallel-size", type=int, default=1,
                       help="Expert parallel size of the saved checkpoint (mixture-of-experts models: each "
                            "expert-parallel rank holds num_experts / this many experts).")
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                       help="Pad the vocabulary to a multiple of this times the tensor parallel size "
                            "(default: the source's, 128 for HuggingFace models).")
    group.add_argument("--saver-params-dtype", type=str, choices=["float32", "bfloat16", "float16"], default=None,
                       help="Cast the saved weights (default: keep the loaded dtype).")


def save_checkpoint(messages, args):
    for flag in ("target_tensor_parallel_size", "target_pipeline_parallel_size", "target_expert_parallel_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    dtype = getattr(torch, args.saver_params_dtype) if args.saver_params_dtype else None
    if getattr(args, "model_type", "GPT") == "BERT" and args.target_expert_parallel_size != 1:
        raise ValueError("--target-expert-parallel-size applies to mixture-of-experts models; BERT needs 1")
    if getattr(args, "model_type", "GPT") == "BERT":
        return save_bert_torch_checkpoint(messages, args.save_dir, args.target_tensor_parallel_size,
                                          args.target_pipeline_parallel_size,
                                          make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                                          params_dtype=dtype)
    return save_torch_checkpoint(messages, args.save_dir, args.target_tensor_parallel_size,
                                 args.target_pipeline_parallel_size, checking=args.checking,
                                 make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, params_dtype=dtype,
                                 target_ep=args.target_expert_parallel_size)
