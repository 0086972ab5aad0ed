"""Text generation: KV-cached engine, sampling, beam search, tensor-parallel broadcast loop and the
HTTP server (gigatron.core.inference.server)."""

from gigatron.core.inference.engine import (
    BeamResult,
    GenerationResult,
    InferenceEngine,
    PromptTooLongError,
    SamplingParams,
)
from gigatron.core.inference.kv_cache import InferenceContext

__all__ = ["BeamResult", "GenerationResult", "InferenceEngine", "InferenceContext", "PromptTooLongError",
           "SamplingParams"]
