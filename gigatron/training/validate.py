"""The rules across configs, each a small named function raising ValueError that names the flags
and the fix, stated once. `validate_args` runs them all on the parsed flags and fills in the values
that follow from the world size (data-parallel size, default global batch size, number of
micro-batches) and from other flags (virtual stages from layers per stage, sequence parallelism off
at tp = 1).

A rule about the fields of one config lives in that dataclass (`__post_init__`) and runs when
`configs_from_args` builds it: heads and query groups against tensor parallelism, sequence length
against positions (TransformerConfig), --bf16 against --fp16, --min-lr against --lr
(OptimizerConfig), the warmup flags (SchedulerConfig), --overlap-param-gather (DDPConfig), the MoE
flags among themselves (MoEConfig), the training length's form, the intervals and the checkpoint
flags (TrainingConfig, LoggingConfig, CheckpointConfig). The MoE layout rules are one function of the core
(`check_moe_layout`) that this module and the MoE layer both call.

Checks read the flat namespace with `getattr(args, name, default)`, so a namespace holding only some
of the config groups (a tool's parser) is checked for what it has.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Optional

__all__ = [
    "validate_args",
    "check_parallel_sizes",
    "check_batch_sizes",
    "check_rampup_batch_size",
    "check_step_batch_size_schedule",
    "check_context_parallel_seq_length",
    "check_train_length",
    "check_lr",
    "check_lr_schedule_units",
    "force_sequence_parallel_off_at_tp1",
    "check_virtual_pipeline",
    "resolve_layers_per_virtual_stage",
    "check_data_source",
    "check_moe",
    "resolve_moe_layer_recompute",
    "check_legacy_models",
    "check_spec",
    "check_deterministic_mode",
    "check_xavier_init",
    "check_padded_vocab_size",
    "check_fp8",
    "SUPPORTED_CKPT_FORMATS",
]

from gigatron.training.config import SUPPORTED_CKPT_FORMATS  # noqa: E402 - kept importable from here


def _get(args, name, default=None):
    value = getattr(args, name, default)
    return default if value is None else value


def check_parallel_sizes(args, world_size: int) -> int:
    """world size must be a multiple of tp * pp * cp; returns the data-parallel size."""
    tp = _get(args, "tensor_model_parallel_size", 1)
    pp = _get(args, "pipeline_model_parallel_size", 1)
    cp = _get(args, "context_parallel_size", 1)
    for flag, value in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                        ("--context-parallel-size", cp)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}.")
    model_parallel = tp * pp * cp
    if world_size % model_parallel != 0:
        raise ValueError(
            f"world size ({world_size}) is not divisible by --tensor-model-parallel-size ({tp}) x "
            f"--pipeline-model-parallel-size ({pp}) x --context-parallel-size ({cp}) = {model_parallel}; "
            f"launch a multiple of {model_parallel} processes or change the parallel sizes."
        )
    ep = _get(args, "expert_model_parallel_size", 1)
    etp = _get(args, "expert_tensor_parallel_size", tp)
    if world_size % (etp * ep * pp) != 0:
        raise ValueError(
            f"world size ({world_size}) is not divisible by --expert-tensor-parallel-size ({etp}) x "
            f"--expert-model-parallel-size ({ep}) x --pipeline-model-parallel-size ({pp})."
        )
    return world_size // model_parallel


def _check_micro_batch_size(args) -> int:
    mbs = getattr(args, "micro_batch_size", None)
    if mbs is None or mbs < 1:
        raise ValueError(f"--micro-batch-size must be given and >= 1 (got {mbs}).")
    return mbs


def check_batch_sizes(args, data_parallel_size: int) -> int:
    """--micro-batch-size is required; --global-batch-size defaults to mbs x dp and must be a multiple
    of it. Returns the number of micro-batches per step (at the full batch size)."""
    mbs = _check_micro_batch_size(args)
    gbs = getattr(args, "global_batch_size", None)
    if gbs is None:
        gbs = mbs * data_parallel_size
        args.global_batch_size = gbs
    if gbs < 1 or gbs % (mbs * data_parallel_size) != 0:
        raise ValueError(
            f"--global-batch-size ({gbs}) must be a positive multiple of --micro-batch-size ({mbs}) x "
            f"data-parallel size ({data_parallel_size}) = {mbs * data_parallel_size}; use e.g. "
            f"--global-batch-size {max(1, round(gbs / (mbs * data_parallel_size))) * mbs * data_parallel_size}."
        )
    return gbs // (mbs * data_parallel_size)


def check_rampup_batch_size(args, data_parallel_size: int) -> None:
    """--rampup-batch-size START INCREMENT SAMPLES: every batch size on the way must be a multiple of
    mbs x dp and the ramp must reach --global-batch-size exactly."""
    rampup = getattr(args, "rampup_batch_size", None)
    if not rampup:
        return
    if len(rampup) != 3:
        raise ValueError(
            f"--rampup-batch-size takes three values (start batch size, increment, ramp-up samples), got {rampup}."
        )
    start, increment, samples = (int(v) for v in rampup)
    gbs = args.global_batch_size
    step = args.micro_batch_size * data_parallel_size
    if start < 1 or increment < 1 or samples < 0:
        raise ValueError(f"--rampup-batch-size values must be positive, got {rampup}.")
    if start > gbs or (gbs - start) % increment != 0:
        raise ValueError(
            f"--rampup-batch-size start {start} + k x increment {increment} must reach --global-batch-size {gbs}; "
            "choose an increment that divides (global batch size - start)."
        )
    if start % step != 0 or increment % step != 0:
        raise ValueError(
            f"--rampup-batch-size start ({start}) and increment ({increment}) must be multiples of "
            f"--micro-batch-size x data-parallel size = {step}."
        )
    if getattr(args, "train_samples", None) is None and getattr(args, "train_iters", None) is not None:
        raise ValueError("--rampup-batch-size needs --train-samples instead of --train-iters (the length of a "
                         "run with a changing batch size is given in samples).")


def check_step_batch_size_schedule(args) -> None:
    """--step-batch-size-schedule "THRESHOLD:BS ...": well formed (gigatron/training/microbatches.py),
    not with --global-batch-size or --rampup-batch-size (the schedule sets the batch size, and the
    run's --global-batch-size becomes its last entry's batch), with --train-samples (a run whose batch
    size changes is measured in samples). Each batch size's divisibility by micro-batch size x
    data-parallel size is checked when the run reaches it (MicroBatchCalculator.check_reachable)."""
    schedule = getattr(args, "step_batch_size_schedule", None)
    if schedule is None:
        return
    from gigatron.training.microbatches import parse_step_batch_size_schedule

    if getattr(args, "rampup_batch_size", None):
        raise ValueError("--step-batch-size-schedule and --rampup-batch-size both set the batch size over "
                         "training; give one of them (a ramp-up is a schedule of steps).")
    final = parse_step_batch_size_schedule(schedule, getattr(args, "seq_length", None))[-1][1]
    gbs = getattr(args, "global_batch_size", None)
    if gbs is not None and getattr(args, "_global_batch_size_from_schedule", None) != gbs:
        raise ValueError(f"--global-batch-size ({gbs}) and --step-batch-size-schedule both set the global batch "
                         "size; drop --global-batch-size (the schedule's last entry is the run's global batch size).")
    if getattr(args, "train_samples", None) is None and getattr(args, "train_iters", None) is not None:
        raise ValueError("--step-batch-size-schedule needs --train-samples instead of --train-iters (the length of "
                         "a run with a changing batch size is given in samples).")
    args.global_batch_size = final
    args._global_batch_size_from_schedule = final


def check_context_parallel_seq_length(args) -> None:
    """Context parallelism splits the sequence into 2 x cp chunks."""
    cp = _get(args, "context_parallel_size", 1)
    seq = getattr(args, "seq_length", None)
    if cp > 1 and seq is not None and seq % (2 * cp) != 0:
        raise ValueError(
            f"--seq-length ({seq}) must be divisible by 2 x --context-parallel-size ({2 * cp})."
        )


def check_train_length(args) -> None:
    """A training run needs its length: --train-iters or --train-samples (not with --skip-train).
    TrainingConfig checks that they exclude each other and are not negative."""
    if getattr(args, "train_iters", None) is None and getattr(args, "train_samples", None) is None \
            and not getattr(args, "skip_train", False):
        raise ValueError("give the length of training with --train-iters or --train-samples.")


def check_lr(args) -> None:
    """--lr is required for training (OptimizerConfig checks --min-lr against it)."""
    if getattr(args, "skip_train", False) or not hasattr(args, "lr"):
        return
    if args.lr is None:
        raise ValueError("--lr (the peak learning rate) is required for training, e.g. --lr 3e-4.")


def check_lr_schedule_units(args) -> None:
    """Iteration-based runs take iteration-based schedule flags and sample-based runs sample-based ones."""
    if getattr(args, "train_samples", None) is not None:
        wrong = [flag for flag, name in (("--lr-decay-iters", "lr_decay_iters"), ("--lr-warmup-iters", "lr_warmup_iters"),
                                         ("--lr-wsd-decay-iters", "lr_wsd_decay_iters")) if getattr(args, name, None)]
        if wrong:
            raise ValueError(f"with --train-samples use the -samples variants instead of {', '.join(wrong)}.")
    elif getattr(args, "train_iters", None) is not None:
        wrong = [flag for flag, name in (("--lr-decay-samples", "lr_decay_samples"),
                                         ("--lr-warmup-samples", "lr_warmup_samples"),
                                         ("--lr-wsd-decay-samples", "lr_wsd_decay_samples")) if getattr(args, name, None)]
        if wrong:
            raise ValueError(f"with --train-iters use the -iters variants instead of {', '.join(wrong)}.")


def force_sequence_parallel_off_at_tp1(args) -> None:
    """Sequence parallelism shards over the tensor-parallel ranks; at tp=1 it is turned off (with a warning)."""
    if getattr(args, "sequence_parallel", False) and _get(args, "tensor_model_parallel_size", 1) == 1:
        warnings.warn("--sequence-parallel has no effect with --tensor-model-parallel-size 1; turning it off.",
                      stacklevel=2)
        args.sequence_parallel = False


def resolve_layers_per_virtual_stage(args) -> None:
    """--num-layers-per-virtual-pipeline-stage L sets the virtual stages per rank to layers / pp / L."""
    per_stage = getattr(args, "num_layers_per_virtual_pipeline_stage", None)
    if per_stage is None:
        return
    if getattr(args, "virtual_pipeline_model_parallel_size", None) is not None:
        raise ValueError("--num-layers-per-virtual-pipeline-stage and --num-virtual-stages-per-pipeline-rank are "
                         "mutually exclusive; give one.")
    pp = _get(args, "pipeline_model_parallel_size", 1)
    layers = getattr(args, "num_layers", None)
    if per_stage < 1 or layers is None or layers % pp != 0 or (layers // pp) % per_stage != 0:
        raise ValueError(f"--num-layers ({layers}) / --pipeline-model-parallel-size ({pp}) must be a multiple of "
                         f"--num-layers-per-virtual-pipeline-stage ({per_stage}).")
    args.virtual_pipeline_model_parallel_size = layers // pp // per_stage


def check_virtual_pipeline(args) -> None:
    """Interleaved pipelining needs pp > 1 (TransformerConfig checks that each stage's layers split
    over the virtual stages, uneven first/last stages included)."""
    vp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    if vp is None or vp == 1:
        if vp == 1:
            args.virtual_pipeline_model_parallel_size = None
        return
    pp = _get(args, "pipeline_model_parallel_size", 1)
    if pp < 2:
        raise ValueError(
            f"--num-virtual-stages-per-pipeline-rank ({vp}) needs --pipeline-model-parallel-size >= 2 (got {pp})."
        )


def check_data_source(args) -> None:
    """Exactly one data source: --data-path, the per-split paths, or --mock-data."""
    if not any(hasattr(args, n) for n in ("data_path", "mock_data", "train_data_path")):
        return
    sources = []
    if getattr(args, "data_path", None):
        sources.append("--data-path")
    split_paths = [flag for flag, name in (("--train-data-path", "train_data_path"), ("--valid-data-path", "valid_data_path"),
                                           ("--test-data-path", "test_data_path")) if getattr(args, name, None)]
    if split_paths:
        sources.append("/".join(split_paths))
    if getattr(args, "mock_data", False):
        sources.append("--mock-data")
    if len(sources) > 1:
        raise ValueError(f"give one data source, not {' and '.join(sources)}.")
    if not sources and not getattr(args, "skip_train", False):
        raise ValueError("no data source: give --data-path PREFIX (or per-split --train-data-path etc.), "
                         "or --mock-data for synthetic data.")
    if split_paths and getattr(args, "split", None):
        raise ValueError("--split cannot be combined with --train-data-path/--valid-data-path/--test-data-path.")


def check_moe(args) -> None:
    """The MoE flags (--num-experts, --moe-*) among themselves and against the model and the
    expert layout: experts divide over --expert-model-parallel-size, the routed experts' hidden size
    over --expert-tensor-parallel-size, MoE with tensor parallelism needs --sequence-parallel, the
    experts have no biases, and --moe-layer-freq fits --num-layers."""
    num_experts = getattr(args, "num_experts", None)
    ep = _get(args, "expert_model_parallel_size", 1)
    if num_experts is None:
        if ep > 1:
            raise ValueError(f"--expert-model-parallel-size {ep} needs an MoE model: pass --num-experts "
                             "(or drop --expert-model-parallel-size).")
        return
    from gigatron.core.transformer.moe.config import check_moe_layout, moe_layer_pattern

    tp = _get(args, "tensor_model_parallel_size", 1)
    etp = _get(args, "expert_tensor_parallel_size", tp)
    check_moe_layout(args, tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                     expert_tensor_parallel_size=etp, sequence_parallel=getattr(args, "sequence_parallel", False),
                     add_bias_linear=getattr(args, "add_bias_linear", True),
                     ffn_hidden_size=_get(args, "ffn_hidden_size", None))
    if getattr(args, "num_layers", None) is not None:
        moe_layer_pattern(args, args.num_layers)


def resolve_moe_layer_recompute(args) -> None:
    """--moe-layer-recompute means selective recompute of the `moe` module (as in Megatron); with
    full recompute the whole layers are recomputed already."""
    if not getattr(args, "moe_layer_recompute", False) or getattr(args, "recompute_granularity", None) == "full":
        return
    args.recompute_granularity = "selective"
    modules = list(getattr(args, "recompute_modules", None) or ["core_attn"])
    if "moe" not in modules:
        modules.append("moe")
    args.recompute_modules = modules


def check_legacy_models(args) -> None:
    """--use-legacy-models asks for Megatron's pre-Core model classes, which Gigatron does not have."""
    if getattr(args, "use_legacy_models", False):
        raise ValueError("--use-legacy-models: Gigatron has only Megatron-Core models. Convert a legacy checkpoint "
                         "to a Core one with Megatron-LM's `tools/checkpoint/convert.py --model-type GPT --loader "
                         "legacy --saver core` (or train from scratch), then drop --use-legacy-models.")


def check_spec(args) -> None:
    """--spec MODULE FUNCTION (the layer builder of the GPT model)."""
    spec = getattr(args, "spec", None)
    if spec is not None and len(spec) != 2:
        raise ValueError(f"--spec takes MODULE FUNCTION (a Python module and the function in it that builds a "
                         f"decoder layer), got {' '.join(spec)}")


def check_deterministic_mode(args) -> None:
    """--deterministic-mode excludes FlashAttention, whose backward pass is not deterministic."""
    if not getattr(args, "deterministic_mode", False):
        return
    if getattr(args, "use_flash_attn", False) or getattr(args, "attention_backend", "auto") == "flash":
        raise ValueError("--deterministic-mode cannot use FlashAttention (its backward is not deterministic); "
                         "drop --use-flash-attn / --attention-backend flash.")


def check_xavier_init(args) -> None:
    """--init-method-xavier-uniform covers the dense layers; the routed experts are initialized from
    --init-method-std expert by expert, so the two are not combined."""
    if getattr(args, "init_method_xavier_uniform", False) and getattr(args, "num_experts", None):
        raise ValueError("--init-method-xavier-uniform is not supported with --num-experts (the routed experts "
                         "are initialized from --init-method-std); drop one of them.")


def check_padded_vocab_size(args) -> None:
    """--padded-vocab-size splits over the tensor-parallel ranks (the tokenizer's size is checked
    when the tokenizer is built)."""
    padded = getattr(args, "padded_vocab_size", None)
    if padded is None:
        return
    tp = _get(args, "tensor_model_parallel_size", 1)
    if padded < 1 or padded % tp != 0:
        raise ValueError(f"--padded-vocab-size ({padded}) must be a positive multiple of "
                         f"--tensor-model-parallel-size ({tp}).")


def check_fp8(args) -> None:
    """The FP8 flags against the rest of the run: --fp8-param-gather needs the distributed optimizer
    and a per-tensor recipe, and --first-last-layers-bf16 must leave a layer in FP8. The card, and
    that the model is a GPT, are checked when the model is built (gigatron.training.loop.get_model)."""
    fmt = getattr(args, "fp8", None)
    if fmt is None:
        return
    from gigatron.core.fp8.config import FP8Config, check_bf16_layer_counts, check_fp8_param_gather

    fields = ("fp8", "fp8_recipe", "fp8_margin", "fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_wgrad",
              "fp8_param_gather", "first_last_layers_bf16", "num_layers_at_start_in_bf16",
              "num_layers_at_end_in_bf16")
    config = FP8Config(**{name: getattr(args, name) for name in fields if hasattr(args, name)})
    check_bf16_layer_counts(config, _get(args, "num_layers", 1))
    check_fp8_param_gather(config, bool(_get(args, "use_distributed_optimizer", False)))


def check_megatron_ckpt_format(args) -> None:
    """--ckpt-format megatron_torch_dist (and --ckpt-convert-format) writes Megatron-Core's layout of
    dense GPT models (standard attention) with Adam only: refuse experts, multi-latent attention,
    multi-token prediction and SGD before any training is done."""
    chosen = [f"--{flag.replace('_', '-')}" for flag in ("ckpt_format", "ckpt_convert_format")
              if getattr(args, flag, None) == "megatron_torch_dist"]
    if not chosen:
        return
    if getattr(args, "num_experts", None):
        raise ValueError(f"{chosen[0]} megatron_torch_dist does not write mixture-of-experts models yet; use "
                         "--ckpt-format torch_dist (Gigatron's layout) for --num-experts.")
    if getattr(args, "multi_latent_attention", False) or getattr(args, "mtp_num_layers", None):
        raise ValueError(f"{chosen[0]} megatron_torch_dist does not write multi-latent attention or "
                         "multi-token prediction layers yet; use --ckpt-format torch_dist.")
    if _get(args, "optimizer", "adam") != "adam":
        raise ValueError(f"{chosen[0]} megatron_torch_dist writes Adam's state only; use --optimizer adam or "
                         "--ckpt-format torch_dist.")


def validate_args(args: argparse.Namespace, world_size: Optional[int] = None) -> argparse.Namespace:
    """Run every check; fill in world_size, data_parallel_size, global_batch_size and
    num_microbatches (at the full batch size). Returns `args`."""
    world_size = _get(args, "world_size", 1) if world_size is None else world_size
    args.world_size = world_size
    args.data_parallel_size = check_parallel_sizes(args, world_size)
    check_train_length(args)
    if hasattr(args, "micro_batch_size"):
        check_step_batch_size_schedule(args)
        if getattr(args, "step_batch_size_schedule", None) is None:
            args.num_microbatches = check_batch_sizes(args, args.data_parallel_size)
        else:
            _check_micro_batch_size(args)
            args.num_microbatches = max(1, args.global_batch_size // (args.micro_batch_size * args.data_parallel_size))
        check_rampup_batch_size(args, args.data_parallel_size)
    check_context_parallel_seq_length(args)
    check_lr(args)
    check_lr_schedule_units(args)
    force_sequence_parallel_off_at_tp1(args)
    resolve_layers_per_virtual_stage(args)
    check_virtual_pipeline(args)
    check_data_source(args)
    check_moe(args)
    resolve_moe_layer_recompute(args)
    check_legacy_models(args)
    check_spec(args)
    check_deterministic_mode(args)
    check_xavier_init(args)
    check_padded_vocab_size(args)
    check_fp8(args)
    check_megatron_ckpt_format(args)
    return args
