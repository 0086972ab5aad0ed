"""Mixture of Experts: router, token dispatchers (allgather, alltoall over the expert-parallel
group), routed experts (SequentialMLP, GroupedMLP), shared experts and the router's auxiliary
losses."""

from .aux_losses import MoEAuxLossTracker, get_aux_loss_tracker
from .config import MoEConfig, is_moe_layer, moe_layer_pattern, validate_moe
from .experts import GroupedMLP, SequentialMLP
from .moe_layer import MoELayer, SharedExpertMLP
from .router import TopKRouter, update_expert_bias

__all__ = [
    "MoEConfig",
    "MoELayer",
    "SharedExpertMLP",
    "TopKRouter",
    "SequentialMLP",
    "GroupedMLP",
    "MoEAuxLossTracker",
    "get_aux_loss_tracker",
    "update_expert_bias",
    "is_moe_layer",
    "moe_layer_pattern",
    "validate_moe",
]
