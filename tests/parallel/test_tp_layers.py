"""Tensor-parallel layers and vocab-parallel cross-entropy against plain one-process PyTorch built
from the same full weights: outputs, input gradients and (sharded) weight gradients, with and
without sequence parallelism, at tp=2 and tp=4 (gloo, CPU)."""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.testing import assert_close

from gigatron.core.parallel.config import ParallelConfig
from gigatron.core.parallel.cross_entropy import vocab_parallel_cross_entropy
from gigatron.core.parallel.groups import Group, ParallelGroups
from gigatron.core.parallel.init import local_shard
from gigatron.core.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from gigatron.core.parallel.random import RNGStatesTracker, checkpoint, model_parallel_seed
from gigatron.core.parallel.tags import (
    is_sequence_parallel,
    is_tensor_parallel,
    partition_dim,
    partition_shard,
    partition_stride,
)

from .harness import run_distributed

S, B, H, FFN, V = 8, 2, 6, 12, 16

# Device of the checks in this process: CPU, or CUDA in the GPU tests (set by use_device).
DEVICE = torch.device("cpu")


def use_device(device):
    global DEVICE
    DEVICE = torch.device(device)
    if DEVICE.type == "cuda":
        torch.cuda.set_device(DEVICE)


def randn(*shape, generator):
    return torch.randn(*shape, generator=generator).to(DEVICE)


def rand(*shape, generator):
    return torch.rand(*shape, generator=generator).to(DEVICE)


def randint(low, high, shape, generator):
    return torch.randint(low, high, shape, generator=generator).to(DEVICE)


def ones(*shape):
    return torch.ones(*shape, device=DEVICE)


def close(actual, expected):
    # Sums of squares give gradients of size ~10: compare with a matching absolute tolerance.
    assert_close(actual, expected, rtol=1e-5, atol=1e-4)


def make_config(sequence_parallel=False):
    # Stand-in for TransformerConfig: only the attributes the layers read.
    return SimpleNamespace(sequence_parallel=sequence_parallel, params_dtype=torch.float32,
                           use_cpu_initialization=DEVICE.type == "cpu", perform_initialization=True)


def normal_init(tensor):
    return torch.nn.init.normal_(tensor, std=0.5)


def shard(full, tp: Group, dim, stride=1):
    return local_shard(full, dim, stride, tp.rank, tp.size).clone()


def load(param, value):
    with torch.no_grad():
        param.copy_(value)


def all_reduced(t, tp):
    t = t.clone()
    dist.all_reduce(t, group=tp.group)
    return t


def check_column_row(tp: Group, sequence_parallel: bool, stride: int = 1):
    """column(h -> ffn) then row(ffn -> h), against two nn.functional.linear calls."""
    gen = torch.Generator().manual_seed(1234 + stride)
    w1 = randn(FFN, H, generator=gen)
    b1 = randn(FFN, generator=gen)
    w2 = randn(H, FFN, generator=gen)
    b2 = randn(H, generator=gen)
    x = randn(S, B, H, generator=gen)
    grad_y = randn(S, B, H, generator=gen)

    # Serial reference.
    ref = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
    y_ref = F.linear(F.linear(ref[0], ref[1], ref[2]), ref[3], ref[4])
    (y_ref * grad_y).sum().backward()

    config = make_config(sequence_parallel)
    col = ColumnParallelLinear(H, FFN, config=config, tp=tp, init_method=normal_init, stride=stride)
    row = RowParallelLinear(FFN, H, config=config, tp=tp, init_method=normal_init)
    assert col.weight.shape == (FFN // tp.size, H) and row.weight.shape == (H, FFN // tp.size)
    assert is_tensor_parallel(col.weight) and partition_dim(col.weight) == 0
    assert partition_stride(col.weight) == stride and partition_shard(col.weight) == (tp.rank, tp.size)
    assert is_tensor_parallel(row.weight) and partition_dim(row.weight) == 1
    assert not is_tensor_parallel(row.bias)
    assert is_sequence_parallel(row.bias) == (sequence_parallel and tp.size > 1)
    load(col.weight, shard(w1, tp, 0, stride))
    load(col.bias, shard(b1, tp, 0, stride))
    # With stride k the column output holds this rank's slice of each of the k blocks; the row
    # weight is sliced the same way so that it consumes exactly those features.
    load(row.weight, shard(w2, tp, 1, stride))
    load(row.bias, b2)

    if sequence_parallel:
        x_in = shard(x, tp, 0).requires_grad_()  # [s/t, b, h]
        grad_out = shard(grad_y, tp, 0)
        expected_y = shard(y_ref.detach(), tp, 0)
        expected_x_grad = shard(ref[0].grad, tp, 0)
    else:
        x_in = x.clone().requires_grad_()
        grad_out, expected_y, expected_x_grad = grad_y, y_ref.detach(), ref[0].grad
    hidden, bias_out = col(x_in)
    assert bias_out is None and hidden.shape == (S, B, FFN // tp.size)
    y, bias_out = row(hidden)
    assert bias_out is None
    assert_close(y, expected_y)
    (y * grad_out).sum().backward()
    assert_close(x_in.grad, expected_x_grad)
    assert_close(col.weight.grad, shard(ref[1].grad, tp, 0, stride))
    assert_close(col.bias.grad, shard(ref[2].grad, tp, 0, stride))
    assert_close(row.weight.grad, shard(ref[3].grad, tp, 1, stride))
    row_bias_grad = row.bias.grad
    if is_sequence_parallel(row.bias):
        row_bias_grad = all_reduced(row_bias_grad, tp)  # what finalize_model_grads does
    assert_close(row_bias_grad, ref[4].grad)


def check_gather_output_and_unsplit_input(tp: Group):
    """gather_output=True, skip_bias_add, input_is_parallel=False, and a given (tied) weight."""
    gen = torch.Generator().manual_seed(99)
    w1, b1 = randn(FFN, H, generator=gen), randn(FFN, generator=gen)
    w2, b2 = randn(H, FFN, generator=gen), randn(H, generator=gen)
    x = randn(S, B, H, generator=gen)
    ref = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
    mid_ref = F.linear(ref[0], ref[1])  # bias skipped, added outside
    y_ref = F.linear(mid_ref + ref[2], ref[3])
    (y_ref.square().sum() + ref[4].square().sum()).backward()

    config = make_config(False)
    col = ColumnParallelLinear(H, FFN, config=config, tp=tp, init_method=normal_init,
                               gather_output=True, skip_bias_add=True)
    row = RowParallelLinear(FFN, H, config=config, tp=tp, init_method=normal_init,
                            input_is_parallel=False, skip_bias_add=True)
    load(col.weight, shard(w1, tp, 0))
    load(col.bias, shard(b1, tp, 0))
    load(row.weight, shard(w2, tp, 1))
    load(row.bias, b2)
    x_in = x.clone().requires_grad_()
    mid, col_bias = col(x_in)
    assert mid.shape == (S, B, FFN) and col_bias is col.bias
    close(mid, mid_ref.detach())
    from gigatron.core.parallel.mappings import gather_from_tensor_parallel_region
    full_bias = gather_from_tensor_parallel_region(col_bias, tp)
    y, row_bias = row(mid + full_bias)
    assert row_bias is row.bias
    close(y, y_ref.detach())
    (y.square().sum() + row_bias.square().sum()).backward()
    close(x_in.grad, ref[0].grad)
    close(col.weight.grad, shard(ref[1].grad, tp, 0))
    close(col.bias.grad, shard(ref[2].grad, tp, 0))
    close(row.weight.grad, shard(ref[3].grad, tp, 1))
    close(row.bias.grad, ref[4].grad)

    # A weight passed to forward (tied output layer); the layer holds none.
    out = ColumnParallelLinear(H, FFN, config=config, tp=tp, init_method=normal_init, bias=False,
                               skip_weight_param_allocation=True)
    assert out.weight is None
    tied = shard(w1, tp, 0).requires_grad_()
    logits, _ = out(x, weight=tied)
    close(logits, shard(F.linear(x, w1), tp, -1))
    with pytest.raises(ValueError, match="skip_weight_param_allocation"):
        out(x)


def check_embedding(tp: Group, sequence_parallel: bool):
    gen = torch.Generator().manual_seed(7)
    table = randn(V, H, generator=gen)
    ids = randint(0, V, (B, S), generator=gen)
    grad_out = randn(B, S, H, generator=gen)
    ref_table = table.clone().requires_grad_()
    ref_out = F.embedding(ids, ref_table)
    (ref_out * grad_out).sum().backward()

    config = make_config(sequence_parallel)
    emb = VocabParallelEmbedding(V, H, config=config, tp=tp, init_method=normal_init,
                                 reduce_scatter_embeddings=sequence_parallel)
    assert emb.weight.shape == (V // tp.size, H) and partition_dim(emb.weight) == 0
    load(emb.weight, shard(table, tp, 0))
    out = emb(ids)
    if sequence_parallel:
        expected = shard(ref_out.detach().transpose(0, 1), tp, 0)  # [s/t, b, h]
        grad = shard(grad_out.transpose(0, 1), tp, 0)
    else:
        expected, grad = ref_out.detach(), grad_out  # [b, s, h]
    assert_close(out, expected)
    (out * grad).sum().backward()
    assert_close(emb.weight.grad, shard(ref_table.grad, tp, 0))


def check_cross_entropy(tp: Group, label_smoothing: float, dtype=torch.float32):
    gen = torch.Generator().manual_seed(11)
    logits = (3 * randn(S, B, V, generator=gen)).to(dtype)
    target = randint(0, V, (S, B), generator=gen)
    grad_loss = rand(S, B, generator=gen)
    ref_logits = logits.float().clone().requires_grad_()
    # Megatron's smoothing a equals PyTorch's with a * V / (V - 1).
    ref = F.cross_entropy(ref_logits.reshape(S * B, V), target.reshape(S * B), reduction="none",
                          label_smoothing=label_smoothing * V / (V - 1)).reshape(S, B)
    (ref * grad_loss).sum().backward()

    local = shard(logits, tp, -1).requires_grad_()  # [s, b, v/t]
    loss = vocab_parallel_cross_entropy(local, target, tp, label_smoothing=label_smoothing)
    assert loss.dtype == torch.float32 and loss.shape == (S, B)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert_close(loss, ref.detach(), **tol)
    (loss * grad_loss).sum().backward()
    assert local.grad.dtype == dtype
    assert_close(local.grad.float(), shard(ref_logits.grad, tp, -1), **tol)


def worker_groups(rank, world_size, device_type):
    if device_type == "cuda":
        use_device(f"cuda:{rank}")
    return ParallelGroups.build(ParallelConfig(tensor_model_parallel_size=world_size,
                                               distributed_backend="nccl" if device_type == "cuda" else "gloo"))


def tp_worker(rank, world_size, checks, device_type="cpu"):
    groups = worker_groups(rank, world_size, device_type)
    tp = groups.tp
    assert tp.size == world_size
    for name, kwargs in checks:
        globals()[name](tp, **kwargs)
    return True


LAYER_CHECKS = [
    ("check_column_row", dict(sequence_parallel=False)),
    ("check_column_row", dict(sequence_parallel=True)),
    ("check_column_row", dict(sequence_parallel=False, stride=2)),
    ("check_column_row", dict(sequence_parallel=True, stride=2)),
    ("check_gather_output_and_unsplit_input", {}),
    ("check_embedding", dict(sequence_parallel=False)),
    ("check_embedding", dict(sequence_parallel=True)),
    ("check_cross_entropy", dict(label_smoothing=0.0)),
    ("check_cross_entropy", dict(label_smoothing=0.1)),
    ("check_cross_entropy", dict(label_smoothing=0.0, dtype=torch.bfloat16)),
]


def test_layers_single_process_equal_plain_pytorch():
    tp = Group.single()
    for name, kwargs in LAYER_CHECKS:
        globals()[name](tp, **kwargs)


def test_layers_tp2_equal_single_process():
    assert run_distributed(tp_worker, 2, LAYER_CHECKS) == [True, True]


def test_layers_tp4_equal_single_process():
    checks = [("check_column_row", dict(sequence_parallel=True)),
              ("check_embedding", dict(sequence_parallel=False)),
              ("check_cross_entropy", dict(label_smoothing=0.1))]
    assert run_distributed(tp_worker, 4, checks) == [True] * 4


def test_bad_sizes_raise():
    tp = Group(group=None, size=4, rank=1, ranks=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="tensor-model-parallel-size"):
        ColumnParallelLinear(H, 10, config=make_config(), tp=tp, init_method=normal_init)
    with pytest.raises(ValueError, match="tensor-model-parallel-size"):
        RowParallelLinear(10, H, config=make_config(), tp=tp, init_method=normal_init)
    with pytest.raises(ValueError, match="make-vocab-size-divisible-by"):
        VocabParallelEmbedding(10, H, config=make_config(), tp=tp, init_method=normal_init)
    with pytest.raises(ValueError, match="sequence-parallel"):
        ColumnParallelLinear(H, 8, config=make_config(True), tp=tp, init_method=normal_init, gather_output=True)
    with pytest.raises(ValueError, match="sequence-parallel"):
        RowParallelLinear(8, H, config=make_config(True), tp=tp, init_method=normal_init, input_is_parallel=False)
    with pytest.raises(ValueError, match="label-smoothing"):
        vocab_parallel_cross_entropy(torch.zeros(2, 1, 4), torch.zeros(2, 1, dtype=torch.long), Group.single(), 1.5)


# ---------------------------------------------------------------------------------------------
# RNG streams and activation recompute.
# ---------------------------------------------------------------------------------------------



def dropout_draws(tracker):
    base = ones(256)
    outside = F.dropout(base, 0.5, training=True)
    with tracker.fork():
        inside = F.dropout(base, 0.5, training=True)
    after = F.dropout(base, 0.5, training=True)
    with tracker.fork():
        inside_again = F.dropout(base, 0.5, training=True)
    with tracker.fork("expert-parallel-rng"):
        expert = F.dropout(base, 0.5, training=True)
    return outside, inside, after, inside_again, expert


def rng_worker(rank, world_size, device_type="cpu"):
    groups = worker_groups(rank, world_size, device_type)
    tracker = model_parallel_seed(1234, groups, tracker=RNGStatesTracker())
    draws = dropout_draws(tracker)
    # The default stream is not advanced by forks: without them the second draw equals `after`.
    torch.manual_seed(1234)
    base = ones(256)
    F.dropout(base, 0.5, training=True)
    assert torch.equal(F.dropout(base, 0.5, training=True), draws[2])
    return draws


def test_rng_tracker_streams_across_tp_ranks():
    (out0, in0, after0, again0, exp0), (out1, in1, after1, again1, exp1) = run_distributed(rng_worker, 2)
    assert torch.equal(out0, out1) and torch.equal(after0, after1)  # default stream: same on all tp ranks
    assert not torch.equal(in0, in1) and not torch.equal(again0, again1)  # model-parallel stream differs
    assert not torch.equal(in0, again0)  # the stream advances across forks
    assert not torch.equal(in0, out0)
    assert not torch.equal(exp0, exp1)  # expert stream: seed + 1024 + 100 * ep_rank + etp_rank


def test_tracker_errors():
    tracker = RNGStatesTracker()
    tracker.add("a", 1)
    with pytest.raises(ValueError, match="already used"):
        tracker.add("b", 1)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("a", 2)
    with pytest.raises(ValueError, match="model_parallel_seed"):
        with tracker.fork("missing"):
            pass


def block_with_dropout(tracker, x, w, scale):
    h = F.dropout(F.linear(x, w), 0.3, training=True)  # default stream
    with tracker.fork():
        h = F.dropout(h.tanh(), 0.3, training=True)  # model-parallel stream
    return h * scale, h.sum()


def run_block(use_checkpoint, distribute, groups, tracker, x0, w0, grad):
    tp = groups.tp
    model_parallel_seed(77, groups, tracker=tracker)
    x_leaf = x0.clone().requires_grad_()
    w = w0.clone().requires_grad_()
    x = x_leaf * 1.0  # a non-leaf activation, as between layers
    if use_checkpoint:
        out, total = checkpoint(lambda *a: block_with_dropout(tracker, *a), distribute, x, w, 2.0,
                                tp=tp, tracker=tracker)
        if distribute:
            assert x.numel() == x0.numel() // tp.size  # only this rank's part is kept until backward
    else:
        out, total = block_with_dropout(tracker, x, w, 2.0)
    ((out * grad).sum() + total).backward()
    next_draw = F.dropout(ones(64), 0.5, training=True)
    with tracker.fork():
        next_tracker_draw = F.dropout(ones(64), 0.5, training=True)
    return out.detach(), x_leaf.grad, w.grad, next_draw, next_tracker_draw


def check_checkpoint_bitwise(groups: ParallelGroups, distribute: bool):
    gen = torch.Generator().manual_seed(5)
    x0, w0 = randn(S, B, H, generator=gen), randn(H, H, generator=gen)
    grad = randn(S, B, H, generator=gen)
    tracker = RNGStatesTracker()
    plain = run_block(False, False, groups, tracker, x0, w0, grad)
    recomputed = run_block(True, distribute, groups, tracker, x0, w0, grad)
    for a, b in zip(plain, recomputed):
        assert torch.equal(a, b)


def checkpoint_worker(rank, world_size, device_type="cpu"):
    groups = worker_groups(rank, world_size, device_type)
    check_checkpoint_bitwise(groups, distribute=False)
    check_checkpoint_bitwise(groups, distribute=True)
    return True


def test_checkpoint_recompute_is_bitwise_equal():
    check_checkpoint_bitwise(ParallelGroups.single(), distribute=False)
    # Without autograd (evaluation) the function just runs and its input keeps its storage.
    x = torch.ones(4, 2)
    with torch.no_grad():
        out = checkpoint(lambda v: v * 2, True, x, tp=Group(group=None, size=2, rank=0, ranks=[0, 1]))
    assert torch.equal(out, 2 * torch.ones(4, 2)) and x.shape == (4, 2) and x.numel() == 8
    with pytest.raises(ValueError, match="tp="):
        checkpoint(lambda v: v, True, ones(2))


def test_checkpoint_distributed_saved_activations_tp2():
    assert run_distributed(checkpoint_worker, 2) == [True, True]


# ---------------------------------------------------------------------------------------------
# The same checks on GPUs (NCCL for the multi-GPU ones).
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_single_device_layers_rng_and_checkpoint():
    use_device("cuda:0")
    try:
        for name, kwargs in LAYER_CHECKS:
            globals()[name](Group.single(), **kwargs)
        check_checkpoint_bitwise(ParallelGroups.single(), distribute=False)
        tracker = model_parallel_seed(3, ParallelGroups.single(), tracker=RNGStatesTracker())
        outside, inside, after, again, _ = dropout_draws(tracker)
        assert outside.is_cuda and not torch.equal(outside, inside) and not torch.equal(inside, again)
    finally:
        use_device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_tp2_nccl():
    assert run_distributed(tp_worker, 2, LAYER_CHECKS, "cuda", backend="nccl") == [True, True]
    assert run_distributed(checkpoint_worker, 2, "cuda", backend="nccl") == [True, True]
    (out0, in0, after0, _, _), (out1, in1, after1, _, _) = run_distributed(rng_worker, 2, "cuda", backend="nccl")
    assert torch.equal(out0, out1) and torch.equal(after0, after1) and not torch.equal(in0, in1)
