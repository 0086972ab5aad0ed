"""Megatron-LM's own `torch` checkpoints (`--ckpt-format torch` written by Megatron-LM), read as
they are: `iter_N/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`, Megatron-Core model names.

The layout is the one torch_layout.py reads and writes; what differs is what the files hold: the
run's `args` is a pickled `argparse.Namespace` whose values include Megatron's enums, numpy RNG
arrays and `signal.Signals`, so the files are read with megatron_pickle.py's allow-list (stand-ins
for Megatron's classes, Megatron never imported, anything else refused); there is no checksum
manifest when Megatron wrote it (one written by convert.py --saver megatron_torch has ours, and it
is checked); Transformer Engine's fused-norm names
(`linear_qkv.layer_norm_weight`) and `_extra_state` entries are mapped and dropped by
torch_layout's merge. `detect` claims a directory of rank files whose rank-0 file pickles a Namespace
and no pre-Megatron-Core names (those are legacy.py's).

`--load` takes the weights at ANY tensor/pipeline/expert layout of the reader (foreign.py), the
iteration, consumed samples, FLOPs counter and learning-rate schedule, and the RNG state where
the layout is the writer's. Megatron's optimizer state is laid out by its own parameter groups,
which ours do not reproduce: resume with --no-load-optim (or take the weights with --finetune).
Training saves `--ckpt-format torch` with torch_layout.py (args as a plain dict); `megatron_file_content`
builds a rank file Megatron-LM loads (convert.py --saver megatron_torch): args as an
argparse.Namespace of plain values, the `_extra_state` entries (None) Megatron-Core's modules
expect, and with `transformer_engine=True` the fused-norm names of its Transformer Engine spec.
BERT and T5 files (Megatron-Core's BertModel / T5Model) are merged and written by encoder_layout.py.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

import torch

from gigatron.core.checkpoint import encoder_layout, torch_layout
from gigatron.core.checkpoint.foreign import load_full_tensors, rng_state_from_megatron
from gigatron.core.checkpoint.io import CheckpointError, to_plain
from gigatron.core.checkpoint.megatron_pickle import holds_legacy_names, holds_name, written_by_megatron
from gigatron.core.checkpoint.state import ModelState, TrainingState

__all__ = ["NAME", "WRITES", "megatron_file_content", "detect", "read_args", "read_model", "plain_args", "save_training_state",
           "load_training_state", "header_of", "OPTIMIZER_HINT"]

NAME = "megatron_torch"
WRITES = False  # read only: Gigatron writes this layout as `torch` (torch_layout.py)

OPTIMIZER_HINT = ("resume with --no-load-optim (the weights, iteration, consumed samples and learning-rate "
                  "schedule are loaded; the optimizer restarts from its initial state), or take the weights "
                  "alone with --finetune")


def _first_file(iter_dir: str) -> Optional[str]:
    dirs = torch_layout.rank_dirs(iter_dir)
    candidates = [d for d in dirs if d.startswith("mp_rank_00")] or dirs
    return os.path.join(iter_dir, candidates[0], torch_layout.MODEL_FILENAME) if candidates else None


def detect(iter_dir: str) -> bool:
    """Rank files whose args are a Namespace (Megatron-LM's, or written for it by convert.py
    --saver megatron_torch) with Megatron-Core names. Gigatron's own `torch` files store a dict."""
    first = _first_file(iter_dir)
    return first is not None and written_by_megatron(first) and not holds_legacy_names(first)


def plain_args(args) -> dict:
    """Megatron's args Namespace (with stand-ins for its classes) as a plain dict of flags."""
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, dict):
        raise CheckpointError(f"the checkpoint's args are a {type(args).__name__}, not a Namespace or dict")
    plain = to_plain(dict(args))
    if isinstance(plain.get("params_dtype"), str) and plain["params_dtype"].startswith("torch."):
        plain["params_dtype"] = plain["params_dtype"][len("torch."):]
    return plain


def _plain_state(state: dict, path: str) -> dict:
    del path
    state = dict(state)
    state["args"] = plain_args(state.get("args"))
    return state


def read_args(iter_dir: str, allow_namespace: bool = True) -> dict:
    """The flags stored in tensor/pipeline rank 0's file."""
    del allow_namespace  # Megatron's files always need the allow-list; it is always safe
    first = _first_file(iter_dir)
    if first is None:
        raise CheckpointError(f"{iter_dir} holds no mp_rank_*/{torch_layout.MODEL_FILENAME} file")
    return plain_args(torch_layout.read_rank_file(first, allow_namespace=True, manifest=None).get("args"))


def is_encoder_checkpoint(iter_dir: str) -> bool:
    """A BERT or T5 (Megatron-Core's BertModel / T5Model): its files hold `encoder.final_layernorm`."""
    first = _first_file(iter_dir)
    return first is not None and any(holds_name(first, f"encoder.final_layernorm.{leaf}") for leaf in ("weight", "bias"))


def _read_full(iter_dir: str, transform) -> ModelState:
    if is_encoder_checkpoint(iter_dir):
        return encoder_layout.read_model(iter_dir, transform)
    return torch_layout.read_model(iter_dir, allow_namespace=True, transform=transform)


def read_model(iter_dir: str, allow_namespace: bool = True) -> ModelState:
    """Every rank's file merged into full tensors under our names (any tp/pp/ep of the writer; a
    BERT or T5 at pipeline size 1, encoder_layout.py)."""
    del allow_namespace
    return _read_full(iter_dir, _plain_state)


def save_training_state(root: str, iteration: int, model_chunks, optimizer, groups, header: dict, **kwargs) -> str:
    raise CheckpointError("megatron_torch is read-only: Gigatron saves Megatron's torch layout with "
                          "--ckpt-format torch")


def header_of(state: dict, args: dict) -> dict:
    """The checkpoint header (header.py's keys) of a Megatron-LM file's content."""
    return {
        "args": args,
        "iteration": int(state.get("iteration") or 0),
        "num_floating_point_operations_so_far": float(state.get("num_floating_point_operations_so_far") or 0.0),
        "consumed_train_samples": int(args.get("consumed_train_samples") or 0),
        "consumed_valid_samples": int(args.get("consumed_valid_samples") or 0),
    }


def load_training_state(iter_dir: str, model_chunks: Sequence[torch.nn.Module], optimizer, groups, *,
                        strict: bool = True, model_reader=None) -> TrainingState:
    """Load the weights into the model chunks at this run's layout; the header, schedule and (at the
    writer's tp/pp) this rank's RNG state come back in the TrainingState. `optimizer` must be None
    (see the module doc). `model_reader`: reads `iter_dir` as a ModelState (legacy.py passes its own)."""
    if optimizer is not None:
        raise CheckpointError(f"{iter_dir} was written by Megatron-LM, whose optimizer state Gigatron does not "
                              f"read: {OPTIMIZER_HINT}")
    files: dict = {}

    def keep(state: dict, path: str) -> dict:
        state = _plain_state(state, path)
        files[os.path.relpath(path, iter_dir)] = {k: state.get(k) for k in
                                                  ("args", "iteration", "num_floating_point_operations_so_far",
                                                   "opt_param_scheduler", "rng_state")}
        return state

    model = (model_reader or _read_full)(iter_dir, keep)
    untied = bool(model.args.get("untie_embeddings_and_output_weights"))
    tensors = dict(model.tensors)
    if not untied and "output_layer.weight" in tensors:
        del tensors["output_layer.weight"]  # the last stage's copy of the tied embedding
    load_full_tensors(model_chunks, groups, tensors, iter_dir, strict)
    first = files[os.path.relpath(_first_file(iter_dir), iter_dir)]
    header = header_of(first, model.args)
    saved_tp = int(model.args.get("tensor_model_parallel_size") or 1)
    saved_pp = int(model.args.get("pipeline_model_parallel_size") or 1)
    ep_size = int(model.args.get("expert_model_parallel_size") or 1)
    own = files.get(os.path.join(torch_layout.rank_dir_name(groups.tp.rank, groups.pp.rank, saved_pp,
                                                            groups.ep.rank if ep_size > 1 else 0, ep_size),
                                 torch_layout.MODEL_FILENAME))
    rng_state, missing = None, None
    if (saved_tp, saved_pp) != (groups.tp.size, groups.pp.size) or own is None:
        missing = (f"{iter_dir} was saved at tensor/pipeline parallel size {saved_tp}/{saved_pp}, this run uses "
                   f"{groups.tp.size}/{groups.pp.size}: the random number generators are not restored")
    elif own.get("rng_state") is None:
        missing = f"{iter_dir} holds no RNG state (saved with --no-save-rng)"
    else:
        states = own["rng_state"]
        rng_state = rng_state_from_megatron(states[groups.dp.rank] if groups.dp.rank < len(states) else states[0])
    return TrainingState(header=header, path=iter_dir, optimizer_loaded=False,
                         scheduler_state=first.get("opt_param_scheduler"), rng_state=rng_state,
                         rng_missing=missing, rng_missing_is_error=False)


# The modules of a Megatron-Core GPT layer (and the output layer) that carry an `_extra_state`
# entry in its state dict (None without Transformer Engine's FP8 metadata).
_EXTRA_STATE_SUFFIXES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                         "mlp.linear_fc2", "mixer.in_proj", "mixer.out_proj")


def megatron_file_content(header: dict, state_dict: dict, transformer_engine: bool = False) -> dict:
    """One rank file Megatron-LM's `torch` loader reads: the header with `args` as an
    argparse.Namespace of plain values (it reads `args.tensor_model_parallel_size` and friends; a
    Namespace is on our loader's allow-list), and the model with `_extra_state: None` beside each
    linear module (Megatron-Core's strict load expects them); `transformer_engine`: the norms under
    the Transformer Engine spec's fused names (`self_attention.linear_qkv.layer_norm_weight`, ...;
    a Mamba layer's `norm.weight` as `mixer.in_proj.layer_norm_weight`: Megatron-Core's only Mamba
    stack spec is Transformer Engine's, so a MambaModel is always written with it)."""
    from gigatron.core.checkpoint.megatron_names import HYBRID_FUSED_NORMS, split_layer_name

    model = {}
    for name, tensor in state_dict.items():
        split = split_layer_name(name)
        if transformer_engine and split is not None and split[1] in HYBRID_FUSED_NORMS:
            name = f"decoder.layers.{split[0]}.{HYBRID_FUSED_NORMS[split[1]]}"
        model[name] = tensor
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and (module == "output_layer" or module.endswith(_EXTRA_STATE_SUFFIXES)):
            model[f"{module}._extra_state"] = None
    content = {key: value for key, value in header.items() if key != "args"}
    content["args"] = argparse.Namespace(**header["args"])
    content["model"] = model
    return content
