"""Datasets for pretraining: Megatron-compatible indexed files, GPT samples, blends and samplers."""

from .blended_dataset import BlendedDataset
from .builder import build_gpt_datasets, gpt_dataset_config_from_data_config, train_valid_test_num_samples
from .config import DataConfig
from .gpt_dataset import GPTDataset, GPTDatasetConfig, build_gpt_indices, get_ltor_masks_and_position_ids
from .index_helpers import build_blending_indices, build_exhaustive_blending_indices
from .indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError
from .mock import MockGPTDataset, MockGPTLowLevelDataset
from .samplers import PretrainingSampler, RandomSampler, build_pretraining_data_loader, collate_samples
from .utils import Split

__all__ = [
    "BlendedDataset",
    "DType",
    "DataConfig",
    "GPTDataset",
    "GPTDatasetConfig",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "IndexedDatasetError",
    "MockGPTDataset",
    "MockGPTLowLevelDataset",
    "PretrainingSampler",
    "RandomSampler",
    "Split",
    "build_blending_indices",
    "build_exhaustive_blending_indices",
    "build_gpt_datasets",
    "build_gpt_indices",
    "build_pretraining_data_loader",
    "collate_samples",
    "get_ltor_masks_and_position_ids",
    "gpt_dataset_config_from_data_config",
    "train_valid_test_num_samples",
]
