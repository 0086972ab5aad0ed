"""Context-parallel attention pieces without processes: the online-softmax merge against a direct
softmax, the block kernels' forward and recomputed backward against autograd through SDPA, the
load-balanced split / gather round trip, the ring's causal step plan, and the seq-length check.
GPU tests compare the flash block kernel with the plain one."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from gigatron.core.parallel.groups import Group
from gigatron.core.transformer import context_parallel as cpa


def _sdpa(q, k, v, causal):
    nq, ng = q.shape[1], k.shape[1]
    k = k.repeat_interleave(nq // ng, dim=1)  # [b, nq, s, d]
    v = v.repeat_interleave(nq // ng, dim=1)  # [b, nq, s, d]
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _qkv(b=2, nq=4, ng=2, s=8, d=8, dtype=torch.float64, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, nq, s, d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    k = torch.randn(b, ng, s, d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    v = torch.randn(b, ng, s, d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return q, k, v


# ------------------------------------------------------------------ merge


def test_merge_equals_direct_softmax_over_the_union():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 5, 12, generator=gen, dtype=torch.float64) * 4  # [n, sq, sk]
    values = torch.randn(3, 12, 7, generator=gen, dtype=torch.float64)  # [n, sk, d]
    # Some rows see no key in the first set, one row sees none at all.
    scores[:, 0, :6] = float("-inf")
    scores[:, 1, :] = float("-inf")
    direct = torch.softmax(scores[:, 2:], dim=-1) @ values  # rows with at least one key

    def partial(cols):
        part = scores[..., cols]
        lse = torch.logsumexp(part, dim=-1)  # [n, sq]
        finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        return torch.exp(part - finite.unsqueeze(-1)) @ values[:, cols], lse

    out_a, lse_a = partial(slice(0, 6))
    out_b, lse_b = partial(slice(6, 12))
    out, lse = cpa.merge_attention_partials(out_a, lse_a, out_b, lse_b)
    assert_close(out[:, 2:], direct, rtol=1e-12, atol=1e-12)
    assert_close(lse, torch.logsumexp(scores, dim=-1))
    row0 = (torch.softmax(scores[:, 0], dim=-1).unsqueeze(1) @ values).squeeze(1)  # [n, d]
    assert_close(out[:, 0], row0, rtol=1e-12, atol=1e-12)
    assert torch.all(out[:, 1] == 0) and torch.all(torch.isneginf(lse[:, 1]))
    assert torch.isfinite(out).all()


def test_merge_is_stable_for_large_scores():
    out_a = torch.ones(1, 2, 3)
    out_b = torch.full((1, 2, 3), 3.0)
    lse_a = torch.tensor([[1000.0, -1000.0]])
    lse_b = torch.tensor([[1000.0 + math.log(3.0), -1000.0]])
    out, lse = cpa.merge_attention_partials(out_a, lse_a, out_b, lse_b)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_close(out[0, 0], torch.full((3,), 2.5))  # weights 1 : 3
    assert_close(out[0, 1], torch.full((3,), 2.0))  # weights 1 : 1
    assert_close(lse[0, 0], torch.tensor(1000.0 + math.log(4.0)))


# ------------------------------------------------------------------ block kernels


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_math_block_forward_and_backward_match_autograd(causal, heads):
    nq, ng = heads
    q, k, v = _qkv(nq=nq, ng=ng)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse, _ = cpa.block_attention_forward(q, k, v, causal, scale, "math")
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = _sdpa(qr, kr, vr, causal)
    ref.backward(dout)
    assert_close(out, ref.detach())
    delta = (dout * out).sum(-1)
    dq, dk, dv = cpa.block_attention_backward(dout, q, k, v, out, lse, delta, causal, scale, "math")
    assert_close(dq, qr.grad)
    assert_close(dk, kr.grad)
    assert_close(dv, vr.grad)


def test_local_attention_fp32_matches_sdpa():
    q, k, v = _qkv(dtype=torch.float32, ng=1)
    tensors = [t.clone().requires_grad_() for t in (q, k, v)]
    refs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = cpa.local_attention(*tensors, causal=True, kernel="math")
    ref = _sdpa(*refs, causal=True)
    assert_close(out, ref, rtol=1e-5, atol=1e-5)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref.backward(dout)
    for got, want in zip(tensors, refs):
        assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5)


def test_block_gradients_split_over_key_blocks_sum_to_the_whole():
    """The identity the ring's backward relies on: with the final output and log-sum-exp, the
    per-key-block gradients add up to the gradient of attention over all keys."""
    q, k, v = _qkv(s=8)
    scale = 1.0 / math.sqrt(q.shape[-1])
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out, lse, _ = cpa.block_attention_forward(q, k, v, False, scale, "math")
    delta = (dout * out).sum(-1)
    dq_full, dk_full, dv_full = cpa.block_attention_backward(dout, q, k, v, out, lse, delta, False, scale)
    dq_sum = torch.zeros_like(dq_full)
    for cols in (slice(0, 3), slice(3, 8)):
        dq, dk, dv = cpa.block_attention_backward(dout, q, k[:, :, cols], v[:, :, cols], out, lse, delta,
                                                  False, scale)
        dq_sum += dq
        assert_close(dk, dk_full[:, :, cols])
        assert_close(dv, dv_full[:, :, cols])
    assert_close(dq_sum, dq_full)


# ------------------------------------------------------------------ layout


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_split_gather_round_trip_and_indices(cp_size):
    seq = 16
    x = torch.arange(2 * seq * 3).reshape(2, seq, 3)  # [b, s, h]
    parts = [cpa.split_for_cp_rank(x, cp_size, r, seq_dim=1) for r in range(cp_size)]
    for r, part in enumerate(parts):
        idx = cpa.cp_chunk_indices(seq, cp_size, r)
        assert torch.equal(part, x[:, idx])
        if cp_size > 1:
            c = seq // (2 * cp_size)
            expect = list(range(r * c, (r + 1) * c)) + list(range((2 * cp_size - 1 - r) * c, (2 * cp_size - r) * c))
            assert idx.tolist() == expect
    assert torch.equal(cpa.gather_cp_splits(parts, seq_dim=1), x)
    all_idx = torch.cat([cpa.cp_chunk_indices(seq, cp_size, r) for r in range(cp_size)])
    assert sorted(all_idx.tolist()) == list(range(seq))


def test_get_batch_on_this_cp_rank_splits_every_field():
    b, s, cp_size = 2, 8, 2
    tokens = torch.arange(b * s).reshape(b, s)
    batch = {
        "tokens": tokens, "labels": tokens + 1, "loss_mask": torch.ones(b, s),
        "position_ids": torch.arange(s).repeat(b, 1),
        "attention_mask": torch.ones(s, s, dtype=torch.bool).triu(1)[None, None].expand(b, 1, s, s),
        "extra": None,
    }
    for rank in range(cp_size):
        cp = Group(group=None, size=cp_size, rank=rank, ranks=list(range(cp_size)))
        out = cpa.get_batch_on_this_cp_rank(batch, cp)
        idx = cpa.cp_chunk_indices(s, cp_size, rank)
        assert torch.equal(out["tokens"], tokens[:, idx])
        assert torch.equal(out["labels"], tokens[:, idx] + 1)
        assert torch.equal(out["position_ids"], idx.repeat(b, 1))
        assert out["loss_mask"].shape == (b, s // cp_size)
        assert torch.equal(out["attention_mask"], batch["attention_mask"][:, :, idx])
        assert out["extra"] is None
    single = cpa.get_batch_on_this_cp_rank(batch, Group.single())
    assert single["tokens"] is tokens


def test_seq_length_not_divisible_is_a_clear_error():
    cp = Group(group=None, size=4, rank=0, ranks=[0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"--seq-length \(12\).*--context-parallel-size"):
        cpa.get_batch_on_this_cp_rank({"tokens": torch.zeros(1, 12)}, cp)
    with pytest.raises(ValueError, match="--seq-length"):
        cpa.check_context_parallel_seq_length(10, 2)
    cpa.check_context_parallel_seq_length(12, 3)


def test_bad_comm_type_and_shapes_are_errors():
    q, k, v = _qkv(dtype=torch.float32)
    cp = Group.single()
    with pytest.raises(ValueError, match="--cp-comm-type"):
        cpa.ring_attention(q, k, v, cp, comm_type="ring")
    with pytest.raises(ValueError, match="a2a\\+p2p is not implemented"):
        cpa.ring_attention(q, k, v, cp, comm_type="a2a+p2p")
    # Megatron's spelling of the all-gather variant is accepted.
    assert_close(cpa.ring_attention(q, k, v, cp, comm_type="allgather", kernel="math"),
                 cpa.local_attention(q, k, v, kernel="math"))
    with pytest.raises(ValueError, match="query heads"):
        cpa.ring_attention(q[:, :3], k, v, cp)
    with pytest.raises(ValueError, match=r"\[b, heads, s_local, d\]"):
        cpa.ring_attention(q[0], k[0], v[0], cp)


@pytest.mark.parametrize("cp_size", [2, 3, 4])
def test_ring_step_plan_covers_exactly_the_causal_mask(cp_size):
    """Every (query, key) pair under the global causal mask is computed exactly once over the
    ring steps, and nothing above it: the skipped and halved blocks are the masked ones."""
    c = 2
    seq = 2 * cp_size * c
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for rank in range(cp_size):
        q_pos = cpa.cp_chunk_indices(seq, cp_size, rank)
        seen = torch.zeros(seq, seq, dtype=torch.int64)
        work = 0
        for step in range(cp_size):
            src = (rank - step) % cp_size
            k_pos = cpa.cp_chunk_indices(seq, cp_size, src)
            rows, cols, block_causal = cpa._ring_step_plan(step, rank, True, c)
            qp, kp = q_pos[rows], k_pos[cols]
            allowed = torch.ones(len(qp), len(kp), dtype=torch.bool)
            if block_causal:
                allowed = allowed.tril()
            seen[qp[:, None].expand_as(allowed)[allowed], kp[None, :].expand_as(allowed)[allowed]] += 1
            work += len(qp) * len(kp)
            if step > 0:
                assert len(qp) * len(kp) == (2 * c) * (2 * c) // 2  # halved
        assert torch.equal(seen[q_pos] == 1, causal[q_pos])
        assert int(seen[q_pos].max()) == 1


# ------------------------------------------------------------------ flash against math


@pytest.mark.parametrize("causal", [True, False])
def test_flash_block_kernel_matches_math_on_cpu(causal):
    """torch's CPU flash kernel through the same wrapper: forward, log-sum-exp and the backward
    from a given final output and log-sum-exp, on half-sequence slices as the ring uses them."""
    q, k, v = _qkv(nq=4, ng=2, s=16, dtype=torch.float32)
    scale = 0.3
    out_f, lse_f, aux = cpa.block_attention_forward(q, k, v, causal, scale, "flash")
    out_m, lse_m, _ = cpa.block_attention_forward(q, k, v, causal, scale, "math")
    assert_close(out_f, out_m, rtol=1e-5, atol=1e-5)
    assert_close(lse_f, lse_m, rtol=1e-5, atol=1e-5)
    dout = torch.randn_like(q)
    delta = (dout * out_m).sum(-1)
    rows = slice(8, None)
    grads_f = cpa.block_attention_backward(dout[:, :, rows], q[:, :, rows], k, v, out_m[:, :, rows],
                                           lse_m[:, :, rows], delta[:, :, rows], False, scale, "flash", aux)
    grads_m = cpa.block_attention_backward(dout[:, :, rows], q[:, :, rows], k, v, out_m[:, :, rows],
                                           lse_m[:, :, rows], delta[:, :, rows], False, scale, "math")
    for gf, gm in zip(grads_f, grads_m):
        assert_close(gf, gm, rtol=1e-5, atol=1e-5)



@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["flash", "cudnn"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)])
def test_gpu_block_kernels_match_math(kernel, causal, heads):
    nq, ng = heads
    q, k, v = _qkv(b=2, nq=nq, ng=ng, s=256, d=64, dtype=torch.bfloat16, device="cuda")
    scale = 0.125
    out_f, lse_f, aux = cpa.block_attention_forward(q, k, v, causal, scale, kernel)
    out_m, lse_m, _ = cpa.block_attention_forward(q, k, v, causal, scale, "math")
    assert_close(out_f.float(), out_m.float(), rtol=2e-2, atol=2e-2)
    assert_close(lse_f.float(), lse_m.float(), rtol=1e-3, atol=1e-3)
    dout = torch.randn_like(q)
    out = out_m.to(q.dtype)
    delta = (dout.float() * out.float()).sum(-1)
    grads_f = cpa.block_attention_backward(dout, q, k, v, out, lse_m, delta, causal, scale, kernel, aux)
    grads_m = cpa.block_attention_backward(dout, q, k, v, out, lse_m, delta, causal, scale, "math")
    for gf, gm in zip(grads_f, grads_m):
        assert_close(gf.float(), gm.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["flash", "cudnn"])
def test_gpu_block_kernels_on_ring_slices(kernel):
    """What the ring does with a GPU kernel: half the query rows or half the key columns per block,
    the backward given the FINAL output and log-sum-exp, and the first block's aux reused."""
    q, k, v = _qkv(b=1, nq=8, ng=2, s=256, d=128, dtype=torch.bfloat16, device="cuda", seed=3)
    scale = 1.0 / math.sqrt(128)
    _, _, aux = cpa.block_attention_forward(q, k, v, True, scale, kernel)  # step 0's aux
    out_m, lse_m, _ = cpa.block_attention_forward(q, k, v, False, scale, "math")
    out = out_m.to(q.dtype)
    dout = torch.randn_like(q)
    delta = (dout.float() * out.float()).sum(-1)
    for rows, cols in ((slice(128, None), slice(None)), (slice(None), slice(0, 128))):
        got_out, got_lse, _ = cpa.block_attention_forward(q[:, :, rows], k[:, :, cols], v[:, :, cols], False,
                                                          scale, kernel)
        want_out, want_lse, _ = cpa.block_attention_forward(q[:, :, rows], k[:, :, cols], v[:, :, cols], False,
                                                            scale, "math")
        assert_close(got_out.float(), want_out.float(), rtol=2e-2, atol=2e-2)
        assert_close(got_lse.float(), want_lse.float(), rtol=1e-3, atol=1e-3)
        args = (dout[:, :, rows], q[:, :, rows], k[:, :, cols], v[:, :, cols], out[:, :, rows], lse_m[:, :, rows],
                delta[:, :, rows], False, scale)
        for gf, gm in zip(cpa.block_attention_backward(*args, kernel, aux), cpa.block_attention_backward(*args, "math")):
            assert_close(gf.float(), gm.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
def test_local_attention_flash_matches_sdpa_on_gpu():
    q, k, v = _qkv(b=2, nq=8, ng=2, s=512, d=128, dtype=torch.bfloat16, device="cuda")
    tensors = [t.clone().requires_grad_() for t in (q, k, v)]
    refs = [t.clone().float().requires_grad_() for t in (q, k, v)]
    out = cpa.local_attention(*tensors, causal=True, kernel="flash")
    ref = _sdpa(*refs, causal=True)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref.backward(dout.float())
    assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    for got, want in zip(tensors, refs):
        assert_close(got.grad.float(), want.grad, rtol=5e-2, atol=5e-2)
