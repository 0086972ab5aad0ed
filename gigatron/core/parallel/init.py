"""Layout-independent parameter initialization.

For every parameter tagged with `set_init(param, init_fn, key)` (gigatron/core/parallel/tags.py):
1. the full logical tensor is allocated (fp32): the parameter's shape with its partition dim
   multiplied by the number of shards;
2. the default generator of the generating device is seeded from (seed, key) through a stable
   hash (SHA-256), and `init_fn(full)` fills it;
3. this rank's shard is cut out (partition dim, stride: with stride k the full tensor is k blocks
   along the partition dim and a shard holds its slice of every block; with partition segments the
   blocks have the segments' unequal sizes) and copied into the parameter in its dtype.

Keys carry global names (global layer numbers), so the same seed gives the same full model at any
tensor, pipeline and data parallel size. A tied output layer on the last pipeline stage uses the
embedding's key and therefore starts equal to it.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Optional, Sequence, Union

import torch

from .tags import (init_spec, is_tensor_parallel, partition_dim, partition_segments, partition_shard,
                   partition_stride)

__all__ = ["initialize_parameters", "init_seed", "full_shape", "local_shard", "merge_shards", "partition_blocks"]


def init_seed(seed: int, key: str) -> int:
    """A 63-bit generator seed from (seed, key), the same on every machine and Python run."""
    digest = hashlib.sha256(f"{int(seed)}/{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def full_shape(param: torch.Tensor) -> torch.Size:
    """Shape of the logical tensor of which `param` is this rank's shard."""
    shape = list(param.shape)
    if is_tensor_parallel(param):
        shard = partition_shard(param)
        if shard is None:
            raise ValueError(
                "a tensor-parallel parameter has no shard rank/size; pass rank= and world_size= to "
                "set_tensor_parallel_attributes"
            )
        shape[partition_dim(param)] *= shard[1]
    return torch.Size(shape)


def partition_blocks(length: int, stride: int = 1, segments: Optional[Sequence[int]] = None) -> list[int]:
    """Logical sizes of the blocks a tensor of `length` entries along its partition dim is split
    by: the segments when given (they must sum to `length`), else `stride` equal blocks."""
    if segments is not None:
        blocks = [int(n) for n in segments]
        if sum(blocks) != length:
            raise ValueError(f"partition segments {tuple(blocks)} sum to {sum(blocks)}, not the logical size {length}")
        return blocks
    if length % stride != 0:
        raise ValueError(f"a dimension of size {length} does not split into {stride} stride blocks")
    return [length // stride] * stride


def local_shard(full: torch.Tensor, dim: int, stride: int, rank: int, world_size: int,
                segments: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Shard `rank` of `world_size` of `full` along `dim` with partition stride `stride`, or with
    partition `segments` (logical segment sizes): the shard's slice of every block, concatenated
    (a view for a single block, a new tensor otherwise)."""
    if world_size == 1:
        return full
    blocks = partition_blocks(full.shape[dim], stride, segments)
    if any(n % world_size for n in blocks):
        raise ValueError(f"dimension {dim} of size {full.shape[dim]} cannot be split into {world_size} shards "
                         + (f"segment by segment {tuple(blocks)}" if segments is not None else f"with stride {stride}"))
    pieces, start = [], 0
    for n in blocks:
        piece = n // world_size
        pieces.append(full.narrow(dim, start + rank * piece, piece))
        start += n
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def merge_shards(shards: Sequence[torch.Tensor], dim: int, stride: int = 1,
                 segments: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Inverse of local_shard: the logical tensor from all shards (in rank order)."""
    world_size = len(shards)
    if world_size == 1:
        return shards[0]
    blocks = partition_blocks(shards[0].shape[dim] * world_size, stride, segments)
    out, start = [], 0
    for n in blocks:
        piece = n // world_size
        out.extend(s.narrow(dim, start, piece) for s in shards)
        start += piece
    return torch.cat(out, dim=dim)


def _generate(init_fn: Callable, shape: torch.Size, device: torch.device, seed: int) -> torch.Tensor:
    full = torch.empty(shape, dtype=torch.float32, device=device)
    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices, device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if cuda_devices:
            with torch.cuda.device(cuda_devices[0]):
                torch.cuda.manual_seed(seed)
        init_fn(full)
    return full


@torch.no_grad()
def initialize_parameters(
    model: torch.nn.Module,
    seed: int,
    device: Optional[Union[str, torch.device]] = None,
    global_name_fn: Optional[Callable[[str], str]] = None,
) -> int:
    """Initialize every parameter of `model` that carries an init spec; return how many.

    `device`: where the full tensors are generated (default: each parameter's device; pass "cpu"
    for --use-cpu-initialization). Random values depend on the generating device type, so use the
    same kind of device in runs that must agree. A parameter whose spec has no key is keyed by its
    name in `model`, mapped through `global_name_fn` when given (e.g. to turn stage-local layer
    numbers into global ones). Parameters without an init spec are left as they are.
    """
    count = 0
    for name, param in model.named_parameters():
        spec = init_spec(param)
        if spec is None:
            continue
        key = spec.key if spec.key is not None else (global_name_fn(name) if global_name_fn else name)
        if param.device.type == "meta":
            raise ValueError(
                f"initialize_parameters: parameter '{name}' is on the meta device; build the model on "
                f"a real device (Module.to_empty creates new parameters and drops their tags)")
        gen_device = torch.device(device) if device is not None else param.device
        full = _generate(spec.init_fn, full_shape(param), gen_device, init_seed(seed, key))
        if is_tensor_parallel(param):
            rank, world_size = partition_shard(param)
            full = local_shard(full, partition_dim(param), partition_stride(param), rank, world_size,
                               partition_segments(param))
        param.copy_(full)
        count += 1
    return count
