"""MoE layer: grouped GEMM equals the loop, GroupedMLP equals SequentialMLP (forward and
gradients), MoELayer equals a naive dense computation (every token through its top-k experts,
weighted, plus the shared expert), with and without capacity dropping; aux-loss tracker summary."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.parallel.init import initialize_parameters
from gigatron.core.transformer.config import TransformerConfig
from gigatron.core.transformer.moe import MoEConfig, MoELayer
from gigatron.core.transformer.moe.aux_losses import MoEAuxLossTracker
from gigatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP, is_expert_parallel
from gigatron.core.transformer.moe.grouped_gemm import grouped_mm, reference_grouped_mm

H, FFN, E = 16, 24, 4


def make_config(swiglu=True, **kw):
    return TransformerConfig(num_layers=2, hidden_size=H, num_attention_heads=2, ffn_hidden_size=32,
                             seq_length=16, add_bias_linear=False, swiglu=swiglu, **kw)


def expert_weights(experts, j):
    """(fc1 [fo, h], fc2 [h, f]) of local expert j, whatever the implementation."""
    if isinstance(experts, SequentialMLP):
        e = experts.local_experts[j]
        return e.linear_fc1.weight, e.linear_fc2.weight
    w1, w2 = experts.expert_weights()
    return w1[j].t(), w2[j].t()


def expert_grads(experts, j):
    if isinstance(experts, SequentialMLP):
        e = experts.local_experts[j]
        return e.linear_fc1.weight.grad, e.linear_fc2.weight.grad
    g = experts.num_local_experts
    g1 = experts.weight1.grad.view(g, experts.hidden, -1)
    g2 = experts.weight2.grad.view(g, -1, experts.hidden)
    return g1[j].t(), g2[j].t()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_kernel_matches_loop(dtype):
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1])
    x = torch.randn(9, 8, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 8, 16, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(9, 16, dtype=dtype)
    out = grouped_mm(x, w, counts, use_kernel=True)
    out.sum().backward()  # an expanded gradient must work too
    x.grad = None
    w.grad = None
    out = grouped_mm(x, w, counts, use_kernel=True)
    out.backward(grad_out)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = None
    w.grad = None
    ref = reference_grouped_mm(x, w, counts)
    ref.backward(grad_out)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    assert_close(out, ref, **tol)
    assert_close(gx, x.grad, **tol)
    assert_close(gw, w.grad, **tol)
    assert float(gw[1].abs().sum()) == 0.0  # an empty group gets no gradient
    empty = grouped_mm(torch.zeros(0, 8, dtype=dtype), w.detach(), torch.zeros(4, dtype=torch.long))
    assert empty.shape == (0, 16)


def test_grouped_mm_rejects_bad_shapes():
    with pytest.raises(ValueError, match="group sizes"):
        grouped_mm(torch.randn(3, 8), torch.randn(2, 8, 4), torch.tensor([3]))
    with pytest.raises(ValueError, match="sums to"):
        reference_grouped_mm(torch.randn(3, 8), torch.randn(2, 8, 4), torch.tensor([1, 1]))


@pytest.mark.parametrize("swiglu", [True, False])
def test_grouped_equals_sequential(swiglu):
    config = make_config(swiglu=swiglu)
    groups = ParallelGroups.single()
    seq = SequentialMLP(config, MoEConfig(num_experts=E, moe_ffn_hidden_size=FFN), groups, 0)
    grp = GroupedMLP(config, MoEConfig(num_experts=E, moe_ffn_hidden_size=FFN, moe_grouped_gemm=True), groups, 0)
    initialize_parameters(seq, 7)
    initialize_parameters(grp, 7)
    for j in range(E):  # the same seed gives the same experts in both layouts
        for a, b in zip(expert_weights(seq, j), expert_weights(grp, j)):
            assert torch.equal(a, b)
    assert all(is_expert_parallel(p) for p in grp.parameters())
    counts = torch.tensor([4, 0, 7, 2])
    rows = torch.randn(13, H)
    grad_out = torch.randn(13, H)
    outs = []
    for experts in (seq, grp):
        x = rows.clone().requires_grad_(True)
        out = experts(x, counts)
        out.backward(grad_out)
        outs.append((out, x.grad))
    assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-6)
    for j in range(E):
        for a, b in zip(expert_grads(seq, j), expert_grads(grp, j)):
            assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Reference for one expert by hand.
    w1, w2 = expert_weights(seq, 2)
    act = (lambda t: F.silu(t.chunk(2, -1)[0]) * t.chunk(2, -1)[1]) if swiglu else F.gelu
    assert_close(outs[0][0][4:11], act(rows[4:11] @ w1.t()) @ w2.t(), rtol=1e-5, atol=1e-6)


def naive_moe(layer, x, config):
    """Every token through each of its routed experts, weighted by its routing probability."""
    s, b, h = x.shape
    probs, routing_map = layer.router(x)
    tokens = x.reshape(-1, h)
    out = torch.zeros_like(tokens)
    act = (lambda t: F.silu(t.chunk(2, -1)[0]) * t.chunk(2, -1)[1]) if config.swiglu else F.gelu
    for t in range(tokens.shape[0]):
        for e in range(layer.moe_config.num_experts):
            if routing_map[t, e]:
                w1, w2 = expert_weights(layer.experts, e)
                out[t] = out[t] + probs[t, e] * (act(tokens[t] @ w1.t()) @ w2.t())
    out = out.view(s, b, h)
    if layer.shared_experts is not None:
        out = out + layer.shared_experts(x)
    return out, probs, routing_map


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
@pytest.mark.parametrize("capacity", [None, 0.75])
def test_moe_layer_equals_naive(grouped, dispatcher, capacity):
    config = make_config()
    tracker = MoEAuxLossTracker()
    moe = MoEConfig(num_experts=E, moe_router_topk=2, moe_ffn_hidden_size=FFN, moe_grouped_gemm=grouped,
                    moe_token_dispatcher_type=dispatcher, moe_shared_expert_intermediate_size=8,
                    moe_aux_loss_coeff=0.01, moe_z_loss_coeff=1e-3, moe_expert_capacity_factor=capacity)
    layer = MoELayer(config, moe, ParallelGroups.single(), layer_number=1, aux_loss_tracker=tracker)
    initialize_parameters(layer, 11)
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(20.0)  # larger weights than the 0.02 init: outputs of order one
    torch.manual_seed(5)
    x = torch.randn(6, 3, H, requires_grad=True)
    grad_out = torch.randn(6, 3, H)
    out, bias = layer(x)
    assert bias is None and out.shape == x.shape
    out.backward(grad_out)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    x_grad = x.grad.clone()
    layer.zero_grad()
    x.grad = None
    ref, probs, routing_map = naive_moe(layer, x, config)
    if capacity is not None:
        assert int(routing_map.sum(0).max()) <= 7  # capacity ceil(18 * 2 / 4 * 0.75) = 7
        assert int(routing_map.sum()) < 36  # some of the 18 * 2 token copies were dropped
    ref.backward(grad_out)
    assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert_close(x_grad, x.grad, rtol=1e-5, atol=1e-5)
    for n, p in layer.named_parameters():
        assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-5, msg=n)
    assert set(tracker.names()) == {"load_balancing_loss", "z_loss"}


def test_moe_layer_validation():
    groups = ParallelGroups.single()
    with pytest.raises(ValueError, match="--disable-bias-linear"):
        MoELayer(TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=2, seq_length=8),
                 MoEConfig(num_experts=2), groups, 0)
    with pytest.raises(ValueError, match="--num-experts"):
        MoELayer(make_config(), MoEConfig(), groups, 0)


def test_tracker_summary_single_process():
    tracker = MoEAuxLossTracker()
    tracker.record("load_balancing_loss", 0, torch.tensor(1.0))
    tracker.record("load_balancing_loss", 0, torch.tensor(3.0))  # a second micro-batch
    tracker.record("load_balancing_loss", 2, torch.tensor(6.0))
    reduced = tracker.reduce(ParallelGroups.single(), num_layers=3)
    assert reduced["load_balancing_loss"].tolist() == [4.0, 0.0, 6.0]
    summary = tracker.summary(reduced, num_microbatches=2, moe_layers=[0, 2], per_layer_logging=True)
    assert summary == {"load_balancing_loss": 2.5, "load_balancing_loss layer_0": 2.0,
                       "load_balancing_loss layer_2": 3.0}
    tracker.clear()
    assert tracker.names() == []


@pytest.mark.gpu
def test_grouped_mm_cuda_bf16_matches_loop():
    torch.manual_seed(0)
    counts = torch.tensor([100, 0, 37, 891])
    x = torch.randn(1028, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4, 256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(1028, 512, device="cuda", dtype=torch.bfloat16)
    out = grouped_mm(x, w, counts, use_kernel=True)
    out.backward(grad_out)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = reference_grouped_mm(x, w, counts)
    ref.backward(grad_out)
    assert_close(out.float(), ref.float(), rtol=2e-2, atol=5e-1)
    assert_close(gx.float(), x.grad.float(), rtol=2e-2, atol=5e-1)
    assert_close(gw.float(), w.grad.float(), rtol=2e-2, atol=5e-1)


def test_moe_layer_under_recompute_records_once():
    from gigatron.core.parallel.random import checkpoint

    config = make_config()
    results = []
    for recompute in (False, True):
        tracker = MoEAuxLossTracker()
        moe = MoEConfig(num_experts=E, moe_ffn_hidden_size=FFN, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01,
                        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                        moe_router_load_balancing_type="aux_loss")
        layer = MoELayer(config, moe, ParallelGroups.single(), 0, aux_loss_tracker=tracker)
        initialize_parameters(layer, 3)
        scale = torch.randn(5, 2, H, generator=torch.Generator().manual_seed(1))
        x = torch.randn(5, 2, H, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        if recompute:
            out = checkpoint(lambda t: layer(t)[0], False, x)
        else:
            out = layer(x)[0]
        (out * scale).sum().backward()
        results.append(([p.grad.clone() for p in layer.parameters()], x.grad.clone(),
                        tracker.values("load_balancing_loss"), layer.router.local_tokens_per_expert.clone()))
    (g0, x0, v0, c0), (g1, x1, v1, c1) = results
    for a, b in zip(g0, g1):
        assert_close(a, b)
    assert_close(x0, x1)
    assert v0 == v1  # recorded once, not once per pass
    assert torch.equal(c0, c1) and int(c0.sum()) == 5 * 2 * 2


@pytest.mark.gpu
def test_moe_layer_cuda_bf16_grouped_equals_sequential():
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=2, ffn_hidden_size=128,
                               seq_length=32, add_bias_linear=False, swiglu=True, bf16=True)
    torch.manual_seed(0)
    x = torch.randn(32, 2, 64, device="cuda", dtype=torch.bfloat16)
    outs = []
    for grouped in (False, True):
        moe = MoEConfig(num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=64, moe_grouped_gemm=grouped,
                        moe_token_dispatcher_type="alltoall")
        layer = MoELayer(config, moe, ParallelGroups.single(), 0, aux_loss_tracker=MoEAuxLossTracker())
        initialize_parameters(layer, 5, device="cpu")
        inp = x.clone().requires_grad_(True)
        out, _ = layer(inp)
        out.float().square().sum().backward()
        outs.append((out.float(), inp.grad.float()))
    assert_close(outs[0][0], outs[1][0], rtol=2e-2, atol=2e-3)
    assert_close(outs[0][1], outs[1][1], rtol=2e-2, atol=2e-3)


def test_topk_permutation_equals_nonzero_permutation_forward_and_backward():
    """The gather-only permutation of dropless top-k routing gives the rows, the combination and
    the gradients of the nonzero/index_add reference."""
    from gigatron.core.transformer.moe.token_dispatcher import TopKPermutation, permute, unpermute

    torch.manual_seed(0)
    T, E, k, h = 37, 6, 2, 8
    logits = torch.randn(T, E)
    top = logits.topk(k, dim=1).indices
    routing_map = torch.zeros(T, E, dtype=torch.bool).scatter(1, top, True)
    probs = torch.softmax(logits, dim=1) * routing_map
    w_expert = torch.randn(E, h)  # a stand-in "expert": scale each row by its expert's vector

    def run(fast):
        tokens = torch.randn(T, h, generator=torch.Generator().manual_seed(1)).requires_grad_()
        p = probs.clone().requires_grad_()
        if fast:
            perm = TopKPermutation(routing_map, k)
            rows, counts = perm.permute(tokens), perm.tokens_per_expert
            expert_of_row = torch.repeat_interleave(torch.arange(E), counts)
            out = perm.unpermute(rows * w_expert[expert_of_row], p)
        else:
            rows, token_index, expert_index, counts = permute(tokens, routing_map)
            out = unpermute(rows * w_expert[expert_index], p, token_index, expert_index, T)
        out.backward(torch.ones_like(out))
        return rows.detach(), out.detach(), tokens.grad, p.grad

    fast, reference = run(True), run(False)
    for a, b in zip(fast, reference):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
