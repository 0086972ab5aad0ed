"""Parallelism: rank layout, process groups, tensor/sequence-parallel layers and collectives,
vocab-parallel cross-entropy, RNG streams and recompute, parameter tags and layout-independent
initialization."""

from .config import ParallelConfig
from .cross_entropy import vocab_parallel_cross_entropy
from .grid import generate_rank_groups
from .groups import Group, ParallelGroups
from .init import initialize_parameters
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from .mappings import (
    all_to_all,
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
from .random import RNGStatesTracker, checkpoint, get_tracker, model_parallel_seed

__all__ = [
    "ParallelConfig",
    "Group",
    "ParallelGroups",
    "generate_rank_groups",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
    "copy_to_tensor_parallel_region",
    "reduce_from_tensor_parallel_region",
    "scatter_to_tensor_parallel_region",
    "gather_from_tensor_parallel_region",
    "scatter_to_sequence_parallel_region",
    "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "all_to_all",
    "RNGStatesTracker",
    "model_parallel_seed",
    "checkpoint",
    "get_tracker",
    "initialize_parameters",
]
