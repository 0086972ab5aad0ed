"""ParallelConfig: how the ranks of a job are split into tensor, pipeline, context, expert and
data parallel groups. Field names are Megatron's flag names with `_` for `-`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from gigatron.core.fields import run_setting

__all__ = ["ModelParallelConfig", "ParallelConfig"]


@dataclass
class ModelParallelConfig:
    """The model-parallel settings that both the rank layout (ParallelConfig) and the layers
    (TransformerConfig) need: defined once here, inherited by both (as Megatron-Core's
    ModelParallelConfig). They are run settings: a checkpoint does not impose them on another run."""

    tensor_model_parallel_size: int = run_setting(1)
    """Degree of tensor model parallelism (weights of each layer split across this many ranks)."""

    pipeline_model_parallel_size: int = run_setting(1)
    """Degree of pipeline model parallelism (layers split into this many consecutive stages)."""

    virtual_pipeline_model_parallel_size: Optional[int] = run_setting(None)
    """Number of virtual pipeline stages (model chunks) per pipeline rank, for the interleaved
    schedule. Default: no interleaving."""

    sequence_parallel: bool = run_setting(False)
    """Shard layer norms, dropout and residuals along the sequence across the tensor-parallel ranks
    (all-gather before and reduce-scatter after each tensor-parallel block). Needs
    --tensor-model-parallel-size > 1 to have an effect."""


@dataclass
class ParallelConfig(ModelParallelConfig):
    """How the ranks of a job are split into tensor, pipeline, context, expert and data-parallel
    groups."""

    context_parallel_size: int = 1
    """Degree of context parallelism (the sequence split across this many ranks inside attention)."""

    expert_model_parallel_size: int = 1
    """Degree of expert model parallelism (MoE experts distributed across this many ranks)."""

    expert_tensor_parallel_size: Optional[int] = None
    """Degree of tensor model parallelism inside experts. Default: the same as
    --tensor-model-parallel-size."""

    order: str = "tp-cp-ep-dp-pp"
    """Order of the parallel dimensions in the rank layout, fastest varying first (Megatron's
    RankGenerator order). A Gigatron addition: Megatron's own flag, --use-tp-pp-dp-mapping, is
    accepted and sets tp-cp-ep-pp-dp."""

    distributed_backend: str = "nccl"
    """Which backend to use for distributed training (nccl on GPU, gloo on CPU)."""

    distributed_timeout_minutes: int = 10
    """Timeout in minutes for collectives of every process group."""

    nccl_communicator_config_path: Optional[str] = None
    """YAML file of NCCL communicator options per process group, as Megatron's: keys are group
    names (dp, dp_cp, cp, mp, tp_pp, tp, pp, embd, pos_embd, tp_dp_cp, tp_dp, tp_cp, ep, expt_tp,
    tp_ep, tp_ep_pp, expt_dp), values mappings of cga_cluster_size (default 4), max_ctas (32),
    min_ctas (1) and net_name. For example `dp_cp: {max_ctas: 8}` caps the SMs the gradient
    reduction (over dp_cp; expert parameters over expt_dp) takes from the GEMMs it overlaps. A group given options gets a communicator of its
    own. NCCL only (ignored, with a note, on gloo)."""

    @property
    def effective_expert_tensor_parallel_size(self) -> int:
        """expert_tensor_parallel_size, or tensor_model_parallel_size when it is None."""
        if self.expert_tensor_parallel_size is None:
            return self.tensor_model_parallel_size
        return self.expert_tensor_parallel_size
