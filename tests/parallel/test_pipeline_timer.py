"""The schedules' compute timer: timing changes nothing, counts every step, excludes waiting.

Two gloo ranks run the toy pipeline of tests/parallel/test_pipeline_schedules.py under 1F1B and
interleaved 1F1B (with and without overlapped communication), each scenario twice -- without a
ComputeTimer and with one -- and the losses and gradients must be identical. The timer must count
one forward and one backward per micro-batch and model chunk, and its busy seconds must be
positive and no more than the wall time of the call. A stage that sleeps inside its forward step
makes the next stage wait: the sleep shows in the first stage's busy time and not in the second's.
One process checks the no-pipelining schedule the same way.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from gigatron.core.pipeline import ComputeTimer, get_forward_backward_func
from tests.parallel.harness import run_distributed
from tests.parallel.test_pipeline_schedules import (
    ToyDataParallel,
    _config,
    _pipeline_groups,
    build_stage,
    forward_step,
    make_microbatches,
)

SCENARIOS = {
    "1f1b": dict(num_layers=6, num_microbatches=5, vp=1),
    "1f1b_overlap": dict(num_layers=6, num_microbatches=5, vp=1, overlap=True),
    "interleaved": dict(num_layers=8, num_microbatches=6, vp=2),
    "interleaved_overlap": dict(num_layers=8, num_microbatches=4, vp=2, overlap=True),
}
SLEEP_S = 0.3


def _run(rank, pp_size, groups, *, num_layers, num_microbatches, vp, overlap=False, timer=None,
         forward_only=False, step_func=forward_step):
    """One schedule call on this rank: (losses, grads by global name, wall seconds of the call)."""
    chunks = [ToyDataParallel(build_stage(num_layers, pp_size * vp, chunk * pp_size + rank)) for chunk in range(vp)]
    batches = make_microbatches(num_microbatches)
    iterators = [iter(batches) for _ in chunks]
    schedule = get_forward_backward_func(pp_size, vp if vp > 1 else None)
    dist.barrier(group=groups.pp.group)
    begin = time.perf_counter()
    logs = schedule(forward_step_func=step_func, data_iterator=iterators if vp > 1 else iterators[0],
                    model=chunks if vp > 1 else chunks[0], num_microbatches=num_microbatches, seq_length=4,
                    micro_batch_size=2, groups=groups, config=_config(overlap=overlap), forward_only=forward_only,
                    compute_timer=timer)
    wall = time.perf_counter() - begin
    grads = {name: param.grad.clone() for chunk in chunks
             for name, param in chunk.module.global_named_parameters() if param.grad is not None}
    return [entry["loss"] for entry in logs], grads, wall


def _timer_report(timer: ComputeTimer, wall: float) -> dict:
    return dict(forward=timer.forward_seconds(), backward=timer.backward_seconds(), busy=timer.busy_seconds(),
                num_forward=timer.num_forward_steps, num_backward=timer.num_backward_steps, wall=wall)


def _sleepy_forward_step(data_iterator, model):
    """The first stage's forward step, slowed down: the next stage must wait for it."""
    time.sleep(SLEEP_S)
    return forward_step(data_iterator, model)


def _worker(rank, world_size):
    groups = _pipeline_groups(rank, world_size)
    results = {}
    for name, scenario in SCENARIOS.items():
        plain_losses, plain_grads, _ = _run(rank, world_size, groups, **scenario)
        timer = ComputeTimer("cpu")
        losses, grads, wall = _run(rank, world_size, groups, timer=timer, **scenario)
        results[name] = dict(plain_losses=plain_losses, plain_grads=plain_grads, losses=losses, grads=grads,
                             timer=_timer_report(timer, wall))

    # Totals accumulate over calls until reset.
    timer = ComputeTimer("cpu")
    walls = [_run(rank, world_size, groups, timer=timer, **SCENARIOS["1f1b"])[2] for _ in range(2)]
    accumulated = _timer_report(timer, sum(walls))
    timer.reset()
    results["reset"] = dict(accumulated=accumulated, after_reset=_timer_report(timer, 0.0))

    timer = ComputeTimer("cpu")
    _, grads, wall = _run(rank, world_size, groups, timer=timer, forward_only=True, **SCENARIOS["interleaved"])
    results["forward_only"] = dict(timer=_timer_report(timer, wall), num_grads=len(grads))

    # Waiting is not compute: rank 0 sleeps inside each forward step, rank 1 waits for its input.
    for overlap in (False, True):
        timer = ComputeTimer("cpu")
        _, _, wall = _run(rank, world_size, groups, timer=timer, num_layers=4, num_microbatches=2, vp=1,
                          overlap=overlap, step_func=_sleepy_forward_step if rank == 0 else forward_step)
        results[f"waiting_overlap_{overlap}"] = _timer_report(timer, wall)
    return results


@pytest.fixture(scope="module")
def pp2_results():
    return run_distributed(_worker, 2, timeout=120)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_timed_schedule_equals_untimed(pp2_results, name):
    """Same losses and gradients, bit for bit, with and without the timer."""
    for rank, result in enumerate(pp2_results):
        run = result[name]
        assert len(run["losses"]) == (SCENARIOS[name]["num_microbatches"] if rank == 1 else 0)
        for got, want in zip(run["losses"], run["plain_losses"], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert run["grads"].keys() == run["plain_grads"].keys() and run["grads"], rank
        for key, want in run["plain_grads"].items():
            torch.testing.assert_close(run["grads"][key], want, rtol=0, atol=0, msg=f"rank {rank} {key}")


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_timer_counts_and_bounds(pp2_results, name):
    scenario = SCENARIOS[name]
    steps = scenario["num_microbatches"] * scenario["vp"]
    for rank, result in enumerate(pp2_results):
        timer = result[name]["timer"]
        assert timer["num_forward"] == steps and timer["num_backward"] == steps, (rank, timer)
        assert timer["forward"] > 0 and timer["backward"] > 0, (rank, timer)
        assert timer["busy"] == pytest.approx(timer["forward"] + timer["backward"])
        assert timer["busy"] <= timer["wall"], (rank, timer)


def test_timer_accumulates_until_reset(pp2_results):
    steps = SCENARIOS["1f1b"]["num_microbatches"]
    for result in pp2_results:
        accumulated, after = result["reset"]["accumulated"], result["reset"]["after_reset"]
        assert accumulated["num_forward"] == accumulated["num_backward"] == 2 * steps
        assert 0 < accumulated["busy"] <= accumulated["wall"]
        assert after == dict(forward=0.0, backward=0.0, busy=0.0, num_forward=0, num_backward=0, wall=0.0)


def test_timer_forward_only(pp2_results):
    scenario = SCENARIOS["interleaved"]
    for result in pp2_results:
        timer = result["forward_only"]["timer"]
        assert result["forward_only"]["num_grads"] == 0
        assert timer["num_forward"] == scenario["num_microbatches"] * scenario["vp"]
        assert timer["num_backward"] == 0 and timer["backward"] == 0.0
        assert 0 < timer["busy"] <= timer["wall"]


@pytest.mark.parametrize("overlap", [False, True], ids=["blocking", "overlap"])
def test_timer_excludes_waiting(pp2_results, overlap):
    """Rank 0 computes through two sleeps of SLEEP_S; rank 1 waits for them but does not count them."""
    first, second = (result[f"waiting_overlap_{overlap}"] for result in pp2_results)
    assert first["forward"] >= 2 * SLEEP_S
    assert second["wall"] >= 2 * SLEEP_S
    assert second["busy"] < SLEEP_S / 2, second


# ====================================================================== one process


def test_no_pipelining_timer_single_process():
    def run(timer):
        chunk = ToyDataParallel(build_stage(4, 1, 0))
        begin = time.perf_counter()
        logs = get_forward_backward_func(1)(forward_step_func=forward_step, data_iterator=iter(make_microbatches(3)),
                                            model=chunk, num_microbatches=3, compute_timer=timer)
        wall = time.perf_counter() - begin
        grads = {name: param.grad.clone() for name, param in chunk.module.global_named_parameters()}
        return [entry["loss"] for entry in logs], grads, wall

    plain_losses, plain_grads, _ = run(None)
    timer = ComputeTimer("cpu")
    losses, grads, wall = run(timer)
    for got, want in zip(losses, plain_losses, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for name, want in plain_grads.items():
        torch.testing.assert_close(grads[name], want, rtol=0, atol=0, msg=name)
    assert timer.num_forward_steps == timer.num_backward_steps == 3
    assert timer.forward_seconds() > 0 and timer.backward_seconds() > 0
    assert timer.busy_seconds() <= wall


def test_timer_rejects_unknown_kind_and_missing_cuda():
    timer = ComputeTimer("cpu")
    with pytest.raises(ValueError, match="kind must be one of"):
        with timer.measure("optimizer"):
            pass
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            ComputeTimer("cuda")


def test_failed_step_is_not_counted():
    timer = ComputeTimer("cpu")
    with pytest.raises(RuntimeError, match="boom"):
        with timer.measure("forward"):
            raise RuntimeError("boom")
    assert timer.num_forward_steps == 0 and timer.forward_seconds() == 0.0


@pytest.mark.gpu
def test_cuda_event_timer_no_pipelining():
    """On a GPU the timer records CUDA events and sums them once; same bounds as on the CPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda")
    chunk = ToyDataParallel(build_stage(4, 1, 0).to(device))
    batches = [{key: value.to(device) for key, value in batch.items()} for batch in make_microbatches(4)]
    timer = ComputeTimer(device)
    torch.cuda.synchronize()
    begin = time.perf_counter()
    get_forward_backward_func(1)(forward_step_func=forward_step, data_iterator=iter(batches), model=chunk,
                                 num_microbatches=4, compute_timer=timer)
    torch.cuda.synchronize()
    wall = time.perf_counter() - begin
    assert timer.num_forward_steps == timer.num_backward_steps == 4
    assert 0 < timer.busy_seconds() <= wall
    assert timer.busy_seconds() == pytest.approx(timer.forward_seconds() + timer.backward_seconds())
