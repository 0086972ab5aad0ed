"""Run a function in several processes joined by a gloo process group (CPU).

    run_distributed(fn, world_size, *args, timeout=120) -> [result of rank 0, result of rank 1, ...]

`fn` is called in every child as ``fn(rank, world_size, *args)`` after
``torch.distributed.init_process_group("gloo")`` on a free local TCP port, with the environment
variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set and
``torch.set_num_threads(1)``. `fn` must be importable by name (a module-level function), since
children are started with the "spawn" method. Each rank's return value comes back to the parent
(tensors anywhere inside lists/tuples/dicts are detached and moved to CPU). If any rank raises,
the other ranks are stopped and the exception is raised again in the parent, with the child's
traceback attached as a note. If the ranks do not finish within `timeout` seconds they are killed
and a TimeoutError is raised.
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


def _child(rank, world_size, port, timeout, fn, args, results):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            backend="gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        try:
            value = _to_cpu(fn(rank, world_size, *args))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        results.put(("ok", rank, pickle.dumps(value)))
    except BaseException as exc:  # report every failure to the parent, then exit
        text = traceback.format_exc()
        try:
            payload = pickle.dumps(exc)
            pickle.loads(payload)
        except Exception:
            payload = None
        results.put(("error", rank, (text, payload)))


def _raise_child_error(rank, text, payload):
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


def run_distributed(fn, world_size: int, *args, timeout: float = 120):
    """Run ``fn(rank, world_size, *args)`` on `world_size` gloo ranks; return the per-rank results."""
    if world_size < 1:
        raise ValueError(f"run_distributed needs world_size >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    processes = [
        ctx.Process(target=_child, args=(rank, world_size, port, timeout, fn, args, results), daemon=True)
        for rank in range(world_size)
    ]
    for proc in processes:
        proc.start()
    values = [None] * world_size
    received = 0
    deadline = time.monotonic() + timeout
    try:
        while received < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"run_distributed: {world_size - received} of {world_size} ranks did not finish "
                    f"{fn.__name__} within {timeout} s (a collective missing on some rank?)"
                )
            try:
                status, rank, data = results.get(timeout=min(remaining, 1.0))
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
                _raise_child_error(rank, *data)
            values[rank] = pickle.loads(data)
            received += 1
    finally:
        if received == world_size:
            for proc in processes:
                proc.join(timeout=30)
        _stop(processes)
    return values
