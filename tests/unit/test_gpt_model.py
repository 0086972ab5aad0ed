"""GPTModel on one CPU process: shapes, learning, tied/untied output, init statistics,
Megatron parameter names, pipeline stages, recompute and the fused loss."""

import dataclasses
import math

import pytest
import torch

from gigatron.core.models.gpt import GPTModel
from gigatron.core.parallel import tags
from gigatron.core.parallel.groups import Group, ParallelGroups
from gigatron.core.parallel.random import model_parallel_seed
from gigatron.core.transformer.config import TransformerConfig

VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(**kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                attention_dropout=0.0, hidden_dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


def batch(b=2, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (b, s + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def test_shapes_and_names():
    model = GPTModel(tiny(), ParallelGroups.single(), VOCAB)
    ids, labels = batch()
    loss = model(ids, labels=labels)
    assert loss.shape == (2, 16) and loss.dtype == torch.float32
    assert model(ids).shape == (16, 2, VOCAB)
    names = {n for n, _ in model.named_parameters()}
    for expected in ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
                     "decoder.layers.1.input_layernorm.weight", "decoder.layers.1.self_attention.linear_qkv.weight",
                     "decoder.layers.1.self_attention.linear_proj.bias", "decoder.layers.0.pre_mlp_layernorm.bias",
                     "decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.0.mlp.linear_fc2.weight",
                     "decoder.final_layernorm.weight"):
        assert expected in names
    assert "output_layer.weight" not in names  # tied on a single stage
    # The per-token loss is the cross entropy of the logits.
    logits = model(ids).float()  # [s, b, V]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.t().reshape(-1), reduction="none")
    torch.testing.assert_close(loss, ref.view(16, 2).t(), rtol=1e-5, atol=1e-5)


def test_loss_falls_with_adam():
    torch.manual_seed(0)
    cfg = tiny(position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
               group_query_attention=True, num_query_groups=2, add_bias_linear=False)
    model = GPTModel(cfg, ParallelGroups.single(), VOCAB)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ids, labels = batch(b=4)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = model(ids, labels=labels).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_tied_and_untied_output():
    ids, _ = batch()
    tied = GPTModel(tiny(), ParallelGroups.single(), VOCAB, seed=7)
    untied = GPTModel(tiny(untie_embeddings_and_output_weights=True), ParallelGroups.single(), VOCAB, seed=7)
    assert untied.output_layer.weight is not None
    assert not torch.equal(untied.output_layer.weight, untied.embedding.word_embeddings.weight)
    assert tied.output_weight() is tied.embedding.word_embeddings.weight
    torch.testing.assert_close(untied.embedding.word_embeddings.weight, tied.embedding.word_embeddings.weight)
    # Tied: logits are hidden @ E^T, so the embedding receives gradient from both ends.
    logits = tied(ids)
    logits.float().pow(2).mean().backward()
    assert tied.embedding.word_embeddings.weight.grad is not None
    # Same seed, same model (layout-independent init keyed by names).
    again = GPTModel(tiny(), ParallelGroups.single(), VOCAB, seed=7)
    for (n, p), (_, q) in zip(tied.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), n


def test_init_statistics():
    cfg = tiny(num_layers=4, hidden_size=128, num_attention_heads=4, init_method_std=0.05,
               untie_embeddings_and_output_weights=True)
    model = GPTModel(cfg, ParallelGroups.single(), 512)
    scaled = 0.05 / math.sqrt(2 * 4)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        elif "layernorm" in name:
            assert torch.all(p == 1), name
        elif "linear_proj" in name or "linear_fc2" in name:
            assert abs(p.std().item() - scaled) < 0.1 * scaled, name
        else:
            assert abs(p.std().item() - 0.05) < 0.05 * 0.05, name
            assert abs(p.mean().item()) < 0.01, name
    onep = GPTModel(tiny(apply_layernorm_1p=True), ParallelGroups.single(), VOCAB)
    assert all(torch.all(p == 0) for n, p in onep.named_parameters() if "layernorm.weight" in n)
    # No initialization when asked (weights left for a checkpoint load) still builds the model.
    GPTModel(tiny(perform_initialization=False), ParallelGroups.single(), VOCAB)


def test_params_dtype_and_fp32_residual():
    cfg = tiny(bf16=True, fp32_residual_connection=True)
    model = GPTModel(cfg, ParallelGroups.single(), VOCAB)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids, labels = batch()
    hidden = model.embedding(ids)
    assert hidden.dtype == torch.float32
    loss = model(ids, labels=labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()


def _groups_with_pp(pp_rank, pp_size):
    single = ParallelGroups.single()
    return dataclasses.replace(single, pp=Group(group=None, size=pp_size, rank=pp_rank, ranks=list(range(pp_size))))


@pytest.mark.parametrize("untie", [False, True])
def test_two_pipeline_stages_equal_one(untie):
    """Stage 0 (embedding + layers 0-1) feeding stage 1 (layers 2-3 + output) equals the whole
    model; a tied output layer on the last stage starts equal to the embedding."""
    cfg1 = tiny(num_layers=4, untie_embeddings_and_output_weights=untie)
    cfg2 = tiny(num_layers=4, untie_embeddings_and_output_weights=untie, pipeline_model_parallel_size=2)
    full = GPTModel(cfg1, ParallelGroups.single(), VOCAB)
    first = GPTModel(cfg2, _groups_with_pp(0, 2), VOCAB, pre_process=True, post_process=False)
    last = GPTModel(cfg2, _groups_with_pp(1, 2), VOCAB, pre_process=False, post_process=True)
    assert "decoder.layers.0.mlp.linear_fc1.weight" in dict(last.named_parameters())
    torch.testing.assert_close(last.decoder.layers[0].mlp.linear_fc1.weight, full.decoder.layers[2].mlp.linear_fc1.weight)
    if not untie:
        assert tags.is_shared_embedding(last.output_layer.weight)
        assert tags.is_shared_embedding(first.embedding.word_embeddings.weight)
        torch.testing.assert_close(last.output_layer.weight, first.embedding.word_embeddings.weight)
    ids, labels = batch()
    hidden = first(ids)
    assert hidden.shape == (16, 2, 32)
    last.set_input_tensor(hidden)
    torch.testing.assert_close(last(None, labels=labels), full(ids, labels=labels))


def _loss_and_grads(cfg, ids, labels):
    model = GPTModel(cfg, ParallelGroups.single(), VOCAB, seed=3)
    model.train()
    model_parallel_seed(11, ParallelGroups.single())
    loss = model(ids, labels=labels).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("recompute", [
    dict(recompute_granularity="selective"),
    dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp", "layernorm"]),
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
])
def test_recompute_gives_identical_loss_and_grads(recompute):
    common = dict(num_layers=3, attention_dropout=0.2, hidden_dropout=0.2, normalization="RMSNorm")
    ids, labels = batch()
    ref_loss, ref_grads = _loss_and_grads(tiny(**common), ids, labels)
    loss, grads = _loss_and_grads(tiny(**common, **recompute), ids, labels)
    assert torch.equal(loss, ref_loss)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("extra", [dict(), dict(untie_embeddings_and_output_weights=True)])
def test_cross_entropy_loss_fusion_matches_plain(extra):
    ids, labels = batch()
    loss, grads = _loss_and_grads(tiny(cross_entropy_loss_fusion=True, **extra), ids, labels)
    ref_loss, ref_grads = _loss_and_grads(tiny(**extra), ids, labels)
    torch.testing.assert_close(loss, ref_loss)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_reset_attention_mask_path():
    """An explicit document mask: tokens of the second document ignore the first one."""
    model = GPTModel(tiny(position_embedding_type="rope"), ParallelGroups.single(), VOCAB)
    ids, _ = batch(b=1)
    mask = torch.ones(16, 16, dtype=torch.bool).triu(1)
    mask[8:, :8] = True
    pos = torch.cat([torch.arange(8), torch.arange(8)])[None]
    out = model(ids, pos, mask[None, None])  # [s, b, V]
    alone = model(ids[:, 8:], pos[:, 8:])
    torch.testing.assert_close(out[8:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "flash", "cudnn"])
def test_gpt_cuda_bf16_compiled_layers_match_eager(backend):
    """On a GPU: every attention backend runs in bf16, torch.compile per layer gives the eager loss."""
    cfg = tiny(bf16=True, hidden_size=128, num_attention_heads=2, position_embedding_type="rope",
               swiglu=True, normalization="RMSNorm", group_query_attention=True, num_query_groups=1,
               attention_backend=backend, cross_entropy_loss_fusion=True, seq_length=64)
    model = GPTModel(cfg, ParallelGroups.single(), VOCAB)
    assert next(model.parameters()).is_cuda
    ids, labels = batch(b=2, s=64)
    ids, labels = ids.cuda(), labels.cuda()
    eager = model(ids, labels=labels)
    for layer in model.decoder.layers:
        layer.compile(fullgraph=True)  # no graph breaks in a layer
    compiled = model(ids, labels=labels)
    compiled.mean().backward()
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
