"""BERT and T5 (Megatron-Core's BertModel and T5Model) in Megatron-LM's per-rank file layouts:
`iter_N/mp_rank_TT/model_optim_rng.pt` (Megatron-LM's `torch` format, and the pre-Megatron-Core
"legacy" BERT once legacy.py has mapped its names), at any tensor-parallel size, pipeline size 1
(Megatron-LM builds both models as one stage).

Shape legend: h = hidden, V = padded vocabulary, tp = tensor-parallel size, nh = heads.

Names are Megatron-Core's, which are ours (models/bert.py, models/t5.py); with Transformer Engine's
layer spec the norms carry the fused names of megatron_names.FUSED_NORMS, mapped back here.
`_extra_state` entries and T5Model's second registration of its output bias and position
embedding (megatron_names.ALIASES) carry nothing of their own and are dropped.

How a full tensor is split over tensor-parallel ranks (rank r holds chunk r):
    dim 0: linear_qkv.*, linear_fc1.*, cross_attention.linear_q.*, cross_attention.linear_kv.*,
           embedding.word_embeddings.weight [V, h], output_layer.bias / lm_head.output_layer.bias [V]
    dim 1: linear_proj.weight (self- and cross-attention), linear_fc2.weight
    none:  norms, row-parallel biases, position / token-type embeddings, lm_head.dense,
           lm_head.layer_norm, pooler, binary_head, T5's relative position bias [buckets, nh]
           (Megatron-Core keeps it whole on every rank)
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Callable, Optional

import torch

from gigatron.core.checkpoint import torch_layout
from gigatron.core.checkpoint.io import CheckpointError
from gigatron.core.checkpoint.megatron_names import FUSED_NORMS, UNFUSED_NORMS, aliases_in, split_block_name
from gigatron.core.checkpoint.state import ModelState

__all__ = ["is_encoder_model", "partition_dim", "ours_from_megatron", "read_model", "shard", "megatron_encoder_file",
           "model_kind", "write_megatron_torch"]

_COLUMN = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias", "mlp.linear_fc1.weight",
           "mlp.linear_fc1.bias", "cross_attention.linear_q.weight", "cross_attention.linear_q.bias",
           "cross_attention.linear_kv.weight", "cross_attention.linear_kv.bias")
_ROW = ("linear_proj.weight", "mlp.linear_fc2.weight")
_VOCAB = ("embedding.word_embeddings.weight", "output_layer.bias", "lm_head.output_layer.bias")
_RANK = re.compile(r"^mp_rank_(\d{2})$")


def is_encoder_model(names) -> bool:
    """A BERT or T5 state dict (it has an `encoder.` block) rather than a GPT's."""
    return any(name.startswith("encoder.") for name in names)


def model_kind(names) -> str:
    """"T5" (an encoder and a decoder), "BERT" (an encoder) or "GPT"."""
    names = list(names)
    if not is_encoder_model(names):
        return "GPT"
    return "T5" if any(n.startswith("decoder.") for n in names) else "BERT"


def partition_dim(name: str) -> Optional[int]:
    """The dimension `name` is split along over tensor-parallel ranks, or None (replicated)."""
    if name in _VOCAB or name.endswith(_COLUMN):
        return 0
    if name.endswith(_ROW):
        return 1
    return None


def ours_from_megatron(name: str) -> str:
    """Our name of a Megatron-Core BERT/T5 name (Transformer Engine's fused norm names unfused)."""
    split = split_block_name(name)
    if split is not None and split[2] in UNFUSED_NORMS:
        return f"{split[0]}{split[1]}.{UNFUSED_NORMS[split[2]]}"
    return name


def _check_args(args: dict, what: str) -> None:
    if args.get("swiglu") and int(args.get("tensor_model_parallel_size") or 1) > 1:
        raise CheckpointError(f"{what}: a BERT/T5 with --swiglu split over tensor-parallel ranks is not read; save "
                              "it at --tensor-model-parallel-size 1 first")


def read_model(iter_dir: str, transform: Callable[[dict, str], dict]) -> ModelState:
    """Every tensor-parallel rank's file of a BERT/T5 checkpoint merged into full tensors under our
    names. `transform(state, path)`: each file's content as read with its `model` under
    Megatron-Core's names and plain `args` (megatron_torch's, or legacy.py's BERT mapping)."""
    dirs = torch_layout.rank_dirs(iter_dir)
    ranks = {int(m.group(1)): d for d in dirs for m in [_RANK.match(d)] if m}
    if not ranks or len(ranks) != len(dirs):
        raise CheckpointError(f"{iter_dir} holds {', '.join(dirs) or 'no rank folders'}: BERT and T5 checkpoints "
                              "are read at pipeline-parallel size 1 (mp_rank_TT folders only); re-save it with "
                              "Megatron-LM at --pipeline-model-parallel-size 1")
    if sorted(ranks) != list(range(len(ranks))):
        raise CheckpointError(f"{iter_dir} lacks the files of tensor-parallel ranks "
                              f"{sorted(set(range(max(ranks) + 1)) - set(ranks))}")
    states = []
    for rank in range(len(ranks)):
        path = os.path.join(iter_dir, ranks[rank], torch_layout.MODEL_FILENAME)
        state = transform(torch_layout.read_rank_file(path, allow_namespace=True), path)
        if not isinstance(state.get("model"), dict):
            raise CheckpointError(f"{path} holds no 'model' state dict (virtual pipeline stages are not read for "
                                  "BERT/T5)")
        states.append(state)
    args = states[0]["args"]
    _check_args(dict(args, tensor_model_parallel_size=len(states)), iter_dir)
    models = [s["model"] for s in states]
    skip = aliases_in(models[0])
    tensors = {}
    for name, value in models[0].items():
        if name.endswith("_extra_state") or name in skip or not isinstance(value, torch.Tensor):
            continue
        shards = [m.get(name) for m in models]
        if any(not isinstance(s, torch.Tensor) for s in shards):
            raise CheckpointError(f"{iter_dir}: {name} is missing from some tensor-parallel rank's file")
        dim = partition_dim(ours_from_megatron(name))
        tensors[ours_from_megatron(name)] = shards[0] if dim is None or len(shards) == 1 else torch.cat(shards, dim)
    if "embedding.word_embeddings.weight" not in tensors:
        raise CheckpointError(f"{iter_dir} holds no embedding.word_embeddings.weight; it is not a BERT/T5 checkpoint")
    release = os.path.basename(os.path.normpath(iter_dir)) == "release"
    return ModelState(args=args, tensors=tensors, iteration=None if release else int(states[0].get("iteration") or 0),
                      path=iter_dir, dtype=tensors["embedding.word_embeddings.weight"].dtype)


def shard(tensors: dict, tp: int) -> list[dict]:
    """Full BERT/T5 tensors (our names, padded vocabulary) as the state dicts of `tp` ranks."""
    out: list[dict] = [{} for _ in range(tp)]
    for name, tensor in tensors.items():
        dim = partition_dim(name)
        if dim is not None and tp > 1 and tensor.shape[dim] % tp != 0:
            raise ValueError(f"{name}: dimension {dim} of size {tensor.shape[dim]} does not split over "
                             f"--target-tensor-parallel-size {tp}")
        pieces = tensor.chunk(tp, dim) if dim is not None and tp > 1 else [tensor] * tp
        for rank, piece in enumerate(pieces):
            out[rank][name] = piece.contiguous().clone()
    return out


# Modules of Megatron-Core's BERT/T5 that carry an `_extra_state` entry (None without Transformer
# Engine's FP8 metadata); its strict load_state_dict expects them.
_EXTRA_STATE = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2",
                "cross_attention.linear_q", "cross_attention.linear_kv", "cross_attention.linear_proj")


def megatron_encoder_file(header: dict, state_dict: dict, transformer_engine: bool = False) -> dict:
    """One rank file of Megatron-LM's `torch` layout for a BERT/T5 state dict (our names): `args`
    as an argparse.Namespace of plain values, `_extra_state: None` beside each linear module and
    output layer, T5Model's aliases as copies, and with `transformer_engine` the fused norm names."""
    from gigatron.core.checkpoint.megatron_names import ALIASES

    model = {}
    for name, tensor in state_dict.items():
        split = split_block_name(name)
        if transformer_engine and split is not None and split[2] in FUSED_NORMS:
            name = f"{split[0]}{split[1]}.{FUSED_NORMS[split[2]]}"
        model[name] = tensor
        module, _, leaf = name.rpartition(".")
        if (leaf == "bias" and module in ("output_layer", "lm_head.output_layer")) or (
                leaf == "weight" and split is not None and module.endswith(_EXTRA_STATE)):
            model[f"{module}._extra_state"] = None
    if "lm_head.output_layer.bias" in model:  # T5Model: its state dict holds both registrations
        for alias, real in ALIASES.items():
            if real in model:
                model[alias] = model[real]
        model["output_layer._extra_state"] = None
    content = {key: value for key, value in header.items() if key != "args"}
    content["args"] = argparse.Namespace(**header["args"])
    content["model"] = model
    return content


def write_megatron_torch(root: str, tensors: dict, args: dict, iteration: Optional[int], tp: int = 1,
                         transformer_engine: bool = False) -> str:
    """Write a BERT/T5 (full tensors, our names, padded vocabulary) as Megatron-LM's `torch` layout
    at tensor-parallel size `tp`: iter_N/mp_rank_TT/model_optim_rng.pt (release/ without an
    iteration), our checksum manifest, then the tracker. Returns the iteration directory."""
    from gigatron.core.checkpoint.header import CHECKPOINT_VERSION

    if tp < 1:
        raise ValueError(f"--target-tensor-parallel-size must be >= 1, got {tp}")
    _check_args(dict(args, tensor_model_parallel_size=tp), "writing")
    iter_dir = os.path.join(root, "release" if iteration is None else f"iter_{int(iteration):07d}")
    if torch_layout.rank_dirs(iter_dir):
        raise ValueError(f"{iter_dir} already holds a checkpoint; choose an empty --save-dir")
    args = dict(args, tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
                transformer_impl="transformer_engine" if transformer_engine else "local")
    header = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": int(iteration or 0)}
    records = dict(torch_layout.write_rank_file(
        iter_dir, os.path.join(f"mp_rank_{rank:02d}", torch_layout.MODEL_FILENAME),
        megatron_encoder_file(header, state_dict, transformer_engine))
        for rank, state_dict in enumerate(shard(tensors, tp)))
    torch_layout.finish_save(root, iter_dir, iteration, records)
    return iter_dir
