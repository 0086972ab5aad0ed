"""Multi-latent attention (and multi-token prediction) with tensor and sequence parallelism equals
the single-process model, and its checkpoints saved at tp=1 load at tp=2 (gloo, CPU).

Two gloo ranks build tp=2 models with the same seed as a one-process tp=1 model (initialization is
layout independent, so they are the same model). The loss (with the MTP terms of loss_func) must
match and every gradient, gathered to its full logical shape (partial gradients of
sequence-parallel-tagged parameters summed over tp, as finalize_model_grads does), must match the
tp=1 gradient: the up-projections split by heads, the replicated down-projections and latent norms,
the shared rotary key's gradient from every rank's heads, and MTP's gathered eh_proj.

Checkpoints: the tp=1 model is saved in the `torch_dist` and `torch` formats; tp=2 models of
another seed load the torch_dist directory directly, and the `torch` rank file merged and split
for tp=2 by tp_layout (what conversion writes); both must give the tp=1 logits."""

import os

import pytest
import torch
import torch.distributed as dist

from gigatron.core.checkpoint import torch_layout
from gigatron.core.checkpoint.dist import load_torch_dist, save_torch_dist
from gigatron.core.checkpoint.tp_layout import split_for_tp
from gigatron.core.models.gpt import GPTModel
from gigatron.core.parallel import tags
from gigatron.core.parallel.config import ParallelConfig
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.parallel.random import model_parallel_seed
from gigatron.core.transformer.config import TransformerConfig
from tests.parallel.harness import run_distributed

VOCAB = 64
SEED, OTHER_SEED = 5, 77

BASE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, attention_dropout=0.0,
            hidden_dropout=0.0, multi_latent_attention=True, kv_lora_rank=8, qk_head_dim=6, qk_pos_emb_head_dim=4,
            v_head_dim=5, normalization="RMSNorm", position_embedding_type="rope", add_bias_linear=False,
            rotary_scaling_factor=40.0, mscale=1.0, mscale_all_dim=1.0)
VARIANTS = {
    "tp2_full_rank_q": dict(q_lora_rank=None, qk_layernorm=False),
    "tp2_sp_lora_q_mtp": dict(q_lora_rank=12, qk_layernorm=True, sequence_parallel=True, swiglu=True,
                              untie_embeddings_and_output_weights=True, mtp_num_layers=2, mtp_loss_scaling_factor=0.3),
    "tp2_lora_q_rope": dict(q_lora_rank=12, qk_layernorm=True, rope_type="rope"),
}
CKPT_VARIANT = "tp2_sp_lora_q_mtp"
ARGS = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "num_layers": 2, "hidden_size": 32,
        "swiglu": True}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _config(variant, tp):
    kw = dict(BASE, tensor_model_parallel_size=tp, **VARIANTS[variant])
    if tp == 1:
        kw["sequence_parallel"] = False
    return TransformerConfig(**kw)


def _groups(cfg):
    if not dist.is_initialized():
        return ParallelGroups.single()
    return ParallelGroups.build(ParallelConfig(tensor_model_parallel_size=cfg.tensor_model_parallel_size,
                                               sequence_parallel=cfg.sequence_parallel))


def _model(variant, tp, seed):
    cfg = _config(variant, tp)
    groups = _groups(cfg)
    model_parallel_seed(1234, groups)
    with torch.no_grad():
        model = GPTModel(cfg, groups, VOCAB, seed=seed)
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():  # norms away from 1 (the same on every rank)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    return model, groups


def _batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 17), generator=g)
    mask = (torch.rand(2, 16, generator=g) > 0.2).float()
    return tokens[:, :-1], tokens[:, 1:], mask


def _loss_and_grads(model):
    from gigatron.training.gpt import loss_func

    ids, labels, mask = _batch()
    model.train()
    per_token = model(ids, labels=labels)  # [b, s]
    mtp = model.pop_mtp_losses()
    loss, logged = loss_func(mask, per_token, mtp_losses=mtp,
                             mtp_loss_scaling_factor=model.config.mtp_loss_scaling_factor)
    loss.backward()
    return loss.detach(), {k: v for k, v in logged.items()}


def _logits(model, groups):
    ids, _, _ = _batch()
    model.eval()
    with torch.no_grad():
        local = model(ids)  # [s, b, V/tp]
    if groups.tp.size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(groups.tp.size)]
    dist.all_gather(parts, local.contiguous(), group=groups.tp.group)
    return torch.cat(parts, dim=-1)


def _gather_full(t, param, group):
    if not tags.is_tensor_parallel(param):
        return t
    dim, stride = tags.partition_dim(param), tags.partition_stride(param)
    blocks = []
    for block in torch.chunk(t.contiguous(), stride, dim=dim):  # SwiGLU fc1: [gate_r; up_r] per rank
        parts = [torch.empty_like(block) for _ in range(group.size)]
        dist.all_gather(parts, block.contiguous(), group=group.group)
        blocks.extend(parts)
    return torch.cat(blocks, dim=dim)


def _tp_worker(variant, world_size):
    model, groups = _model(variant, world_size, SEED)
    loss, logged = _loss_and_grads(model)
    params, grads = {}, {}
    for name, p in model.named_parameters():
        grad = p.grad.detach().clone()
        if tags.is_sequence_parallel(p):
            dist.all_reduce(grad, group=groups.tp.group)
        params[name] = _gather_full(p.detach(), p, groups.tp)
        grads[name] = _gather_full(grad, p, groups.tp)
    return {"loss": loss, "logged": logged, "params": params, "grads": grads}


def _checkpoint_worker(world_size, root):
    out = {}
    fresh, groups = _model(CKPT_VARIANT, world_size, OTHER_SEED)
    out["fresh"] = _logits(fresh, groups)
    load_torch_dist(os.path.join(root, "dist"), [fresh], None, groups)
    out["dist"] = _logits(fresh, groups)
    fresh, groups = _model(CKPT_VARIANT, world_size, OTHER_SEED)
    merged = torch_layout.read_model(os.path.join(root, "torch", "iter_0000001")).tensors
    shards = {name: split_for_tp(name, full, world_size, True)[groups.tp.rank] for name, full in merged.items()}
    fresh.load_state_dict(shards, strict=True)
    out["torch"] = _logits(fresh, groups)
    return out


def _worker(rank, world_size, root):
    results = {variant: _tp_worker(variant, world_size) for variant in VARIANTS}
    results["checkpoint"] = _checkpoint_worker(world_size, root)
    return results


def test_mla_tensor_and_sequence_parallel_equal_single_process_and_checkpoints_reshard(tmp_path):
    # The tp=1 checkpoints, saved in this process.
    saved, groups = _model(CKPT_VARIANT, 1, SEED)
    ref_logits = _logits(saved, groups)
    save_torch_dist(str(tmp_path / "dist"), [saved], None, {"iteration": 1, "args": ARGS}, groups)
    torch_layout.save_training_state(str(tmp_path / "torch"), 1, [saved], None, groups, {"args": ARGS, "iteration": 1})

    results = run_distributed(_worker, 2, str(tmp_path), timeout=400)

    for variant in VARIANTS:
        reference, _ = _model(variant, 1, SEED)
        ref_loss, ref_logged = _loss_and_grads(reference)
        names = {n for n, _ in reference.named_parameters()}
        for rank_result in results:
            got = rank_result[variant]
            torch.testing.assert_close(got["loss"], ref_loss, rtol=1e-5, atol=1e-6, msg=variant)
            assert set(got["logged"]) == set(ref_logged), variant
            for key, value in ref_logged.items():
                torch.testing.assert_close(got["logged"][key], value, rtol=1e-5, atol=1e-5, msg=f"{variant}: {key}")
            assert set(got["grads"]) == names, variant
            for name, p in reference.named_parameters():
                torch.testing.assert_close(got["params"][name], p.detach(), rtol=0, atol=0,
                                           msg=f"{variant}: init of {name}")
                torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6,
                                           msg=f"{variant}: grad of {name}")
    assert "mtp_2 loss" in results[0][CKPT_VARIANT]["logged"]

    for rank, rank_result in enumerate(results):
        got = rank_result["checkpoint"]
        assert not torch.allclose(got["fresh"], ref_logits, atol=1e-3)  # another seed: loading must matter
        torch.testing.assert_close(got["dist"], ref_logits, rtol=1e-5, atol=1e-5, msg=f"torch_dist at tp=2, rank {rank}")
        torch.testing.assert_close(got["torch"], ref_logits, rtol=1e-5, atol=1e-5, msg=f"torch at tp=2, rank {rank}")

    # and both formats at tp=1
    fresh, groups = _model(CKPT_VARIANT, 1, OTHER_SEED)
    load_torch_dist(str(tmp_path / "dist"), [fresh], None, groups)
    torch.testing.assert_close(_logits(fresh, groups), ref_logits, rtol=0, atol=0)
    fresh, groups = _model(CKPT_VARIANT, 1, OTHER_SEED)
    torch_layout.load_training_state(str(tmp_path / "torch" / "iter_0000001"), [fresh], None, groups)
    torch.testing.assert_close(_logits(fresh, groups), ref_logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------- pipeline parallel
PP_CONFIG = dict(BASE, q_lora_rank=12, qk_layernorm=True, swiglu=True, untie_embeddings_and_output_weights=True,
                 mtp_num_layers=2, mtp_loss_scaling_factor=0.3, num_layers=4)
MICROBATCHES = 2


def _microbatches():
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(MICROBATCHES):
        tokens = torch.randint(0, VOCAB, (2, 17), generator=g)
        mask = (torch.rand(2, 16, generator=g) > 0.2).float()
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask,
                    "position_ids": torch.arange(16)[None].expand(2, 16)})
    return out


def _pp_worker(rank, world_size, root):
    from gigatron.core.checkpoint.dist import global_param_name
    from gigatron.core.distributed import DDPConfig, DistributedDataParallel, finalize_model_grads
    from gigatron.core.pipeline import get_forward_backward_func
    from gigatron.training.gpt import forward_step

    cfg = TransformerConfig(**PP_CONFIG, pipeline_model_parallel_size=world_size)
    groups = ParallelGroups.build(ParallelConfig(pipeline_model_parallel_size=world_size))
    model_parallel_seed(1234, groups)
    model = GPTModel(cfg, groups, VOCAB, pre_process=groups.pp.rank == 0, post_process=groups.pp.rank == world_size - 1,
                     seed=SEED)
    ddp = DistributedDataParallel(DDPConfig(), model, groups)
    ddp.train()
    schedule = get_forward_backward_func(world_size, None)
    logged = schedule(forward_step_func=forward_step, data_iterator=iter(_microbatches()), model=[ddp],
                      num_microbatches=MICROBATCHES, seq_length=16, micro_batch_size=2, groups=groups, config=cfg,
                      finalize_model_grads_func=lambda chunks, num_tokens=None: finalize_model_grads(
                          chunks, groups, cfg, num_tokens))
    # torch_dist at pp=2: the last stage's embedding copy is read from the first stage's key, not written
    save_torch_dist(os.path.join(root, "pp2"), [model], None, {"iteration": 1, "args": ARGS}, groups)
    grads = {}
    for name, p in model.named_parameters():
        key = global_param_name(model, name) + (" (last-stage copy)" if name.startswith("embedding.") and
                                                 not model.pre_process else "")
        grads[key] = p.main_grad.detach().clone()
    return {"logged": logged, "grads": grads}


def test_mtp_on_the_last_pipeline_stage_equals_single_process(tmp_path):
    from gigatron.training.gpt import loss_func

    results = run_distributed(_pp_worker, 2, str(tmp_path), timeout=300)
    reference = GPTModel(TransformerConfig(**PP_CONFIG), ParallelGroups.single(), VOCAB, seed=SEED)
    reference.train()
    logged = []
    for mb in _microbatches():
        per_token = reference(mb["tokens"], mb["position_ids"], labels=mb["labels"])
        loss, entry = loss_func(mb["loss_mask"], per_token, mtp_losses=reference.pop_mtp_losses(),
                                mtp_loss_scaling_factor=0.3)
        (loss / MICROBATCHES).backward()
        logged.append(entry)
    first, last = results
    assert first["logged"] == [] and len(last["logged"]) == MICROBATCHES
    for got, ref in zip(last["logged"], logged):
        assert set(got) == {"lm loss", "mtp_1 loss", "mtp_2 loss"}
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-5)
    grads = {**first["grads"], **last["grads"]}
    names = {n for n, _ in reference.named_parameters()}
    assert set(grads) == names | {"embedding.word_embeddings.weight (last-stage copy)"}
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # The last stage's copy of the word embedding got the same summed gradient (it stays equal).
    torch.testing.assert_close(grads["embedding.word_embeddings.weight (last-stage copy)"],
                               grads["embedding.word_embeddings.weight"], rtol=0, atol=0)

    # The pp=2 torch_dist checkpoint loads in one process as the same model.
    fresh = GPTModel(TransformerConfig(**PP_CONFIG), ParallelGroups.single(), VOCAB, seed=OTHER_SEED)
    load_torch_dist(str(tmp_path / "pp2"), [fresh], None, ParallelGroups.single())
    for name, tensor in reference.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
