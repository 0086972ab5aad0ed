"""--profile / --use-pytorch-profiler and the communication overlap analysis of a Chrome trace."""

import gzip
import json
import os

import pytest
import torch

from gigatron.training.arguments import parse_args
from gigatron.training.profiling import (
    TrainingProfiler,
    overlap_summary,
    start_profiler,
    trace_file_name,
    validate_profile_args,
)

# ------------------------------------------------------------------ hand-built traces


def _kernel(name, ts, dur, stream=7, device=0, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "pid": device, "tid": stream, "ts": ts, "dur": dur,
            "args": {"device": device, "stream": stream}}


NCCL = "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevComm*, unsigned long, ncclWork*)"
GEMM = "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64"


def _trace(*events):
    return {"schemaVersion": 1, "traceEvents": list(events)}


def test_full_overlap_hides_all_communication():
    trace = _trace(_kernel(GEMM, 1000, 100), _kernel(NCCL, 1020, 40, stream=20))
    assert overlap_summary(trace, steps=1) == dict(timeline="device", steps=1, comm_ms=40 / 1000,
                                                   compute_ms=100 / 1000, exposed_comm_ms=0.0,
                                                   hidden_comm_ms=40 / 1000)


def test_partial_overlap():
    trace = _trace(_kernel(GEMM, 0, 100), _kernel(NCCL, 80, 70, stream=20))
    summary = overlap_summary(trace, steps=1)
    assert summary["comm_ms"] == 70 / 1000
    assert summary["compute_ms"] == 100 / 1000
    assert summary["exposed_comm_ms"] == 50 / 1000
    assert summary["hidden_comm_ms"] == 20 / 1000


def test_no_overlap_exposes_all_communication():
    trace = _trace(_kernel(GEMM, 0, 100), _kernel(NCCL, 200, 60, stream=20))
    summary = overlap_summary(trace, steps=1)
    assert (summary["comm_ms"], summary["compute_ms"], summary["exposed_comm_ms"]) == (60 / 1000, 100 / 1000,
                                                                                         60 / 1000)
    assert summary["hidden_comm_ms"] == 0.0


def test_overlapping_comm_on_two_streams_counts_once_and_copies_are_compute():
    trace = _trace(
        _kernel(NCCL, 100, 100, stream=20),                                  # [100, 200)
        _kernel("ncclKernel_ReduceScatter_RING_LL_Sum_float", 120, 20, stream=20),  # nested in it
        _kernel("NCCLDEVKERNEL_AllGather_RING_LL", 150, 150, stream=21),    # [150, 300), other stream, any case
        _kernel(GEMM, 0, 130),                                               # [0, 130)
        _kernel("elementwise_kernel", 250, 10),                              # [250, 260)
        _kernel("Memcpy DtoD (Device -> Device)", 280, 10, stream=8, cat="gpu_memcpy"),  # [280, 290)
        _kernel("Memset (Device)", 285, 2, stream=8, cat="gpu_memset"),      # inside the copy
        # not device work: CPU-side annotations and launches, flow arrows
        {"ph": "X", "cat": "user_annotation", "name": "nccl:all_reduce", "pid": 4242, "tid": 1, "ts": 0, "dur": 400},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": 4242, "tid": 1, "ts": 90, "dur": 5},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 4242, "tid": 1, "ts": 0, "dur": 500},
        {"ph": "s", "cat": "ac2g", "name": "ac2g", "pid": 4242, "tid": 1, "ts": 90, "id": 1},
    )
    # comm union [100, 300) = 200; compute union [0,130) + [250,260) + [280,290) = 150;
    # exposed [130,250) + [260,280) + [290,300) = 150; hidden 30 + 10 + 10 = 50. Two steps.
    summary = overlap_summary(trace, steps=2)
    assert summary == dict(timeline="device", steps=2, comm_ms=200 / 2000, compute_ms=150 / 2000,
                           exposed_comm_ms=150 / 2000, hidden_comm_ms=50 / 2000)


def test_devices_are_summed_and_steps_counted_from_profiler_step_annotations():
    trace = _trace(
        _kernel(GEMM, 0, 100, device=0), _kernel(NCCL, 50, 100, stream=20, device=0),    # exposed 50
        _kernel(GEMM, 0, 100, device=1), _kernel(NCCL, 300, 40, stream=20, device=1),    # exposed 40
        {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#7", "pid": 9, "tid": 9, "ts": 0, "dur": 200},
        {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#8", "pid": 9, "tid": 9, "ts": 200, "dur": 200},
        # Kineto mirrors the step annotations on the device timeline: same names, not more steps
        {"ph": "X", "cat": "gpu_user_annotation", "name": "ProfilerStep#7", "pid": 0, "tid": 7, "ts": 0, "dur": 150},
    )
    summary = overlap_summary(trace)
    assert summary["steps"] == 2
    assert summary["comm_ms"] == 140 / 2000
    assert summary["compute_ms"] == 200 / 2000
    assert summary["exposed_comm_ms"] == 90 / 2000


def test_gloo_cpu_trace():
    main, gloo = 11, 12
    cpu_op = dict(ph="X", cat="cpu_op", pid=1)
    trace = _trace(
        {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#3", "pid": 1, "tid": main, "ts": 0, "dur": 1000},
        {**cpu_op, "name": "aten::linear", "tid": main, "ts": 0, "dur": 300},        # its own time is compute
        {**cpu_op, "name": "aten::mm", "tid": main, "ts": 20, "dur": 260},
        {**cpu_op, "name": "c10d::allreduce_", "tid": main, "ts": 300, "dur": 10},   # enqueues: not compute
        {**cpu_op, "name": "aten::copy_", "tid": main, "ts": 302, "dur": 3},         # inside the enqueue
        {**cpu_op, "name": "aten::mm", "tid": main, "ts": 400, "dur": 200},
        # an autograd node whose backward runs a collective: it blocks while gloo works, only the
        # ops inside it are compute
        {**cpu_op, "name": "autograd::engine::evaluate_function: _AllReduceBackward", "tid": main, "ts": 650,
         "dur": 170},
        {**cpu_op, "name": "aten::mul", "tid": main, "ts": 650, "dur": 10},
        {**cpu_op, "name": "c10d::broadcast_", "tid": main, "ts": 690, "dur": 5},
        {"ph": "X", "cat": "user_annotation", "name": "gloo:all_reduce", "pid": 1, "tid": gloo, "ts": 310, "dur": 190},
        {**cpu_op, "name": "aten::copy_", "tid": gloo, "ts": 320, "dur": 10},        # the collective's own copy
        {"ph": "X", "cat": "user_annotation", "name": "gloo:broadcast", "pid": 1, "tid": gloo, "ts": 700, "dur": 100},
    )
    # compute [0,300) + [400,600) + [650,660) = 510; comm [310,500) + [700,800) = 290;
    # exposed [310,400) + [700,800) = 190
    assert overlap_summary(trace) == dict(timeline="cpu", steps=1, comm_ms=290 / 1000, compute_ms=510 / 1000,
                                          exposed_comm_ms=190 / 1000, hidden_comm_ms=100 / 1000)


def test_trace_files_json_and_gzip(tmp_path):
    trace = _trace(_kernel(GEMM, 0, 100), _kernel(NCCL, 80, 70, stream=20))
    plain = tmp_path / "rank0.pt.trace.json"
    plain.write_text(json.dumps(trace))
    packed = tmp_path / "rank0.pt.trace.json.gz"
    with gzip.open(packed, "wt") as handle:
        json.dump(trace["traceEvents"], handle)  # the JSON-array form of the format
    assert overlap_summary(plain, steps=1) == overlap_summary(str(packed), steps=1) == overlap_summary(trace, steps=1)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="no ProfilerStep#N annotations.*steps="):
        overlap_summary(_trace(_kernel(GEMM, 0, 1)))
    with pytest.raises(ValueError, match="not a Chrome trace"):
        overlap_summary({"events": []}, steps=1)
    with pytest.raises(ValueError, match="steps must be positive"):
        overlap_summary(_trace(), steps=0)


# ------------------------------------------------------------------ flags


BASE = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3",
        "--mock-data", "--vocab-size", "4096", "--num-workers", "0", "--log-interval", "1", "--eval-iters", "0",
        "--attention-dropout", "0", "--hidden-dropout", "0"]


def test_flags_and_megatron_defaults():
    args = parse_args(BASE + ["--train-iters", "20"])
    assert (args.profile, args.use_pytorch_profiler, args.profile_step_start, args.profile_step_end,
            args.profile_ranks) == (False, False, 10, 12, [0])
    args = parse_args(BASE + ["--train-iters", "20", "--profile", "--use-pytorch-profiler", "--profile-step-start",
                              "3", "--profile-step-end", "7", "--profile-ranks", "0", "2", "--tensorboard-dir", "tb"])
    assert (args.profile, args.use_pytorch_profiler, args.profile_step_start, args.profile_step_end,
            args.profile_ranks) == (True, True, 3, 7, [0, 2])
    validate_profile_args(args, world_size=4, cuda_available=False)


@pytest.mark.parametrize("extra, world_size, message", [
    (["--profile-step-start", "4", "--profile-step-end", "4"], 1,
     r"--profile-step-start \(4\) must be smaller than --profile-step-end \(4\)"),
    (["--profile-step-start", "-1", "--profile-step-end", "4"], 1, "--profile-step-start -1 is negative"),
    (["--profile-step-start", "2", "--profile-step-end", "30"], 1,
     "--profile-step-end 30 is beyond the 20 training iterations"),
    (["--profile-ranks", "1", "2"], 2, "--profile-ranks 2: no such rank in a run of 2 processes"),
    # None: no --tensorboard-dir
    (None, 1, "writes its trace into --tensorboard-dir.*add --tensorboard-dir DIR"),
])
def test_bad_profile_flags_fail_naming_the_flags(extra, world_size, message):
    argv = BASE + ["--train-iters", "20", "--profile", "--use-pytorch-profiler"]
    if extra is not None:
        argv += ["--tensorboard-dir", "tb"] + extra
    with pytest.raises(ValueError, match=message):
        validate_profile_args(parse_args(argv), world_size=world_size, cuda_available=False)


def test_window_is_checked_against_iterations_derived_from_train_samples(capsys):
    args = parse_args(BASE + ["--train-samples", "12", "--profile", "--use-pytorch-profiler", "--tensorboard-dir",
                              "tb"])  # the default window, counts 10 -> 12
    validate_profile_args(args, world_size=2, cuda_available=False)  # the iteration count is not known yet
    with pytest.raises(ValueError, match="--profile-step-end 12 is beyond the 3 training iterations"):
        start_profiler(args, rank=0, first_iteration=0, train_iters=3, cuda=False)
    assert start_profiler(args, rank=1, first_iteration=0, train_iters=20, cuda=False) is None  # not in --profile-ranks
    assert start_profiler(args, rank=0, first_iteration=0, train_iters=20, cuda=False) is not None
    resumed = start_profiler(args, rank=0, first_iteration=15, train_iters=20, cuda=False)
    assert "resumes at iteration 15, after --profile-step-end 12: nothing will be profiled" in capsys.readouterr().out
    resumed.before_iteration(15)
    resumed.close(20)
    assert resumed.trace_path is None


def test_cuda_profiler_api_needs_cuda():
    args = parse_args(BASE + ["--train-iters", "20", "--profile"])
    with pytest.raises(ValueError, match="--profile without --use-pytorch-profiler uses the CUDA profiler API.*"
                                         "needs CUDA.*add --use-pytorch-profiler"):
        validate_profile_args(args, world_size=1, cuda_available=False)
    validate_profile_args(args, world_size=1, cuda_available=True)


def test_profiling_flags_without_profile_are_not_checked():
    args = parse_args(BASE + ["--train-iters", "5", "--profile-step-start", "9", "--profile-step-end", "3"])
    validate_profile_args(args, world_size=1, cuda_available=False)
    assert start_profiler(args, rank=0, first_iteration=0, train_iters=5, cuda=False) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_pretrain_refuses_the_cuda_profiler_on_cpu_at_startup(tmp_path):
    from gigatron.training.entry import pretrain_gpt_main

    argv = BASE + ["--train-iters", "20", "--profile", "--data-cache-path", str(tmp_path / "cache")]
    with pytest.raises(ValueError, match="--profile without --use-pytorch-profiler"):
        pretrain_gpt_main(argv)
    assert not (tmp_path / "cache").exists()  # refused before anything was built


# ------------------------------------------------------------------ the profiler's window


def _run_loop(profiler, first, last, work=lambda: torch.ones(4).sum()):
    """A stand-in for the training loop: iteration count `first` -> `last`, each step tagged."""
    iteration = first
    try:
        while iteration < last:
            profiler.before_iteration(iteration)
            with torch.profiler.record_function(f"iteration_step_{iteration}"):
                work()
            iteration += 1
    finally:
        profiler.close(iteration)


def _steps_in(path):
    with open(path) as handle:
        events = json.load(handle)["traceEvents"]
    return sorted(int(e["name"].rsplit("_", 1)[1]) for e in events
                  if e.get("ph") == "X" and e["name"].startswith("iteration_step_"))


@pytest.mark.parametrize("start, end, first, last, recorded", [
    (2, 4, 0, 6, [2, 3]),       # the window, with a warm-up iteration before it
    (0, 2, 0, 5, [0, 1]),       # from the first iteration: no warm-up
    (2, 5, 3, 8, [3, 4]),       # a run resumed inside the window profiles the rest of it
    (2, 5, 0, 3, [2]),          # a run that stops inside the window writes what it recorded
])
def test_profiler_records_exactly_the_window(tmp_path, capsys, start, end, first, last, recorded):
    profiler = TrainingProfiler(start=start, end=end, rank=0, use_pytorch_profiler=True, trace_dir=str(tmp_path),
                                cuda=False, first_iteration=first)
    _run_loop(profiler, first, last)
    path = tmp_path / trace_file_name(0, recorded[0], recorded[-1] + 1)
    assert profiler.trace_path == str(path)
    assert _steps_in(path) == recorded
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left
    assert f"wrote the torch.profiler trace of iterations {recorded[0] + 1} to {recorded[-1] + 1}" in \
        capsys.readouterr().out


def test_profiler_window_never_reached(tmp_path, capsys):
    profiler = TrainingProfiler(start=4, end=6, rank=0, use_pytorch_profiler=True, trace_dir=str(tmp_path),
                                cuda=False, first_iteration=0)
    _run_loop(profiler, 0, 3)
    assert profiler.trace_path is None and os.listdir(tmp_path) == []
    assert "before --profile-step-start 4: nothing was profiled" in capsys.readouterr().out


@pytest.mark.gpu
def test_cuda_trace_is_measured_on_the_device_timeline(tmp_path):
    profiler = TrainingProfiler(start=1, end=3, rank=0, use_pytorch_profiler=True, trace_dir=str(tmp_path), cuda=True,
                                first_iteration=0)
    x = torch.randn(1024, 1024, device="cuda")
    _run_loop(profiler, 0, 4, work=lambda: (x @ x).sum())
    torch.cuda.synchronize()
    summary = overlap_summary(profiler.trace_path)
    assert summary["timeline"] == "device" and summary["steps"] == 2
    assert summary["compute_ms"] > 0.0 and summary["comm_ms"] == 0.0 == summary["exposed_comm_ms"]


@pytest.mark.gpu
def test_cuda_profiler_api_brackets_the_window(tmp_path, capsys):
    profiler = TrainingProfiler(start=1, end=3, rank=0, use_pytorch_profiler=False, trace_dir=None, cuda=True,
                                first_iteration=0)
    x = torch.randn(256, 256, device="cuda")
    _run_loop(profiler, 0, 4, work=lambda: (x @ x).sum())
    assert "cudaProfilerStop after iterations 2 to 3 (count 1 -> 3)" in capsys.readouterr().out


# ------------------------------------------------------------------ a tiny training run


def test_tiny_cpu_training_run_writes_a_trace(tmp_path, capsys):
    from gigatron.training import gpt
    from gigatron.training.loop import pretrain

    torch.set_num_threads(1)
    tb = tmp_path / "tb"
    argv = BASE + ["--train-iters", "5", "--profile", "--use-pytorch-profiler", "--profile-step-start", "2",
                   "--profile-step-end", "4", "--tensorboard-dir", str(tb), "--data-cache-path", str(tmp_path / "c")]
    ctx = pretrain(gpt.datasets_provider, gpt.model_provider, gpt.forward_step, args=parse_args(argv))
    assert ctx.iteration == 5
    path = tb / "rank0_iterations_2-4.pt.trace.json"
    assert f"wrote the torch.profiler trace of iterations 3 to 4 (count 2 -> 4) to {path}" in capsys.readouterr().out
    assert not list(tb.glob("*.tmp*"))
    with open(path) as handle:
        trace = json.load(handle)
    names = [e["name"] for e in trace["traceEvents"] if e.get("ph") == "X"]
    assert sorted(n for n in names if n.startswith("ProfilerStep#")) == ["ProfilerStep#2", "ProfilerStep#3"]
    assert "aten::mm" in names or "aten::addmm" in names
    summary = overlap_summary(path)
    assert summary["timeline"] == "cpu" and summary["steps"] == 2
    assert summary["comm_ms"] == 0.0 and summary["exposed_comm_ms"] == 0.0  # one process: no collectives
    assert summary["compute_ms"] > 0.0


def test_top_kernels_ranks_device_time_per_step():
    from gigatron.training.profiling import top_kernels

    def kernel(name, ts, dur):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 7}

    trace = {"traceEvents": [
        {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#3", "ts": 0, "dur": 100, "pid": 1, "tid": 1},
        {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#4", "ts": 100, "dur": 100, "pid": 1, "tid": 1},
        kernel("gemm", 0, 30), kernel("gemm", 100, 30), kernel("ncclAllReduce", 40, 50),
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500, "pid": 1, "tid": 1},
    ]}
    assert top_kernels(trace) == [("gemm", 0.03, 1.0), ("ncclAllReduce", 0.025, 0.5)]
    assert top_kernels(trace, n=1) == [("gemm", 0.03, 1.0)]


def test_idle_gaps_between_kernels():
    from gigatron.training.profiling import idle_gaps

    spans = [(0, 5, "gemv"), (6, 9, "attention"), (8, 10, "copy"), (12, 20, "gemv"), (21, 25, "attention")]
    gaps = idle_gaps(spans, steps=2)
    # Gaps: gemv->attention 1, copy->gemv 2 (the overlapping copy ends the busy span at 10), gemv->attention 1.
    assert gaps["idle_ms"] == pytest.approx(4 / 1000 / 2)
    assert gaps["gaps"] == 1.5 and gaps["median_us"] == 1
    pairs = {(a, b): (ms, count) for a, b, ms, count in gaps["pairs"]}
    assert pairs == {("copy", "gemv"): (pytest.approx(0.001), 0.5), ("gemv", "attention"): (pytest.approx(0.001), 1.0)}
    assert [p[:2] for p in idle_gaps(spans, steps=2, top=1)["pairs"]] == [("gemv", "attention")]  # ties: first seen
    assert idle_gaps([(0, 5, "gemv")]) == dict(idle_ms=0.0, gaps=0.0, median_us=0.0, pairs=[])
