"""A hybrid Mamba model with tensor parallelism (and sequence parallelism) equals the
single-process model: two gloo ranks build the tp=2 model with the same seed as a one-process tp=1
model. The loss must match, and every parameter and gradient, gathered to its full logical shape
through its partition segments where it has them (the mixer's fused in_proj and conv1d rows are
split segment by segment, gigatron/core/transformer/mamba/layout.py), must match the tp=1 ones."""

import pytest
import torch
import torch.distributed as dist

from gigatron.core.models.mamba import MambaModel
from gigatron.core.parallel import tags
from gigatron.core.parallel.config import ParallelConfig
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.parallel.random import model_parallel_seed
from gigatron.core.transformer.config import TransformerConfig
from gigatron.core.transformer.mamba.config import MambaConfig
from gigatron.core.parallel.init import merge_shards
from tests.parallel.harness import run_distributed

VOCAB = 64
SEED = 5
HIDDEN, HEADS, HEAD_DIM, GROUPS, STATE = 32, 8, 8, 2, 8  # Mamba heads = 2 * 32 / 8

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _configs(tp, sequence_parallel):
    cfg = TransformerConfig(num_layers=4, hidden_size=HIDDEN, num_attention_heads=4, seq_length=16,
                            attention_dropout=0.0, hidden_dropout=0.0, normalization="RMSNorm",
                            position_embedding_type="none", add_bias_linear=False, swiglu=True,
                            tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel and tp > 1)
    mc = MambaConfig(mamba_state_dim=STATE, mamba_head_dim=HEAD_DIM, mamba_num_groups=GROUPS,
                     hybrid_override_pattern="M*M-", is_hybrid_model=True)
    return cfg, mc


def _batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 17), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _loss_and_grads(model):
    ids, labels = _batch()
    model.train()
    loss = model(ids, labels=labels).mean()
    loss.backward()
    return loss.detach()


def _gather_full(t, param, group):
    """This rank's shard -> the full logical tensor (partition dim, stride and segments)."""
    if not tags.is_tensor_parallel(param):
        return t
    parts = [torch.empty_like(t) for _ in range(group.size)]
    dist.all_gather(parts, t.contiguous(), group=group.group)
    return merge_shards(parts, tags.partition_dim(param), tags.partition_stride(param),
                        tags.partition_segments(param))


def _worker(rank, world_size):
    results = {}
    for sp in (False, True):
        cfg, mc = _configs(world_size, sp)
        groups = ParallelGroups.build(ParallelConfig(tensor_model_parallel_size=world_size,
                                                     sequence_parallel=cfg.sequence_parallel))
        model_parallel_seed(1234, groups)
        model = MambaModel(cfg, mc, groups, VOCAB, seed=SEED)
        for layer in model.decoder.layers:
            if hasattr(layer, "mixer"):
                layer.mixer.chunk_size = 8  # 16 tokens: two chunks
        loss = _loss_and_grads(model)
        params, grads = {}, {}
        for name, p in model.named_parameters():
            grad = p.grad.detach().clone()
            if tags.is_sequence_parallel(p):
                dist.all_reduce(grad, group=groups.tp.group)  # what finalize_model_grads does
            params[name] = _gather_full(p.detach(), p, groups.tp)
            grads[name] = _gather_full(grad, p, groups.tp)
        results[sp] = {"loss": loss, "params": params, "grads": grads}
    return results


def test_mamba_tensor_and_sequence_parallel_equal_single_process():
    results = run_distributed(_worker, 2, timeout=300)
    cfg, mc = _configs(1, False)
    reference = MambaModel(cfg, mc, ParallelGroups.single(), VOCAB, seed=SEED)
    for layer in reference.decoder.layers:
        if hasattr(layer, "mixer"):
            layer.mixer.chunk_size = 8
    ref_loss = _loss_and_grads(reference)
    for rank_result in results:
        for sp, got in rank_result.items():
            torch.testing.assert_close(got["loss"], ref_loss, rtol=1e-5, atol=1e-6, msg=f"sp={sp}")
            assert set(got["grads"]) == {n for n, _ in reference.named_parameters()}
            for name, p in reference.named_parameters():
                torch.testing.assert_close(got["params"][name], p.detach(), rtol=0, atol=0,
                                           msg=f"sp={sp}: init of {name}")
                torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6,
                                           msg=f"sp={sp}: grad of {name}")
