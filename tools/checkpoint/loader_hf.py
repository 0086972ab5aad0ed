"""Loader for HuggingFace folders (config.json + safetensors or pytorch_model.bin): GPT-2, Llama 2/3,
Mistral, Mixtral, and the Mamba families Mamba-2 and Nemotron-H (hybrid MambaModels; Bamba too; see
gigatron/core/convert/mamba_hf.py). The family is read from config.json's model_type. With --model-type BERT it reads a
HuggingFace BERT (BertModel, BertForPreTraining, MiniLM; see gigatron/core/convert/bert_hf.py)."""

from __future__ import annotations

import os

from gigatron.core.convert.bert_hf import hf_bert_messages
from gigatron.core.convert.hf import hf_messages
from gigatron.core.convert.torch_format import tokenizer_flags_for_dir


def add_arguments(parser) -> None:
    group = parser.add_argument_group("HuggingFace loader")
    group.add_argument("--bf16", action="store_true", help="Cast the weights to bfloat16.")
    group.add_argument("--fp16", action="store_true", help="Cast the weights to float16.")
    group.add_argument("--tokenizer-model", type=str, default=None,
                       help="Folder of tokenizer files to use instead of the model folder's.")


def load_checkpoint(args):
    import torch

    if args.bf16 and args.fp16:
        raise ValueError("--bf16 and --fp16 are exclusive; choose one")
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    tokenizer = getattr(args, "tokenizer_model", None)
    if tokenizer is not None and not os.path.isdir(tokenizer):
        raise ValueError(f"--tokenizer-model {tokenizer} is not a folder of tokenizer files")
    if getattr(args, "model_type", "GPT") == "BERT":
        messages = hf_bert_messages(args.load_dir, dtype)
    else:
        messages = hf_messages(args.load_dir, dtype)
    for name, payload in messages:
        if name == "metadata":
            if tokenizer is not None:
                payload["tokenizer_dir"] = os.path.abspath(tokenizer)
                payload.update(tokenizer_flags_for_dir(tokenizer, payload))
        yield name, payload

