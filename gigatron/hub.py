"""`gigatron.from_pretrained`: a ready-to-run model from a checkpoint folder.

    model = gigatron.from_pretrained("ckpt/")            # a Gigatron/Megatron checkpoint (torch, torch_dist)
    model = gigatron.from_pretrained("Llama-3-8B-hf/")   # or a HuggingFace folder
    logits = model(token_ids)                            # [b, s] -> [b, s, V] over the true vocabulary

A checkpoint saved at any tensor/pipeline parallel layout is merged onto one device.
Shape legend: b = batch, s = sequence, V = true vocabulary, Vp = padded vocabulary.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Union

import torch
from torch import nn

from gigatron.core.checkpoint.formats import is_hf_folder, locate
from gigatron.core.convert.hf import hf_messages
from gigatron.core.convert.protocol import (
    TOKENIZER_FLAGS,
    collect_state,
    dtype_from_name,
    moe_config_from_metadata,
    transformer_config_from_metadata,
)
from gigatron.core.convert.torch_format import (
    TOKENIZER_DIRNAME,
    model_state_to_metadata,
    rank_state_dicts,
    tokenizer_flags_for_dir,
)

__all__ = ["PretrainedGPT", "from_pretrained"]

_TOKENIZER_FLAGS = TOKENIZER_FLAGS  # what the checkpoint's metadata says about its tokenizer


class PretrainedGPT(nn.Module):
    """A GPTModel on one device whose forward returns logits over the true vocabulary.

    forward(input_ids [b, s], position_ids [b, s] | None, attention_mask | None) -> logits [b, s, V]
    (the padded vocabulary entries are cut off, so they never receive probability).

    Attributes: `model` (the GPTModel), `config` (its TransformerConfig), `vocab_size` (V),
    `padded_vocab_size` (Vp), `tokenizer_args` (the tokenizer flags), `tokenizer_path` (the
    tokenizer file or folder, or None) and `metadata` (what the checkpoint said about the model)."""

    def __init__(self, model: nn.Module, vocab_size: int, tokenizer_args: dict, metadata: dict):
        super().__init__()
        self.model = model
        self.config = model.config
        self.vocab_size = int(vocab_size)
        self.padded_vocab_size = int(model.vocab_size)
        self.tokenizer_args = dict(tokenizer_args)
        self.tokenizer_path = (tokenizer_args.get("tokenizer_model") or tokenizer_args.get("vocab_file"))
        self.metadata = metadata

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, sequence] token ids, got shape {tuple(input_ids.shape)}")
        logits = self.model(input_ids, position_ids, attention_mask)  # [s, b, Vp]
        return logits[..., : self.vocab_size].transpose(0, 1).contiguous()  # [b, s, V]

    def generate(self, prompt_ids, max_new_tokens: int = 32, **options):
        """Token ids of the prompt(s) followed by up to max_new_tokens generated ones, greedy unless
        sampling options are given (gigatron.generation.generate)."""
        from gigatron.generation import generate
        return generate(self, prompt_ids, max_new_tokens, **options)

    def tokenizer(self):
        """The checkpoint's tokenizer (gigatron.core.tokenizers), built from `tokenizer_args`."""
        from gigatron.core.tokenizers import build_tokenizer

        if not self.tokenizer_args.get("tokenizer_type"):
            raise ValueError("this checkpoint names no tokenizer; build one with gigatron.core.tokenizers")
        return build_tokenizer(argparse.Namespace(**self.tokenizer_args))


def _tokenizer_args(md: dict, path: str, from_hf: bool) -> dict:
    flags = {k: md.get(k) for k in _TOKENIZER_FLAGS}
    if from_hf:
        return flags
    # A moved checkpoint: fall back to the tokenizer copied next to it.
    paths = [flags.get(k) for k in ("vocab_file", "merge_file", "tokenizer_model") if flags.get(k)]
    if paths and not all(os.path.exists(p) for p in paths):
        iter_dir, _, _ = locate(path)
        local = os.path.join(os.path.dirname(os.path.normpath(iter_dir)), TOKENIZER_DIRNAME)
        if os.path.isdir(local):
            flags.update(tokenizer_flags_for_dir(local, md))
    return flags


def _check_attention(config, device, dtype: torch.dtype) -> None:
    """Probe the attention kernel at load time, for causal and explicit-mask calls, so that a backend
    that cannot run here fails now rather than at the first call (results are cached)."""
    from gigatron.core.transformer.attention import check_attention_backend

    for with_mask in (False, True):
        check_attention_backend(config, torch.device(device), dtype, with_mask, False)


def from_pretrained(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
                    dtype: Optional[Union[torch.dtype, str]] = None) -> PretrainedGPT:
    """Load a model for inference on one device.

    path: a HuggingFace folder (config.json + safetensors/bin weights; GPT-2, Llama, Mistral,
      Mixtral), or
      a Gigatron/Megatron checkpoint in any format the registry reads (gigatron/core/checkpoint/
      formats.py: `torch` at any tensor/pipeline parallel layout, torch_dist): a save directory with
      latest_checkpointed_iteration.txt, or an iter_NNNNNNN / release directory; a checkpoint of
      pretrain_mamba.py (Mamba layers) gives a MambaModel. Every file is
      checked against the checkpoint's checksums before it is read, and loading never runs code
      stored in the checkpoint.
    device: where the model runs. dtype: the parameter dtype (default: the checkpoint's).
    Returns a PretrainedGPT in eval mode."""
    from gigatron.core.models.gpt import GPTModel
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.core.tokenizers import vocab_size_with_padding

    path = os.fspath(path)
    if dtype is not None:
        dtype = dtype_from_name(dtype)
    from_hf = is_hf_folder(path)
    if from_hf:
        messages = hf_messages(path)
    else:
        from gigatron.core.checkpoint.formats import read_model
        from gigatron.core.convert.protocol import state_to_messages

        saved = read_model(path)
        if any(".mixer." in name for name in saved.tensors):  # Mamba layers: pretrain_mamba.py's model
            return _mamba_from_state(saved, path, device, dtype)
        messages = state_to_messages(*model_state_to_metadata(saved))
    md, tensors = collect_state(messages)
    params_dtype = dtype or dtype_from_name(md.get("params_dtype", "float32"))
    config = transformer_config_from_metadata(
        md, 1, 1, params_dtype=params_dtype, attention_dropout=0.0, hidden_dropout=0.0,
        perform_initialization=False, use_cpu_initialization=True)
    padded = vocab_size_with_padding(int(md["true_vocab_size"]), md["make_vocab_size_divisible_by"], 1)
    model = GPTModel(config, ParallelGroups.single(), padded, moe_config=moe_config_from_metadata(md))
    state = rank_state_dicts(md, tensors, 1, 1, padded)[(0, 0)]
    model.load_state_dict(state, strict=True)
    model.to(device)
    _check_attention(config, device, params_dtype)
    wrapper = PretrainedGPT(model, md["true_vocab_size"], _tokenizer_args(md, path, from_hf), md)
    return wrapper.eval()


def _mamba_from_state(saved, path: str, device, dtype: Optional[torch.dtype]) -> PretrainedGPT:
    """A Mamba / hybrid model (gigatron/core/models/mamba.py) from a checkpoint read by the registry:
    the TransformerConfig from the model flags, the MambaConfig from the --mamba-* / --hybrid-* flags
    the checkpoint was saved with, the tensors at tensor-parallel size 1."""
    import dataclasses

    from gigatron.core.models.mamba import MambaModel
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.core.tokenizers import vocab_size_with_padding
    from gigatron.core.transformer.mamba.config import MambaConfig

    md, tensors = model_state_to_metadata(saved)
    params_dtype = dtype or dtype_from_name(md.get("params_dtype", "float32"))
    config = transformer_config_from_metadata(
        md, 1, 1, params_dtype=params_dtype, attention_dropout=0.0, hidden_dropout=0.0,
        perform_initialization=False, use_cpu_initialization=True)
    mamba_config = MambaConfig(**{f.name: saved.args[f.name] for f in dataclasses.fields(MambaConfig)
                                  if saved.args.get(f.name) is not None})
    padded = vocab_size_with_padding(int(md["true_vocab_size"]), md["make_vocab_size_divisible_by"], 1)
    model = MambaModel(config, mamba_config, ParallelGroups.single(), padded, moe_config=moe_config_from_metadata(md))
    state = rank_state_dicts(md, tensors, 1, 1, padded)[(0, 0)]
    model.load_state_dict(state, strict=True)
    model.to(device)
    if "*" in model.layer_types:
        _check_attention(config, device, params_dtype)
    wrapper = PretrainedGPT(model, md["true_vocab_size"], _tokenizer_args(md, path, False), md)
    return wrapper.eval()
