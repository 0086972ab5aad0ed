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

from gigatron.core.checkpoint import dist as torch_dist
from gigatron.core.checkpoint.dist.common import Comm
from gigatron.core.checkpoint.dist.save import common_state, save_pieces
from gigatron.core.checkpoint.header import checkpoint_header
from gigatron.core.checkpoint.tp_layout import VOCAB_PARAMS
from gigatron.core.convert.protocol import state_to_messages
from gigatron.core.convert.torch_format import read_torch_checkpoint, save_torch_checkpoint

__all__ = ["convert_torch_to_torch_dist", "convert_torch_dist_to_torch"]

_ONE_PROCESS_LAYOUT = {"world_size": 1, "tp": 1, "pp": 1, "dp": 1, "cp": 1, "vp": None}


def convert_torch_to_torch_dist(src: str, dst: str, true_vocab_size: Optional[int] = None,
                                allow_pickle: bool = False) -> str:
    """Write the model of the `torch`-format checkpoint `src` (a save directory with a tracker, or an
    iteration directory) as a torch_dist checkpoint in the directory `dst`. Returns `dst`.

    The stored word embedding / output layer hold the true vocabulary rows; a load pads them to
    the model's padded vocabulary with zero rows."""
    md, tensors = read_torch_checkpoint(src, true_vocab_size, allow_pickle)
    if os.path.isfile(os.path.join(dst, torch_dist.METADATA_FILENAME)):
        raise ValueError(f"{dst} already holds a torch_dist checkpoint; choose an empty directory")
    pieces = [torch_dist.ShardPiece(name, tensor.contiguous(), tuple(tensor.shape), (0,) * tensor.dim(), True,
                                    name in VOCAB_PARAMS) for name, tensor in tensors.items()]
    extra = checkpoint_header(md, md.get("iteration"),
                              consumed_train_samples=int(md.get("consumed_train_samples") or 0),
                              consumed_valid_samples=int(md.get("consumed_valid_samples") or 0))
    common = common_state(extra, None, None, dict(_ONE_PROCESS_LAYOUT), sorted(tensors))
    save_pieces(dst, pieces, common, dict(_ONE_PROCESS_LAYOUT), Comm(local=True))
    return dst


def convert_torch_dist_to_torch(src: str, save_dir: str, target_tp: int = 1, target_pp: int = 1,
                                true_vocab_size: Optional[int] = None) -> str:
    """Write the model of the torch_dist checkpoint directory `src` as a `torch`-format checkpoint
    under `save_dir` at (target_tp, target_pp), tracker included. Returns the iteration directory.

    The model flags come from the checkpoint's `args` (saved by the training engine or by
    convert_torch_to_torch_dist). The vocabulary kept is `true_vocab_size`, else `args`'
    true_vocab_size, else every stored row."""
    md, tensors = read_torch_checkpoint(src, true_vocab_size)
    return save_torch_checkpoint(state_to_messages(md, tensors), save_dir, target_tp, target_pp)
