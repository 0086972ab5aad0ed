"""Megatron-LM's pre-Megatron-Core ("legacy") GPT and BERT checkpoints, read as they are: the published
345M layouts `release/mp_rank_00/model_optim_rng.pt` with `latest_checkpointed_iteration.txt`
holding `release`, and `iter_N/mp_rank_TT[_PPP]/` of any tensor/pipeline size.

A rank file holds `args` (an argparse.Namespace, read with megatron_pickle.py's allow-list),
`checkpoint_version`, `iteration` and `model`: the nested legacy state dict whose names
megatron_names.py maps to ours (`language_model.encoder.layers.{i}.self_attention.query_key_value`
-> `decoder.layers.{i}.self_attention.linear_qkv`, ...); the fused QKV rows of versions before 2.0
are reordered. A BERT (its files hold `lm_head`: the masked-LM head, `binary_head`, the pooler
and token-type embeddings, megatron_names.py) maps its layers to our `encoder.layers.{i}.`.
Each file is mapped, then merged over the ranks (torch_layout.py for GPT at any tp/pp,
encoder_layout.py for BERT at any tp, one pipeline stage), so everything that reads a model
(from_pretrained, convert.py --loader legacy / core, --load at any layout with
--use-checkpoint-args) sees our names. `detect` claims rank files whose pickle holds
`language_model` names. Writing: `legacy_file_content` builds a rank file in this layout
(convert.py --saver legacy; `write_legacy_bert` for BERT); training never saves it.
"""

from __future__ import annotations

import os
from typing import Optional

from gigatron.core.checkpoint import encoder_layout, megatron_torch, torch_layout
from gigatron.core.checkpoint.header import CHECKPOINT_VERSION
from gigatron.core.checkpoint.io import CheckpointError
from gigatron.core.checkpoint.megatron_names import (
    flatten,
    is_legacy_bert,
    legacy_qkv_to_ours,
    legacy_to_ours,
    nest,
    ours_to_legacy,
)
from gigatron.core.checkpoint.megatron_pickle import holds_legacy_names, holds_name
from gigatron.core.checkpoint.state import ModelState, TrainingState

__all__ = ["NAME", "WRITES", "detect", "is_bert", "read_args", "read_model", "save_training_state",
           "load_training_state", "to_our_names", "legacy_file_content", "write_legacy_bert"]

NAME = "legacy"
WRITES = False  # training saves torch / torch_dist; convert.py --saver legacy writes this layout


def detect(iter_dir: str) -> bool:
    first = megatron_torch._first_file(iter_dir)
    return first is not None and holds_legacy_names(first)


def is_bert(iter_dir: str) -> bool:
    """A legacy BERT: its rank files hold the masked-LM head `lm_head`."""
    first = megatron_torch._first_file(iter_dir)
    return first is not None and holds_name(first, "lm_head")


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
    bert = is_legacy_bert(flat)
    model, unknown = {}, []
    for name, value in flat.items():
        if name.endswith("_extra_state"):
            continue
        ours = legacy_to_ours(name, bert)
        if ours is None:
            unknown.append(name)
            continue
        if ".self_attention.linear_qkv." in ours:
            value = legacy_qkv_to_ours(value, version, _head_dim(state["args"]))
        model[ours] = value
    if unknown:
        raise CheckpointError(f"{path} holds legacy names that are not a {'BERT' if bert else 'GPT'} model's: "
                              f"{unknown[:8]} (the legacy layout is read for GPT and BERT models; re-save others "
                              "with Megatron-LM as Megatron-Core models)")
    state["model"] = model
    state["checkpoint_version"] = version
    return state


def _read_full(iter_dir: str, transform) -> ModelState:
    if is_bert(iter_dir):
        return encoder_layout.read_model(iter_dir, transform)
    return torch_layout.read_model(iter_dir, allow_namespace=True, transform=transform)


def read_model(iter_dir: str, allow_namespace: bool = True) -> ModelState:
    del allow_namespace
    return _read_full(iter_dir, to_our_names)


def save_training_state(root: str, iteration: int, model_chunks, optimizer, groups, header: dict, **kwargs) -> str:
    raise CheckpointError("the legacy layout is read-only in training: save with --ckpt-format torch or torch_dist "
                          "(convert.py --saver legacy writes it)")


def load_training_state(iter_dir: str, model_chunks, optimizer, groups, *, strict: bool = True) -> TrainingState:
    """The weights at any layout of this run (see megatron_torch.load_training_state)."""
    return megatron_torch.load_training_state(
        iter_dir, model_chunks, optimizer, groups, strict=strict,
        model_reader=lambda d, keep: _read_full(d, lambda s, p: keep(to_our_names(s, p), p)))


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


def write_legacy_bert(root: str, tensors: dict, args: dict, iteration: Optional[int], tp: int = 1) -> str:
    """Write a BERT (full tensors, our names, padded vocabulary) in the legacy layout at
    tensor-parallel size `tp`: iter_N/mp_rank_TT/model_optim_rng.pt (release/ and the tracker
    `release` without an iteration, as the published 345M BERT), our checksum manifest, then the
    tracker. Returns the iteration directory."""
    if tp < 1:
        raise ValueError(f"--target-tensor-parallel-size must be >= 1, got {tp}")
    iter_dir = os.path.join(root, "release" if iteration is None else f"iter_{int(iteration):07d}")
    if torch_layout.rank_dirs(iter_dir):
        raise ValueError(f"{iter_dir} already holds a checkpoint; choose an empty --save-dir")
    header = {"args": dict(args, tensor_model_parallel_size=tp, pipeline_model_parallel_size=1),
              "iteration": int(iteration or 0)}
    records = dict(torch_layout.write_rank_file(
        iter_dir, os.path.join(f"mp_rank_{rank:02d}", torch_layout.MODEL_FILENAME),
        legacy_file_content(header, state_dict)) for rank, state_dict in enumerate(encoder_layout.shard(tensors, tp)))
    torch_layout.finish_save(root, iter_dir, iteration, records)
    return iter_dir
