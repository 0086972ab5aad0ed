"""A weighted interleaving of several datasets of the same split (Megatron's BlendedDataset)."""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from .cache import IndexCache, build_or_load, describe
from .index_helpers import build_blending_indices, build_exhaustive_blending_indices
from .utils import normalize

logger = logging.getLogger(__name__)


class BlendedDataset(torch.utils.data.Dataset):
    """Sample ``i`` is sample ``dataset_sample_index[i]`` of dataset ``dataset_index[i]``.

    With ``size`` given, ``weights`` are normalized and ``size`` samples are drawn greedily so each
    dataset's share tracks its weight. With ``size=None``, ``weights`` must be the datasets' sizes and
    every sample of every dataset is used once (exhaustive blending).
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: Optional[int], config):
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        if not 0 < len(datasets) < 32767:
            raise ValueError(f"a blend needs 1 to 32766 datasets, got {len(datasets)}")
        if any(d.index_split != datasets[0].index_split for d in datasets):
            raise ValueError("all datasets of a blend must belong to the same split")
        if not all(w > 0 for w in weights):
            raise ValueError(f"blend weights must be positive, got {list(weights)}")
        if size is None and not all(float(w) == int(w) for w in weights):
            raise ValueError("exhaustive blending (no size) needs integer weights (the dataset sizes)")
        if len(datasets) == 1:
            logger.warning("building a BlendedDataset of a single dataset")
        self.datasets = list(datasets)
        self.split = self.datasets[0].index_split
        self.weights = normalize(weights) if size is not None else [int(w) for w in weights]
        self.size = size
        self.config = config
        self.unique_identifiers = {
            "class": type(self).__name__,
            "datasets": [d.unique_identifiers for d in self.datasets],
            "split": self.split.name,
            "weights": self.weights,
            "size": self.size,
        }
        self.unique_description = describe(self.unique_identifiers)
        cache = IndexCache(
            config.path_to_cache, type(self).__name__, self.split.name, self.unique_description,
            ("dataset_index", "dataset_sample_index"),
        )
        self.unique_description_hash = cache.hash
        arrays, self.built_anew_on_cache_miss = build_or_load(cache, self._build, f"{type(self).__name__} {self.split.name}")
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        self._check_bounds()

    def _build(self) -> Dict[str, np.ndarray]:
        if self.size is not None:
            dataset_index, dataset_sample_index = build_blending_indices(self.weights, self.size)
        else:
            dataset_index, dataset_sample_index = build_exhaustive_blending_indices(self.weights)
        return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}

    def _check_bounds(self) -> None:
        if len(self.dataset_index) == 0:
            return
        counts = np.bincount(np.asarray(self.dataset_index), minlength=len(self.datasets))
        for i, (d, n) in enumerate(zip(self.datasets, counts)):
            if n > len(d):
                raise ValueError(
                    f"the blend draws {int(n)} samples from dataset {i} ({getattr(d, 'dataset_path', None)}) "
                    f"but it only has {len(d)} for the {self.split.name} split; its weight asks for more "
                    f"than was built"
                )

    def __len__(self) -> int:
        return int(self.dataset_index.shape[0])

    def __getitem__(self, idx: int) -> Dict[str, Any]:
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"sample {idx} out of range for BlendedDataset with {n} samples")
        dataset_id = int(self.dataset_index[idx])
        dataset_sample_id = int(self.dataset_sample_index[idx])
        return {"dataset_id": dataset_id, **self.datasets[dataset_id][dataset_sample_id]}
