"""BERT and T5 (Megatron-Core's BertModel and T5Model) between Megatron's checkpoint layouts:
convert.py --model-type BERT|T5 with --loader core / legacy and --saver megatron_dist /
megatron_torch / legacy (BERT only).

The message stream is ("metadata", md), (ENCODER_WEIGHTS_MESSAGE, tensors), ("done", {}), where
`tensors` are the model's full tensors under our (Megatron-Core's) names with the vocabulary as the
source padded it (kept: these layouts are loaded by Megatron at the source's padded vocabulary), and
md holds `model_type`, the source's flags (`args`), `iteration` (None: saved as `release`) and
`params_dtype`. The savers write Megatron's layouts with encoder_layout.py (torch), legacy.py
(legacy BERT) and megatron_dist.py (torch_dist).
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, Optional, Tuple

import torch

from gigatron.core.convert.protocol import ConversionError, dtype_name

__all__ = ["ENCODER_WEIGHTS_MESSAGE", "ENCODER_MODEL_TYPES", "encoder_checkpoint_messages", "collect_encoder_state",
           "save_encoder_checkpoint"]

ENCODER_WEIGHTS_MESSAGE = "encoder model weights"
ENCODER_MODEL_TYPES = ("BERT", "T5")


def encoder_checkpoint_messages(path: str, model_type: str, legacy_only: bool = False):
    """The messages of a BERT/T5 checkpoint in any layout the checkpoint registry reads (Megatron-Core's
    torch_dist, Megatron-LM's torch files, legacy BERT). `legacy_only`: refuse other layouts."""
    from gigatron.core.checkpoint import formats
    from gigatron.core.checkpoint.encoder_layout import model_kind

    _, _, module = formats.locate(path)
    if legacy_only and module.NAME != "legacy":
        raise ConversionError(f"{path} is a {module.NAME} checkpoint, not the pre-Megatron-Core (legacy) layout: "
                              "convert it with --loader core")
    state = formats.read_model(path)
    kind = model_kind(state.tensors)
    if kind != model_type:
        raise ConversionError(f"--model-type {model_type}: {path} holds a {kind} model; use --model-type {kind}")
    yield "metadata", {"model_type": model_type, "args": dict(state.args), "iteration": state.iteration,
                       "params_dtype": dtype_name(state.dtype)}
    yield ENCODER_WEIGHTS_MESSAGE, dict(state.tensors)
    yield "done", {}


def collect_encoder_state(messages: Iterable, model_type: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(metadata, full tensors) of a BERT/T5 message stream, checked."""
    it = iter(messages)
    first = next(it, None)
    if first is None or first[0] != "metadata":
        raise ConversionError("the loader sent no metadata message first")
    md = dict(first[1])
    if md.get("model_type") != model_type or "args" not in md:
        raise ConversionError(f"--model-type {model_type}: the loader produced a {md.get('model_type', 'GPT')} model "
                              f"stream; BERT and T5 are converted with --loader core or legacy")
    tensors: Dict[str, torch.Tensor] = {}
    done = False
    for name, payload in it:
        if name == ENCODER_WEIGHTS_MESSAGE:
            tensors.update(payload)
        elif name == "done":
            done = True
        else:
            raise ConversionError(f"unexpected message {name!r} in a {model_type} conversion")
    if not done:
        raise ConversionError("the loader stopped before its 'done' message")
    return md, tensors


def save_encoder_checkpoint(messages: Iterable, save_dir: str, model_type: str, layout: str, target_tp: int = 1,
                            params_dtype: Optional[str] = None, transformer_engine: bool = False) -> str:
    """Write a BERT/T5 stream in Megatron's `layout`: "megatron_dist" (Megatron-Core's torch_dist,
    loadable at any tensor-parallel size), "megatron_torch" (Megatron-LM's torch files at
    `target_tp`) or "legacy" (BERT's pre-Megatron-Core names at `target_tp`). Returns the
    iteration directory."""
    from gigatron.core.checkpoint.encoder_layout import write_megatron_torch
    from gigatron.core.checkpoint.legacy import write_legacy_bert
    from gigatron.core.checkpoint.megatron_dist import write_megatron_dist

    if target_tp < 1:
        raise ValueError(f"--target-tensor-parallel-size must be >= 1, got {target_tp}")
    if layout == "legacy" and model_type != "BERT":
        raise ValueError(f"the legacy layout holds GPT and BERT models; save a {model_type} with --saver "
                         "megatron_dist or megatron_torch")
    md, tensors = collect_encoder_state(messages, model_type)
    args = dict(md["args"])
    if params_dtype:
        tensors = {k: v.to(getattr(torch, params_dtype)) for k, v in tensors.items()}
        args["params_dtype"] = params_dtype
    vocab = tensors["embedding.word_embeddings.weight"].shape[0]
    if target_tp > 1 and vocab % target_tp:
        raise ValueError(f"the padded vocabulary ({vocab}) does not split over --target-tensor-parallel-size "
                         f"{target_tp}")
    os.makedirs(save_dir, exist_ok=True)
    iteration = md.get("iteration")
    if layout == "megatron_dist":
        return write_megatron_dist(save_dir, tensors, dict(args, ckpt_format="torch_dist"), iteration)
    if layout == "megatron_torch":
        return write_megatron_torch(save_dir, tensors, dict(args, ckpt_format="torch"), iteration, target_tp,
                                    transformer_engine)
    if layout == "legacy":
        return write_legacy_bert(save_dir, tensors, dict(args, ckpt_format="torch"), iteration, target_tp)
    raise ValueError(f"unknown BERT/T5 layout {layout!r}")
