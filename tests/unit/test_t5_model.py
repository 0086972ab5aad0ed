"""T5Model: shapes and names, distinct encoder/decoder initialization, causal decoder, padded encoder
keys never seen, cross-attention and relative position bias against plain PyTorch / transformers
references, the data set's masks, and a loss that falls on a repeated batch."""

import pytest
import torch
import torch.nn.functional as F

from gigatron.core.models.t5 import T5Model, attention_mask_4d
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.parallel.random import model_parallel_seed
from gigatron.core.transformer.config import TransformerConfig
from gigatron.core.transformer.cross_attention import CrossAttention
from gigatron.training.t5 import get_batch, loss_func

VOCAB = 80
SE, SD = 12, 8


@pytest.fixture(autouse=True)
def _seed_streams():
    torch.set_num_threads(1)
    model_parallel_seed(1234, ParallelGroups.single())


def _config(**kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=SE, max_position_embeddings=SE,
                attention_dropout=0.0, hidden_dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


def _dataset_sample(n_enc, n_dec, g):
    """A batch entry in the data set's format (masks True = allowed)."""
    text_enc = torch.zeros(SE, dtype=torch.long)
    text_enc[:n_enc] = torch.randint(3, VOCAB, (n_enc,), generator=g)
    text_dec = torch.zeros(SD, dtype=torch.long)
    text_dec[:n_dec] = torch.randint(3, VOCAB, (n_dec,), generator=g)
    labels = torch.full((SD,), -1, dtype=torch.long)
    labels[:n_dec] = torch.randint(3, VOCAB, (n_dec,), generator=g)
    loss_mask = torch.zeros(SD)
    loss_mask[:n_dec] = 1
    enc_mask = torch.zeros(SE, SE, dtype=torch.bool)
    enc_mask[:n_enc, :n_enc] = True
    dec_mask = torch.tril(torch.ones(SD, SD, dtype=torch.bool))
    dec_mask[n_dec:, :] = False
    dec_mask[:, n_dec:] = False
    enc_dec_mask = torch.zeros(SD, SE, dtype=torch.bool)
    enc_dec_mask[:n_dec, :n_enc] = True
    return dict(text_enc=text_enc, text_dec=text_dec, labels=labels, loss_mask=loss_mask, enc_mask=enc_mask,
                dec_mask=dec_mask, enc_dec_mask=enc_dec_mask)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = [_dataset_sample(9, 6, g), _dataset_sample(12, 8, g)]
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def _inputs(model, batch):
    return get_batch(iter([batch]), model)


def test_shapes_names_and_distinct_init():
    model = T5Model(_config(), ParallelGroups.single(), VOCAB, seed=3)
    enc, dec, labels, loss_mask, enc_mask, dec_mask, enc_dec_mask = _inputs(model, _batch())
    assert enc_mask.shape == (2, SE, SE) and enc_mask[0, 0, 10]  # True = masked
    loss = model(enc, dec, enc_mask, dec_mask, enc_dec_mask, lm_labels=labels)
    assert loss.shape == (2, SD) and loss.dtype == torch.float32
    logits = model(enc, dec, enc_mask, dec_mask, enc_dec_mask)
    assert logits.shape == (SD, 2, VOCAB)
    assert model.encode(enc, enc_mask).shape == (SE, 2, 32)
    params = dict(model.named_parameters())
    assert {"decoder.layers.1.cross_attention.linear_kv.weight", "decoder.layers.0.pre_cross_attn_layernorm.bias",
            "encoder.final_layernorm.weight", "decoder.final_layernorm.weight", "lm_head.output_layer.bias"} <= set(params)
    assert params["decoder.layers.1.cross_attention.linear_kv.weight"].shape == (64, 32)
    # encoder and decoder layers are seeded by their own names
    assert not torch.equal(params["encoder.layers.0.self_attention.linear_qkv.weight"],
                           params["decoder.layers.0.self_attention.linear_qkv.weight"])


def test_decoder_is_causal():
    model = T5Model(_config(), ParallelGroups.single(), VOCAB).eval()
    enc, dec, _, _, enc_mask, _, enc_dec_mask = _inputs(model, _batch())
    changed = dec.clone()
    changed[:, 4] = (dec[:, 4] + 1 - 3) % (VOCAB - 3) + 3
    with torch.no_grad():
        a = model(enc, dec, enc_mask, None, enc_dec_mask)  # None: causal
        b = model(enc, changed, enc_mask, None, enc_dec_mask)
    torch.testing.assert_close(a[:4], b[:4], rtol=0, atol=1e-6)
    assert not torch.allclose(a[4:], b[4:])


def test_padded_encoder_tokens_are_never_seen():
    model = T5Model(_config(), ParallelGroups.single(), VOCAB).eval()
    batch = _batch()
    enc, dec, _, _, enc_mask, dec_mask, enc_dec_mask = _inputs(model, batch)
    changed = enc.clone()
    changed[0, 9:] = torch.tensor([5, 6, 7])  # row 0 has 9 real encoder tokens
    with torch.no_grad():
        a = model(enc, dec, enc_mask, dec_mask, enc_dec_mask)
        b = model(changed, dec, enc_mask, dec_mask, enc_dec_mask)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a[:6, 0], b[:6, 0], rtol=0, atol=1e-6)  # row 0's real decoder positions
    torch.testing.assert_close(a[:, 1], b[:, 1], rtol=0, atol=0)


def test_cross_attention_equals_plain_pytorch():
    cfg = _config(num_attention_heads=4)
    layer = CrossAttention(cfg, ParallelGroups.single(), "decoder.layers.0.cross_attention")
    from gigatron.core.parallel.init import initialize_parameters
    initialize_parameters(layer, 7)
    g = torch.Generator().manual_seed(1)
    hidden, memory = torch.randn(SD, 2, 32, generator=g), torch.randn(SE, 2, 32, generator=g)
    mask = torch.zeros(2, 1, 1, SE, dtype=torch.bool)
    mask[0, ..., 9:] = True
    out, bias = layer(hidden, memory, mask)
    out = out + bias
    nh, d = 4, 8
    q = F.linear(hidden, layer.linear_q.weight, layer.linear_q.bias).view(SD, 2, nh, d).permute(1, 2, 0, 3)
    kv = F.linear(memory, layer.linear_kv.weight, layer.linear_kv.bias).view(SE, 2, nh, 2, d)  # [k_j; v_j] per head
    k, v = kv[..., 0, :].permute(1, 2, 0, 3), kv[..., 1, :].permute(1, 2, 0, 3)  # [b, nh, se, d]
    scores = q @ k.transpose(-1, -2) / d ** 0.5 + mask.float() * -1e9  # [b, nh, sd, se]
    context = (torch.softmax(scores, -1) @ v).permute(2, 0, 1, 3).reshape(SD, 2, nh * d)  # [sd, b, h]
    reference = F.linear(context, layer.linear_proj.weight, layer.linear_proj.bias)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_mask_conversion():
    mask = torch.tensor([[[False, True], [True, True]]])  # [1, 2, 2]
    out = attention_mask_4d(mask, 2, 2, "cpu")
    assert out.shape == (1, 1, 2, 2) and out.tolist() == [[[[False, True], [False, False]]]]
    with pytest.raises(ValueError, match="bool"):
        attention_mask_4d(mask.float(), 2, 2, "cpu")
    with pytest.raises(ValueError, match="does not match"):
        attention_mask_4d(mask, 3, 2, "cpu")


def test_loss_falls_on_a_repeated_batch():
    model = T5Model(_config(hidden_dropout=0.1, attention_dropout=0.1), ParallelGroups.single(), VOCAB, seed=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = _batch()
    history = []
    for _ in range(30):
        optimizer.zero_grad()
        enc, dec, labels, loss_mask, enc_mask, dec_mask, enc_dec_mask = _inputs(model, batch)
        loss, report = loss_func(loss_mask, model(enc, dec, enc_mask, dec_mask, enc_dec_mask, lm_labels=labels))
        loss.backward()
        optimizer.step()
        history.append(loss.item())
        assert report["lm loss"][1].item() == 14
    assert history[-1] < 0.3 * history[0], history


def test_decoder_layer_count():
    model = T5Model(_config(), ParallelGroups.single(), VOCAB, decoder_num_layers=3)
    assert len(model.encoder.layers) == 2 and len(model.decoder.layers) == 3
    enc, dec, labels, _, enc_mask, dec_mask, enc_dec_mask = _inputs(model, _batch())
    assert model(enc, dec, enc_mask, dec_mask, enc_dec_mask, lm_labels=labels).shape == (2, SD)


def test_sequences_longer_than_the_position_table_are_rejected():
    model = T5Model(_config(), ParallelGroups.single(), VOCAB)
    with pytest.raises(ValueError, match="--max-position-embeddings"):
        model(torch.zeros(1, SE + 1, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


# ----------------------------------------------------------------------------- relative positions
def test_relative_position_buckets_equal_transformers_t5():
    pytest.importorskip("transformers")
    from transformers.models.t5.modeling_t5 import T5Attention

    from gigatron.core.transformer.relative_position import relative_position_bucket

    relative = torch.arange(-300, 300)[None, :] - torch.arange(0, 40, 7)[:, None]  # [6, 600] key - query
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (16, 40)):
            expected = T5Attention._relative_position_bucket(relative, bidirectional=bidirectional,
                                                             num_buckets=buckets, max_distance=distance)
            assert torch.equal(relative_position_bucket(relative, bidirectional, buckets, distance), expected)


def _reference_relative_self_attention(attention, bias_module, x, causal):
    """softmax(q k^T / sqrt(d) + bias + causal -inf) v, in plain PyTorch, for one layer's self-attention."""
    s, b, h = x.shape
    nh, d = attention.num_heads, attention.head_dim
    qkv = F.linear(x, attention.linear_qkv.weight, attention.linear_qkv.bias).view(s, b, nh, 3, d)
    q, k, v = (qkv[..., j, :].permute(1, 2, 0, 3) for j in range(3))  # [b, nh, s, d]
    scores = q @ k.transpose(-1, -2) / d ** 0.5 + bias_module(s, s)  # [b, nh, s, s]
    if causal:
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    context = (torch.softmax(scores, -1) @ v).permute(2, 0, 1, 3).reshape(s, b, nh * d)
    return F.linear(context, attention.linear_proj.weight) + attention.linear_proj.bias


def test_relative_attention_equals_plain_pytorch():
    from gigatron.core.transformer.relative_position import additive_mask

    model = T5Model(_config(position_embedding_type="none"), ParallelGroups.single(), VOCAB,
                    position_embedding_type="relative", relative_attention_num_buckets=8,
                    relative_attention_max_distance=20).eval()
    assert model.embedding.position_embeddings is None
    x = torch.randn(SD, 2, 32, generator=torch.Generator().manual_seed(3))
    for stack, bias, causal in ((model.encoder, model.encoder_relative_pos_emb, False),
                                (model.decoder, model.decoder_relative_pos_emb, True)):
        attention = stack.layers[0].self_attention
        mask = additive_mask(bias(SD, SD), None, causal=causal)
        with torch.no_grad():
            out, out_bias = attention(x, mask)
            expected = _reference_relative_self_attention(attention, bias, x, causal)
        torch.testing.assert_close(out + out_bias, expected, rtol=1e-5, atol=1e-5)


def test_relative_t5_is_causal_and_learns():
    model = T5Model(_config(hidden_dropout=0.1, attention_dropout=0.1), ParallelGroups.single(), VOCAB, seed=4,
                    position_embedding_type="relative")
    names = {n for n, _ in model.named_parameters()}
    assert {"encoder_relative_pos_emb.relative_attention_bias.weight",
            "decoder_relative_pos_emb.relative_attention_bias.weight"} <= names
    assert "embedding.position_embeddings.weight" not in names
    batch = _batch()
    enc, dec, labels, loss_mask, enc_mask, dec_mask, enc_dec_mask = _inputs(model, batch)
    model.eval()
    changed = dec.clone()
    changed[:, 4] = (dec[:, 4] + 1 - 3) % (VOCAB - 3) + 3
    with torch.no_grad():
        a = model(enc, dec, enc_mask, dec_mask, enc_dec_mask)
        b = model(enc, changed, enc_mask, dec_mask, enc_dec_mask)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a[:4], b[:4], rtol=0, atol=1e-6)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(30):
        optimizer.zero_grad()
        loss, _ = loss_func(loss_mask, model(enc, dec, enc_mask, dec_mask, enc_dec_mask, lm_labels=labels))
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.4 * history[0], history
    assert model.encoder_relative_pos_emb.relative_attention_bias.weight.grad.abs().sum() > 0
