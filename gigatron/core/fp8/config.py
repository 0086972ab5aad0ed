"""FP8Config: Megatron-LM's FP8 flags, and the checks that say whether a run can use them.

Field names are Megatron's flag names with ``_`` for ``-``; the string literal under each field is
its ``--help`` text. Two flags reach their field under another name (the argument parser's alias
table maps them): ``--fp8-format`` sets ``fp8`` (Megatron's own ``dest``) and ``--no-fp8-wgrad``
sets ``fp8_wgrad=False``.

Megatron's defaults, kept here: ``--fp8-format`` unset (FP8 off), ``--fp8-recipe delayed``,
``--fp8-margin 0``, ``--fp8-amax-history-len 1``, ``--fp8-amax-compute-algo most_recent``,
FP8 weight gradients on, ``--fp8-param-gather`` off, ``--first-last-layers-bf16`` off with
``--num-layers-at-start-in-bf16 1`` and ``--num-layers-at-end-in-bf16 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("tensorwise", "delayed", "blockwise", "mxfp8")
AMAX_COMPUTE_ALGOS = ("max", "most_recent")

# FP8 tensor-core GEMMs exist from Ada (8.9) on; MXFP8 (1x32 blocks, e8m0 scales) from Blackwell (10.x).
MIN_FP8_COMPUTE_CAPABILITY = (8, 9)
MXFP8_COMPUTE_CAPABILITY_MAJOR = 10

__all__ = [
    "FP8Config",
    "FP8_FORMATS",
    "FP8_RECIPES",
    "AMAX_COMPUTE_ALGOS",
    "check_fp8_device",
    "check_fp8_param_gather",
    "check_bf16_layer_counts",
    "layer_uses_fp8",
]


@dataclass
class FP8Config:
    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    """Which FP8 format to use for the linear layers' GEMMs (flag --fp8-format): e4m3 (E4M3 for
    activations, weights and gradients) or hybrid (E4M3 forward, E5M2 for the gradients). Unset:
    no FP8."""
    fp8_recipe: Literal["tensorwise", "delayed", "blockwise", "mxfp8", "custom"] = "delayed"
    """FP8 scaling recipe: tensorwise (each tensor scaled by its own current amax), delayed (scales
    from an amax history of earlier steps), blockwise (DeepSeek-V3: 1x128 tiles for activations and
    gradients, 128x128 blocks for weights); mxfp8 (Blackwell) and custom (a Transformer Engine
    quantizer factory) are refused."""
    fp8_margin: int = 0
    """Scaling margin for --fp8-recipe delayed: scales are divided by 2^margin, leaving headroom
    for values larger than the recorded amax."""
    fp8_amax_history_len: int = 1
    """Number of steps of amax history kept per tensor for --fp8-recipe delayed."""
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "most_recent"
    """How --fp8-recipe delayed derives the amax for the next scale from the history: max (the
    largest amax in the history) or most_recent (the amax of the last step)."""
    fp8_wgrad: bool = True
    """Run the weight-gradient GEMM in FP8 (--no-fp8-wgrad runs it in the activation dtype)."""
    fp8_param_gather: bool = False
    """The distributed optimizer casts the FP8 linears' weights to FP8 once per step (each weight
    with its current amax) and all-gathers them in FP8, half the bytes of the bf16 parameter
    all-gather; the linears use that FP8 copy. Needs --use-distributed-optimizer and --fp8-recipe
    tensorwise or delayed."""
    first_last_layers_bf16: bool = False
    """Run the first and last transformer layers in bf16 instead of FP8 (how many: --num-layers-at-
    start-in-bf16 and --num-layers-at-end-in-bf16)."""
    num_layers_at_start_in_bf16: int = 1
    """Number of layers at the start of the model kept in bf16 with --first-last-layers-bf16."""
    num_layers_at_end_in_bf16: int = 1
    """Number of layers at the end of the model kept in bf16 with --first-last-layers-bf16."""
    fp8_interval: int = 1
    """Deprecated in Megatron-LM, which ignores it; accepted (and ignored) so that its launch
    scripts run: the delayed recipe updates its scales after every iteration."""

    def __post_init__(self) -> None:
        _check_format(self)
        _check_recipe(self)
        _check_delayed_only_flags(self)
        _check_fp8_only_flags(self)
        _check_bf16_layer_flags(self)

    @property
    def enabled(self) -> bool:
        """True when --fp8-format is given."""
        return self.fp8 is not None


def _check_format(config: FP8Config) -> None:
    if config.fp8 is not None and config.fp8 not in FP8_FORMATS:
        raise ValueError(f"--fp8-format {config.fp8!r} is not one of {', '.join(FP8_FORMATS)}; "
                         f"use e4m3 or hybrid (E4M3 forward, E5M2 gradients)")


def _check_recipe(config: FP8Config) -> None:
    if config.fp8_recipe == "custom":
        raise ValueError("--fp8-recipe custom (a Transformer Engine quantizer factory) is not supported; "
                         f"use one of {', '.join(FP8_RECIPES)}")
    if config.fp8_recipe not in FP8_RECIPES:
        raise ValueError(f"--fp8-recipe {config.fp8_recipe!r} is not one of {', '.join(FP8_RECIPES)}")
    if config.fp8_amax_compute_algo not in AMAX_COMPUTE_ALGOS:
        raise ValueError(f"--fp8-amax-compute-algo {config.fp8_amax_compute_algo!r} is not one of "
                         f"{', '.join(AMAX_COMPUTE_ALGOS)}")
    if not isinstance(config.fp8_margin, int) or config.fp8_margin < 0:
        raise ValueError(f"--fp8-margin must be an integer >= 0, got {config.fp8_margin!r}")
    if not isinstance(config.fp8_amax_history_len, int) or config.fp8_amax_history_len < 1:
        raise ValueError(f"--fp8-amax-history-len must be an integer >= 1, got {config.fp8_amax_history_len!r}")


def _check_delayed_only_flags(config: FP8Config) -> None:
    """The amax history and the margin only exist in the delayed recipe; setting them for another
    recipe would silently do nothing."""
    if config.fp8 is None or config.fp8_recipe == "delayed":
        return
    set_flags = []
    if config.fp8_margin != 0:
        set_flags.append(f"--fp8-margin {config.fp8_margin}")
    if config.fp8_amax_history_len != 1:
        set_flags.append(f"--fp8-amax-history-len {config.fp8_amax_history_len}")
    if config.fp8_amax_compute_algo != "most_recent":
        set_flags.append(f"--fp8-amax-compute-algo {config.fp8_amax_compute_algo}")
    if set_flags:
        raise ValueError(f"{', '.join(set_flags)} only apply to --fp8-recipe delayed (this run uses "
                         f"--fp8-recipe {config.fp8_recipe}); drop them or use --fp8-recipe delayed")


def _check_fp8_only_flags(config: FP8Config) -> None:
    if config.fp8 is not None:
        return
    for flag, value in (("--fp8-param-gather", config.fp8_param_gather),
                        ("--first-last-layers-bf16", config.first_last_layers_bf16)):
        if value:
            raise ValueError(f"{flag} needs FP8 training: add --fp8-format e4m3 or --fp8-format hybrid, "
                             f"or drop {flag}")


def _check_bf16_layer_flags(config: FP8Config) -> None:
    for flag, value in (("--num-layers-at-start-in-bf16", config.num_layers_at_start_in_bf16),
                        ("--num-layers-at-end-in-bf16", config.num_layers_at_end_in_bf16)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{flag} must be an integer >= 0, got {value!r}")


def check_bf16_layer_counts(config: FP8Config, num_layers: int) -> None:
    """--num-layers-at-start-in-bf16 + --num-layers-at-end-in-bf16 must leave a layer in FP8."""
    if not (config.enabled and config.first_last_layers_bf16):
        return
    kept = config.num_layers_at_start_in_bf16 + config.num_layers_at_end_in_bf16
    if kept >= num_layers:
        raise ValueError(
            f"--first-last-layers-bf16 keeps {config.num_layers_at_start_in_bf16} + "
            f"{config.num_layers_at_end_in_bf16} layers in bf16, but the model has only {num_layers} "
            f"(--num-layers): no layer would run in FP8; lower --num-layers-at-start-in-bf16 / "
            f"--num-layers-at-end-in-bf16 or drop --fp8-format")


def check_fp8_param_gather(config: FP8Config, use_distributed_optimizer: bool) -> None:
    """--fp8-param-gather is the distributed optimizer's parameter all-gather done in FP8, with one
    scale per weight (gigatron.core.fp8.param_gather)."""
    if not config.fp8_param_gather:
        return
    if not use_distributed_optimizer:
        raise ValueError("--fp8-param-gather all-gathers FP8 weights in the distributed optimizer: "
                         "add --use-distributed-optimizer or drop --fp8-param-gather")
    if config.fp8_recipe == "blockwise":
        raise ValueError("--fp8-param-gather casts each weight with one scale in the distributed optimizer; "
                         "--fp8-recipe blockwise scales 128x128 weight blocks, which do not line up with the "
                         "optimizer's shards: use --fp8-recipe tensorwise or delayed, or drop --fp8-param-gather")


def layer_uses_fp8(config: FP8Config, layer_number: int, num_layers: int) -> bool:
    """Whether global transformer layer `layer_number` (0-based over all pipeline stages, as
    TransformerLayer.layer_number and is_moe_layer count) of a `num_layers`-layer model runs its
    linear layers in FP8. With --first-last-layers-bf16 the first --num-layers-at-start-in-bf16
    and the last --num-layers-at-end-in-bf16 layers stay in bf16."""
    if not 0 <= layer_number < num_layers:
        raise ValueError(f"layer_number {layer_number} is outside 0..{num_layers - 1}")
    if not config.enabled:
        return False
    if config.first_last_layers_bf16:
        if layer_number < config.num_layers_at_start_in_bf16:
            return False
        if layer_number >= num_layers - config.num_layers_at_end_in_bf16:
            return False
    return True


def _describe_cuda_device(device: torch.device) -> tuple[str, tuple[int, int]]:
    name = torch.cuda.get_device_name(device)
    return name, torch.cuda.get_device_capability(device)


def check_fp8_device(config: FP8Config, device=None, *, device_name: Optional[str] = None,
                     capability: Optional[tuple[int, int]] = None) -> None:
    """Raise ValueError when `device` cannot run `config`'s FP8 recipe.

    CUDA: FP8 GEMMs need compute capability >= 8.9 (Ada, Hopper, Blackwell); --fp8-recipe mxfp8
    needs Blackwell (10.x). CPU: every recipe but mxfp8 runs (slowly; for tests). `device_name` and
    `capability` describe a CUDA card without one (tests)."""
    if not config.enabled:
        return
    if capability is None:
        device = torch.device(device if device is not None else
                              ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda":
            device_name, capability = _describe_cuda_device(device)
    if capability is None:
        if config.fp8_recipe == "mxfp8":
            raise ValueError("--fp8-recipe mxfp8 needs a Blackwell GPU (compute capability 10.x); this run "
                             "is on the CPU. Use --fp8-recipe tensorwise, delayed or blockwise")
        return
    card = f"{device_name or 'this GPU'} (compute capability {capability[0]}.{capability[1]})"
    if tuple(capability) < MIN_FP8_COMPUTE_CAPABILITY:
        raise ValueError(f"FP8 training (--fp8-format {config.fp8}) needs FP8 tensor cores (compute "
                         f"capability >= 8.9: Ada, Hopper or Blackwell); this is {card}. Drop --fp8-format "
                         f"and train in bf16")
    if config.fp8_recipe == "mxfp8":
        if capability[0] != MXFP8_COMPUTE_CAPABILITY_MAJOR:
            raise ValueError(f"--fp8-recipe mxfp8 needs a Blackwell GPU (compute capability 10.x); this is "
                             f"{card}. Use --fp8-recipe tensorwise, delayed or blockwise")
        raise ValueError(f"--fp8-recipe mxfp8 is not implemented in Gigatron yet ({card}); use "
                         f"--fp8-recipe tensorwise, delayed or blockwise")
