"""Datasets for pretraining: Megatron-compatible indexed files, GPT/BERT/T5 samples, blends and samplers.

Names are imported on first use, so that tools which only read or write .bin/.idx files (such as
tools/preprocess_data.py) start without importing torch."""

from importlib import import_module

_EXPORTS = {
    "BERTDataset": "bert_dataset",
    "BlendedDataset": "blended_dataset",
    "DType": "indexed_dataset",
    "DataConfig": "config",
    "GPTDataset": "gpt_dataset",
    "GPTDatasetConfig": "gpt_dataset",
    "TokenIdError": "gpt_dataset",
    "IndexedDataset": "indexed_dataset",
    "IndexedDatasetBuilder": "indexed_dataset",
    "IndexedDatasetError": "indexed_dataset",
    "MaskedDatasetConfig": "masked_dataset",
    "MockGPTDataset": "mock",
    "MockGPTLowLevelDataset": "mock",
    "PretrainingSampler": "samplers",
    "RandomSampler": "samplers",
    "Split": "utils",
    "T5Dataset": "t5_dataset",
    "build_blending_indices": "index_helpers",
    "build_exhaustive_blending_indices": "index_helpers",
    "build_gpt_datasets": "builder",
    "build_gpt_indices": "gpt_dataset",
    "build_masked_datasets": "masked_builder",
    "build_pretraining_data_loader": "samplers",
    "collate_samples": "samplers",
    "get_ltor_masks_and_position_ids": "gpt_dataset",
    "gpt_dataset_config_from_data_config": "builder",
    "train_valid_test_num_samples": "builder",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
