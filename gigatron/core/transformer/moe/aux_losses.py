"""Router auxiliary losses, how their gradients enter backward, and their per-layer record.

Shape legend: T = tokens of this rank ([s*b] flattened, s outer), E = experts, k = top-k,
s = local sequence length, b = micro-batch.

The losses are partial sums over the ranks that split the sequence (tensor/context parallel with
sequence parallelism): each rank sums its own tokens' probabilities, multiplied by load counts
reduced over the group, so the sum of the partial losses over the group is the loss of the whole
sequence, and the router gradients (all-reduced over tp as sequence-parallel parameters) are
those of the single-process loss.

`attach_aux_loss(x, loss, tracker)` returns x unchanged; in backward it feeds `tracker.backward_scale`
as the gradient of `loss` (Megatron's MoEAuxLossAutoScaler). The schedule divides the main loss by
the number of micro-batches (and multiplies it by the fp16 loss scale), so the training step sets
`backward_scale = loss_scale / num_microbatches` before each forward-backward pass.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "aux_loss_names",
    "switch_load_balancing_loss",
    "sequence_load_balancing_loss",
    "z_loss",
    "attach_aux_loss",
    "MoEAuxLossTracker",
    "get_aux_loss_tracker",
]


def aux_loss_names(moe_config) -> List[str]:
    """Names under which MoE routers with these flags record their losses (the same on every rank)."""
    names = []
    balancing = moe_config.moe_router_load_balancing_type
    if moe_config.moe_aux_loss_coeff > 0 and balancing == "aux_loss":
        names.append("load_balancing_loss")
    if moe_config.moe_aux_loss_coeff > 0 and balancing == "seq_aux_loss":
        names.append("seq_load_balancing_loss")
    if moe_config.moe_z_loss_coeff:
        names.append("z_loss")
    return names


def switch_load_balancing_loss(scores: torch.Tensor, tokens_per_expert: torch.Tensor, total_num_tokens: int,
                               topk: int, coeff: float) -> torch.Tensor:
    """Switch/GShard loss: coeff * E * sum_e f_e * P_e with f_e = tokens_per_expert[e] / (T_total * k)
    and P_e = sum_t scores[t, e] / T_total.

    scores [T, E]: routing scores over all experts (this rank's tokens); tokens_per_expert [E]: how
    many of the T_total tokens (of the whole sequence-parallel group) chose each expert."""
    num_experts = scores.shape[-1]
    weighted = scores.sum(dim=0) * tokens_per_expert.to(scores.dtype)  # [E]
    return weighted.sum() * (num_experts * coeff / (topk * float(total_num_tokens) ** 2))


def sequence_load_balancing_loss(scores: torch.Tensor, routing_map: torch.Tensor, seq_length: int,
                                 batch_size: int, total_seq_length: int, topk: int, coeff: float,
                                 tokens_per_expert_per_seq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The Switch loss of each sequence, averaged over the b sequences of the micro-batch.

    scores [T, E], routing_map [T, E] with T = seq_length * batch_size (s outer); total_seq_length
    is the whole sequence when it is split over ranks; tokens_per_expert_per_seq [b, E] the
    per-sequence counts over the whole sequence (default: counted from routing_map)."""
    num_experts = scores.shape[-1]
    if tokens_per_expert_per_seq is None:
        tokens_per_expert_per_seq = routing_map.view(seq_length, batch_size, num_experts).sum(dim=0)  # [b, E]
    probs_per_seq = scores.view(seq_length, batch_size, num_experts).sum(dim=0)  # [b, E]
    per_seq = (probs_per_seq * tokens_per_expert_per_seq.to(scores.dtype)).sum(dim=1)  # [b]
    scale = num_experts * coeff / (topk * float(total_seq_length) ** 2)
    return per_seq.mean() * scale


def z_loss(logits: torch.Tensor, coeff: float) -> torch.Tensor:
    """coeff * mean_t logsumexp(logits[t])^2 (ST-MoE router z-loss); logits [T, E]."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean() * coeff


class _AttachAuxLoss(torch.autograd.Function):
    """forward: identity on x (the aux loss only rides along); backward: x's gradient unchanged,
    the aux loss gets the gradient `scale` (the main loss's backward scale)."""

    @staticmethod
    def forward(ctx, x, aux_loss, scale):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.full_like(aux_loss, ctx.scale), None


def attach_aux_loss(x: torch.Tensor, aux_loss: torch.Tensor, tracker: "MoEAuxLossTracker") -> torch.Tensor:
    """x, carrying `aux_loss` into backward with gradient tracker.backward_scale."""
    if not (torch.is_grad_enabled() and aux_loss.requires_grad):
        return x
    return _AttachAuxLoss.apply(x, aux_loss, float(tracker.backward_scale))


class MoEAuxLossTracker:
    """Records the auxiliary losses of each MoE layer for logging.

    `record(name, layer_number, value)` adds a detached value (summed over the micro-batches of
    the step); `reduce(groups)` sums the partial values over the sequence-parallel ranks, gathers
    the layers of every pipeline stage and averages over data-parallel ranks; `summary(...)` gives
    the mean over MoE layers per name and, with per-layer logging, each layer's value; `clear()`
    starts the next step. `backward_scale` is the gradient fed to the aux losses in backward."""

    def __init__(self):
        self.backward_scale: float = 1.0
        self._values: Dict[str, Dict[int, torch.Tensor]] = {}
        self._partial_over_tp: Dict[str, bool] = {}

    def set_backward_scale(self, scale: float) -> None:
        """Set before forward-backward: loss_scale / num_microbatches."""
        self.backward_scale = float(scale)

    def record(self, name: str, layer_number: int, value: torch.Tensor, partial_over_tp: bool = True) -> None:
        per_layer = self._values.setdefault(name, {})
        value = value.detach().float().reshape(())
        per_layer[layer_number] = per_layer[layer_number] + value if layer_number in per_layer else value
        self._partial_over_tp[name] = partial_over_tp

    def names(self):
        return list(self._values)

    def values(self, name: str) -> Dict[int, float]:
        return {layer: float(v) for layer, v in sorted(self._values.get(name, {}).items())}

    def reduce(self, groups, num_layers: int, names: Optional[Sequence[str]] = None,
               device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
        """Per name a tensor [num_layers] of this step's values (0 for layers without one), summed
        over the tensor/context-parallel split and the pipeline stages, averaged over data-parallel
        ranks. A collective over those groups: every rank must call it with the same `names`
        (default: aux_loss_names(moe_config) of the model; a stage without MoE layers records none,
        so pass them explicitly under pipelining). `device`: where the reduction runs (the recorded
        values' device, else CUDA when available)."""
        names = sorted(self._values) if names is None else list(names)
        if device is None:
            recorded = [v for per_layer in self._values.values() for v in per_layer.values()]
            device = recorded[0].device if recorded else torch.device(
                "cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        out = {}
        for name in names:
            dense = torch.zeros(num_layers, dtype=torch.float32, device=device)
            for layer, value in self._values.get(name, {}).items():
                dense[layer] = value.to(device)
            if self._partial_over_tp.get(name, True) and groups.tp_cp.group is not None:
                dist.all_reduce(dense, group=groups.tp_cp.group)
            if groups.pp.group is not None:
                dist.all_reduce(dense, group=groups.pp.group)
            if groups.dp_cp.group is not None:
                dist.all_reduce(dense, group=groups.dp_cp.group)
                dense /= groups.dp_cp.size
            out[name] = dense
        return out

    def summary(self, reduced: Dict[str, torch.Tensor], num_microbatches: int, moe_layers,
                per_layer_logging: bool = False) -> Dict[str, float]:
        """{name: mean over the MoE layers of the per-micro-batch value} and, with per-layer
        logging, {"<name> layer_<i>": value}. `moe_layers`: global numbers of the MoE layers."""
        result = {}
        layers = list(moe_layers)
        for name, dense in reduced.items():
            per_layer = dense / max(num_microbatches, 1)
            if layers:
                result[name] = float(per_layer[layers].mean())
            if per_layer_logging:
                for layer in layers:
                    result[f"{name} layer_{layer}"] = float(per_layer[layer])
        return result

    def clear(self) -> None:
        self._values = {}


_DEFAULT_TRACKER = MoEAuxLossTracker()


def get_aux_loss_tracker() -> MoEAuxLossTracker:
    """The process-wide tracker MoE layers use unless given another one."""
    return _DEFAULT_TRACKER
