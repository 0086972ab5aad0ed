"""MoEConfig: the Mixture-of-Experts flags, named after Megatron-LM's (``--moe-router-topk`` ->
``moe_router_topk``). The expert parallel sizes (--expert-model-parallel-size,
--expert-tensor-parallel-size) live in ParallelConfig; ``validate_moe`` checks this config against
a TransformerConfig and the parallel sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

from gigatron.core.fields import run_setting

__all__ = ["MoEConfig", "check_moe_flags", "check_moe_layout", "validate_moe", "moe_layer_pattern", "is_moe_layer",
           "LOAD_BALANCING_TYPES", "SCORE_FUNCTIONS", "TOKEN_DISPATCHER_TYPES", "TOKEN_DROP_POLICIES",
           "ROUTER_DTYPES"]

LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "sinkhorn", "none")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
TOKEN_DISPATCHER_TYPES = ("allgather", "alltoall")
TOKEN_DROP_POLICIES = ("probs", "position")
ROUTER_DTYPES = ("fp32", "fp64")


@dataclass
class MoEConfig:
    num_experts: Optional[int] = None
    """Number of experts in each MoE layer (None: a dense model without MoE layers)."""
    moe_layer_freq: Union[int, List[int]] = 1
    """Which layers are MoE layers: an int N makes every N-th layer (0, N, 2N, ...) an MoE layer; a
    list of 0/1 of length --num-layers marks each layer (1 = MoE), e.g. [1,1,1,0]*2."""
    moe_ffn_hidden_size: Optional[int] = None
    """Hidden size of each routed expert's MLP. Default: --ffn-hidden-size."""
    moe_shared_expert_intermediate_size: Optional[int] = None
    """Hidden size of the shared experts (a dense MLP that every token goes through, added to the
    routed output); the total over all shared experts. None: no shared experts."""
    moe_grouped_gemm: bool = run_setting(False)
    """Run the local experts with one grouped GEMM (torch._grouped_mm where supported, else a loop
    over experts) and store their weights as weight1/weight2 of shape [h, E_local*ffn] and
    [E_local*ffn, h] (Megatron's GroupedMLP)."""
    moe_router_load_balancing_type: str = "aux_loss"
    """Load balancing: aux_loss (Switch/GShard loss over the micro-batch), seq_aux_loss (the same
    per sequence, averaged), sinkhorn (S-BASE balanced assignment) or none."""
    moe_apply_probs_on_input: bool = False
    """Multiply each token by its routing probability before the expert instead of multiplying the
    expert's output (needs --moe-router-topk 1)."""
    moe_layer_recompute: bool = run_setting(False)
    """Recompute the MoE layers (router, dispatch and experts) in the backward pass instead of
    keeping their activations: the same as adding `moe` to --recompute-modules with selective
    recompute (which this flag turns on; with --recompute-granularity full it changes nothing)."""
    moe_router_topk: int = 2
    """Number of experts each token is routed to."""
    moe_router_score_function: str = "softmax"
    """Score function of the router: softmax or sigmoid."""
    moe_router_pre_softmax: bool = False
    """With softmax scores: take the softmax over all experts before the top-k (default: softmax
    over the top-k logits only). With sigmoid scores it changes nothing, as in Megatron (the
    sigmoid is always taken before the top-k), so recipes that pass it with sigmoid run unchanged."""
    moe_router_num_groups: Optional[int] = None
    """Number of expert groups for group-limited (node-limited) routing: each token first picks
    --moe-router-group-topk groups, then its top-k experts inside them."""
    moe_router_group_topk: Optional[int] = None
    """Number of groups each token may use with group-limited routing."""
    moe_router_topk_scaling_factor: Optional[float] = None
    """Multiply the top-k routing probabilities by this factor."""
    moe_router_enable_expert_bias: bool = False
    """Aux-loss-free load balancing (DeepSeek-V3): a per-expert bias added to the scores for the
    expert choice only, moved after each step towards a balanced load (needs sigmoid scores)."""
    moe_router_bias_update_rate: float = 1e-3
    """Step of the expert-bias update: bias += rate * sign(mean load - expert load)."""
    moe_router_dtype: Optional[str] = None
    """dtype of the router logits and scores: fp32 or fp64 (default: the input dtype)."""
    moe_aux_loss_coeff: float = 0.0
    """Coefficient of the load-balancing auxiliary loss (aux_loss / seq_aux_loss)."""
    moe_z_loss_coeff: Optional[float] = None
    """Coefficient of the router z-loss, mean(logsumexp(logits)^2) (None: off)."""
    moe_input_jitter_eps: Optional[float] = None
    """Multiply the router input by uniform noise in [1 - eps, 1 + eps] while training (None: off)."""
    moe_token_dispatcher_type: str = run_setting("allgather")
    """How tokens reach their experts across the expert-parallel ranks: allgather (gather all
    tokens of the tensor x expert parallel group, reduce-scatter back) or alltoall (send each token
    only to the rank of its expert, with uneven all-to-alls)."""
    moe_expert_capacity_factor: Optional[float] = None
    """Expert capacity = ceil(tokens * topk / num_experts * factor); tokens over capacity are
    dropped (None: dropless)."""
    moe_pad_expert_input_to_capacity: bool = False
    """With a capacity factor, give every expert exactly `capacity` rows (padding with
    zero-weight tokens), so the expert shapes are fixed."""
    moe_token_drop_policy: str = "probs"
    """Which tokens an over-full expert drops: probs (keep the highest routing probabilities) or
    position (keep the earliest tokens)."""
    moe_per_layer_logging: bool = run_setting(False)
    """Log the auxiliary losses of every MoE layer, not only their mean over layers."""

    def __post_init__(self) -> None:
        check_moe_flags(self)


def check_moe_flags(c) -> None:
    """Validate the MoE flags of `c` (an MoEConfig, or any config carrying the same fields)."""
    if c.num_experts is None:
        return
    if c.num_experts < 1:
        raise ValueError(f"--num-experts must be >= 1, got {c.num_experts}")
    if getattr(c, "moe_apply_probs_on_input", False) and c.moe_router_topk != 1:
        raise ValueError(f"--moe-apply-probs-on-input scales each token by the probability of its one expert: it "
                         f"needs --moe-router-topk 1 (got {c.moe_router_topk})")
    for name, allowed in (("moe_router_load_balancing_type", LOAD_BALANCING_TYPES),
                          ("moe_router_score_function", SCORE_FUNCTIONS),
                          ("moe_token_dispatcher_type", TOKEN_DISPATCHER_TYPES),
                          ("moe_token_drop_policy", TOKEN_DROP_POLICIES)):
        if getattr(c, name) not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(c, name)!r} is not one of {allowed}")
    if c.moe_router_dtype is not None and c.moe_router_dtype not in ROUTER_DTYPES:
        raise ValueError(f"--moe-router-dtype {c.moe_router_dtype!r} is not one of {ROUTER_DTYPES}")
    if not 1 <= c.moe_router_topk <= c.num_experts:
        raise ValueError(f"--moe-router-topk ({c.moe_router_topk}) must be between 1 and "
                         f"--num-experts ({c.num_experts})")
    _validate_groups(c)
    if c.moe_router_enable_expert_bias and c.moe_router_score_function != "sigmoid":
        raise ValueError("--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid")
    if c.moe_expert_capacity_factor is not None and c.moe_expert_capacity_factor <= 0:
        raise ValueError(f"--moe-expert-capacity-factor must be positive, got {c.moe_expert_capacity_factor}")
    if c.moe_pad_expert_input_to_capacity and c.moe_expert_capacity_factor is None:
        raise ValueError("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")
    if c.moe_router_load_balancing_type == "sinkhorn" and (
            c.moe_router_num_groups is not None or c.moe_router_enable_expert_bias):
        raise ValueError("--moe-router-load-balancing-type sinkhorn cannot be combined with group-limited "
                         "routing or --moe-router-enable-expert-bias")
    if c.moe_aux_loss_coeff < 0:
        raise ValueError(f"--moe-aux-loss-coeff must be >= 0, got {c.moe_aux_loss_coeff}")
    if c.moe_input_jitter_eps is not None and not 0 <= c.moe_input_jitter_eps < 1:
        raise ValueError(f"--moe-input-jitter-eps must be in [0, 1), got {c.moe_input_jitter_eps}")
    if c.moe_router_bias_update_rate < 0:
        raise ValueError(f"--moe-router-bias-update-rate must be >= 0, got {c.moe_router_bias_update_rate}")


def _validate_groups(c: MoEConfig) -> None:
    groups, group_topk = c.moe_router_num_groups, c.moe_router_group_topk
    if groups is None and group_topk is None:
        return
    if groups is None or group_topk is None:
        raise ValueError("group-limited routing needs both --moe-router-num-groups and --moe-router-group-topk")
    if groups < 1 or c.num_experts % groups != 0:
        raise ValueError(f"--num-experts ({c.num_experts}) must be divisible by --moe-router-num-groups ({groups})")
    if not 1 <= group_topk <= groups:
        raise ValueError(f"--moe-router-group-topk ({group_topk}) must be between 1 and --moe-router-num-groups "
                         f"({groups})")
    if c.moe_router_topk % group_topk != 0:
        raise ValueError(f"--moe-router-topk ({c.moe_router_topk}) must be divisible by --moe-router-group-topk "
                         f"({group_topk})")
    if c.moe_router_topk // group_topk > c.num_experts // groups:
        raise ValueError(f"--moe-router-topk / --moe-router-group-topk ({c.moe_router_topk // group_topk}) exceeds "
                         f"the experts per group ({c.num_experts // groups})")


def moe_layer_pattern(moe_config: MoEConfig, num_layers: int) -> List[bool]:
    """For each global layer number, whether it is an MoE layer (all False without experts)."""
    if moe_config.num_experts is None:
        return [False] * num_layers
    freq = moe_config.moe_layer_freq
    if isinstance(freq, int):
        if freq < 1:
            raise ValueError(f"--moe-layer-freq must be >= 1, got {freq}")
        return [i % freq == 0 for i in range(num_layers)]
    pattern = list(freq)
    if len(pattern) != num_layers or any(v not in (0, 1) for v in pattern):
        raise ValueError(f"--moe-layer-freq as a list must hold {num_layers} entries (--num-layers), each 0 or 1; "
                         f"got {pattern}")
    return [bool(v) for v in pattern]


def is_moe_layer(moe_config: Optional[MoEConfig], layer_number: int, num_layers: int) -> bool:
    """Whether global layer `layer_number` (0-based) is an MoE layer."""
    if moe_config is None or moe_config.num_experts is None:
        return False
    return moe_layer_pattern(moe_config, num_layers)[layer_number]


def check_moe_layout(moe_config: MoEConfig, *, tensor_model_parallel_size: int, expert_model_parallel_size: int,
                     expert_tensor_parallel_size: int, sequence_parallel: bool, add_bias_linear: bool,
                     ffn_hidden_size: Optional[int]) -> None:
    """The MoE flags against the model and the expert layout (the one statement of these rules):
    the experts divide over --expert-model-parallel-size, MoE with tensor parallelism needs
    --sequence-parallel, the experts have no biases, and the routed experts' hidden size divides
    over --expert-tensor-parallel-size."""
    num_experts, ep, etp, tp = (moe_config.num_experts, expert_model_parallel_size, expert_tensor_parallel_size,
                                tensor_model_parallel_size)
    if ep < 1 or num_experts % ep != 0:
        raise ValueError(f"--num-experts ({num_experts}) must be divisible by --expert-model-parallel-size ({ep}); "
                         "change one of them.")
    if etp < 1:
        raise ValueError(f"--expert-tensor-parallel-size must be >= 1, got {etp}.")
    if tp > 1 and not sequence_parallel:
        raise ValueError(f"MoE with --tensor-model-parallel-size {tp} needs --sequence-parallel (each tensor-parallel "
                         "rank routes its own part of the sequence); add --sequence-parallel.")
    if add_bias_linear:
        raise ValueError("MoE experts have no biases: pass --disable-bias-linear with --num-experts.")
    ffn = moe_config.moe_ffn_hidden_size or ffn_hidden_size
    if ffn is not None and ffn % etp != 0:
        raise ValueError(f"the expert hidden size (--moe-ffn-hidden-size, default --ffn-hidden-size: {ffn}) must be "
                         f"divisible by --expert-tensor-parallel-size ({etp}).")


def validate_moe(moe_config: MoEConfig, config, groups) -> None:
    """Check the MoE flags against the transformer config and the parallel groups."""
    if moe_config.num_experts is None:
        raise ValueError("an MoE layer needs --num-experts")
    check_moe_layout(moe_config, tensor_model_parallel_size=groups.tp.size, expert_model_parallel_size=groups.ep.size,
                     expert_tensor_parallel_size=groups.expt_tp.size, sequence_parallel=config.sequence_parallel,
                     add_bias_linear=config.add_bias_linear, ffn_hidden_size=config.ffn_hidden_size)
