"""torch_dist checkpoint speed for the 1.3B GPT (bf16 params + fp32 main params and Adam state).

Measured in one run, on one device:
  - the disk's sequential write speed: `dd` of --dd-gib GiB into the save directory, flushed
    (conv=fdatasync), timed from outside;
  - a synchronous save: wall time (= the training stall), bytes written, bytes/s;
  - a load into the same model: wall time and bytes/s, with CRC-32 verification and without (the
    files are in the page cache after the save unless --drop-caches can drop it: root only);
  - asynchronous saves (--async-save): the stall (plan + snapshot to pinned host memory), the
    time until the background write is finalized, and the training step time while it writes
    (the first async save allocates its pinned buffers; the second reuses them).

    python bench/bench_checkpoint.py                          # 1.3B on the GPU
    python bench/bench_checkpoint.py --cpu-smoke              # tiny model on the CPU (self-check)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gigatron.core.checkpoint.dist import AsyncCheckpointSaver, load_torch_dist, save_torch_dist  # noqa: E402
from gigatron.core.distributed import DDPConfig, DistributedDataParallel, finalize_model_grads  # noqa: E402
from gigatron.core.models.gpt import GPTModel  # noqa: E402
from gigatron.core.optim import OptimizerConfig, get_optimizer  # noqa: E402
from gigatron.core.parallel.groups import ParallelGroups  # noqa: E402
from gigatron.core.transformer.config import TransformerConfig  # noqa: E402

GIB = float(1 << 30)


def build(cpu_smoke: bool):
    if cpu_smoke:
        shape = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, max_position_embeddings=32)
        vocab, device = 256, torch.device("cpu")
    else:
        shape = dict(num_layers=24, hidden_size=2048, num_attention_heads=16, seq_length=2048,
                     max_position_embeddings=2048)
        vocab, device = 50304, torch.device("cuda")
    config = TransformerConfig(**shape, attention_dropout=0.0, hidden_dropout=0.0, bf16=True,
                               params_dtype=torch.bfloat16)
    groups = ParallelGroups.single()
    with device:
        model = GPTModel(config, groups, vocab_size=vocab)
    ddp = DistributedDataParallel(DDPConfig(), model, groups)
    opt = get_optimizer(OptimizerConfig(lr=1e-4, bf16=True, params_dtype=torch.bfloat16), [ddp], groups)
    return config, groups, ddp, opt, vocab, device


def make_step(config, groups, ddp, opt, vocab, device, micro_batch_size):
    tokens = torch.randint(0, vocab, (micro_batch_size, config.seq_length + 1), device=device)

    def step() -> float:
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = ddp(tokens[:, :-1], None, None, labels=tokens[:, 1:]).float().mean()
        loss.backward()
        finalize_model_grads([ddp], groups)
        opt.step()
        return sync(device)

    return step


def sync(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def dd_write_speed(directory: str, gib: float) -> float:
    """Bytes/s of a flushed sequential write of `gib` GiB into `directory`."""
    target = os.path.join(directory, "dd.tmp")
    count = max(1, int(gib * 64))  # 16 MiB blocks
    start = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={count}", "conv=fdatasync"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    os.unlink(target)
    return count * 16 * (1 << 20) / elapsed


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return True
    except OSError:
        return False


def timed_steps(step, n: int, device) -> list[float]:
    times = []
    for _ in range(n):
        start = sync(device)
        times.append(step() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--save-dir", default=None, help="where to write (default: a fresh dir under /tmp)")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--dd-gib", type=float, default=None, help="GiB written by dd (default: the checkpoint size)")
    parser.add_argument("--io-threads", type=int, default=4, help="writer threads per rank")
    parser.add_argument("--drop-caches", action="store_true", help="drop the page cache before loading (root)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()

    root = args.save_dir or f"/tmp/gigatron_ckpt_bench_{os.getpid()}"
    os.makedirs(root, exist_ok=True)
    config, groups, ddp, opt, vocab, device = build(args.cpu_smoke)
    step = make_step(config, groups, ddp, opt, vocab, device, 1 if args.cpu_smoke else args.micro_batch_size)
    timed_steps(step, 2, device)  # warm-up; creates the Adam state
    base = timed_steps(step, 3, device)
    step_s = sum(base) / len(base)
    extra = {"iteration": 5, "args": {"bench": True}}
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "params": sum(p.numel() for p in ddp.module.parameters()), "step_s": step_s}

    # synchronous save
    path = os.path.join(root, "sync")
    start = sync(device)
    save_torch_dist(path, [ddp], opt, extra, groups, num_io_threads=args.io_threads)
    sync_s = time.perf_counter() - start
    size = dir_bytes(path)
    report.update(ckpt_bytes=size, sync_save_s=sync_s, sync_save_gib_s=size / sync_s / GIB)
    report["dd_write_gib_s"] = dd_write_speed(root, args.dd_gib or size / GIB) / GIB

    # load (with and without CRC verification)
    for verify in (True, False):
        dropped = drop_caches() if args.drop_caches else False
        start = sync(device)
        load_torch_dist(path, [ddp], opt, groups, verify_checksums=verify)
        elapsed = sync(device) - start
        tag = "load_verified" if verify else "load_unverified"
        report.update({f"{tag}_s": elapsed, f"{tag}_gib_s": size / elapsed / GIB, f"{tag}_cold_cache": dropped})

    # asynchronous saves: stall, time to finalize, step time while writing
    saver = AsyncCheckpointSaver(num_io_threads=args.io_threads)
    for n in (1, 2):
        path = os.path.join(root, f"async{n}")
        start = sync(device)
        save_torch_dist(path, [ddp], opt, extra, groups, async_saver=saver)
        stall = sync(device) - start
        during = []
        while True:
            t0 = sync(device)
            step()
            during.append(time.perf_counter() - t0)
            if saver.maybe_finalize():
                break
        done = time.perf_counter() - start
        async_size = dir_bytes(path)
        if abs(async_size - size) > max(size // 1000, 1 << 20):  # the same tensors; metadata may differ slightly
            raise RuntimeError(f"async checkpoint {path} holds {async_size} bytes, the sync one {size}")
        report[f"async{n}_bytes"] = async_size
        report.update({f"async{n}_stall_s": stall, f"async{n}_until_finalized_s": done,
                       f"async{n}_steps_while_writing": len(during),
                       f"async{n}_step_s_while_writing": sum(during) / len(during)})
    saver.close()

    # the async checkpoint restores what the sync one does
    load_torch_dist(os.path.join(root, "async2"), [ddp], opt, groups)

    print(f"device {report['device']}, {report['params'] / 1e6:.1f}M params, checkpoint "
          f"{size / GIB:.2f} GiB, train step {step_s * 1e3:.1f} ms")
    print(f"disk (dd, fdatasync)        {report['dd_write_gib_s']:.2f} GiB/s")
    print(f"sync save                   {sync_s:.2f} s  {report['sync_save_gib_s']:.2f} GiB/s  (stall {sync_s:.2f} s)")
    for tag in ("load_verified", "load_unverified"):
        print(f"{tag:<27} {report[tag + '_s']:.2f} s  {report[tag + '_gib_s']:.2f} GiB/s"
              f"{'  (cold cache)' if report[tag + '_cold_cache'] else '  (page cache warm)'}")
    for n in (1, 2):
        print(f"async save #{n}               stall {report[f'async{n}_stall_s']:.2f} s, finalized after "
              f"{report[f'async{n}_until_finalized_s']:.2f} s, step while writing "
              f"{report[f'async{n}_step_s_while_writing'] * 1e3:.1f} ms ({report[f'async{n}_steps_while_writing']} steps)")
    print(json.dumps(report))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
