"""Attention of one new token per row over its KV cache, writing that token's key/value (Triton),
with plain PyTorch as the reference.

Shape legend: b = rows, nq = query heads, ng = key/value groups (nq % ng == 0), hpg = nq / ng,
d = head dim, B = cache rows (b <= B), S = cache slots per row.

    decode_attention(q [b, nq, d], k [b, ng, d], v [b, ng, d],
                     key_cache [B, S, ng, d], value_cache [B, S, ng, d],
                     positions [b] (long), kv_len, scale, pdl=False) -> [b, nq, d]

writes k and v into slot positions[r] of row r of the caches and returns, for every row and query
head, softmax(q . K^T * scale) V over that row's slots 0..positions[r] (the causal cache mask of
the inference engine: later slots hold padding or stale values and are never read). kv_len (the
decode step's static attention length, > every position) only sizes the work split.

One decode step of a GPT otherwise runs three to five kernels per layer here (the split of the
QKV output, two cache writes, the mask and the attention, which reads all kv_len slots); this is
one kernel that reads only the slots a row attends to. Each program takes one (row, query head, slot range)
(the heads vary fastest in launch order, so the heads that share a key/value group run side by
side and read its keys/values from L2):
it walks its range in BLOCK_L-slot tiles (the next tile in flight while one is reduced) with an
online softmax in fp32, and the program of slot range 0 also scores the new key from registers
and the first head of each group stores the new key/value into the cache (no program reads the
slot being written). The slots are split into ranges until there are about as many programs as
SMs (a batch-1 step of 16 heads would otherwise stream its cache through 16 SMs); each row splits
its own slots 0..positions[r]-1 into that many equal ranges of whole tiles, so rows of different
lengths in one step (continuous batching, whose step passes the whole cache length as kv_len)
each spread their work evenly and read nothing past their position; with more
than one range every program leaves its (max, sum, weighted values) in a workspace and counts
itself in with an atomic add; the last program of a (row, head) to arrive combines the ranges
(the split-K "last block reduces" pattern), so the step needs no second kernel.

It is registered as the custom op gigatron::decode_attention (mutating the two caches) so that
torch.compile keeps it as one call and a CUDA graph captures it; without CUDA or Triton the op
runs the reference. `pdl=True` launches it with programmatic dependent launch where the GPU has
it (gemv.pdl_supported).
"""

from __future__ import annotations

import functools
import math

import torch

from gigatron.core.ops.gemv import gemv_available, pdl_supported

BLOCK_L = 64

__all__ = ["decode_attention", "reference_decode_attention", "decode_attention_splits", "decode_attention_preferred"]

# Programs that fill a large GPU (an H100 or H200 has 132 SMs).
GPU_PROGRAMS = 132


def reference_decode_attention(q, k, v, key_cache, value_cache, positions, kv_len: int, scale: float):
    """Plain PyTorch: index_put the new keys/values, then masked attention over kv_len slots."""
    b = q.shape[0]
    rows = torch.arange(b, device=q.device)
    key_cache[rows, positions] = k.to(key_cache.dtype)
    value_cache[rows, positions] = v.to(value_cache.dtype)
    keys = key_cache[:b, :kv_len].float()  # [b, kv_len, ng, d]
    values = value_cache[:b, :kv_len].float()
    hpg = q.shape[1] // keys.shape[2]
    keys = keys.repeat_interleave(hpg, dim=2)  # [b, kv_len, nq, d]
    values = values.repeat_interleave(hpg, dim=2)
    scores = torch.einsum("bhd,bshd->bhs", q.float(), keys) * scale  # [b, nq, kv_len]
    hidden = torch.arange(kv_len, device=q.device)[None, :] > positions[:, None]  # [b, kv_len]
    scores = scores.masked_fill(hidden[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhs,bshd->bhd", probs, values).to(q.dtype)  # [b, nq, d]


def decode_attention_preferred(rows: int, heads: int) -> bool:
    """Decode steps attend with this kernel while their (row, head) pairs alone do not fill the
    GPU, so that splitting the slots pays: measured on one H200 for the 1.3B GPT (16 heads) at
    128 new tokens after a 128-token prompt, batch 8 ran 5,008 tokens/s against 4,912 with cuDNN
    attention, batch 64 23,778 against 25,996. (Batch 1 needs it: the fused one-row layers
    attend only through it.)"""
    return rows * heads < GPU_PROGRAMS


def decode_attention_splits(rows: int, heads: int, kv_len: int) -> int:
    """How many slot ranges each (row, head) is split into: enough for about one program per SM
    of a large GPU (132), each range at least one BLOCK_L tile; one range once rows * heads fill
    the GPU. (With 16 heads at batch 1 one program per head walks its slots alone on 16 SMs.)"""
    return max(1, min(-(-GPU_PROGRAMS // (rows * heads)), -(-kv_len // BLOCK_L)))


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def attention_kernel(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, pos_ptr, o_ptr, part_ptr, count_ptr,
                         sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sc_b, sc_s, sc_h, svc_b, svc_s, svc_h, so_b, so_h,
                         scale, HPG: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr,
                         BLOCK_L: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # see gemv.pdl_supported
            tl.extra.cuda.gdc_launch_dependents()
        # Heads vary fastest in launch order: the heads of one key/value group (GQA) run side by
        # side and read the group's cached keys/values from L2 rather than each from HBM.
        head = tl.program_id(0)
        row = tl.program_id(1)
        split = tl.program_id(2)
        group = head // HPG
        d = tl.arange(0, D_P2)
        d_ok = d < D
        row64 = row.to(tl.int64)
        pos = tl.load(pos_ptr + row)
        # This row's own split of its pos cached slots: equal ranges of whole tiles, so a short
        # row next to long ones (continuous batching) spreads its few tiles over its programs.
        chunk = tl.cdiv(tl.cdiv(pos, SPLITS), BLOCK_L) * BLOCK_L
        start = split * chunk
        end = tl.minimum(start + chunk, pos)  # this range's cached slots: [start, end), all before pos
        slots = tl.arange(0, BLOCK_L)
        k_base = kc_ptr + row64 * sc_b + group * sc_h
        v_base = vc_ptr + row64 * svc_b + group * svc_h
        s = start + slots
        tile_ok = (s < end)[:, None] & d_ok[None, :]
        keys = tl.load(k_base + s.to(tl.int64)[:, None] * sc_s + d[None, :], mask=tile_ok, other=0.0)
        values = tl.load(v_base + s.to(tl.int64)[:, None] * svc_s + d[None, :], mask=tile_ok, other=0.0)
        # The positions and the cached slots before them were written before this step began (a
        # graph's inputs, earlier steps), so the first tile is in flight before the wait for the
        # QKV projection that produces q and the new key/value.
        if PDL:
            tl.extra.cuda.gdc_wait()
        q = tl.load(q_ptr + row64 * sq_b + head * sq_h + d, mask=d_ok, other=0.0).to(tl.float32)
        k_new = tl.load(k_ptr + row64 * sk_b + group * sk_h + d, mask=d_ok, other=0.0)
        v_new = tl.load(v_ptr + row64 * sv_b + group * sv_h + d, mask=d_ok, other=0.0)
        # The first head of each group stores the new key/value (range 0's program); nobody reads slot pos.
        writer = (d * 0 + split + head % HPG) == 0  # [D_P2], all true in those programs
        tl.store(kc_ptr + row64 * sc_b + pos * sc_s + group * sc_h + d, k_new.to(kc_ptr.dtype.element_ty),
                 mask=d_ok & writer)
        tl.store(vc_ptr + row64 * svc_b + pos * svc_s + group * svc_h + d, v_new.to(vc_ptr.dtype.element_ty),
                 mask=d_ok & writer)
        # Online softmax over the range, the next tiles in flight while this one is reduced.
        m = tl.full([], -1.0e30, dtype=tl.float32)  # finite: an empty range keeps exp(m - m_new) finite
        total = tl.full([], 0.0, dtype=tl.float32)
        acc = tl.zeros((D_P2,), dtype=tl.float32)
        for s0 in range(start, end, BLOCK_L):
            s_ok = (s0 + slots) < end
            kf = keys.to(tl.float32)
            vf = values.to(tl.float32)
            s_next = s0 + BLOCK_L + slots
            next_ok = (s_next < end)[:, None] & d_ok[None, :]
            keys = tl.load(k_base + s_next.to(tl.int64)[:, None] * sc_s + d[None, :], mask=next_ok, other=0.0)
            values = tl.load(v_base + s_next.to(tl.int64)[:, None] * svc_s + d[None, :], mask=next_ok, other=0.0)
            scores = tl.sum(kf * q[None, :], axis=1) * scale  # [BLOCK_L]
            scores = tl.where(s_ok, scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new)
            total = total * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * vf, axis=0)
            m = m_new
        # The new token's own key (range 0 only).
        own = tl.sum(k_new.to(tl.float32) * q, axis=0) * scale
        own = tl.where(split == 0, own, float("-inf"))
        m_new = tl.maximum(m, own)
        alpha = tl.exp(m - m_new)
        p_own = tl.exp(own - m_new)
        total = total * alpha + p_own
        acc = acc * alpha + p_own * v_new.to(tl.float32)
        m = m_new
        if SPLITS == 1:
            tl.store(o_ptr + row64 * so_b + head * so_h + d, (acc / total).to(o_ptr.dtype.element_ty), mask=d_ok)
        else:
            # Leave this range's (max, sum, weighted values); the program that finishes last for
            # its (row, head) combines all ranges (a counter per (row, head), reset by that program,
            # so no second kernel and a zeroed counter for the next call).
            pair = row64 * tl.num_programs(0) + head
            base = part_ptr + (pair * SPLITS + split) * (D_P2 + 2)
            tl.store(base + d, acc)
            tl.store(base + D_P2, m)
            tl.store(base + D_P2 + 1, total)
            tl.debug_barrier()  # every thread's stores precede the release below
            arrived = tl.atomic_add(count_ptr + pair, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLITS - 1:
                tl.atomic_xchg(count_ptr + pair, 0, sem="relaxed", scope="gpu")
                sp = tl.arange(0, SPLITS_P2)
                sp_ok = sp < SPLITS
                first = part_ptr + pair * SPLITS * (D_P2 + 2)
                maxes = tl.load(first + sp * (D_P2 + 2) + D_P2, mask=sp_ok, other=-1.0e30, cache_modifier=".cg")
                totals = tl.load(first + sp * (D_P2 + 2) + D_P2 + 1, mask=sp_ok, other=0.0, cache_modifier=".cg")
                m_all = tl.max(maxes, axis=0)
                weights = tl.where(sp_ok, tl.exp(maxes - m_all), 0.0)
                accs = tl.load(first + sp[:, None] * (D_P2 + 2) + d[None, :], mask=sp_ok[:, None], other=0.0,
                               cache_modifier=".cg")
                out = tl.sum(accs * weights[:, None], axis=0) / tl.sum(totals * weights, axis=0)
                tl.store(o_ptr + row64 * so_b + head * so_h + d, out.to(o_ptr.dtype.element_ty), mask=d_ok)

    return attention_kernel


_COUNTERS = {}


def _arrival_counters(device) -> torch.Tensor:
    """Zeroed int32 counters, one per (row, head), kept per device and reused: the attention
    kernel leaves every counter at zero again. Slot ranges are split only while rows * heads <
    GPU_PROGRAMS, so that many always suffice (allocated by the first call, which the engine
    makes before any CUDA graph capture)."""
    counters = _COUNTERS.get(device)
    if counters is None:
        counters = _COUNTERS[device] = torch.zeros(GPU_PROGRAMS, dtype=torch.int32, device=device)
    return counters


def _triton_decode_attention(q, k, v, key_cache, value_cache, positions, kv_len: int, scale: float, pdl: bool):
    import triton

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    b, nq, d = q.shape
    ng = k.shape[1]
    out = torch.empty(b, nq, d, dtype=q.dtype, device=q.device)
    splits = decode_attention_splits(b, nq, kv_len)
    d_p2 = triton.next_power_of_2(d)
    part = (torch.empty(b, nq, splits, d_p2 + 2, dtype=torch.float32, device=q.device) if splits > 1
            else out)  # unused with one range
    attention_kernel = _kernels()
    counters = _arrival_counters(q.device) if splits > 1 else positions  # unused with one range
    args = (q, k, v, key_cache, value_cache, positions, out, part, counters,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), out.stride(0), out.stride(1),
            float(scale))
    pdl = pdl_supported(pdl)
    attention_kernel[(nq, b, splits)](*args, HPG=nq // ng, D=d, D_P2=d_p2, BLOCK_L=BLOCK_L, SPLITS=splits,
                                      SPLITS_P2=triton.next_power_of_2(splits), PDL=pdl, num_warps=4,
                                      **({"launch_pdl": True} if pdl else {}))
    return out


@torch.library.custom_op("gigatron::decode_attention", mutates_args=("key_cache", "value_cache"))
def _decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
                         value_cache: torch.Tensor, positions: torch.Tensor, kv_len: int,
                         scale: float, pdl: bool = False) -> torch.Tensor:
    if q.is_cuda and gemv_available() and key_cache.stride(-1) == 1 and value_cache.stride(-1) == 1:
        return _triton_decode_attention(q, k, v, key_cache, value_cache, positions, kv_len, scale, pdl)
    return reference_decode_attention(q, k, v, key_cache, value_cache, positions, kv_len, scale)


@_decode_attention_op.register_fake
def _decode_attention_fake(q, k, v, key_cache, value_cache, positions, kv_len, scale, pdl=False):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
                     value_cache: torch.Tensor, positions: torch.Tensor, kv_len: int,
                     scale: float = None, pdl: bool = False) -> torch.Tensor:
    """See the module docstring; scale defaults to 1/sqrt(d)."""
    if q.dim() != 3 or k.shape != v.shape or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"decode_attention wants q [b, nq, d] and k, v [b, ng, d]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value groups")
    if key_cache.shape[2:] != k.shape[1:] or value_cache.shape != key_cache.shape:
        raise ValueError(f"the caches {tuple(key_cache.shape)} do not hold [rows, slots, {k.shape[1]}, {k.shape[2]}]")
    if positions.shape != (q.shape[0],):
        raise ValueError(f"positions must be [b] = [{q.shape[0]}], got {tuple(positions.shape)}")
    if not 0 < kv_len <= key_cache.shape[1]:
        raise ValueError(f"kv_len {kv_len} is outside (0, {key_cache.shape[1]}]")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _decode_attention_op(q, k, v, key_cache, value_cache, positions, int(kv_len), float(scale), bool(pdl))
