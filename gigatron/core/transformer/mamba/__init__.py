"""Mamba-2 layers and hybrid Mamba-Transformer stacks (Megatron-Core's MambaMixer, MambaLayer and
MambaStack): config.py (MambaConfig, the hybrid layer allocation), layout.py (the tensor-parallel
layout of the fused parameters), mixer.py (MambaMixer), stack.py (the hybrid layers and the stack).
The scan and convolution kernels live in gigatron/core/ops/ssd.py and causal_conv1d.py."""

from .config import MambaConfig, allocate_hybrid_layers, hybrid_layer_types, validate_mamba

__all__ = ["MambaConfig", "allocate_hybrid_layers", "hybrid_layer_types", "validate_mamba"]
