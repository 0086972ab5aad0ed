"""Mamba-2 and hybrid Mamba-Transformer pretraining (Megatron's pretrain_mamba.py): the model
provider, and the batch, loss and dataset providers of GPT (the same causal language-model data).

The model is MambaModel (gigatron/core/models/mamba.py) built from the TransformerConfig, the
MambaConfig (--mamba-state-dim, --mamba-head-dim, --mamba-num-groups, --mamba-num-heads,
--hybrid-override-pattern / --hybrid-layer-pattern, --hybrid-attention-ratio, --hybrid-mlp-ratio,
--is-hybrid-model) and, for `E` layers, the MoEConfig.

Megatron's Mamba scripts name the layer spec with --spec; the one value accepted is the Mamba stack
(`--spec megatron.core.models.mamba.mamba_layer_specs mamba_stack_spec`), which is what this
script always builds. Refused with a message: another spec, context parallelism (the scan is not
split over the sequence), --reset-attention-mask (Mamba layers carry state across document
boundaries; Megatron's Mamba models do not reset either).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from gigatron.training import gpt

__all__ = ["MAMBA_STACK_SPEC", "extra_args_provider", "check_mamba_args", "is_mamba_run", "refuse_mamba_flags", "model_provider", "forward_step",
           "datasets_provider", "main"]

MAMBA_STACK_SPEC = ("megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec")

forward_step = gpt.forward_step
datasets_provider = gpt.datasets_provider


def extra_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--spec MODULE NAME (Megatron's layer-spec selector; only the Mamba stack is accepted)."""
    if "--spec" not in parser._option_string_actions:  # noqa: SLF001 - argparse keeps no public index
        group = parser.add_argument_group("Mamba")
        group.add_argument("--spec", nargs="*", default=None,
                           help="The layer spec as Megatron names it (module, then name). pretrain_mamba accepts "
                                f"the Mamba stack only: --spec {' '.join(MAMBA_STACK_SPEC)} (the default).")
    return parser


def check_mamba_args(args) -> None:
    """The flags a Mamba / hybrid run cannot take."""
    spec = getattr(args, "spec", None)
    if spec and tuple(spec) != MAMBA_STACK_SPEC:
        raise ValueError(f"--spec {' '.join(spec)} is not the Mamba stack; pretrain_mamba builds "
                         f"--spec {' '.join(MAMBA_STACK_SPEC)} only (drop --spec or pass that)")
    cp = getattr(args, "context_parallel_size", 1) or 1
    if cp > 1:
        raise ValueError(f"--context-parallel-size {cp}: context parallelism is not supported for Mamba layers "
                         "(the state-space scan runs over the whole sequence); drop --context-parallel-size")
    if getattr(args, "reset_attention_mask", False):
        raise ValueError("--reset-attention-mask cannot apply to a Mamba model: its Mamba layers carry their "
                         "state across document boundaries; drop --reset-attention-mask")


def is_mamba_run(args) -> bool:
    """Whether flags that are not pretrain_mamba's own describe a Mamba / hybrid model (the memory
    estimate's rule): --spec of the Mamba stack, a hybrid pattern or ratio, or --is-hybrid-model."""
    spec = getattr(args, "spec", None)
    return bool((spec and tuple(spec) == MAMBA_STACK_SPEC) or getattr(args, "hybrid_override_pattern", None)
                or getattr(args, "hybrid_attention_ratio", 0.0) or getattr(args, "hybrid_mlp_ratio", 0.0)
                or getattr(args, "is_hybrid_model", False))


def refuse_mamba_flags(args, script: str) -> None:
    """A script that builds no Mamba layers (pretrain_gpt.py) refuses the Mamba flags the user gave,
    instead of training another model than the flags describe."""
    import dataclasses

    from gigatron.core.transformer.mamba.config import MambaConfig
    from gigatron.training.arguments import explicit_flags

    given = sorted(explicit_flags(args) & {f.name for f in dataclasses.fields(MambaConfig)})
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(f"{flags} describe a Mamba / hybrid model, which {script} does not build; "
                         "train it with pretrain_mamba.py (or drop the flags)")


def model_provider(ctx, pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None):
    """One pipeline stage of a Mamba / hybrid model, initialized from --seed."""
    from gigatron.core.models.mamba import MambaModel

    if vp_stage is not None:
        raise ValueError("hybrid Mamba models do not support --virtual-pipeline-model-parallel-size; drop it")
    check_mamba_args(argparse.Namespace(spec=ctx.configs.training.spec,
                                        context_parallel_size=ctx.groups.cp.size,
                                        reset_attention_mask=ctx.configs.data.reset_attention_mask))
    return MambaModel(ctx.configs.transformer, ctx.configs.mamba, ctx.groups, ctx.padded_vocab_size,
                      pre_process=pre_process, post_process=post_process, seed=ctx.configs.data.seed,
                      moe_config=getattr(ctx.configs, "moe", None))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """pretrain_mamba.py: parse Megatron-style flags and train a Mamba / hybrid model."""
    from gigatron.training.arguments import parse_args
    from gigatron.training.loop import pretrain_and_exit

    args = parse_args(argv, extra_args_provider=extra_args_provider)
    check_mamba_args(args)
    if args.dry_run:
        from gigatron.training.entry import _dry_run
        return _dry_run(args, mamba=True)
    return pretrain_and_exit(datasets_provider, model_provider, forward_step, args)


if __name__ == "__main__":
    from gigatron.cli import run_cli

    sys.exit(run_cli(main))
