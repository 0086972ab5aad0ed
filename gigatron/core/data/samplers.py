"""Batch samplers that know the data-parallel rank and how many samples were already consumed.

Both follow Megatron's pretraining samplers exactly, so a run resumed from a checkpoint (with its
``consumed_samples``) sees the same samples on the same ranks as an uninterrupted run.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Sequence

import torch


def _check_common(total_samples: int, micro_batch_size: int, data_parallel_rank: int, data_parallel_size: int):
    if total_samples <= 0:
        raise ValueError(f"no samples to iterate over (total_samples={total_samples}); is the dataset empty?")
    if micro_batch_size <= 0:
        raise ValueError(f"--micro-batch-size must be positive, got {micro_batch_size}")
    if data_parallel_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
        raise ValueError(f"data-parallel rank {data_parallel_rank} is not in [0, {data_parallel_size})")


class PretrainingSampler:
    """Sequential sampler: global batch ``b`` is indices ``[consumed + b*mbs*dp, consumed + (b+1)*mbs*dp)``
    and rank ``r`` takes its slice ``[r*mbs, (r+1)*mbs)`` of it. Yields one list of indices per micro-batch."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True):
        _check_common(total_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(
                f"consumed samples ({consumed_samples}) must be in [0, {total_samples}): the dataset is used up; "
                f"train for fewer samples or build the datasets with more (--train-iters/--train-samples)"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        return self.total_samples

    def get_start_end_idx(self):
        start = self.data_parallel_rank * self.micro_batch_size
        return start, start + self.micro_batch_size

    def __iter__(self) -> Iterator[List[int]]:
        step = self.micro_batch_times_data_parallel_size
        start, end = self.get_start_end_idx()
        first = self.consumed_samples
        num_full = (self.total_samples - first) // step
        for b in range(num_full):
            base = first + b * step
            yield list(range(base + start, base + end))
        tail = first + num_full * step
        if tail < self.total_samples and not self.drop_last:
            yield list(range(tail, self.total_samples))[start:end]


class RandomSampler:
    """Shuffled sampler for ``--dataloader-type cyclic``: each epoch is a ``torch.randperm`` seeded
    with the epoch number; an iteration covers the rest of the current epoch (derived from
    ``consumed_samples``), so iterating again continues with the next epoch.

    With ``data_sharding`` (Megatron's default) each rank permutes its own contiguous bucket of the
    dataset; without it one permutation of the whole dataset is dealt out round-robin to the ranks.
    """

    def __init__(self, dataset, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, data_sharding: bool = True):
        _check_common(total_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        self.dataset = dataset
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.data_sharding = data_sharding
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.last_batch_size = total_samples % self.micro_batch_times_data_parallel_size
        if total_samples < self.micro_batch_times_data_parallel_size:
            raise ValueError(
                f"{total_samples} samples cannot fill one global micro-batch of {micro_batch_size} x "
                f"{data_parallel_size} ranks"
            )

    def __len__(self) -> int:
        return self.total_samples

    def __iter__(self) -> Iterator[List[int]]:
        active_total_samples = self.total_samples - self.last_batch_size
        self.epoch = self.consumed_samples // active_total_samples
        current_epoch_samples = self.consumed_samples % active_total_samples
        if current_epoch_samples % self.micro_batch_times_data_parallel_size != 0:
            raise ValueError(
                f"consumed samples ({self.consumed_samples}) is not a multiple of micro-batch x data-parallel "
                f"size ({self.micro_batch_times_data_parallel_size}) within the epoch"
            )
        g = torch.Generator()
        g.manual_seed(self.epoch)
        if self.data_sharding:
            bucket_size = (self.total_samples // self.micro_batch_times_data_parallel_size) * self.micro_batch_size
            bucket_offset = current_epoch_samples // self.data_parallel_size
            start = self.data_parallel_rank * bucket_size
            order = torch.randperm(bucket_size, generator=g)[bucket_offset:] + start
        else:
            full_bucket_size = (self.total_samples // self.micro_batch_size) * self.micro_batch_size
            order = torch.randperm(full_bucket_size, generator=g)[current_epoch_samples:]
            order = order[self.data_parallel_rank :: self.data_parallel_size]
        order = order.tolist()
        mbs = self.micro_batch_size
        for b in range(len(order) // mbs):  # a last incomplete micro-batch is dropped
            self.consumed_samples += self.micro_batch_times_data_parallel_size
            yield order[b * mbs : (b + 1) * mbs]


def collate_samples(samples: Sequence[Dict]) -> Dict[str, torch.Tensor]:
    """Stack a list of sample dicts into a dict of batched tensors (``[b, ...]``)."""
    if len(samples) == 0:
        raise ValueError("cannot collate an empty micro-batch")
    out: Dict[str, torch.Tensor] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)  # [b, ...]
        else:
            out[key] = torch.as_tensor(values)  # [b]
    return out


def build_pretraining_data_loader(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                                  num_workers: int = 2, dataloader_type: str = "single", data_sharding: bool = True):
    """A torch DataLoader over ``dataset`` for this data-parallel rank, resuming at ``consumed_samples``.

    ``single``: :class:`PretrainingSampler`; ``cyclic``: :class:`RandomSampler` (iterate the loader
    again for the next epoch); ``external``: the dataset is already an iterator and is returned as is.
    Returns None for a None dataset.
    """
    if dataset is None:
        return None
    if dataloader_type == "external":
        return dataset
    if dataloader_type == "single":
        sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    elif dataloader_type == "cyclic":
        sampler = RandomSampler(dataset, len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size,
                                data_sharding=data_sharding)
    else:
        raise ValueError(f"--dataloader-type {dataloader_type!r} is not one of single, cyclic, external")
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_samples,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
