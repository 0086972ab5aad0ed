"""Point-to-point communication between neighbouring pipeline stages.

Shape legend: s = sequence length, b = micro-batch size, h = hidden size, tp / cp = tensor- and
context-parallel sizes. The tensor that crosses a stage boundary is the hidden state
[s/cp, b, h] (or [s/cp/tp, b, h] with sequence parallelism), see `pipeline_tensor_shape`.

Stages form a ring over the pipeline group: "next" is pipeline rank + 1 and "prev" is rank - 1,
both modulo the group size. The plain functions (`send_forward`, `recv_backward`, ...) do nothing
on the ends of the pipeline (the first stage has no prev, the last no next); the ring functions
used by the interleaved schedule (`send_forward_recv_forward`, ...) follow the ring, so the last
stage's chunk k feeds the first stage's chunk k + 1.

Every call posts its sends and receives together through `torch.distributed.batch_isend_irecv`
and waits for them, so a call is one rendezvous with the neighbours. Within one call the
operations are always posted in the same order -- first the forward-flowing ones (send to next,
receive from prev), then the backward-flowing ones (send to prev, receive from next) -- so that on
a two-stage pipeline, where next and prev are the same peer, the activation and the gradient
travelling in the same direction are matched in the same order on both sides (NCCL ignores tags
and matches in posting order).

These are plain functions, not autograd functions: forward: the tensor crosses to the neighbour;
backward: nothing -- the schedules send the gradient back explicitly with `send_backward`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "P2PCommunicator",
    "PendingExchange",
    "pipeline_tensor_shape",
    "pipeline_dtype",
]

# Shapes travel as int64 vectors [ndim, d0, d1, ...] padded to this length.
_SHAPE_SLOTS = 8

# With NCCL, a batched send/receive that is the first operation on a communicator must be joined
# by every member; later ones may involve a subset. `P2PCommunicator.prepare` runs one all-reduce
# on first use of a group and remembers it here (ids of process groups, which live as long as
# the job).
_INITIALIZED_NCCL_GROUPS: "set[int]" = set()


def pipeline_tensor_shape(seq_length: int, micro_batch_size: int, config, groups) -> tuple:
    """The shape [s/cp (/tp with sequence parallel), b, h] of the tensor that crosses stages.

    `config` needs `hidden_size` and may have `sequence_parallel`; `groups` may carry `tp` and `cp`
    Groups (a missing one counts as size 1).
    """
    hidden_size = getattr(config, "hidden_size", None)
    if hidden_size is None:
        raise ValueError("the pipeline schedule needs config.hidden_size to size the tensors sent between stages")
    cp_size = _group_size(groups, "cp")
    tp_size = _group_size(groups, "tp")
    if seq_length % cp_size != 0:
        raise ValueError(
            f"seq_length {seq_length} is not divisible by --context-parallel-size {cp_size}; "
            "choose a sequence length that is a multiple of the context-parallel size"
        )
    local_seq = seq_length // cp_size
    if getattr(config, "sequence_parallel", False) and tp_size > 1:
        if local_seq % tp_size != 0:
            raise ValueError(
                f"with --sequence-parallel the per-rank sequence length {local_seq} (seq_length "
                f"{seq_length} / cp {cp_size}) must be divisible by --tensor-model-parallel-size "
                f"{tp_size}; change --seq-length or the parallel sizes"
            )
        local_seq //= tp_size
    return (local_seq, micro_batch_size, hidden_size)


def pipeline_dtype(config) -> torch.dtype:
    """The dtype of tensors sent between stages: config.pipeline_dtype, else config.params_dtype,
    else float32."""
    dtype = getattr(config, "pipeline_dtype", None)
    if dtype is None:
        dtype = getattr(config, "params_dtype", None)
    return dtype if dtype is not None else torch.float32


def _group_size(groups, name: str) -> int:
    group = getattr(groups, name, None) if groups is not None else None
    size = getattr(group, "size", 1) if group is not None else 1
    return max(int(size), 1)


class P2PCommunicator:
    """Sends and receives stage-boundary tensors over one pipeline `Group`.

    pp_group: a Group (`group`, `size`, `rank`, `ranks`) -- `ranks` are global ranks in pipeline
        order. config: read for `pipeline_dtype` / `params_dtype` (the dtype of the received
        buffers) and `variable_seq_lengths` (when true, every message is preceded by its shape,
        so stages may exchange tensors whose shape changes from micro-batch to micro-batch).
    device: where receive buffers live; default: the current CUDA device when the group uses
        NCCL, else the CPU.

    Received activations and gradients are fresh leaf tensors with requires_grad=True, so the
    receiving stage's backward fills their `.grad`.
    """

    def __init__(self, pp_group, config=None, device: Optional[torch.device] = None):
        self.pp_group = pp_group
        self.size = int(pp_group.size)
        self.rank = int(pp_group.rank)
        if self.size < 1 or not (0 <= self.rank < self.size):
            raise ValueError(f"pipeline group has size {self.size} and rank {self.rank}; this rank is not part of it")
        if self.size > 1 and pp_group.group is None:
            raise ValueError("pipeline group has several members but no process group; "
                             "build it with ParallelGroups.build")
        self.dtype = pipeline_dtype(config)
        self.variable_seq_lengths = bool(getattr(config, "variable_seq_lengths", False))
        ranks = list(pp_group.ranks)
        self.next_rank = ranks[(self.rank + 1) % self.size]
        self.prev_rank = ranks[(self.rank - 1) % self.size]
        self.device = torch.device(device) if device is not None else self._default_device()

    # ------------------------------------------------------------------ stage position

    @property
    def is_first_stage(self) -> bool:
        return self.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.rank == self.size - 1

    # ------------------------------------------------------------------ plain pipeline ends

    def recv_forward(self, tensor_shape: Sequence[int]) -> Optional[torch.Tensor]:
        """Receive this stage's input from the previous stage (None on the first stage).
        forward: activation from prev; backward: none (see send_backward)."""
        if self.is_first_stage:
            return None
        return self.exchange(recv_prev=True, tensor_shape=tensor_shape)[0]

    def recv_backward(self, tensor_shape: Sequence[int]) -> Optional[torch.Tensor]:
        """Receive the gradient of this stage's output from the next stage (None on the last).
        forward: gradient from next; backward: none."""
        if self.is_last_stage:
            return None
        return self.exchange(recv_next=True, tensor_shape=tensor_shape)[1]

    def send_forward(self, output_tensor: torch.Tensor) -> None:
        """Send this stage's output to the next stage (nothing on the last stage).
        forward: activation to next; backward: none (see recv_backward)."""
        if not self.is_last_stage:
            self.exchange(send_next=output_tensor)

    def send_backward(self, input_tensor_grad: torch.Tensor) -> None:
        """Send the gradient of this stage's input to the previous stage (nothing on the first).
        forward: gradient to prev; backward: none."""
        if not self.is_first_stage:
            self.exchange(send_prev=input_tensor_grad)

    def send_forward_recv_backward(self, output_tensor: torch.Tensor, tensor_shape) -> Optional[torch.Tensor]:
        """Send the output to next and receive the gradient of an output from next, in one
        rendezvous (None, and nothing sent, on the last stage).
        forward: activation to next, gradient from next; backward: none."""
        if self.is_last_stage:
            return None
        return self.exchange(send_next=output_tensor, recv_next=True, tensor_shape=tensor_shape)[1]

    def send_backward_recv_forward(self, input_tensor_grad: torch.Tensor, tensor_shape) -> Optional[torch.Tensor]:
        """Send an input gradient to prev and receive the next input from prev, in one rendezvous
        (None, and nothing sent, on the first stage).
        forward: gradient to prev, activation from prev; backward: none."""
        if self.is_first_stage:
            return None
        return self.exchange(send_prev=input_tensor_grad, recv_prev=True, tensor_shape=tensor_shape)[0]

    # ------------------------------------------------------------------ ring (interleaved)

    def send_forward_recv_forward(self, output_tensor: Optional[torch.Tensor], recv_prev: bool,
                                  tensor_shape) -> Optional[torch.Tensor]:
        """Ring: send `output_tensor` (if any) to next and, if `recv_prev`, receive from prev.
        forward: activation to next, activation from prev; backward: none."""
        return self.exchange(send_next=output_tensor, recv_prev=recv_prev, tensor_shape=tensor_shape)[0]

    def send_backward_recv_backward(self, input_tensor_grad: Optional[torch.Tensor], recv_next: bool,
                                    tensor_shape) -> Optional[torch.Tensor]:
        """Ring: send `input_tensor_grad` (if any) to prev and, if `recv_next`, receive from next.
        forward: gradient to prev, gradient from next; backward: none."""
        return self.exchange(send_prev=input_tensor_grad, recv_next=recv_next, tensor_shape=tensor_shape)[1]

    def send_forward_backward_recv_forward_backward(self, output_tensor, input_tensor_grad, recv_prev: bool,
                                                    recv_next: bool, tensor_shape):
        """Ring: all four directions in one rendezvous; returns (input from prev, grad from next).
        forward: activation to next and from prev, gradient to prev and from next; backward: none."""
        return self.exchange(send_next=output_tensor, send_prev=input_tensor_grad, recv_prev=recv_prev,
                             recv_next=recv_next, tensor_shape=tensor_shape)

    # ------------------------------------------------------------------ the one primitive

    def exchange(self, send_next: Optional[torch.Tensor] = None, send_prev: Optional[torch.Tensor] = None,
                 recv_prev: bool = False, recv_next: bool = False, tensor_shape: Optional[Sequence[int]] = None,
                 async_op: bool = False):
        """Post every requested send and receive at once; return (from_prev, from_next), after
        waiting for all of them -- or, with async_op, at once as (from_prev, from_next, pending):
        the received tensors are valid only after `pending.wait()`.

        Receive buffers have `tensor_shape` and the communicator's dtype; with
        variable_seq_lengths the shapes are exchanged first (always waited for) and
        `tensor_shape` may be None.
        """
        if send_next is None and send_prev is None and not recv_prev and not recv_next:
            return (None, None, PendingExchange([], [])) if async_op else (None, None)
        if self.size == 1:
            raise RuntimeError("point-to-point communication was requested on a one-stage pipeline")
        for name, tensor in (("send_next", send_next), ("send_prev", send_prev)):
            if tensor is not None:
                self._check_outgoing(name, tensor, tensor_shape)

        if self.variable_seq_lengths:
            shape_prev, shape_next = self._exchange_shapes(send_next, send_prev, recv_prev, recv_next)
        else:
            if (recv_prev or recv_next) and tensor_shape is None:
                raise ValueError("a tensor_shape is needed to receive unless config.variable_seq_lengths is set")
            shape_prev = shape_next = tuple(tensor_shape) if tensor_shape is not None else None

        from_prev = self._empty(shape_prev) if recv_prev else None
        from_next = self._empty(shape_next) if recv_next else None
        pending = self._post(send_next, send_prev, from_prev, from_next)
        if async_op:
            return from_prev, from_next, pending
        pending.wait()
        return from_prev, from_next

    # ------------------------------------------------------------------ internals

    def _default_device(self) -> torch.device:
        group = self.pp_group.group
        if group is not None and dist.is_available() and dist.is_initialized():
            if dist.get_backend(group) == "nccl":
                return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _empty(self, shape) -> torch.Tensor:
        return torch.empty(shape, dtype=self.dtype, device=self.device, requires_grad=True)

    def _check_outgoing(self, name: str, tensor: torch.Tensor, tensor_shape) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(tensor).__name__}")
        if tensor.dtype != self.dtype:
            raise ValueError(
                f"{name}: the stage produced a {tensor.dtype} tensor but pipeline messages are "
                f"{self.dtype} (config.pipeline_dtype / params_dtype); make them agree"
            )
        if not self.variable_seq_lengths and tensor_shape is not None and tuple(tensor.shape) != tuple(tensor_shape):
            raise ValueError(
                f"{name}: the stage produced shape {tuple(tensor.shape)} but the pipeline exchanges "
                f"{tuple(tensor_shape)} = (seq_length/cp[/tp with sequence parallel], micro_batch_size, "
                "hidden_size); check --seq-length / --micro-batch-size, or set variable_seq_lengths "
                "when shapes change between micro-batches"
            )

    def _exchange_shapes(self, send_next, send_prev, recv_prev, recv_next):
        """Send the shapes of the outgoing tensors and receive those of the incoming ones."""
        def encode(tensor):
            if tensor.dim() > _SHAPE_SLOTS - 1:
                raise ValueError(f"cannot send a {tensor.dim()}-dimensional tensor between stages "
                                 f"(at most {_SHAPE_SLOTS - 1} dimensions)")
            code = torch.zeros(_SHAPE_SLOTS, dtype=torch.int64, device=self.device)
            code[0] = tensor.dim()
            code[1:1 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
            return code

        def empty_code():
            return torch.empty(_SHAPE_SLOTS, dtype=torch.int64, device=self.device)

        code_prev = empty_code() if recv_prev else None
        code_next = empty_code() if recv_next else None
        self._batched(encode(send_next) if send_next is not None else None,
                      encode(send_prev) if send_prev is not None else None, code_prev, code_next)

        def decode(code):
            if code is None:
                return None
            values = code.tolist()
            return tuple(values[1:1 + values[0]])

        return decode(code_prev), decode(code_next)

    def prepare(self) -> None:
        """Collective: call on every stage before the first exchange on an NCCL group (the
        schedules do). Runs one all-reduce the first time a process group is seen; no-op on gloo
        and after the first call."""
        group = self.pp_group.group
        if group is None or dist.get_backend(group) != "nccl" or id(group) in _INITIALIZED_NCCL_GROUPS:
            return
        flag = torch.zeros(1, device=self.device)
        dist.all_reduce(flag, group=group)
        _INITIALIZED_NCCL_GROUPS.add(id(group))

    def _post(self, send_next, send_prev, recv_prev_buf, recv_next_buf) -> "PendingExchange":
        group = self.pp_group.group
        ops = []
        # Forward-flowing operations first, then backward-flowing ones (see the module docstring).
        if send_next is not None:
            ops.append(dist.P2POp(dist.isend, _contiguous(send_next), self.next_rank, group))
        if recv_prev_buf is not None:
            ops.append(dist.P2POp(dist.irecv, recv_prev_buf, self.prev_rank, group))
        if send_prev is not None:
            ops.append(dist.P2POp(dist.isend, _contiguous(send_prev), self.prev_rank, group))
        if recv_next_buf is not None:
            ops.append(dist.P2POp(dist.irecv, recv_next_buf, self.next_rank, group))
        if not ops:
            return PendingExchange([], [])
        with torch.no_grad():
            works = dist.batch_isend_irecv(ops)
        # The tensors stay referenced until the exchange is waited for, so a sent tensor's storage
        # outlives the transfer even when the stage frees the tensor (deallocate_output_tensor).
        return PendingExchange(works, [op.tensor for op in ops])

    def _batched(self, send_next, send_prev, recv_prev_buf, recv_next_buf) -> None:
        self._post(send_next, send_prev, recv_prev_buf, recv_next_buf).wait()


class PendingExchange:
    """Posted sends and receives; `wait()` blocks until they are done (then the received tensors
    are valid and the sent ones may be reused). Waiting again does nothing."""

    def __init__(self, works, tensors):
        self._works = list(works)
        self._tensors = list(tensors)

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works, self._tensors = [], []

    @property
    def done(self) -> bool:
        """True once waited for (not a poll of the transfer)."""
        return not self._works


def _contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous()
