"""Saver for Megatron-Core's own torch_dist layout (Megatron-LM's default --ckpt-format): a
directory `megatron.core.dist_checkpointing.load` reads into Megatron-Core's GPTModel at any
tensor/pipeline size (decoder layers stacked under one key, fused-norm names; see
gigatron/core/checkpoint/megatron_dist.py), and a Mamba / hybrid model as its MambaModel's
(layers under their own numbers, the mixer's in_proj and conv1d split into parts: see
megatron_names.py). Gigatron reads it back too (from_pretrained, --load, --loader core). Dense
models; mixture-of-experts models are refused.
--model-type BERT and T5 (Megatron-Core's BertModel / T5Model) go through
gigatron/core/convert/encoder_models.py."""

from __future__ import annotations

import torch

from gigatron.core.checkpoint.megatron_dist import write_megatron_dist
from gigatron.core.checkpoint.tp_layout import VOCAB_PARAMS, pad_vocab
from gigatron.core.convert.encoder_models import ENCODER_MODEL_TYPES, save_encoder_checkpoint
from gigatron.core.convert.protocol import collect_state, dtype_name
from gigatron.core.convert.torch_format import args_for_target, copy_tokenizer_files


def add_arguments(parser) -> None:
    group = parser.add_argument_group("Megatron-Core torch_dist saver")
    group.add_argument("--target-tensor-parallel-size", type=int, default=1,
                       help="Tensor parallel size the vocabulary is padded for (Megatron pads to a multiple of "
                            "--make-vocab-size-divisible-by x this); the files load at any size.")
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                       help="Pad the vocabulary to a multiple of this times the tensor parallel size "
                            "(default: the source's).")
    group.add_argument("--saver-params-dtype", type=str, choices=["float32", "bfloat16", "float16"], default=None,
                       help="Cast the saved weights (default: keep the loaded dtype).")


def save_checkpoint(messages, args):
    if getattr(args, "model_type", "GPT") in ENCODER_MODEL_TYPES:  # Megatron-Core's BertModel / T5Model
        return save_encoder_checkpoint(messages, args.save_dir, args.model_type, "megatron_dist",
                                       getattr(args, "target_tensor_parallel_size", 1), args.saver_params_dtype,
                                       transformer_engine=False)
    import os

    from gigatron.core.tokenizers import vocab_size_with_padding

    if args.target_tensor_parallel_size < 1:
        raise ValueError("--target-tensor-parallel-size must be >= 1")
    md, tensors = collect_state(messages, args.checking)
    if md.get("num_experts"):
        raise ValueError("--saver megatron_dist writes dense GPT models; save mixture-of-experts models with --saver core")
    if args.make_vocab_size_divisible_by is not None:
        md["make_vocab_size_divisible_by"] = int(args.make_vocab_size_divisible_by)
    if args.saver_params_dtype:
        md["params_dtype"] = args.saver_params_dtype
        tensors = {k: v.to(getattr(torch, args.saver_params_dtype)) for k, v in tensors.items()}
    tp = args.target_tensor_parallel_size
    padded = vocab_size_with_padding(int(md["true_vocab_size"]), md["make_vocab_size_divisible_by"], tp)
    tensors = {k: (pad_vocab(v, padded) if k in VOCAB_PARAMS else v) for k, v in tensors.items()}
    os.makedirs(args.save_dir, exist_ok=True)
    flags = copy_tokenizer_files(md, os.path.join(args.save_dir, "tokenizer"))
    saved_args = args_for_target(md, tp, 1, padded, flags)
    saved_args.update(params_dtype=dtype_name(next(iter(tensors.values())).dtype), ckpt_format="torch_dist")
    return write_megatron_dist(args.save_dir, tensors, saved_args, md.get("iteration"))
