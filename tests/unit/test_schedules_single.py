"""Schedules in one process: no pipelining equals one big batch, and the pipeline plans are sound.

The plan checks need no processes: every rank's plan is built, the messages they imply are
matched across ranks (each send has exactly one receive, carrying the right micro-batch and
chunk), and their blocking exchanges are simulated message by message to show they cannot
deadlock, for many pipeline sizes, chunk counts, group sizes and micro-batch counts.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gigatron.core.parallel.groups import Group
from gigatron.core.pipeline import (
    P2PCommunicator,
    PipelinePlan,
    PlanStep,
    build_1f1b_plan,
    build_interleaved_plan,
    check_interleaved_num_microbatches,
    deallocate_output_tensor,
    forward_backward_no_pipelining,
    forward_backward_pipelining_with_interleaving,
    forward_backward_pipelining_without_interleaving,
    get_forward_backward_func,
    pipeline_tensor_shape,
)


# ====================================================================== a tiny model


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(5)
        self.fc1 = nn.Linear(3, 6)
        self.fc2 = nn.Linear(6, 1)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator))

    def forward(self, x):  # x [s, b, 3] -> [s, b, 1]
        return self.fc2(torch.tanh(self.fc1(x)))


class SyncRecorder(nn.Module):
    """Stand-in for the data-parallel wrapper: records whether reduction was enabled per forward
    and per gradient accumulation."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.sync_enabled = True
        self.forward_sync, self.grad_sync = [], []
        for param in module.parameters():
            param.register_post_accumulate_grad_hook(lambda _p: self.grad_sync.append(self.sync_enabled))

    @contextlib.contextmanager
    def no_sync(self):
        self.sync_enabled = False
        try:
            yield
        finally:
            self.sync_enabled = True

    def forward(self, x):
        self.forward_sync.append(self.sync_enabled)
        return self.module(x)


def _batches(count, batch=2, seq=4):
    generator = torch.Generator().manual_seed(11)
    return [(torch.randn(seq, batch, 3, generator=generator), torch.randn(seq, batch, 1, generator=generator))
            for _ in range(count)]


def _forward_step(data_iterator, model):
    x, target = next(data_iterator)
    output = model(x)

    def loss_func(output_tensor):
        loss = ((output_tensor - target) ** 2).mean()
        return loss, {"lm loss": torch.stack([loss.detach() * target.numel(), torch.tensor(float(target.numel()))])}

    return output, loss_func


def _run_no_pipelining(model, batches, **kwargs):
    return forward_backward_no_pipelining(
        forward_step_func=_forward_step, data_iterator=iter(batches), model=model,
        num_microbatches=len(batches), seq_length=4, micro_batch_size=2,
        groups=None, config=SimpleNamespace(hidden_size=6), **kwargs)


# ====================================================================== no pipelining


def test_gradient_accumulation_equals_one_big_batch():
    batches = _batches(4)
    accumulated = Tiny()
    logs = _run_no_pipelining(accumulated, batches)

    big = Tiny()
    x = torch.cat([b[0] for b in batches], dim=1)        # [s, 4 * b, 3]
    target = torch.cat([b[1] for b in batches], dim=1)   # [s, 4 * b, 1]
    ((big(x) - target) ** 2).mean().backward()

    for (name, got), (_, want) in zip(accumulated.named_parameters(), big.named_parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=1e-6, msg=name)
    assert len(logs) == 4
    for log, (x_mb, target_mb) in zip(logs, batches):
        want = ((Tiny()(x_mb) - target_mb) ** 2).mean()
        torch.testing.assert_close(log["lm loss"][0] / log["lm loss"][1], want.detach())


def test_grad_scale_finalize_and_no_sync_release():
    batches = _batches(3)
    reference = Tiny()
    _run_no_pipelining(reference, batches)

    model = SyncRecorder(Tiny())
    finalize_calls = []
    _run_no_pipelining(model, batches, grad_scale_func=lambda loss: loss * 1024.0,
                       finalize_model_grads_func=finalize_calls.append)
    for (name, got), (_, want) in zip(model.module.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(got.grad, want.grad * 1024.0, rtol=1e-6, atol=1e-6, msg=name)
    assert finalize_calls == [[model]]
    # reduction held back for the first two micro-batches, enabled for the last forward and backward
    assert model.forward_sync == [False, False, True]
    num_params = len(list(model.parameters()))
    assert model.grad_sync == [False] * (2 * num_params) + [True] * num_params
    assert model.sync_enabled


def test_forward_only_computes_no_gradients():
    model = SyncRecorder(Tiny())
    finalize_calls = []
    logs = _run_no_pipelining(model, _batches(2), forward_only=True, finalize_model_grads_func=finalize_calls.append)
    assert len(logs) == 2
    assert all(param.grad is None for param in model.parameters())
    assert finalize_calls == []
    assert model.forward_sync == [True, True]


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="num_microbatches"):
        forward_backward_no_pipelining(forward_step_func=_forward_step, data_iterator=iter([]), model=Tiny(),
                                       num_microbatches=0)
    with pytest.raises(ValueError, match="one model chunk"):
        _run_no_pipelining([Tiny(), Tiny()], _batches(1))

    def vector_loss(data_iterator, model):
        x, target = next(data_iterator)
        return model(x), lambda out: ((out - target) ** 2, {})

    with pytest.raises(ValueError, match="one-element loss"):
        forward_backward_no_pipelining(forward_step_func=vector_loss, data_iterator=iter(_batches(1)),
                                       model=Tiny(), num_microbatches=1)
    with pytest.raises(TypeError, match=r"\(output_tensor, loss_func\)"):
        forward_backward_no_pipelining(forward_step_func=lambda it, m: m(next(it)[0]),
                                       data_iterator=iter(_batches(1)), model=Tiny(), num_microbatches=1)


# ====================================================================== dispatcher and checks


def test_dispatcher():
    assert get_forward_backward_func(1, None) is forward_backward_no_pipelining
    assert get_forward_backward_func(1, 1) is forward_backward_no_pipelining
    assert get_forward_backward_func(4, None) is forward_backward_pipelining_without_interleaving
    assert get_forward_backward_func(4, 1) is forward_backward_pipelining_without_interleaving
    assert get_forward_backward_func(4, 2) is forward_backward_pipelining_with_interleaving
    with pytest.raises(ValueError, match="pipeline-model-parallel-size > 1"):
        get_forward_backward_func(1, 2)


def test_interleaved_microbatch_constraints():
    for count, pp_size, group in [(4, 4, 4), (8, 4, 4), (9, 4, 5), (5, 2, 3), (6, 2, 2)]:
        check_interleaved_num_microbatches(count, pp_size, group)
    with pytest.raises(ValueError, match=r"group size per virtual stage \(2\) must lie between"):
        check_interleaved_num_microbatches(8, 4, 2)    # group smaller than pp
    with pytest.raises(ValueError, match=r"number of micro-batches \(3\)"):
        check_interleaved_num_microbatches(3, 4, 4)    # fewer micro-batches than pp
    with pytest.raises(ValueError, match="last group of 1, fewer than --pipeline-model-parallel-size"):
        check_interleaved_num_microbatches(5, 4, 4)
    with pytest.raises(ValueError, match="last group of 2"):
        check_interleaved_num_microbatches(10, 4, 4)


def test_pipeline_tensor_shape():
    config = SimpleNamespace(hidden_size=16, sequence_parallel=True)
    groups = SimpleNamespace(tp=Group(size=2, rank=0, ranks=[0, 1]), cp=Group(size=2, rank=0, ranks=[0, 2]))
    assert pipeline_tensor_shape(32, 3, config, groups) == (8, 3, 16)
    assert pipeline_tensor_shape(32, 3, SimpleNamespace(hidden_size=16), groups) == (16, 3, 16)
    with pytest.raises(ValueError, match="context-parallel size"):
        pipeline_tensor_shape(31, 1, config, groups)
    with pytest.raises(ValueError, match="--sequence-parallel"):
        pipeline_tensor_shape(6, 1, config, groups)


def test_one_stage_communicator_is_a_no_op():
    comm = P2PCommunicator(Group.single(), SimpleNamespace())
    assert comm.is_first_stage and comm.is_last_stage
    assert comm.recv_forward((1, 1, 1)) is None and comm.recv_backward((1, 1, 1)) is None
    comm.send_forward(torch.zeros(1, 1, 1))
    comm.send_backward(torch.zeros(1, 1, 1))
    with pytest.raises(RuntimeError, match="one-stage pipeline"):
        comm.exchange(recv_prev=True, tensor_shape=(1, 1, 1))


def test_deallocate_output_tensor_keeps_the_graph():
    weight = torch.randn(5, 5, requires_grad=True)
    x = torch.randn(3, 5)
    out = torch.tanh(x @ weight)               # tanh keeps its output for backward
    expected = torch.autograd.grad(torch.tanh(x @ weight).sum(), weight)[0]
    grad_fn = out.grad_fn
    assert deallocate_output_tensor(out)
    assert out.numel() == 1 and out.grad_fn is grad_fn
    torch.autograd.backward([torch.autograd.graph.get_gradient_edge(out)], grad_tensors=[torch.ones(3, 5)])
    torch.testing.assert_close(weight.grad, expected)
    view = (x @ weight).view(15)
    assert not deallocate_output_tensor(view) and view.numel() == 15  # storage belongs to the base
    assert not deallocate_output_tensor(torch.randn(3))                 # no autograd node


# ====================================================================== plans


def _plans(pp_size, num_microbatches, num_chunks=1, group_size=None, forward_only=False):
    if num_chunks == 1 and group_size is None:
        return [build_1f1b_plan(rank, pp_size, num_microbatches, forward_only) for rank in range(pp_size)]
    return [build_interleaved_plan(rank, pp_size, num_chunks, num_microbatches, group_size, forward_only)
            for rank in range(pp_size)]


def _messages(plans):
    """Per directed channel, the sequence of exchanges: (src, dst) -> list of (step index on the
    sender, payload); and the same for receives, as (step index on the receiver, payload)."""
    pp_size = len(plans)
    sends, recvs = {}, {}
    for rank, plan in enumerate(plans):
        nxt, prv = (rank + 1) % pp_size, (rank - 1) % pp_size
        for index, step in enumerate(plan.steps):
            # posting order within one exchange: forward-flowing first, then backward-flowing
            if step.send_output:
                microbatch, chunk = plan.forward_order[step.forward]
                target = (microbatch, chunk + 1 if rank == pp_size - 1 else chunk)
                sends.setdefault((rank, nxt), []).append((index, ("activation",) + target))
            if step.recv_input is not None:
                recvs.setdefault((prv, rank), []).append((index, ("activation",) + plan.forward_order[step.recv_input]))
            if step.send_grad:
                microbatch, chunk = plan.backward_order[step.backward]
                target = (microbatch, chunk - 1 if rank == 0 else chunk)
                sends.setdefault((rank, prv), []).append((index, ("gradient",) + target))
            if step.recv_grad is not None:
                recvs.setdefault((nxt, rank), []).append((index, ("gradient",) + plan.backward_order[step.recv_grad]))
    return sends, recvs


def _simulate(plans):
    """Run every rank's blocking exchanges with messages matched in posting order per channel
    (as NCCL and gloo do); return True when all ranks finish, False on deadlock."""
    sends, recvs = _messages(plans)
    for channel in set(sends) | set(recvs):
        payload_out = [payload for _, payload in sends.get(channel, [])]
        payload_in = [payload for _, payload in recvs.get(channel, [])]
        assert payload_out == payload_in, f"channel {channel}: sent {payload_out} received {payload_in}"
    # (rank, step index) -> the (peer, peer step index) holding the other end of each message
    partners = {}
    for channel in sends:
        src, dst = channel
        for (send_step, _), (recv_step, _) in zip(sends[channel], recvs[channel]):
            partners.setdefault((src, send_step), []).append((dst, recv_step))
            partners.setdefault((dst, recv_step), []).append((src, send_step))
    position = [0] * len(plans)  # the step each rank has reached (its operations are posted)
    progress = True
    while progress:
        progress = False
        for rank, plan in enumerate(plans):
            # an exchange completes once every partner has reached (posted) its side
            while position[rank] < len(plan.steps) and all(
                    position[peer] >= peer_step for peer, peer_step in partners.get((rank, position[rank]), [])):
                position[rank] += 1
                progress = True
    return all(position[rank] == len(plan.steps) for rank, plan in enumerate(plans))


@pytest.mark.parametrize("pp_size", [2, 3, 4, 5])
def test_1f1b_plans_match_across_ranks_and_never_deadlock(pp_size):
    for num_microbatches in range(1, 10):
        for forward_only in (False, True):
            plans = _plans(pp_size, num_microbatches, forward_only=forward_only)
            assert _simulate(plans), (pp_size, num_microbatches, forward_only)
            if not forward_only:
                for rank, plan in enumerate(plans):
                    assert plan.max_in_flight() == min(pp_size - rank, num_microbatches)


@pytest.mark.parametrize("pp_size", [2, 3, 4])
def test_interleaved_plans_match_across_ranks_and_never_deadlock(pp_size):
    checked = 0
    for num_chunks in (2, 3):
        for group_size in (pp_size, pp_size + 1, 2 * pp_size):
            for num_microbatches in range(pp_size, 3 * pp_size + 2):
                try:
                    check_interleaved_num_microbatches(num_microbatches, pp_size, group_size)
                except ValueError:
                    continue
                for forward_only in (False, True):
                    plans = _plans(pp_size, num_microbatches, num_chunks, group_size, forward_only)
                    assert _simulate(plans), (pp_size, num_chunks, group_size, num_microbatches)
                    checked += 1
                    if forward_only:
                        continue
                    total = num_microbatches * num_chunks
                    for rank, plan in enumerate(plans):
                        warmup = (pp_size - rank - 1) * 2 + (num_chunks - 1) * group_size
                        assert plan.max_in_flight() == min(warmup + 1, total)
    assert checked > 10


def test_simulator_detects_a_deadlock():
    """The simulator is not vacuous: a stage that waits for a gradient before sending the
    activation that gradient depends on never finishes."""
    order = [(0, 0)]
    waits_first = PipelinePlan(0, 2, 1, 1, order, order, steps=[
        PlanStep(0, recv_grad=0), PlanStep(1, forward=0, send_output=True), PlanStep(2, backward=0)])
    last_stage = PipelinePlan(1, 2, 1, 1, order, order, steps=[
        PlanStep(0, recv_input=0), PlanStep(1, forward=0, backward=0, send_grad=True)])
    assert not _simulate([waits_first, last_stage])
    assert _simulate(_plans(2, 1))
