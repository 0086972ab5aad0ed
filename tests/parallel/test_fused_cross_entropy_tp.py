"""The chunked output layer + cross entropy with the loss mask (gradients made in forward) over a
tensor-parallel vocabulary (tp=2, gloo, CPU) against one process with the whole vocabulary:
per-token losses, the hidden gradient (summed over ranks by copy_to_tensor_parallel_region's
backward) and each rank's shard of the output-weight gradient; masked tokens included."""

import torch
import torch.distributed as dist
from torch.testing import assert_close

from gigatron.core.ops.cross_entropy import chunked_output_cross_entropy, reference_output_cross_entropy
from gigatron.core.parallel.groups import Group
from gigatron.core.parallel.mappings import copy_to_tensor_parallel_region

from .harness import run_distributed

S, B, H, V = 6, 2, 8, 20


def _case():
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(S, B, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.5
    target = torch.randint(0, V, (S, B), generator=gen)
    mask = (torch.rand(S, B, generator=gen) > 0.3).float()
    return hidden, weight, target, mask


def _loss(losses, mask):
    return 2.5 * (losses * mask).sum() / mask.sum()


def _tp_rank(rank, world_size, chunk):
    hidden, weight, target, mask = _case()
    tp = Group(group=dist.group.WORLD, size=world_size, rank=rank, ranks=list(range(world_size)))
    local = V // world_size
    h = hidden.clone().requires_grad_()
    w = weight[rank * local:(rank + 1) * local].clone().requires_grad_()
    losses = chunked_output_cross_entropy(copy_to_tensor_parallel_region(h, tp), w, target, tp, chunk_tokens=chunk,
                                          loss_weights=mask)
    _loss(losses, mask).backward()
    return losses.detach(), h.grad, w.grad


def test_vocab_parallel_fused_cross_entropy_matches_single_process():
    hidden, weight, target, mask = _case()
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    want = reference_output_cross_entropy(h, w, target)
    _loss(want, mask).backward()
    for chunk in (5, 64):
        results = run_distributed(_tp_rank, 2, chunk)
        for rank, (losses, grad_hidden, grad_weight_shard) in enumerate(results):
            assert_close(losses, want.detach(), rtol=1e-5, atol=1e-6)
            assert_close(grad_hidden, h.grad, rtol=1e-5, atol=1e-6)
            assert_close(grad_weight_shard, w.grad[rank * V // 2:(rank + 1) * V // 2], rtol=1e-5, atol=1e-6)
