"""FP8 training without Transformer Engine: Megatron's FP8 flags (FP8Config), scaling recipes
(tensorwise, delayed, blockwise), saturating casts and the FP8 linear autograd function.

    from gigatron.core.fp8 import FP8Config, FP8Recipe, FP8LinearState, fp8_linear
    config = FP8Config(fp8="hybrid", fp8_recipe="delayed", fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    recipe = FP8Recipe.for_device(config, device)        # once, when the model is built
    state = FP8LinearState.from_config(config, device)   # one per linear (delayed only)
    y = fp8_linear(x, weight, bias, recipe, state)       # every step
    y = fp8_grouped_mm(x, w, tokens_per_expert, recipe, history, scale)  # GroupedMLP experts
    update_fp8_states(all_states, group)                 # after each step's last backward
"""

from .casting import (
    E4M3,
    E5M2,
    FP8_MAX,
    Quantized,
    dequantize,
    format_dtypes,
    quantize_128x128,
    quantize_1x128,
    quantize_tensorwise,
    saturating_cast,
    scale_from_amax,
)
from .config import (
    FP8Config,
    check_bf16_layer_counts,
    check_fp8_device,
    check_fp8_param_gather,
    layer_uses_fp8,
)
from .linear import FP8Recipe, blockwise_scaled_mm_works, fp8_grouped_mm, fp8_linear, scaled_gemm
from .sequence_parallel import all_gather_fp8, fp8_linear_with_sequence_parallel_gather
from .state import FP8LinearState, update_fp8_states

__all__ = [
    "E4M3", "E5M2", "FP8_MAX", "Quantized", "dequantize", "format_dtypes", "quantize_128x128",
    "quantize_1x128", "quantize_tensorwise", "saturating_cast", "scale_from_amax",
    "FP8Config", "check_bf16_layer_counts", "check_fp8_device", "check_fp8_param_gather", "layer_uses_fp8",
    "FP8Recipe", "blockwise_scaled_mm_works", "fp8_grouped_mm", "fp8_linear", "scaled_gemm",
    "FP8LinearState", "update_fp8_states", "all_gather_fp8", "fp8_linear_with_sequence_parallel_gather",
]
