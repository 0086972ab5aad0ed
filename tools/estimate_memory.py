"""Estimate the device memory of a training run, per pipeline stage, from pretrain_gpt.py's flags.

    python tools/estimate_memory.py --num-layers 24 --hidden-size 2048 --num-attention-heads 16 \
        --seq-length 2048 --micro-batch-size 4 --global-batch-size 512 --bf16 --world-size 8 \
        [--tensor-model-parallel-size 2 ...] [--vocab-size V | --padded-vocab-size P] [--device-memory-gib 80]

Only the model, the parallel layout, the batch and the precision matter (and the recompute,
sequence-parallel, distributed-optimizer and loss flags, which change the answer); the flags a
training run also needs (--train-iters, --lr, a data source) may be left out, and every
pretrain_gpt.py flag is accepted, so a launch script's flags can be pasted as they are. The
vocabulary comes from the tokenizer flags, --vocab-size V (a NullTokenizer of V + 1 ids, padded as
training pads it) or --padded-vocab-size P (the embedding rows as they are); with none of them,
GPT-2's 50,257 ids are assumed (padded to 50,304 at tensor-parallel size 1) and a note says so.

Runs on the CPU in well under a second: nothing is built, every number comes from the configs
(gigatron/core/memory.py). Prints one row per pipeline stage (the tensor-parallel ranks of a
stage hold the same; with the distributed optimizer the data-parallel rank with the largest shard
is shown), narrow enough for an 80-column terminal: parameters, gradient buffer, fp32 main
parameters, optimizer states, activations kept for backward under the schedule in use
(micro-batches in flight, recompute, sequence parallel, flash/SDPA attention, the fused or plain
loss), of which the output layer and loss, the peak of the temporary buffers, and the total. The
caching allocator's reserve and the CUDA context are separate columns set by
--allocator-overhead-fraction and --cuda-context-gib.

A hybrid Mamba model (pretrain_mamba.py's flags) is estimated when the flags name one: --spec
megatron.core.models.mamba.mamba_layer_specs mamba_stack_spec, --hybrid-override-pattern /
--hybrid-layer-pattern, --hybrid-attention-ratio / --hybrid-mlp-ratio or --is-hybrid-model; the
--mamba-* flags size its Mamba layers, and each layer counts the parameters and activations of its
kind.

With --device-memory-gib G it also names the largest micro-batch size (dividing the global batch
per data-parallel rank) whose busiest stage fits in G GiB.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gigatron.cli import run_cli  # noqa: E402

DEFAULT_VOCAB_SIZE = 50257  # GPT-2's ids, when no tokenizer or vocabulary size is given


def _extra_args(parser: argparse.ArgumentParser) -> None:
    from gigatron.training.mamba import extra_args_provider as mamba_args

    mamba_args(parser)  # --spec
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


def padded_vocab_size(args) -> tuple:
    """(embedding rows, a note or None) from --padded-vocab-size, the tokenizer flags, --vocab-size or
    the default."""
    from gigatron.core.tokenizers import vocab_size_with_padding

    if args.padded_vocab_size is not None:
        if args.padded_vocab_size < 1:
            raise ValueError(f"--padded-vocab-size must be >= 1, got {args.padded_vocab_size}")
        return args.padded_vocab_size, None
    if args.tokenizer_type is not None or args.vocab_size is not None:
        return None, None  # the training's rule: from the tokenizer, padded
    padded = vocab_size_with_padding(DEFAULT_VOCAB_SIZE, args.make_vocab_size_divisible_by,
                                     args.tensor_model_parallel_size or 1)
    return padded, (f"note: no tokenizer flags: assumed GPT-2's {DEFAULT_VOCAB_SIZE} ids, padded to {padded}; "
                    "give --vocab-size V, --padded-vocab-size P or the tokenizer flags for your model's vocabulary")


def main(argv=None) -> int:
    from gigatron.core.memory import GIB, largest_micro_batch
    from gigatron.training.arguments import parse_args
    from gigatron.training.entry import memory_estimate_from_args, memory_report_text

    args = parse_args(argv, extra_args_provider=_extra_args)
    # The estimate trains nothing: --train-iters, --lr and a data source are not needed (given, they are
    # still checked).
    args.skip_train = True
    if args.allocator_overhead_fraction < 0:
        raise ValueError(f"--allocator-overhead-fraction must be >= 0, got {args.allocator_overhead_fraction}")
    world_size = args.world_size or ((args.tensor_model_parallel_size or 1) * (args.pipeline_model_parallel_size or 1)
                                     * (getattr(args, "context_parallel_size", 1) or 1))
    context_bytes = int(args.cuda_context_gib * GIB)
    padded, note = padded_vocab_size(args)
    configs, vocab, ranks = memory_estimate_from_args(
        args, world_size, allocator_overhead_fraction=args.allocator_overhead_fraction,
        cuda_context_bytes=context_bytes, padded_vocab_size=padded)
    print(memory_report_text(args, configs, vocab, ranks))
    if note:
        print(textwrap.fill(note, width=80, break_on_hyphens=False))
    if args.device_memory_gib is not None:
        best = largest_micro_batch(
            int(args.device_memory_gib * GIB), configs.transformer, configs.ddp, configs.optimizer, vocab_size=vocab,
            seq_length=args.seq_length, global_batch_size=args.global_batch_size,
            data_parallel_size=args.data_parallel_size,
            context_parallel_size=getattr(args, "context_parallel_size", 1) or 1,
            allocator_overhead_fraction=args.allocator_overhead_fraction, cuda_context_bytes=context_bytes,
            mamba_config=configs.mamba if configs.extra.get("estimated_mamba_model") else None)
        if best is None:
            message = (f"no micro-batch size fits in {args.device_memory_gib:g} GiB: add tensor/pipeline "
                       "parallelism, --use-distributed-optimizer, --sequence-parallel or --recompute-granularity full")
        else:
            message = (f"largest micro-batch size that fits in {args.device_memory_gib:g} GiB: {best} "
                       f"(global batch {args.global_batch_size}, data-parallel size {args.data_parallel_size})")
        print(textwrap.fill(message, width=80, break_on_hyphens=False))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
