"""Megatron-LM's pre-Megatron-Core ("legacy") GPT checkpoints, read as they are: the published
345M layout `release/mp_rank_00/model_optim_rng.pt` with `latest_checkpointed_iteration.txt`
holding `release`, and `iter_N/mp_rank_TT[_PPP]/` of any tensor/pipeline size.

A rank file holds `args` (an argparse.Namespace, read with megatron_pickle.py's allow-list),
`checkpoint_version`, `iteration` and `model`: the nested legacy state dict whose names
megatron_names.py maps to ours (`language_model.encoder.layers.{i}.self_attention.query_key_value`
-> `decoder.layers.{i}.self_attention.linear_qkv`, ...); the fused QKV rows of versions before 2.0
are reordered. Each file is mapped, then merged over the ranks by torch_layout.py, so everything
that reads a model (from_pretrained, convert.py --loader legacy / core, --load at any layout with
--use-checkpoint-args) sees our names. `detect` claims rank files whose pickle holds
`language_model` names. Writing: `legacy_file_content` builds a rank file in this layout
(convert.py --saver legacy); training never saves it.
"""

from __future__ import annotations

import os
from typing import Optional

from gigatron.core.checkpoint import megatron_torch, torch_layout
from gigatron.core.checkpoint.header import CHECKPOINT_VERSION
from gigatron.core.checkpoint.io import CheckpointError
from gigatron.core.checkpoint.megatron_names import flatten, legacy_qkv_to_ours, legacy_to_ours, nest, ours_to_legacy
from gigatron.core.checkpoint.megatron_pickle import holds_legacy_names
from gigatron.core.checkpoint.state import ModelState, TrainingState

__all__ = ["NAME", "WRITES", "detect", "read_args", "read_model", "save_training_state", "load_training_state",
           "to_our_names", "legacy_file_content"]

NAME = "legacy"
WRITES = False  # training saves torch / torch_dist; convert.py --saver legacy writes this layout


def detect(iter_dir: str) -> bool:
    first = megatron_torch._first_file(iter_dir)
    return first is not None and holds_legacy_names(first)


def read_args(iter_dir: str, allow_namespace: bool = True) -> dict:
    return megatron_torch.read_args(iter_dir, allow_namespace)


def _head_dim(args: dict) -> int:
    if args.get("kv_channels"):
        return int(args["kv_channels"])
    if not args.get("hidden_size") or not args.get("num_attention_heads"):
        raise CheckpointError("the checkpoint's args lack hidden_size / num_attention_heads")
    return int(args["hidden_size"]) // int(args["num_attention_heads"])


def to_our_names(state: dict, path: str) -> dict:
    """A legacy rank file's content with `model` under our names (and plain args)."""
    state = megatron_torch._plain_state(state, path)
    if "model" not in state:
        raise CheckpointError(f"{path} holds no 'model' entry (virtual pipeline stages are not read in the legacy "
                              "layout)")
    version = float(state.get("checkpoint_version") or 0.0)
    flat = flatten(state["model"])
    model, unknown = {}, []
    for name, value in flat.items():
        if name.endswith("_extra_state"):
            continue
        ours = legacy_to_ours(name)
        if ours is None:
            unknown.append(name)
            continue
        if ".self_attention.linear_qkv." in ours:
            value = legacy_qkv_to_ours(value, version, _head_dim(state["args"]))
        model[ours] = value
    if unknown:
        raise CheckpointError(f"{path} holds legacy names that are not a GPT model's: {unknown[:8]}"
                              + (" (a BERT checkpoint: the legacy layout is read for GPT models only)"
                                 if any(n.startswith(("lm_head", "binary_head")) or ".pooler." in n for n in unknown)
                                 else ""))
    state["model"] = model
    state["checkpoint_version"] = version
    return state


def read_model(iter_dir: str, allow_namespace: bool = True) -> ModelState:
    del allow_namespace
    return torch_layout.read_model(iter_dir, allow_namespace=True, transform=to_our_names)


def save_training_state(root: str, iteration: int, model_chunks, optimizer, groups, header: dict, **kwargs) -> str:
    raise CheckpointError("the legacy layout is read-only in training: save with --ckpt-format torch or torch_dist "
                          "(convert.py --saver legacy writes it)")


def load_training_state(iter_dir: str, model_chunks, optimizer, groups, *, strict: bool = True) -> TrainingState:
    """The weights at any layout of this run (see megatron_torch.load_training_state)."""
    return megatron_torch.load_training_state(
        iter_dir, model_chunks, optimizer, groups, strict=strict,
        model_reader=lambda d, keep: torch_layout.read_model(
            d, allow_namespace=True, transform=lambda s, p: keep(to_our_names(s, p), p)))


def legacy_file_content(header: dict, state_dict: dict, tied_head: bool = False,
                        args_namespace: Optional[object] = None) -> dict:
    """One rank file of the legacy layout from our stage-local state dict: legacy nested names,
    `args` as an argparse.Namespace of plain values (Megatron-LM reads `args.<flag>`; a Namespace
    is on our loader's allow-list), checkpoint_version 3.0."""
    import argparse

    flat = {ours_to_legacy(name, tied_head and name == "output_layer.weight"): tensor
            for name, tensor in state_dict.items()}
    content = {key: value for key, value in header.items() if key != "args"}
    content["args"] = args_namespace if args_namespace is not None else argparse.Namespace(**header["args"])
    content["checkpoint_version"] = CHECKPOINT_VERSION
    content["model"] = nest(flat)
    return content
