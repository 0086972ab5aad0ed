import glob
import json
import math
import os

import numpy as np
import pytest
import torch

from gigatron.core.data import DataConfig, IndexedDatasetBuilder, build_gpt_datasets, train_valid_test_num_samples
from gigatron.core.data.gpt_dataset import GPTDatasetConfig, build_gpt_indices, get_ltor_masks_and_position_ids
from gigatron.core.data.index_helpers import build_sample_index
from gigatron.core.data.mock import MockGPTLowLevelDataset
from gigatron.core.data.utils import Split, convert_split_vector_to_split_matrix, parse_and_normalize_split

EOD = 1


class StandInTokenizer:
    """Minimal tokenizer stand-in: the datasets only read eod, pad and vocab_size."""

    def __init__(self, eod=EOD, pad=None, vocab_size=1000):
        self.eod, self.pad, self.vocab_size = eod, pad, vocab_size


# ---------------------------------------------------------------------------------------------
# A slow, literal reference of Megatron's index construction (loops are fine for tiny data).
# ---------------------------------------------------------------------------------------------


def ref_document_index(documents, num_epochs, rs, separate_final_epoch):
    if not separate_final_epoch or num_epochs == 1:
        document_index = np.mgrid[0:num_epochs, 0 : len(documents)][1]
        document_index[:] = documents
        document_index = document_index.reshape(-1).astype(np.int32)
        rs.shuffle(document_index)
        return document_index
    first = ref_document_index(documents, num_epochs - 1, rs, False)
    last = ref_document_index(documents, 1, rs, False)
    return np.concatenate((first, last))


def ref_sample_index(sizes, document_index, seq_length, num_epochs, tokens_per_epoch, drop_last, extra):
    if drop_last:
        num_samples = (num_epochs * tokens_per_epoch - extra) // seq_length
    else:
        num_samples = math.ceil((num_epochs * tokens_per_epoch - extra) / seq_length)
    out = np.zeros((num_samples + 1, 2), dtype=np.int64)
    row, doc_pos, doc_offset = 1, 0, 0
    while row <= num_samples:
        remaining = seq_length + extra
        while remaining != 0:
            doc_len = sizes[document_index[doc_pos]] - doc_offset
            remaining -= doc_len
            if remaining <= 0:
                doc_offset += remaining + doc_len - extra
                remaining = 0
            else:
                if doc_pos == len(document_index) - 1:
                    assert row == num_samples
                    doc_offset = sizes[document_index[doc_pos]] - extra
                    break
                doc_pos += 1
                doc_offset = 0
        out[row] = (doc_pos, doc_offset)
        row += 1
    return out


def ref_shuffle_index(num_samples, total_size, rs):
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(0, num_samples, 1, dtype=dtype)
    rs.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, 1, dtype=dtype)
    rs.shuffle(last)
    return np.concatenate((first, last))


def ref_gpt_indices(sizes, indices, num_samples, seq_length, seed, drop_last=True, extra=1):
    tokens_per_epoch = int(sum(int(sizes[i]) for i in indices))
    num_epochs, num_tokens = 1, tokens_per_epoch
    if num_samples is not None:
        while num_tokens < num_samples * seq_length + extra:
            num_epochs += 1
            num_tokens += tokens_per_epoch
    separate = False
    sans = 0
    if num_epochs > 1:
        sans = ((num_epochs - 1) * tokens_per_epoch - extra) // seq_length
        from_final = num_samples - sans
        per_epoch = (tokens_per_epoch - extra) // seq_length
        separate = from_final < int(0.80 * per_epoch)
    rs = np.random.RandomState(seed)
    document_index = ref_document_index(indices, num_epochs, rs, separate)
    sample_index = ref_sample_index(sizes, document_index, seq_length, num_epochs, tokens_per_epoch, drop_last, extra)
    total = sample_index.shape[0] - 1
    shuffle_index = ref_shuffle_index(sans if separate else total, total, rs)
    return document_index, sample_index, shuffle_index, num_epochs, separate


def ref_ltor_masks(data, eod, reset_position_ids, reset_attention_mask, eod_mask_loss):
    """Megatron's loop formulation."""
    s = data.numel()
    attention_mask = torch.tril(torch.ones((s, s))).unsqueeze(0)
    loss_mask = torch.ones(s, dtype=torch.float)
    if eod_mask_loss:
        loss_mask[data == eod] = 0.0
    position_ids = torch.arange(s, dtype=torch.long)
    if reset_position_ids or reset_attention_mask:
        eod_index = position_ids[data == eod].clone()
        prev = 0
        for j in range(eod_index.numel()):
            i = int(eod_index[j])
            if reset_attention_mask:
                attention_mask[0, (i + 1) :, : (i + 1)] = 0
            if reset_position_ids:
                position_ids[(i + 1) :] -= i + 1 - prev
                prev = i + 1
    return attention_mask < 0.5, loss_mask, position_ids


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1234])
@pytest.mark.parametrize("seq_length", [1, 2, 7, 64])
@pytest.mark.parametrize("num_samples", [None, 1, 50, 333, 1000])
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("extra", [1, 0])
def test_indices_match_reference(seed, seq_length, num_samples, drop_last, extra):
    rng = np.random.default_rng(seed + seq_length)
    sizes = rng.integers(1, 40, size=60).astype(np.int32)
    sizes[rng.integers(0, 60, size=5)] = 0  # empty sequences in the middle
    indices = np.arange(10, 50, dtype=np.int32)
    if not drop_last:  # Megatron's end row for a kept partial sample assumes a non-empty last document
        sizes[indices] = np.maximum(sizes[indices], 1)
    ours = build_gpt_indices(sizes, indices, num_samples, seq_length, seed, drop_last, bool(extra))
    doc, smp, shf, _, _ = ref_gpt_indices(sizes, indices, num_samples, seq_length, seed, drop_last, extra)
    assert ours["document_index"].dtype == np.int32
    np.testing.assert_array_equal(ours["document_index"], doc)
    assert ours["sample_index"].dtype == np.int32
    np.testing.assert_array_equal(ours["sample_index"], smp)
    assert ours["shuffle_index"].dtype == np.uint32
    np.testing.assert_array_equal(ours["shuffle_index"], shf)


def test_epochs_and_separate_final_epoch():
    sizes = np.full(100, 10, dtype=np.int32)  # 1000 tokens per epoch, 99 samples of 10 per epoch
    indices = np.arange(100, dtype=np.int32)
    # 2.1 epochs needed: final epoch holds few samples -> kept separate
    _, _, shf, epochs, separate = ref_gpt_indices(sizes, indices, 210, 10, 3)
    assert epochs == 3 and separate
    out = build_gpt_indices(sizes, indices, 210, 10, 3)
    np.testing.assert_array_equal(out["shuffle_index"], shf)
    doc = out["document_index"]
    assert len(doc) == 300
    # the first two epochs are shuffled together, the last on its own
    assert sorted(doc[200:].tolist()) == list(range(100))
    sans = (2 * 1000 - 1) // 10
    assert sorted(out["shuffle_index"][:sans].tolist()) == list(range(sans))
    assert out["shuffle_index"][sans:].min() == sans
    # 2.9 epochs: final epoch large enough -> shuffled as one
    _, _, _, epochs, separate = ref_gpt_indices(sizes, indices, 290, 10, 3)
    assert epochs == 3 and not separate
    # exactly enough tokens for one epoch (num_samples * L + 1 <= tokens)
    _, _, _, epochs, _ = ref_gpt_indices(sizes, indices, 99, 10, 3)
    assert epochs == 1
    assert len(build_gpt_indices(sizes, indices, 99, 10, 3)["shuffle_index"]) == 99
    assert len(build_gpt_indices(sizes, indices, 100, 10, 3)["document_index"]) == 200


def test_large_index_is_vectorized_and_matches_on_prefix():
    rng = np.random.default_rng(5)
    sizes = rng.integers(1, 3000, size=50000).astype(np.int32)
    indices = np.arange(50000, dtype=np.int32)
    out = build_gpt_indices(sizes, indices, 200000, 1024, 7)
    doc, smp, shf, _, _ = ref_gpt_indices(sizes, indices, 200000, 1024, 7)
    np.testing.assert_array_equal(out["sample_index"], smp)
    np.testing.assert_array_equal(out["document_index"], doc)
    np.testing.assert_array_equal(out["shuffle_index"], shf)


def test_partial_sample_with_trailing_empty_document_points_at_last_token():
    sizes = np.array([5, 0], dtype=np.int32)
    doc_index = np.array([0, 1], dtype=np.int32)
    smp = build_sample_index(sizes, doc_index, 3, 1, 5, drop_last_partial_sequence=False)
    # samples: tokens [0,4) and a partial one from 3; its end row names the last token (doc 0, offset 4)
    assert smp.tolist() == [[0, 0], [0, 3], [0, 4]]


def test_masks_match_reference():
    rng = np.random.default_rng(0)
    for trial in range(30):
        data = torch.from_numpy(rng.integers(0, 4, size=int(rng.integers(1, 40))))
        for rp in (False, True):
            for ra in (False, True):
                for em in (False, True):
                    am, lm, pos = get_ltor_masks_and_position_ids(data, 1, rp, ra, em, True)
                    ram, rlm, rpos = ref_ltor_masks(data, 1, rp, ra, em)
                    assert am.dtype == torch.bool and am.shape == (1, data.numel(), data.numel())
                    assert torch.equal(am, ram) and torch.equal(lm, rlm) and torch.equal(pos, rpos)
                    assert lm.dtype == torch.float32 and pos.dtype == torch.int64


# ---------------------------------------------------------------------------------------------
# datasets on files
# ---------------------------------------------------------------------------------------------


def write_dataset(prefix, docs, dtype=np.uint16):
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in docs:
        b.add_item(np.asarray(d))
        b.end_document()
    b.finalize(prefix + ".idx")


def random_token_docs(rng, n, low=2, high=500, eod=EOD, maxlen=60):
    docs = []
    for _ in range(n):
        L = int(rng.integers(1, maxlen))
        d = rng.integers(low, high, size=L)
        d[-1] = eod
        docs.append(d)
    return docs


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(11)
    docs = random_token_docs(rng, 400)
    prefix = str(tmp_path / "data" / "corpus_text_document")
    os.makedirs(os.path.dirname(prefix))
    write_dataset(prefix, docs)
    return prefix, docs


def test_samples_reproduce_the_token_stream(corpus):
    prefix, docs = corpus
    cfg = DataConfig(data_path=[prefix], split="80,20,0", seq_length=16, seed=9)
    train, valid, test = build_gpt_datasets(cfg, StandInTokenizer(), [500, 40, 0])
    assert test is None
    for ds in (train, valid):
        stream = np.concatenate([docs[int(i)] for i in ds.document_index])
        inverse = np.argsort(np.asarray(ds.shuffle_index))
        for j in range(len(ds)):
            sample = ds[int(inverse[j])]  # the j-th sample in stream order
            text = torch.cat([sample["tokens"], sample["labels"][-1:]]).numpy()
            np.testing.assert_array_equal(text, stream[j * 16 : j * 16 + 17])
            np.testing.assert_array_equal(sample["labels"][:-1].numpy(), sample["tokens"][1:].numpy())
        # consecutive samples overlap by one token
        a, b = ds[int(inverse[0])], ds[int(inverse[1])]
        assert int(a["labels"][-1]) == int(b["tokens"][0])
        assert len(ds) >= (500 if ds is train else 40)


def test_split_proportions(corpus):
    prefix, docs = corpus
    n = len(docs)
    with pytest.raises(ValueError, match="test split of .*corpus_text_document: the split has 0 sequences"):
        build_gpt_datasets(DataConfig(data_path=[prefix], split="969, 30, 1", seq_length=8), StandInTokenizer(),
                           [None, None, None])
    for split in ["90, 8, 2", "80,20", "1,1,1", "0.6 0.3 0.1", "90,0,10"]:
        cfg = DataConfig(data_path=[prefix], split=split, seq_length=8)
        datasets = build_gpt_datasets(cfg, StandInTokenizer(), [None, None, None])
        vec = parse_and_normalize_split(split)
        ends = np.cumsum([0.0] + vec)
        for i, ds in enumerate(datasets):
            beg, end = int(round(ends[i] * n)), int(round(ends[i + 1] * n))
            if vec[i] == 0:
                assert ds is None
                continue
            assert ds.indices.tolist() == list(range(beg, end))
            assert ds.indices.dtype == np.int32
    assert convert_split_vector_to_split_matrix([0.969, 0.03, 0.001]) == [
        (0, 0.969), (0.969, 0.969 + 0.03), (0.969 + 0.03, 0.969 + 0.03 + 0.001)]
    assert parse_and_normalize_split("2") == [1.0, 0.0, 0.0]


def test_default_split_and_cache_location(tmp_path):
    prefix = str(tmp_path / "big" / "corpus_text_document")
    os.makedirs(os.path.dirname(prefix))
    write_dataset(prefix, random_token_docs(np.random.default_rng(3), 2000, maxlen=10))
    cfg = DataConfig(data_path=[prefix], seq_length=8)
    train, valid, test = build_gpt_datasets(cfg, StandInTokenizer(), [10, 10, 10])
    assert train.config.split == "969, 30, 1"
    cache_dir = os.path.join(prefix, "cache", "GPTDataset_indices")
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(cache_dir, "*")))
    assert len(names) == 12
    for split_name in ("train", "valid", "test"):
        for affix in ("description.txt", "document_index.npy", "sample_index.npy", "shuffle_index.npy"):
            assert sum(n.endswith(f"-GPTDataset-{split_name}-{affix}") for n in names) == 1
    assert not any(".tmp" in n for n in names)
    desc = json.load(open(glob.glob(os.path.join(cache_dir, "*-train-description.txt"))[0]))
    assert desc["class"] == "GPTDataset" and desc["random_seed"] == 1234 and desc["sequence_length"] == 8
    assert f"{train.unique_description_hash}-GPTDataset-train-description.txt" in names


def test_cache_reuse_and_invalidation(corpus, tmp_path):
    prefix, _ = corpus
    cache = str(tmp_path / "idxcache")
    base = dict(data_path=[prefix], split="90,10,0", seq_length=8, data_cache_path=cache)
    first = build_gpt_datasets(DataConfig(**base), StandInTokenizer(), [100, 10, 0])
    assert first[0].built_anew_on_cache_miss
    again = build_gpt_datasets(DataConfig(**base), StandInTokenizer(), [100, 10, 0])
    assert not again[0].built_anew_on_cache_miss and not again[1].built_anew_on_cache_miss
    np.testing.assert_array_equal(again[0].shuffle_index, first[0].shuffle_index)
    assert torch.equal(again[0][5]["tokens"], first[0][5]["tokens"])
    for change in (dict(seed=7), dict(seq_length=9), dict(split="80,20,0"), dict(reset_position_ids=True)):
        ds = build_gpt_datasets(DataConfig(**{**base, **change}), StandInTokenizer(), [100, 10, 0])
        assert ds[0].built_anew_on_cache_miss, change
    changed_samples = build_gpt_datasets(DataConfig(**base), StandInTokenizer(), [101, 10, 0])
    assert changed_samples[0].built_anew_on_cache_miss


def test_incomplete_cache_entry_is_rebuilt(corpus, tmp_path):
    prefix, _ = corpus
    cache = str(tmp_path / "c")
    cfg = DataConfig(data_path=[prefix], split="1,0,0", seq_length=8, data_cache_path=cache)
    build_gpt_datasets(cfg, StandInTokenizer(), [20, 0, 0])
    (desc,) = glob.glob(os.path.join(cache, "*-description.txt"))
    os.remove(desc)  # as if the build had been interrupted before the description was written
    (train, _, _) = build_gpt_datasets(cfg, StandInTokenizer(), [20, 0, 0])
    assert train.built_anew_on_cache_miss


def test_rank_zero_builds_others_load(corpus, tmp_path):
    prefix, _ = corpus
    cfg = DataConfig(data_path=[prefix], split="1,0,0", seq_length=8, data_cache_path=str(tmp_path / "c"))
    events = []
    r0 = build_gpt_datasets(cfg, StandInTokenizer(), [30, 0, 0], barrier=lambda: events.append("barrier"), rank=0)
    r1 = build_gpt_datasets(cfg, StandInTokenizer(), [30, 0, 0], barrier=lambda: events.append("barrier"), rank=1)
    assert r0[0].built_anew_on_cache_miss and not r1[0].built_anew_on_cache_miss
    assert events == ["barrier", "barrier"]
    skipped = build_gpt_datasets(cfg, StandInTokenizer(), [30, 0, 0], lambda: False, barrier=lambda: None, rank=3)
    assert skipped == (None, None, None)


def test_padding_and_pad_masking(tmp_path):
    prefix = str(tmp_path / "p")
    write_dataset(prefix, [np.array([5, 6, 7, 8, 9, 10, 11, 1])])
    cfg = GPTDatasetConfig(random_seed=1, sequence_length=5, tokenizer=StandInTokenizer(pad=99),
                           split="0,1,0", drop_last_partial_validation_sequence=False, blend=([prefix], None))
    from gigatron.core.data.builder import GPTDatasetBuilder

    _, valid, _ = GPTDatasetBuilder(cfg, [None, None, None]).build()
    assert len(valid) == 2  # ceil((8 - 1) / 5)
    samples = [valid[i] for i in range(2)]
    partial = [s for s in samples if int(s["loss_mask"].sum()) < 5][0]
    # the partial sample holds tokens 10, 11, 1 then padding (id 0, no loss)
    assert partial["tokens"].tolist() == [10, 11, 1, 0, 0]
    assert partial["labels"].tolist() == [11, 1, 0, 0, 0]
    assert partial["loss_mask"].tolist() == [1, 1, 0, 0, 0]
    padded = valid[None]
    assert float(padded["loss_mask"].sum()) == 0.0


def test_eod_flags_on_samples(corpus):
    prefix, _ = corpus
    cfg = DataConfig(data_path=[prefix], split="1,0,0", seq_length=32, reset_position_ids=True,
                     reset_attention_mask=True, eod_mask_loss=True)
    (train, _, _) = build_gpt_datasets(cfg, StandInTokenizer(), [20, 0, 0])
    for i in range(20):
        s = train[i]
        am, lm, pos = ref_ltor_masks(s["tokens"], EOD, True, True, True)
        assert torch.equal(s["attention_mask"], am) and torch.equal(s["loss_mask"], lm)
        assert torch.equal(s["position_ids"], pos)
    no_mask = build_gpt_datasets(
        DataConfig(data_path=[prefix], split="1,0,0", seq_length=32, create_attention_mask_in_dataloader=False),
        StandInTokenizer(), [5, 0, 0])[0]
    assert "attention_mask" not in no_mask[0]


def test_mock_dataset():
    tok = StandInTokenizer(eod=0)
    low = MockGPTLowLevelDataset(tok)
    lengths = np.random.default_rng(0).integers(1, 4096, size=100000, dtype=np.int32)
    np.testing.assert_array_equal(low.sequence_lengths, lengths)
    n = int(lengths[3])
    assert n > 1000 and low[3].tolist() == [i % 1000 for i in range(1, n)] + [0]  # ids wrap at vocab_size
    train, valid, test = build_gpt_datasets(DataConfig(mock_data=True, seq_length=128), tok, [64, 8, 8])
    assert train.config.split == "1,1,1"
    # Megatron-Core splits mock documents evenly whatever --split says
    assert build_gpt_datasets(DataConfig(mock_data=True, seq_length=128, split="98,1,1"), tok,
                              [64, 8, 8])[0].config.split == "1,1,1"
    with pytest.raises(ValueError, match="vocab_size"):
        MockGPTLowLevelDataset(StandInTokenizer(eod=0, vocab_size=None))
    assert train[0]["tokens"].shape == (128,)
    assert not train.built_anew_on_cache_miss or train.unique_identifiers["dataset_path"] is None


def test_num_samples_requested():
    assert train_valid_test_num_samples(1000, 100, 10, 32) == (32000, 11 * 10 * 32, 10 * 32)
    assert train_valid_test_num_samples(None, 100, 10, 32, train_samples=6400) == (6400, 3 * 10 * 32, 320)
    with pytest.raises(ValueError, match="train-iters"):
        train_valid_test_num_samples(None, 100, 10, 32)


def test_config_errors(corpus):
    prefix, _ = corpus
    tok = StandInTokenizer()
    with pytest.raises(ValueError, match="--split cannot be combined"):
        build_gpt_datasets(DataConfig(train_data_path=[prefix], split="1,1,1", seq_length=8), tok, [1, 1, 1])
    with pytest.raises(ValueError, match="one data source"):
        build_gpt_datasets(DataConfig(data_path=[prefix], mock_data=True, seq_length=8), tok, [1, 1, 1])
    with pytest.raises(ValueError, match="seq-length"):
        build_gpt_datasets(DataConfig(data_path=[prefix]), tok, [1, 1, 1])
    with pytest.raises(FileNotFoundError, match="missing.idx"):
        build_gpt_datasets(DataConfig(data_path=[prefix + "missing"], seq_length=8), tok, [1, 1, 1])


def test_split_enum_names():
    assert [s.name for s in Split] == ["train", "valid", "test"]


# ---------------------------------------------------------------------------------------------
# several processes: rank 0 builds the cache, the others load it after the barrier
# ---------------------------------------------------------------------------------------------


def _build_on_ranks(rank, world_size, prefix, cache_dirs):
    import torch.distributed as dist

    cfg = DataConfig(data_path=[prefix], split="90,10,0", seq_length=8, data_cache_path=cache_dirs[rank])
    train, valid, _ = build_gpt_datasets(cfg, StandInTokenizer(), [200, 20, 0], barrier=dist.barrier,
                                         rank=dist.get_rank())
    return {
        "built": [train.built_anew_on_cache_miss, valid.built_anew_on_cache_miss],
        "shuffle": np.asarray(train.shuffle_index).tolist(),
        "tokens": torch.stack([train[i]["tokens"] for i in range(0, 200, 17)]),
    }


def test_rank_zero_builds_and_others_load_in_processes(corpus, tmp_path):
    from tests.parallel.harness import run_distributed

    prefix, _ = corpus
    shared = str(tmp_path / "shared_cache")
    r0, r1 = run_distributed(_build_on_ranks, 2, prefix, [shared, shared])
    assert r0["built"] == [True, True] and r1["built"] == [False, False]
    assert r0["shuffle"] == r1["shuffle"] and torch.equal(r0["tokens"], r1["tokens"])
    # node-local cache directories (not shared): the other rank rebuilds the same indices itself
    local = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    r0, r1 = run_distributed(_build_on_ranks, 2, prefix, local)
    assert r0["built"] == [True, True] and r1["built"] == [True, True]
    assert r0["shuffle"] == r1["shuffle"] and torch.equal(r0["tokens"], r1["tokens"])


# ---------------------------------------------------------------------------------------------
# token ids outside the vocabulary
# ---------------------------------------------------------------------------------------------


def _crafted_dataset(tmp_path, bad_document, bad_id):
    """Five documents of two sequences each (ids 2..40); one token of `bad_document` is `bad_id`."""
    prefix = str(tmp_path / "crafted_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for d in range(5):
        first = np.arange(2, 10, dtype=np.int32) + d
        second = np.arange(20, 30, dtype=np.int32) + d
        if d == bad_document:
            second[4] = bad_id
        builder.add_document(np.concatenate([first, second]), [len(first), len(second)])
    builder.finalize(prefix + ".idx")
    builder.close()
    return prefix


def _all_samples(dataset):
    for i in range(len(dataset)):
        dataset[i]


@pytest.mark.parametrize("bad_id", [100, 70000, -3])
def test_token_id_outside_the_vocabulary_names_file_document_and_size(tmp_path, bad_id):
    from gigatron.core.data import TokenIdError
    from gigatron.core.tokenizers import NullTokenizer

    prefix = _crafted_dataset(tmp_path, bad_document=3, bad_id=bad_id)
    tokenizer = NullTokenizer(99)  # ids 0..99: 100 ids, the last one the end-of-document
    config = DataConfig(data_path=[prefix], split="1,0,0", seq_length=6, data_cache_path=str(tmp_path / "cache"))
    train, _, _ = build_gpt_datasets(config, tokenizer, [None, 0, 0])
    with pytest.raises(TokenIdError) as error:
        _all_samples(train)
    message = str(error.value)
    assert f"{prefix}.bin: document 3 (sequence 7) holds token id {bad_id}" in message
    assert "vocabulary of 100 ids (0..99)" in message and "tokenizer" in message
    assert isinstance(error.value, ValueError)  # a user error: one line from the command-line tools


def test_token_ids_inside_the_vocabulary_pass_and_the_size_can_be_given(tmp_path):
    from gigatron.core.data import TokenIdError

    prefix = _crafted_dataset(tmp_path, bad_document=None, bad_id=0)
    config = DataConfig(data_path=[prefix], split="1,0,0", seq_length=6, data_cache_path=str(tmp_path / "cache"))
    train, _, _ = build_gpt_datasets(config, StandInTokenizer(vocab_size=34), [None, 0, 0])  # largest id: 33
    _all_samples(train)
    assert int(max(train[i]["labels"].max() for i in range(len(train)))) == 33
    # an explicit vocab_size in the dataset config (e.g. the model's embedding rows) overrides the tokenizer's
    import dataclasses

    from gigatron.core.data.builder import GPTDatasetBuilder, gpt_dataset_config_from_data_config

    gpt_config = gpt_dataset_config_from_data_config(config, StandInTokenizer(vocab_size=34))
    (train, _, _) = GPTDatasetBuilder(dataclasses.replace(gpt_config, vocab_size=30), [None, 0, 0]).build()
    with pytest.raises(TokenIdError, match=r"crafted_text_document\.bin: document \d \(sequence \d\) holds token id 3\d"):
        _all_samples(train)
