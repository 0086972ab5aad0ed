"""MoELayer: router, token dispatcher, routed experts and optional shared experts.

Shape legend: s = sequence (s/tp with sequence parallelism), b = micro-batch, h = hidden,
T = s*b tokens, E = experts.

    forward(x [s, b, h]) -> (y [s, b, h], None)
    y = sum over the top-k experts e of x: probs[e] * expert_e(x)  (+ shared_experts(x))

Parameters (Megatron-Core names, under decoder.layers.{i}.mlp): router.weight [E, h]
(router.expert_bias [E] buffer with aux-loss-free balancing); experts.local_experts.{j}.linear_fc1 /
linear_fc2 (SequentialMLP) or experts.weight1 / weight2 (GroupedMLP, --moe-grouped-gemm);
shared_experts.linear_fc1 / linear_fc2 (a dense tensor-parallel MLP of
--moe-shared-expert-intermediate-size).
"""

from __future__ import annotations


import torch
from torch import nn

from gigatron.core.transformer.moe.config import validate_moe
from gigatron.core.transformer.moe.experts import build_experts
from gigatron.core.transformer.moe.router import TopKRouter
from gigatron.core.transformer.moe.token_dispatcher import build_token_dispatcher

__all__ = ["MoELayer", "SharedExpertMLP"]


class SharedExpertMLP(nn.Module):
    """The dense MLP every token goes through, of --moe-shared-expert-intermediate-size; the
    tensor-parallel MLP of gigatron.core.transformer.mlp with init keys under `shared_experts`."""

    def __init__(self, config, groups, layer_number: int, intermediate_size: int):
        super().__init__()
        from gigatron.core.parallel.layers import ColumnParallelLinear, RowParallelLinear
        from gigatron.core.transformer.mlp import activation_function, normal_init_method, scaled_init_method

        prefix = f"decoder.layers.{layer_number}.mlp.shared_experts"
        self.activation = activation_function(config)
        self.linear_fc1 = ColumnParallelLinear(
            config.hidden_size, 2 * intermediate_size if config.swiglu else intermediate_size, config=config,
            tp=groups.tp, init_method=normal_init_method(config), bias=False, gather_output=False,
            stride=2 if config.swiglu else 1, init_key=prefix + ".linear_fc1")
        self.linear_fc2 = RowParallelLinear(
            intermediate_size, config.hidden_size, config=config, tp=groups.tp,
            init_method=scaled_init_method(config), bias=False, input_is_parallel=True,
            init_key=prefix + ".linear_fc2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inter, _ = self.linear_fc1(x)  # [s, b, f/tp] (x2 with swiglu)
        out, _ = self.linear_fc2(self.activation(inter))  # [s, b, h] (SP: [s/tp, b, h])
        return out


class MoELayer(nn.Module):
    """Mixture-of-experts replacement for the MLP of a transformer layer.

    `layer_number`: global (0-based) layer number (init keys and aux-loss records).
    `aux_loss_tracker`: where aux losses are recorded and which backward scale they use
    (default: gigatron.core.transformer.moe.aux_losses.get_aux_loss_tracker())."""

    def __init__(self, config, moe_config, groups, layer_number: int, aux_loss_tracker=None):
        super().__init__()
        validate_moe(moe_config, config, groups)
        self.config = config
        self.moe_config = moe_config
        self.layer_number = layer_number
        self.router = TopKRouter(config, moe_config, groups, layer_number, aux_loss_tracker)
        self.experts = build_experts(config, moe_config, groups, layer_number)
        dropless = moe_config.moe_expert_capacity_factor is None  # every token keeps its k experts
        self.token_dispatcher = build_token_dispatcher(moe_config.moe_token_dispatcher_type,
                                                       moe_config.num_experts, groups,
                                                       exact_topk=moe_config.moe_router_topk if dropless else None)
        if moe_config.moe_shared_expert_intermediate_size:
            self.shared_experts = SharedExpertMLP(config, groups, layer_number,
                                                  moe_config.moe_shared_expert_intermediate_size)
        else:
            self.shared_experts = None

    def forward(self, x: torch.Tensor):
        seq_length, batch_size, hidden = x.shape
        probs, routing_map = self.router(x)  # [T, E] each
        tokens = x.reshape(-1, hidden)  # [T, h]
        if self.moe_config.moe_apply_probs_on_input:
            # Top-1 routing: each token enters its expert scaled by that expert's probability, and
            # the expert's output is combined with weight 1.
            tokens = tokens * probs.sum(dim=-1, keepdim=True).to(tokens.dtype)  # [T, h]
            probs = routing_map.to(probs.dtype)  # [T, E]
        routed = self.token_dispatcher.forward(tokens, probs, routing_map, self.experts)  # [T, h]
        out = routed.view(seq_length, batch_size, hidden)  # [s, b, h]
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out, None
