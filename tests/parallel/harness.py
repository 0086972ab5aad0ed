"""Run a function in several processes joined by a process group (gloo on CPU by default).

    run_distributed(fn, world_size, *args, timeout=120, backend="gloo")
        -> [result of rank 0, result of rank 1, ...]

`fn` is called in every child as ``fn(rank, world_size, *args)`` after
``torch.distributed.init_process_group(backend)`` on a free local TCP port, with the environment
variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set and
``torch.set_num_threads(1)``; with backend="nccl" (GPU tests) rank r uses CUDA device r.

`fn` must be importable by name (a module-level function): children start fresh as with the
"spawn" method, but are forked from a server process that has imported torch once, so a call costs
well under a second instead of a torch import per rank.

Each rank's return value comes back to the parent (tensors anywhere inside lists, tuples and dicts
are detached and moved to CPU; everything must be picklable). If any rank raises, the other ranks
are stopped and the exception is raised again in the parent with the child's traceback attached as
a note. If the ranks do not finish within `timeout` seconds they are killed and a TimeoutError is
raised. Each child destroys its process group before returning.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_module
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_distributed", "free_port"]

# After a rank reports what looks like a consequence of another rank's failure, how long to wait
# for the original error.
_PEER_ERROR_GRACE_S = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_cpu(item) for item in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_to_cpu(item) for item in value)
    return value


def _child(rank, world_size, port, timeout, backend, fn, args, results):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        message = ("ok", rank, pickle.dumps(_to_cpu(fn(rank, world_size, *args))))
    except BaseException as exc:  # report every failure to the parent
        text = traceback.format_exc()
        try:
            payload = pickle.dumps(exc)
            pickle.loads(payload)
        except Exception:
            payload = None
        message = ("error", rank, (text, payload, _is_peer_failure(exc)))
    # Report before tearing the group down: a failing rank's teardown makes its peers fail too,
    # and the parent should hear about the original error first.
    results.put(message)
    if dist.is_initialized():
        dist.destroy_process_group()


def _is_peer_failure(exc: BaseException) -> bool:
    """Whether `exc` looks like the consequence of another rank failing (a broken connection or a
    collective timing out) rather than an error of its own."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("Connection reset", "Connection closed", "Timed out", "timed out", "NCCL error")
    )


def _raise_child_error(rank, text, payload):
    __tracebackhide__ = True  # pytest: show the child's traceback (in the note), not this frame
    exc = None
    if payload is not None:
        try:
            exc = pickle.loads(payload)
        except Exception:
            exc = None
    if isinstance(exc, Exception):
        exc.add_note(f"raised on rank {rank}; child traceback:\n{text}")
        raise exc
    raise RuntimeError(f"rank {rank} failed:\n{text}")


def _stop(processes):
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    for proc in processes:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()


# What every child would otherwise import again: torch, and what the test modules holding the rank
# functions import (pytest; torch.distributed.checkpoint, 1.5 s, through our checkpointing).
_FORKSERVER_PRELOAD = ["numpy", "torch", "torch.distributed", "torch.nn.functional", "torch.testing",
                       "torch.distributed.checkpoint", "pytest"]


def _context():
    """A "forkserver" context whose server has imported torch once: each child is forked from
    that clean, single-threaded server (as safe as "spawn") instead of importing torch again,
    which is most of a child's start-up time. Falls back to "spawn" where forkserver is missing."""
    try:
        ctx = mp.get_context("forkserver")
    except ValueError:
        return mp.get_context("spawn")
    ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)
    return ctx


def run_distributed(fn, world_size: int, *args, timeout: float = 120, backend: str = "gloo"):
    """Run ``fn(rank, world_size, *args)`` on `world_size` ranks; return the per-rank results.

    `backend="nccl"` (GPU tests) gives each rank the CUDA device of its rank number."""
    if world_size < 1:
        raise ValueError(f"run_distributed needs world_size >= 1, got {world_size}")
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    processes = [
        ctx.Process(target=_child, args=(rank, world_size, port, timeout, backend, fn, args, results), daemon=True)
        for rank in range(world_size)
    ]
    for proc in processes:
        proc.start()
    values = [None] * world_size
    errors = {}  # rank -> (traceback text, pickled exception, looks like a peer's failure)
    first_error_time = 0.0
    received = 0
    deadline = time.monotonic() + timeout
    try:
        while received < world_size:
            if first_error_time and time.monotonic() - first_error_time > _PEER_ERROR_GRACE_S:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"run_distributed: {world_size - received} of {world_size} ranks did not finish "
                    f"{fn.__name__} within {timeout} s (a collective missing on some rank?)"
                )
            try:
                status, rank, data = results.get(timeout=min(remaining, 0.5))
            except queue_module.Empty:
                dead = [p for p in processes if p.exitcode not in (None, 0)]
                if dead:
                    # A child died without reporting (e.g. killed by a signal); give the queue a moment.
                    try:
                        status, rank, data = results.get(timeout=2.0)
                    except queue_module.Empty:
                        codes = {processes.index(p): p.exitcode for p in dead}
                        raise RuntimeError(f"run_distributed: ranks exited without a result: {codes}")
                else:
                    continue
            if status == "error":
                errors[rank] = data
                if not data[2]:
                    break  # an error of the rank's own: report it
                if not first_error_time:
                    first_error_time = time.monotonic()
            else:
                values[rank] = pickle.loads(data)
            received += 1
        if errors:
            # Prefer a rank's own error over the broken-connection errors it caused on its peers.
            rank = min(errors, key=lambda r: (errors[r][2], r))
            _raise_child_error(rank, *errors[rank][:2])
    finally:
        if received == world_size and not errors:
            for proc in processes:
                proc.join(timeout=30)
        _stop(processes)
    return values
