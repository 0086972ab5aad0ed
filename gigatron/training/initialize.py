"""Process start-up: torch.distributed, the device, the random seeds and the parallel groups.

Works under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment) and in a
plain `python pretrain_gpt.py …`: without those variables the run is one process with no process
group, and `ParallelGroups.build` gives the all-size-one groups (`ParallelGroups.single()`).
"""

from __future__ import annotations

import datetime
import os
import random
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "RunContext",
    "CollectiveTimeout",
    "initialize_distributed",
    "set_random_seeds",
    "initialize",
    "collective_phase",
]


@dataclass
class RunContext:
    """What initialization produced: this process' device, groups and model-parallel RNG tracker."""

    device: torch.device
    groups: Any
    rng_tracker: Any
    world_size: int
    rank: int
    local_rank: int


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within --distributed-timeout-minutes."""


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def initialize_distributed(parallel, local_rank: Optional[int] = None) -> tuple[torch.device, int, int, int]:
    """Join the process group described by the environment (if any) and pick the device.

    `parallel` is the ParallelConfig (backend, timeout); `local_rank` the launcher's --local-rank,
    used when the LOCAL_RANK environment variable is not set. Returns (device, world_size, rank,
    local_rank). The backend is --distributed-backend, except that nccl without CUDA falls back to
    gloo. An already initialized process group is used as it is.
    """
    env_local_rank = _env_int("LOCAL_RANK")
    local_rank = env_local_rank if env_local_rank is not None else (local_rank or 0)
    use_cuda = torch.cuda.is_available()
    requested = getattr(parallel, "distributed_backend", None)
    backend = requested or "nccl"
    if backend == "nccl" and not use_cuda:
        backend = "gloo"
    if backend == "gloo" and use_cuda and requested == "gloo":
        warnings.warn("--distributed-backend gloo with CUDA devices: collectives will be slow", stacklevel=2)
    if use_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        return device, dist.get_world_size(), dist.get_rank(), local_rank
    world_size = _env_int("WORLD_SIZE") or 1
    rank = _env_int("RANK") or 0
    if world_size > 1:
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set; launch with torchrun")
        timeout = datetime.timedelta(minutes=getattr(parallel, "distributed_timeout_minutes", None) or 10)
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
    return device, world_size, rank, local_rank


def set_random_seeds(seed: int, groups, data_parallel_random_init: bool = False):
    """Seed python, numpy and torch with seed + 100 * pipeline rank (+ 10 * data-parallel rank with
    --data-parallel-random-init), as Megatron does, and the model-parallel RNG tracker
    (`model_parallel_seed`). Returns the tracker."""
    from gigatron.core.parallel.random import model_parallel_seed

    if seed is None or seed <= 0:
        raise ValueError(f"--seed must be a positive integer, got {seed}")
    seed = seed + 100 * groups.pp.rank
    if data_parallel_random_init:
        seed = seed + 10 * groups.dp.rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return model_parallel_seed(seed, groups)


def enable_deterministic_mode() -> None:
    """--deterministic-mode: deterministic kernels only (an op without one raises), and the cuBLAS
    workspace setting that deterministic matmuls need (kept when the environment sets it)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def initialize(configs, legacy_configs=None) -> RunContext:
    """torch.distributed, device, parallel groups and seeds for the run's configs
    (`gigatron.training.arguments.Configs`). `initialize(args, configs)`, the older form, is accepted
    and reads the configs only."""
    from gigatron.core.parallel.groups import ParallelGroups

    if legacy_configs is not None:
        configs = legacy_configs
    training = configs.training
    if training.deterministic_mode:
        enable_deterministic_mode()
    device, world_size, rank, local_rank = initialize_distributed(configs.parallel, training.local_rank)
    if configs.world_size is not None and world_size != configs.world_size:
        raise ValueError(f"arguments were validated for world size {configs.world_size} but {world_size} "
                         "processes run")
    with collective_phase("building the parallel groups"):
        groups = ParallelGroups.build(configs.parallel)
    tracker = set_random_seeds(configs.data.seed, groups, training.data_parallel_random_init)
    return RunContext(device=device, groups=groups, rng_tracker=tracker, world_size=world_size, rank=rank,
                      local_rank=local_rank)


_TIMEOUT_MARKERS = ("timed out", "timeout", "Timeout", "watchdog")


@contextmanager
def collective_phase(operation: str) -> Iterator[None]:
    """Turn a collective timeout inside the block into a CollectiveTimeout naming this rank and `operation`."""
    try:
        yield
    except CollectiveTimeout:
        raise
    except RuntimeError as exc:  # torch.distributed's errors (DistBackendError, …) are RuntimeErrors
        text = str(exc)
        if not any(marker in text for marker in _TIMEOUT_MARKERS):
            raise
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        raise CollectiveTimeout(
            f"rank {rank}: a collective timed out during {operation}. Another rank has probably failed or is "
            "stuck (look at its log first); if the step is only slow, raise --distributed-timeout-minutes. "
            f"Original error: {text.splitlines()[0] if text else exc!r}"
        ) from exc
