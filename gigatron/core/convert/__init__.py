"""Checkpoint conversion: HuggingFace (GPT-2, Llama 2/3, Mistral, Mixtral; Mamba-2, Nemotron-H and Bamba
for Mamba / hybrid models) and Megatron's `torch` layout at any tensor/pipeline parallel size,
through one message protocol of full tensors.

    from gigatron.core.convert import hf_messages, save_torch_checkpoint, run_conversion
    run_conversion(hf_messages("llama-hf/"), lambda m: save_torch_checkpoint(m, "ckpt/", target_tp=2))

See protocol.py (messages and metadata), layout.py (sharding and the fused QKV / SwiGLU layouts),
hf.py and mamba_hf.py (HuggingFace names) and torch_format.py (the `torch` checkpoint files).
"""

from .hf import FAMILIES, HFWeights, hf_config_from_metadata, hf_messages, infer_family, is_hf_checkpoint, \
    metadata_from_hf_config, read_hf_config, save_hf_checkpoint
from .layout import compact, grouped_to_qkv, merge_from_tp, pad_vocab, partition_of, qkv_to_grouped, split_for_tp
from .protocol import MODEL_FLAGS, ConversionError, MessageReader, collect_state, expected_tensors, run_conversion, \
    state_to_messages, transformer_config_from_metadata
from .torch_format import copy_tokenizer_files, rank_state_dicts, read_torch_checkpoint, resolve_checkpoint_dir, \
    save_torch_checkpoint, torch_checkpoint_messages

__all__ = [
    "FAMILIES", "HFWeights", "hf_config_from_metadata", "hf_messages", "infer_family", "is_hf_checkpoint",
    "metadata_from_hf_config", "read_hf_config", "save_hf_checkpoint",
    "compact", "grouped_to_qkv", "merge_from_tp", "pad_vocab", "partition_of", "qkv_to_grouped", "split_for_tp",
    "MODEL_FLAGS", "ConversionError", "MessageReader", "collect_state", "expected_tensors", "run_conversion",
    "state_to_messages", "transformer_config_from_metadata",
    "copy_tokenizer_files", "rank_state_dicts", "read_torch_checkpoint", "resolve_checkpoint_dir",
    "save_torch_checkpoint", "torch_checkpoint_messages",
]
