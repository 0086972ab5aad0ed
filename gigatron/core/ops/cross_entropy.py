"""Output layer + cross entropy computed chunk by chunk (--cross-entropy-loss-fusion).

Shape legend: s = sequence, b = batch, h = hidden, T = s*b tokens, V = vocabulary (padded),
Vl = V / tp, this rank's vocabulary shard, c = tokens per chunk.

The plain path materialises logits [s, b, V] in the compute dtype plus an fp32 copy (and keeps
the softmax for backward): for a 1.3B GPT with s=2048, b=8 and V=50304 that is about 5 GiB.
`chunked_output_cross_entropy` holds the fp32 logits of one chunk of c tokens at a time.

With `loss_weights` (the loss mask; the training path), everything happens in forward:

  forward:  per chunk, logits = hidden_c @ W^T; loss = logsumexp - target logit;
            dlogits = (softmax - onehot) * w_c; grad_hidden_c = dlogits @ W;
            grad_W += dlogits^T @ hidden_c (fp32 accumulation)
  backward: the gradient of the per-token losses is g = k * w for one scalar k (the loss is a
            weighted mean of the losses, scaled by the loss scale and the micro-batch count), so
            k = sum(g) / sum(w) (on the device, no host sync) and the gradients are k times the
            stored ones. A masked token (w = 0) gets no gradient.

Without `loss_weights` (any per-token gradient allowed), forward keeps only the logsumexp and
backward recomputes each chunk's logits (one extra logit GEMM).

With a tensor-parallel group the weight is the rank's vocabulary shard and the max / sum-exp /
target logit are all-reduced over the group exactly as in vocab_parallel_cross_entropy; the caller
feeds the full-sequence hidden through copy_to_tensor_parallel_region (or the sequence-parallel
all-gather), whose backward sums the partial hidden gradients.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["chunked_output_cross_entropy", "reference_output_cross_entropy", "default_chunk_tokens"]

_CHUNK_LOGIT_BYTES = 256 * 1024 * 1024  # fp32 logits of one chunk


def default_chunk_tokens(vocab_local: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about 256 MiB (at least 64 tokens)."""
    return max(64, _CHUNK_LOGIT_BYTES // (4 * vocab_local))


def _all_reduce(t: torch.Tensor, group, op) -> None:
    if group is not None and group.size > 1:
        dist.all_reduce(t, op=op, group=group.group)


def _lse_and_target_logit(logits: torch.Tensor, local_target: torch.Tensor):
    """One rank holds the whole vocabulary: logsumexp [c] and the target's logit [c] (fp32)."""
    logits = logits.float()  # [c, V]
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, local_target[:, None])[:, 0]
    return lse, picked


def _vocab_parallel_lse_and_target_logit(logits: torch.Tensor, local_target: torch.Tensor, tp):
    """Vocabulary shard [c, Vl]: max, sum-exp and the target logit all-reduced over tp."""
    vocab_local = logits.shape[-1]
    logits = logits.float()
    max_logit = logits.max(dim=-1).values  # [c]
    _all_reduce(max_logit, tp, dist.ReduceOp.MAX)
    sum_exp = torch.exp(logits - max_logit[:, None]).sum(dim=-1)  # [c]
    _all_reduce(sum_exp, tp, dist.ReduceOp.SUM)
    in_shard = (local_target >= 0) & (local_target < vocab_local)
    picked = logits.gather(1, local_target.clamp(0, vocab_local - 1)[:, None])[:, 0]  # [c]
    picked = torch.where(in_shard, picked, torch.zeros_like(picked))
    _all_reduce(picked, tp, dist.ReduceOp.SUM)
    return torch.log(sum_exp) + max_logit, picked


def _dlogits(logits: torch.Tensor, lse: torch.Tensor, local_target: torch.Tensor,
             grad_losses: torch.Tensor) -> torch.Tensor:
    """(softmax - onehot(target)) * grad_loss for a chunk [c, Vl], in the logits' dtype; targets
    outside this vocabulary shard have no one-hot entry here."""
    probs = torch.exp(logits.float() - lse[:, None])  # [c, Vl]
    columns = torch.arange(logits.shape[-1], device=logits.device)
    probs = torch.where(columns[None, :] == local_target[:, None], probs - 1.0, probs)
    return (probs * grad_losses[:, None]).to(logits.dtype)


_KERNELS = {"lse_and_target_logit": _lse_and_target_logit, "dlogits": _dlogits}
_COMPILED = {}


def _kernel(name: str, like: torch.Tensor):
    """The chunk kernel `name`: on CUDA compiled into one fused pass over the chunk's logits (the
    eager version reads and writes the fp32 chunk several times); elsewhere the eager function."""
    if not like.is_cuda:
        return _KERNELS[name]
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(_KERNELS[name], dynamic=True)
    return _COMPILED[name]


class _ChunkedOutputCrossEntropy(torch.autograd.Function):
    """forward: per-token loss [T] from hidden [T, h], weight [Vl, h], target [T] and, in the
    gradients-in-forward mode, loss_weights [T]; backward: scales the stored gradients, or
    recomputes each chunk's logits (no collective; the caller's mapping reduces grad_hidden)."""

    @staticmethod
    def forward(ctx, hidden, weight, target, loss_weights, tp, chunk_tokens, grads_in_forward):
        num_tokens = hidden.shape[0]
        vocab_local = weight.shape[0]
        vocab_start = (tp.rank if tp is not None else 0) * vocab_local
        losses = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
        single = tp is None or tp.size == 1
        if grads_in_forward:
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            chunk_weights = loss_weights.float()
        for start in range(0, num_tokens, chunk_tokens):
            end = min(start + chunk_tokens, num_tokens)
            h_c = hidden[start:end]  # [c, h]
            logits = torch.matmul(h_c, weight.t())  # [c, Vl] in the compute dtype
            local_target = target[start:end] - vocab_start  # [c]
            if single:
                chunk_lse, picked = _kernel("lse_and_target_logit", hidden)(logits, local_target)
            else:
                chunk_lse, picked = _vocab_parallel_lse_and_target_logit(logits, local_target, tp)
            lse[start:end] = chunk_lse
            losses[start:end] = chunk_lse - picked
            if grads_in_forward:
                dlogits = _kernel("dlogits", hidden)(logits, chunk_lse, local_target,
                                                     chunk_weights[start:end])  # [c, Vl]
                grad_hidden[start:end] = torch.matmul(dlogits, weight)  # [c, h]
                grad_weight += torch.matmul(dlogits.t(), h_c).float()  # [Vl, h]
        ctx.grads_in_forward = grads_in_forward
        if grads_in_forward:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype), loss_weights)
        else:
            ctx.save_for_backward(hidden, weight, target, lse)
        ctx.vocab_start = vocab_start
        ctx.chunk_tokens = chunk_tokens
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        if ctx.grads_in_forward:
            grad_hidden, grad_weight, loss_weights = ctx.saved_tensors
            weights = loss_weights.float()
            total = weights.sum()
            # g = k * w: k = sum(g) / sum(w); 0 when every token is masked.
            k = torch.where(total != 0, grad_losses.float().sum() / torch.where(total != 0, total, 1.0), 0.0)
            return (grad_hidden * k.to(grad_hidden.dtype), grad_weight * k.to(grad_weight.dtype),
                    None, None, None, None, None)
        hidden, weight, target, lse = ctx.saved_tensors
        num_tokens = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_losses = grad_losses.float()
        for start in range(0, num_tokens, ctx.chunk_tokens):
            end = min(start + ctx.chunk_tokens, num_tokens)
            h_c = hidden[start:end]  # [c, h]
            logits = torch.matmul(h_c, weight.t())  # [c, Vl]
            local_target = target[start:end] - ctx.vocab_start  # [c]
            dlogits = _kernel("dlogits", hidden)(logits, lse[start:end], local_target,
                                                 grad_losses[start:end])  # [c, Vl]
            grad_hidden[start:end] = torch.matmul(dlogits, weight)  # [c, h]
            grad_weight += torch.matmul(dlogits.t(), h_c).float()  # [Vl, h]
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None


def chunked_output_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                 tp=None, chunk_tokens: Optional[int] = None,
                                 loss_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token cross entropy of logits = hidden @ weight^T, never holding all logits.

    hidden [s, b, h] (the full sequence on every tensor-parallel rank), weight [V/tp, h] (this rank's
    vocabulary shard; tp a gigatron Group or None), target [s, b] int -> loss [s, b] fp32.

    loss_weights [s, b] (the loss mask): the gradients are made in forward, which needs the
    gradient reaching the returned losses to be proportional to loss_weights (as a masked mean or
    sum of the losses makes it); backward then only scales them. Without it, backward recomputes."""
    if hidden.shape[:-1] != target.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and target {tuple(target.shape)} disagree on [s, b]")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match the weight's {weight.shape[1]}")
    if loss_weights is not None and loss_weights.shape != target.shape:
        raise ValueError(f"loss_weights {tuple(loss_weights.shape)} and target {tuple(target.shape)} disagree "
                         "on [s, b]")
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(weight.shape[0])
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # [T, h]
    flat_target = target.reshape(-1).long()  # [T]
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    grads_in_forward = loss_weights is not None and needs_grad
    flat_weights = loss_weights.reshape(-1).detach() if loss_weights is not None else None  # [T]
    loss = _ChunkedOutputCrossEntropy.apply(flat_hidden, weight, flat_target, flat_weights, tp, int(chunk_tokens),
                                            grads_in_forward)
    return loss.view(target.shape)  # [s, b]


def reference_output_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                   target: torch.Tensor) -> torch.Tensor:
    """Plain reference (one rank): logits = hidden @ weight^T, fp32 cross entropy -> loss [s, b]."""
    logits = torch.matmul(hidden, weight.t()).float()  # [s, b, V]
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), target.reshape(-1).long(), reduction="none")
    return loss.view(target.shape)  # [s, b]
