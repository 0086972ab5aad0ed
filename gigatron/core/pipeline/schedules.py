"""Forward/backward schedules over micro-batches: no pipelining, 1F1B, interleaved 1F1B.

`get_forward_backward_func(pp_size, vp_size)` picks one; all share the signature

    forward_backward(*, forward_step_func, data_iterator, model, num_microbatches, seq_length,
                     micro_batch_size, groups, config, forward_only=False,
                     grad_scale_func=None, finalize_model_grads_func=None,
                     compute_timer=None) -> list[dict]

and the same per-micro-batch steps: `forward_step_func(data_iterator, model_chunk)` returns
`(output_tensor, loss_func)`; on the last stage `loss_func(output_tensor)` returns
`(loss, logging_dict)`, the loss is divided by `num_microbatches`, multiplied by
`grad_scale_func` (the fp16 loss scale) and back-propagated; the logging dicts come back as a
list (one per micro-batch) on the last stage and an empty list elsewhere. Data-parallel gradient
reduction is held back with the chunk's `no_sync()` until the chunk's last backward, and
`finalize_model_grads_func(model_chunks)` runs once after the last backward.
With --calculate-per-token-loss (the chunks' DDPConfig) `loss_func` returns
`(loss_sum, num_tokens, logging_dict)` instead: the sum is back-propagated undivided and
`finalize_model_grads_func(model_chunks, num_tokens)` gets this rank's token count of the step.

Configuration read (with getattr, so any config object with these attributes will do):
`hidden_size` and `sequence_parallel` (with `seq_length`, `micro_batch_size` and the tp / cp groups:
the shape of the tensors sent between stages), `pipeline_dtype` or else `params_dtype` (their
dtype), `variable_seq_lengths` (send each tensor's shape before it), `overlap_p2p_comm` (post each
step's messages without waiting and wait for a received tensor only just before it is used, so
communication runs alongside the next computation), `microbatch_group_size_per_vp_stage`
(interleaved only; default pp).

How the pipelined schedules are built
-------------------------------------
A pipelined schedule is a *plan*: for every forward and backward that the stage runs, the time
step after which its result is sent. Forward number k of pipeline rank r is sent at
`forward_time(r, k)`, backward number j at `backward_time(r, j)`. A stage receives a tensor at the
time step at which its neighbour sends it, so every message joins two exchanges that carry the
same time step. Each stage works through its time steps in increasing order -- at each one it
runs the forward and then the backward due then, then posts all sends and receives of that step
in one batched exchange -- so the exchanges of step t only wait on exchanges of step t, and no
stage can wait on one that waits on it: the plan cannot deadlock. Building the plan checks that
each tensor is received at an earlier step than the one that uses it. With `overlap_p2p_comm` the
same messages are posted in the same order without waiting, and a stage waits only for tensors
sent at earlier steps, so the argument still holds.

1F1B (PipeDream-flush), micro-batch index k = j:
    forward_time(r, k) = 2k + 1 + r          input of forward k arrives at 2k + r
    backward_time(r, j) = 2 pp + 2j - r      output gradient of backward j arrives at 2 pp + 2j - r - 1
so rank r runs min(pp - r - 1, M) warm-up forwards, then alternates one forward and one backward
(steady state: "send forward, receive backward" and "send backward, receive forward" exchanges),
then the cool-down backwards: at most min(pp - r, M) micro-batches are in flight on rank r.

Interleaved 1F1B (V model chunks per rank, micro-batches taken in groups of G = microbatch group
size per virtual stage, default pp): the forward order runs G micro-batches through chunk 0, the
same G through chunk 1, ..., then the next group; the backward order is the same with the chunks
reversed.
    forward_time(r, k) = k + 1 + r
    backward_time(r, j) = 2 (pp - 1) + (V - 1) G + 1 + j - r
so rank r runs (pp - r - 1) * 2 + (V - 1) G warm-up forwards, then one forward and one backward
per step, each step's sends and receives in one exchange. The last stage's chunk v feeds the first
stage's chunk v + 1 (the ring), which is why PP <= G: the tensor must arrive G >= pp steps later.

Compute timer
-------------
`compute_timer=ComputeTimer()` (any schedule) brackets each micro-batch's forward compute
(`forward_step_func`, plus `loss_func` on the last stage) and backward compute (the autograd
backward of that micro-batch through this stage) -- Megatron's forward-compute and
backward-compute timers. A bracket opens after the tensor that the step consumes (the previous
stage's output, the next stage's gradient) has been waited for, so it measures computing, not
waiting; sends, receives and the schedule's bookkeeping fall outside. On CUDA the brackets are
pairs of timing events recorded on the current stream (nothing synchronises during the
schedule); on the CPU they are `time.perf_counter` readings. `busy_seconds()` then gives the time
this rank computed; the rest of the schedule's wall time is waiting -- the pipeline bubble and
communication (bench/bench_pipeline.py). Without a timer the schedules record nothing.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.autograd.graph import get_gradient_edge

from .p2p import P2PCommunicator, pipeline_tensor_shape

__all__ = [
    "ComputeTimer",
    "get_forward_backward_func",
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_without_interleaving",
    "forward_backward_pipelining_with_interleaving",
    "check_interleaved_num_microbatches",
    "build_1f1b_plan",
    "build_interleaved_plan",
    "PipelinePlan",
    "PlanStep",
    "deallocate_output_tensor",
]


# ====================================================================== dispatcher


def get_forward_backward_func(pp_size: int, vp_size: Optional[int] = None) -> Callable:
    """The schedule for `pp_size` pipeline stages and `vp_size` virtual stages (model chunks) each."""
    if pp_size < 1:
        raise ValueError(f"--pipeline-model-parallel-size must be >= 1, got {pp_size}")
    interleaved = vp_size is not None and vp_size > 1
    if pp_size == 1:
        if interleaved:
            raise ValueError(
                f"virtual pipeline stages ({vp_size}) need --pipeline-model-parallel-size > 1; "
                "drop --num-layers-per-virtual-pipeline-stage / --num-virtual-stages-per-pipeline-rank"
            )
        return forward_backward_no_pipelining
    if interleaved:
        return forward_backward_pipelining_with_interleaving
    return forward_backward_pipelining_without_interleaving


# ====================================================================== no pipelining


def forward_backward_no_pipelining(*, forward_step_func, data_iterator, model, num_microbatches: int,
                                   seq_length: Optional[int] = None, micro_batch_size: Optional[int] = None,
                                   groups=None, config=None, forward_only: bool = False,
                                   grad_scale_func=None, finalize_model_grads_func=None,
                                   compute_timer: Optional[ComputeTimer] = None) -> list:
    """One stage: forward and backward each micro-batch in turn, accumulating gradients.

    The data-parallel reduction is held back (`no_sync`) for all but the last micro-batch, whose
    forward and backward run with it enabled. `seq_length`, `micro_batch_size` and `groups` are
    not needed here (no tensors cross stages) and are accepted for the common signature.
    `compute_timer` (a ComputeTimer, optional) measures each forward and backward step.
    """
    _check_num_microbatches(num_microbatches)
    chunk = _single_chunk(model)
    iterator = _single_iterator(data_iterator)
    logging_dicts: list = []
    token_counts: list = []
    sync = _GradSyncControl([chunk], hold=not forward_only)
    grad_mode = torch.no_grad() if forward_only else contextlib.nullcontext()
    try:
        with grad_mode:
            for index in range(num_microbatches):
                if index == num_microbatches - 1:
                    sync.release(0)
                with _timed(compute_timer, "forward"):
                    output = _forward_step(forward_step_func, iterator, chunk, None, num_microbatches,
                                           is_last_stage=True, logging_dicts=logging_dicts,
                                           token_counts=token_counts)
                if not forward_only:
                    with _timed(compute_timer, "backward"):
                        _backward_step(None, output, None, grad_scale_func)
    finally:
        sync.close()
    if not forward_only and finalize_model_grads_func is not None:
        _finalize(finalize_model_grads_func, [chunk], token_counts, _chunk_device([chunk]))
    return logging_dicts


# ====================================================================== pipelined schedules


def forward_backward_pipelining_without_interleaving(*, forward_step_func, data_iterator, model,
                                                     num_microbatches: int, seq_length: int,
                                                     micro_batch_size: int, groups, config,
                                                     forward_only: bool = False, grad_scale_func=None,
                                                     finalize_model_grads_func=None,
                                                     compute_timer: Optional[ComputeTimer] = None) -> list:
    """1F1B: warm-up forwards, one-forward-one-backward steady state, cool-down backwards.

    `model` is this stage's module (or a one-element list of it); `groups.pp` is the pipeline
    Group. Stage outputs are freed as soon as they are sent (`deallocate_output_tensor`).
    """
    _check_num_microbatches(num_microbatches)
    chunks = [_single_chunk(model)]
    iterators = [_single_iterator(data_iterator)]
    pp = _pipeline_group(groups)
    plan = build_1f1b_plan(pp.rank, pp.size, num_microbatches, forward_only=forward_only)
    return _run_plan(plan, forward_step_func=forward_step_func, iterators=iterators, chunks=chunks,
                     seq_length=seq_length, micro_batch_size=micro_batch_size, groups=groups, config=config,
                     forward_only=forward_only, grad_scale_func=grad_scale_func,
                     finalize_model_grads_func=finalize_model_grads_func, compute_timer=compute_timer)


def forward_backward_pipelining_with_interleaving(*, forward_step_func, data_iterator, model,
                                                  num_microbatches: int, seq_length: int,
                                                  micro_batch_size: int, groups, config,
                                                  forward_only: bool = False, grad_scale_func=None,
                                                  finalize_model_grads_func=None,
                                                  compute_timer: Optional[ComputeTimer] = None) -> list:
    """Interleaved 1F1B over the model chunks of this rank (`model` is a list, chunk v holding
    virtual stage v * pp + pp_rank). `data_iterator` is one iterator shared by the chunks or a
    list with one per chunk. The micro-batch group size is
    `config.microbatch_group_size_per_vp_stage` (default: the pipeline size); see
    `check_interleaved_num_microbatches` for the constraints on `num_microbatches`.

    Each chunk's data-parallel reduction is enabled for that chunk's last backward, so it can
    start while other chunks are still computing.
    """
    _check_num_microbatches(num_microbatches)
    if not isinstance(model, (list, tuple)) or len(model) < 1:
        raise TypeError("the interleaved schedule needs `model` as a list of model chunks (one per virtual stage)")
    chunks = list(model)
    if isinstance(data_iterator, (list, tuple)):
        if len(data_iterator) != len(chunks):
            raise ValueError(
                f"data_iterator is a list of {len(data_iterator)} iterators but there are {len(chunks)} "
                "model chunks; pass one iterator per chunk (or a single shared iterator)"
            )
        iterators = list(data_iterator)
    else:
        iterators = [data_iterator] * len(chunks)
    pp = _pipeline_group(groups)
    if pp.size < 2:
        raise ValueError("the interleaved schedule needs --pipeline-model-parallel-size > 1")
    group_size = getattr(config, "microbatch_group_size_per_vp_stage", None) or pp.size
    check_interleaved_num_microbatches(num_microbatches, pp.size, group_size)
    plan = build_interleaved_plan(pp.rank, pp.size, len(chunks), num_microbatches, group_size,
                                  forward_only=forward_only)
    return _run_plan(plan, forward_step_func=forward_step_func, iterators=iterators, chunks=chunks,
                     seq_length=seq_length, micro_batch_size=micro_batch_size, groups=groups, config=config,
                     forward_only=forward_only, grad_scale_func=grad_scale_func,
                     finalize_model_grads_func=finalize_model_grads_func, compute_timer=compute_timer)


def check_interleaved_num_microbatches(num_microbatches: int, pp_size: int, group_size: int) -> None:
    """Raise ValueError unless the interleaved schedule can run `num_microbatches`.

    Micro-batches go through the chunks in groups of `group_size` (G): the output of the last
    stage's chunk v for a micro-batch becomes the first stage's chunk v + 1 input G steps later,
    and it needs pp steps to get round the pipeline. Hence PP <= G <= M, and the last, possibly
    shorter group (M mod G micro-batches) must also hold at least PP of them.
    """
    if group_size < pp_size or group_size > num_microbatches:
        raise ValueError(
            f"interleaved pipeline schedule: the micro-batch group size per virtual stage ({group_size}) "
            f"must lie between --pipeline-model-parallel-size ({pp_size}) and the number of micro-batches "
            f"({num_microbatches}); a chunk's output needs {pp_size} steps to come round the pipeline. "
            f"Use at least {max(pp_size, group_size)} micro-batches per step (global batch / (micro batch x "
            "data-parallel size)) or set --microbatch-group-size-per-virtual-pipeline-stage accordingly"
        )
    remainder = num_microbatches % group_size
    if remainder != 0 and remainder < pp_size:
        raise ValueError(
            f"interleaved pipeline schedule: {num_microbatches} micro-batches in groups of {group_size} "
            f"leave a last group of {remainder}, fewer than --pipeline-model-parallel-size ({pp_size}); "
            f"use a number of micro-batches that is a multiple of {group_size} or leaves a remainder of "
            f"at least {pp_size} (e.g. {num_microbatches - remainder + group_size} or "
            f"{max(num_microbatches - remainder, group_size)})"
        )


# ====================================================================== plans


@dataclass
class PlanStep:
    """What a stage does at one time step: compute, then one batched exchange."""

    time: int
    forward: Optional[int] = None
    """index (into the forward order) of the forward run at this step"""
    backward: Optional[int] = None
    """index (into the backward order) of the backward run at this step (after the forward)"""
    send_output: bool = False
    """send this step's forward output to the next stage"""
    send_grad: bool = False
    """send this step's input gradient to the previous stage"""
    recv_input: Optional[int] = None
    """forward index whose input is received from the previous stage at this step"""
    recv_grad: Optional[int] = None
    """backward index whose output gradient is received from the next stage at this step"""


@dataclass
class PipelinePlan:
    """The whole schedule of one pipeline rank (see the module docstring)."""

    pp_rank: int
    pp_size: int
    num_chunks: int
    num_microbatches: int
    forward_order: list
    """forward index -> (micro-batch, chunk)"""
    backward_order: list
    """backward index -> (micro-batch, chunk)"""
    steps: list = field(default_factory=list)
    """PlanSteps in increasing time"""

    def max_in_flight(self) -> int:
        """Most (micro-batch, chunk) forwards whose backward has not run yet, over the plan."""
        live = peak = 0
        for step in self.steps:
            if step.forward is not None:
                live += 1
                peak = max(peak, live)
            if step.backward is not None:
                live -= 1
        return peak


def _forward_order(num_microbatches: int, num_chunks: int, group_size: int) -> list:
    order = []
    for start in range(0, num_microbatches, group_size):
        stop = min(start + group_size, num_microbatches)
        for chunk in range(num_chunks):
            order.extend((microbatch, chunk) for microbatch in range(start, stop))
    return order


def _build_plan(pp_rank, pp_size, num_chunks, num_microbatches, group_size, forward_only,
                forward_time, backward_time) -> PipelinePlan:
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pipeline rank {pp_rank} outside a pipeline of {pp_size} stages")
    last_rank, last_chunk = pp_size - 1, num_chunks - 1
    order = _forward_order(num_microbatches, num_chunks, group_size)
    backward_order = [(microbatch, last_chunk - chunk) for microbatch, chunk in order]
    forward_index = {item: k for k, item in enumerate(order)}
    backward_index = {item: j for j, item in enumerate(backward_order)}
    steps: dict = {}

    def step_at(time):
        return steps.setdefault(time, PlanStep(time))

    def claim(step, name, value):
        if getattr(step, name) not in (None, False):
            raise RuntimeError(f"pipeline plan error: two {name} at time {step.time} on rank {pp_rank}")
        setattr(step, name, value)

    for k, (microbatch, chunk) in enumerate(order):
        when = forward_time(pp_rank, k)
        step = step_at(when)
        claim(step, "forward", k)
        step.send_output = not (pp_rank == last_rank and chunk == last_chunk)
        if pp_rank == 0 and chunk == 0:
            continue  # the first stage reads data
        if pp_rank > 0:
            arrives = forward_time(pp_rank - 1, k)
        else:  # ring: the last stage's previous chunk
            arrives = forward_time(last_rank, forward_index[(microbatch, chunk - 1)])
        if arrives >= when:
            raise RuntimeError(f"pipeline plan error: input of forward {k} arrives at {arrives}, needed at {when}")
        claim(step_at(arrives), "recv_input", k)

    if not forward_only:
        for j, (microbatch, chunk) in enumerate(backward_order):
            when = backward_time(pp_rank, j)
            if when < forward_time(pp_rank, forward_index[(microbatch, chunk)]):
                raise RuntimeError(f"pipeline plan error: backward {j} is due before its forward")
            step = step_at(when)
            claim(step, "backward", j)
            step.send_grad = not (pp_rank == 0 and chunk == 0)
            if pp_rank == last_rank and chunk == last_chunk:
                continue  # the loss starts the backward
            if pp_rank < last_rank:
                arrives = backward_time(pp_rank + 1, j)
            else:  # ring: the first stage's next chunk
                arrives = backward_time(0, backward_index[(microbatch, chunk + 1)])
            if arrives >= when:
                raise RuntimeError(f"pipeline plan error: gradient for backward {j} arrives at {arrives}, "
                                   f"needed at {when}")
            claim(step_at(arrives), "recv_grad", j)

    return PipelinePlan(pp_rank, pp_size, num_chunks, num_microbatches, order, backward_order,
                        [steps[time] for time in sorted(steps)])


def build_1f1b_plan(pp_rank: int, pp_size: int, num_microbatches: int, forward_only: bool = False) -> PipelinePlan:
    """The 1F1B (non-interleaved) plan of pipeline rank `pp_rank`."""
    return _build_plan(pp_rank, pp_size, 1, num_microbatches, max(num_microbatches, 1), forward_only,
                       forward_time=lambda r, k: 2 * k + 1 + r,
                       backward_time=lambda r, j: 2 * pp_size + 2 * j - r)


def build_interleaved_plan(pp_rank: int, pp_size: int, num_chunks: int, num_microbatches: int,
                           group_size: Optional[int] = None, forward_only: bool = False) -> PipelinePlan:
    """The interleaved 1F1B plan of pipeline rank `pp_rank` with `num_chunks` chunks per rank."""
    group_size = group_size or pp_size
    check_interleaved_num_microbatches(num_microbatches, pp_size, group_size)
    offset = 2 * (pp_size - 1) + (num_chunks - 1) * group_size + 1
    return _build_plan(pp_rank, pp_size, num_chunks, num_microbatches, group_size, forward_only,
                       forward_time=lambda r, k: k + 1 + r,
                       backward_time=lambda r, j: offset + j - r)


# ====================================================================== running a plan


def _run_plan(plan: PipelinePlan, *, forward_step_func, iterators, chunks, seq_length, micro_batch_size,
              groups, config, forward_only, grad_scale_func, finalize_model_grads_func,
              compute_timer=None) -> list:
    comm = P2PCommunicator(groups.pp, config)
    comm.prepare()
    tensor_shape = None if comm.variable_seq_lengths else pipeline_tensor_shape(
        seq_length, micro_batch_size, config, groups)
    overlap = bool(getattr(config, "overlap_p2p_comm", False))
    last_chunk = plan.num_chunks - 1
    is_last_rank = plan.pp_rank == plan.pp_size - 1
    forward_index = {item: k for k, item in enumerate(plan.forward_order)}
    last_backward_of_chunk = {chunk: j for j, (_, chunk) in enumerate(plan.backward_order)}

    inputs: dict = {}        # forward index -> (received input, PendingExchange or None)
    output_grads: dict = {}  # backward index -> (received output gradient, PendingExchange or None)
    saved: dict = {}         # forward index -> (input tensor, output tensor) awaiting backward
    posted: list = []        # with overlap: the exchanges posted at the previous step
    logging_dicts: list = []
    token_counts: list = []
    sync = _GradSyncControl(chunks, hold=not forward_only)
    grad_mode = torch.no_grad() if forward_only else contextlib.nullcontext()
    try:
        with grad_mode:
            for step in plan.steps:
                output_to_send = grad_to_send = None
                if step.forward is not None:
                    _, chunk = plan.forward_order[step.forward]
                    input_tensor = _arrived(inputs.pop(step.forward, None))
                    with _timed(compute_timer, "forward"):  # opened after the input has arrived
                        output = _forward_step(forward_step_func, iterators[chunk], chunks[chunk], input_tensor,
                                               plan.num_microbatches,
                                               is_last_stage=is_last_rank and chunk == last_chunk,
                                               logging_dicts=logging_dicts, token_counts=token_counts)
                    if step.send_output:
                        output_to_send = output
                    if not forward_only:
                        saved[step.forward] = (input_tensor, output)
                if step.backward is not None:
                    item = plan.backward_order[step.backward]
                    input_tensor, output = saved.pop(forward_index[item])
                    if last_backward_of_chunk[item[1]] == step.backward:
                        sync.release(item[1])
                    output_grad = _arrived(output_grads.pop(step.backward, None))
                    with _timed(compute_timer, "backward"):  # opened after the gradient has arrived
                        input_grad = _backward_step(input_tensor, output, output_grad, grad_scale_func)
                    if step.send_grad:
                        grad_to_send = input_grad
                want_input, want_grad = step.recv_input is not None, step.recv_grad is not None
                if overlap:
                    # Post this step's messages and go on computing; a received tensor is waited
                    # for just before the forward or backward that uses it. Forward-flowing and
                    # backward-flowing messages travel as two batches, so a backward's gradient
                    # can still be arriving while the next forward runs.
                    for pending in posted:
                        pending.wait()
                    from_prev, _, forward_pending = comm.exchange(
                        send_next=output_to_send, recv_prev=want_input, tensor_shape=tensor_shape, async_op=True)
                    _, from_next, backward_pending = comm.exchange(
                        send_prev=grad_to_send, recv_next=want_grad, tensor_shape=tensor_shape, async_op=True)
                    posted = [forward_pending, backward_pending]
                else:
                    from_prev, from_next = comm.exchange(
                        send_next=output_to_send, send_prev=grad_to_send, recv_prev=want_input,
                        recv_next=want_grad, tensor_shape=tensor_shape)
                    forward_pending = backward_pending = None
                if want_input:
                    inputs[step.recv_input] = (from_prev, forward_pending)
                if want_grad:
                    output_grads[step.recv_grad] = (from_next, backward_pending)
                if output_to_send is not None and not forward_only:
                    deallocate_output_tensor(output_to_send)
            for pending in posted:
                pending.wait()
    finally:
        sync.close()
    if saved or inputs or output_grads:
        raise RuntimeError("pipeline schedule finished with tensors left over (an internal plan error)")
    if not forward_only and finalize_model_grads_func is not None:
        _finalize(finalize_model_grads_func, chunks, token_counts, _chunk_device(chunks))
    return logging_dicts


def _arrived(entry):
    """The received tensor of an (tensor, pending exchange) entry, once it has arrived."""
    if entry is None:
        return None
    tensor, pending = entry
    if pending is not None:
        pending.wait()
    return tensor


# ====================================================================== one micro-batch


def per_token_loss(chunks) -> bool:
    """--calculate-per-token-loss (DDPConfig): the loss of a step is summed over its tokens and
    divided once by the step's token count over micro-batches and data x context ranks."""
    return any(getattr(getattr(c, "ddp_config", None), "calculate_per_token_loss", False) for c in chunks)


def _finalize(finalize_model_grads_func, chunks, token_counts: list, device) -> None:
    """Run finalize_model_grads_func; with per-token loss pass it this rank's token count (zero on
    stages without the loss: finalize takes the last stage's)."""
    if not per_token_loss(chunks):
        finalize_model_grads_func(chunks)
        return
    total = torch.stack([t.float() for t in token_counts]).sum() if token_counts else torch.zeros((), device=device)
    finalize_model_grads_func(chunks, total.detach().to(device).reshape(1))


def _chunk_device(chunks):
    return next(p for c in chunks for p in c.parameters()).device


def _forward_step(forward_step_func, data_iterator, model, input_tensor, num_microbatches, *,
                  is_last_stage: bool, logging_dicts: list, token_counts: Optional[list] = None):
    if input_tensor is not None:
        _set_input_tensor(model, input_tensor)
    result = forward_step_func(data_iterator, model)
    if not isinstance(result, tuple) or len(result) != 2:
        raise TypeError("forward_step_func(data_iterator, model) must return (output_tensor, loss_func)")
    output_tensor, loss_func = result
    if not is_last_stage:
        if not isinstance(output_tensor, torch.Tensor):
            raise TypeError(f"a non-last pipeline stage must output a tensor, got {type(output_tensor).__name__}")
        return output_tensor
    loss_result = loss_func(output_tensor)
    if isinstance(loss_result, tuple) and len(loss_result) == 3:
        # Per-token loss (--calculate-per-token-loss): (loss summed over tokens, token count, logging
        # dict); the sum is back-propagated as is and finalize divides by the step's token count.
        loss_sum, num_tokens, logging_dict = loss_result
        if token_counts is None:
            raise ValueError("loss_func returned (loss_sum, num_tokens, logging_dict) but this schedule does not "
                             "take per-token losses")
        logging_dicts.append(logging_dict)
        token_counts.append(num_tokens.detach())
        return loss_sum
    if not isinstance(loss_result, tuple) or len(loss_result) != 2:
        raise TypeError("loss_func(output_tensor) must return (loss, logging_dict) or, for a per-token loss, "
                        "(loss_sum, num_tokens, logging_dict)")
    if per_token_loss([model]):
        raise ValueError("--calculate-per-token-loss needs a loss_func that returns (loss_sum, num_tokens, "
                         "logging_dict); this forward step's returns (loss, logging_dict): drop the flag or "
                         "return the sum and the token count")
    loss, logging_dict = loss_result
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("loss_func must return a one-element loss tensor (the micro-batch's mean loss)")
    logging_dicts.append(logging_dict)
    return loss / num_microbatches


def _backward_step(input_tensor, output_tensor, output_tensor_grad, grad_scale_func):
    """Back-propagate one micro-batch through this stage; return the gradient of its input."""
    if output_tensor_grad is None:  # last stage: the output is the loss
        loss = grad_scale_func(output_tensor) if grad_scale_func is not None else output_tensor
        if loss.requires_grad:
            torch.autograd.backward(loss)
    elif output_tensor.requires_grad:
        # The output's storage may have been freed after sending (deallocate_output_tensor), so
        # back-propagate from its autograd node: the gradient edge checks the gradient against the
        # shape the node recorded, not the emptied tensor's.
        torch.autograd.backward([get_gradient_edge(output_tensor)], grad_tensors=[output_tensor_grad])
    if input_tensor is None:
        return None
    if input_tensor.grad is None:
        raise RuntimeError(
            "the stage's forward did not use the tensor given to set_input_tensor, so no gradient "
            "can be sent to the previous stage; the model chunk must consume its input tensor"
        )
    return input_tensor.grad


def deallocate_output_tensor(output: Optional[torch.Tensor]) -> bool:
    """Free the storage of a stage output once it has been sent, keeping its autograd node.

    The next stage has its own copy; this stage needs only the output's autograd node for the
    backward (which `_backward_step` reaches through the gradient edge), so `.data` is replaced by
    a one-element tensor. Skipped (returns False) for views, whose storage belongs to their base,
    and for tensors without an autograd node.
    """
    if output is None or output._base is not None or output.grad_fn is None:
        return False
    output.data = torch.empty((1,), device=output.device, dtype=output.dtype)
    return True


# ====================================================================== compute timer


class ComputeTimer:
    """Time that the schedules spend computing forward and backward steps on this rank.

    Pass it as `compute_timer=` to any schedule; each micro-batch's forward (with the loss on the
    last stage) and backward through each model chunk is bracketed (see the module docstring).
    `device`: a CUDA device times with CUDA events on that device's current stream, without
    synchronising until a total is asked for; anything else (the CPU) with `time.perf_counter`.
    Default: the current CUDA device when CUDA is available, else the CPU.

    Totals accumulate over calls until `reset()`; reading one synchronises the device once.
    """

    KINDS = ("forward", "backward")

    def __init__(self, device=None):
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._use_events = self.device.type == "cuda"
        if self._use_events and not torch.cuda.is_available():
            raise ValueError(f"ComputeTimer(device={self.device}) needs CUDA, which is not available here; "
                             "pass device='cpu' to time with time.perf_counter")
        self.reset()

    def reset(self) -> None:
        """Forget every measurement and count."""
        self.num_forward_steps = 0   # forward steps measured (micro-batches x model chunks)
        self.num_backward_steps = 0  # backward steps measured (micro-batches x model chunks)
        self._seconds = {kind: 0.0 for kind in self.KINDS}
        self._pending = {kind: [] for kind in self.KINDS}  # CUDA (start, end) event pairs not yet summed

    @contextlib.contextmanager
    def measure(self, kind: str):
        """Bracket one step of `kind` ("forward" or "backward"); a step that raises is not counted."""
        if kind not in self.KINDS:
            raise ValueError(f"ComputeTimer.measure: kind must be one of {self.KINDS}, got {kind!r}")
        if self._use_events:
            stream = torch.cuda.current_stream(self.device)
            start = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            yield
            end = torch.cuda.Event(enable_timing=True)
            end.record(stream)
            self._pending[kind].append((start, end))
        else:
            begin = time.perf_counter()
            yield
            self._seconds[kind] += time.perf_counter() - begin
        if kind == "forward":
            self.num_forward_steps += 1
        else:
            self.num_backward_steps += 1

    def forward_seconds(self) -> float:
        """Seconds spent in forward steps (including the loss on the last stage)."""
        self._collect()
        return self._seconds["forward"]

    def backward_seconds(self) -> float:
        """Seconds spent in backward steps."""
        self._collect()
        return self._seconds["backward"]

    def busy_seconds(self) -> float:
        """Seconds spent computing: forward plus backward."""
        self._collect()
        return self._seconds["forward"] + self._seconds["backward"]

    def _collect(self) -> None:
        """Sum the recorded CUDA event pairs (one device synchronisation) into the totals."""
        if not any(self._pending.values()):
            return
        torch.cuda.synchronize(self.device)
        for kind, pairs in self._pending.items():
            self._seconds[kind] += sum(start.elapsed_time(end) for start, end in pairs) / 1000.0
            pairs.clear()


_NOT_TIMED = contextlib.nullcontext()


def _timed(compute_timer: Optional[ComputeTimer], kind: str):
    """The timer's bracket for one step, or a shared do-nothing context without a timer."""
    return _NOT_TIMED if compute_timer is None else compute_timer.measure(kind)


# ====================================================================== helpers


class _GradSyncControl:
    """Holds each chunk's data-parallel gradient reduction back (`no_sync()`) until released."""

    def __init__(self, chunks, hold: bool):
        self._stacks: dict = {}
        if not hold:
            return
        for index, chunk in enumerate(chunks):
            no_sync = getattr(chunk, "no_sync", None)
            if no_sync is None:
                continue
            stack = contextlib.ExitStack()
            stack.enter_context(no_sync())
            self._stacks[index] = stack

    def release(self, index: int) -> None:
        stack = self._stacks.pop(index, None)
        if stack is not None:
            stack.close()

    def close(self) -> None:
        for index in list(self._stacks):
            self.release(index)


def _set_input_tensor(model, tensor) -> None:
    module = model
    while not hasattr(module, "set_input_tensor"):
        inner = getattr(module, "module", None)
        if inner is None:
            raise TypeError(
                f"{type(model).__name__} has no set_input_tensor(tensor); pipeline stages after the "
                "first need it to receive the previous stage's output"
            )
        module = inner
    module.set_input_tensor(tensor)


def _single_chunk(model):
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError(
                f"this schedule runs one model chunk but got {len(model)}; use the interleaved "
                "schedule (virtual pipeline stages) for several"
            )
        return model[0]
    return model


def _single_iterator(data_iterator):
    if isinstance(data_iterator, (list, tuple)):
        if len(data_iterator) != 1:
            raise ValueError(f"expected one data iterator for one model chunk, got {len(data_iterator)}")
        return data_iterator[0]
    return data_iterator


def _pipeline_group(groups):
    pp = getattr(groups, "pp", None)
    if pp is None:
        raise ValueError("pipelined schedules need `groups` with a pipeline Group at groups.pp")
    return pp


def _check_num_microbatches(num_microbatches: int) -> None:
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"num_microbatches must be a positive integer, got {num_microbatches!r}")
