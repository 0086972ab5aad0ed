"""Cross-entropy over vocabulary-parallel logits, without gathering the vocabulary.

Shapes: s = sequence, b = micro-batch, v = V/t (this rank's vocabulary shard, t = tp size).
    logits [s, b, v] (any float dtype), target [s, b] (global token ids) -> loss [s, b] fp32

Forward communicates three [s, b] tensors over tp (max, target logit, sum of exponentials);
backward is local: d loss / d logits = softmax - one_hot(target) on this rank's shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .groups import Group

__all__ = ["vocab_parallel_cross_entropy"]


def _all_reduce_(x: torch.Tensor, group: Group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group.size > 1:
        dist.all_reduce(x, op=op, group=group.group)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """forward: loss from sharded logits (all-reduce max, target logit and sum-exp over tp);
    backward: local (softmax - smoothed one-hot) * grad on the shard, no communication."""

    @staticmethod
    def forward(ctx, logits, target, group, label_smoothing):
        shard_size = logits.shape[-1]
        vocab_size = shard_size * group.size
        vocab_start = group.rank * shard_size

        # One fp32 working copy of the shard; it becomes the softmax kept for backward.
        work = logits.float()  # [s, b, v]
        if work.data_ptr() == logits.data_ptr():
            work = work.clone()
        logits_max = work.amax(dim=-1)  # [s, b]
        _all_reduce_(logits_max, group, dist.ReduceOp.MAX)
        work.sub_(logits_max.unsqueeze(-1))  # [s, b, v], <= 0

        local_target = target - vocab_start  # [s, b]
        outside = (local_target < 0) | (local_target >= shard_size)  # [s, b]
        local_target = local_target.masked_fill(outside, 0)
        target_logit = work.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)  # [s, b]
        target_logit.masked_fill_(outside, 0.0)
        _all_reduce_(target_logit, group)

        work.exp_()  # [s, b, v]
        sum_exp = work.sum(dim=-1)  # [s, b]
        _all_reduce_(sum_exp, group)
        loss = torch.log(sum_exp) - target_logit  # [s, b]
        work.div_(sum_exp.unsqueeze(-1))  # softmax [s, b, v]

        smoothing = 0.0
        if label_smoothing > 0.0:
            # Megatron's smoothing: probability mass label_smoothing spread over the K-1 wrong
            # classes, i.e. loss = (1 - a K/(K-1)) * nll + a K/(K-1) * mean_k(-log p_k), here with
            # K and the mean over the full vocabulary (all-reduced), so every tp size agrees.
            smoothing = label_smoothing * vocab_size / (vocab_size - 1)
            sum_log_probs = torch.log(work).sum(dim=-1)  # [s, b]
            _all_reduce_(sum_log_probs, group)
            loss = (1.0 - smoothing) * loss - smoothing * (sum_log_probs / vocab_size)

        ctx.smoothing = smoothing
        ctx.vocab_size = vocab_size
        ctx.input_dtype = logits.dtype
        ctx.save_for_backward(work, local_target, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, outside = ctx.saved_tensors
        grad = softmax  # reused in place: backward runs once per forward
        on_shard = (~outside).to(grad.dtype).unsqueeze(-1)  # [s, b, 1]
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -(1.0 - ctx.smoothing) * on_shard)
        if ctx.smoothing > 0.0:
            grad.sub_(ctx.smoothing / ctx.vocab_size)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, tp: Group, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per-token cross-entropy loss [s, b] (fp32) of vocabulary-parallel logits [s, b, V/t].

    `target` holds global token ids. `label_smoothing` follows Megatron-LM (--label-smoothing):
    the smoothing mass is spread over the classes other than the target.
    The softmax is kept (fp32, one shard) for backward, which reuses it in place, so the graph
    can be backpropagated once."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"--label-smoothing must be in [0, 1), got {label_smoothing}")
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"vocab_parallel_cross_entropy: logits {tuple(logits.shape)} and target "
                         f"{tuple(target.shape)} must agree on all but the last (vocabulary) dim")
    return _VocabParallelCrossEntropy.apply(logits, target, tp, label_smoothing)
