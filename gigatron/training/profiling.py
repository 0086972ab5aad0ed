"""Megatron's training profiler flags, and how much communication the device hides behind compute.

    --profile [--use-pytorch-profiler] [--profile-step-start S] [--profile-step-end E] [--profile-ranks R ...]

profiles the training iterations run while the iteration count goes from S to E (those logged as
iterations S+1 ... E; Megatron's [start, end)) on the listed global ranks:

- with --use-pytorch-profiler: `torch.profiler.profile` (CPU and, on CUDA, CUDA activities;
  record_shapes off) with a schedule that records exactly those iterations (one warm-up iteration
  before them when there is one). Each profiler step is one loop iteration, from the start of its
  training step to the start of the next one (its log line, evaluation and save included). The
  Chrome trace is written atomically (a temporary name, then `os.replace`) to
  `<--tensorboard-dir>/rank{r}_iterations_{S}-{E}.pt.trace.json`, where TensorBoard's profiler
  plugin, chrome://tracing and ui.perfetto.dev read it. (`torch.profiler.tensorboard_trace_handler`,
  which Megatron uses, writes the final name directly and so cannot be made atomic; this module
  calls `export_chrome_trace` itself.)
- without it: `torch.cuda.cudart().cudaProfilerStart()` / `cudaProfilerStop()` around those
  iterations, with `torch.autograd.profiler.emit_nvtx()` ranges per op, for
  `nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop`; needs CUDA.

`overlap_summary(trace, steps)` reads such a Chrome trace and measures, per step, how long
communication runs, how long compute runs and how much communication no compute hides (the
"exposed" communication), by interval unions over each device's timeline (see its docstring).

`top_kernels(trace, steps, n)` lists the kernels with the most device time per step, and
`python -m gigatron.training.profiling TRACE` prints both.

This module imports torch only inside the profiler, so `overlap_summary` and `top_kernels` are
usable from tools and benches without it.
"""

from __future__ import annotations

import bisect
import gzip
import json
import os
import re
import warnings
from typing import Any, Iterable, Optional, Union

__all__ = [
    "validate_profile_args",
    "TrainingProfiler",
    "start_profiler",
    "trace_file_name",
    "overlap_summary",
    "top_kernels",
    "idle_gaps",
]


# ------------------------------------------------------------------ flags


def _check_profile_window(config) -> None:
    start, end = config.profile_step_start, config.profile_step_end
    if start < 0:
        raise ValueError(f"--profile-step-start {start} is negative; profiling covers the iterations run while the "
                         "iteration count goes from --profile-step-start to --profile-step-end: give a count >= 0")
    if start >= end:
        raise ValueError(f"--profile-step-start ({start}) must be smaller than --profile-step-end ({end}): profiling "
                         "covers the iterations run while the count goes from start to end (end exclusive), e.g. "
                         "--profile-step-start 10 --profile-step-end 12 for two iterations")


def _check_profile_ranks(config, world_size: int) -> None:
    ranks = list(config.profile_ranks or [])
    if not ranks:
        raise ValueError("--profile-ranks is empty: give the global ranks to profile, e.g. --profile-ranks 0")
    outside = [r for r in ranks if not 0 <= r < world_size]
    if outside:
        raise ValueError(f"--profile-ranks {' '.join(map(str, outside))}: no such rank in a run of {world_size} "
                         f"process{'es' if world_size != 1 else ''}; give global ranks 0..{world_size - 1}")


def _check_profiler_backend(config, cuda_available: bool, trace_dir: Optional[str]) -> None:
    if config.use_pytorch_profiler:
        if not trace_dir:
            raise ValueError("--profile --use-pytorch-profiler writes its trace into --tensorboard-dir (as Megatron "
                             "does), which is not set: add --tensorboard-dir DIR")
    elif not cuda_available:
        raise ValueError("--profile without --use-pytorch-profiler uses the CUDA profiler API (cudaProfilerStart/Stop, "
                         "for nsys profile --capture-range=cudaProfilerApi) and needs CUDA, but no CUDA device is "
                         "available: add --use-pytorch-profiler (and --tensorboard-dir DIR) for a torch.profiler "
                         "trace on the CPU, or drop --profile")


def validate_profile_args(config, world_size: int, cuda_available: Optional[bool] = None,
                          trace_dir: Optional[str] = None) -> None:
    """Check the --profile flags at start-up; raise ValueError naming the flags and the fix.

    `config` is the TrainingConfig (or anything with its profile fields); `trace_dir` the
    --tensorboard-dir the trace goes to (default: `config.tensorboard_dir` where `config` has it).
    Without --profile the other profiling flags have no effect (as in Megatron) and are not checked.
    `cuda_available` defaults to torch.cuda.is_available() (the run's device follows it).
    """
    if not getattr(config, "profile", False):
        return
    _check_profile_window(config)
    _check_profile_ranks(config, world_size)
    train_iters = getattr(config, "train_iters", None)
    if train_iters is not None:
        _check_window_fits(config, train_iters)
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    _check_profiler_backend(config, cuda_available, trace_dir or getattr(config, "tensorboard_dir", None))


def _check_window_fits(config, train_iters: int) -> None:
    if config.profile_step_end > train_iters:
        raise ValueError(f"--profile-step-end {config.profile_step_end} is beyond the {train_iters} training iterations "
                         "(--train-iters / --train-samples), so the profiled range would be cut short or never "
                         "reached: lower --profile-step-start/--profile-step-end or train longer")


def trace_file_name(rank: int, start: int, end: int) -> str:
    """The trace of `rank` covering iteration counts [start, end) (TensorBoard's *.pt.trace.json)."""
    return f"rank{rank}_iterations_{start}-{end}.pt.trace.json"


# ------------------------------------------------------------------ the profiler


class TrainingProfiler:
    """--profile on one rank: call `before_iteration(count)` at the top of every loop iteration
    (count = iterations completed so far) and `close(count)` when the loop ends (normally, on an
    exit condition or on an error)."""

    def __init__(self, *, start: int, end: int, rank: int, use_pytorch_profiler: bool, trace_dir: Optional[str],
                 cuda: bool, first_iteration: int) -> None:
        # A resumed run that starts inside the window profiles the rest of it.
        self.start = max(start, first_iteration)
        self.end = end
        self.rank = rank
        self.use_pytorch_profiler = use_pytorch_profiler
        self.trace_dir = trace_dir
        self.cuda = cuda
        self.first_iteration = first_iteration
        self.trace_path: Optional[str] = None
        self._profiler = None
        self._nvtx = None
        self._started = False
        self._done = self.start >= end
        self._recorded: list[int] = []  # iteration counts whose step ran while recording

    def _make_torch_profiler(self):
        import torch
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU]
        if self.cuda and torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        # Profiler step k is the iteration with count first_iteration + k (start() opens step 0).
        before = self.start - self.first_iteration
        warmup = 1 if before >= 1 else 0
        with warnings.catch_warnings():
            if warmup == 0:  # profiling from the first iteration: there is no earlier one to warm up on
                warnings.filterwarnings("ignore", message="Profiler won't be using warmup")
            plan = schedule(wait=before - warmup, warmup=warmup, active=self.end - self.start, repeat=1)
        return profile(activities=activities, schedule=plan, record_shapes=False, on_trace_ready=None)

    def before_iteration(self, iteration: int) -> None:
        """The loop is about to run the iteration that takes the count from `iteration` to `iteration + 1`."""
        if self._done:
            return
        if iteration >= self.end:
            self._finish(iteration)
            return
        if self.use_pytorch_profiler:
            from torch.profiler import ProfilerAction

            if not self._started:
                self._profiler = self._make_torch_profiler()
                self._profiler.start()
                self._started = True
            else:
                self._profiler.step()
            if self._profiler.current_action in (ProfilerAction.RECORD, ProfilerAction.RECORD_AND_SAVE):
                self._recorded.append(iteration)
        elif iteration >= self.start and not self._started:
            import torch

            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStart()
            self._nvtx = torch.autograd.profiler.emit_nvtx()
            self._nvtx.__enter__()
            self._started = True
            self._recorded.append(iteration)
        elif self._started:
            self._recorded.append(iteration)

    def close(self, iteration: int) -> None:
        """The loop ended with `iteration` iterations completed: stop a profiler still running and
        write what it recorded (the cut-short range is in the file name)."""
        if self._done:
            return
        if not self._started:
            self._done = True
            print(f"> rank {self.rank}: training ended at iteration {iteration}, before --profile-step-start "
                  f"{self.start}: nothing was profiled", flush=True)
            return
        self._finish(iteration)

    def _finish(self, iteration: int) -> None:
        self._done = True
        if self.use_pytorch_profiler:
            with warnings.catch_warnings():
                # Cut short by an exit condition: torch warns that RECORD is followed by NONE; the
                # recorded part is written below all the same.
                warnings.filterwarnings("ignore", message="Incorrect schedule")
                self._profiler.stop()
            if not self._recorded:
                print(f"> rank {self.rank}: training ended at iteration {iteration}, before --profile-step-start "
                      f"{self.start}: nothing was profiled", flush=True)
                return
            first, last = self._recorded[0], self._recorded[-1] + 1
            os.makedirs(self.trace_dir, exist_ok=True)
            path = os.path.join(self.trace_dir, trace_file_name(self.rank, first, last))
            temporary = f"{path}.tmp{os.getpid()}"
            try:
                self._profiler.export_chrome_trace(temporary)
                os.replace(temporary, path)
            finally:
                if os.path.exists(temporary):
                    os.remove(temporary)
            self.trace_path = path
            print(f"> rank {self.rank}: wrote the torch.profiler trace of iterations {first + 1} to {last} (count "
                  f"{first} -> {last}) to {path} (TensorBoard's profiler plugin, chrome://tracing or "
                  "https://ui.perfetto.dev)", flush=True)
        else:
            import torch

            torch.cuda.synchronize()
            self._nvtx.__exit__(None, None, None)
            torch.cuda.cudart().cudaProfilerStop()
            first, last = self._recorded[0], self._recorded[-1] + 1
            print(f"> rank {self.rank}: cudaProfilerStop after iterations {first + 1} to {last} (count {first} -> "
                  f"{last}); nsys writes the capture to its -o file (run under nsys profile "
                  "--capture-range=cudaProfilerApi)", flush=True)


def start_profiler(config, rank: int, first_iteration: int, train_iters: int, cuda: bool,
                   trace_dir: Optional[str] = None) -> Optional[TrainingProfiler]:
    """The profiler of this rank for --profile, or None (no --profile, or a rank not in --profile-ranks).

    `config` is the TrainingConfig (or anything with its profile fields); `trace_dir` as in
    `validate_profile_args`.

    `first_iteration` is the count the loop starts from (a resumed run's iteration); `train_iters`
    the count it runs to. Raises ValueError if the profiled range ends beyond `train_iters`.
    """
    if not getattr(config, "profile", False):
        return None
    _check_window_fits(config, train_iters)
    if rank not in config.profile_ranks:
        return None
    profiler = TrainingProfiler(start=config.profile_step_start, end=config.profile_step_end, rank=rank,
                                use_pytorch_profiler=config.use_pytorch_profiler,
                                trace_dir=trace_dir or getattr(config, "tensorboard_dir", None),
                                cuda=cuda, first_iteration=first_iteration)
    if first_iteration >= config.profile_step_end:
        print(f"> rank {rank}: --profile: the run resumes at iteration {first_iteration}, after --profile-step-end "
              f"{config.profile_step_end}: nothing will be profiled", flush=True)
    return profiler


# ------------------------------------------------------------------ overlap analysis

_DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset", "memcpy", "memset"}  # the last two: older Kineto
_STEP_NAME = re.compile(r"^ProfilerStep#\d+$")
# collective calls and waits on the calling thread: not compute
_CPU_COLLECTIVE_PREFIXES = ("c10d::", "c10d_functional::", "_c10d_functional::", "record_param_comms")


def _load_events(trace: Union[str, os.PathLike, dict, list]) -> list:
    if isinstance(trace, (str, os.PathLike)):
        path = os.fspath(trace)
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as handle:
            trace = json.load(handle)
    if isinstance(trace, list):  # the JSON array form of the Chrome trace format
        return trace
    if isinstance(trace, dict) and isinstance(trace.get("traceEvents"), list):
        return trace["traceEvents"]
    raise ValueError("not a Chrome trace: expected a JSON object with a traceEvents list (as written by "
                     "torch.profiler's export_chrome_trace) or a JSON array of events")


def _merge(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Union of [start, end) intervals as sorted, disjoint intervals."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def _length(merged: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in merged)


def _uncovered(merged: list[tuple[float, float]], cover: list[tuple[float, float]]) -> float:
    """Length of the part of `merged` outside `cover` (both sorted and disjoint)."""
    total, j = 0.0, 0
    for start, end in merged:
        position = start
        while j < len(cover) and cover[j][1] <= position:
            j += 1
        k = j
        while k < len(cover) and cover[k][0] < end:
            if cover[k][0] > position:
                total += cover[k][0] - position
            position = max(position, cover[k][1])
            if position >= end:
                break
            k += 1
        if position < end:
            total += end - position
    return total


def _span(event: dict) -> tuple[float, float]:
    start = float(event["ts"])
    return start, start + float(event.get("dur", 0.0))


def _device_timelines(events: list) -> dict[Any, tuple[list, list]]:
    """Device -> (communication intervals, compute intervals) from kernel/memcpy/memset events."""
    timelines: dict[Any, tuple[list, list]] = {}
    for event in events:
        if event.get("ph") != "X" or str(event.get("cat", "")).lower() not in _DEVICE_CATEGORIES:
            continue
        device = (event.get("args") or {}).get("device", event.get("pid"))
        comm, compute = timelines.setdefault(device, ([], []))
        is_comm = str(event.get("cat", "")).lower() == "kernel" and "nccl" in str(event.get("name", "")).lower()
        (comm if is_comm else compute).append(_span(event))
    return timelines


def _inside(point: float, merged: list[tuple[float, float]]) -> bool:
    i = bisect.bisect_right(merged, (point, float("inf"))) - 1
    return i >= 0 and merged[i][0] <= point < merged[i][1]


def _spans_without_collectives(ops: list[tuple[float, float]], collectives: list[tuple[float, float]]):
    """The operator spans of one thread that enclose no collective call (innermost ones always do not)."""
    tagged = [(span, False) for span in ops] + [(span, True) for span in collectives]
    tagged.sort(key=lambda item: (item[0][0], -item[0][1]))
    encloses = [False] * len(tagged)
    open_spans: list[int] = []  # indices of the spans enclosing the current one, innermost last
    for i, ((start, end), is_collective) in enumerate(tagged):
        while open_spans and tagged[open_spans[-1]][0][1] <= start:
            open_spans.pop()
        if is_collective:
            for j in open_spans:
                encloses[j] = True
        open_spans.append(i)
    return [span for (span, is_collective), enclosing in zip(tagged, encloses) if not is_collective and not enclosing]


def _cpu_timelines(events: list) -> dict[Any, tuple[list, list]]:
    """Process -> (communication intervals, compute intervals) of a CPU-only (gloo) trace.

    Communication: ProcessGroupGloo's `gloo:<collective>` annotations, which cover the collective's
    run on gloo's worker threads. Compute: operator (`cpu_op`) time on every thread, except
    - the collective calls (c10d::*, functional collectives and their waits) and ops inside them or
      inside a gloo annotation on the same thread (the collective's own copies);
    - operators that enclose a collective call (an autograd node whose backward all-reduces, a
      gradient hook that starts a reduction): their time includes waiting for the collective, so
      only the operators inside them count.
    Python time outside operators and annotations (ProfilerStep#, DataLoader, Optimizer.step) are
    not compute.
    """
    comm_by_thread: dict[tuple, list] = {}
    collective_by_thread: dict[tuple, list] = {}
    ops_by_thread: dict[tuple, list] = {}
    for event in events:
        if event.get("ph") != "X":
            continue
        name = str(event.get("name", ""))
        key = (event.get("pid"), event.get("tid"))
        if name.startswith("gloo:"):
            comm_by_thread.setdefault(key, []).append(_span(event))
        elif event.get("cat") == "cpu_op":
            if name.startswith(_CPU_COLLECTIVE_PREFIXES) or "wait_tensor" in name:
                collective_by_thread.setdefault(key, []).append(_span(event))
            else:
                ops_by_thread.setdefault(key, []).append(_span(event))
    timelines: dict[Any, tuple[list, list]] = {}
    for (pid, _tid), spans in comm_by_thread.items():
        timelines.setdefault(pid, ([], []))[0].extend(spans)
    for key, spans in ops_by_thread.items():
        collectives = collective_by_thread.get(key, [])
        excluded = _merge(comm_by_thread.get(key, []) + collectives)
        compute = timelines.setdefault(key[0], ([], []))[1]
        for span in _spans_without_collectives(spans, collectives):
            if not _inside(span[0], excluded):
                compute.append(span)
    return timelines


def _count_steps(events: list) -> int:
    return len({e.get("name") for e in events if e.get("ph") == "X" and _STEP_NAME.match(str(e.get("name", "")))})


def overlap_summary(trace_path_or_dict: Union[str, os.PathLike, dict, list], steps: Optional[int] = None) -> dict:
    """Per-step communication, compute and exposed communication of a Chrome trace, in milliseconds.

    `trace_path_or_dict`: a trace file (`.json` or `.json.gz`) as written by torch.profiler's
    `export_chrome_trace` (the --profile --use-pytorch-profiler trace), or its parsed JSON.
    `steps`: the number of iterations the trace covers; by default the number of distinct
    `ProfilerStep#N` annotations in it.

    With device events (a CUDA trace: `"ph": "X"` events of `cat` `kernel`, `gpu_memcpy` or
    `gpu_memset`, each with `ts` and `dur` in microseconds, grouped by device, `args.device` or
    else `pid`):
      - communication: kernels whose name contains "nccl" (any case, e.g.
        ncclDevKernel_AllReduce_Sum_f32_RING_LL);
      - compute: every other kernel, memcpy and memset.
    Without device events (a CPU run on gloo), the same figures come from the CPU timeline:
    communication is ProcessGroupGloo's `gloo:<collective>` annotations (its worker threads),
    compute is operator time on every thread (see `_cpu_timelines`). A one-process CPU run has no
    communication.

    Returns a dict:
      timeline          "device" or "cpu" (which events were measured)
      steps             the divisor
      comm_ms           time during which at least one communication kernel runs (two overlapping
                        collectives on two streams count once)
      compute_ms        time during which at least one compute kernel / copy runs
      exposed_comm_ms   communication time during which no compute runs: what overlap did not hide
      hidden_comm_ms    comm_ms - exposed_comm_ms
    each summed over the devices (processes) in the trace and divided by `steps`. Communication
    time includes the time a collective waits for its peers, so on a rank that arrives early it
    also measures the other ranks' lateness.
    """
    events = _load_events(trace_path_or_dict)
    if steps is None:
        steps = _count_steps(events)
        if steps == 0:
            raise ValueError("the trace has no ProfilerStep#N annotations (it was not recorded with a "
                             "torch.profiler schedule): pass steps= the number of iterations it covers")
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    timelines = _device_timelines(events)
    timeline = "device"
    if not timelines:
        timelines = _cpu_timelines(events)
        timeline = "cpu"
    comm_total = compute_total = exposed_total = 0.0
    for comm, compute in timelines.values():
        comm_merged, compute_merged = _merge(comm), _merge(compute)
        comm_total += _length(comm_merged)
        compute_total += _length(compute_merged)
        exposed_total += _uncovered(comm_merged, compute_merged)
    per_step = 1000.0 * steps  # microseconds in the trace -> milliseconds per step
    return dict(timeline=timeline, steps=steps, comm_ms=comm_total / per_step, compute_ms=compute_total / per_step,
                exposed_comm_ms=exposed_total / per_step, hidden_comm_ms=(comm_total - exposed_total) / per_step)


def top_kernels(trace_path_or_dict: Union[str, os.PathLike, dict, list], steps: Optional[int] = None,
                n: int = 20) -> list[tuple[str, float, float]]:
    """The `n` device kernels (and copies) with the most time in a CUDA trace: (name, milliseconds
    per step, launches per step), most time first; names are cut to 100 characters and kernels
    with the same cut name are added up. `steps` as in overlap_summary. Empty for a CPU trace."""
    events = _load_events(trace_path_or_dict)
    steps = steps or _count_steps(events) or 1
    totals: dict[str, list[float]] = {}
    for event in events:
        if event.get("ph") != "X" or str(event.get("cat", "")).lower() not in _DEVICE_CATEGORIES:
            continue
        entry = totals.setdefault(str(event.get("name", "?"))[:100], [0.0, 0.0])
        entry[0] += float(event.get("dur", 0.0))
        entry[1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:n]
    return [(name, us / 1000.0 / steps, count / steps) for name, (us, count) in ranked]


def idle_gaps(spans: Iterable[tuple[float, float, str]], steps: int = 1, top: int = 8) -> dict:
    """Where a device sits idle between consecutive kernels. spans: (start us, end us, name) of
    the device's kernels and copies (overlapping spans leave no gap). Returns idle_ms and gaps
    per step, the median gap in us, and `pairs`: the `top` (kernel before, kernel after) name
    pairs (cut to 40 characters) with the most idle time, as (before, after, ms per step, gaps
    per step). Small gaps mean fusing kernels would save little: the kernels must get faster."""
    steps = max(int(steps), 1)
    gaps: list[float] = []
    by_pair: dict[tuple[str, str], list[float]] = {}
    end: Optional[float] = None
    previous = ""
    for start, stop, name in sorted(spans):
        if end is not None and start > end:
            entry = by_pair.setdefault((previous[:40], str(name)[:40]), [0.0, 0.0])
            entry[0] += start - end
            entry[1] += 1
            gaps.append(start - end)
        if end is None or stop > end:
            end, previous = stop, str(name)
    gaps.sort()
    ranked = sorted(by_pair.items(), key=lambda item: -item[1][0])[:top]
    return dict(idle_ms=sum(gaps) / 1000.0 / steps, gaps=len(gaps) / steps,
                median_us=gaps[len(gaps) // 2] if gaps else 0.0,
                pairs=[(a, b, us / 1000.0 / steps, count / steps) for (a, b), (us, count) in ranked])


def main(argv=None) -> int:
    """python -m gigatron.training.profiling TRACE [--top N]: the overlap summary and top kernels of
    a --profile --use-pytorch-profiler trace."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("trace", help="a trace written by --profile --use-pytorch-profiler (.json or .json.gz)")
    parser.add_argument("--top", type=int, default=20, help="how many kernels to list")
    parser.add_argument("--steps", type=int, default=None, help="iterations in the trace (default: counted)")
    args = parser.parse_args(argv)
    summary = overlap_summary(args.trace, args.steps)
    print(f"{args.trace}: {summary['steps']} steps ({summary['timeline']} timeline), per step: compute "
          f"{summary['compute_ms']:.1f} ms, communication {summary['comm_ms']:.1f} ms of which exposed "
          f"{summary['exposed_comm_ms']:.1f} ms")
    rows = top_kernels(args.trace, summary["steps"], args.top)
    if rows:
        print(f"{'ms/step':>9} {'calls/step':>10}  kernel")
        for name, ms, calls in rows:
            print(f"{ms:9.2f} {calls:10.1f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
