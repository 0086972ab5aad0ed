"""TopKRouter: the linear gate of an MoE layer, top-k expert choice, load balancing and capacity.

Shape legend: s = local sequence (s/tp with sequence parallelism), b = micro-batch, h = hidden,
T = s*b tokens of this rank (s outer), E = experts, k = top-k, C = expert capacity.

forward(x [s, b, h]) -> (probs [T, E], routing_map [T, E] bool): probs holds each token's weight
for the experts it is routed to and 0 elsewhere; routing_map marks those experts. With a capacity
factor, tokens over an expert's capacity are dropped from both (and with padding to capacity every
expert column has exactly C marked tokens, the padding ones with probability 0).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gigatron.core.parallel.mappings import all_reduce
from gigatron.core.parallel.tags import mark_sequence_parallel, set_init
from gigatron.core.transformer.moe.aux_losses import (
    attach_aux_loss,
    get_aux_loss_tracker,
    sequence_load_balancing_loss,
    switch_load_balancing_loss,
    z_loss,
)

__all__ = ["TopKRouter", "sinkhorn", "group_limited_topk", "topk_routing", "apply_capacity",
           "expert_capacity", "update_expert_bias"]


def sinkhorn(cost: torch.Tensor, tol: float = 1e-4, max_iters: int = 1000) -> torch.Tensor:
    """Sinkhorn-Knopp balancing of exp(cost) [T, E]: rows scaled to sum 1/T, columns to 1/E
    (returned up to those scales); used to pick a balanced top-k (S-BASE)."""
    cost = torch.exp(cost - cost.max())  # [T, E]; the shift is absorbed by the row scaling
    num_tokens, num_experts = cost.shape
    d0 = torch.ones(num_tokens, device=cost.device, dtype=cost.dtype)
    d1 = torch.ones(num_experts, device=cost.device, dtype=cost.dtype)
    eps = 1e-8
    for _ in range(max_iters):
        d0 = (1.0 / num_tokens) / ((cost * d1).sum(dim=1) + eps)  # [T]
        d1_new = (1.0 / num_experts) / ((cost * d0.unsqueeze(1)).sum(dim=0) + eps)  # [E]
        error = (d1_new - d1).abs().mean()
        d1 = d1_new
        if error <= tol:
            break
    return d1 * cost * d0.unsqueeze(1)  # [T, E]


def group_limited_topk(scores: torch.Tensor, topk: int, num_groups: Optional[int],
                       group_topk: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k of scores [T, E] (values, indices [T, k]); with groups, only among the experts of the
    `group_topk` groups whose best topk/group_topk scores sum highest."""
    if not num_groups:
        return torch.topk(scores, k=topk, dim=-1)
    num_tokens, num_experts = scores.shape
    grouped = scores.view(num_tokens, num_groups, num_experts // num_groups)  # [T, G, E/G]
    group_scores = grouped.topk(topk // group_topk, dim=-1).values.sum(dim=-1)  # [T, G]
    group_idx = torch.topk(group_scores, k=group_topk, dim=-1).indices  # [T, group_topk]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)  # [T, G]
    expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, num_experts)  # [T, E]
    masked = scores.masked_fill(~expert_mask, float("-inf"))  # [T, E]
    return torch.topk(masked, k=topk, dim=-1)


def topk_routing(logits: torch.Tensor, topk: int, score_function: str = "softmax", pre_softmax: bool = False,
                 num_groups: Optional[int] = None, group_topk: Optional[int] = None,
                 scaling_factor: Optional[float] = None, expert_bias: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing of logits [T, E] -> (probs [T, E] dense, routing_map [T, E] bool).

    softmax: softmax over all experts then top-k (pre_softmax), or top-k logits then softmax over
    those k. sigmoid: sigmoid scores, top-k (of scores + expert_bias when given; the bias only
    chooses), normalised to sum 1 over the k when k > 1. Then multiplied by scaling_factor."""
    if score_function == "softmax":
        if pre_softmax:
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)  # [T, E]
            top_probs, top_idx = group_limited_topk(scores, topk, num_groups, group_topk)  # [T, k]
        else:
            top_logits, top_idx = group_limited_topk(logits, topk, num_groups, group_topk)  # [T, k]
            top_probs = torch.softmax(top_logits, dim=-1, dtype=torch.float32).type_as(logits)  # [T, k]
    elif score_function == "sigmoid":
        scores = torch.sigmoid(logits.float()).type_as(logits)  # [T, E]
        if expert_bias is not None:
            _, top_idx = group_limited_topk(scores + expert_bias.to(scores.dtype), topk, num_groups, group_topk)
            top_probs = torch.gather(scores, 1, top_idx)  # [T, k]
        else:
            top_probs, top_idx = group_limited_topk(scores, topk, num_groups, group_topk)
        if topk > 1:
            top_probs = top_probs / (top_probs.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        raise ValueError(f"unknown --moe-router-score-function {score_function!r}; use softmax or sigmoid")
    if scaling_factor:
        top_probs = top_probs * scaling_factor
    probs = torch.zeros_like(logits).scatter(1, top_idx, top_probs)  # [T, E]
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top_idx, True)  # [T, E]
    return probs, routing_map


def expert_capacity(num_tokens: int, num_experts: int, topk: int, capacity_factor: float) -> int:
    """ceil(num_tokens * topk / num_experts * capacity_factor), at most num_tokens."""
    return min(num_tokens, max(1, math.ceil(num_tokens * topk / num_experts * capacity_factor)))


def apply_capacity(probs: torch.Tensor, routing_map: torch.Tensor, capacity: int, drop_policy: str = "probs",
                   pad_to_capacity: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep at most `capacity` tokens per expert (column): those with the highest probs ("probs")
    or the earliest ("position"). With pad_to_capacity every column gets exactly `capacity` marked
    tokens: the kept ones plus padding tokens whose probability is 0."""
    if drop_policy not in ("probs", "position"):
        raise ValueError(f"unknown --moe-token-drop-policy {drop_policy!r}; use probs or position")
    num_tokens = probs.shape[0]
    capacity = min(capacity, num_tokens)
    if drop_policy == "probs":
        # Routed tokens rank above unrouted ones, among them by probability.
        key = torch.where(routing_map, probs.detach().float() + 2.0, torch.zeros((), device=probs.device))  # [T, E]
    else:
        earliness = torch.arange(num_tokens, 0, -1, device=probs.device, dtype=torch.float32).unsqueeze(1)  # [T, 1]
        key = earliness + routing_map.float() * (num_tokens + 1)  # [T, E]
    keep_idx = torch.topk(key, k=capacity, dim=0).indices  # [C, E]
    kept = torch.zeros_like(routing_map).scatter(0, keep_idx, True)  # [T, E]
    new_map = kept if pad_to_capacity else (kept & routing_map)
    return probs * (kept & routing_map).to(probs.dtype), new_map


class TopKRouter(nn.Module):
    """Linear gate weight [E, h] (parameter `router.weight`), top-k choice, aux losses.

    `layer_number`: global layer number (init key, aux-loss record). `groups.tp_cp` is the group
    that splits the sequence when sequence parallelism is on: load counts for the aux losses are
    summed over it so that the partial losses add up to the whole sequence's."""

    def __init__(self, config, moe_config, groups, layer_number: int, aux_loss_tracker=None):
        super().__init__()
        from gigatron.core.transformer.mlp import normal_init_method

        self.config = config
        self.moe_config = moe_config
        self.layer_number = layer_number
        self.num_experts = moe_config.num_experts
        self.topk = moe_config.moe_router_topk
        self.tracker = aux_loss_tracker if aux_loss_tracker is not None else get_aux_loss_tracker()
        # Aux-loss values recorded while torch.compile traces the layer, handed to the tracker by
        # flush_aux_losses() outside the compiled region (see _record).
        self.pending_aux_losses: list = []
        # The sequence is split over tp (sequence parallelism is required with tp > 1) and cp: the
        # aux losses are partial sums over that group.
        self.seq_group = groups.tp_cp
        dtype = config.params_dtype or torch.float32
        device = _param_device(config)
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, dtype=dtype, device=device))
        set_init(self.weight, normal_init_method(config), f"decoder.layers.{layer_number}.mlp.router.weight")
        if config.sequence_parallel and groups.tp.size > 1:
            mark_sequence_parallel(self.weight)
        if moe_config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(self.num_experts, dtype=torch.float32, device=device))
            self.register_buffer("local_tokens_per_expert",
                                 torch.zeros(self.num_experts, dtype=torch.float32, device=device), persistent=False)
        else:
            self.expert_bias = None
            self.local_tokens_per_expert = None

    @property
    def router_dtype(self) -> Optional[torch.dtype]:
        return {"fp32": torch.float32, "fp64": torch.float64, None: None}[self.moe_config.moe_router_dtype]

    def _training_losses(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def _record(self, name: str, value: torch.Tensor) -> None:
        """Log an aux-loss value for this layer. Under torch.compile the value is only queued:
        recording it in the tracker from compiled code would make the graph depend on the
        tracker's dictionaries and on this layer's number, so every layer and every micro-batch
        would compile its own graph until the recompile limit sends the rest to eager.
        TransformerBlock calls flush_aux_losses() after each layer."""
        if torch.compiler.is_compiling():
            self.pending_aux_losses.append((name, value.detach()))
        else:
            self.tracker.record(name, self.layer_number, value)

    def flush_aux_losses(self) -> None:
        """Hand the values queued under torch.compile to the tracker (in eager code)."""
        pending, self.pending_aux_losses = self.pending_aux_losses, []
        for name, value in pending:
            self.tracker.record(name, self.layer_number, value)

    def gating(self, tokens: torch.Tensor) -> torch.Tensor:
        """logits [T, E] = tokens [T, h] @ weight^T, in --moe-router-dtype when set."""
        dtype = self.router_dtype
        if dtype is not None:
            return F.linear(tokens.to(dtype), self.weight.to(dtype))
        return F.linear(tokens, self.weight)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        mc = self.moe_config
        seq_length, batch_size, hidden = x.shape
        tokens = x.reshape(-1, hidden)  # [T, h]
        if mc.moe_input_jitter_eps and self.training:
            eps = mc.moe_input_jitter_eps
            noise = torch.empty_like(tokens).uniform_(1.0 - eps, 1.0 + eps)
            tokens = tokens * noise
        logits = self.gating(tokens)  # [T, E]
        if mc.moe_z_loss_coeff and self._training_losses():
            loss = z_loss(logits, mc.moe_z_loss_coeff / self.seq_group.size)
            logits = attach_aux_loss(logits, loss, self.tracker)
            self._record("z_loss", loss / mc.moe_z_loss_coeff)

        balancing = mc.moe_router_load_balancing_type
        if balancing == "sinkhorn":
            probs, routing_map = self._sinkhorn_routing(logits)
        else:
            probs, routing_map = topk_routing(
                logits, self.topk, mc.moe_router_score_function, mc.moe_router_pre_softmax,
                mc.moe_router_num_groups, mc.moe_router_group_topk, mc.moe_router_topk_scaling_factor,
                self.expert_bias)
        if self.expert_bias is not None and self._training_losses():
            # Counted once per token also under recompute (its first pass runs without grad).
            with torch.no_grad():
                self.local_tokens_per_expert += routing_map.sum(dim=0).float()
        if balancing in ("aux_loss", "seq_aux_loss") and mc.moe_aux_loss_coeff > 0 and self._training_losses():
            probs = self._attach_balancing_loss(logits, probs, routing_map, seq_length, batch_size)

        if mc.moe_expert_capacity_factor is not None:
            capacity = expert_capacity(tokens.shape[0], self.num_experts, self.topk, mc.moe_expert_capacity_factor)
            probs, routing_map = apply_capacity(probs, routing_map, capacity, mc.moe_token_drop_policy,
                                                mc.moe_pad_expert_input_to_capacity)
        return probs, routing_map

    def _sinkhorn_routing(self, logits: torch.Tensor):
        norm = torch.sigmoid if self.topk == 1 else (lambda t: torch.softmax(t, dim=-1))
        if self.training:
            with torch.no_grad():
                balanced = sinkhorn(logits.float())  # [T, E]
                top_idx = torch.topk(balanced, k=self.topk, dim=-1).indices  # [T, k]
            top_probs = torch.gather(norm(logits), 1, top_idx)  # [T, k]
        else:
            top_probs, top_idx = torch.topk(norm(logits), k=self.topk, dim=-1)
        probs = torch.zeros_like(logits).scatter(1, top_idx, top_probs)  # [T, E]
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top_idx, True)  # [T, E]
        return probs, routing_map

    def _scores_for_aux_loss(self, logits: torch.Tensor) -> torch.Tensor:
        if self.moe_config.moe_router_score_function == "sigmoid":
            scores = torch.sigmoid(logits.float())
            return scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)  # [T, E]
        return torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]

    def _attach_balancing_loss(self, logits, probs, routing_map, seq_length, batch_size):
        mc = self.moe_config
        scores = self._scores_for_aux_loss(logits)  # [T, E]
        group = self.seq_group
        if mc.moe_router_load_balancing_type == "aux_loss":
            counts = all_reduce(routing_map.sum(dim=0).float(), group)  # [E] over the whole sequence
            total_tokens = routing_map.shape[0] * group.size
            loss = switch_load_balancing_loss(scores, counts, total_tokens, self.topk, mc.moe_aux_loss_coeff)
            name = "load_balancing_loss"
        else:
            counts = routing_map.view(seq_length, batch_size, -1).sum(dim=0).float()  # [b, E]
            counts = all_reduce(counts, group)
            loss = sequence_load_balancing_loss(scores, routing_map, seq_length, batch_size,
                                                seq_length * group.size, self.topk, mc.moe_aux_loss_coeff,
                                                tokens_per_expert_per_seq=counts)
            name = "seq_load_balancing_loss"
        self._record(name, loss / mc.moe_aux_loss_coeff)
        return attach_aux_loss(probs, loss, self.tracker)


def _param_device(config) -> torch.device:
    if getattr(config, "use_cpu_initialization", False) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


@torch.no_grad()
def update_expert_bias(model: nn.Module, groups) -> int:
    """Aux-loss-free balancing step, after each optimizer step: for every router with an expert
    bias, sum its token counts of the step over all tensor/data/context-parallel ranks, move the
    bias by rate * sign(mean count - count) and reset the counts. Returns the number of routers.
    A collective over groups.tp_dp_cp: every rank of a pipeline stage must call it."""
    updated = 0
    for module in model.modules():
        if isinstance(module, TopKRouter) and module.expert_bias is not None:
            counts = module.local_tokens_per_expert
            if groups.tp_dp_cp.group is not None:
                dist.all_reduce(counts, group=groups.tp_dp_cp.group)
            offset = counts.mean() - counts  # [E]
            module.expert_bias += module.moe_config.moe_router_bias_update_rate * torch.sign(offset)
            counts.zero_()
            updated += 1
    return updated
