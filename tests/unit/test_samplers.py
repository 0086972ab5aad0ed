import numpy as np
import pytest
import torch

from gigatron.core.data import (
    DataConfig,
    IndexedDatasetBuilder,
    PretrainingSampler,
    RandomSampler,
    build_gpt_datasets,
    build_pretraining_data_loader,
    collate_samples,
)


def test_pretraining_sampler_shards_consecutive_global_batches():
    mbs, dp, total = 3, 4, 100
    per_rank = [list(PretrainingSampler(total, 0, mbs, r, dp)) for r in range(dp)]
    num_steps = total // (mbs * dp)
    assert all(len(p) == num_steps for p in per_rank)
    for step in range(num_steps):
        glued = [i for r in range(dp) for i in per_rank[r][step]]
        assert glued == list(range(step * mbs * dp, (step + 1) * mbs * dp))


def test_pretraining_sampler_resume_and_partial():
    mbs, dp, total = 2, 3, 50
    for r in range(dp):
        full = list(PretrainingSampler(total, 0, mbs, r, dp))
        resumed = list(PretrainingSampler(total, 18, mbs, r, dp))
        assert resumed == full[3:]
    # the last incomplete global batch: dropped by default, sliced per rank otherwise
    last = [list(PretrainingSampler(total, 0, mbs, r, dp, drop_last=False))[-1] for r in range(dp)]
    assert last == [[48, 49], [], []]
    with pytest.raises(ValueError, match="consumed samples"):
        PretrainingSampler(total, 50, mbs, 0, dp)
    with pytest.raises(ValueError, match="rank 3"):
        PretrainingSampler(total, 0, mbs, 3, dp)


@pytest.mark.parametrize("sharding", [True, False])
def test_random_sampler_epochs_and_resume(sharding):
    mbs, dp, total = 2, 2, 43
    samplers = [RandomSampler(None, total, 0, mbs, r, dp, data_sharding=sharding) for r in range(dp)]
    epoch0 = [list(s) for s in samplers]
    flat = [i for rank in epoch0 for batch in rank for i in batch]
    assert len(flat) == len(set(flat)) == (total // (mbs * dp)) * mbs * dp
    assert all(0 <= i < total for i in flat)
    assert samplers[0].consumed_samples == len(flat)
    epoch1 = [list(s) for s in samplers]  # iterating again continues with the next epoch
    assert epoch1 != epoch0
    # resuming mid-epoch from consumed samples gives the rest of the same order
    for r in range(dp):
        resumed = list(RandomSampler(None, total, 3 * mbs * dp, mbs, r, dp, data_sharding=sharding))
        assert resumed == epoch0[r][3:]
        next_epoch = list(RandomSampler(None, total, len(flat), mbs, r, dp, data_sharding=sharding))
        assert next_epoch == epoch1[r]
    if sharding:  # each rank permutes its own contiguous bucket
        bucket = (total // (mbs * dp)) * mbs
        for r in range(dp):
            ids = [i for b in epoch0[r] for i in b]
            assert sorted(ids) == list(range(r * bucket, (r + 1) * bucket))


class Tok:
    """Minimal tokenizer stand-in: the datasets only read eod, pad and vocab_size."""

    eod, pad, vocab_size = 0, None, 100


@pytest.fixture
def small_corpus(tmp_path):
    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "corpus")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(100):
        b.add_item(np.append(rng.integers(1, 100, size=int(rng.integers(1, 30))), 0))
        b.end_document()
    b.finalize(prefix + ".idx")
    return prefix


def test_collate_and_data_loader_match_dataset(small_corpus):
    train, _, _ = build_gpt_datasets(DataConfig(data_path=[small_corpus], split="1,0,0", seq_length=16), Tok(),
                                     [64, 0, 0])
    batches = list(zip(range(3), build_pretraining_data_loader(train, 8, 2, 1, 2, num_workers=0)))
    for step, batch in batches:
        assert batch["tokens"].shape == (2, 16) and batch["attention_mask"].shape == (2, 1, 16, 16)
        assert batch["loss_mask"].dtype == torch.float32 and batch["position_ids"].dtype == torch.int64
        # rank 1 of 2, micro-batch 2, resumed after 8 samples: global batch starts at 8 + 4*step
        for row, idx in enumerate(range(8 + 4 * step + 2, 8 + 4 * step + 4)):
            assert torch.equal(batch["tokens"][row], train[idx]["tokens"])
    cyclic = build_pretraining_data_loader(train, 0, 2, 0, 2, num_workers=0, dataloader_type="cyclic")
    first = next(iter(cyclic))
    assert first["tokens"].shape == (2, 16)
    assert build_pretraining_data_loader(train, 0, 2, 0, 1, dataloader_type="external") is train
    assert build_pretraining_data_loader(None, 0, 2, 0, 1) is None
    with pytest.raises(ValueError, match="dataloader-type"):
        build_pretraining_data_loader(train, 0, 2, 0, 1, dataloader_type="bogus")
    mixed = collate_samples([{"a": torch.zeros(2), "dataset_id": 1}, {"a": torch.ones(2), "dataset_id": 0}])
    assert mixed["a"].shape == (2, 2) and mixed["dataset_id"].tolist() == [1, 0]


def test_data_loader_with_worker(small_corpus):
    train, _, _ = build_gpt_datasets(DataConfig(data_path=[small_corpus], split="1,0,0", seq_length=8), Tok(),
                                     [16, 0, 0])
    loader = build_pretraining_data_loader(train, 0, 4, 0, 1, num_workers=1)
    batch = next(iter(loader))
    for row in range(4):
        assert torch.equal(batch["tokens"][row], train[row]["tokens"])
