"""What the torch_dist modules share: file names, errors, the ranks taking part, CPU copies."""

from __future__ import annotations

import torch
import torch.distributed as dist

from gigatron.core.checkpoint.io import CheckpointError, CorruptCheckpointError

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "METADATA_FILENAME", "COMMON_FILENAME", "DCP_METADATA_FILENAME",
    "OPTIMIZER_PREFIX", "VOCAB_PARAMS", "IncompleteCheckpointError", "CorruptCheckpointError", "Comm",
    "process_rank", "world_size", "collective_device", "to_cpu", "parallel_layout",
]

FORMAT_NAME = "torch_dist"
FORMAT_VERSION = 1
METADATA_FILENAME = "metadata.json"
COMMON_FILENAME = "common.pt"
DCP_METADATA_FILENAME = ".metadata"
OPTIMIZER_PREFIX = "optimizer.state."
VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


class IncompleteCheckpointError(CheckpointError):
    """The checkpoint directory has no metadata.json: its save was interrupted."""


def process_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def collective_device() -> torch.device:
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Comm:
    """The ranks that take part in a save or load: the default process group, or (`local`) this
    process alone (offline conversion)."""

    def __init__(self, local: bool = False) -> None:
        self.distributed = not local and dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.size = dist.get_world_size() if self.distributed else 1

    def all_gather_object(self, obj) -> list:
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def all_reduce_min(self, value: float) -> float:
        if self.size == 1:
            return value
        flag = torch.tensor([float(value)], device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return float(flag.item())

    def barrier(self) -> None:
        self.all_reduce_min(0.0)


def to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def parallel_layout(groups) -> dict:
    layout = {"world_size": world_size(), "tp": groups.tp.size, "pp": groups.pp.size, "dp": groups.dp.size,
              "cp": groups.cp.size, "vp": groups.vp_size}
    ep = getattr(groups, "ep", None)
    expt_tp = getattr(groups, "expt_tp", None)
    if ep is not None and expt_tp is not None and (ep.size > 1 or expt_tp.size != groups.tp.size):
        layout.update(ep=ep.size, etp=expt_tp.size)
    return layout
