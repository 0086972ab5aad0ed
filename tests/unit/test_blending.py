import glob
import os

import numpy as np
import pytest

from gigatron.core.data import BlendedDataset, DataConfig, IndexedDatasetBuilder, build_gpt_datasets
from gigatron.core.data.builder import get_size_per_split_per_dataset
from gigatron.core.data.index_helpers import build_blending_indices, build_exhaustive_blending_indices
from gigatron.core.data.utils import get_blend_from_list, read_per_split_data_args_file


class StandInTokenizer:
    """Minimal tokenizer stand-in: the datasets only read eod, pad and vocab_size."""

    eod, pad, vocab_size = 1, None, 5000


# Straightforward references of Megatron's greedy blending loops.
def ref_blending(weights, size):
    counts = [0] * len(weights)
    di, dsi = [], []
    for s in range(size):
        sd = max(float(s), 1.0)
        errors = [weights[i] * sd - counts[i] for i in range(len(weights))]
        best = 0
        for i in range(1, len(weights)):
            if errors[i] > errors[best]:
                best = i
        di.append(best)
        dsi.append(counts[best])
        counts[best] += 1
    return np.array(di, np.int16), np.array(dsi, np.int64)


def ref_exhaustive(sizes):
    total = sum(sizes)
    weights = [s / total for s in sizes]
    counts = [0] * len(sizes)
    unspent = sorted(i for i, s in enumerate(sizes) if s > 0)
    di, dsi = [], []
    s = 0
    while unspent:
        sd = max(float(s), 1.0)
        best, best_err = 0, -np.inf
        for i in unspent:
            err = weights[i] * sd - counts[i]
            if err > best_err:
                best, best_err = i, err
        di.append(best)
        dsi.append(counts[best])
        counts[best] += 1
        if counts[best] == sizes[best]:
            unspent.remove(best)
        s += 1
    return np.array(di, np.int16), np.array(dsi, np.int64)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_blending_indices_equal_reference(k):
    rng = np.random.default_rng(k)
    for trial in range(4):
        w = rng.random(k) ** 2 + 1e-3
        w = (w / w.sum()).tolist()
        if trial == 3:
            w = [1.0 / k] * k  # many exact ties
        ref = ref_blending(w, 20000)
        for native in (True, False):
            di, dsi = build_blending_indices(w, 20000, use_native=native)
            assert di.dtype == np.int16 and dsi.dtype == np.int64
            np.testing.assert_array_equal(di, ref[0])
            np.testing.assert_array_equal(dsi, ref[1])


def test_exhaustive_indices_equal_reference():
    rng = np.random.default_rng(0)
    for trial in range(10):
        sizes = rng.integers(1, 300, size=int(rng.integers(1, 6))).tolist()
        ref = ref_exhaustive(sizes)
        for native in (True, False):
            di, dsi = build_exhaustive_blending_indices(sizes, use_native=native)
            np.testing.assert_array_equal(di, ref[0])
            np.testing.assert_array_equal(dsi, ref[1])
        assert np.bincount(ref[0], minlength=len(sizes)).tolist() == sizes


def test_blending_proportions_large():
    w = [0.2, 0.5, 0.3]
    di, dsi = build_blending_indices(w, 1_000_000)
    share = np.bincount(di) / len(di)
    np.testing.assert_allclose(share, w, atol=0.01 * max(w))
    # per-dataset sample ids count up from 0 in order
    for i in range(3):
        np.testing.assert_array_equal(dsi[di == i], np.arange((di == i).sum()))


def test_blend_list_parsing_and_margin():
    assert get_blend_from_list(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    assert get_blend_from_list(["a", "b"]) == (["a", "b"], None)
    assert get_blend_from_list(["a"]) == (["a"], None)
    with pytest.raises(ValueError, match="mixes weights and prefixes"):
        get_blend_from_list(["0.3", "a", "b", "c"])
    with pytest.raises(ValueError, match="must be positive"):
        get_blend_from_list(["0", "a", "1", "b"])
    sizes = get_size_per_split_per_dataset([0.25, 0.75], [1000, 33, None], margin=0.5)
    assert sizes == [[252, 10, None], [754, 26, None]]
    assert get_size_per_split_per_dataset([0.25, 0.75], [1000, 33, None]) == [[250, 9, None], [750, 25, None]]


def write(prefix, docs):
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d in docs:
        b.add_item(d)
        b.end_document()
    b.finalize(prefix + ".idx")


@pytest.fixture
def two_corpora(tmp_path):
    rng = np.random.default_rng(0)
    prefixes = []
    for k, (lo, hi, n) in enumerate([(2, 1000, 300), (1000, 2000, 500)]):
        docs = []
        for _ in range(n):
            d = rng.integers(lo, hi, size=int(rng.integers(2, 50)))
            d[-1] = 1
            docs.append(d)
        p = str(tmp_path / f"corpus{k}")
        write(p, docs)
        prefixes.append(p)
    return prefixes


def _source(sample):
    toks = sample["tokens"].numpy()
    toks = toks[toks != 1]
    assert ((toks < 1000).all() or (toks >= 1000).all())
    return 0 if (toks < 1000).all() else 1


def test_weighted_blend(two_corpora, tmp_path):
    a, b = two_corpora
    cfg = DataConfig(data_path=["0.3", a, "0.7", b], split="98,2,0", seq_length=4, data_cache_path=str(tmp_path / "c"))
    train, valid, test = build_gpt_datasets(cfg, StandInTokenizer(), [5000, 100, 0])
    assert isinstance(train, BlendedDataset) and test is None
    assert len(train) == 1500 + 3500 and len(valid) == 30 + 70
    share = np.bincount(np.asarray(train.dataset_index)) / len(train)
    np.testing.assert_allclose(share, [0.3, 0.7], atol=0.01)
    for i in range(0, len(train), 97):
        s = train[i]
        assert s["dataset_id"] == int(train.dataset_index[i])
        assert _source(s) == s["dataset_id"] or (s["tokens"] == 1).all()
    # each constituent was built with the 0.5% margin: ceil(ceil(5000 * w) * 1.005)
    assert [d.num_samples for d in train.datasets] == [1508, 3518]
    names = [os.path.basename(p) for p in glob.glob(str(tmp_path / "c" / "*BlendedDataset*"))]
    assert sorted(n.split("-", 1)[1] for n in names) == sorted(
        f"BlendedDataset-{s}-{a}" for s in ("train", "valid") for a in
        ("description.txt", "dataset_index.npy", "dataset_sample_index.npy"))
    again = build_gpt_datasets(cfg, StandInTokenizer(), [5000, 100, 0])
    assert not again[0].built_anew_on_cache_miss
    np.testing.assert_array_equal(again[0].dataset_index, train.dataset_index)
    changed = build_gpt_datasets(DataConfig(**{**cfg.__dict__, "data_path": ["0.5", a, "0.5", b]}),
                                 StandInTokenizer(), [5000, 100, 0])
    assert changed[0].built_anew_on_cache_miss


def test_size_weighted_blend(two_corpora):
    a, b = two_corpora
    cfg = DataConfig(data_path=[a, b], split="1,0,0", seq_length=4)
    train, _, _ = build_gpt_datasets(cfg, StandInTokenizer(), [400, 0, 0])
    sizes = [len(d) for d in train.datasets]
    assert train.weights == [s / sum(sizes) for s in sizes]
    assert len(train) == 400
    share = np.bincount(np.asarray(train.dataset_index)) / 400
    np.testing.assert_allclose(share, np.array(sizes) / sum(sizes), atol=0.01)
    # one full epoch of each when no size is requested: exhaustive blend
    full, _, _ = build_gpt_datasets(cfg, StandInTokenizer(), [None, 0, 0])
    assert len(full) == sum(len(d) for d in full.datasets)
    assert np.bincount(np.asarray(full.dataset_index)).tolist() == [len(d) for d in full.datasets]


def test_per_split_paths(two_corpora, tmp_path):
    a, b = two_corpora
    cfg = DataConfig(train_data_path=["0.5", a, "0.5", b], valid_data_path=[b], seq_length=4)
    train, valid, test = build_gpt_datasets(cfg, StandInTokenizer(), [200, 20, 20])
    assert isinstance(train, BlendedDataset) and test is None
    assert valid.dataset_path == b and valid.indices.tolist() == list(range(500))
    assert all(_source(valid[i]) == 1 for i in range(20))
    spec = tmp_path / "per_split.json"
    spec.write_text('{"train": ["%s"], "valid": "%s"}' % (a, b))
    assert read_per_split_data_args_file(str(spec)) == [[a], [b], None]
    cfg2 = DataConfig(per_split_data_args_path=str(spec), seq_length=4)
    train2, valid2, _ = build_gpt_datasets(cfg2, StandInTokenizer(), [50, 10, 0])
    assert all(_source(train2[i]) == 0 for i in range(50))
    with pytest.raises(ValueError, match="--split cannot be combined"):
        build_gpt_datasets(DataConfig(train_data_path=[a], split="1,0,0", seq_length=4), StandInTokenizer(), [1, 0, 0])


def test_blend_requests_more_than_built_fails_clearly(two_corpora):
    a, b = two_corpora

    from gigatron.core.data.utils import Split

    class Tiny:
        index_split = Split.train

        def __init__(self, n):
            self.n, self.unique_identifiers = n, {"n": n}

        def __len__(self):
            return self.n

    from gigatron.core.data.gpt_dataset import GPTDatasetConfig

    cfg = GPTDatasetConfig(random_seed=1, sequence_length=4)
    with pytest.raises(ValueError, match="draws 50 samples from dataset 0"):
        BlendedDataset([Tiny(10), Tiny(100)], [0.5, 0.5], 100, cfg)
