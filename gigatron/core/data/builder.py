"""Build the train / validation / test datasets from a DataConfig, as Megatron's
BlendedMegatronDatasetBuilder does: one prefix split by ``--split``, a weighted or size-weighted
blend of prefixes split by ``--split``, per-split blends (``--train-data-path`` …) or mock data.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, List, Optional, Sequence, Tuple

from torch.utils.data import Dataset

from .blended_dataset import BlendedDataset
from .config import DataConfig
from .gpt_dataset import GPTDataset, GPTDatasetConfig
from .indexed_dataset import IndexedDataset
from .mock import MockGPTDataset, MockGPTLowLevelDataset
from .utils import (
    Split,
    get_blend_from_list,
    normalize,
    read_data_args_file,
    read_per_split_data_args_file,
    split_indices,
)

logger = logging.getLogger(__name__)

LEGACY_DEFAULT_SPLIT = "969, 30, 1"
MOCK_DEFAULT_SPLIT = "1,1,1"
SIZE_MARGIN_PERCENT = 0.5

Sizes = List[Optional[int]]


def train_valid_test_num_samples(
    train_iters: Optional[int],
    eval_interval: int,
    eval_iters: int,
    global_batch_size: int,
    train_samples: Optional[int] = None,
) -> Tuple[int, int, int]:
    """Samples each split must provide, as Megatron requests them.

    train = ``train_samples`` or ``train_iters * global_batch_size``; validation =
    ``(train_iters // eval_interval + 1) * eval_iters * global_batch_size`` (every evaluation plus the
    final one); test = ``eval_iters * global_batch_size``. With ``train_samples``, ``train_iters`` is
    ``train_samples // global_batch_size``.
    """
    if train_samples is not None:
        train = int(train_samples)
        train_iters = train // global_batch_size
    elif train_iters is not None:
        train = int(train_iters) * global_batch_size
    else:
        raise ValueError("give --train-iters or --train-samples to size the training split")
    if eval_interval is None or eval_interval < 1:
        raise ValueError(f"--eval-interval must be a positive integer, got {eval_interval}")
    valid = (train_iters // eval_interval + 1) * eval_iters * global_batch_size
    test = eval_iters * global_batch_size
    return train, valid, test


def get_size_per_split_per_dataset(
    normalized_weights: Sequence[float], target_size_per_split: Sizes, margin: float = 0.0
) -> List[List[int]]:
    """``ceil(ceil(target * weight) * (1 + margin / 100))`` for every dataset and split."""
    if not math.isclose(sum(normalized_weights), 1.0):
        raise ValueError(f"weights {list(normalized_weights)} are not normalized")
    return [
        [int(math.ceil(math.ceil(t * w) * (1 + margin / 100))) if t is not None else None for t in target_size_per_split]
        for w in normalized_weights
    ]


def gpt_dataset_config_from_data_config(config: DataConfig, tokenizer) -> GPTDatasetConfig:
    """Resolve data sources and the default split; validate the combination."""
    data_path = config.data_path
    if config.data_args_path is not None:
        if data_path:
            raise ValueError("give either --data-path or --data-args-path, not both")
        data_path = read_data_args_file(config.data_args_path)
    per_split = [config.train_data_path, config.valid_data_path, config.test_data_path]
    if config.per_split_data_args_path is not None:
        if any(per_split):
            raise ValueError("give either --per-split-data-args-path or --train/valid/test-data-path, not both")
        per_split = read_per_split_data_args_file(config.per_split_data_args_path)
    has_per_split = any(p for p in per_split)
    sources = [name for name, present in (("--data-path", bool(data_path)), ("per-split data paths", has_per_split),
                                          ("--mock-data", config.mock_data)) if present]
    if len(sources) > 1:
        raise ValueError(f"give one data source, not {' and '.join(sources)}")
    if not sources:
        raise ValueError("no data: give --data-path PREFIX (or --train-data-path etc.), or --mock-data")
    if config.seq_length is None:
        raise ValueError("--seq-length is required to build GPT datasets")
    split = config.split
    if split is None and data_path:
        split = LEGACY_DEFAULT_SPLIT
    if config.mock_data:
        # Megatron-Core always splits its mock documents evenly, whatever --split says; a mock run
        # follows it so that both frameworks draw the same samples.
        if split is not None and split != MOCK_DEFAULT_SPLIT:
            logger.warning("--mock-data splits its documents %s (train, valid, test) as Megatron does; "
                           "--split %s is ignored", MOCK_DEFAULT_SPLIT, split)
        split = MOCK_DEFAULT_SPLIT
    return GPTDatasetConfig(
        random_seed=config.seed,
        sequence_length=config.seq_length,
        tokenizer=tokenizer,
        blend=get_blend_from_list(data_path) if data_path else None,
        blend_per_split=[get_blend_from_list(p) if p else None for p in per_split] if has_per_split else None,
        split=split,
        path_to_cache=config.data_cache_path,
        mmap_bin_files=config.mmap_bin_files,
        mock=config.mock_data,
        reset_position_ids=config.reset_position_ids,
        reset_attention_mask=config.reset_attention_mask,
        eod_mask_loss=config.eod_mask_loss,
        create_attention_mask=config.create_attention_mask_in_dataloader,
    )


class GPTDatasetBuilder:
    """Builds the three splits for one GPTDatasetConfig and the requested sizes."""

    def __init__(self, config: GPTDatasetConfig, sizes: Sizes):
        if len(sizes) != len(Split):
            raise ValueError(f"need one requested size per split (train, valid, test), got {list(sizes)}")
        self.config = config
        self.sizes = [None if s is None else int(s) for s in sizes]

    def build(self) -> List[Optional[Dataset]]:
        c = self.config
        if c.mock:
            return self._splits(None, c.split_matrix, self.sizes)
        if c.blend is not None:
            if c.split_matrix is None:
                raise ValueError("--data-path needs --split (e.g. --split 969,30,1)")
            return self._blend(c.blend, c.split_matrix, self.sizes)
        if c.blend_per_split is not None:
            out: List = [None] * len(Split)
            for i in range(len(Split)):
                blend = c.blend_per_split[i]
                if blend is None or self.sizes[i] == 0:
                    continue
                spoof_split: List = [None] * len(Split)
                spoof_split[i] = (0.0, 1.0)
                spoof_sizes: Sizes = [0] * len(Split)
                spoof_sizes[i] = self.sizes[i]
                out[i] = self._blend(blend, spoof_split, spoof_sizes)[i]
            return out
        raise ValueError("no data source in the dataset config")

    # one prefix, every split
    def _splits(self, prefix: Optional[str], split_matrix, sizes: Sizes) -> List[Optional[GPTDataset]]:
        if self.config.mock:
            low_level = MockGPTLowLevelDataset(self.config.tokenizer)
            cls = MockGPTDataset
        else:
            low_level = IndexedDataset(prefix, mmap=self.config.mmap_bin_files)
            cls = GPTDataset
        num_elements = len(low_level.sequence_lengths)
        out: List[Optional[GPTDataset]] = []
        for i, split in enumerate(Split):
            if split_matrix[i] is None or sizes[i] == 0:
                out.append(None)
                continue
            indices = split_indices(num_elements, split_matrix[i])
            out.append(cls(low_level, prefix, indices, sizes[i], split, self.config))
        return out

    def _blend(self, blend, split_matrix, sizes: Sizes) -> List[Optional[Dataset]]:
        prefixes, weights = blend
        if len(prefixes) == 1 and weights is None:
            return self._splits(prefixes[0], split_matrix, sizes)
        if weights is not None:
            weights = normalize(weights)
            targets = get_size_per_split_per_dataset(weights, sizes)
            buffers = get_size_per_split_per_dataset(weights, sizes, margin=SIZE_MARGIN_PERCENT)
        else:
            targets = None
            buffers = [[None] * len(Split) for _ in prefixes]
        per_dataset = [self._splits(p, split_matrix, [0 if sizes[i] == 0 else b[i] for i in range(len(Split))])
                       for p, b in zip(prefixes, buffers)]
        out: List = [None] * len(Split)
        for i in range(len(Split)):
            if split_matrix[i] is None or sizes[i] == 0:
                continue
            datasets = [d[i] for d in per_dataset]
            if weights is not None:
                if sizes[i] is None:
                    raise ValueError("blending with explicit weights needs a requested number of samples per split")
                size_i = sum(t[i] for t in targets)
                weights_i = weights
            else:
                weights_i = [len(d) for d in datasets]
                size_i = min(sizes[i], sum(weights_i)) if sizes[i] is not None else None
            out[i] = BlendedDataset(datasets, weights_i, size_i, self.config)
        return out


def build_gpt_datasets(
    config: DataConfig,
    tokenizer,
    train_valid_test_num_samples: Sequence[Optional[int]],
    is_built_on_rank: Callable[[], bool] = lambda: True,
    *,
    barrier: Optional[Callable[[], None]] = None,
    rank: int = 0,
):
    """Build ``(train, valid, test)`` datasets; a split with zero weight or zero samples is None.

    ``train_valid_test_num_samples``: samples requested per split (see
    :func:`train_valid_test_num_samples`; None = one full epoch). In a multi-process run pass this
    process's global ``rank`` and a ``barrier`` callable (e.g. ``torch.distributed.barrier``): rank 0
    builds and caches the indices first, the other ranks then load them. Ranks for which
    ``is_built_on_rank()`` is False return ``(None, None, None)`` but still join the barrier.
    """
    gpt_config = gpt_dataset_config_from_data_config(config, tokenizer)
    builder = GPTDatasetBuilder(gpt_config, list(train_valid_test_num_samples))
    return build_rank_0_first(builder, is_built_on_rank, barrier, rank)


def build_rank_0_first(builder, is_built_on_rank: Callable[[], bool], barrier: Optional[Callable[[], None]],
                       rank: int) -> Tuple:
    """Run `builder.build()` on rank 0 first (it writes the index caches), then — after `barrier` —
    on the other ranks (they load them). Ranks where `is_built_on_rank()` is False get
    (None, None, None) but still join the barrier."""
    datasets: List = [None, None, None]
    build_here = bool(is_built_on_rank())
    if rank == 0 and build_here:
        datasets = builder.build()
    if barrier is not None:
        barrier()
    if rank != 0 and build_here:
        datasets = builder.build()
    return tuple(datasets)
