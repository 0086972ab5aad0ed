"""Console entry points (`pretrain_gpt`)."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import Optional, Sequence

__all__ = ["main", "pretrain_gpt_main", "padded_vocab_size_from_args", "memory_estimate_from_args", "memory_report_text"]


def padded_vocab_size_from_args(data, tensor_model_parallel_size: Optional[int] = None) -> int:
    """The padded vocabulary the run will use, from the tokenizer settings (CPU only). `data` is the
    DataConfig (or a namespace with its tokenizer flags and --tensor-model-parallel-size)."""
    from gigatron.core.tokenizers import build_tokenizer, vocab_size_with_padding

    if tensor_model_parallel_size is None:
        tensor_model_parallel_size = getattr(data, "tensor_model_parallel_size", 1) or 1
    if getattr(data, "tokenizer_type", None) is None and getattr(data, "vocab_size", None) is not None:
        data.tokenizer_type = "NullTokenizer"
    if getattr(data, "tokenizer_type", None) is None:
        raise ValueError("give --tokenizer-type (with its files), or --vocab-size V for a NullTokenizer over ids 0..V")
    tokenizer = build_tokenizer(data)
    if getattr(data, "padded_vocab_size", None) is not None:
        from gigatron.training.loop import checked_padded_vocab_size
        return checked_padded_vocab_size(data.padded_vocab_size, tokenizer.vocab_size, tensor_model_parallel_size)
    return vocab_size_with_padding(tokenizer.vocab_size, data.make_vocab_size_divisible_by, tensor_model_parallel_size)


def memory_estimate_from_args(args: argparse.Namespace, world_size: int, *, micro_batch_size: Optional[int] = None,
                              allocator_overhead_fraction: float = 0.0, cuda_context_bytes: int = 0,
                              padded_vocab_size: Optional[int] = None, mamba: Optional[bool] = None):
    """Validate the flags for `world_size` processes and estimate each pipeline stage's memory
    (gigatron.core.memory.estimate_memory). Returns (configs, padded vocab, [RankMemory]).
    `padded_vocab_size` (the embedding rows) replaces the tokenizer flags when given. `mamba`: the
    model is a hybrid Mamba model (None: when the flags say so, gigatron.training.mamba.is_mamba_run)."""
    from gigatron.core.memory import estimate_memory
    from gigatron.training.arguments import configs_from_args
    from gigatron.training.validate import validate_args

    if getattr(args, "num_experts", None):
        raise ValueError("the memory estimate (--dry-run, tools/estimate_memory.py) models dense layers only; "
                         "--num-experts (MoE layers) is not covered yet: drop it for a dense estimate")
    validate_args(args, world_size)
    configs = configs_from_args(args)
    if mamba is None:
        from gigatron.training.mamba import is_mamba_run
        mamba = is_mamba_run(args)
    mamba_config = configs.mamba if mamba else None
    configs.extra["estimated_mamba_model"] = bool(mamba)
    training, parallel = configs.training, configs.parallel
    vocab = padded_vocab_size or padded_vocab_size_from_args(configs.data, parallel.tensor_model_parallel_size)
    data_parallel_size = _data_parallel_size(configs)
    mbs = micro_batch_size or training.micro_batch_size
    num_microbatches = training.global_batch_size // (mbs * data_parallel_size)
    ranks = estimate_memory(
        configs.transformer, configs.ddp, configs.optimizer, vocab_size=vocab, micro_batch_size=mbs,
        seq_length=configs.transformer.seq_length, num_microbatches=num_microbatches,
        data_parallel_size=data_parallel_size, context_parallel_size=parallel.context_parallel_size,
        microbatch_group_size=configs.extra.get("microbatch_group_size_per_vp_stage"),
        allocator_overhead_fraction=allocator_overhead_fraction, cuda_context_bytes=cuda_context_bytes,
        mamba_config=mamba_config)
    return configs, vocab, ranks


def _data_parallel_size(configs) -> int:
    p = configs.parallel
    return (configs.world_size or 1) // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size
                                         * p.context_parallel_size)


def memory_report_text(args, configs, vocab: int, ranks) -> str:
    """The estimate as printed by --dry-run and tools/estimate_memory.py (`args` is not read: the
    configs say everything; it stays in the signature for the tools that pass it)."""
    from gigatron.core.memory import format_memory_table

    t, training = configs.transformer, configs.training
    dp = _data_parallel_size(configs)
    recompute = t.recompute_granularity or "none"
    if t.recompute_granularity == "full":
        recompute += f" ({t.recompute_method}, {t.recompute_num_layers} layers)"
    elif t.recompute_granularity == "selective":
        recompute += f" ({', '.join(t.recompute_modules)})"
    if configs.extra.get("estimated_mamba_model"):
        from gigatron.core.memory import hybrid_layer_kinds
        pattern = "".join(kind for pp_rank in range(t.pipeline_model_parallel_size)
                          for kind in hybrid_layer_kinds(t, configs.mamba, pp_rank))
        recompute += f" | hybrid Mamba pattern {pattern}"
    head = (f"memory estimate per rank: tp={t.tensor_model_parallel_size} pp={t.pipeline_model_parallel_size} "
            f"vp={t.virtual_pipeline_model_parallel_size or 1} dp={dp} | micro batch "
            f"{training.micro_batch_size} x seq {t.seq_length}, "
            f"{training.global_batch_size // (training.micro_batch_size * dp)} micro-batches | "
            f"{t.params_dtype} | recompute {recompute} | sequence parallel {bool(t.sequence_parallel)} | "
            f"distributed optimizer {bool(configs.ddp.use_distributed_optimizer)} | "
            f"{'fused chunked' if t.cross_entropy_loss_fusion else 'plain'} loss | padded vocab {vocab}")
    notes = ("assumes eager layers on CUDA with a flash/cuDNN/memory-efficient attention kernel"
             + (" (--torch-compile changes what is saved; treat the activations as an upper bound)"
                if training.torch_compile else ""))
    head = textwrap.fill(head, width=80, subsequent_indent="  ", break_on_hyphens=False)  # fits a terminal
    notes = textwrap.fill(notes, width=80, break_on_hyphens=False)
    return "\n".join([head, format_memory_table(ranks, tp_size=t.tensor_model_parallel_size), notes])


def _dry_run(args: argparse.Namespace, mamba: Optional[bool] = None) -> int:
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    configs, vocab, ranks = memory_estimate_from_args(args, world_size, mamba=mamba)
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(memory_report_text(args, configs, vocab, ranks), flush=True)
    return 0


def pretrain_gpt_main(argv: Optional[Sequence[str]] = None) -> int:
    """Pretrain a GPT model from Megatron-style flags (`pretrain_gpt --help` lists them)."""
    from gigatron.training.arguments import default_tokenizer_type, parse_args

    args = default_tokenizer_type(parse_args(argv), "GPT2BPETokenizer")
    from gigatron.training.mamba import refuse_mamba_flags
    refuse_mamba_flags(args, "pretrain_gpt.py")
    if args.dry_run:
        return _dry_run(args)

    from gigatron.training import gpt
    from gigatron.training.loop import pretrain_and_exit

    return pretrain_and_exit(gpt.datasets_provider, gpt.model_provider, gpt.forward_step, args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The `pretrain_gpt` command: `pretrain_gpt_main` with a user error (bad flags, missing file,
    bad data) reported as one `error:` line and exit status 2 (gigatron.cli.run_cli)."""
    from gigatron.cli import run_cli

    return run_cli(pretrain_gpt_main, argv)


if __name__ == "__main__":
    sys.exit(main())
