"""Estimate the device memory of a training run, per pipeline stage, from pretrain_gpt.py's flags.

    python tools/estimate_memory.py --world-size 8 <pretrain_gpt.py flags> [--device-memory-gib 80]

Runs on the CPU in well under a second: nothing is built, every number comes from the configs
(gigatron/core/memory.py). Prints one column per pipeline stage (the tensor-parallel ranks of a
stage hold the same; with the distributed optimizer the data-parallel rank with the largest shard
is shown): parameters, gradient buffer, fp32 main parameters, optimizer states, activations kept
for backward under the schedule in use (micro-batches in flight, recompute, sequence parallel,
flash/SDPA attention, the fused or plain loss), of which the output layer and loss, the peak of
the temporary buffers, and the total. The caching allocator's reserve and the CUDA context are
separate lines set by --allocator-overhead-fraction and --cuda-context-gib.

With --device-memory-gib G it also names the largest micro-batch size (dividing the global batch
per data-parallel rank) whose busiest stage fits in G GiB.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _extra_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("memory estimate")
    group.add_argument("--world-size", type=int, default=None,
                       help="Number of processes of the run (default: tp x pp x cp, i.e. data-parallel size 1).")
    group.add_argument("--device-memory-gib", type=float, default=None,
                       help="Device memory in GiB: also report the largest micro-batch size that fits.")
    group.add_argument("--allocator-overhead-fraction", type=float, default=0.0,
                       help="Caching-allocator reserve beyond the allocated peak, as a fraction of it, shown as its "
                            "own line (measured reserved/allocated - 1 is typically 0.02-0.15). Default 0.")
    group.add_argument("--cuda-context-gib", type=float, default=0.0,
                       help="CUDA context and kernel images outside the allocator (about 0.5 GiB on H100), shown "
                            "as its own line. Default 0.")


def main(argv=None) -> int:
    from gigatron.core.memory import GIB, largest_micro_batch
    from gigatron.training.arguments import parse_args
    from gigatron.training.entry import memory_estimate_from_args, memory_report_text

    args = parse_args(argv, extra_args_provider=_extra_args)
    if args.allocator_overhead_fraction < 0:
        raise ValueError(f"--allocator-overhead-fraction must be >= 0, got {args.allocator_overhead_fraction}")
    world_size = args.world_size or ((args.tensor_model_parallel_size or 1) * (args.pipeline_model_parallel_size or 1)
                                     * (getattr(args, "context_parallel_size", 1) or 1))
    context_bytes = int(args.cuda_context_gib * GIB)
    configs, vocab, ranks = memory_estimate_from_args(
        args, world_size, allocator_overhead_fraction=args.allocator_overhead_fraction,
        cuda_context_bytes=context_bytes)
    print(memory_report_text(args, configs, vocab, ranks))
    if args.device_memory_gib is not None:
        best = largest_micro_batch(
            int(args.device_memory_gib * GIB), configs.transformer, configs.ddp, configs.optimizer, vocab_size=vocab,
            seq_length=args.seq_length, global_batch_size=args.global_batch_size,
            data_parallel_size=args.data_parallel_size,
            context_parallel_size=getattr(args, "context_parallel_size", 1) or 1,
            allocator_overhead_fraction=args.allocator_overhead_fraction, cuda_context_bytes=context_bytes)
        if best is None:
            print(f"no micro-batch size fits in {args.device_memory_gib:g} GiB: add tensor/pipeline parallelism, "
                  "--use-distributed-optimizer, --sequence-parallel or --recompute-granularity full")
        else:
            print(f"largest micro-batch size that fits in {args.device_memory_gib:g} GiB: {best} "
                  f"(global batch {args.global_batch_size}, data-parallel size {args.data_parallel_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
