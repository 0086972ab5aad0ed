"""FP8 in a model: which linear layers run in FP8, and their delayed-scaling state over a run.

    recipe = FP8Recipe.for_device(config, device)          # once per model (all its chunks)
    states = enable_fp8(chunk, config, recipe, device)     # per chunk: {global linear name: state}
    update_model_fp8_states(states, groups)                # after each iteration's forward/backward
    saved = gather_fp8_state_dict(states, groups.tp_ep_pp) # checkpoint: every stage's states, by name
    load_fp8_state_dict(states, saved)                     # resume (missing names keep a fresh state)

Selection (Megatron's): the QKV, projection and MLP fc1/fc2 linears (the shared experts' too) of
every TransformerLayer whose global layer number `layer_uses_fp8` selects, and the routed experts
of those layers: SequentialMLP experts (one FP8 linear each) and GroupedMLP experts
(--moe-grouped-gemm: fc1 and fc2 as FP8 grouped GEMMs, forward, dgrad and wgrad, one scale per
expert; `GroupedMLP.fp8_slots` gives one entry per expert and GEMM). The output layer and the
embeddings stay in the parameters' dtype.

GroupedMLP experts by recipe (gigatron.core.fp8.grouped): tensorwise and delayed run
torch._scaled_grouped_mm on Hopper (probed when the recipe is made; elsewhere, or with expert
dims not multiples of 16, the same FP8 math runs as dequantized per-expert GEMMs), with E4M3
gradients under both --fp8-format values (the grouped kernel takes E4M3 only); blockwise runs
`fp8_linear` expert by expert (no grouped kernel takes 1x128/128x128 scales), FP8 numerics without
FP8 grouped speed. --fp8-param-gather leaves GroupedMLP weights to the bf16 all-gather (they are
cast per expert in each forward).

States are named by the linear's global module name (`decoder.layers.7.self_attention.linear_qkv`;
experts by their global expert number, `decoder.layers.3.mlp.experts.local_experts.5.linear_fc1`,
the same names for SequentialMLP and GroupedMLP experts), so a checkpoint's FP8 state loads at
another pipeline, tensor or expert-parallel layout. Only the delayed recipe has state; tensorwise
and blockwise scale from each tensor itself.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Optional

import torch
import torch.distributed as dist

from .config import FP8Config, layer_uses_fp8
from .linear import FP8Recipe
from .state import FP8LinearState, update_fp8_states

__all__ = ["enable_fp8", "fp8_linears", "update_model_fp8_states", "fp8_state_dict", "gather_fp8_state_dict",
           "load_fp8_state_dict", "amax_recording_paused", "is_expert_state"]

EXPERT_MARK = ".mlp.experts."
MTP_MARK = "mtp."


def is_expert_state(name: str) -> bool:
    """Whether the state named `name` belongs to a routed expert (reduced over the expert groups)."""
    return EXPERT_MARK in name


def fp8_linears(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """(global name, linear) for every linear of `module`'s transformer layers that can run in FP8,
    selected or not."""
    from gigatron.core.parallel.layers import ColumnParallelLinear, RowParallelLinear
    from gigatron.core.transformer.layer import TransformerLayer
    from gigatron.core.transformer.moe.experts import GroupedMLP, _ExpertLinear

    for path, layer in module.named_modules():
        if not isinstance(layer, TransformerLayer):
            continue
        # Decoder layers by their global number; a multi-token prediction block's layer (last stage
        # only) by its own path, mtp.layers.{k}.transformer_layer.
        prefix = path if path.startswith(MTP_MARK) else f"decoder.layers.{layer.layer_number}"
        for name, sub in layer.named_modules():
            if isinstance(sub, (ColumnParallelLinear, RowParallelLinear)):
                yield f"{prefix}.{name}", sub
            elif isinstance(sub, _ExpertLinear) and sub.fp8_key is not None:
                yield sub.fp8_key, sub
            elif isinstance(sub, GroupedMLP):
                yield from sub.fp8_slots()


def enable_fp8(module: torch.nn.Module, config: FP8Config, recipe: FP8Recipe,
               device=None) -> dict[str, FP8LinearState]:
    """Switch the linears of the layers that `config` selects to FP8 with `recipe` (one recipe per
    model); return the delayed-scaling states created, by global name (empty for other recipes)."""
    from gigatron.core.transformer.layer import TransformerLayer

    if not config.enabled:
        return {}
    selected = {layer.layer_number for path, layer in module.named_modules()
                if isinstance(layer, TransformerLayer) and not path.startswith(MTP_MARK)
                and layer_uses_fp8(config, layer.layer_number, layer.config.num_layers)}
    # Multi-token prediction layers come after the last decoder layer: in FP8 unless the last
    # layers are kept in bf16.
    mtp_in_fp8 = not (config.first_last_layers_bf16 and config.num_layers_at_end_in_bf16 > 0)
    states: dict[str, FP8LinearState] = {}
    for name, linear in fp8_linears(module):
        if not (mtp_in_fp8 if name.startswith(MTP_MARK) else int(name.split(".")[2]) in selected):
            continue
        state = FP8LinearState.from_config(config, device) if recipe.kind == "delayed" else None
        linear.enable_fp8(recipe, state)
        if state is not None:
            states[name] = state
    return states


def _reduce_max(states: list[FP8LinearState], group) -> None:
    if not states or group is None or getattr(group, "size", 1) <= 1 or group.group is None:
        return
    rows = torch.cat([s.amax_history[0] for s in states])  # [3 * len(states)]
    dist.all_reduce(rows, op=dist.ReduceOp.MAX, group=group.group)
    torch._foreach_copy_([s.amax_history[0] for s in states], list(rows.view(len(states), -1).unbind(0)))


@torch.no_grad()
def update_model_fp8_states(states: Mapping[str, FP8LinearState], groups) -> None:
    """End of an iteration (every micro-batch's backward done), on every rank of a pipeline stage:
    reduce this step's amaxes with MAX and derive the next scales, as Transformer Engine does, so
    that every replica of a weight keeps the same scales. Dense linears reduce over tensor x data
    x context parallel ranks; routed experts over the expert tensor-parallel and expert
    data-parallel ranks (the ranks holding the same expert). No host synchronisation."""
    if not states:
        return
    dense = [s for name, s in states.items() if not is_expert_state(name)]
    experts = [s for name, s in states.items() if is_expert_state(name)]
    update_fp8_states(dense, groups.tp_dp_cp)
    if experts:
        _reduce_max(experts, groups.expt_tp)
        update_fp8_states(experts, groups.expt_dp)


@contextmanager
def amax_recording_paused(states: Mapping[str, FP8LinearState]):
    """Forward passes inside (evaluation) leave the amax histories as they found them, so the
    scales of training never depend on when or whether the run evaluates."""
    saved = [(s, s.amax_history[0].clone()) for s in states.values()]
    try:
        yield
    finally:
        for state, row in saved:
            state.amax_history[0].copy_(row)


def fp8_state_dict(states: Mapping[str, FP8LinearState]) -> dict:
    """{global name: {"amax_history", "scale"}} (CPU tensors)."""
    return {name: state.state_dict() for name, state in states.items()}


def gather_fp8_state_dict(states: Mapping[str, FP8LinearState], group=None) -> dict:
    """`fp8_state_dict` merged over `group` (e.g. tp_ep_pp: every pipeline stage and expert rank):
    the whole model's FP8 state. Collective over `group` when it has several ranks."""
    local = fp8_state_dict(states)
    if group is None or getattr(group, "size", 1) <= 1 or group.group is None:
        return local
    gathered: list = [None] * group.size
    dist.all_gather_object(gathered, local, group=group.group)
    merged: dict = {}
    for part in gathered:
        merged.update(part or {})
    return merged


def load_fp8_state_dict(states: Mapping[str, FP8LinearState], saved: Optional[Mapping]) -> tuple[list, list]:
    """Restore each state from `saved` (a checkpoint's FP8 state, or None for a checkpoint saved
    without FP8). Returns (restored names, names left with a fresh state); saved names this model
    does not hold (a checkpoint of an FP8 run loaded for bf16, other layers kept in bf16) are ignored."""
    saved = saved or {}
    restored, fresh = [], []
    for name, state in states.items():
        if name in saved:
            state.load_state_dict(saved[name])
            restored.append(name)
        else:
            fresh.append(name)
    return restored, fresh
