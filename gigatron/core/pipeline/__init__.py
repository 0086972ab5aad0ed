"""Pipeline parallelism: point-to-point communication between stages and the schedules."""

from .p2p import P2PCommunicator, pipeline_dtype, pipeline_tensor_shape
from .schedules import (
    ComputeTimer,
    PipelinePlan,
    PlanStep,
    build_1f1b_plan,
    build_interleaved_plan,
    check_interleaved_num_microbatches,
    deallocate_output_tensor,
    forward_backward_no_pipelining,
    forward_backward_pipelining_with_interleaving,
    forward_backward_pipelining_without_interleaving,
    get_forward_backward_func,
)

__all__ = [
    "P2PCommunicator",
    "pipeline_dtype",
    "pipeline_tensor_shape",
    "ComputeTimer",
    "PipelinePlan",
    "PlanStep",
    "build_1f1b_plan",
    "build_interleaved_plan",
    "check_interleaved_num_microbatches",
    "deallocate_output_tensor",
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_with_interleaving",
    "forward_backward_pipelining_without_interleaving",
    "get_forward_backward_func",
]
