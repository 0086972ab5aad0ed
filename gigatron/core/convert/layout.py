"""The tensor-parallel layout of Megatron's parameters now lives with the checkpoint formats
(gigatron/core/checkpoint/tp_layout.py); this module keeps the conversion code's import path."""

from gigatron.core.checkpoint.tp_layout import (  # noqa: F401
    VOCAB_PARAMS,
    compact,
    grouped_to_qkv,
    merge_from_tp,
    pad_vocab,
    partition_of,
    qkv_to_grouped,
    split_for_tp,
)
from gigatron.core.checkpoint.tp_layout import __all__  # noqa: F401
