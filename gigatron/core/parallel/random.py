"""Random number streams for model parallelism, and activation recompute that replays them.

- The default generators (CPU and CUDA) carry the same seed on every tensor-parallel rank:
  dropout outside tensor-parallel regions (on replicated activations) draws the same mask everywhere.
- `RNGStatesTracker` holds named extra streams. Inside `tracker.fork()` the default generators are
  swapped for the "model-parallel-rng" stream, seeded differently per tensor-parallel rank, for
  dropout on tensor-parallel (sharded) activations; "expert-parallel-rng" does the same for experts.
- `checkpoint(fn, distribute_saved_activations, *args)` runs `fn` without keeping its activations
  and runs it again in backward with the CPU, CUDA and tracker states it saw the first time, so
  the recomputed dropout masks equal the original ones.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch

from .groups import Group, ParallelGroups
from .mappings import all_gather

__all__ = [
    "MODEL_PARALLEL_RNG",
    "EXPERT_PARALLEL_RNG",
    "DATA_PARALLEL_RNG",
    "RNGState",
    "RNGStatesTracker",
    "get_tracker",
    "model_parallel_seed",
    "get_rng_state",
    "set_rng_state",
    "checkpoint",
]

MODEL_PARALLEL_RNG = "model-parallel-rng"
EXPERT_PARALLEL_RNG = "expert-parallel-rng"
DATA_PARALLEL_RNG = "data-parallel-rng"


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class RNGState:
    """Snapshot of the default CPU generator and, when CUDA is in use, the current CUDA device's."""

    __slots__ = ("cpu", "cuda")

    def __init__(self, cpu: torch.Tensor, cuda: Optional[torch.Tensor]):
        self.cpu = cpu
        self.cuda = cuda


def get_rng_state() -> RNGState:
    """The current states of the default CPU and (if initialized) CUDA generators."""
    return RNGState(torch.get_rng_state(), torch.cuda.get_rng_state() if _cuda_ready() else None)


def set_rng_state(state: RNGState) -> None:
    """Restore states captured by get_rng_state."""
    torch.set_rng_state(state.cpu)
    if state.cuda is not None:
        torch.cuda.set_rng_state(state.cuda)


def _seeded_state(seed: int) -> RNGState:
    """The generator states that `seed` gives, without disturbing the current ones."""
    cpu_saved = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    cpu = torch.get_rng_state()
    torch.set_rng_state(cpu_saved)
    cuda = None
    if torch.cuda.is_available():
        cuda_saved = torch.cuda.get_rng_state()  # initializes CUDA lazily (current device)
        torch.cuda.manual_seed(seed)
        cuda = torch.cuda.get_rng_state()
        torch.cuda.set_rng_state(cuda_saved)
    return RNGState(cpu, cuda)


class RNGStatesTracker:
    """Named random streams; `fork(name)` makes one of them the default generator for a block."""

    def __init__(self):
        self._states: dict[str, RNGState] = {}
        self._seeds: set[int] = set()

    def reset(self) -> None:
        self._states = {}
        self._seeds = set()

    def add(self, name: str, seed: int) -> None:
        """Create stream `name` seeded with `seed` (names and seeds must be new)."""
        if seed in self._seeds:
            raise ValueError(f"RNG seed {seed} is already used by another stream of the tracker")
        if name in self._states:
            raise ValueError(f"RNG stream '{name}' already exists")
        self._seeds.add(seed)
        self._states[name] = _seeded_state(seed)

    def names(self) -> list[str]:
        return list(self._states)

    def get_states(self) -> dict[str, RNGState]:
        """A copy of every stream's state (for checkpoint/recompute)."""
        return {name: RNGState(s.cpu.clone(), None if s.cuda is None else s.cuda.clone())
                for name, s in self._states.items()}

    def set_states(self, states: dict[str, RNGState]) -> None:
        self._states = dict(states)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        """Inside the block the default CPU/CUDA generators draw from stream `name`; afterwards they
        continue where they were, and the stream remembers how far it advanced."""
        if name not in self._states:
            raise ValueError(
                f"RNG stream '{name}' does not exist (have {self.names()}); call "
                f"model_parallel_seed(seed, groups) first"
            )
        outer = get_rng_state()
        stream = self._states[name]
        torch.set_rng_state(stream.cpu)
        if stream.cuda is not None and _cuda_ready():
            torch.cuda.set_rng_state(stream.cuda)
        try:
            yield
        finally:
            self._states[name] = RNGState(
                torch.get_rng_state(),
                torch.cuda.get_rng_state() if stream.cuda is not None and _cuda_ready() else stream.cuda,
            )
            set_rng_state(outer)


_DEFAULT_TRACKER = RNGStatesTracker()


def get_tracker() -> RNGStatesTracker:
    """The process-wide tracker that model_parallel_seed seeds unless given another one."""
    return _DEFAULT_TRACKER


def model_parallel_seed(seed: int, groups: ParallelGroups, tracker: Optional[RNGStatesTracker] = None
                        ) -> RNGStatesTracker:
    """Seed the default generators with `seed` and (re)create the tracker's streams:
    "model-parallel-rng" = seed + 2718 + tp_rank, "expert-parallel-rng" =
    seed + 1024 + 100 * ep_rank + expert_tp_rank, "data-parallel-rng" = seed (Megatron's values).
    Works on CPU and CUDA; returns the tracker."""
    tracker = _DEFAULT_TRACKER if tracker is None else tracker
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)
    tracker.reset()
    tracker.add(DATA_PARALLEL_RNG, seed)
    tracker.add(MODEL_PARALLEL_RNG, seed + 2718 + groups.tp.rank)
    tracker.add(EXPERT_PARALLEL_RNG, seed + 1024 + 100 * max(groups.ep.rank, 0) + max(groups.expt_tp.rank, 0))
    return tracker


# ---------------------------------------------------------------------------------------------
# Activation recompute.
# ---------------------------------------------------------------------------------------------


def _split_for_rank(x: torch.Tensor, group: Group) -> torch.Tensor:
    """This rank's 1/t of the flattened tensor (a new, compact tensor)."""
    flat = x.reshape(-1)  # [n]
    if flat.numel() % group.size != 0:
        raise ValueError(
            f"--distribute-saved-activations: the checkpointed input has {flat.numel()} elements, "
            f"not divisible by --tensor-model-parallel-size {group.size}"
        )
    length = flat.numel() // group.size
    return flat.narrow(0, group.rank * length, length).clone()


class _Checkpoint(torch.autograd.Function):
    """forward: run `fn` without saving activations (keeps inputs and RNG states); backward: run it
    again with the saved RNG states and backpropagate through the recomputed graph."""

    @staticmethod
    def forward(ctx, fn, distribute, tp, tracker, *args):
        ctx.fn = fn
        ctx.distribute = distribute
        ctx.tp = tp
        ctx.tracker = tracker
        ctx.rng_state = get_rng_state()
        ctx.tracker_states = tracker.get_states()
        with torch.no_grad():
            outputs = fn(*args)

        if distribute:
            # Keep only this rank's 1/t of the first input; the caller's tensor shrinks too.
            first = args[0]
            ctx.first_shape = first.shape
            first.data = _split_for_rank(first.data, tp)

        tensor_index, saved, others = [], [], []
        for i, arg in enumerate(args):
            if torch.is_tensor(arg):
                tensor_index.append(i)
                saved.append(arg)
            else:
                others.append((i, arg))
        ctx.num_args = len(args)
        ctx.tensor_index = tensor_index
        ctx.others = others
        ctx.save_for_backward(*saved)
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError("checkpoint(): recompute works with .backward() only, not torch.autograd.grad()")
        saved = ctx.saved_tensors
        if ctx.distribute:
            first = saved[0]
            full = all_gather(first.data.reshape(-1), ctx.tp, dim=0)  # [n]
            first.data = full.view(ctx.first_shape)
        args: list[Any] = [None] * ctx.num_args
        for i, tensor in zip(ctx.tensor_index, saved):
            detached = tensor.detach()
            detached.requires_grad_(tensor.requires_grad)
            args[i] = detached
        for i, arg in ctx.others:
            args[i] = arg

        current, current_tracker = get_rng_state(), ctx.tracker.get_states()
        set_rng_state(ctx.rng_state)
        ctx.tracker.set_states(ctx.tracker_states)
        try:
            with torch.enable_grad():
                outputs = ctx.fn(*args)
        finally:
            set_rng_state(current)
            ctx.tracker.set_states(current_tracker)

        if torch.is_tensor(outputs):
            outputs = (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads)
                 if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        input_grads = tuple(a.grad if torch.is_tensor(a) else None for a in args)
        return (None, None, None, None) + input_grads


def checkpoint(function: Callable, distribute_saved_activations: bool, *args,
               tp: Optional[Group] = None, tracker: Optional[RNGStatesTracker] = None):
    """Run `function(*args)` keeping only its inputs; recompute it in backward.

    The CPU, CUDA and tracker RNG states at the call are restored for the recompute, so dropout
    masks (inside or outside `tracker.fork()`) are the same both times. With
    `distribute_saved_activations` (needs `tp`), the first argument's storage is reduced to this
    rank's 1/t between forward and backward and all-gathered again for the recompute; the caller
    must not read that tensor in between. `tracker` defaults to get_tracker(). Under
    torch.no_grad() the function simply runs."""
    if distribute_saved_activations and tp is None:
        raise ValueError("checkpoint(distribute_saved_activations=True) needs the tensor-parallel group (tp=...)")
    tp = tp if tp is not None else Group.single()
    distribute = bool(distribute_saved_activations) and tp.size > 1
    if distribute and not torch.is_tensor(args[0] if args else None):
        raise ValueError("checkpoint(distribute_saved_activations=True): the first argument must be a tensor")
    if not torch.is_grad_enabled():
        # Nothing will be backpropagated (evaluation, inference): no activations to drop.
        return function(*args)
    tracker = _DEFAULT_TRACKER if tracker is None else tracker
    return _Checkpoint.apply(function, distribute, tp, tracker, *args)
