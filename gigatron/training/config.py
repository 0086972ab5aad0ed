"""Training-only configuration: iterations, batch sizes, exit conditions, checkpoints and logging.

These dataclasses follow the same rules as the ones in `gigatron.core`: field names are Megatron's
flag names with `_` for `-`, and the string literal under each field is its `--help` text. Each
checks its own fields in `__post_init__`; the rules across configs are in validate.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

SUPPORTED_CKPT_FORMATS = ("torch", "torch_dist", "megatron_torch_dist")


def _check_at_least(minimum: int, *flags: tuple[str, Optional[int]]) -> None:
    for flag, value in flags:
        if value is not None and value < minimum:
            raise ValueError(f"{flag} must be >= {minimum}, got {value}.")


@dataclass
class TrainingConfig:
    """Iterations, batch sizes, exit conditions and process-level settings of a training run."""

    micro_batch_size: Optional[int] = None
    """Batch size per model instance (local batch size). Global batch size is local batch size times
    data-parallel size times number of micro-batches."""

    global_batch_size: Optional[int] = None
    """Training batch size. Defaults to micro-batch-size times data-parallel size (one micro-batch
    per step); a larger value accumulates gradients over several micro-batches."""

    rampup_batch_size: Optional[list[int]] = None
    """Batch size ramp up with three values: start batch size, batch size increment and the number
    of samples over which to ramp up, e.g. `--rampup-batch-size 16 8 300000`."""

    step_batch_size_schedule: Optional[str] = None
    """Step-wise global batch size schedule "THRESHOLD:BS THRESHOLD:BS ...": the global batch size
    becomes BS once THRESHOLD tokens (converted to samples with --seq-length) have been consumed.
    Thresholds take a K, M, B or T suffix (1e3, 1e6, 1e9, 1e12); the first must be 0, e.g.
    "0:768 250B:1536 500B:3072". Sets --global-batch-size (the last entry's batch); not with
    --global-batch-size or --rampup-batch-size; needs --train-samples."""

    train_iters: Optional[int] = None
    """Total number of iterations to train over all training runs. Give either this or
    --train-samples."""

    train_samples: Optional[int] = None
    """Total number of samples to train over all training runs. Give either this or --train-iters."""

    exit_interval: Optional[int] = None
    """Exit the program after the iteration is divisible by this value (a checkpoint is saved
    first when --save is set)."""

    exit_duration_in_mins: Optional[int] = None
    """Exit the program after this many minutes of training (a checkpoint is saved first when
    --save is set)."""

    exit_signal_handler: bool = False
    """On SIGTERM, save a checkpoint at the end of the current iteration and exit cleanly."""

    eval_interval: int = 1000
    """Interval between runs of evaluation on the validation set, in iterations."""

    eval_iters: int = 100
    """Number of iterations to run for each evaluation on the validation/test set."""

    skip_train: bool = False
    """Skip training: only evaluate on the validation and test sets (after loading --load)."""

    data_parallel_random_init: bool = False
    """Give each data-parallel rank a different seed (seed + 10 * dp rank) for parameter
    initialization and dropout."""

    check_for_nan_in_loss_and_grad: bool = True
    """Check the reduced loss and the gradient norm for NaN/Inf and stop with an error naming the
    iteration. Turn off with --no-check-for-nan-in-loss-and-grad."""

    empty_unused_memory_level: Literal[0, 1, 2] = 0
    """Call torch.cuda.empty_cache() each iteration: 0 never, 1 after the training step,
    2 after the training step and after evaluation."""

    manual_gc: bool = False
    """Disable Python's automatic garbage collector and collect at --manual-gc-interval, so that
    collections happen at the same iteration on every rank."""

    manual_gc_interval: int = 0
    """With --manual-gc, run a collection every this many iterations (0: only at checkpoints and
    evaluation)."""

    manual_gc_eval: bool = True
    """With --manual-gc, collect before and after each evaluation. Turn off with
    --no-manual-gc-eval."""

    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    """Number of layers per virtual pipeline stage (model chunk), for the interleaved schedule; sets
    the number of virtual stages per pipeline rank to num_layers / pipeline size / this. Exclusive
    with --num-virtual-stages-per-pipeline-rank."""

    torch_compile: bool = False
    """Compile each transformer layer with torch.compile (one graph per layer, shared by all layers
    of a chunk): fuses norms, activations, residual adds and dropout around the matrix products.
    Not a Megatron flag. The first iterations are slower while compiling."""

    local_rank: Optional[int] = None
    """Local rank passed by the launcher (torch.distributed.launch); torchrun's LOCAL_RANK
    environment variable is used when this is not given."""

    dry_run: bool = False
    """Print the per-rank memory estimate (parameters, gradients, optimizer states, activations,
    temporary buffers; gigatron/core/memory.py) for these flags and exit without touching a
    device. Not a Megatron flag."""

    record_memory_history: bool = False
    """Record the CUDA caching allocator's history from the start of training and write a snapshot
    (for PyTorch's memory visualizer, pytorch.org/memory_viz) to --memory-snapshot-path at
    --profile-step-end (with --profile) or at the end of training. Needs CUDA."""

    memory_snapshot_path: str = "snapshot.pickle"
    """Where --record-memory-history writes the allocator snapshot (rank r > 0 adds _rank{r})."""

    profile: bool = False
    """Profile training iterations --profile-step-start to --profile-step-end on the ranks of
    --profile-ranks. Without --use-pytorch-profiler this calls cudaProfilerStart/Stop around those
    iterations (with NVTX ranges per op) for an nsys capture, e.g. `nsys profile -s none -t nvtx,cuda
    -o <file> --force-overwrite true --capture-range=cudaProfilerApi --capture-range-end=stop
    torchrun ...`; that needs CUDA."""

    use_pytorch_profiler: bool = False
    """With --profile: use torch.profiler (CPU and, when available, CUDA activities) instead of the
    CUDA profiler API, and write the Chrome/TensorBoard trace rank{r}_iterations_{start}-{end}.pt.trace.json
    (atomically) into --tensorboard-dir, which must be given. That is where Megatron writes it: there is
    no separate trace-directory flag, so launch scripts keep Megatron's flags and TensorBoard's profiler
    plugin finds the trace next to the run's logs. Works on the CPU."""

    profile_step_start: int = 10
    """With --profile: the iteration count at which profiling starts. Profiling covers the iterations
    run while the count goes from --profile-step-start to --profile-step-end, i.e. those logged as
    iterations start+1 ... end."""

    profile_step_end: int = 12
    """With --profile: the iteration count at which profiling stops (exclusive end of the profiled
    range; must be larger than --profile-step-start and at most the number of training iterations).
    With --profile, --record-memory-history writes its allocator snapshot at this iteration
    (otherwise at the end of training)."""

    profile_ranks: list[int] = field(default_factory=lambda: [0])
    """With --profile: the global ranks that profile (the others run normally)."""

    spec: Optional[list[str]] = None
    """A user-supplied layer spec, `--spec MODULE FUNCTION`: the function of that importable Python
    module (a dotted name on PYTHONPATH, or a .py file) builds each decoder layer of the GPT model in
    place of Gigatron's TransformerLayer, called as FUNCTION(config, groups, layer_number=...,
    moe_config=...) (config: the TransformerConfig; layer_number: global and 0-based) and returning a
    module with TransformerLayer's forward(hidden, attention_mask, rotary_pos_emb,
    inference_context=None) -> hidden. The module is the user's code and runs as such."""

    deterministic_mode: bool = False
    """Make runs bitwise reproducible on one device layout: torch.use_deterministic_algorithms(True)
    (an op without a deterministic kernel raises instead of running), CUBLAS_WORKSPACE_CONFIG set to
    :4096:8 when unset, and no FlashAttention (its backward is not deterministic)."""

    use_legacy_models: bool = False
    """Megatron's pre-Core (legacy) model classes. Gigatron has only Megatron-Core models: the flag
    is refused with a pointer to converting the legacy checkpoint to a Core one first (Megatron-LM's
    `tools/checkpoint/convert.py --loader legacy --saver core`), which then trains without it."""

    def __post_init__(self) -> None:
        if self.train_iters is not None and self.train_samples is not None:
            raise ValueError("--train-iters and --train-samples are mutually exclusive; give one of them.")
        _check_at_least(0, ("--train-iters", self.train_iters), ("--train-samples", self.train_samples),
                        ("--eval-iters", self.eval_iters))
        _check_at_least(1, ("--eval-interval", self.eval_interval), ("--exit-interval", self.exit_interval))


@dataclass
class CheckpointConfig:
    """Where and when to save checkpoints, and what to load back."""

    save: Optional[str] = None
    """Output directory to save checkpoints to."""

    save_interval: Optional[int] = None
    """Number of iterations between periodic checkpoint saves."""

    load: Optional[str] = None
    """Directory containing a model checkpoint to resume from."""

    no_save_optim: bool = False
    """Do not save the current optimizer state."""

    no_save_rng: bool = False
    """Do not save the current random-number-generator states."""

    no_load_optim: bool = False
    """Do not load the optimizer state when loading a checkpoint."""

    no_load_rng: bool = False
    """Do not load the random-number-generator states when loading a checkpoint."""

    finetune: bool = False
    """Load model weights only (no optimizer, scheduler or RNG state) and start at iteration 0 with
    consumed samples reset."""

    pretrained_checkpoint: Optional[str] = None
    """Directory of a pretrained checkpoint to initialize the model from (weights only) when --load
    holds no checkpoint."""

    ckpt_step: Optional[int] = None
    """Load the checkpoint of this iteration instead of the one named by the tracker file."""

    use_checkpoint_args: bool = False
    """Take the model-shape arguments (layers, hidden size, heads, …) from the checkpoint in --load
    instead of the command line."""

    exit_on_missing_checkpoint: bool = False
    """With --load, exit with an error if no checkpoint is found instead of starting from a random
    initialization."""

    ckpt_format: Literal["torch", "torch_dist", "megatron_torch_dist", "torch_dcp", "zarr",
                         "fsdp_dtensor"] = "torch_dist"
    """Checkpoint format: torch_dist (Gigatron's parallelism-independent layout: loads at any tensor,
    pipeline and data-parallel layout; per-file checksums; every model family), megatron_torch_dist
    (Megatron-Core's own torch_dist keys, which Megatron-LM loads: GPT without experts, Adam; no
    checksums) or torch (one file per model-parallel rank, Megatron's legacy layout). A load detects
    the format of the directory it finds."""

    dist_ckpt_strictness: Literal["assume_ok_unexpected", "log_unexpected", "log_all", "raise_unexpected",
                                  "raise_all", "return_unexpected", "return_all", "ignore_all"] = "assume_ok_unexpected"
    """What a load does with checkpoint keys that do not fit the model (either format). The
    assume_ok_unexpected (default) and raise_* modes stop the load, naming the missing and the
    unexpected keys (a checkpoint with keys the model lacks is never silently accepted); log_*,
    return_* and ignore_all load the keys that fit and leave the rest (the log says so, except
    with ignore_all). A tensor of the wrong shape always stops the load."""

    auto_detect_ckpt_format: bool = False
    """Determine the format of the checkpoint in --load from its files (Gigatron always does:
    torch, torch_dist, and Megatron-LM's own torch, Megatron-Core torch_dist and pre-Megatron-Core
    legacy checkpoints are told apart and read); saves keep --ckpt-format."""

    async_save: bool = False
    """Write torch_dist checkpoints in the background: the state is copied to host memory, training
    goes on, and the tracker file is updated once every rank has written its files."""

    ckpt_convert_format: Optional[Literal["torch", "torch_dist", "megatron_torch_dist"]] = None
    """Convert the checkpoint in --load to this format, save it under --ckpt-convert-save/<format>
    and exit."""

    ckpt_convert_save: Optional[str] = None
    """Folder for --ckpt-convert-format."""

    def __post_init__(self) -> None:
        check_checkpoint_flags(self)


@dataclass
class LoggingConfig:
    """What is printed, and what goes to TensorBoard, Weights & Biases and the loss-curve plot."""

    log_interval: int = 100
    """Report loss and timing every this many iterations."""

    log_throughput: bool = False
    """Add the model throughput (TFLOP/s per device) to the training log line."""

    log_params_norm: bool = False
    """Compute and log the L2 norm of the parameters (an extra pass over the parameters)."""

    tensorboard_dir: Optional[str] = None
    """Write TensorBoard logs to this directory."""

    tensorboard_log_interval: int = 1
    """Report to TensorBoard every this many iterations."""

    timing_log_level: Literal[0, 1, 2] = 0
    """How many step timers to print with each log line: 0 none beyond the iteration time, 1 the
    forward/backward pass, the optimizer step and the loss all-reduce, 2 also the forward and
    backward compute inside the schedule (this rank's, ms per iteration over the log interval;
    timing synchronises the device)."""

    log_timers_to_tensorboard: bool = False
    """Also write the step timers of --timing-log-level to TensorBoard/W&B ("<name>-time", ms)."""

    tensorboard_queue_size: int = 1000
    """Size of the TensorBoard writer's queue of pending events and summaries."""

    log_validation_ppl_to_tensorboard: bool = False
    """Also log the validation perplexity to TensorBoard."""

    log_memory_to_tensorboard: bool = False
    """Also log device memory (allocated, reserved, peak) to TensorBoard."""

    log_learning_rate_to_tensorboard: bool = True
    """Log the learning rate to TensorBoard. Turn off with --no-log-learning-rate-to-tensorboard."""

    log_loss_scale_to_tensorboard: bool = True
    """Log the loss scale to TensorBoard. Turn off with --no-log-loss-scale-to-tensorboard."""

    log_batch_size_to_tensorboard: bool = False
    """Log the global batch size to TensorBoard."""

    wandb_project: str = ""
    """Weights & Biases project name; empty disables W&B logging. Runs offline when the W&B
    service cannot be reached."""

    wandb_exp_name: str = ""
    """Weights & Biases experiment (run) name."""

    wandb_save_dir: str = ""
    """Directory for the local Weights & Biases files (default: <save>/wandb)."""

    loss_curve: bool = True
    """Write loss_curve.png (training and validation loss against iteration) next to the
    checkpoints or TensorBoard logs at every save and at the end. Turn off with --no-loss-curve."""

    def __post_init__(self) -> None:
        _check_at_least(1, ("--log-interval", self.log_interval),
                        ("--tensorboard-log-interval", self.tensorboard_log_interval))


def check_checkpoint_flags(c: CheckpointConfig) -> None:
    """The checkpoint format, and the save/load options that need --save or --load."""
    if c.ckpt_format not in SUPPORTED_CKPT_FORMATS:
        raise ValueError(f"--ckpt-format {c.ckpt_format} is not supported yet; supported: "
                         f"{', '.join(SUPPORTED_CKPT_FORMATS)} (use --ckpt-format torch_dist or torch).")
    if c.async_save:
        if c.ckpt_format != "torch_dist":
            raise ValueError(f"--async-save writes torch_dist checkpoints; drop --ckpt-format {c.ckpt_format} or "
                             "--async-save.")
        if not c.save:
            raise ValueError("--async-save needs --save DIR.")
    if c.ckpt_convert_format and (not c.load or not c.ckpt_convert_save):
        raise ValueError("--ckpt-convert-format converts the checkpoint in --load into --ckpt-convert-save; "
                         "give both --load DIR and --ckpt-convert-save DIR.")
    if c.use_checkpoint_args and not c.load:
        raise ValueError("--use-checkpoint-args reads the model flags from the checkpoint in --load; give --load DIR.")
    if c.exit_on_missing_checkpoint and not (c.load or c.pretrained_checkpoint):
        raise ValueError("--exit-on-missing-checkpoint needs --load DIR.")
    if c.ckpt_step is not None and not c.load:
        raise ValueError("--ckpt-step selects an iteration of the checkpoint in --load; give --load DIR.")
    if c.save_interval is not None:
        if not c.save:
            raise ValueError("--save-interval needs --save DIR.")
        _check_at_least(1, ("--save-interval", c.save_interval))
