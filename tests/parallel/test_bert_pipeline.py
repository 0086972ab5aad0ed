"""BERT split over two pipeline stages (gloo, CPU) equals the whole model in one process.

BertModel stages (embedding on the first, LM head + pooler + binary head on the last, the tied
output weight a copy on the last stage kept in sync through finalize_model_grads) run under 1F1B
and interleaved 1F1B with DDP (dp = 1); every stage reads the padding mask of each micro-batch.
The per-micro-batch losses and every parameter's gradient (local layer numbers made global) must
equal the one-process model with gradient accumulation over the same micro-batches, for
Megatron's pre-LN layer and the original post-LN one. A batch holds padding, so a stage that
dropped the mask would give other losses.
"""

from __future__ import annotations

import pytest
import torch

from gigatron.training import bert as bert_training
from tests.parallel.harness import run_distributed

VOCAB, SEQ, MBS, SEED, MICROBATCHES = 64, 12, 2, 5, 4

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _config(**overrides):
    from gigatron.core.transformer.config import TransformerConfig

    base = dict(num_layers=4, hidden_size=16, num_attention_heads=2, seq_length=SEQ, attention_dropout=0.0,
                hidden_dropout=0.0, use_cpu_initialization=True)
    base.update(overrides)
    return TransformerConfig(**base)


def _batches():
    g = torch.Generator().manual_seed(11)
    batches = []
    for _ in range(MICROBATCHES):
        ids = torch.randint(4, VOCAB, (MBS, SEQ), generator=g)
        padding = torch.ones(MBS, SEQ, dtype=torch.long)
        padding[1, int(torch.randint(5, SEQ - 1, (1,), generator=g)):] = 0
        types = (torch.arange(SEQ) >= 6).long().repeat(MBS, 1)
        labels = torch.where(torch.rand(MBS, SEQ, generator=g) < 0.4, ids, torch.full_like(ids, -1))
        loss_mask = (labels >= 0).float() * padding
        order = torch.randint(0, 2, (MBS,), generator=g)
        batches.append({"text": ids, "types": types, "is_random": order, "loss_mask": loss_mask, "labels": labels,
                        "padding_mask": padding})
    return batches


def _gather_full(t, param, group):
    import torch.distributed as dist
    from gigatron.core.parallel import tags

    if not tags.is_tensor_parallel(param) or group.size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(group.size)]
    dist.all_gather(parts, t.contiguous(), group=group.group)
    return torch.cat(parts, dim=tags.partition_dim(param))


def _run_pipeline(world_size, layer_norm, vp, tp=1):
    from gigatron.core.distributed import DDPConfig, DistributedDataParallel, finalize_model_grads
    from gigatron.core.models.bert import BertModel
    from gigatron.core.parallel.config import ParallelConfig
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.core.pipeline import get_forward_backward_func

    vp_size = vp if vp > 1 else None
    pp = world_size // tp
    groups = ParallelGroups.build(ParallelConfig(pipeline_model_parallel_size=pp, tensor_model_parallel_size=tp,
                                                 virtual_pipeline_model_parallel_size=vp_size))
    config = _config(pipeline_model_parallel_size=pp, tensor_model_parallel_size=tp,
                     virtual_pipeline_model_parallel_size=vp_size)
    chunks = []
    for chunk in range(vp):
        stage = chunk if vp_size else None
        model = BertModel(config, groups, VOCAB, layer_norm=layer_norm, seed=SEED,
                          pre_process=groups.is_pipeline_first_stage(stage),
                          post_process=groups.is_pipeline_last_stage(stage), vp_stage=stage)
        chunks.append(DistributedDataParallel(DDPConfig(), model, groups))
    batches = _batches()
    schedule = get_forward_backward_func(pp, vp_size)
    logs = schedule(
        forward_step_func=bert_training.forward_step,
        data_iterator=[iter(batches) for _ in chunks] if vp_size else iter(batches),
        model=chunks if vp_size else chunks[0], num_microbatches=MICROBATCHES, seq_length=SEQ,
        micro_batch_size=MBS, groups=groups, config=config,
        finalize_model_grads_func=lambda model_chunks: finalize_model_grads(model_chunks, groups, config))
    grads, shapes = {}, {}
    for chunk in chunks:
        module = chunk.module
        for name, param in module.named_parameters():
            parts = name.split(".")
            if parts[:2] == ["encoder", "layers"]:
                parts[2] = str(int(parts[2]) + module.encoder.layer_offset)  # local -> global layer number
            grads[".".join(parts)] = _gather_full(param.main_grad.clone(), param, groups.tp)
        shapes[(module.pre_process, module.post_process)] = sorted(n.split(".")[0] for n, _ in
                                                                   module.named_children())
    return {"logs": logs, "grads": grads, "stages": shapes, "pp_rank": groups.pp.rank}


def _worker(rank, world_size):
    return {(ln, vp): _run_pipeline(world_size, ln, vp) for ln in ("pre", "post") for vp in (1, 2)}


def _four_rank_worker(rank, world_size):
    return {"pp2_tp2": _run_pipeline(world_size, "pre", 1, tp=2), "pp4": _run_pipeline(world_size, "post", 1)}


def _serial(layer_norm):
    from gigatron.core.models.bert import BertModel
    from gigatron.core.parallel.groups import ParallelGroups

    model = BertModel(_config(), ParallelGroups.single(), VOCAB, layer_norm=layer_norm, seed=SEED)
    logs = []
    for batch in _batches():
        output = model(batch["text"], batch["padding_mask"], batch["types"], lm_labels=batch["labels"])
        loss, report = bert_training.loss_func(batch["loss_mask"], batch["is_random"], output)
        (loss / MICROBATCHES).backward()
        logs.append(report)
    return logs, {name: param.grad.clone() for name, param in model.named_parameters()}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, 2, timeout=300)


@pytest.mark.parametrize("vp", [1, 2], ids=["1f1b", "interleaved"])
@pytest.mark.parametrize("layer_norm", ["pre", "post"])
def test_bert_pipeline_matches_one_process(results, layer_norm, vp):
    rank0, rank1 = (result[(layer_norm, vp)] for result in results)
    ref_logs, ref_grads = _serial(layer_norm)
    assert rank0["logs"] == []
    assert len(rank1["logs"]) == MICROBATCHES
    for got, want in zip(rank1["logs"], ref_logs, strict=True):
        assert set(got) == set(want) == {"lm loss", "sop loss"}
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)
    # The last stage's own copy of the tied output weight has the embedding's gradient.
    tied = "embedding.word_embeddings.weight"
    torch.testing.assert_close(rank1["grads"]["output_layer.weight"], rank0["grads"][tied])
    merged = {**rank0["grads"], **{k: v for k, v in rank1["grads"].items() if k != "output_layer.weight"}}
    assert set(merged) == set(ref_grads)
    for name, want in ref_grads.items():
        torch.testing.assert_close(merged[name], want, rtol=1e-5, atol=1e-6, msg=f"{layer_norm} vp={vp}: {name}")
    if vp == 1:
        first, last = rank0["stages"][(True, False)], rank1["stages"][(False, True)]
        assert first == ["embedding", "encoder"]
        assert last == sorted(["encoder", "lm_head", "output_layer", "pooler", "binary_head"])


def test_stage_without_input_tensor_is_refused():
    from gigatron.core.models.bert import BertModel
    from gigatron.core.parallel.groups import ParallelGroups

    with pytest.raises(ValueError, match="first stage of BERT"):
        BertModel(_config(), ParallelGroups.single(), VOCAB).set_input_tensor(torch.zeros(SEQ, MBS, 16))


def _check_stages(first, last, ref_logs, ref_grads, what):
    assert first["logs"] == []
    assert len(last["logs"]) == MICROBATCHES
    for got, want in zip(last["logs"], ref_logs, strict=True):
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last["grads"]["output_layer.weight"], first["grads"]["embedding.word_embeddings.weight"])
    merged = {**first["grads"], **{k: v for k, v in last["grads"].items() if k != "output_layer.weight"}}
    assert set(merged) == set(ref_grads)
    for name, want in ref_grads.items():
        torch.testing.assert_close(merged[name], want, rtol=1e-5, atol=1e-6, msg=f"{what}: {name}")


@pytest.mark.slow
def test_bert_four_ranks_pp2_tp2_and_pp4_match_one_process():
    """Four ranks: pp=2 x tp=2 (each stage's tensor-parallel shards, gathered, equal the one-process
    gradients) and pp=4 (two middle stages with neither embedding nor heads, post-LN)."""
    results = run_distributed(_four_rank_worker, 4, timeout=400)
    ref_logs, ref_grads = _serial("pre")
    for tp_rank in range(2):
        first = next(r["pp2_tp2"] for i, r in enumerate(results) if r["pp2_tp2"]["pp_rank"] == 0 and i % 2 == tp_rank)
        last = next(r["pp2_tp2"] for i, r in enumerate(results) if r["pp2_tp2"]["pp_rank"] == 1 and i % 2 == tp_rank)
        _check_stages(first, last, ref_logs, ref_grads, f"pp2 x tp2, tp rank {tp_rank}")
    stages = sorted((r["pp4"] for r in results), key=lambda r: r["pp_rank"])
    assert [sorted(r["stages"]) for r in stages][1:3] == [[(False, False)], [(False, False)]]
    assert stages[1]["stages"][(False, False)] == ["encoder"] and stages[1]["logs"] == stages[2]["logs"] == []
    first, last = stages[0], stages[3]
    first = {**first, "grads": {**first["grads"], **stages[1]["grads"], **stages[2]["grads"]}}
    ref_logs, ref_grads = _serial("post")
    _check_stages(first, last, ref_logs, ref_grads, "pp4")
