"""BertModel: shapes, parameter names, padding masking, bidirectional attention, the post-LN layer
against a plain PyTorch reference, recompute, and a loss that falls on a repeated batch."""

import pytest
import torch
import torch.nn.functional as F

from gigatron.core.models.bert import BertModel, padding_attention_mask, unmask_empty_rows
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.parallel.random import model_parallel_seed
from gigatron.core.transformer.config import TransformerConfig
from gigatron.training.bert import loss_func

VOCAB = 96


@pytest.fixture(autouse=True)
def _seed_streams():
    torch.set_num_threads(1)
    model_parallel_seed(1234, ParallelGroups.single())


def _config(**kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, attention_dropout=0.0,
                hidden_dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


def _batch(b=3, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (b, s), generator=g)
    padding = torch.ones(b, s, dtype=torch.long)
    padding[0, 11:] = 0
    padding[2, 6:] = 0
    types = torch.zeros(b, s, dtype=torch.long)
    types[:, 5:] = 1
    labels = torch.full((b, s), -1, dtype=torch.long)
    loss_mask = torch.zeros(b, s)
    for row, col in ((0, 2), (0, 7), (1, 4), (1, 12), (2, 1), (2, 3)):
        labels[row, col] = int(ids[row, col])
        loss_mask[row, col] = 1.0
    order = torch.tensor([0, 1, 1])
    return ids, padding, types, labels, loss_mask, order


@pytest.mark.parametrize("layer_norm", ["pre", "post"])
def test_shapes_and_names(layer_norm):
    model = BertModel(_config(), ParallelGroups.single(), VOCAB, layer_norm=layer_norm, seed=3)
    ids, padding, types, labels, _, _ = _batch()
    loss, binary = model(ids, padding, types, lm_labels=labels)
    assert loss.shape == (3, 16) and loss.dtype == torch.float32 and binary.shape == (3, 2)
    logits, _ = model(ids, padding, types)
    assert logits.shape == (16, 3, VOCAB)
    names = {n for n, _ in model.named_parameters()}
    assert {"embedding.word_embeddings.weight", "embedding.tokentype_embeddings.weight", "lm_head.dense.weight",
            "lm_head.layer_norm.weight", "output_layer.bias", "pooler.dense.weight", "binary_head.weight",
            "encoder.layers.1.self_attention.linear_qkv.weight", "encoder.layers.0.mlp.linear_fc2.bias"} <= names
    assert "output_layer.weight" not in names  # tied to the word embeddings
    if layer_norm == "pre":
        assert "encoder.final_layernorm.weight" in names and "embedding.layernorm.weight" not in names
    else:
        assert "encoder.layers.0.post_mlp_layernorm.weight" in names and "embedding.layernorm.weight" in names
    no_head = BertModel(_config(), ParallelGroups.single(), VOCAB, num_tokentypes=0, add_binary_head=False)
    _, binary = no_head(ids, padding, lm_labels=labels)
    assert binary is None and no_head.pooler is None


@pytest.mark.parametrize("layer_norm", ["pre", "post"])
def test_padding_is_never_attended(layer_norm):
    model = BertModel(_config(), ParallelGroups.single(), VOCAB, layer_norm=layer_norm).eval()
    ids, padding, types, _, _, _ = _batch()
    changed = ids.clone()
    pad = padding == 0
    changed[pad] = torch.randint(5, VOCAB, (int(pad.sum()),))
    changed_types = types.clone()
    changed_types[pad] = 1 - changed_types[pad]
    with torch.no_grad():
        a = model.encode(ids, padding, types).transpose(0, 1)  # [b, s, h]
        b = model.encode(changed, padding, changed_types).transpose(0, 1)
    real = padding.bool()
    torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-6)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert not torch.allclose(a[pad], b[pad])


def test_attention_is_bidirectional():
    model = BertModel(_config(), ParallelGroups.single(), VOCAB).eval()
    ids, padding, types, _, _, _ = _batch()
    changed = ids.clone()
    changed[1, 15] = (ids[1, 15] + 1 - 5) % (VOCAB - 5) + 5  # the last token of a full row
    with torch.no_grad():
        a = model.encode(ids, padding, types)
        b = model.encode(changed, padding, types)
    assert not torch.allclose(a[0, 1], b[0, 1])  # the first position sees the last one


def test_mask_helpers():
    mask = padding_attention_mask(torch.tensor([[1, 1, 0]]))
    assert mask.shape == (1, 1, 1, 3) and mask.tolist() == [[[[False, False, True]]]]
    full = torch.tensor([[True, False], [True, True]])
    assert unmask_empty_rows(full).tolist() == [[True, False], [False, False]]


def _reference_post_ln(model, ids, padding, types):
    """The original BERT in plain PyTorch from the model's weights (tp=1)."""
    cfg = model.config
    p = dict(model.named_parameters())
    nh, d = cfg.num_attention_heads, cfg.kv_channels
    x = p["embedding.word_embeddings.weight"][ids] + p["embedding.position_embeddings.weight"][:ids.shape[1]] \
        + p["embedding.tokentype_embeddings.weight"][types]  # [b, s, h]
    x = F.layer_norm(x, (cfg.hidden_size,), p["embedding.layernorm.weight"], p["embedding.layernorm.bias"],
                     cfg.norm_epsilon)
    bias = (padding == 0)[:, None, None, :].float() * -1e9  # [b, 1, 1, s]
    for i in range(cfg.num_layers):
        pre = f"encoder.layers.{i}."
        qkv = F.linear(x, p[pre + "self_attention.linear_qkv.weight"], p[pre + "self_attention.linear_qkv.bias"])
        qkv = qkv.view(*x.shape[:2], nh, 3, d)  # [b, s, nh, 3, d] (per-head [q; k; v] rows)
        q, k, v = (qkv[..., j, :].transpose(1, 2) for j in range(3))  # [b, nh, s, d]
        att = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5 + bias, dim=-1) @ v  # [b, nh, s, d]
        att = att.transpose(1, 2).reshape(*x.shape)  # [b, s, h]
        out = F.linear(att, p[pre + "self_attention.linear_proj.weight"], p[pre + "self_attention.linear_proj.bias"])
        x = F.layer_norm(x + out, (cfg.hidden_size,), p[pre + "post_attention_layernorm.weight"],
                         p[pre + "post_attention_layernorm.bias"], cfg.norm_epsilon)
        h = F.gelu(F.linear(x, p[pre + "mlp.linear_fc1.weight"], p[pre + "mlp.linear_fc1.bias"]))
        out = F.linear(h, p[pre + "mlp.linear_fc2.weight"], p[pre + "mlp.linear_fc2.bias"])
        x = F.layer_norm(x + out, (cfg.hidden_size,), p[pre + "post_mlp_layernorm.weight"],
                         p[pre + "post_mlp_layernorm.bias"], cfg.norm_epsilon)
    return x


def test_post_ln_encoder_equals_plain_pytorch_reference():
    model = BertModel(_config(), ParallelGroups.single(), VOCAB, layer_norm="post", seed=11).eval()
    ids, padding, types, _, _, _ = _batch()
    with torch.no_grad():
        ours = model.encode(ids, padding, types).transpose(0, 1)
        reference = _reference_post_ln(model, ids, padding, types)
    real = padding.bool()
    torch.testing.assert_close(ours[real], reference[real], rtol=1e-5, atol=1e-5)


def _grads(model):
    ids, padding, types, labels, loss_mask, order = _batch()
    loss, _ = loss_func(loss_mask, order, model(ids, padding, types, lm_labels=labels))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("layer_norm", ["pre", "post"])
def test_full_recompute_gives_the_same_gradients(layer_norm):
    plain = BertModel(_config(), ParallelGroups.single(), VOCAB, layer_norm=layer_norm, seed=2)
    recomputed = BertModel(_config(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
                           ParallelGroups.single(), VOCAB, layer_norm=layer_norm, seed=2)
    loss_a, grads_a = _grads(plain)
    loss_b, grads_b = _grads(recomputed)
    torch.testing.assert_close(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("layer_norm", ["pre", "post"])
def test_loss_falls_on_a_repeated_batch(layer_norm):
    model = BertModel(_config(hidden_dropout=0.1, attention_dropout=0.1), ParallelGroups.single(), VOCAB,
                      layer_norm=layer_norm, seed=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    ids, padding, types, labels, loss_mask, order = _batch()
    history = []
    for _ in range(30):
        optimizer.zero_grad()
        loss, report = loss_func(loss_mask, order, model(ids, padding, types, lm_labels=labels))
        loss.backward()
        optimizer.step()
        history.append((report["lm loss"][0] / report["lm loss"][1]).item())
        assert set(report) == {"lm loss", "sop loss"}
    assert history[-1] < 0.3 * history[0], history


def test_bad_configurations_are_rejected():
    groups = ParallelGroups.single()
    with pytest.raises(ValueError, match="--num-tokentypes 2"):
        BertModel(_config(), groups, VOCAB, num_tokentypes=0, add_binary_head=True)
    with pytest.raises(ValueError, match="untie"):
        BertModel(_config(untie_embeddings_and_output_weights=True), groups, VOCAB)
    with pytest.raises(ValueError, match="layer_norm"):
        BertModel(_config(), groups, VOCAB, layer_norm="middle")
    with pytest.raises(ValueError, match="pipeline-parallel group has 1 ranks"):
        BertModel(_config(pipeline_model_parallel_size=2), groups, VOCAB)
    with pytest.raises(ValueError, match="--position-embedding-type learned_absolute"):
        BertModel(_config(position_embedding_type="rope"), groups, VOCAB)
    with pytest.raises(ValueError, match="padding mask"):
        BertModel(_config(), groups, VOCAB)(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 1, 4, 4))


def test_bench_cpu_smoke(capsys):
    """bench/bench_bert_t5.py --cpu-smoke trains tiny BERT and T5 models with the product's pieces."""
    import importlib.util
    import os
    import sys

    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "bench_bert_t5.py")
    spec = importlib.util.spec_from_file_location("bench_bert_t5", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.modules.pop(spec.name, None)
    assert bench.main(["--cpu-smoke"]) == 0
    out = capsys.readouterr().out
    assert "| BERT (smoke) |" in out and "| T5 (smoke) |" in out
    # FLOPs formulas: BERT-large per sample, by hand (3 passes x 2 FLOPs per multiply-add)
    s, h, f, v, layers = 512, 1024, 4096, 30592, 24
    assert bench.bert_flops_per_sample(bench.BERT_LARGE) == 3 * s * (layers * (8 * h * h + 4 * s * h + 4 * h * f)
                                                                    + 2 * h * h + 2 * h * v)
