"""The training loop: `pretrain(datasets_provider, model_provider, forward_step_func, args)`.

    parse + validate flags -> configs -> initialize (process group, device, groups, seeds)
    -> tokenizer -> model chunks (one per virtual stage) wrapped in DistributedDataParallel
    -> optimizer + lr schedule -> load checkpoint -> data iterators
    -> loop: train_step, log, maybe evaluate, maybe save, maybe exit
    -> final save, validation and test evaluation.

Providers (no globals: they receive the `TrainContext`):

    model_provider(ctx, pre_process: bool, post_process: bool, vp_stage: int | None) -> nn.Module
    datasets_provider(ctx, train_valid_test_num_samples) -> (train, valid, test)  (each may be None)
    forward_step_func(data_iterator, model) -> (output_tensor, loss_func)   (the schedules' contract)
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from gigatron.core.transformer.layer import TransformerLayer
from gigatron.training.arguments import Configs, args_dict_from_configs, build_config, configs_from_args, parse_args
from gigatron.training.checkpointing import (
    LoadedCheckpoint,
    load_args_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from gigatron.training.config import CheckpointConfig
from gigatron.training.initialize import RunContext, collective_phase, initialize
from gigatron.training.evaluation import evaluate, evaluate_and_report, final_validation_label, run_evaluation_hook
from gigatron.training.logging import TrainingLog, print_rank_0
from gigatron.training.microbatches import MicroBatchCalculator
from gigatron.training.profiling import start_profiler, validate_profile_args
from gigatron.training.train_report import (
    DeferredChecks,
    NonFiniteLossError,
    announce_peak,
    current_lr,
    dump_memory_snapshot,
    host_float,
    report,
    start_memory_history,
)
from gigatron.training.validate import validate_args

__all__ = [
    "TrainContext",
    "MicroBatchCalculator",
    "NonFiniteLossError",
    "pretrain",
    "pretrain_and_exit",
    "setup",
    "get_model",
    "train_step",
    "evaluate",
    "build_data_iterators",
]


# ------------------------------------------------------------------ batch sizes: gigatron/training/microbatches.py


# ------------------------------------------------------------------ context


@dataclass
class TrainContext:
    """Everything a run built, handed to providers and to the loop's parts."""

    configs: Configs
    run: RunContext
    tokenizer: Any = None
    padded_vocab_size: Optional[int] = None
    model: list = field(default_factory=list)
    optimizer: Any = None
    scheduler: Any = None
    calculator: Optional[MicroBatchCalculator] = None
    train_iters: int = 0
    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    num_floating_point_operations_so_far: float = 0.0
    log: Optional[TrainingLog] = None
    last_saved_iteration: Optional[int] = None
    memory_reported: bool = False
    async_saver: Any = None
    memory_snapshot_written: bool = False
    compile_announced: bool = False
    evaluation_hook: Optional[Callable[["TrainContext"], None]] = None
    evaluation_hook_iteration: Optional[int] = None
    timers: Any = None
    """The step timers of --timing-log-level (gigatron/training/timers.py), made at the first step."""
    fp8_states: dict = field(default_factory=dict)
    """--fp8-recipe delayed: every FP8 linear's FP8LinearState on this rank, by global name."""

    @property
    def groups(self):
        return self.run.groups

    @property
    def device(self) -> torch.device:
        return self.run.device


# ------------------------------------------------------------------ building


def _world_size_from_environment() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _build_tokenizer(ctx: TrainContext) -> None:
    from gigatron.core.tokenizers import build_tokenizer, vocab_size_with_padding

    data = ctx.configs.data
    if data.tokenizer_type is None:  # DataConfig makes --vocab-size alone a NullTokenizer
        raise ValueError("give --tokenizer-type (with its files), or --vocab-size V for a NullTokenizer over ids 0..V")
    ctx.tokenizer = build_tokenizer(data)
    if data.padded_vocab_size is not None:
        ctx.padded_vocab_size = checked_padded_vocab_size(data.padded_vocab_size, ctx.tokenizer.vocab_size,
                                                          ctx.groups.tp.size)
        print_rank_0(f"> tokenizer {data.tokenizer_type}: vocabulary {ctx.tokenizer.vocab_size}, "
                     f"--padded-vocab-size {ctx.padded_vocab_size}")
        return
    ctx.padded_vocab_size = vocab_size_with_padding(ctx.tokenizer.vocab_size, data.make_vocab_size_divisible_by,
                                                    ctx.groups.tp.size)
    print_rank_0(f"> tokenizer {data.tokenizer_type}: vocabulary {ctx.tokenizer.vocab_size}, padded to "
                 f"{ctx.padded_vocab_size} (divisible by {data.make_vocab_size_divisible_by} x tp {ctx.groups.tp.size})")


def checked_padded_vocab_size(padded: int, vocab_size: int, tp: int) -> int:
    """--padded-vocab-size: at least the tokenizer's vocabulary and divisible by the tensor-parallel size."""
    if padded < vocab_size:
        raise ValueError(f"--padded-vocab-size ({padded}) is smaller than the tokenizer's vocabulary ({vocab_size}); "
                         f"give at least {vocab_size} or drop the flag to pad automatically.")
    if padded % tp != 0:
        raise ValueError(f"--padded-vocab-size ({padded}) must be divisible by --tensor-model-parallel-size ({tp}).")
    return padded


def get_model(model_provider: Callable, ctx: TrainContext) -> list:
    """Build this rank's model chunks (one per virtual pipeline stage) and wrap each in DDP."""
    from gigatron.core.distributed import DistributedDataParallel

    groups = ctx.groups
    num_chunks = groups.vp_size or 1
    chunks = []
    fp8_recipe = _fp8_recipe(ctx)
    for vp_stage in range(num_chunks):
        stage = vp_stage if groups.vp_size is not None else None
        module = model_provider(ctx, groups.is_pipeline_first_stage(stage), groups.is_pipeline_last_stage(stage), stage)
        module.to(ctx.device)
        if fp8_recipe is not None:
            _enable_fp8(ctx, module, fp8_recipe)
        if ctx.configs.training.torch_compile:
            compile_transformer_layers(module)
        chunks.append(DistributedDataParallel(ctx.configs.ddp, module, groups))
    num_params = sum(p.numel() for chunk in chunks for p in chunk.module.parameters())
    if groups.dp.rank == 0 and groups.cp.rank == 0:
        print(f" > number of parameters on (tensor, pipeline) model parallel rank ({groups.tp.rank}, "
              f"{groups.pp.rank}): {num_params}", flush=True)
    return chunks


def _fp8_recipe(ctx: TrainContext):
    """The model's one FP8Recipe (None without --fp8-format), after checking that this card runs it."""
    from gigatron.core.fp8 import FP8Recipe, check_fp8_device

    fp8 = getattr(ctx.configs, "fp8", None)
    if fp8 is None or not fp8.enabled:
        return None
    check_fp8_device(fp8, ctx.device)
    return FP8Recipe.for_device(fp8, ctx.device)


def _enable_fp8(ctx: TrainContext, module: torch.nn.Module, recipe) -> None:
    from gigatron.core.fp8.model import enable_fp8
    from gigatron.core.models.gpt import GPTModel

    if not isinstance(module, GPTModel):
        raise ValueError(f"--fp8-format {ctx.configs.fp8.fp8} is wired into GPT models only (pretrain_gpt.py); "
                         f"this script builds a {type(module).__name__}: drop --fp8-format")
    from gigatron.core.fp8.model import fp8_linears
    from gigatron.core.transformer.moe.experts import GroupedMLP

    fp8 = ctx.configs.fp8
    ctx.fp8_states.update(enable_fp8(module, fp8, recipe, ctx.device))
    if fp8.fp8_param_gather:
        from gigatron.core.fp8.param_gather import mark_fp8_param_gather

        mark_fp8_param_gather(module)
    linears = [linear for _, linear in fp8_linears(module)]
    in_fp8 = sum(linear.fp8_recipe is not None for linear in linears)
    print_rank_0(f"> FP8 (--fp8-format {fp8.fp8}, --fp8-recipe {fp8.fp8_recipe}): {in_fp8} of the {len(linears)} "
                 f"transformer-layer linears of this stage in FP8; the output layer and embeddings in "
                 f"{module.config.params_dtype}")
    if any(isinstance(m, GroupedMLP) and m.fp8_recipe is not None for m in module.modules()):
        from gigatron.core.fp8.grouped import grouped_experts_note

        print_rank_0(f"> FP8: {grouped_experts_note(recipe)}")


def compile_transformer_layers(module: torch.nn.Module) -> int:
    """--torch-compile: compile every transformer layer of `module` in place; returns how many."""
    from gigatron.core.models.bert import PostLNTransformerLayer

    layers = [m for m in module.modules() if isinstance(m, (TransformerLayer, PostLNTransformerLayer))]
    for layer in layers:
        layer.compile()
    return len(layers)


def _finalize_grads_fn(ctx: TrainContext) -> Callable:
    from gigatron.core.distributed import finalize_model_grads

    def finalize(model_chunks, num_tokens=None):
        finalize_model_grads(model_chunks, ctx.groups, ctx.configs.transformer, num_tokens)

    return finalize


def configs_for_run(args: argparse.Namespace) -> Configs:
    """Where the command line ends: --use-checkpoint-args, validation for this world size, and the
    config dataclasses that everything after reads."""
    from gigatron.training import checkpointing

    checkpointing.check_checkpoint_paths(args)  # --save writable, --load present (or a prominent warning)
    if getattr(args, "use_checkpoint_args", False):
        build_config(CheckpointConfig, args)  # its rules first: --use-checkpoint-args needs --load
        load_args_from_checkpoint(args)
    validate_args(args, _world_size_from_environment())
    return configs_from_args(args)


def setup(model_provider: Callable, args: argparse.Namespace | Configs) -> TrainContext:
    """Initialize, build tokenizer, model, optimizer and schedule; load the checkpoint. `args` is the
    parsed flags (validated here) or configs already built from them."""
    from gigatron.core.optim import get_optimizer
    from gigatron.core.optim.scheduler import OptimizerParamScheduler
    from gigatron.training import checkpointing

    namespace = args if isinstance(args, argparse.Namespace) else None
    if namespace is not None:
        configs = configs_for_run(namespace)
    else:
        configs = args
        checkpointing.check_checkpoint_paths(configs.checkpoint)  # --save writable, --load present
    training = configs.training
    run = initialize(configs)
    ctx = TrainContext(configs=configs, run=run)
    print_rank_0(f"> --transformer-impl {configs.transformer.transformer_impl}: Gigatron's own PyTorch layers "
                 "(one implementation serves both local and transformer_engine)")
    _build_tokenizer(ctx)
    ctx.calculator = MicroBatchCalculator(training.global_batch_size, training.micro_batch_size, ctx.groups.dp.size,
                                          training.rampup_batch_size, training.step_batch_size_schedule,
                                          configs.transformer.seq_length)
    if ctx.calculator.describe() is not None:
        print_rank_0(ctx.calculator.describe())
    if training.train_iters is not None:
        ctx.train_iters = training.train_iters
    elif training.train_samples is not None:
        ctx.train_iters = ctx.calculator.train_iters_for_samples(training.train_samples)
    ctx.model = get_model(model_provider, ctx)
    ctx.optimizer = get_optimizer(configs.optimizer, ctx.model, ctx.groups)
    if training.train_iters is not None or training.train_samples is not None:
        ctx.scheduler = OptimizerParamScheduler(
            ctx.optimizer, configs.scheduler, configs.optimizer, global_batch_size=training.global_batch_size,
            train_iters=training.train_iters, train_samples=training.train_samples)
    _load(ctx)
    ctx.calculator.check_reachable(ctx.consumed_train_samples, training.train_samples)
    if configs.checkpoint.async_save:
        from gigatron.core.checkpoint.dist import AsyncCheckpointSaver
        ctx.async_saver = AsyncCheckpointSaver()
    return ctx


def _load(ctx: TrainContext) -> None:
    c = ctx.configs.checkpoint
    loaded = LoadedCheckpoint()
    strict = c.dist_ckpt_strictness in ("assume_ok_unexpected", "raise_unexpected", "raise_all")
    if not strict and c.dist_ckpt_strictness != "ignore_all":
        print_rank_0(f"> --dist-ckpt-strictness {c.dist_ckpt_strictness}: checkpoint keys that do not fit the model "
                     "are left out of the load")
    common = dict(groups=ctx.groups, rng_tracker=ctx.run.rng_tracker, strict=strict)
    with collective_phase("loading the checkpoint"):
        if c.load:
            loaded = load_checkpoint(
                c.load, ctx.model, ctx.optimizer, ctx.scheduler, ckpt_step=c.ckpt_step, finetune=c.finetune,
                load_optim=not c.no_load_optim, load_rng=not c.no_load_rng,
                exit_on_missing_checkpoint=c.exit_on_missing_checkpoint and not c.pretrained_checkpoint,
                **common)
        if loaded.path is None and c.pretrained_checkpoint:
            loaded = load_checkpoint(c.pretrained_checkpoint, ctx.model, None, None, finetune=True, load_rng=False,
                                     exit_on_missing_checkpoint=c.exit_on_missing_checkpoint, **common)
    if loaded.path is not None:
        print_rank_0(f"> loaded checkpoint {loaded.path} at iteration {loaded.iteration}")
    if loaded.path is not None and ctx.fp8_states:
        _restore_fp8_state(ctx, loaded.fp8_state)
    ctx.iteration = loaded.iteration
    ctx.consumed_train_samples = loaded.consumed_train_samples
    ctx.consumed_valid_samples = loaded.consumed_valid_samples
    ctx.num_floating_point_operations_so_far = loaded.num_floating_point_operations_so_far
    ctx.last_saved_iteration = loaded.iteration if loaded.path is not None else None


def _restore_fp8_state(ctx: TrainContext, saved: Optional[dict]) -> None:
    """A checkpoint's FP8 state into this run's (a bf16 checkpoint, or layers it ran in bf16: fresh)."""
    from gigatron.core.fp8.model import load_fp8_state_dict

    restored, fresh = load_fp8_state_dict(ctx.fp8_states, saved)
    if fresh:
        print_rank_0(f"> FP8: {len(fresh)} linear layer(s) start with a fresh amax history (the checkpoint holds "
                     f"no FP8 state for them){'' if restored else ': it was saved without --fp8-recipe delayed'}")


# ------------------------------------------------------------------ data


def build_data_iterators(ctx: TrainContext, datasets_provider: Callable):
    """Train/valid/test iterators (a list with one per model chunk when interleaving), positioned
    at the consumed-sample counts of a resumed run."""
    from gigatron.core.data import build_pretraining_data_loader
    from gigatron.core.data.builder import train_valid_test_num_samples

    training, data = ctx.configs.training, ctx.configs.data
    num_samples = train_valid_test_num_samples(ctx.train_iters, training.eval_interval, training.eval_iters,
                                               training.global_batch_size, training.train_samples)
    if training.step_batch_size_schedule and training.train_samples is not None:
        # A schedule's smaller early batches make more iterations than train_samples // GBS: one
        # validation per --eval-interval of the actual iterations (Megatron's count).
        valid = (ctx.train_iters // training.eval_interval + 1) * training.eval_iters * training.global_batch_size
        num_samples = (num_samples[0], max(num_samples[1], valid), num_samples[2])
    with collective_phase("building the datasets"):
        train_ds, valid_ds, test_ds = datasets_provider(ctx, num_samples)
    groups = ctx.groups
    num_chunks = groups.vp_size or 1

    def loaders(dataset, consumed):
        if dataset is None:
            return None
        if data.dataloader_type == "external":
            return [external_iterator(dataset) for _ in range(num_chunks)]
        iterators = []
        for _ in range(num_chunks):
            loader = build_pretraining_data_loader(dataset, consumed, training.micro_batch_size, groups.dp.rank,
                                                   groups.dp.size, num_workers=data.num_workers,
                                                   dataloader_type=data.dataloader_type,
                                                   data_sharding=data.data_sharding)
            iterators.append(_cycle(loader) if data.dataloader_type == "cyclic" else iter(loader))
        return iterators

    def one_or_list(its):
        return None if its is None else (its[0] if num_chunks == 1 else its)

    # A DataLoader iterator draws its base seed from the default generator; keep that draw out of
    # the training RNG stream so a resumed run (RNG restored before this) matches an uninterrupted one.
    with torch.random.fork_rng(devices=[]):
        train = loaders(train_ds, ctx.consumed_train_samples)
        valid = loaders(valid_ds, ctx.consumed_valid_samples)
        test = loaders(test_ds, 0)
    return one_or_list(train), one_or_list(valid), one_or_list(test)


def external_iterator(data) -> Iterator:
    """--dataloader-type external: what the datasets provider returned is the data itself, an
    iterator or iterable of micro-batches (e.g. a torch DataLoader with its own sampler), used as is."""
    if hasattr(data, "__next__"):
        return data
    if hasattr(type(data), "__iter__"):
        return iter(data)
    raise ValueError(f"--dataloader-type external takes the datasets provider's result as the data iterator, but it "
                     f"returned a {type(data).__name__}, which is not iterable (a map-style dataset); return an "
                     "iterator or a DataLoader of micro-batches from the provider, or use --dataloader-type single "
                     "or cyclic")


def _cycle(loader) -> Iterator:
    """Iterate a loader forever; each pass is one epoch of its (epoch-seeded) sampler. The first
    pass starts now (inside the caller's RNG fork), later ones when the previous pass ends."""
    iterator = iter(loader)

    def passes():
        nonlocal iterator
        while True:
            yield from iterator
            iterator = iter(loader)

    return passes()


# ------------------------------------------------------------------ one step


def _reduce_losses(losses_reduced: list, groups, device) -> dict[str, torch.Tensor]:
    """Sum each key's [loss_sum, num_tokens] over micro-batches and data x context ranks; return
    key -> mean loss (a device scalar, no host sync)."""
    if not losses_reduced:
        return {}
    totals: dict[str, torch.Tensor] = {}
    for entry in losses_reduced:
        for key, value in entry.items():
            value = value.detach().float().reshape(-1)
            if value.numel() == 1:  # a plain mean: count it as one
                value = torch.cat([value, torch.ones_like(value)])
            totals[key] = totals[key] + value if key in totals else value.clone()
    keys = sorted(totals)
    stacked = torch.stack([totals[k] for k in keys]).to(device)  # [keys, 2]
    if groups.dp_cp.group is not None:
        dist.all_reduce(stacked, group=groups.dp_cp.group)
    return {k: stacked[i, 0] / stacked[i, 1].clamp(min=1) for i, k in enumerate(keys)}


def train_step(ctx: TrainContext, forward_step_func: Callable, data_iterator, num_microbatches: int):
    """One optimizer step over `num_microbatches` micro-batches per data-parallel rank.

    Returns (losses: key -> device scalar, update_successful, grad_norm, num_zeros_in_grad), the
    last two as one-element device tensors (or None)."""
    from gigatron.core.pipeline import get_forward_backward_func

    training, groups = ctx.configs.training, ctx.groups
    for chunk in ctx.model:
        chunk.zero_grad_buffer()
    ctx.optimizer.zero_grad()
    moe_tracker = _start_moe_step(ctx, num_microbatches)
    forward_backward = get_forward_backward_func(groups.pp.size, groups.vp_size)
    if ctx.timers is None:
        from gigatron.training.timers import StepTimers
        ctx.timers = StepTimers(ctx.configs.logging.timing_log_level, ctx.device)
    timers = ctx.timers
    compute_timer = None
    if timers.active("forward-compute"):
        from gigatron.core.pipeline import ComputeTimer
        compute_timer = ComputeTimer(ctx.device)
    with collective_phase("the forward/backward pass"), timers.time("forward-backward"):
        losses_reduced = forward_backward(
            forward_step_func=forward_step_func, data_iterator=data_iterator, model=ctx.model,
            num_microbatches=num_microbatches, seq_length=ctx.configs.transformer.seq_length,
            micro_batch_size=training.micro_batch_size, groups=groups, config=ctx.configs.transformer, forward_only=False,
            grad_scale_func=ctx.optimizer.scale_loss, finalize_model_grads_func=_finalize_grads_fn(ctx),
            **({"compute_timer": compute_timer} if compute_timer is not None else {}))
    if compute_timer is not None:
        timers.add("forward-compute", compute_timer.forward_seconds())
        timers.add("backward-compute", compute_timer.backward_seconds())
    if ctx.fp8_states:
        from gigatron.core.fp8.model import update_model_fp8_states

        with collective_phase("the FP8 amax reduction"):
            update_model_fp8_states(ctx.fp8_states, groups)
    with collective_phase("the optimizer step"), timers.time("optimizer"):
        # The gradient norm stays on the device (no host sync); the loop reads it at log intervals.
        update_successful, grad_norm, num_zeros = ctx.optimizer.step(host_sync=False)
    if training.empty_unused_memory_level >= 1 and ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    with collective_phase("the loss all-reduce"), timers.time("loss-all-reduce"):
        losses = _reduce_losses(losses_reduced, groups, ctx.device)
    timers.end_iteration()
    if moe_tracker is not None:
        _finish_moe_step(ctx, moe_tracker, num_microbatches, update_successful, losses)
    return losses, update_successful, grad_norm, num_zeros


def _moe_enabled(ctx: TrainContext) -> bool:
    moe = getattr(ctx.configs, "moe", None)
    return moe is not None and moe.num_experts is not None


def _start_moe_step(ctx: TrainContext, num_microbatches: int):
    """MoE: clear the aux-loss record and set the aux losses' backward scale to the main loss's
    (loss scale / micro-batches; the same on every pipeline stage). None for a dense model."""
    if not _moe_enabled(ctx):
        return None
    from gigatron.core.transformer.moe import get_aux_loss_tracker

    tracker = get_aux_loss_tracker()
    tracker.clear()
    tracker.set_backward_scale(float(ctx.optimizer.get_loss_scale().item()) / num_microbatches)
    return tracker


def _finish_moe_step(ctx: TrainContext, tracker, num_microbatches: int, update_successful: bool,
                     losses: dict) -> None:
    """MoE after the step: move the expert biases (aux-loss-free balancing) when the step was
    taken, and add the aux losses, reduced over all ranks, to `losses` under Megatron's names
    (mean over MoE layers; each layer's with --moe-per-layer-logging)."""
    from gigatron.core.transformer.moe import update_expert_bias
    from gigatron.core.transformer.moe.aux_losses import aux_loss_names
    from gigatron.core.transformer.moe.config import moe_layer_pattern

    moe, num_layers = ctx.configs.moe, ctx.configs.transformer.num_layers
    # Multi-token prediction layers are numbered after the decoder's and built like its last layer.
    pattern = moe_layer_pattern(moe, num_layers)
    pattern = pattern + [pattern[-1]] * (ctx.configs.transformer.mtp_num_layers or 0)
    num_layers = len(pattern)
    if update_successful and moe.moe_router_enable_expert_bias:
        for chunk in ctx.model:
            update_expert_bias(chunk, ctx.groups)
    names = aux_loss_names(moe)
    if names:
        with collective_phase("the MoE aux-loss reduction"):
            reduced = tracker.reduce(ctx.groups, num_layers, names, device=ctx.device)
        moe_layers = [i for i, is_moe in enumerate(pattern) if is_moe]
        summary = tracker.summary(reduced, num_microbatches, moe_layers, moe.moe_per_layer_logging)
        for key, value in summary.items():
            losses[key] = torch.tensor(value, dtype=torch.float32, device=ctx.device)
    tracker.clear()


# ------------------------------------------------------------------ saving and exiting


def _output_dir(configs: Configs) -> Optional[str]:
    return configs.checkpoint.save or configs.logging.tensorboard_dir


def _save(ctx: TrainContext) -> None:
    c = ctx.configs.checkpoint
    if not c.save or ctx.last_saved_iteration == ctx.iteration:
        return
    if ctx.configs.training.manual_gc:
        gc.collect()
    start = time.perf_counter()
    with collective_phase(f"saving the checkpoint of iteration {ctx.iteration}"):
        save_checkpoint(
            c.save, ctx.iteration, ctx.model, ctx.optimizer, ctx.scheduler, _recorded_args(ctx), ctx.groups,
            num_floating_point_operations_so_far=ctx.num_floating_point_operations_so_far,
            consumed_train_samples=ctx.consumed_train_samples, consumed_valid_samples=ctx.consumed_valid_samples,
            save_optim=not c.no_save_optim, save_rng=not c.no_save_rng, rng_tracker=ctx.run.rng_tracker,
            ckpt_format=c.ckpt_format, async_saver=ctx.async_saver, fp8_state=_fp8_state_to_save(ctx))
    ctx.last_saved_iteration = ctx.iteration
    print_rank_0(f"  successfully saved checkpoint from iteration {ctx.iteration:7d} to {c.save} "
                 f"[ t {time.perf_counter() - start:.2f}s ]")
    ctx.log.write_loss_curve()


def _fp8_state_to_save(ctx: TrainContext) -> Optional[dict]:
    """The whole model's delayed-scaling state (every stage's, gathered: collective), or None."""
    fp8 = getattr(ctx.configs, "fp8", None)
    if fp8 is None or not fp8.enabled or fp8.fp8_recipe != "delayed":
        return None
    from gigatron.core.fp8.model import gather_fp8_state_dict

    return gather_fp8_state_dict(ctx.fp8_states, ctx.groups.tp_ep_pp)


class _SignalFlag:
    """Remembers that SIGTERM arrived; the loop saves and exits at the end of the iteration."""

    def __init__(self) -> None:
        self.received = False
        self._previous = None

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank (one small all-reduce)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def _should_exit(ctx: TrainContext, start_time: float, signal_flag: Optional[_SignalFlag]) -> Optional[str]:
    training = ctx.configs.training
    if signal_flag is not None and _any_rank(signal_flag.received, ctx.device):
        return "exiting on SIGTERM"
    if training.exit_duration_in_mins is not None:
        over = (time.time() - start_time) / 60.0 > training.exit_duration_in_mins
        if _any_rank(over, ctx.device):
            return f"exiting after {training.exit_duration_in_mins} minutes"
    if training.exit_interval is not None and ctx.iteration % training.exit_interval == 0:
        return f"exiting at iteration {ctx.iteration} (--exit-interval {training.exit_interval})"
    return None


# ------------------------------------------------------------------ the loop


def _iteration_flops(ctx: TrainContext, batch_size: int) -> float:
    from gigatron.core.flops import num_floating_point_operations

    chunk = ctx.model[0] if ctx.model else None
    mamba_config = getattr(getattr(chunk, "module", chunk), "mamba_config", None)  # a hybrid Mamba model
    return num_floating_point_operations(ctx.configs.transformer, ctx.padded_vocab_size, batch_size,
                                         ctx.configs.transformer.seq_length, moe_config=ctx.configs.moe,
                                         mamba_config=mamba_config)


def train(ctx: TrainContext, forward_step_func: Callable, train_iterator, valid_iterator) -> None:
    """Run training iterations until --train-iters / --train-samples or an exit condition."""
    training, checkpoint, logging = ctx.configs.training, ctx.configs.checkpoint, ctx.configs.logging
    log = ctx.log
    signal_flag = None
    if training.exit_signal_handler:
        signal_flag = _SignalFlag()
        signal_flag.install()
    if training.manual_gc:
        gc.disable()
        gc.collect()
    start_time = time.time()
    for chunk in ctx.model:
        chunk.train()
    flops_cache: dict[int, float] = {}
    profiler = start_profiler(training, ctx.run.rank, ctx.iteration, ctx.train_iters, ctx.device.type == "cuda",
                              trace_dir=logging.tensorboard_dir)
    log.start_interval()
    checks = DeferredChecks()
    try:
        while ctx.iteration < ctx.train_iters:
            if profiler is not None:
                profiler.before_iteration(ctx.iteration)
            batch_size = ctx.calculator.global_batch_size_at(ctx.consumed_train_samples)
            num_microbatches = ctx.calculator.num_microbatches_at(ctx.consumed_train_samples)
            compiling = _announce_compilation(ctx)
            losses, update_successful, grad_norm, num_zeros = train_step(ctx, forward_step_func, train_iterator,
                                                                         num_microbatches)
            if compiling is not None:
                if ctx.device.type == "cuda":
                    torch.cuda.synchronize(ctx.device)
                print_rank_0(f"> compiled: the first iteration, compilation included, took "
                             f"{time.perf_counter() - compiling:.1f} s")
            ctx.iteration += 1
            if ctx.async_saver is not None:
                ctx.async_saver.maybe_finalize()  # completes a background save once every rank wrote
            ctx.consumed_train_samples += batch_size
            if batch_size not in flops_cache:
                flops_cache[batch_size] = _iteration_flops(ctx, batch_size)
            ctx.num_floating_point_operations_so_far += flops_cache[batch_size]
            if update_successful and ctx.scheduler is not None:
                ctx.scheduler.step(increment=batch_size)
            checks.add(ctx.iteration, grad_norm)  # NaN/Inf checked at the next flush, no sync here
            log.add_iteration(losses, skipped=not update_successful, tokens=batch_size * ctx.configs.transformer.seq_length,
                              flops=flops_cache[batch_size])
            if log.has_backends and ctx.iteration % logging.tensorboard_log_interval == 0:
                checks.flush(ctx)
                log.tensorboard_step(ctx.iteration, losses, learning_rate=current_lr(ctx), global_batch_size=batch_size,
                                     loss_scale=float(ctx.optimizer.get_loss_scale().item()),
                                     grad_norm=host_float(grad_norm))
            if ctx.iteration % logging.log_interval == 0:
                checks.flush(ctx)
                report(ctx, batch_size, grad_norm, num_zeros)
            if training.profile and training.profile_step_end == ctx.iteration:
                dump_memory_snapshot(ctx)
            if training.manual_gc and training.manual_gc_interval and ctx.iteration % training.manual_gc_interval == 0:
                gc.collect()
            evaluates = valid_iterator is not None or ctx.evaluation_hook is not None
            if evaluates and training.eval_interval and ctx.iteration % training.eval_interval == 0:
                checks.flush(ctx)
                paused = time.perf_counter()
                evaluate_and_report(ctx, forward_step_func, valid_iterator, f"iteration {ctx.iteration}")
                run_evaluation_hook(ctx)
                log.exclude_time(time.perf_counter() - paused)
            if checkpoint.save and checkpoint.save_interval and ctx.iteration % checkpoint.save_interval == 0:
                checks.flush(ctx)  # never save a model whose last steps went NaN (with the check on)
                paused = time.perf_counter()
                _save(ctx)
                log.exclude_time(time.perf_counter() - paused)
            reason = _should_exit(ctx, start_time, signal_flag)
            if reason is not None:
                print_rank_0(f" {reason}")
                checks.flush(ctx)
                _save(ctx)
                break
        checks.flush(ctx)
    finally:
        if profiler is not None:
            profiler.close(ctx.iteration)
        if ctx.async_saver is not None:
            ctx.async_saver.finalize_all()
        if signal_flag is not None:
            signal_flag.restore()
        if training.manual_gc:
            gc.enable()


def _announce_compilation(ctx: TrainContext) -> Optional[float]:
    """--torch-compile: torch.compile runs when the layers first execute, so the first iteration of a
    process takes long (about a minute on a CPU) — say so before it; returns its start time."""
    if not ctx.configs.training.torch_compile or ctx.compile_announced:
        return None
    ctx.compile_announced = True
    print_rank_0("> compiling the transformer layers (--torch-compile) during the first iteration …")
    return time.perf_counter()


def pretrain(datasets_provider: Callable, model_provider: Callable, forward_step_func: Callable,
             args: Optional[argparse.Namespace] = None, extra_args_provider: Optional[Callable] = None,
             args_defaults: Optional[dict] = None,
             evaluation_hook: Optional[Callable[[TrainContext], None]] = None) -> TrainContext:
    """Train a model end to end (see the module docstring for the providers). `args` defaults to the
    command line; it ends in the config dataclasses here, and nothing after reads it.
    `evaluation_hook(ctx)`, if given, runs at every evaluation (each --eval-interval and the final
    one, at most once per iteration) after the validation loss: a task's own metric. Returns the
    context (configs, model, optimizer, iteration, loss history)."""
    if args is None:
        args = parse_args(extra_args_provider=extra_args_provider, defaults=args_defaults)
    configs = configs_for_run(args)
    validate_profile_args(configs.training, _world_size_from_environment(), trace_dir=configs.logging.tensorboard_dir)
    start_memory_history(configs.training)
    ctx = setup(model_provider, configs)
    ctx.evaluation_hook = evaluation_hook
    if configs.checkpoint.ckpt_convert_format:
        return convert_checkpoint_format(ctx)
    training = configs.training
    ctx.log = TrainingLog(
        configs.logging, train_iters=ctx.train_iters, peak_flops=announce_peak(ctx), device=ctx.device,
        world_size=ctx.run.world_size, output_dir=_output_dir(configs), run_config=_recorded_args(ctx))
    ctx.log.resume_history(ctx.iteration)
    try:
        train_iterator, valid_iterator, test_iterator = build_data_iterators(ctx, datasets_provider)
        if not training.skip_train and ctx.iteration < ctx.train_iters:
            print_rank_0(f"> training from iteration {ctx.iteration} to {ctx.train_iters}")
            train(ctx, forward_step_func, train_iterator, valid_iterator)
            _save(ctx)
        finished = ctx.iteration >= ctx.train_iters or training.skip_train
        if finished:
            evaluated_here = (not training.skip_train and bool(training.eval_interval)
                              and ctx.iteration % training.eval_interval == 0)
            evaluate_and_report(ctx, forward_step_func, valid_iterator, final_validation_label(ctx, evaluated_here),
                                 record=not training.skip_train and not evaluated_here)
            run_evaluation_hook(ctx)
            evaluate_and_report(ctx, forward_step_func, test_iterator, f"iteration {ctx.iteration} on test set",
                                 record=False)
        ctx.log.write_loss_curve()
        dump_memory_snapshot(ctx)
    finally:
        if ctx.async_saver is not None:
            ctx.async_saver.finalize_all()  # the last save must be complete before the process exits
        ctx.log.close()
    return ctx


def pretrain_and_exit(datasets_provider: Callable, model_provider: Callable, forward_step_func: Callable,
                      args: argparse.Namespace) -> int:
    """A script's whole run: `pretrain`, then the process group is taken down (also after an error).
    Returns the exit status 0."""
    try:
        pretrain(datasets_provider, model_provider, forward_step_func, args=args)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _recorded_args(ctx: TrainContext) -> dict:
    """The run's settings as a checkpoint records them (Megatron's flat `args`), from the configs."""
    return args_dict_from_configs(ctx.configs, padded_vocab_size=ctx.padded_vocab_size,
                                  world_size=ctx.run.world_size, data_parallel_size=ctx.groups.dp.size)


def convert_checkpoint_format(ctx: TrainContext) -> TrainContext:
    """--ckpt-convert-format F --ckpt-convert-save DIR: the checkpoint loaded from --load (either
    format) is saved again as F under DIR/F, then the run ends (Megatron's behaviour)."""
    c = ctx.configs.checkpoint
    target = os.path.join(c.ckpt_convert_save, c.ckpt_convert_format)
    with collective_phase(f"converting the checkpoint to {c.ckpt_convert_format}"):
        save_checkpoint(
            target, ctx.iteration, ctx.model, ctx.optimizer, ctx.scheduler, _recorded_args(ctx), ctx.groups,
            num_floating_point_operations_so_far=ctx.num_floating_point_operations_so_far,
            consumed_train_samples=ctx.consumed_train_samples, consumed_valid_samples=ctx.consumed_valid_samples,
            save_optim=not c.no_save_optim, save_rng=not c.no_save_rng, rng_tracker=ctx.run.rng_tracker,
            ckpt_format=c.ckpt_convert_format, fp8_state=_fp8_state_to_save(ctx))
    print_rank_0(f"> converted the checkpoint of iteration {ctx.iteration} in {c.load} to "
                 f"{c.ckpt_convert_format} in {target}")
    return ctx
