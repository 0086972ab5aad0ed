"""Expert parallelism (gloo, CPU): MoE layers at ep=2 (with data parallelism), ep=2 x tp=2 with
sequence parallelism (expert tp = 2, and expert tp = 1 with parallel folding), both token
dispatchers and both expert implementations, against the one-process MoELayer with the same full
weights: outputs, input gradients, every parameter gradient (after the data-parallel reductions)
and the recorded aux losses. Also a rank that receives no tokens at all."""

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from gigatron.core.parallel.config import ParallelConfig
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.parallel.init import initialize_parameters, local_shard
from gigatron.core.transformer.config import TransformerConfig
from gigatron.core.transformer.moe import MoEConfig, MoELayer
from gigatron.core.transformer.moe.aux_losses import MoEAuxLossTracker
from gigatron.core.transformer.moe.experts import SequentialMLP
from gigatron.core.transformer.moe.token_dispatcher import all_gather_uneven, all_to_all_uneven, reduce_scatter_uneven

from .harness import run_distributed

S, B, H, FFN, E, SEED = 8, 2, 16, 24, 4, 1234


def make_configs(tp, sp, case):
    config = TransformerConfig(num_layers=2, hidden_size=H, num_attention_heads=2, ffn_hidden_size=32,
                               seq_length=S, add_bias_linear=False, swiglu=True,
                               tensor_model_parallel_size=tp, sequence_parallel=sp, use_cpu_initialization=True)
    moe = MoEConfig(num_experts=E, moe_router_topk=2, moe_ffn_hidden_size=FFN,
                    moe_grouped_gemm=case["grouped"], moe_token_dispatcher_type=case["dispatcher"],
                    moe_shared_expert_intermediate_size=case.get("shared"),
                    moe_aux_loss_coeff=case.get("aux", 0.0), moe_z_loss_coeff=case.get("z"),
                    moe_router_load_balancing_type=case.get("balancing", "aux_loss"),
                    moe_expert_capacity_factor=case.get("capacity"),
                    moe_pad_expert_input_to_capacity=case.get("pad", False))
    return config, moe


def expert_pair(experts, j, grad=False):
    """(fc1 [fo(/t), h], fc2 [h, f(/t)]) of local expert j, weights or gradients."""
    if isinstance(experts, SequentialMLP):
        e = experts.local_experts[j]
        a, b = e.linear_fc1.weight, e.linear_fc2.weight
        return (a.grad, b.grad) if grad else (a, b)
    g = experts.num_local_experts
    w1 = experts.weight1.grad if grad else experts.weight1
    w2 = experts.weight2.grad if grad else experts.weight2
    return w1.view(g, experts.hidden, -1)[j].t(), w2.view(g, -1, experts.hidden)[j].t()


def scale_weights(layer):
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(20.0)  # outputs of order one instead of the 0.02 init's


def skew_router(layer):
    """Route every token to experts 0 and 1 (those of expert-parallel rank 0): feature 0 of the
    inputs is 1, and the router's weight gives experts 2 and 3 a large negative logit there."""
    with torch.no_grad():
        layer.router.weight[2:, 0] = -100.0
        layer.router.weight[:2, 0] = 5.0


def make_inputs(num_replicas, skew):
    gen = torch.Generator().manual_seed(99)
    xs = [torch.randn(S, B, H, generator=gen) for _ in range(num_replicas)]
    if skew:
        for x in xs:
            x[..., 0] = 1.0
    grads = [torch.randn(S, B, H, generator=gen) for _ in range(num_replicas)]
    return xs, grads


def moe_worker(rank, world_size, tp, ep, etp, cases, compare_dispatchers=False):
    pconfig = ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                             expert_tensor_parallel_size=etp, sequence_parallel=tp > 1, distributed_backend="gloo")
    groups = ParallelGroups.build(pconfig)
    checked = [check_case(groups, tp, ep, case) for case in cases]
    if compare_dispatchers:
        check_alltoall_equals_allgather(groups, tp)
    return checked


def check_case(groups, tp, ep, case):
    sp = tp > 1
    config, moe = make_configs(tp, sp, case)
    tracker = MoEAuxLossTracker()
    layer = MoELayer(config, moe, groups, layer_number=1, aux_loss_tracker=tracker)
    initialize_parameters(layer, SEED, device="cpu")
    scale_weights(layer)

    ref_config, _ = make_configs(1, False, case)
    ref_tracker = MoEAuxLossTracker()
    ref = MoELayer(ref_config, moe, ParallelGroups.single(), layer_number=1, aux_loss_tracker=ref_tracker)
    initialize_parameters(ref, SEED, device="cpu")
    scale_weights(ref)
    if case.get("skew"):
        skew_router(layer)
        skew_router(ref)

    # The parallel layer's weights are this rank's pieces of the one-process layer's.
    etp_rank, etp_size = groups.expt_tp.rank, groups.expt_tp.size
    g_local = E // ep
    first = groups.ep.rank * g_local
    for j in range(g_local):
        full1, full2 = expert_pair(ref.experts, first + j)
        mine1, mine2 = expert_pair(layer.experts, j)
        assert torch.equal(mine1, local_shard(full1, 0, 2, etp_rank, etp_size))
        assert torch.equal(mine2, local_shard(full2, 1, 1, etp_rank, etp_size))
    assert torch.equal(layer.router.weight, ref.router.weight)

    dp_size, dp_rank, tp_rank = groups.dp.size, groups.dp.rank, groups.tp.rank
    xs, grads = make_inputs(dp_size, case.get("skew", False))
    # One-process reference: every data-parallel replica's micro-batch, losses summed.
    ref_outs, ref_x = [], []
    for x, g in zip(xs, grads):
        x = x.clone().requires_grad_(True)
        out, _ = ref(x)
        out.backward(g)
        ref_outs.append(out.detach())
        ref_x.append(x.grad)

    if case.get("skew"):
        for x_replica in xs:  # the premise: no token is routed to expert-parallel rank 1's experts
            _, routing_map = ref.router(x_replica)
            assert routing_map[:, 0:2].all() and not routing_map[:, 2:].any()

    s_local = S // tp
    piece = slice(tp_rank * s_local, (tp_rank + 1) * s_local)
    x = xs[dp_rank][piece].clone().requires_grad_(True)
    out, bias = layer(x)
    assert bias is None
    out.backward(grads[dp_rank][piece])
    tol = dict(rtol=1e-5, atol=1e-5)
    assert_close(out, ref_outs[dp_rank][piece], **tol)
    assert_close(x.grad, ref_x[dp_rank][piece], **tol)

    # Gradient reductions of training: router (sequence-parallel and replicated) over everything,
    # shared experts over dp, experts over the expert data-parallel group.
    router_grad = layer.router.weight.grad.clone()
    dist.all_reduce(router_grad)
    assert_close(router_grad, ref.router.weight.grad, **tol)
    if layer.shared_experts is not None:
        for name, dim, stride in (("linear_fc1", 0, 2), ("linear_fc2", 1, 1)):
            grad = getattr(layer.shared_experts, name).weight.grad.clone()
            if groups.dp.group is not None:
                dist.all_reduce(grad, group=groups.dp.group)
            full = getattr(ref.shared_experts, name).weight.grad
            assert_close(grad, local_shard(full, dim, stride, tp_rank, tp), **tol)
    for j in range(g_local):
        full1, full2 = expert_pair(ref.experts, first + j, grad=True)
        mine1, mine2 = (t.clone() for t in expert_pair(layer.experts, j, grad=True))
        if groups.expt_dp.group is not None:
            dist.all_reduce(mine1, group=groups.expt_dp.group)
            dist.all_reduce(mine2, group=groups.expt_dp.group)
        assert_close(mine1, local_shard(full1, 0, 2, etp_rank, etp_size), **tol)
        assert_close(mine2, local_shard(full2, 1, 1, etp_rank, etp_size), **tol)

    # Recorded aux losses: summed over the sequence split, averaged over data-parallel replicas.
    reduced = tracker.reduce(groups, num_layers=2)
    for name in ref_tracker.names():
        assert_close(reduced[name][1], torch.tensor(ref_tracker.values(name)[1] / dp_size), rtol=1e-5, atol=1e-6)
    return case


# Layout (world, tp, ep, etp) -> the cases run on it (one set of processes per layout).
LAYOUTS = {
    # ep=2 over the data-parallel ranks: dense dp=2, expert dp=1.
    "ep2": ((2, 1, 2, None), [
        dict(grouped=False, dispatcher="alltoall", aux=0.01, z=1e-3),
        dict(grouped=True, dispatcher="allgather", aux=0.01),
        dict(grouped=True, dispatcher="alltoall", capacity=1.0, pad=True),
        dict(grouped=True, dispatcher="alltoall", skew=True),  # rank 1 receives no tokens
        dict(grouped=False, dispatcher="allgather", skew=True),
    ]),
    # tp=2 with sequence parallelism, ep=2, expert tp=2: dense dp=2, expert dp=1.
    "tp2-sp-ep2-etp2": ((4, 2, 2, 2), [
        dict(grouped=False, dispatcher="alltoall", shared=8, aux=0.01, z=1e-3),
        dict(grouped=True, dispatcher="allgather", shared=8, aux=0.01, balancing="seq_aux_loss"),
        dict(grouped=False, dispatcher="alltoall", skew=True),
    ]),
    # Parallel folding: tp=2 with sequence parallelism for the dense part, experts at etp=1, ep=2,
    # expert dp=2.
    "tp2-sp-ep2-etp1": ((4, 2, 2, 1), [
        dict(grouped=True, dispatcher="alltoall", aux=0.01),
        dict(grouped=False, dispatcher="allgather"),
    ]),
    # ep=2 x expert dp=2 (dense dp=4).
    "dp4-ep2": ((4, 1, 2, None), [
        dict(grouped=False, dispatcher="alltoall", aux=0.01),
    ]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_moe_parallel_equals_single_process(name):
    (world, tp, ep, etp), cases = LAYOUTS[name]
    # On the tp2 x ep2 layout also compare the two dispatchers with each other directly.
    compare = name == "tp2-sp-ep2-etp2"
    results = run_distributed(moe_worker, world, tp, ep, etp, cases, compare, timeout=120)
    assert results == [cases] * world


def check_alltoall_equals_allgather(groups, tp):
    """alltoall and allgather give the same outputs and gradients on the same layout."""
    results = []
    for dispatcher in ("alltoall", "allgather"):
        config, moe = make_configs(tp, tp > 1, dict(grouped=True, dispatcher=dispatcher, aux=0.01))
        layer = MoELayer(config, moe, groups, 1, aux_loss_tracker=MoEAuxLossTracker())
        initialize_parameters(layer, SEED, device="cpu")
        scale_weights(layer)
        xs, grads = make_inputs(groups.dp.size, False)
        piece = slice(groups.tp.rank * S // tp, (groups.tp.rank + 1) * S // tp)
        x = xs[groups.dp.rank][piece].clone().requires_grad_(True)
        out, _ = layer(x)
        out.backward(grads[groups.dp.rank][piece])
        results.append((out.detach(), x.grad, [p.grad.clone() for p in layer.parameters()]))
    (o1, x1, g1), (o2, x2, g2) = results
    assert_close(o1, o2, rtol=1e-5, atol=1e-5)
    assert_close(x1, x2, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        assert_close(a, b, rtol=1e-5, atol=1e-5)


def uneven_collectives_worker(rank, world_size):
    """all_to_all_uneven / all_gather_uneven / reduce_scatter_uneven against their definitions,
    with empty pieces, forward and backward."""
    from gigatron.core.parallel.groups import Group
    group = Group(group=dist.group.WORLD, size=world_size, rank=rank, ranks=list(range(world_size)))
    # Rank r sends (r + i) % 3 rows to rank i; row values encode (source, destination, index).
    send = [(rank + i) % 3 for i in range(world_size)]
    recv = [(i + rank) % 3 for i in range(world_size)]
    rows = torch.cat([torch.tensor([[100.0 * rank + 10 * i + k] for k in range(n)]) if n else torch.zeros(0, 1)
                      for i, n in enumerate(send)])
    x = rows.clone().requires_grad_(True)
    out = all_to_all_uneven(x, group, recv, send)
    expected = torch.cat([torch.tensor([[100.0 * i + 10 * rank + k] for k in range(n)]) if n else torch.zeros(0, 1)
                          for i, n in enumerate(recv)])
    assert torch.equal(out, expected)
    (out * (rank + 1)).sum().backward()
    # Each row's gradient is the factor of the rank it went to.
    assert torch.equal(x.grad.view(-1), torch.cat([torch.full((n,), float(i + 1)) for i, n in enumerate(send)]))

    sizes = [r % 2 for r in range(world_size)]  # ranks 0, 2 have no rows
    mine = torch.full((sizes[rank], 2), float(rank + 1), requires_grad=True)
    gathered = all_gather_uneven(mine, group, sizes)
    assert torch.equal(gathered, torch.cat([torch.full((n, 2), float(r + 1)) for r, n in enumerate(sizes)]))
    gathered.sum().backward()
    assert torch.equal(mine.grad, torch.full((sizes[rank], 2), float(world_size)))
    y = torch.arange(sum(sizes) * 2, dtype=torch.float32).view(-1, 2).requires_grad_(True)
    part = reduce_scatter_uneven(y, group, sizes)
    start = sum(sizes[:rank])
    assert torch.equal(part, world_size * y.detach()[start:start + sizes[rank]])
    return True


def test_uneven_collectives():
    assert run_distributed(uneven_collectives_worker, 4) == [True] * 4


def tracker_pipeline_worker(rank, world_size):
    """Aux-loss logging under pipelining: the stage without MoE layers records nothing, yet takes
    part in the reduction with the same names; layers of both stages land in one tensor."""
    from gigatron.core.transformer.moe.aux_losses import aux_loss_names

    groups = ParallelGroups.build(ParallelConfig(pipeline_model_parallel_size=2, distributed_backend="gloo"))
    tracker = MoEAuxLossTracker()
    moe = MoEConfig(num_experts=4, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=1e-3)
    if groups.pp.rank == 1:
        tracker.record("load_balancing_loss", 3, torch.tensor(2.0))
        tracker.record("z_loss", 3, torch.tensor(5.0))
    reduced = tracker.reduce(groups, num_layers=4, names=aux_loss_names(moe), device=torch.device("cpu"))
    assert reduced["load_balancing_loss"].tolist() == [0.0, 0.0, 0.0, 2.0]
    assert reduced["z_loss"].tolist() == [0.0, 0.0, 0.0, 5.0]
    return tracker.summary(reduced, num_microbatches=2, moe_layers=[1, 3], per_layer_logging=True)


def test_aux_loss_tracker_under_pipelining():
    results = run_distributed(tracker_pipeline_worker, 2)
    assert results[0] == results[1]
    assert results[0]["load_balancing_loss"] == 0.5 and results[0]["z_loss layer_3"] == 2.5
