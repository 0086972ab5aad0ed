"""Token dispatchers: bring each token to the ranks holding its experts, run the experts, bring
the weighted results back.

Shape legend: T = this rank's tokens (s*b, or s/tp*b with sequence parallelism), h = hidden,
E = experts, G = local experts (E / ep), N = rows for the local experts (a token routed to j
local experts is j rows), ep = expert-parallel size, t = expert tensor-parallel size.

    dispatcher.forward(tokens [T, h], probs [T, E], routing_map [T, E], experts) -> [T, h]
    = sum over the experts e a token is routed to of probs[token, e] * expert_e(token)

allgather: all-gather tokens, probs and routing map over the tensor x expert parallel group
(groups.tp_ep, t*ep ranks of the expert layout), run the local experts on the gathered tokens
routed to them, weight and sum per token, reduce-scatter back over the same group (which also sums
the expert tensor-parallel partial results).

alltoall: sort this rank's token copies by expert, exchange the per-expert counts, send each copy
to the rank of its expert with an uneven all-to-all over groups.ep, all-gather the received rows
over the expert tensor-parallel group, sort by local expert, run the experts, and undo each step
(reduce-scatter over expert tp, reverse all-to-all), then weight and sum per token.

Ranks that receive no tokens take part in every collective with empty tensors.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from gigatron.core.parallel.groups import Group
from gigatron.core.parallel.mappings import (
    all_gather,
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

__all__ = [
    "all_to_all_uneven",
    "all_gather_uneven",
    "reduce_scatter_uneven",
    "permute",
    "unpermute",
    "TopKPermutation",
    "AllGatherTokenDispatcher",
    "AllToAllTokenDispatcher",
    "build_token_dispatcher",
]


# ---------------------------------------------------------------------------------------------
# Uneven collectives with autograd.
# ---------------------------------------------------------------------------------------------


def _all_to_all_rows(x: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int],
                     group: Group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=list(output_splits),
                           input_split_sizes=list(input_splits), group=group.group)
    return out


class _AllToAllUneven(torch.autograd.Function):
    """forward: all-to-all of rows: input_splits[i] rows of x go to group rank i, output_splits[i]
    rows arrive from rank i (concatenated in rank order); backward: the reverse all-to-all (splits
    swapped)."""

    @staticmethod
    def forward(ctx, x, group, output_splits, input_splits):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        return _all_to_all_rows(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all_rows(grad, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


def all_to_all_uneven(x: torch.Tensor, group: Group, output_splits: Sequence[int],
                      input_splits: Sequence[int]) -> torch.Tensor:
    """forward: rows x[sum(input_splits[:i]) : +input_splits[i]] to rank i; returns the
    sum(output_splits) rows received, rank 0's first. backward: the reverse exchange."""
    if len(input_splits) != group.size or len(output_splits) != group.size:
        raise ValueError(f"all_to_all_uneven: {len(input_splits)} input and {len(output_splits)} output splits "
                         f"for a group of {group.size}")
    if sum(input_splits) != x.shape[0]:
        raise ValueError(f"all_to_all_uneven: input splits sum to {sum(input_splits)}, x has {x.shape[0]} rows")
    if group.size == 1:
        return x
    return _AllToAllUneven.apply(x, group, tuple(int(v) for v in output_splits),
                                 tuple(int(v) for v in input_splits))


def all_gather_uneven(x: torch.Tensor, group: Group, sizes: Sequence[int]) -> torch.Tensor:
    """forward: concatenation of every rank's x (rank i has sizes[i] rows); backward: each rank
    gets the sum over ranks of the gradient of its rows (a reduce-scatter)."""
    if group.size == 1:
        return x
    if sizes[group.rank] != x.shape[0]:
        raise ValueError(f"all_gather_uneven: sizes[{group.rank}] = {sizes[group.rank]} but x has {x.shape[0]} rows")
    n = x.shape[0]
    repeated = x.repeat((group.size,) + (1,) * (x.dim() - 1))  # [t*n, ...]: one copy per destination
    return all_to_all_uneven(repeated, group, sizes, [n] * group.size)


def reduce_scatter_uneven(x: torch.Tensor, group: Group, sizes: Sequence[int]) -> torch.Tensor:
    """forward: x's rows are blocks of sizes[i] rows (one per rank), the same layout on every rank;
    rank i gets the sum over ranks of block i; backward: all-gather (uneven) of the gradient."""
    if group.size == 1:
        return x
    n = sizes[group.rank]
    received = all_to_all_uneven(x, group, [n] * group.size, sizes)  # [t*n, ...]
    return received.view((group.size, n) + tuple(x.shape[1:])).sum(dim=0)  # [n, ...]


def _exchange_counts(counts: torch.Tensor, group: Group) -> torch.Tensor:
    """counts [ep, G] (rows for each destination rank's experts) -> [ep, G] (rows each source rank
    sends to this rank's experts). A plain all-to-all of equal splits."""
    if group.size == 1:
        return counts
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group.group)
    return out


# ---------------------------------------------------------------------------------------------
# Permutation.
# ---------------------------------------------------------------------------------------------


def permute(tokens: torch.Tensor, routing_map: torch.Tensor):
    """Rows of tokens [T, h] sorted by expert (then token): returns (rows [N, h],
    token_index [N], expert_index [N], tokens_per_expert [E])."""
    expert_index, token_index = routing_map.t().nonzero(as_tuple=True)  # [N] each, expert-major
    rows = tokens.index_select(0, token_index)  # [N, h]
    tokens_per_expert = routing_map.sum(dim=0)  # [E]
    return rows, token_index, expert_index, tokens_per_expert


def unpermute(rows: torch.Tensor, probs: torch.Tensor, token_index: torch.Tensor, expert_index: torch.Tensor,
              num_tokens: int) -> torch.Tensor:
    """out[t] = sum over rows r of token t of probs[t, e_r] * rows[r]: [N, h] -> [T, h]."""
    weights = probs[token_index, expert_index].unsqueeze(1).to(rows.dtype)  # [N, 1]
    out = rows.new_zeros(num_tokens, rows.shape[1])  # [T, h]
    return out.index_add(0, token_index, rows * weights)


class _GatherRows(torch.autograd.Function):
    """forward: x[index] for a permutation `index` of x's rows; backward: grad[inverse] (a gather,
    where autograd's index_select backward would scatter-add with atomics)."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _RowsOfTokens(torch.autograd.Function):
    """forward: tokens[token_index] [N, h], N = T*k rows sorted by expert, every token present k
    times; backward: each token's k row gradients summed, by gathering them in (token, slot) order
    (`inverse`) and adding the k slots: no scatter, no atomics, a fixed summation order."""

    @staticmethod
    def forward(ctx, tokens, token_index, inverse, topk: int):
        ctx.save_for_backward(inverse)
        ctx.topk = topk
        return tokens.index_select(0, token_index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        pairs = grad.index_select(0, inverse)  # [T*k, h], (token, slot) order
        return pairs.view(-1, ctx.topk, grad.shape[1]).sum(dim=1), None, None, None  # [T, h]


class TopKPermutation:
    """The expert-sorted order of dropless top-k routing, where every token has exactly k experts.

    Pairs p = t*k + j are (token t, its j-th expert in ascending expert order). `order` [N] lists
    the pairs sorted by expert, then token -- the row order of `permute` -- and `inverse` [N] is
    its inverse; N = T*k is known without reading the device (no nonzero), and both the
    permutation and the combination are gathers whose backward passes are gathers too."""

    def __init__(self, routing_map: torch.Tensor, topk: int):
        num_tokens = routing_map.shape[0]
        self.topk = topk
        # The k marked experts of each token, ascending (a stable sort puts the marked ones first).
        self.pair_expert = torch.sort(routing_map.to(torch.uint8), dim=1, descending=True,
                                      stable=True).indices[:, :topk]  # [T, k]
        flat = self.pair_expert.reshape(-1)  # [N]
        self.order = torch.sort(flat, stable=True).indices  # [N] pairs by expert, then token
        self.inverse = torch.empty_like(self.order).index_copy_(
            0, self.order, torch.arange(flat.numel(), device=flat.device))  # [N]
        self.token_index = torch.div(self.order, topk, rounding_mode="floor")  # [N]
        self.tokens_per_expert = routing_map.sum(dim=0)  # [E]
        self.num_tokens = num_tokens

    def permute(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [T, h] -> rows [N, h] sorted by expert (then token)."""
        return _RowsOfTokens.apply(tokens, self.token_index, self.inverse, self.topk)

    def unpermute(self, rows: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """rows [N, h] in `permute`'s order, probs [T, E] -> sum_j probs[t, e_j] * row of (t, j): [T, h]."""
        pairs = _GatherRows.apply(rows, self.inverse, self.order)  # [T*k, h], (token, slot) order
        weights = probs.gather(1, self.pair_expert).to(rows.dtype)  # [T, k]
        return (pairs.view(self.num_tokens, self.topk, -1) * weights.unsqueeze(-1)).sum(dim=1)  # [T, h]


def _sort_chunks_index(counts: torch.Tensor) -> torch.Tensor:
    """counts [C, G]: rows arrive as chunks ordered (c, g); the index that orders them (g, c)."""
    num_chunks, num_groups = counts.shape
    flat = counts.reshape(-1)  # [C*G], (c, g) order
    starts = torch.cumsum(flat, 0) - flat  # start row of each chunk
    lengths_sorted = counts.t().reshape(-1)  # [G*C], (g, c) order
    starts_sorted = starts.view(num_chunks, num_groups).t().reshape(-1)  # [G*C]
    total = int(flat.sum())
    new_starts = torch.cumsum(lengths_sorted, 0) - lengths_sorted
    offset_in_chunk = torch.arange(total, device=counts.device) - torch.repeat_interleave(new_starts, lengths_sorted)
    return torch.repeat_interleave(starts_sorted, lengths_sorted) + offset_in_chunk  # [N]


# ---------------------------------------------------------------------------------------------
# Dispatchers.
# ---------------------------------------------------------------------------------------------


class AllGatherTokenDispatcher:
    """Gather every token of the tensor x expert parallel group; each rank runs its experts on
    the tokens routed to them; reduce-scatter back."""

    def __init__(self, num_experts: int, groups, exact_topk: Optional[int] = None):
        self.num_experts = num_experts
        self.group = groups.tp_ep
        self.num_local_experts = num_experts // groups.ep.size
        self.first_local_expert = max(groups.ep.rank, 0) * self.num_local_experts
        self.exact_topk = exact_topk

    def forward(self, tokens: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor, experts) -> torch.Tensor:
        group = self.group
        num_local_tokens = tokens.shape[0]
        if group.size == 1:  # every expert local: no exchange
            rows, tokens_per_expert, combine = _local_permutation(tokens, routing_map, self.exact_topk)
            return combine(experts(rows, tokens_per_expert), probs)  # [T, h]
        tokens = gather_from_sequence_parallel_region(tokens, group)  # [t*ep*T, h]
        probs = gather_from_sequence_parallel_region(probs, group)  # [t*ep*T, E]
        routing_map = all_gather(routing_map.to(torch.uint8), group, dim=0).bool()  # [t*ep*T, E]
        local = slice(self.first_local_expert, self.first_local_expert + self.num_local_experts)
        local_map = routing_map[:, local]  # [T_g, G]
        rows, token_index, expert_index, tokens_per_expert = permute(tokens, local_map)
        expert_out = experts(rows, tokens_per_expert)  # [N, h], partial over expert tp
        combined = unpermute(expert_out, probs[:, local], token_index, expert_index, tokens.shape[0])  # [T_g, h]
        combined = reduce_scatter_to_sequence_parallel_region(combined, group)  # [T, h]
        assert combined.shape[0] == num_local_tokens
        return combined


def _local_permutation(tokens: torch.Tensor, routing_map: torch.Tensor, exact_topk: Optional[int]):
    """(rows [N, h] sorted by expert, tokens_per_expert [E], combine(expert rows, probs) -> [T, h]):
    the top-k permutation (gathers only) when every token has exactly exact_topk experts, else the
    generic permute / unpermute."""
    if exact_topk is not None:
        perm = TopKPermutation(routing_map, exact_topk)
        return perm.permute(tokens), perm.tokens_per_expert, perm.unpermute
    rows, token_index, expert_index, tokens_per_expert = permute(tokens, routing_map)

    def combine(returned, probs):
        return unpermute(returned, probs, token_index, expert_index, tokens.shape[0])

    return rows, tokens_per_expert, combine


class AllToAllTokenDispatcher:
    """Send each token copy to the rank of its expert (uneven all-to-all over groups.ep), gather
    over the expert tensor-parallel group, run the experts sorted by local expert, and back."""

    def __init__(self, num_experts: int, groups, exact_topk: Optional[int] = None):
        self.num_experts = num_experts
        self.ep = groups.ep
        self.etp = groups.expt_tp
        self.num_local_experts = num_experts // groups.ep.size
        self.exact_topk = exact_topk

    def forward(self, tokens: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor, experts) -> torch.Tensor:
        ep, etp, g = self.ep, self.etp, self.num_local_experts
        rows, tokens_per_expert, combine = _local_permutation(tokens, routing_map, self.exact_topk)  # by global expert
        if ep.size == 1 and etp.size == 1:  # the rows are already in local expert order: no exchange
            return combine(experts(rows, tokens_per_expert), probs)  # [T, h]
        send_counts = tokens_per_expert.view(ep.size, g)  # [ep, G]: rows for each rank's experts
        recv_counts = _exchange_counts(send_counts, ep)  # [ep, G]: rows from each source rank
        # The only host synchronisation: split sizes of the uneven exchanges.
        input_splits = send_counts.sum(dim=1).tolist()
        output_splits = recv_counts.sum(dim=1).tolist()
        received = all_to_all_uneven(rows, ep, output_splits, input_splits)  # [sum(output_splits), h]

        chunk_counts = recv_counts  # [C, G], C = chunks in arrival order
        etp_sizes: List[int] = [received.shape[0]]
        if etp.size > 1:
            chunk_counts = all_gather(recv_counts, etp, dim=0)  # [t*ep, G]
            etp_sizes = chunk_counts.view(etp.size, -1).sum(dim=1).tolist()
            received = all_gather_uneven(received, etp, etp_sizes)  # [sum(etp_sizes), h]
        order = _sort_chunks_index(chunk_counts)  # [N]
        sorted_rows = received.index_select(0, order)  # [N, h], by local expert
        expert_out = experts(sorted_rows, chunk_counts.sum(dim=0))  # [N, h], partial over expert tp
        restored = torch.empty_like(expert_out).index_copy(0, order, expert_out)  # arrival order
        if etp.size > 1:
            restored = reduce_scatter_uneven(restored, etp, etp_sizes)  # [sum(output_splits), h]
        returned = all_to_all_uneven(restored, ep, input_splits, output_splits)  # [N_local, h]
        return combine(returned, probs)  # [T, h]


def build_token_dispatcher(dispatcher_type: str, num_experts: int, groups, exact_topk: Optional[int] = None):
    """`exact_topk`: k when every token is routed to exactly k experts (dropless routing); the
    all-to-all dispatcher (and the all-gather one on a single rank) then permutes with
    TopKPermutation (gathers, no device reads)."""
    if dispatcher_type == "allgather":
        return AllGatherTokenDispatcher(num_experts, groups, exact_topk)
    if dispatcher_type == "alltoall":
        return AllToAllTokenDispatcher(num_experts, groups, exact_topk)
    raise ValueError(f"unknown --moe-token-dispatcher-type {dispatcher_type!r}; use allgather or alltoall")
