"""GPT with tensor parallelism (and sequence parallelism) equals the single-process model.

Two gloo ranks build the tp=2 model with the same seed as a one-process tp=1 model; the
layout-independent initialization makes them the same model. The loss must match and every
gradient, gathered to its full logical shape (partition dim and stride from the tags; partial
gradients of sequence-parallel-tagged parameters summed over tp, as finalize_model_grads does),
must match the tp=1 gradient.
"""

import pytest
import torch
import torch.distributed as dist

from gigatron.core.models.gpt import GPTModel
from gigatron.core.parallel import tags
from gigatron.core.parallel.config import ParallelConfig
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.parallel.random import model_parallel_seed
from gigatron.core.transformer.config import TransformerConfig
from tests.parallel.harness import run_distributed

VOCAB = 64
SEED = 5

VARIANTS = {
    "tp2": dict(),
    "tp2_sp": dict(sequence_parallel=True),
    "tp2_sp_gqa_swiglu_rope": dict(
        sequence_parallel=True, group_query_attention=True, num_query_groups=2, swiglu=True,
        position_embedding_type="rope", normalization="RMSNorm", qk_layernorm=True,
        untie_embeddings_and_output_weights=True, add_bias_linear=False, cross_entropy_loss_fusion=True),
    "tp2_full_recompute_distributed_fused_ce": dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1,
        distribute_saved_activations=True, cross_entropy_loss_fusion=True),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _config(variant, tp):
    kw = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
              attention_dropout=0.0, hidden_dropout=0.0, tensor_model_parallel_size=tp)
    kw.update(VARIANTS[variant])
    if tp == 1:
        kw["sequence_parallel"] = False
        kw["distribute_saved_activations"] = False
    return TransformerConfig(**kw)


def _batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 17), generator=g)
    mask = (torch.rand(2, 16, generator=g) > 0.2).float()
    return tokens[:, :-1], tokens[:, 1:], mask


def _loss_and_grads(model):
    ids, labels, mask = _batch()
    model.train()
    per_token = model(ids, labels=labels)  # [b, s]
    loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    return loss.detach()


def _gather_full(t, param, group):
    """This rank's shard -> the full logical tensor (partition dim, stride)."""
    if not tags.is_tensor_parallel(param):
        return t
    dim, stride = tags.partition_dim(param), tags.partition_stride(param)
    blocks = []
    for block in torch.chunk(t.contiguous(), stride, dim=dim):
        parts = [torch.empty_like(block) for _ in range(group.size)]
        dist.all_gather(parts, block.contiguous(), group=group.group)
        blocks.extend(parts)
    return torch.cat(blocks, dim=dim)


def _tp_worker(rank, world_size, variant):
    cfg = _config(variant, world_size)
    groups = ParallelGroups.build(ParallelConfig(tensor_model_parallel_size=world_size,
                                                 sequence_parallel=cfg.sequence_parallel))
    model_parallel_seed(1234, groups)
    model = GPTModel(cfg, groups, VOCAB, seed=SEED)
    loss = _loss_and_grads(model)
    params, grads = {}, {}
    for name, p in model.named_parameters():
        grad = p.grad.detach().clone()
        if tags.is_sequence_parallel(p):
            dist.all_reduce(grad, group=groups.tp.group)
        params[name] = _gather_full(p.detach(), p, groups.tp)
        grads[name] = _gather_full(grad, p, groups.tp)
    return {"loss": loss, "params": params, "grads": grads}


def _all_variants(rank, world_size):
    return {variant: _tp_worker(rank, world_size, variant) for variant in VARIANTS}


def test_gpt_tensor_and_sequence_parallel_equal_single_process():
    results = run_distributed(_all_variants, 2, timeout=300)
    for variant in VARIANTS:
        reference = GPTModel(_config(variant, 1), ParallelGroups.single(), VOCAB, seed=SEED)
        ref_loss = _loss_and_grads(reference)
        for rank_result in results:
            got = rank_result[variant]
            torch.testing.assert_close(got["loss"], ref_loss, rtol=1e-5, atol=1e-6, msg=variant)
            names = {n for n, _ in reference.named_parameters()}
            assert set(got["grads"]) == names, variant
            for name, p in reference.named_parameters():
                torch.testing.assert_close(got["params"][name], p.detach(), rtol=0, atol=0,
                                           msg=f"{variant}: init of {name}")
                torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6,
                                           msg=f"{variant}: grad of {name}")


# ----------------------------------------------------------------------------- context parallel
def _cp_config(comm_type):
    return TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                             attention_dropout=0.0, hidden_dropout=0.0, group_query_attention=True,
                             num_query_groups=2, position_embedding_type="rope", swiglu=True,
                             normalization="RMSNorm", cp_comm_type=comm_type)


def _cp_batch():
    ids, labels, mask = _batch()
    return {"tokens": ids, "labels": labels, "loss_mask": mask, "position_ids": torch.arange(16).repeat(2, 1)}


def _cp_loss_and_grads(model, batch, cp):
    model.train()
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # [b, s/cp]
    count = batch["loss_mask"].sum()
    if cp.group is not None:
        dist.all_reduce(count, group=cp.group)
    loss = (per_token * batch["loss_mask"]).sum() / count  # this rank's share of the mean
    loss.backward()
    loss = loss.detach()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    if cp.group is not None:
        dist.all_reduce(loss, group=cp.group)
        for grad in grads.values():
            dist.all_reduce(grad, group=cp.group)  # what data-parallel reduction over dp x cp does
    return loss, grads


def _cp_worker(rank, world_size):
    from gigatron.core.transformer.context_parallel import get_batch_on_this_cp_rank

    groups = ParallelGroups.build(ParallelConfig(context_parallel_size=world_size))
    results = {}
    for comm_type in ("p2p", "all_gather", "a2a"):
        model = GPTModel(_cp_config(comm_type), groups, VOCAB, seed=SEED)
        assert model.decoder.layers[0].self_attention.core_attention.cp is groups.cp
        results[comm_type] = _cp_loss_and_grads(model, get_batch_on_this_cp_rank(_cp_batch(), groups.cp), groups.cp)
    return results


def test_gpt_context_parallel_attention_equals_single_process():
    results = run_distributed(_cp_worker, 2, timeout=300)
    single = ParallelGroups.single()
    ref_loss, ref_grads = _cp_loss_and_grads(GPTModel(_cp_config("p2p"), single, VOCAB, seed=SEED),
                                             _cp_batch(), single.cp)
    for rank_result in results:
        for comm_type, (loss, grads) in rank_result.items():
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=comm_type)
            for name, grad in grads.items():
                torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=f"{comm_type}: {name}")
