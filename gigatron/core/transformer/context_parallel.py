"""Context parallelism: causal attention over a sequence split across the ranks of the cp group.

Shape legend: b = micro-batch, nq = query heads, ng = key/value groups (nq % ng == 0), d = head dim,
S = full sequence length, C = context-parallel size, s = S / C tokens per rank, c = s / 2 tokens per
chunk, hpg = nq / ng query heads per group.

Load-balanced layout. The sequence is cut into 2C chunks of c tokens; cp rank r keeps chunks r and
2C-1-r, in that order, so every rank holds one early and one late chunk and does the same share of
causal attention work. `get_batch_on_this_cp_rank` applies this split to a micro-batch (tokens,
labels, loss_mask, position_ids along dim 1; an attention mask along its query dim 2) and
`cp_chunk_indices` gives the global positions this rank holds (for RoPE on stages that read no batch).

`ring_attention(q, k, v, cp, causal=True, softmax_scale=None, comm_type="p2p")` takes this rank's
queries, keys and values as [b, n, s, d] (the layout of torch's scaled_dot_product_attention, which
CoreAttention already builds) and returns this rank's attention output [b, nq, s, d]. Keys and
values may have fewer heads than queries (GQA). Three ways to communicate (Megatron's cp_comm_type):

- "p2p": ring attention. K/V travel around the ring of cp ranks (batched isend/irecv of the next
  block overlapped with the attention on the current one); each block's partial output and its
  log-sum-exp are merged with a max-subtracted online-softmax merge. With the load-balanced layout,
  step 0 is causal attention on the local tokens and every later step needs only the first half of
  the received K/V (it comes from an earlier rank: both query chunks see its early chunk, none see
  its late chunk) or only the second half of the queries (it comes from a later rank: only the late
  query chunk sees anything, and sees both its chunks), i.e. half a block of work.
  Backward passes K/V around the ring again, with a dK/dV accumulator that travels with them and
  arrives back at its owner after C hops; block gradients are recomputed from the saved q, k, v,
  output and log-sum-exp (dS = P * (dP - rowsum(dO * O))), so saved memory stays O(s).
- "all_gather": K/V are all-gathered once, attention runs with the causal offsets of the two local
  query chunks; backward re-gathers K/V and reduce-scatters dK/dV.
- "a2a" (Ulysses): an all-to-all turns [sequence-sharded, all heads] into [whole sequence,
  nq/C heads], causal attention runs locally on the sequence put back in global order, and an
  all-to-all turns the output back. Needs nq % C == 0 (key/value groups are repeated per query
  head when ng % C != 0).

Block kernels. "math" is plain PyTorch (scores in fp32, or fp64 for fp64 inputs) and runs anywhere;
it is the reference. "flash" calls torch's flash-attention ops, which return the log-sum-exp the
merge needs: aten._scaled_dot_product_flash_attention and its backward on CUDA,
aten._scaled_dot_product_flash_attention_for_cpu and its backward on CPU. "cudnn" calls
aten._scaled_dot_product_cudnn_attention (compute_log_sumexp) and its backward, CUDA only. "auto"
picks cudnn for fp16/bf16 tensors on Hopper or newer with head dim <= 128 (multiple of 8), flash
for other fp16/bf16 CUDA tensors with head dim <= 256, else math. The backward of every kernel is
given the rows' FINAL output and log-sum-exp (after all merges), so each block's probabilities
are its share of the whole softmax.
Dropout inside context-parallel attention is not supported.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from gigatron.core.parallel.mappings import all_gather, all_to_all, reduce_scatter

__all__ = [
    "COMM_TYPES",
    "check_context_parallel_seq_length",
    "cp_chunk_indices",
    "split_for_cp_rank",
    "gather_cp_splits",
    "get_batch_on_this_cp_rank",
    "merge_attention_partials",
    "block_attention_forward",
    "block_attention_backward",
    "local_attention",
    "ring_attention",
]

COMM_TYPES = ("p2p", "all_gather", "a2a")

# ---------------------------------------------------------------------------------------------
# Load-balanced layout
# ---------------------------------------------------------------------------------------------


def check_context_parallel_seq_length(seq_length: int, cp_size: int) -> None:
    """Raise ValueError unless the sequence splits into 2 x cp_size equal chunks."""
    if cp_size < 1:
        raise ValueError(f"--context-parallel-size must be >= 1, got {cp_size}")
    if cp_size > 1 and seq_length % (2 * cp_size) != 0:
        raise ValueError(
            f"--seq-length ({seq_length}) must be divisible by 2 x --context-parallel-size "
            f"(2 x {cp_size} = {2 * cp_size}): context parallelism splits the sequence into that many "
            "equal chunks; change --seq-length or --context-parallel-size")


def _chunk_order(cp_size: int, cp_rank: int) -> list:
    return [cp_rank, 2 * cp_size - 1 - cp_rank]


def cp_chunk_indices(seq_length: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global token positions held by cp rank `cp_rank`: chunks r and 2C-1-r -> LongTensor [S / C]."""
    check_context_parallel_seq_length(seq_length, cp_size)
    if cp_size == 1:
        return torch.arange(seq_length, device=device)
    chunk = seq_length // (2 * cp_size)
    starts = [j * chunk for j in _chunk_order(cp_size, cp_rank)]
    return torch.cat([torch.arange(st, st + chunk, device=device) for st in starts])  # [2c]


def split_for_cp_rank(x: torch.Tensor, cp_size: int, cp_rank: int, seq_dim: int) -> torch.Tensor:
    """This cp rank's part of `x` along `seq_dim` (chunks r and 2C-1-r, concatenated)."""
    if cp_size == 1:
        return x
    seq_dim = seq_dim % x.dim()
    check_context_parallel_seq_length(x.shape[seq_dim], cp_size)
    chunk = x.shape[seq_dim] // (2 * cp_size)
    shape = tuple(x.shape)
    x = x.reshape(shape[:seq_dim] + (2 * cp_size, chunk) + shape[seq_dim + 1:])  # [.., 2C, c, ..]
    index = torch.tensor(_chunk_order(cp_size, cp_rank), device=x.device)
    x = x.index_select(seq_dim, index)  # [.., 2, c, ..]
    return x.reshape(shape[:seq_dim] + (2 * chunk,) + shape[seq_dim + 1:])  # [.., 2c, ..]


def _rank_order_permutation(cp_size: int) -> list:
    """Global chunk at each position of the rank-order concatenation [rank 0's two chunks, rank 1's, ...]."""
    order = []
    for rank in range(cp_size):
        order.extend(_chunk_order(cp_size, rank))
    return order


def _reorder_chunks(x: torch.Tensor, cp_size: int, dim: int, to_global: bool) -> torch.Tensor:
    """Permute the 2C chunks of `x` along `dim` between rank order and global (sequence) order."""
    perm = _rank_order_permutation(cp_size)
    if to_global:
        index = [0] * len(perm)
        for position, chunk_id in enumerate(perm):
            index[chunk_id] = position
    else:
        index = perm
    dim = dim % x.dim()
    shape = tuple(x.shape)
    chunk = shape[dim] // (2 * cp_size)
    x = x.reshape(shape[:dim] + (2 * cp_size, chunk) + shape[dim + 1:])  # [.., 2C, c, ..]
    x = x.index_select(dim, torch.tensor(index, device=x.device))  # [.., 2C, c, ..] permuted
    return x.reshape(shape)  # [.., S, ..]


def gather_cp_splits(parts: list, seq_dim: int) -> torch.Tensor:
    """Inverse of split_for_cp_rank: the per-rank parts (in cp-rank order) -> the whole sequence."""
    full = torch.cat(parts, dim=seq_dim)  # rank order
    return _reorder_chunks(full, len(parts), seq_dim, to_global=True) if len(parts) > 1 else full


# Keys split along the sequence and the dim that holds it; an attention mask [b, 1, S, S] keeps all
# keys and splits its query dim.
_SEQ_DIM = {"attention_mask": 2}


def get_batch_on_this_cp_rank(batch: dict, cp) -> dict:
    """Split a micro-batch for this context-parallel rank (chunks r and 2C-1-r of the sequence).

    `batch`: dict of tensors [b, S] (tokens, labels, loss_mask, position_ids, ...) and optionally
    attention_mask [b, 1, S, S]; None values pass through. `cp`: the cp Group. Returns a new dict
    with [b, S / C] tensors (attention_mask [b, 1, S / C, S]). Raises ValueError naming
    --seq-length and --context-parallel-size when S is not divisible by 2 x C."""
    if cp.size <= 1:
        return dict(batch)
    out = {}
    for key, value in batch.items():
        if value is None or not isinstance(value, torch.Tensor) or value.dim() < 2:
            out[key] = value
            continue
        out[key] = split_for_cp_rank(value, cp.size, cp.rank, _SEQ_DIM.get(key, 1))
    return out


# ---------------------------------------------------------------------------------------------
# Block kernels
# ---------------------------------------------------------------------------------------------


def merge_attention_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                             lse_b: torch.Tensor):
    """Combine two partial attentions over disjoint key sets into the attention over their union.

    out_*: [..., sq, d] each normalized over its own keys; lse_*: [..., sq] log-sum-exp of the scaled
    scores over those keys (-inf for a row that saw no key). Returns (out, lse) in out_a's dtype;
    the weights are exp(lse_* - max) so nothing overflows, and a row empty in both stays 0 / -inf."""
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w_a = torch.exp(lse_a - top)  # [..., sq]
    w_b = torch.exp(lse_b - top)  # [..., sq]
    total = w_a + w_b
    lse = top + torch.log(total)  # -inf where both are empty
    safe = torch.where(total > 0, total, torch.ones_like(total))
    out = (out_a * (w_a / safe).unsqueeze(-1) + out_b.to(out_a.dtype) * (w_b / safe).unsqueeze(-1))
    return out.to(out_a.dtype), lse


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _causal_mask(sq: int, sk: int, device) -> torch.Tensor:
    """True above the diagonal (top-left aligned; blocks are square whenever it is used)."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(1)


def _grouped(q: torch.Tensor, num_groups: int) -> torch.Tensor:
    b, nq, sq, d = q.shape
    return q.reshape(b, num_groups, nq // num_groups, sq, d)  # [b, ng, hpg, sq, d]


def _math_forward(q, k, v, causal: bool, scale: float):
    cdt = _compute_dtype(q.dtype)
    b, nq, sq, d = q.shape
    ng, sk = k.shape[1], k.shape[2]
    qg = _grouped(q.to(cdt), ng)  # [b, ng, hpg, sq, d]
    kg = k.to(cdt).unsqueeze(2)  # [b, ng, 1, sk, d]
    vg = v.to(cdt).unsqueeze(2)  # [b, ng, 1, sk, d]
    scores = torch.matmul(qg, kg.transpose(-2, -1)) * scale  # [b, ng, hpg, sq, sk]
    if causal:
        scores = scores.masked_fill(_causal_mask(sq, sk, q.device), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [b, ng, hpg, sq]
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - finite.unsqueeze(-1))  # [b, ng, hpg, sq, sk]
    out = torch.matmul(probs, vg)  # [b, ng, hpg, sq, d]
    return out.reshape(b, nq, sq, d), lse.reshape(b, nq, sq)  # [b, nq, sq, d], [b, nq, sq]


def _math_backward(dout, q, k, v, lse, delta, causal: bool, scale: float):
    cdt = _compute_dtype(q.dtype)
    b, nq, sq, d = q.shape
    ng, sk = k.shape[1], k.shape[2]
    qg = _grouped(q.to(cdt), ng)  # [b, ng, hpg, sq, d]
    dog = _grouped(dout.to(cdt), ng)  # [b, ng, hpg, sq, d]
    kg = k.to(cdt).unsqueeze(2)  # [b, ng, 1, sk, d]
    vg = v.to(cdt).unsqueeze(2)  # [b, ng, 1, sk, d]
    hpg = nq // ng
    lse_g = lse.to(cdt).reshape(b, ng, hpg, sq, 1)  # [b, ng, hpg, sq, 1]
    delta_g = delta.to(cdt).reshape(b, ng, hpg, sq, 1)  # [b, ng, hpg, sq, 1]
    scores = torch.matmul(qg, kg.transpose(-2, -1)) * scale  # [b, ng, hpg, sq, sk]
    if causal:
        scores = scores.masked_fill(_causal_mask(sq, sk, q.device), float("-inf"))
    finite = torch.where(torch.isfinite(lse_g), lse_g, torch.zeros_like(lse_g))
    probs = torch.exp(scores - finite)  # [b, ng, hpg, sq, sk]
    dv = torch.matmul(probs.transpose(-2, -1), dog).sum(2)  # [b, ng, sk, d]
    dprobs = torch.matmul(dog, vg.transpose(-2, -1))  # [b, ng, hpg, sq, sk]
    dscores = probs * (dprobs - delta_g)  # [b, ng, hpg, sq, sk]
    dq = torch.matmul(dscores, kg) * scale  # [b, ng, hpg, sq, d]
    dk = torch.matmul(dscores.transpose(-2, -1), qg).sum(2) * scale  # [b, ng, sk, d]
    return dq.reshape(b, nq, sq, d), dk, dv


def _repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    groups = x.shape[1]
    if groups == num_heads:
        return x
    return x.repeat_interleave(num_heads // groups, dim=1)  # [b, nq, sk, d]


def _sum_groups(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    b, nq, sk, d = x.shape
    if nq == num_groups:
        return x
    grouped = x.reshape(b, num_groups, nq // num_groups, sk, d)  # [b, ng, hpg, sk, d]
    return grouped.sum(2, dtype=_compute_dtype(x.dtype))  # [b, ng, sk, d], summed in fp32


def _flash_forward(q, k, v, causal: bool, scale: float):
    nq = q.shape[1]
    if not q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, _repeat_kv(k, nq), _repeat_kv(v, nq), 0.0, causal, scale=scale)
        return out, lse, None  # [b, nq, sq, d], [b, nq, sq]
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        q, _repeat_kv(k, nq), _repeat_kv(v, nq), 0.0, causal, False, scale=scale)
    # res: output [b, nq, sq, d], logsumexp [b, nq, sq] fp32, cum_seq_q, cum_seq_k, max_q, max_k,
    # rng state (2 tensors), debug mask. The backward takes cum_seq_* and the rng state back.
    return res[0], res[1], (res[2], res[3], res[6], res[7])


def _flash_backward(dout, q, k, v, out, lse, causal: bool, scale: float, aux):
    nq, ng = q.shape[1], k.shape[1]
    if not q.is_cuda:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, _repeat_kv(k, nq), _repeat_kv(v, nq), out, lse.contiguous(), 0.0, causal, scale=scale)
        return dq, _sum_groups(dk, ng), _sum_groups(dv, ng)
    cum_q, cum_k, rng_a, rng_b = aux
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, _repeat_kv(k, nq), _repeat_kv(v, nq), out, lse.contiguous(), cum_q, cum_k,
        q.shape[2], k.shape[2], 0.0, causal, rng_a, rng_b, scale=scale)
    return dq, _sum_groups(dk, ng), _sum_groups(dv, ng)


def _cudnn_forward(q, k, v, causal: bool, scale: float):
    nq = q.shape[1]
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, _repeat_kv(k, nq), _repeat_kv(v, nq), None, True, 0.0, causal, False, scale=scale)
    # res: output [b, nq, sq, d], logsumexp (fp32, [b, nq, sq] or with a trailing 1), cum_seq_q,
    # cum_seq_k, max_q, max_k, philox seed and offset, debug mask.
    lse = res[1].reshape(q.shape[0], nq, q.shape[2])  # [b, nq, sq]
    # The ring reuses the first block's aux for every block: keep nothing shape-specific in it.
    return res[0], lse, (res[2], res[3], res[6], res[7], res[1].dim() == 4)


def _cudnn_backward(dout, q, k, v, out, lse, causal: bool, scale: float, aux):
    nq, ng = q.shape[1], k.shape[1]
    cum_q, cum_k, seed, offset, trailing_one = aux
    lse = lse.contiguous()
    if trailing_one:
        lse = lse.unsqueeze(-1)  # [b, nq, sq, 1], as the forward returned it
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, _repeat_kv(k, nq), _repeat_kv(v, nq), out, lse, seed, offset,
        None, cum_q, cum_k, q.shape[2], k.shape[2], 0.0, causal, scale=scale)
    return dq, _sum_groups(dk, ng), _sum_groups(dv, ng)


_BLOCK_KERNELS = ("auto", "cudnn", "flash", "math")


def _resolve_kernel(kernel: str, q: torch.Tensor) -> str:
    if kernel not in _BLOCK_KERNELS:
        raise ValueError(f"attention block kernel must be one of {', '.join(_BLOCK_KERNELS)}, got {kernel!r}")
    if kernel == "cudnn":
        if not (q.is_cuda and hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention")):
            raise ValueError("the cudnn attention block kernel needs a CUDA device and aten."
                             "_scaled_dot_product_cudnn_attention; use --attention-backend flash or local")
        return kernel
    if kernel == "flash":
        op = "_scaled_dot_product_flash_attention" if q.is_cuda else "_scaled_dot_product_flash_attention_for_cpu"
        if not hasattr(torch.ops.aten, op):
            raise ValueError(f"the flash attention block kernel needs aten.{op}, which this torch "
                             f"{torch.__version__} lacks; use the math kernel (--attention-backend local) "
                             "or a newer torch")
        return kernel
    if kernel == "math":
        return kernel
    d = q.shape[-1]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0:
        # cuDNN's fused attention runs the blocks about 1.8x faster than the flash op on Hopper
        # (bench_context_parallel.py, H200); older cards and larger heads take flash.
        if (d <= 128 and torch.cuda.get_device_capability(q.device) >= (9, 0)
                and hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention")):
            return "cudnn"
        if d <= 256 and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention"):
            return "flash"
    return "math"


def block_attention_forward(q, k, v, causal: bool, scale: float, kernel: str = "math"):
    """One block of attention: (out [b, nq, sq, d], lse [b, nq, sq] fp32/fp64, aux).

    q [b, nq, sq, d]; k, v [b, ng, sk, d]. causal: mask above the diagonal (square blocks).
    out is in the compute dtype (math) or q's dtype (flash, cudnn); aux is what the fused
    (flash, cudnn) backward needs."""
    if kernel == "flash":
        return _flash_forward(q, k, v, causal, scale)
    if kernel == "cudnn":
        return _cudnn_forward(q, k, v, causal, scale)
    out, lse = _math_forward(q, k, v, causal, scale)
    return out, lse, None


def block_attention_backward(dout, q, k, v, out, lse, delta, causal: bool, scale: float,
                             kernel: str = "math", aux=None):
    """Gradients of one block given the FINAL output and log-sum-exp of the rows (so the block's
    probabilities are exp(s - lse) and the softmax correction is delta = rowsum(dO * O)).

    Returns (dq [b, nq, sq, d], dk [b, ng, sk, d], dv [b, ng, sk, d]); math returns the compute
    dtype, flash and cudnn q's dtype. `delta` is used by math (the fused kernels recompute it from
    dout and out)."""
    if kernel == "flash":
        return _flash_backward(dout, q, k, v, out.to(q.dtype), lse, causal, scale, aux)
    if kernel == "cudnn":
        return _cudnn_backward(dout, q, k, v, out.to(q.dtype), lse, causal, scale, aux)
    return _math_backward(dout, q, k, v, lse, delta, causal, scale)


def _delta(dout: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    cdt = _compute_dtype(out.dtype)
    return (dout.to(cdt) * out.to(cdt)).sum(-1)  # [b, nq, sq]


class _LocalAttention(torch.autograd.Function):
    """forward: attention on local q, k, v (no communication); backward: its gradients,
    recomputed from the saved output and log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, kernel):
        out, lse, aux = block_attention_forward(q, k, v, causal, scale, kernel)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.kernel, ctx.aux = causal, scale, kernel, aux
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = block_attention_backward(dout, q, k, v, out, lse, _delta(dout, out), ctx.causal,
                                              ctx.scale, ctx.kernel, ctx.aux)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def local_attention(q, k, v, causal: bool = True, softmax_scale: Optional[float] = None,
                    kernel: str = "auto") -> torch.Tensor:
    """Attention without communication on [b, nq, s, d] / [b, ng, s, d] -> [b, nq, s, d]."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _LocalAttention.apply(q, k, v, causal, scale, _resolve_kernel(kernel, q))


# ---------------------------------------------------------------------------------------------
# p2p: ring attention
# ---------------------------------------------------------------------------------------------


def _ring_exchange(send: torch.Tensor, recv: torch.Tensor, cp, tag: int):
    """Post: send `send` to the next cp rank, receive `recv` from the previous one. Returns requests."""
    next_rank = cp.ranks[(cp.rank + 1) % cp.size]
    prev_rank = cp.ranks[(cp.rank - 1) % cp.size]
    ops = [dist.P2POp(dist.isend, send, next_rank, group=cp.group, tag=tag),
           dist.P2POp(dist.irecv, recv, prev_rank, group=cp.group, tag=tag)]
    return dist.batch_isend_irecv(ops)


def _wait(requests) -> None:
    for request in requests or ():
        request.wait()


def _ring_step_plan(step: int, cp_rank: int, causal: bool, half: int):
    """(query rows, key/value columns, causal) of step `step`: which slice of the local queries
    attends to which slice of the received K/V (chunks src and 2C-1-src, src = rank - step)."""
    everything = slice(None)
    if not causal:
        return everything, everything, False
    if step == 0:
        return everything, everything, True  # own chunks: causal over the local order
    if step <= cp_rank:
        return everything, slice(0, half), False  # from an earlier rank: its early chunk only
    return slice(half, None), everything, False  # from a later rank: the late query chunk only


class _RingAttention(torch.autograd.Function):
    """forward: ring attention (K/V passed to the next cp rank each step, partial outputs merged
    by log-sum-exp); backward: K/V passed around the ring again with a travelling dK/dV
    accumulator that returns to its owner after cp.size hops."""

    @staticmethod
    def forward(ctx, q, k, v, cp, causal, scale, kernel):
        cp_size, cp_rank = cp.size, cp.rank
        half = q.shape[2] // 2
        acc = _compute_dtype(q.dtype)
        kv = torch.stack([k, v])  # [2, b, ng, s, d]
        out = lse = aux = None
        for step in range(cp_size):
            requests = None
            if step + 1 < cp_size:
                incoming = torch.empty_like(kv)
                requests = _ring_exchange(kv, incoming, cp, tag=step)  # overlaps the block below
            rows, cols, block_causal = _ring_step_plan(step, cp_rank, causal, half)
            block_out, block_lse, block_aux = block_attention_forward(
                q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], block_causal, scale, kernel)
            if out is None:
                out, lse, aux = block_out.to(acc), block_lse, block_aux
            else:
                merged_out, merged_lse = merge_attention_partials(out[:, :, rows], lse[:, :, rows],
                                                                  block_out, block_lse)
                out[:, :, rows] = merged_out
                lse[:, :, rows] = merged_lse
            _wait(requests)
            if requests is not None:
                kv = incoming
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cp, ctx.causal, ctx.scale, ctx.kernel, ctx.aux = cp, causal, scale, kernel, aux
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        cp, causal, scale, kernel, aux = ctx.cp, ctx.causal, ctx.scale, ctx.kernel, ctx.aux
        cp_size, cp_rank = cp.size, cp.rank
        half = q.shape[2] // 2
        acc = _compute_dtype(q.dtype)
        dout = dout.contiguous()
        delta = _delta(dout, out)  # [b, nq, s]
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)  # [b, nq, s, d]
        kv = torch.stack([k, v])  # [2, b, ng, s, d]
        dkv_requests, dkv_incoming = None, None
        tag_base = cp_size  # keeps the dK/dV messages apart from the K/V ones
        for step in range(cp_size):
            kv_requests = None
            if step + 1 < cp_size:
                incoming = torch.empty_like(kv)
                kv_requests = _ring_exchange(kv, incoming, cp, tag=step)
            rows, cols, block_causal = _ring_step_plan(step, cp_rank, causal, half)
            dq_block, dk_block, dv_block = block_attention_backward(
                dout[:, :, rows], q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols],
                out[:, :, rows], lse[:, :, rows], delta[:, :, rows], block_causal, scale, kernel, aux)
            dq[:, :, rows] += dq_block
            # dK/dV of the K/V held this step: what earlier ranks added on its way here, plus ours.
            if step == 0:
                dkv = torch.zeros((2,) + tuple(k.shape), dtype=acc, device=k.device)  # [2, b, ng, s, d]
            else:
                _wait(dkv_requests)
                dkv = dkv_incoming
            dkv[0][:, :, cols] += dk_block
            dkv[1][:, :, cols] += dv_block
            dkv_incoming = torch.empty_like(dkv)
            dkv_requests = _ring_exchange(dkv, dkv_incoming, cp, tag=tag_base + step)
            _wait(kv_requests)
            if kv_requests is not None:
                kv = incoming
        _wait(dkv_requests)  # after cp_size hops the accumulator of our own K/V is back
        return (dq.to(q.dtype), dkv_incoming[0].to(k.dtype), dkv_incoming[1].to(v.dtype),
                None, None, None, None)


# ---------------------------------------------------------------------------------------------
# all_gather
# ---------------------------------------------------------------------------------------------


def _load_balanced_pieces(cp_size: int, cp_rank: int, chunk: int, causal: bool):
    """(query rows, global key columns, causal) pieces of this rank's attention over the whole
    gathered K/V (global order): each local chunk j sees keys [0, j*c) fully and its own chunk
    causally."""
    if not causal:
        return [(slice(None), slice(None), False)]
    pieces = []
    for local, j in enumerate(_chunk_order(cp_size, cp_rank)):
        rows = slice(local * chunk, (local + 1) * chunk)
        if j > 0:
            pieces.append((rows, slice(0, j * chunk), False))
        pieces.append((rows, slice(j * chunk, (j + 1) * chunk), True))
    return pieces


def _gather_kv(k, v, cp):
    kv = torch.stack([k, v])  # [2, b, ng, s, d]
    kv = all_gather(kv, cp, dim=3)  # [2, b, ng, S, d] in rank order
    return _reorder_chunks(kv, cp.size, 3, to_global=True)  # [2, b, ng, S, d] in sequence order


class _AllGatherAttention(torch.autograd.Function):
    """forward: all-gather K/V over the cp group, attention with the two local chunks' causal
    offsets; backward: all-gather K/V again, reduce-scatter dK/dV over the cp group."""

    @staticmethod
    def forward(ctx, q, k, v, cp, causal, scale, kernel):
        kv = _gather_kv(k, v, cp)
        chunk = q.shape[2] // 2
        acc = _compute_dtype(q.dtype)
        out = torch.zeros(q.shape, dtype=acc, device=q.device)  # [b, nq, s, d]
        lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)  # [b, nq, s]
        aux = None
        for rows, cols, block_causal in _load_balanced_pieces(cp.size, cp.rank, chunk, causal):
            block_out, block_lse, aux = block_attention_forward(
                q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], block_causal, scale, kernel)
            merged_out, merged_lse = merge_attention_partials(out[:, :, rows], lse[:, :, rows],
                                                              block_out, block_lse.to(acc))
            out[:, :, rows] = merged_out
            lse[:, :, rows] = merged_lse
        out = out.to(q.dtype)
        lse = lse.float() if kernel in ("flash", "cudnn") else lse  # the fused backward kernels take fp32
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cp, ctx.causal, ctx.scale, ctx.kernel, ctx.aux = cp, causal, scale, kernel, aux
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        cp, kernel = ctx.cp, ctx.kernel
        dout = dout.contiguous()
        kv = _gather_kv(k, v, cp)  # re-gathered rather than kept: saved memory stays O(s)
        chunk = q.shape[2] // 2
        acc = _compute_dtype(q.dtype)
        delta = _delta(dout, out)  # [b, nq, s]
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)  # [b, nq, s, d]
        dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)  # [2, b, ng, S, d]
        for rows, cols, block_causal in _load_balanced_pieces(cp.size, cp.rank, chunk, ctx.causal):
            dq_block, dk_block, dv_block = block_attention_backward(
                dout[:, :, rows], q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], out[:, :, rows],
                lse[:, :, rows], delta[:, :, rows], block_causal, ctx.scale, kernel, ctx.aux)
            dq[:, :, rows] += dq_block
            dkv[0][:, :, cols] += dk_block
            dkv[1][:, :, cols] += dv_block
        dkv = _reorder_chunks(dkv, cp.size, 3, to_global=False)  # [2, b, ng, S, d] in rank order
        dkv = reduce_scatter(dkv, cp, dim=3)  # [2, b, ng, s, d]: the sum over ranks of our part
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


# ---------------------------------------------------------------------------------------------
# a2a (Ulysses)
# ---------------------------------------------------------------------------------------------


def _ulysses_attention(q, k, v, cp, causal: bool, scale: float, kernel: str) -> torch.Tensor:
    cp_size = cp.size
    num_heads, num_groups = q.shape[1], k.shape[1]
    if num_heads % cp_size != 0:
        raise ValueError(
            f"cp_comm_type a2a splits the attention heads over the context-parallel ranks: "
            f"{num_heads} query heads per tensor-parallel rank are not divisible by "
            f"--context-parallel-size {cp_size}; use --cp-comm-type p2p or all_gather, or change the sizes")
    if num_groups % cp_size != 0:
        k = _repeat_kv(k, num_heads)  # [b, nq, s, d]: each rank then gets the groups of its heads
        v = _repeat_kv(v, num_heads)  # [b, nq, s, d]
    q = all_to_all(cp, q, split_dim=1, concat_dim=2)  # [b, nq/C, S, d] rank order
    k = all_to_all(cp, k, split_dim=1, concat_dim=2)  # [b, ng/C, S, d] rank order
    v = all_to_all(cp, v, split_dim=1, concat_dim=2)  # [b, ng/C, S, d] rank order
    q = _reorder_chunks(q, cp_size, 2, to_global=True)  # [b, nq/C, S, d] sequence order
    k = _reorder_chunks(k, cp_size, 2, to_global=True)  # [b, ng/C, S, d]
    v = _reorder_chunks(v, cp_size, 2, to_global=True)  # [b, ng/C, S, d]
    out = _LocalAttention.apply(q, k, v, causal, scale, kernel)  # [b, nq/C, S, d]
    out = _reorder_chunks(out, cp_size, 2, to_global=False)  # [b, nq/C, S, d] rank order
    return all_to_all(cp, out, split_dim=2, concat_dim=1)  # [b, nq, s, d]


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


# Megatron's --help spells the all-gather variant "allgather"; Transformer Engine "all_gather".
_COMM_ALIASES = {"allgather": "all_gather"}


def _check_inputs(q, k, v, cp, causal: bool, comm_type: str) -> None:
    if comm_type not in COMM_TYPES:
        hint = " (the hierarchical a2a+p2p is not implemented)" if comm_type == "a2a+p2p" else ""
        raise ValueError(f"--cp-comm-type must be one of {', '.join(COMM_TYPES)}, got {comm_type!r}{hint}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("ring_attention takes q, k, v as [b, heads, s_local, d]; got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"ring_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must match q "
                         f"{tuple(q.shape)} in batch, sequence and head dim")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"ring_attention: {q.shape[1]} query heads are not a multiple of "
                         f"{k.shape[1]} key/value groups")
    if cp.size > 1 and causal and q.shape[2] % 2 != 0:
        raise ValueError(
            f"the local sequence ({q.shape[2]} tokens) must hold two equal chunks: --seq-length must be "
            f"divisible by 2 x --context-parallel-size ({2 * cp.size})")


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp, causal: bool = True,
                   softmax_scale: Optional[float] = None, comm_type: str = "p2p",
                   kernel: str = "auto") -> torch.Tensor:
    """Attention of this rank's queries over the whole context-parallel sequence.

    q [b, nq, s, d], k and v [b, ng, s, d] (nq % ng == 0): this rank's tokens in the load-balanced
    layout (chunks r and 2C-1-r of the sequence, see get_batch_on_this_cp_rank). cp: the cp Group.
    causal: causal attention over the global sequence (False: every query sees every key).
    softmax_scale: default 1/sqrt(d). comm_type: "p2p" (ring), "all_gather" (also spelled
    "allgather") or "a2a" (Ulysses).
    kernel: "auto", "flash", "cudnn" or "math" for the per-block attention.
    Returns [b, nq, s, d] in q's dtype. With cp.size == 1 this is plain local attention."""
    comm_type = _COMM_ALIASES.get(comm_type, comm_type)
    _check_inputs(q, k, v, cp, causal, comm_type)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    kernel = _resolve_kernel(kernel, q)
    if cp.size == 1:
        return _LocalAttention.apply(q, k, v, causal, scale, kernel)
    if comm_type == "p2p":
        return _RingAttention.apply(q, k, v, cp, causal, scale, kernel)
    if comm_type == "all_gather":
        return _AllGatherAttention.apply(q, k, v, cp, causal, scale, kernel)
    return _ulysses_attention(q, k, v, cp, causal, scale, kernel)
