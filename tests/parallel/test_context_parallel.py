"""Context-parallel attention equals full causal attention (gloo, CPU).

Every rank draws the same full q, k, v and output gradient, keeps its load-balanced part
(chunks r and 2C-1-r), runs ring_attention with each comm type, and checks its output and its
dq, dk, dv against SDPA on the whole sequence (block kernels: the plain one, and torch's flash
kernel, whose CPU variant runs here). cp = 2 and 4, multi-head and GQA, causal and
non-causal, also cp groups that are not the whole world (cp 2 inside 4 ranks, as with tp 2 x cp 2).
A GPT-level test runs the model with groups.cp of size 2 (its core attention dispatches to
ring_attention with --cp-comm-type) on the split batch, with the loss divided by the micro-batch's
token count over cp and gradients summed over cp, and compares loss and gradients with the
single-process model.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.testing import assert_close

from gigatron.core.parallel.groups import Group
from gigatron.core.transformer import context_parallel as cpa
from tests.parallel.harness import run_distributed

B, D, CHUNK = 2, 8, 2

# (comm_type, query heads, key/value groups, causal)
CASES = [
    ("p2p", 4, 4, True), ("p2p", 4, 2, True), ("p2p", 4, 1, True), ("p2p", 4, 2, False),
    ("all_gather", 4, 4, True), ("all_gather", 4, 2, True), ("all_gather", 4, 2, False),
    ("a2a", 4, 4, True), ("a2a", 4, 2, True), ("a2a", 4, 1, False),
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _full_problem(seq, nq, ng, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nq, seq, D, generator=gen, dtype=torch.float64).to(dtype)  # [b, nq, S, d]
    k = torch.randn(B, ng, seq, D, generator=gen, dtype=torch.float64).to(dtype)  # [b, ng, S, d]
    v = torch.randn(B, ng, seq, D, generator=gen, dtype=torch.float64).to(dtype)  # [b, ng, S, d]
    dout = torch.randn(B, nq, seq, D, generator=gen, dtype=torch.float64).to(dtype)  # [b, nq, S, d]
    return q, k, v, dout


def _reference(q, k, v, dout, causal):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    nq, ng = q.shape[1], k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(nq // ng, 1), v.repeat_interleave(nq // ng, 1),
                                         is_causal=causal)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _check_case(cp, comm_type, nq, ng, causal, dtype, tol, seed, kernel="math"):
    seq = 2 * cp.size * CHUNK
    q, k, v, dout = _full_problem(seq, nq, ng, dtype, seed)
    ref_out, ref_dq, ref_dk, ref_dv = _reference(q, k, v, dout, causal)

    def mine(x):
        return cpa.split_for_cp_rank(x, cp.size, cp.rank, seq_dim=2)

    ql, kl, vl = (mine(t).requires_grad_() for t in (q, k, v))
    out = cpa.ring_attention(ql, kl, vl, cp, causal=causal, comm_type=comm_type, kernel=kernel)
    out.backward(mine(dout))
    what = f"{comm_type} cp{cp.size} nq{nq} ng{ng} causal={causal} {dtype} {kernel}"
    assert out.dtype == dtype, what
    assert_close(out, mine(ref_out), rtol=tol, atol=tol, msg=what)
    assert_close(ql.grad, mine(ref_dq), rtol=tol, atol=tol, msg=what + " dq")
    assert_close(kl.grad, mine(ref_dk), rtol=tol, atol=tol, msg=what + " dk")
    assert_close(vl.grad, mine(ref_dv), rtol=tol, atol=tol, msg=what + " dv")
    # The full output, gathered from the ranks, is the reference in sequence order.
    gathered = [torch.empty_like(out) for _ in range(cp.size)]
    dist.all_gather(gathered, out.detach().contiguous(), group=cp.group)
    assert_close(cpa.gather_cp_splits(gathered, seq_dim=2), ref_out, rtol=tol, atol=tol, msg=what)


def _world_cp(rank, world_size):
    return Group(group=dist.new_group(list(range(world_size))), size=world_size, rank=rank,
                 ranks=list(range(world_size)))


def _attention_worker(rank, world_size):
    cp = _world_cp(rank, world_size)
    for i, (comm_type, nq, ng, causal) in enumerate(CASES):
        _check_case(cp, comm_type, nq, ng, causal, torch.float32, 1e-5, seed=10 + i)
    _check_case(cp, "p2p", 4, 2, True, torch.float64, 1e-10, seed=3)
    for comm_type in cpa.COMM_TYPES:  # torch's flash kernel (the CPU one here) for the blocks
        _check_case(cp, comm_type, 4, 2, True, torch.float32, 1e-5, seed=4, kernel="flash")
    if world_size == 4:
        # cp groups {0, 2} and {1, 3}: peers are global ranks that are not neighbours.
        groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        ranks = [0, 2] if rank % 2 == 0 else [1, 3]
        sub = Group(group=groups[rank % 2], size=2, rank=ranks.index(rank), ranks=ranks)
        for comm_type in cpa.COMM_TYPES:
            _check_case(sub, comm_type, 4, 2, True, torch.float32, 1e-5, seed=50 + rank % 2)
    return True


@pytest.mark.parametrize("cp_size", [2, 4])
def test_context_parallel_attention_equals_full_attention(cp_size):
    assert run_distributed(_attention_worker, cp_size, timeout=240) == [True] * cp_size


# ------------------------------------------------------------------ GPT level

VOCAB, SEQ, SEED = 64, 16, 7


def _gpt_config(comm_type="p2p"):
    from gigatron.core.transformer.config import TransformerConfig
    return TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=SEQ,
                             attention_dropout=0.0, hidden_dropout=0.0, group_query_attention=True,
                             num_query_groups=2, position_embedding_type="rope", swiglu=True,
                             normalization="RMSNorm", add_bias_linear=False, cp_comm_type=comm_type)


def _gpt_batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=g)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
            "loss_mask": (torch.rand(2, SEQ, generator=g) > 0.2).float(),
            "position_ids": torch.arange(SEQ).repeat(2, 1)}


def _gpt_loss_and_grads(model, batch, cp):
    model.train()
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # [b, s/cp]
    mask = batch["loss_mask"]
    num_tokens = mask.sum()
    if cp.group is not None:
        dist.all_reduce(num_tokens, group=cp.group)  # the micro-batch's token count over cp
    loss = (per_token * mask).sum() / num_tokens  # this rank's share of the mean
    loss.backward()
    loss = loss.detach()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    if cp.group is not None:
        dist.all_reduce(loss, group=cp.group)
        for grad in grads.values():
            dist.all_reduce(grad, group=cp.group)  # what DDP over dp x cp does
    return loss, grads


def _gpt_worker(rank, world_size):
    from gigatron.core.models.gpt import GPTModel
    from gigatron.core.parallel.config import ParallelConfig
    from gigatron.core.parallel.groups import ParallelGroups

    groups = ParallelGroups.build(ParallelConfig(context_parallel_size=world_size))
    assert groups.cp.size == world_size
    results = {}
    for comm_type in cpa.COMM_TYPES:
        model = GPTModel(_gpt_config(comm_type), groups, VOCAB, seed=SEED)
        batch = cpa.get_batch_on_this_cp_rank(_gpt_batch(), groups.cp)
        results[comm_type] = _gpt_loss_and_grads(model, batch, groups.cp)
    return results


def test_gpt_with_context_parallel_attention_equals_single_process():
    from gigatron.core.models.gpt import GPTModel
    from gigatron.core.parallel.groups import ParallelGroups

    results = run_distributed(_gpt_worker, 2, timeout=240)
    groups = ParallelGroups.single()
    reference = GPTModel(_gpt_config(), groups, VOCAB, seed=SEED)
    ref_loss, ref_grads = _gpt_loss_and_grads(reference, _gpt_batch(), groups.cp)
    for rank_result in results:
        for comm_type, (loss, grads) in rank_result.items():
            assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=comm_type)
            assert set(grads) == set(ref_grads)
            for name, grad in grads.items():
                assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=f"{comm_type}: {name}")


# ------------------------------------------------------------------ GPU (NCCL, flash blocks)


def _gpu_worker(rank, world_size):
    cp = _world_cp(rank, world_size)
    seq, nq, ng = 2 * world_size * 128, 8, 2
    q, k, v, dout = (t.cuda() for t in _full_problem(seq, nq, ng, torch.bfloat16, seed=1))
    ref = _reference(q.float(), k.float(), v.float(), dout.float(), True)

    def mine(x):
        return cpa.split_for_cp_rank(x, world_size, rank, seq_dim=2)

    for comm_type in cpa.COMM_TYPES:
        ql, kl, vl = (mine(t).requires_grad_() for t in (q, k, v))
        out = cpa.ring_attention(ql, kl, vl, cp, comm_type=comm_type, kernel="flash")
        out.backward(mine(dout))
        for got, want in zip((out, ql.grad, kl.grad, vl.grad), ref):
            assert_close(got.float(), mine(want), rtol=5e-2, atol=5e-2, msg=comm_type)
    return True


@pytest.mark.gpu
def test_context_parallel_flash_on_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    assert run_distributed(_gpu_worker, 2, timeout=240, backend="nccl") == [True, True]
