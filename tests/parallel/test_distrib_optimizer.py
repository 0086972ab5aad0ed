"""Distributed optimizer (gloo, CPU): dp=2 equals one process; bytes per parameter follow
6 + 12/d (bf16) and 8 + 8/d (fp32); the full state saved at dp=2 loads at dp=1 and dp=4."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gigatron.core.distributed import DDPConfig, DistributedDataParallel, finalize_model_grads
from gigatron.core.optim import DistributedOptimizer, OptimizerConfig, get_optimizer
from gigatron.core.parallel.config import ParallelConfig
from gigatron.core.parallel.groups import ParallelGroups
from tests.parallel.harness import free_port, run_distributed

WIDTH, STEPS, GLOBAL_BATCH = 10, 3, 16


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(self.norm(x)).squeeze(-1)


class Square(nn.Module):
    """Sizes that need no padding (multiples of 128 elements) for the memory count."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64, bias=False) for _ in range(4))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x.float().sum()


def _model(dtype, cls=Toy, device="cpu"):
    torch.manual_seed(0)
    return cls().to(device=device, dtype=dtype)


def _data(dtype, steps=STEPS, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(GLOBAL_BATCH, WIDTH, generator=g).to(dtype), torch.randn(GLOBAL_BATCH, generator=g))
            for _ in range(steps)]


def _loss(model, x, y):
    return ((model(x).float() - y) ** 2).mean()


def _opt_config(dtype, dist_opt):
    return OptimizerConfig(lr=1e-2, weight_decay=0.1, clip_grad=0.5, bf16=dtype == torch.bfloat16,
                           params_dtype=dtype, use_distributed_optimizer=dist_opt)


def _build(dtype, ddp_kwargs, groups, dist_opt=True, cls=Toy, device="cpu"):
    ddp = DistributedDataParallel(DDPConfig(use_distributed_optimizer=dist_opt, **ddp_kwargs),
                                  _model(dtype, cls, device), groups)
    return ddp, get_optimizer(_opt_config(dtype, dist_opt), [ddp], groups)


def _steps(ddp, opt, groups, batches, rows, micro_batches=1):
    pending = []
    device = next(ddp.parameters()).device
    for x, y in batches:
        x, y = x[rows].to(device), y[rows].to(device)
        opt.zero_grad()
        chunks = list(zip(x.chunk(micro_batches), y.chunk(micro_batches)))
        for i, (xm, ym) in enumerate(chunks):
            loss = _loss(ddp, xm, ym) / micro_batches
            if i < len(chunks) - 1:
                with ddp.no_sync():
                    loss.backward()
            else:
                loss.backward()
        finalize_model_grads([ddp], groups)
        ok, _, _ = opt.step()
        assert ok
        pending.append(sum(b.param_handle is not None for b in ddp.buckets))
    ddp.finish_param_sync()
    return pending


SCENARIOS = {
    "fp32": (torch.float32, {}),
    "fp32-overlap-param-gather": (torch.float32, dict(overlap_grad_reduce=True, overlap_param_gather=True,
                                                      bucket_size=60)),
    "bf16": (torch.bfloat16, dict(overlap_grad_reduce=True, bucket_size=60)),
    "bf16-overlap-param-gather": (torch.bfloat16, dict(overlap_grad_reduce=True, overlap_param_gather=True,
                                                       bucket_size=60)),
}


def _memory(dtype, groups):
    ddp, opt = _build(dtype, {}, groups, cls=Square)
    x = torch.randn(2, 64).to(dtype)
    opt.zero_grad()
    ddp(x).backward()
    finalize_model_grads([ddp], groups)
    opt.step()
    num_params = sum(p.numel() for p in ddp.module.parameters())
    mem = opt.memory_bytes()
    return sum(mem.values()) / num_params, mem


def _rows(rank, world_size):
    per_rank = GLOBAL_BATCH // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def _dp2_worker(rank, world_size):
    groups = ParallelGroups.build(ParallelConfig())
    rows = _rows(rank, world_size)
    out = {}
    for name, (dtype, kw) in SCENARIOS.items():
        ddp, opt = _build(dtype, kw, groups)
        pending = _steps(ddp, opt, groups, _data(dtype), rows)
        out[name] = ([p.detach().clone() for p in ddp.module.parameters()], opt.state_dict_for_save(), pending,
                     len(ddp.buckets))
    # checkpoint at dp=2 after 2 steps, then one more step for the resume comparison
    ddp, opt = _build(torch.bfloat16, dict(overlap_grad_reduce=True, bucket_size=60), groups)
    batches = _data(torch.bfloat16, steps=3, seed=11)
    _steps(ddp, opt, groups, batches[:2], rows)
    saved = (opt.state_dict_for_save(), {k: v.clone() for k, v in ddp.module.state_dict().items()})
    _steps(ddp, opt, groups, batches[2:], rows)
    out["resume"] = (saved, [p.detach().clone() for p in ddp.module.parameters()])
    out["memory"] = {str(dtype): _memory(dtype, groups) for dtype in (torch.bfloat16, torch.float32)}
    return out


def _load_and_continue(groups, saved, rows):
    full, model_state = saved
    ddp, opt = _build(torch.bfloat16, dict(overlap_grad_reduce=True, bucket_size=60), groups)
    ddp.module.load_state_dict(model_state)
    opt.load_state_dict(full)
    reloaded = opt.state_dict_for_save()
    _steps(ddp, opt, groups, _data(torch.bfloat16, steps=3, seed=11)[2:], rows)
    return reloaded, [p.detach().clone() for p in ddp.module.parameters()]


def _dp4_worker(rank, world_size, saved):
    groups = ParallelGroups.build(ParallelConfig())
    out = {"memory": {str(dtype): _memory(dtype, groups) for dtype in (torch.bfloat16, torch.float32)}}
    out["resume"] = _load_and_continue(groups, saved, _rows(rank, world_size))
    return out


@pytest.fixture(scope="module")
def dp2():
    return run_distributed(_dp2_worker, 2)


@pytest.fixture(scope="module")
def dp4(dp2):
    return run_distributed(_dp4_worker, 4, dp2[0]["resume"][0], timeout=240)


def _single(fn, *args):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks: CPU kernels may split reductions by thread count
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def _reference(dtype):
    """One process, non-distributed optimizer; bf16 uses two half-batch micro-batches so the fp32
    grad buffer holds g0/2 + g1/2, the same sum the dp=2 reduce-scatter produces."""
    groups = ParallelGroups.single()
    ddp, opt = _build(dtype, {}, groups, dist_opt=False)
    _steps(ddp, opt, groups, _data(dtype), slice(0, GLOBAL_BATCH), micro_batches=2 if dtype == torch.bfloat16 else 1)
    return [p.detach().clone() for p in ddp.module.parameters()], opt.state_dict_for_save()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_dp2_distributed_optimizer_equals_single_process(dp2, name):
    dtype, kw = SCENARIOS[name]
    params0, full0, pending, num_buckets = dp2[0][name]
    params1, full1, _, _ = dp2[1][name]
    if kw.get("overlap_grad_reduce"):
        assert num_buckets > 2  # the small bucket size split the buffer
    else:
        assert num_buckets == 1  # no bucketing without overlap (Megatron's rule)
    if kw.get("overlap_param_gather"):
        assert all(n == num_buckets for n in pending)  # all-gathers were in flight after each step
    else:
        assert all(n == 0 for n in pending)
    for p, q in zip(params0, params1):
        assert torch.equal(p, q)
    ref_params, ref_full = _single(_reference, dtype)
    for name_, rec in ref_full["params"].items():
        # the fp32 main param is stored only where it is a copy (bf16/fp16 weights)
        assert set(full0["params"][name_]) == set(rec) == {"exp_avg", "exp_avg_sq"} | (
            set() if dtype == torch.float32 else {"param"})
        for key in rec:
            torch.testing.assert_close(full0["params"][name_][key], rec[key], rtol=1e-5, atol=1e-7)
            assert torch.equal(full0["params"][name_][key], full1["params"][name_][key])
    for p, q in zip(params0, ref_params):
        if dtype == torch.float32:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        else:  # the clip factor may differ in its last bit (norm summed per shard): 1 bf16 ulp
            torch.testing.assert_close(p.float(), q.float(), rtol=2.0**-7, atol=1e-6)


def test_bytes_per_parameter_follow_megatron_table(dp2, dp4):
    per_dp = {1: _single(_memory_single), 2: dp2[0]["memory"], 4: dp4[0]["memory"]}
    for d, mem in per_dp.items():
        bf16, fp32 = mem[str(torch.bfloat16)][0], mem[str(torch.float32)][0]
        assert bf16 == pytest.approx(6 + 12 / d), (d, mem)
        assert fp32 == pytest.approx(8 + 8 / d), (d, mem)


def _memory_single():
    groups = ParallelGroups.single()
    return {str(dtype): _memory(dtype, groups) for dtype in (torch.bfloat16, torch.float32)}


def _compare_full(a, b, exact=True):
    assert a["step"] == b["step"] and set(a["params"]) == set(b["params"])
    for name, rec in a["params"].items():
        for key, value in rec.items():
            assert torch.equal(value, b["params"][name][key]), (name, key)


def test_state_saved_at_dp2_loads_at_dp1_and_dp4(dp2, dp4):
    saved, params_dp2 = dp2[0]["resume"]
    full = saved[0]
    assert full["step"] == 2
    reloaded1, params_dp1 = _single(_load_and_continue, ParallelGroups.single(), saved, slice(0, GLOBAL_BATCH))
    for rank in range(4):
        reloaded4, params_dp4 = dp4[rank]["resume"]
        _compare_full(full, reloaded4)
    _compare_full(full, reloaded1)
    # training continues the same way at any dp size (bf16 params: up to 1 ulp)
    for p2, p1, p4 in zip(params_dp2, params_dp1, dp4[0]["resume"][1]):
        torch.testing.assert_close(p1.float(), p2.float(), rtol=2.0**-7, atol=1e-6)
        torch.testing.assert_close(p4.float(), p2.float(), rtol=2.0**-7, atol=1e-6)


def test_non_distributed_bf16_holds_18_bytes_per_param():
    groups = ParallelGroups.single()
    ddp, opt = _build(torch.bfloat16, {}, groups, dist_opt=False, cls=Square)
    opt.zero_grad()
    ddp(torch.randn(2, 64).bfloat16()).backward()
    ddp.finish_grad_sync()
    opt.step()
    n = sum(p.numel() for p in ddp.module.parameters())
    params = sum(p.numel() * p.element_size() for p in ddp.module.parameters())
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.grad_buffers)
    mains = sum(e.main_param.numel() * 4 for e in opt.entries)
    states = sum(v.numel() * v.element_size() for st in opt.optimizer.state.values() for v in st.values()
                 if torch.is_tensor(v) and v.dim() > 0)
    assert (params + grads + mains + states) / n == 18
    assert not isinstance(opt, DistributedOptimizer)


# ---------------------------------------------------------------- NCCL on two GPUs
GPU_SCENARIOS = {
    "ddp-fp32-overlap-avg": (torch.float32, False, dict(overlap_grad_reduce=True, bucket_size=60,
                                                       average_in_collective=True)),
    "distopt-bf16-overlap-avg": (torch.bfloat16, True, dict(overlap_grad_reduce=True, overlap_param_gather=True,
                                                            bucket_size=60, average_in_collective=True)),
}


def _gpu_worker(rank, world_size):
    groups = ParallelGroups.build(ParallelConfig())
    out = {}
    for name, (dtype, dist_opt, kw) in GPU_SCENARIOS.items():
        ddp, opt = _build(dtype, kw, groups, dist_opt=dist_opt, device="cuda")
        _steps(ddp, opt, groups, _data(dtype), _rows(rank, world_size))
        params = [p.detach().cpu() for p in ddp.module.parameters()]
        single = ParallelGroups.single()
        ref, ref_opt = _build(dtype, {}, single, dist_opt=False, device="cuda")
        _steps(ref, ref_opt, single, _data(dtype), slice(0, GLOBAL_BATCH), micro_batches=world_size)
        out[name] = (params, [p.detach().cpu() for p in ref.module.parameters()])
        if dist_opt:  # full state gathered over NCCL, loaded into a fresh optimizer, gathered again
            full = opt.state_dict_for_save()
            fresh, fresh_opt = _build(dtype, kw, groups, dist_opt=True, device="cuda")
            fresh_opt.load_state_dict(full)
            again = fresh_opt.state_dict_for_save()
            out["state-roundtrip"] = all(torch.equal(v, again["params"][n][k])
                                         for n, rec in full["params"].items() for k, v in rec.items())
    return out


def _nccl_entry(rank, world_size, port, out_dir):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.save(_gpu_worker(rank, world_size), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_nccl_dp2_matches_single_gpu(tmp_path):
    """NCCL path: AVG reduction in the collective, in-place reduce-scatter / all-gather, async
    handles waited in forward pre-hooks, fused AdamW."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    mp.spawn(_nccl_entry, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    assert results[0]["state-roundtrip"] and results[1]["state-roundtrip"]
    for name in GPU_SCENARIOS:
        params0, ref = results[0][name]
        params1, _ = results[1][name]
        for p, q, r in zip(params0, params1, ref):
            assert torch.equal(p, q), name
            torch.testing.assert_close(p.float(), r.float(), rtol=2.0**-7, atol=1e-5, msg=name)
