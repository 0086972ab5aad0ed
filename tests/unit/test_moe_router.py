"""MoE router: top-k scores, load-balancing losses (against their formulas written here, values
and gradients), z-loss, Sinkhorn, aux-loss-free expert bias, group-limited routing, capacity
dropping, and flag validation."""

import math

import pytest
import torch
from torch.testing import assert_close

from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.transformer.config import TransformerConfig
from gigatron.core.transformer.moe.aux_losses import MoEAuxLossTracker
from gigatron.core.transformer.moe.config import MoEConfig, is_moe_layer, moe_layer_pattern
from gigatron.core.transformer.moe.router import (
    TopKRouter,
    apply_capacity,
    expert_capacity,
    group_limited_topk,
    sinkhorn,
    topk_routing,
    update_expert_bias,
)

H, E = 8, 6


def make_config(**kw):
    base = dict(num_layers=2, hidden_size=H, num_attention_heads=2, ffn_hidden_size=16, seq_length=16,
                add_bias_linear=False)
    base.update(kw)
    return TransformerConfig(**base)


def make_router(tracker=None, **moe_kw):
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=E, **moe_kw)
    router = TopKRouter(make_config(), moe, ParallelGroups.single(), layer_number=1, aux_loss_tracker=tracker)
    with torch.no_grad():
        router.weight.normal_(0, 1.0)
    return router


def reference_topk_softmax(logits, k):
    top, idx = logits.topk(k, dim=-1)
    probs = torch.zeros_like(logits).scatter(1, idx, torch.softmax(top, dim=-1))
    return probs, probs > 0


def test_softmax_topk_probs_and_map():
    logits = torch.randn(10, E)
    probs, routing_map = topk_routing(logits, 2)
    ref_probs, ref_map = reference_topk_softmax(logits, 2)
    assert_close(probs, ref_probs)
    assert torch.equal(routing_map, ref_map)
    assert torch.equal(routing_map.sum(1), torch.full((10,), 2))
    # pre-softmax: top-k of the full softmax, not renormalised; then the scaling factor.
    probs, _ = topk_routing(logits, 2, pre_softmax=True, scaling_factor=2.5)
    full = torch.softmax(logits, dim=-1)
    top, idx = full.topk(2, dim=-1)
    assert_close(probs, torch.zeros_like(full).scatter(1, idx, top * 2.5))


def test_sigmoid_topk_normalised_and_expert_bias_only_chooses():
    logits = torch.randn(12, E)
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 10.0])  # forces expert 5 into every choice
    probs, routing_map = topk_routing(logits, 2, score_function="sigmoid", expert_bias=bias)
    assert routing_map[:, 5].all()
    scores = torch.sigmoid(logits)
    chosen = scores * routing_map
    assert_close(probs, chosen / chosen.sum(-1, keepdim=True))  # weights from the unbiased scores


def test_pre_softmax_with_sigmoid_scores_is_accepted_and_changes_nothing():
    """Megatron takes the sigmoid before the top-k whatever --moe-router-pre-softmax says, and its
    DeepSeek-V3 recipe passes the flag with sigmoid scores: accepted, same routing."""
    MoEConfig(num_experts=8, moe_router_topk=2, moe_router_score_function="sigmoid", moe_router_pre_softmax=True)
    logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    plain = topk_routing(logits, 2, score_function="sigmoid")
    pre = topk_routing(logits, 2, score_function="sigmoid", pre_softmax=True)
    assert torch.equal(plain[0], pre[0]) and torch.equal(plain[1], pre[1])


def test_aux_loss_value_and_gradient_match_formula():
    tracker = MoEAuxLossTracker()
    tracker.set_backward_scale(0.25)  # e.g. 4 micro-batches
    coeff, k = 0.1, 2
    router = make_router(tracker, moe_router_topk=k, moe_aux_loss_coeff=coeff)
    x = torch.randn(5, 3, H)
    probs, routing_map = router(x)
    weights = torch.randn(15, E)
    (probs * weights).sum().backward()
    grad = router.weight.grad.clone()

    # Reference: the main term plus scale * E * coeff * sum_e f_e * P_e.
    w = router.weight.detach().clone().requires_grad_(True)
    logits = x.reshape(-1, H) @ w.t()
    ref_probs, ref_map = reference_topk_softmax(logits, k)
    num_tokens = logits.shape[0]
    f = ref_map.sum(0).float() / (num_tokens * k)
    p = torch.softmax(logits, dim=-1).mean(0)
    aux = E * coeff * (f * p).sum()
    ((ref_probs * weights).sum() + 0.25 * aux).backward()
    assert_close(probs.detach(), ref_probs.detach())
    assert_close(grad, w.grad)
    assert tracker.values("load_balancing_loss")[1] == pytest.approx(float(aux.detach()) / coeff, rel=1e-5)


def test_seq_aux_loss_matches_formula():
    tracker = MoEAuxLossTracker()
    coeff, k, s, b = 0.05, 2, 7, 3
    router = make_router(tracker, moe_router_topk=k, moe_aux_loss_coeff=coeff,
                         moe_router_load_balancing_type="seq_aux_loss")
    x = torch.randn(s, b, H)
    probs, _ = router(x)
    probs.sum().backward()
    grad = router.weight.grad.clone()

    w = router.weight.detach().clone().requires_grad_(True)
    logits = (x.reshape(-1, H) @ w.t()).view(s, b, E)
    total = 0.0
    for j in range(b):  # the Switch loss of each sequence, averaged
        seq_logits = logits[:, j]
        seq_probs, seq_map = reference_topk_softmax(seq_logits, k)
        f = seq_map.sum(0).float() / (s * k)
        p = torch.softmax(seq_logits, dim=-1).mean(0)
        total = total + E * coeff * (f * p).sum()
    aux = total / b
    ref_probs, _ = reference_topk_softmax(logits.reshape(-1, E), k)
    (ref_probs.sum() + aux).backward()
    assert_close(grad, w.grad)
    assert tracker.values("seq_load_balancing_loss")[1] == pytest.approx(float(aux.detach()) / coeff, rel=1e-5)


def test_z_loss_matches_formula():
    tracker = MoEAuxLossTracker()
    coeff = 1e-2
    router = make_router(tracker, moe_router_topk=2, moe_z_loss_coeff=coeff,
                         moe_router_load_balancing_type="none")
    x = torch.randn(4, 2, H)
    probs, _ = router(x)
    probs.sum().backward()
    w = router.weight.detach().clone().requires_grad_(True)
    logits = x.reshape(-1, H) @ w.t()
    z = coeff * torch.logsumexp(logits, dim=-1).pow(2).mean()
    ref_probs, _ = reference_topk_softmax(logits, 2)
    (ref_probs.sum() + z).backward()
    assert_close(router.weight.grad, w.grad)
    assert tracker.values("z_loss")[1] == pytest.approx(float(z.detach()) / coeff, rel=1e-5)


def test_no_aux_loss_in_eval_or_without_coeff():
    tracker = MoEAuxLossTracker()
    router = make_router(tracker, moe_aux_loss_coeff=0.0)
    router(torch.randn(3, 2, H))
    assert tracker.names() == []
    router = make_router(tracker, moe_aux_loss_coeff=0.1).eval()
    router(torch.randn(3, 2, H))
    assert tracker.names() == []


def test_sinkhorn_balances():
    torch.manual_seed(1)
    cost = torch.randn(64, 4) + torch.tensor([3.0, 0.0, 0.0, -1.0])  # skewed towards expert 0
    balanced = sinkhorn(cost)
    assert_close(balanced.sum(0) / balanced.sum(), torch.full((4,), 0.25), atol=1e-3, rtol=0)
    assert_close(balanced.sum(1) / balanced.sum(), torch.full((64,), 1 / 64), atol=1e-4, rtol=0)
    plain = torch.bincount(cost.argmax(1), minlength=4)
    fair = torch.bincount(balanced.argmax(1), minlength=4)
    assert fair.max() - fair.min() < plain.max() - plain.min()


def test_sinkhorn_routing_in_router():
    router = make_router(moe_router_topk=1, moe_router_load_balancing_type="sinkhorn")
    x = torch.randn(32, 2, H)
    probs, routing_map = router(x)
    assert torch.equal(routing_map.sum(1), torch.ones(64, dtype=torch.long))
    logits = x.reshape(-1, H) @ router.weight.detach().t()
    assert_close(probs.detach()[routing_map], torch.sigmoid(logits)[routing_map])  # k = 1: sigmoid weight


def test_expert_bias_update_moves_load_toward_balance():
    router = make_router(moe_router_topk=2, moe_router_score_function="sigmoid",
                         moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.05,
                         moe_aux_loss_coeff=0.0, moe_router_load_balancing_type="none")
    with torch.no_grad():
        router.weight[0] += 2.0  # a skewed router: expert 0 favoured
    torch.manual_seed(3)
    x = torch.randn(64, 1, H).abs()

    def imbalance():
        _, routing_map = router(x)
        load = routing_map.sum(0).float()
        return float(load.max() - load.min()), load

    first, load = imbalance()
    assert torch.equal(router.local_tokens_per_expert, load)
    assert update_expert_bias(router, ParallelGroups.single()) == 1
    assert float(router.local_tokens_per_expert.abs().sum()) == 0.0
    expected = 0.05 * torch.sign(load.mean() - load)
    assert_close(router.expert_bias, expected)
    for _ in range(40):
        imbalance()
        update_expert_bias(router, ParallelGroups.single())
    last, _ = imbalance()
    assert last < first / 2
    assert "expert_bias" in router.state_dict() and "local_tokens_per_expert" not in router.state_dict()


def test_group_limited_routing_stays_in_chosen_groups():
    torch.manual_seed(2)
    scores = torch.rand(20, 8)
    num_groups, group_topk, k = 4, 2, 4
    _, idx = group_limited_topk(scores, k, num_groups, group_topk)
    per_group = scores.view(20, num_groups, 2)
    group_score = per_group.topk(k // group_topk, dim=-1).values.sum(-1)
    chosen_groups = group_score.topk(group_topk, dim=-1).indices
    for t in range(20):
        allowed = {int(g) * 2 + j for g in chosen_groups[t] for j in range(2)}
        assert set(idx[t].tolist()) <= allowed
        assert set(idx[t].tolist()) == allowed  # k = group_topk * experts per group: all of them
    # With a smaller k the best experts of the allowed groups are chosen.
    _, idx2 = group_limited_topk(scores, 2, num_groups, 1)
    best_group = (per_group.topk(2, dim=-1).values.sum(-1)).argmax(-1)
    for t in range(20):
        assert {int(i) // 2 for i in idx2[t]} == {int(best_group[t])}


def test_capacity_drop_probs_policy():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7]])
    routing_map = torch.ones(4, 2, dtype=torch.bool)
    new_probs, new_map = apply_capacity(probs, routing_map, capacity=2, drop_policy="probs")
    # Expert 0 keeps tokens 0 (0.9) and 2 (0.8); expert 1 keeps 3 (0.7) and 1 (0.4).
    assert new_map.tolist() == [[True, False], [False, True], [True, False], [False, True]]
    assert_close(new_probs, probs * new_map)


def test_capacity_drop_position_policy_and_padding():
    probs = torch.tensor([[0.9, 0.0], [0.6, 0.0], [0.8, 0.2], [0.0, 0.7], [0.5, 0.0]])
    routing_map = probs > 0
    new_probs, new_map = apply_capacity(probs, routing_map, capacity=2, drop_policy="position")
    # Expert 0 keeps its earliest tokens 0 and 1; expert 1 keeps 2 and 3 (only two routed).
    assert new_map.tolist() == [[True, False], [True, False], [False, True], [False, True], [False, False]]
    assert_close(new_probs, probs * new_map)
    probs2 = torch.tensor([[0.9, 0.0], [0.0, 0.0], [0.8, 0.0], [0.0, 0.7], [0.5, 0.0]])
    padded_probs, padded_map = apply_capacity(probs2, probs2 > 0, capacity=2, drop_policy="probs",
                                              pad_to_capacity=True)
    assert torch.equal(padded_map.sum(0), torch.tensor([2, 2]))  # every expert exactly at capacity
    assert padded_map[0, 0] and padded_map[2, 0] and padded_map[3, 1]
    assert_close(padded_probs, torch.tensor([[0.9, 0.0], [0.0, 0.0], [0.8, 0.0], [0.0, 0.7], [0.0, 0.0]]))


def test_router_capacity_factor():
    router = make_router(moe_router_topk=2, moe_expert_capacity_factor=1.0, moe_aux_loss_coeff=0.0)
    x = torch.randn(10, 2, H)
    probs, routing_map = router(x)
    capacity = expert_capacity(20, E, 2, 1.0)
    assert capacity == math.ceil(20 * 2 / E)
    assert int(routing_map.sum(0).max()) <= capacity
    assert torch.equal(routing_map, probs > 0)


def test_moe_config_validation_and_layer_pattern():
    with pytest.raises(ValueError, match="--moe-router-topk"):
        MoEConfig(num_experts=4, moe_router_topk=5)
    with pytest.raises(ValueError, match="--moe-router-num-groups"):
        MoEConfig(num_experts=6, moe_router_num_groups=4, moe_router_group_topk=1)
    with pytest.raises(ValueError, match="sigmoid"):
        MoEConfig(num_experts=4, moe_router_enable_expert_bias=True)
    with pytest.raises(ValueError, match="--moe-pad-expert-input-to-capacity"):
        MoEConfig(num_experts=4, moe_pad_expert_input_to_capacity=True)
    with pytest.raises(ValueError, match="--moe-token-dispatcher-type"):
        MoEConfig(num_experts=4, moe_token_dispatcher_type="flex")
    assert moe_layer_pattern(MoEConfig(num_experts=4, moe_layer_freq=2), 5) == [True, False, True, False, True]
    assert moe_layer_pattern(MoEConfig(num_experts=4, moe_layer_freq=[0, 1, 1]), 3) == [False, True, True]
    with pytest.raises(ValueError, match="--moe-layer-freq"):
        moe_layer_pattern(MoEConfig(num_experts=4, moe_layer_freq=[0, 1]), 3)
    assert not is_moe_layer(MoEConfig(), 0, 2)
    assert is_moe_layer(MoEConfig(num_experts=2), 1, 2)


def test_router_dtype_and_input_jitter():
    router = make_router(moe_router_dtype="fp64", moe_input_jitter_eps=0.1)
    x = torch.randn(4, 2, H)
    router.eval()
    probs_eval, map_eval = router(x)
    assert probs_eval.dtype == torch.float64
    ref_probs, ref_map = reference_topk_softmax(x.reshape(-1, H).double() @ router.weight.detach().double().t(), 2)
    assert_close(probs_eval, ref_probs)  # no jitter in evaluation
    router.train()
    torch.manual_seed(4)
    probs_train, _ = router(x)
    assert not torch.equal(probs_train.detach(), probs_eval)
    # Jittered logits stay within the input scaling bounds: recompute with the same noise.
    torch.manual_seed(4)
    noise = torch.empty(8, H).uniform_(0.9, 1.1)
    jittered, _ = reference_topk_softmax((x.reshape(-1, H) * noise).double() @ router.weight.detach().double().t(), 2)
    assert_close(probs_train.detach(), jittered)
