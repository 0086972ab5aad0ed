"""The routed experts of an MoE layer: SequentialMLP (one MLP per local expert, a loop; the
reference) and GroupedMLP (all local experts in two grouped GEMMs).

Shape legend: N = rows routed to this rank's experts, sorted by local expert; h = hidden;
f = --moe-ffn-hidden-size; fo = 2f with --swiglu else f; t = expert tensor-parallel size;
G = local experts (num_experts / expert-parallel size).

    forward(rows [N, h], tokens_per_expert [G]) -> [N, h]
    (a partial sum over the expert tensor-parallel ranks when t > 1; the token dispatcher reduces it)

Weights, Megatron's names and shapes (this rank's shards):
    SequentialMLP  local_experts.{j}.linear_fc1.weight [fo/t, h]   local_experts.{j}.linear_fc2.weight [h, f/t]
    GroupedMLP     weight1 [h, G*fo/t]  (memory: G blocks [h, fo/t])   weight2 [G*f/t, h] (G blocks [f/t, h])
With --swiglu each rank's fc1 shard is [gate_r; up_r] (partition stride 2), as in the dense MLP.

Initialization is independent of the layout and of the expert implementation: expert g's full
weights come from a generator seeded by the g-th of num_experts seeds drawn from the layer's key
("decoder.layers.{i}.mlp.experts.linear_fc1" / "...linear_fc2"), so the same seed gives the same
experts at any expert/expert-tensor parallel size, in SequentialMLP and GroupedMLP alike.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from gigatron.core.parallel.init import local_shard
from gigatron.core.parallel.tags import (is_expert_parallel, mark_expert_parallel, set_init,
                                         set_tensor_parallel_attributes)
from gigatron.core.transformer.moe.grouped_gemm import grouped_mm

__all__ = ["SequentialMLP", "GroupedMLP", "build_experts", "mark_expert_parallel", "is_expert_parallel"]


def _expert_weight(seeds: torch.Tensor, expert: int, shape, std: float) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(int(seeds[expert]))
    return torch.randn(shape, generator=gen) * std  # fp32, CPU


def _draw_expert_seeds(num_experts: int) -> torch.Tensor:
    # initialize_parameters has seeded the default CPU generator from (seed, key).
    return torch.randint(0, 2 ** 62, (num_experts,), dtype=torch.int64)


class _ExpertInit:
    """init_fn for expert weights (picklable). kind "fc1": expert weights [fo, h]; "fc2": [h, f].

    `grouped`: fill the GroupedMLP tensor gathered over the t expert tensor-parallel ranks (rank r's
    [h, G*fo/t] block or [G*f/t, h] block at position r); else the full [fo, h] / [h, f] weight of
    `experts[0]` (SequentialMLP; local_shard then cuts the rank's part)."""

    def __init__(self, kind, std, num_experts, experts, hidden, ffn, swiglu, etp_size, grouped):
        self.kind, self.std, self.num_experts, self.experts = kind, std, num_experts, list(experts)
        self.hidden, self.ffn, self.swiglu, self.etp_size, self.grouped = hidden, ffn, swiglu, etp_size, grouped

    def _full(self, seeds, expert):
        fo = 2 * self.ffn if self.swiglu else self.ffn
        shape = (fo, self.hidden) if self.kind == "fc1" else (self.hidden, self.ffn)
        return _expert_weight(seeds, expert, shape, self.std)

    def _shard(self, w, rank):
        if self.kind == "fc1":
            return local_shard(w, 0, 2 if self.swiglu else 1, rank, self.etp_size)  # [fo/t, h]
        return local_shard(w, 1, 1, rank, self.etp_size)  # [h, f/t]

    @torch.no_grad()
    def __call__(self, full: torch.Tensor) -> torch.Tensor:
        seeds = _draw_expert_seeds(self.num_experts)
        if not self.grouped:
            return full.copy_(self._full(seeds, self.experts[0]))
        weights = [self._full(seeds, g) for g in self.experts]
        for rank in range(self.etp_size):
            # Local memory is G blocks: fc1 [G, h, fo/t] (x @ w), fc2 [G, f/t, h].
            blocks = torch.stack([self._shard(w, rank).t() for w in weights])
            if self.kind == "fc1":
                local = blocks.reshape(self.hidden, -1)  # [h, G*fo/t] (same memory as [G, h, fo/t])
                width = local.shape[1]
                full[:, rank * width:(rank + 1) * width].copy_(local)
            else:
                local = blocks.reshape(-1, self.hidden)  # [G*f/t, h]
                height = local.shape[0]
                full[rank * height:(rank + 1) * height].copy_(local)
        return full

    def __repr__(self) -> str:
        return f"expert_{self.kind}_normal(std={self.std:g}, experts={self.experts[0]}..{self.experts[-1]})"


def _param_device(config) -> torch.device:
    if getattr(config, "use_cpu_initialization", False) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


class _ExpertLinear(nn.Module):
    """Holds one expert projection's weight (no communication: the dispatcher does it).

    forward(x [n, in]) -> x W^T [n, out]; in FP8 after `enable_fp8` (gigatron.core.fp8.model),
    `fp8_key` naming it by its global expert number."""

    def __init__(self, weight: nn.Parameter, fp8_key: Optional[str] = None):
        super().__init__()
        self.weight = weight
        self.fp8_key = fp8_key
        self.fp8_recipe = None
        self.fp8_state = None

    def enable_fp8(self, recipe, state=None) -> None:
        self.fp8_recipe = recipe
        self.fp8_state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_recipe is not None and x.shape[0] > 0:
            from gigatron.core.fp8 import fp8_linear

            return fp8_linear(x, self.weight, None, self.fp8_recipe, self.fp8_state)
        return x @ self.weight.t()


class _ExpertsBase(nn.Module):
    def __init__(self, config, moe_config, groups, layer_number: int):
        super().__init__()
        from gigatron.core.transformer.mlp import activation_function, normal_init_method, scaled_init_method

        self.config = config
        self.num_experts = moe_config.num_experts
        self.etp = groups.expt_tp
        self.num_local_experts = self.num_experts // groups.ep.size
        ep_rank = max(groups.ep.rank, 0)
        self.local_expert_ids = list(range(ep_rank * self.num_local_experts, (ep_rank + 1) * self.num_local_experts))
        self.hidden = config.hidden_size
        self.ffn = moe_config.moe_ffn_hidden_size or config.ffn_hidden_size
        if self.ffn % self.etp.size != 0:
            raise ValueError(f"--moe-ffn-hidden-size ({self.ffn}) must be divisible by "
                             f"--expert-tensor-parallel-size ({self.etp.size})")
        self.ffn_local = self.ffn // self.etp.size
        self.swiglu = bool(config.swiglu)
        self.fc1_local = (2 if self.swiglu else 1) * self.ffn_local
        self.activation = activation_function(config)
        self.std_fc1 = normal_init_method(config).std
        self.std_fc2 = scaled_init_method(config).std
        self.key = f"decoder.layers.{layer_number}.mlp.experts"
        self.dtype = config.params_dtype or torch.float32
        self.device = _param_device(config)

    def _init(self, kind, experts, grouped):
        std = self.std_fc1 if kind == "fc1" else self.std_fc2
        return _ExpertInit(kind, std, self.num_experts, experts, self.hidden, self.ffn, self.swiglu,
                           self.etp.size, grouped)

    def _new_param(self, shape, partition_dim, stride, init_fn, kind):
        param = nn.Parameter(torch.empty(*shape, dtype=self.dtype, device=self.device))
        set_tensor_parallel_attributes(param, self.etp.size > 1, partition_dim, stride,
                                       rank=max(self.etp.rank, 0), world_size=self.etp.size)
        set_init(param, init_fn, f"{self.key}.linear_{kind}")
        mark_expert_parallel(param)
        return param


class SequentialMLP(_ExpertsBase):
    """A loop over the local experts, each a two-layer MLP (the reference implementation)."""

    def __init__(self, config, moe_config, groups, layer_number: int):
        super().__init__(config, moe_config, groups, layer_number)
        experts = []
        for g in self.local_expert_ids:
            expert = nn.Module()
            fc1 = self._new_param((self.fc1_local, self.hidden), 0, 2 if self.swiglu else 1,
                                  self._init("fc1", [g], grouped=False), "fc1")
            fc2 = self._new_param((self.hidden, self.ffn_local), 1, 1, self._init("fc2", [g], grouped=False), "fc2")
            expert.linear_fc1 = _ExpertLinear(fc1, f"{self.key}.local_experts.{g}.linear_fc1")
            expert.linear_fc2 = _ExpertLinear(fc2, f"{self.key}.local_experts.{g}.linear_fc2")
            experts.append(expert)
        self.local_experts = nn.ModuleList(experts)

    def forward(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        counts = tokens_per_expert.tolist()
        pieces = torch.split(rows, counts, dim=0)
        outs = []
        for expert, piece in zip(self.local_experts, pieces):
            inter = expert.linear_fc1(piece)  # [n_j, fo/t]
            outs.append(expert.linear_fc2(self.activation(inter)))  # [n_j, h]
        return torch.cat(outs, dim=0) if outs else rows.new_zeros(0, self.hidden)  # [N, h]


class _GroupedExpertSlot:
    """One expert's fc1 or fc2 inside a GroupedMLP, as the FP8 model code sees a linear (a name, a
    `fp8_recipe`, `enable_fp8(recipe, state)`); the GroupedMLP holds the weights and runs the GEMMs."""

    def __init__(self, owner: "GroupedMLP", fc: str, index: int, key: str):
        self.owner, self.fc, self.index, self.fp8_key = owner, fc, index, key

    @property
    def fp8_recipe(self):
        return self.owner.fp8_recipe

    def enable_fp8(self, recipe, state=None) -> None:
        self.owner._enable_fp8_expert(self.fc, self.index, recipe, state)


class GroupedMLP(_ExpertsBase):
    """All local experts in two grouped GEMMs (torch._grouped_mm where supported, else a loop).

    FP8 (after `enable_fp8` through its `fp8_slots`): both grouped GEMMs and their backward GEMMs
    run in FP8 by gigatron.core.fp8.grouped, with one scale per expert; the delayed recipe's state
    is one FP8LinearState per expert and GEMM, named as SequentialMLP's
    (`...mlp.experts.local_experts.{global expert}.linear_fc1`), whose tensors are rows of the
    stacked [G, L, 3] history and [G, 3] scales the grouped GEMM reads."""

    def __init__(self, config, moe_config, groups, layer_number: int):
        super().__init__(config, moe_config, groups, layer_number)
        g = self.num_local_experts
        self.weight1 = self._new_param((self.hidden, g * self.fc1_local), 1, 1,
                                       self._init("fc1", self.local_expert_ids, grouped=True), "fc1")
        self.weight2 = self._new_param((g * self.ffn_local, self.hidden), 0, 1,
                                       self._init("fc2", self.local_expert_ids, grouped=True), "fc2")
        self.fp8_recipe = None
        self.fp8_stacks: dict = {}  # "fc1"/"fc2" -> (amax history [G, L, 3], scale [G, 3]): delayed only

    def fp8_slots(self):
        """(global name, slot) for each local expert's fc1 and fc2, by global expert number."""
        for index, expert in enumerate(self.local_expert_ids):
            for fc in ("fc1", "fc2"):
                key = f"{self.key}.local_experts.{expert}.linear_{fc}"
                yield key, _GroupedExpertSlot(self, fc, index, key)

    def _enable_fp8_expert(self, fc: str, index: int, recipe, state) -> None:
        from gigatron.core.fp8.grouped import adopt_expert_state

        if self.fp8_recipe is not None and self.fp8_recipe != recipe:
            raise ValueError("a GroupedMLP runs all its experts with one FP8 recipe")
        self.fp8_recipe = recipe
        if state is None:
            return
        if fc not in self.fp8_stacks:
            history = torch.zeros(self.num_local_experts, *state.amax_history.shape, dtype=torch.float32,
                                  device=state.amax_history.device)
            scale = torch.ones(self.num_local_experts, *state.scale.shape, dtype=torch.float32,
                               device=state.scale.device)
            self.fp8_stacks[fc] = (history, scale)
        adopt_expert_state(*self.fp8_stacks[fc], index, state)

    def _mm(self, fc: str, x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        if self.fp8_recipe is None:
            return grouped_mm(x, w, tokens_per_expert)
        from gigatron.core.fp8 import fp8_grouped_mm

        history, scale = self.fp8_stacks.get(fc, (None, None))
        return fp8_grouped_mm(x, w, tokens_per_expert, self.fp8_recipe, history, scale)

    def expert_weights(self):
        """(w1 [G, h, fo/t], w2 [G, f/t, h]): views of weight1/weight2 in Megatron's memory layout."""
        g = self.num_local_experts
        return (self.weight1.view(g, self.hidden, self.fc1_local),  # [G, h, fo/t]
                self.weight2.view(g, self.ffn_local, self.hidden))  # [G, f/t, h]

    def forward(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.expert_weights()
        inter = self._mm("fc1", rows, w1, tokens_per_expert)  # [N, fo/t]
        return self._mm("fc2", self.activation(inter), w2, tokens_per_expert)  # [N, h]


def build_experts(config, moe_config, groups, layer_number: int) -> nn.Module:
    """GroupedMLP with --moe-grouped-gemm, else SequentialMLP."""
    cls = GroupedMLP if moe_config.moe_grouped_gemm else SequentialMLP
    return cls(config, moe_config, groups, layer_number)
