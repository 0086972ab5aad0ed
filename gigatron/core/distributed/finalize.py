"""finalize_model_grads: the gradient reductions that close an iteration's backward passes."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from gigatron.core.parallel.tags import is_sequence_parallel, is_shared_embedding

__all__ = ["finalize_model_grads"]


def _all_reduce_coalesced(tensors: list, group) -> None:
    """Sum `tensors` over `group` with one collective per dtype (in place)."""
    by_dtype: dict = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        flat = _flatten_dense_tensors(same)
        dist.all_reduce(flat, group=group)
        for t, reduced in zip(same, _unflatten_dense_tensors(flat, same)):
            t.copy_(reduced)


def _tagged_main_grads(model_chunks, predicate) -> list:
    grads, seen = [], set()
    for chunk in model_chunks:
        for param in chunk.module.parameters():
            if param.requires_grad and predicate(param) and id(param) not in seen:
                seen.add(id(param))
                grads.append(param.main_grad)
    return grads


def finalize_model_grads(model_chunks, groups, config=None, num_tokens: Optional[torch.Tensor] = None) -> None:
    """Finish the gradients of all model chunks (DistributedDataParallel) of this rank.

    1. finish_grad_sync on each chunk (data x context parallel reduction);
    2. all-reduce over tp the grads of sequence-parallel-tagged params (norms and biases that see
       only this rank's part of the sequence, qk-layernorm weights at tp > 1);
    3. all-reduce over the embedding group (first and last pipeline stage) the grads of the tied
       word embedding / output weight;
    4. with `num_tokens` (per-token loss, --calculate-per-token-loss): take the token count of the
       last pipeline stage, sum it over data x context parallel ranks and divide all gradients by it.
    """
    for chunk in model_chunks:
        chunk.finish_grad_sync()

    # A sequence-parallel tag means "this gradient is a partial sum over tp" (norms and biases on
    # sequence shards, and qk-layernorm weights at any tp > 1), so tagged grads are always summed.
    if groups.tp.group is not None:
        grads = _tagged_main_grads(model_chunks, is_sequence_parallel)
        if grads:
            _all_reduce_coalesced(grads, groups.tp.group)

    if groups.embd.group is not None:
        grads = _tagged_main_grads(model_chunks, is_shared_embedding)
        if grads:
            _all_reduce_coalesced(grads, groups.embd.group)

    if num_tokens is not None:
        if groups.pp.group is not None:
            dist.broadcast(num_tokens, src=groups.pp.ranks[-1], group=groups.pp.group)
        if groups.dp_cp.group is not None:
            dist.all_reduce(num_tokens, group=groups.dp_cp.group)
        total = float(num_tokens.item())
        if total > 0:
            for chunk in model_chunks:
                chunk.scale_gradients(1.0 / total)
