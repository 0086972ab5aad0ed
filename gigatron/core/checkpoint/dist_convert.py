"""Offline conversion between Megatron's `torch` layout and the `torch_dist` format (model weights).

    convert_torch_to_torch_dist(src, dst)           torch (any tp/pp) -> torch_dist directory
    convert_torch_dist_to_torch(src, save_dir, tp, pp) torch_dist -> torch at (tp, pp)

Both run in one process and carry the model weights, the model flags (`args`) and the iteration;
optimizer and RNG state are left out (resume a converted checkpoint with --no-load-optim
--no-load-rng, or --finetune). To convert a full training state (optimizer included), run the
training script with --ckpt-convert-format, which loads with one format and saves with the other.
"""

from __future__ import annotations

import os
from typing import Optional

from gigatron.core.checkpoint.dist import (
    ShardPiece,
    _Comm,
    _common_state,
    _save_now,
    read_full_model_tensors,
)
from gigatron.core.checkpoint.io import CheckpointError

__all__ = ["convert_torch_to_torch_dist", "convert_torch_dist_to_torch"]

_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
_ONE_PROCESS_LAYOUT = {"world_size": 1, "tp": 1, "pp": 1, "dp": 1, "cp": 1, "vp": None}


def convert_torch_to_torch_dist(src: str, dst: str, true_vocab_size: Optional[int] = None,
                                allow_pickle: bool = False) -> str:
    """Write the model of the `torch`-format checkpoint `src` (a save directory with a tracker, or an
    iteration directory) as a torch_dist checkpoint in the directory `dst`. Returns `dst`.

    The stored word embedding / output layer hold the true vocabulary rows; a load pads them to
    the model's padded vocabulary with zero rows."""
    from gigatron.core.convert.torch_format import read_torch_checkpoint

    md, tensors = read_torch_checkpoint(src, true_vocab_size, allow_pickle)
    if os.path.isfile(os.path.join(dst, "metadata.json")):
        raise ValueError(f"{dst} already holds a torch_dist checkpoint; choose an empty directory")
    pieces = [ShardPiece(name, tensor.contiguous(), tuple(tensor.shape), (0,) * tensor.dim(), True,
                         name in _VOCAB_PARAMS) for name, tensor in tensors.items()]
    extra = {
        "iteration": int(md.get("iteration") or 0),
        "args": md,
        "consumed_train_samples": int(md.get("consumed_train_samples") or 0),
        "consumed_valid_samples": int(md.get("consumed_valid_samples") or 0),
    }
    common = _common_state(extra, None, None, dict(_ONE_PROCESS_LAYOUT), sorted(tensors))
    _save_now(dst, pieces, common, dict(_ONE_PROCESS_LAYOUT), _Comm(local=True))
    return dst


def convert_torch_dist_to_torch(src: str, save_dir: str, target_tp: int = 1, target_pp: int = 1,
                                true_vocab_size: Optional[int] = None) -> str:
    """Write the model of the torch_dist checkpoint directory `src` as a `torch`-format checkpoint
    under `save_dir` at (target_tp, target_pp), tracker included. Returns the iteration directory.

    The model flags come from the checkpoint's `args` (saved by the training engine or by
    convert_torch_to_torch_dist). The vocabulary kept is `true_vocab_size`, else `args`'
    true_vocab_size, else every stored row."""
    from gigatron.core.convert.protocol import state_to_messages
    from gigatron.core.convert.torch_format import save_torch_checkpoint

    md, tensors = read_torch_dist_model(src, true_vocab_size)
    return save_torch_checkpoint(state_to_messages(md, tensors), save_dir, target_tp, target_pp)


def read_torch_dist_model(src: str, true_vocab_size: Optional[int] = None) -> tuple:
    """(conversion metadata, {global name: full tensor}) of the model in the torch_dist checkpoint
    directory `src`, with the vocabulary cut to its true size and a tied output layer left out —
    the same shape of result as gigatron.core.convert.torch_format.read_torch_checkpoint."""
    from gigatron.core.convert.torch_format import _true_vocab_size, metadata_from_args

    tensors, common = read_full_model_tensors(src)
    extra = common.get("extra_state") or {}
    args = dict(extra.get("args") or {})
    if not args:
        raise CheckpointError(f"{src} holds no model flags (args) in common.pt; it cannot be converted "
                              "without knowing the model shape")
    stored_rows = tensors["embedding.word_embeddings.weight"].shape[0]
    # The same rule as the torch-format reader: explicit size, saved true size, else the tokenizer's.
    vocab = _true_vocab_size(args, stored_rows, true_vocab_size)
    if vocab > stored_rows:
        raise CheckpointError(f"true vocabulary size {vocab} exceeds the {stored_rows} rows stored in {src}")
    for name in _VOCAB_PARAMS:
        if name in tensors:
            tensors[name] = tensors[name][:vocab].contiguous()
    if not args.get("untie_embeddings_and_output_weights"):
        tensors.pop("output_layer.weight", None)
    dtype = tensors["embedding.word_embeddings.weight"].dtype
    md = metadata_from_args(args, vocab, int(extra.get("iteration") or 0), dtype)
    return md, tensors
