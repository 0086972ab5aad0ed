"""`build_masked_datasets`: the BERT or T5 splits of a run.

It sits above the modules it builds from: masked_dataset.py (what BERT and T5 samples share)
and the two sample classes (bert_dataset.py, t5_dataset.py) that derive from it, so that those
modules import in one direction only.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from .bert_dataset import BERTDataset
from .builder import build_rank_0_first
from .config import DataConfig
from .masked_dataset import MaskedDatasetBuilder, masked_dataset_config_from_data_config
from .t5_dataset import T5Dataset

__all__ = ["build_masked_datasets"]


def build_masked_datasets(
    config: DataConfig,
    tokenizer,
    train_valid_test_num_samples: Sequence[Optional[int]],
    kind: str = "bert",
    is_built_on_rank: Callable[[], bool] = lambda: True,
    *,
    barrier: Optional[Callable[[], None]] = None,
    rank: int = 0,
):
    """Build ``(train, valid, test)`` BERT (``kind="bert"``) or T5 (``kind="t5"``) datasets.

    Same sources, blends, caching and rank protocol as :func:`build_gpt_datasets`; a split with zero
    weight or zero samples is None.
    """
    masked_config = masked_dataset_config_from_data_config(config, tokenizer, kind)
    dataset_class = BERTDataset if kind == "bert" else T5Dataset
    builder = MaskedDatasetBuilder(dataset_class, masked_config, list(train_valid_test_num_samples))
    return build_rank_0_first(builder, is_built_on_rank, barrier, rank)
