"""DistributedDataParallel at dp=2 (gloo, CPU) equals one process on the same global batch."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from gigatron.core.distributed import DDPConfig, DistributedDataParallel, finalize_model_grads
from gigatron.core.optim import OptimizerConfig, get_optimizer
from gigatron.core.parallel.config import ParallelConfig
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.parallel.tags import mark_sequence_parallel, mark_shared_embedding
from tests.parallel.harness import run_distributed

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


def _model(dtype):
    torch.manual_seed(0)
    return Toy().to(dtype)


def _data(dtype):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(GLOBAL_BATCH, WIDTH, generator=g).to(dtype), torch.randn(GLOBAL_BATCH, generator=g))
            for _ in range(STEPS)]


def _loss(model, x, y):
    return ((model(x).float() - y) ** 2).mean()


# name -> (param dtype, DDPConfig kwargs)
SCENARIOS = {
    "fp32": (torch.float32, {}),
    "fp32-overlap-buckets": (torch.float32, dict(overlap_grad_reduce=True, bucket_size=150)),
    "fp32-average-in-collective": (torch.float32, dict(average_in_collective=True)),
    "bf16-overlap-buckets": (torch.bfloat16, dict(overlap_grad_reduce=True, bucket_size=120)),
    "bf16-grad-reduce-in-bf16": (torch.bfloat16, dict(grad_reduce_in_bf16=True)),
}


def _train(model, ddp_kwargs, dtype, groups, rows, micro_batches):
    """STEPS optimizer steps; each step sees `rows` of the global batch in `micro_batches` pieces."""
    ddp = DistributedDataParallel(DDPConfig(**ddp_kwargs), model, groups)
    bf16 = dtype == torch.bfloat16
    opt = get_optimizer(OptimizerConfig(lr=1e-2, weight_decay=0.1, clip_grad=0.5, bf16=bf16, params_dtype=dtype),
                        [ddp], groups)
    norms = []
    overlap = ddp_kwargs.get("overlap_grad_reduce", False)
    for x, y in _data(dtype):
        x, y = x[rows], y[rows]
        opt.zero_grad()
        chunks = list(zip(x.chunk(micro_batches), y.chunk(micro_batches)))
        for i, (xm, ym) in enumerate(chunks):
            loss = _loss(ddp, xm, ym) / micro_batches
            if i < len(chunks) - 1:
                with ddp.no_sync():
                    loss.backward()
                assert not any(b.grad_reduce_launched for b in ddp.buckets)  # no reduction in no_sync
            else:
                loss.backward()
        # with overlap every bucket's reduction was launched by the hooks during backward
        launched = sum(b.grad_reduce_launched for b in ddp.buckets)
        assert launched == (len(ddp.buckets) if overlap else 0)
        finalize_model_grads([ddp], groups)
        ok, norm, _ = opt.step()
        assert ok
        norms.append(norm)
    return [p.detach().clone() for p in ddp.module.parameters()], norms, len(ddp.buckets)


def _dp_worker(rank, world_size):
    """Everything this file checks at dp=2, in one pair of processes (spawning is the slow part)."""
    groups = ParallelGroups.build(ParallelConfig())
    assert groups.dp_cp.size == world_size
    per_rank = GLOBAL_BATCH // world_size
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    out = {name: _train(_model(dtype), kw, dtype, groups, rows, 1) for name, (dtype, kw) in SCENARIOS.items()}
    out["accumulation"] = _train(_model(torch.float32), dict(overlap_grad_reduce=True, bucket_size=100),
                                 torch.float32, groups, rows, micro_batches=2)[0]
    out["finalize"] = _finalize_worker(rank)
    torch.manual_seed(rank)  # different replicas ...
    ddp = DistributedDataParallel(DDPConfig(), Toy(), groups)
    ddp.broadcast_params()  # ... made identical
    out["broadcast"] = [p.detach().clone() for p in ddp.module.parameters()]
    return out


@pytest.fixture(scope="module")
def dp2_results():
    return run_distributed(_dp_worker, 2)


def _single(dtype, micro_batches):
    # One thread, as in the ranks: CPU kernels may split reductions by thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(_model(dtype), {}, dtype, ParallelGroups.single(), slice(0, GLOBAL_BATCH), micro_batches)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_dp2_equals_single_process(dp2_results, name):
    dtype, kw = SCENARIOS[name]
    rank0, rank1 = dp2_results[0][name], dp2_results[1][name]
    if "buckets" in name:
        assert rank0[2] > 2  # the small bucket size really split the buffer
    for p, q in zip(rank0[0], rank1[0]):  # replicas stay identical
        assert torch.equal(p, q)
    if dtype == torch.float32:
        ref_params, ref_norms, _ = _single(dtype, 1)
        torch.testing.assert_close(torch.tensor(rank0[1]), torch.tensor(ref_norms), rtol=1e-5, atol=0)
        for p, q in zip(rank0[0], ref_params):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    else:
        # bf16: one process over two half-batch micro-batches accumulates g0/2 + g1/2 in the
        # grad buffer, exactly what dp=2 reduces; with bf16 reduction allow bf16 rounding.
        ref_params, ref_norms, _ = _single(dtype, 2)
        exact = not kw.get("grad_reduce_in_bf16")
        torch.testing.assert_close(torch.tensor(rank0[1]), torch.tensor(ref_norms), rtol=1e-6 if exact else 1e-2, atol=0)
        for p, q in zip(rank0[0], ref_params):
            if exact:
                torch.testing.assert_close(p, q, rtol=0, atol=0)
            else:
                torch.testing.assert_close(p.float(), q.float(), rtol=0, atol=0.05)


def test_dp2_with_micro_batches_equals_single_process_big_batch(dp2_results):
    """Two no_sync micro-batches per rank, overlapped bucketed reduction of the last one."""
    ref_params, _, _ = _single(torch.float32, 1)
    for p, q in zip(dp2_results[0]["accumulation"], ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _finalize_worker(rank):
    """tp=2: a sequence-parallel-tagged param's grad is summed over tp; pp=2 embedding group:
    the tied embedding grads are summed over the first and last stage."""
    out = {}
    for name, cfg in (("tp", ParallelConfig(tensor_model_parallel_size=2)),
                      ("pp", ParallelConfig(pipeline_model_parallel_size=2))):
        groups = ParallelGroups.build(cfg)
        model = nn.Linear(4, 4)
        if name == "tp":
            mark_sequence_parallel(model.bias)
        else:
            mark_shared_embedding(model.weight)
        ddp = DistributedDataParallel(DDPConfig(), model, groups)
        x = torch.full((3, 4), float(rank + 1))
        ddp(x).sum().backward()
        finalize_model_grads([ddp], groups)
        out[name] = (model.weight.main_grad.clone(), model.bias.main_grad.clone())
    return out


def test_finalize_reduces_sequence_parallel_and_embedding_grads(dp2_results):
    res = [dp2_results[r]["finalize"] for r in range(2)]
    # d(sum(Wx+b))/dW[i, j] = sum over rows of x[j]; rank r's input is r + 1.
    w_grad = [torch.full((4, 4), 3.0 * (r + 1)) for r in range(2)]
    b_grad = torch.full((4,), 3.0)
    for r in range(2):
        w, b = res[r]["tp"]
        torch.testing.assert_close(w, w_grad[r])  # not tagged: untouched
        torch.testing.assert_close(b, 2 * b_grad)  # sequence parallel: summed over tp
        w, b = res[r]["pp"]
        torch.testing.assert_close(w, w_grad[0] + w_grad[1])  # shared embedding: summed
        torch.testing.assert_close(b, b_grad)


def test_nan_check_names_the_bucket():
    from gigatron.core.distributed import NonFiniteGradientError

    model = _model(torch.float32)
    ddp = DistributedDataParallel(DDPConfig(check_for_nan_in_grad=True), model, ParallelGroups.single())
    x, y = _data(torch.float32)[0]
    (_loss(ddp, x, y) * float("nan")).backward()
    with pytest.raises(NonFiniteGradientError, match="bucket 0"):
        ddp.finish_grad_sync()


def test_broadcast_params_makes_replicas_identical(dp2_results):
    for p, q in zip(dp2_results[0]["broadcast"], dp2_results[1]["broadcast"]):
        assert torch.equal(p, q)


def test_distributed_optimizer_layout_alignment_and_padding():
    """Layout only (no collectives): dp=4 via a group record without a process group."""
    import dataclasses
    import math

    from gigatron.core.parallel.groups import Group

    groups = dataclasses.replace(ParallelGroups.single(), dp_cp=Group(group=None, size=4, rank=1, ranks=[0, 1, 2, 3]))
    model = nn.Sequential(nn.Embedding(37, WIDTH), nn.Linear(WIDTH, 33), nn.Linear(33, WIDTH))
    mark_shared_embedding(model[0].weight)
    ddp = DistributedDataParallel(DDPConfig(use_distributed_optimizer=True, overlap_grad_reduce=True,
                                            bucket_size=300), model, groups)
    (buf,) = ddp.grad_buffers
    divisor = math.lcm(4, 128)
    for param, (start, end, _) in buf.param_index_map.items():
        assert start % 64 == 0 and end - start == param.numel()
        assert torch.equal(param.data.reshape(-1), buf.param_data[start:end])  # params live in the buffer
        assert param.main_grad.data_ptr() == buf.grad_data[start:end].data_ptr()
    for bucket in buf.buckets:
        assert bucket.numel % divisor == 0
        lo, hi = bucket.shard_range(1)
        assert hi - lo == bucket.numel // 4 and lo == bucket.start + bucket.numel // 4
    # reverse registration order, and the tied embedding alone in the last bucket
    order = [p for p in buf.params]
    assert order == list(reversed(list(model.parameters())))
    assert buf.buckets[-1].params == [model[0].weight]
    # no bucketing without overlap; no padding without the distributed optimizer
    plain = DistributedDataParallel(DDPConfig(bucket_size=300), nn.Linear(WIDTH, 33), ParallelGroups.single())
    assert len(plain.buckets) == 1 and plain.grad_buffers[0].numel == WIDTH * 33 + 33
