"""MambaConfig: the Mamba-2 and hybrid-stack flags, named after Megatron-LM's
(``--mamba-state-dim`` -> ``mamba_state_dim``), and the hybrid layer allocation.

A hybrid stack is described per layer by one symbol: ``M`` a Mamba-2 layer, ``*`` an attention-only
layer, ``-`` an MLP-only layer, ``E`` an MoE-only layer. Either the pattern is given
(--hybrid-override-pattern, one symbol per layer) or it is allocated from the target ratios
(--hybrid-attention-ratio, --hybrid-mlp-ratio) the way Megatron-Core allocates it:

1. attention: round(L * attention_ratio) layers, spread evenly so that the Mamba layers form
   (attention layers + 1) sections of equal (fractional) length, the stack starting and ending
   with Mamba; walking the layers with a budget that starts at one section length, a layer becomes
   attention when less than half a layer of the budget is left (the budget then grows by one
   section), otherwise it stays Mamba and spends one layer of the budget;
2. MLP: round(L * mlp_ratio) of the remaining Mamba layers become MLP by the same walk over the
   Mamba layers only, with the section length (Mamba layers left) / (MLP layers).

``round`` is Python's (halves to even), as in Megatron. With both a pattern and a non-zero ratio
the pattern must hold as many layers of each kind as the ratios allocate.

``validate_mamba(mamba_config, config, tp_size)`` checks these flags against a TransformerConfig and
the tensor-parallel size (heads and groups split over the tensor-parallel ranks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

__all__ = ["MambaConfig", "MAMBA", "ATTENTION", "MLP", "MOE", "LAYER_SYMBOLS", "allocate_hybrid_layers",
           "hybrid_layer_types", "validate_mamba", "mamba_num_heads", "check_mamba_flags", "MAMBA_EXPAND",
           "MAMBA_CONV_KERNEL"]

MAMBA, ATTENTION, MLP, MOE = "M", "*", "-", "E"
LAYER_SYMBOLS = (MAMBA, ATTENTION, MLP, MOE)

# Megatron-Core's MambaMixer constants (no flags): inner width = expand * hidden (without
# --mamba-num-heads), and the short convolution's kernel width.
MAMBA_EXPAND = 2
MAMBA_CONV_KERNEL = 4


@dataclass
class MambaConfig:
    mamba_state_dim: int = 128
    """The dimensionality of the state representation in Mamba layers (N of the SSD scan)."""
    mamba_head_dim: int = 64
    """The dimensionality of the heads in the Mamba layers (P of the SSD scan)."""
    mamba_num_groups: int = 8
    """The number of groups used in Mamba layers: heads of one group share their B and C
    projections (and the gated norm normalizes each group separately)."""
    mamba_num_heads: Optional[int] = None
    """The number of heads used in Mamba layers. Default: 2 * hidden_size / mamba_head_dim."""
    hybrid_override_pattern: Optional[str] = None
    """The layer pattern of a hybrid model, one symbol per layer: M (Mamba), * (attention),
    - (MLP), E (MoE); e.g. M-M*-M-. Its length must equal --num-layers."""
    hybrid_attention_ratio: float = 0.0
    """The target ratio of attention layers to total layers (allocated evenly, see the module
    docstring)."""
    hybrid_mlp_ratio: float = 0.0
    """The target ratio of MLP layers to total layers."""
    is_hybrid_model: bool = False
    """Indicates whether this is a hybrid model: the output projections of every layer (mixer
    out_proj, attention linear_proj, MLP linear_fc2) then start from N(0, init_method_std^2 /
    num_layers) instead of N(0, init_method_std^2 / (2 num_layers))."""

    def __post_init__(self) -> None:
        check_mamba_flags(self)


def check_mamba_flags(c) -> None:
    """Validate the Mamba flags of `c` on their own (an MambaConfig or any config carrying them)."""
    for name in ("mamba_state_dim", "mamba_head_dim", "mamba_num_groups"):
        value = getattr(c, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if c.mamba_num_heads is not None:
        if not isinstance(c.mamba_num_heads, int) or c.mamba_num_heads < 1:
            raise ValueError(f"--mamba-num-heads must be a positive integer, got {c.mamba_num_heads!r}")
        if c.mamba_num_heads % c.mamba_num_groups != 0:
            raise ValueError(f"--mamba-num-heads ({c.mamba_num_heads}) must be divisible by --mamba-num-groups "
                             f"({c.mamba_num_groups}); every group holds the same number of heads")
    _check_ratios(c.hybrid_attention_ratio, c.hybrid_mlp_ratio)
    if c.hybrid_override_pattern is not None:
        _check_pattern_symbols(c.hybrid_override_pattern)


def _check_ratios(attention_ratio: float, mlp_ratio: float) -> None:
    for flag, value in (("--hybrid-attention-ratio", attention_ratio), ("--hybrid-mlp-ratio", mlp_ratio)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{flag} must be in [0, 1], got {value}")
    if attention_ratio + mlp_ratio > 1.0:
        raise ValueError(f"--hybrid-attention-ratio ({attention_ratio}) + --hybrid-mlp-ratio ({mlp_ratio}) "
                         "exceed 1; the rest of the layers are Mamba layers")


def _check_pattern_symbols(pattern: str) -> None:
    if not pattern:
        raise ValueError("--hybrid-override-pattern is empty; give one symbol per layer (M, *, -, E)")
    unknown = sorted({s for s in pattern if s not in LAYER_SYMBOLS})
    if unknown:
        raise ValueError(f"--hybrid-override-pattern {pattern!r} holds {unknown}; the symbols are "
                         "M (Mamba), * (attention), - (MLP) and E (MoE)")


def _spread(types: List[str], candidate: str, new: str, section: float) -> None:
    """Turn some of the layers currently `candidate` into `new`, evenly: walk the candidates with a
    budget of `section` layers; where less than half a layer is left, place `new` and refill."""
    budget = section
    for i, kind in enumerate(types):
        if kind != candidate:
            continue
        if budget < 0.5:
            types[i] = new
            budget += section
        else:
            budget -= 1


def allocate_hybrid_layers(num_layers: int, attention_ratio: float = 0.0, mlp_ratio: float = 0.0) -> List[str]:
    """The per-layer symbols that the ratios allocate (see the module docstring)."""
    if num_layers < 1:
        raise ValueError(f"--num-layers must be >= 1, got {num_layers}")
    _check_ratios(attention_ratio, mlp_ratio)
    types = [MAMBA] * num_layers
    num_attention = round(num_layers * attention_ratio)
    num_mamba = num_layers - num_attention
    _spread(types, MAMBA, ATTENTION, num_mamba / (num_attention + 1))
    num_mlp = round(num_layers * mlp_ratio)
    if num_mlp > 0:
        num_mamba -= num_mlp
        _spread(types, MAMBA, MLP, num_mamba / num_mlp)
    return types


def hybrid_layer_types(num_layers: int, attention_ratio: float = 0.0, mlp_ratio: float = 0.0,
                       override_pattern: Optional[str] = None) -> List[str]:
    """The symbol of every layer (global numbering) of a hybrid stack of `num_layers` layers: the
    override pattern when given (checked against the ratios when they are non-zero), else the
    ratios' allocation. All Mamba without either."""
    allocated = allocate_hybrid_layers(num_layers, attention_ratio, mlp_ratio)
    if override_pattern is None:
        return allocated
    _check_pattern_symbols(override_pattern)
    if len(override_pattern) != num_layers:
        raise ValueError(f"--hybrid-override-pattern {override_pattern!r} has {len(override_pattern)} layers but "
                         f"--num-layers is {num_layers}; give one symbol per layer")
    pattern = list(override_pattern)
    if attention_ratio > 0.0 or mlp_ratio > 0.0:
        counts = {s: (pattern.count(s), allocated.count(s)) for s in LAYER_SYMBOLS}
        wrong = {s: c for s, c in counts.items() if c[0] != c[1]}
        if wrong:
            detail = ", ".join(f"{s!r}: {got} in the pattern, {want} from the ratios" for s, (got, want) in wrong.items())
            raise ValueError(f"--hybrid-override-pattern does not hold the layer counts that --hybrid-attention-ratio "
                             f"({attention_ratio}) and --hybrid-mlp-ratio ({mlp_ratio}) allocate ({detail}); drop "
                             "the ratios or fix the pattern")
    return pattern


def mamba_num_heads(mamba_config: MambaConfig, hidden_size: int) -> int:
    """--mamba-num-heads, or 2 * hidden_size / --mamba-head-dim (Megatron's default, expand 2)."""
    if mamba_config.mamba_num_heads is not None:
        return mamba_config.mamba_num_heads
    inner = MAMBA_EXPAND * hidden_size
    if inner % mamba_config.mamba_head_dim != 0:
        raise ValueError(f"2 * --hidden-size ({inner}) is not divisible by --mamba-head-dim "
                         f"({mamba_config.mamba_head_dim}); change one of them or set --mamba-num-heads")
    return inner // mamba_config.mamba_head_dim


def validate_mamba(mamba_config: MambaConfig, config, tp_size: int) -> List[str]:
    """Check the Mamba flags against the TransformerConfig and the tensor-parallel size; return the
    per-layer symbols of the whole stack."""
    check_mamba_flags(mamba_config)
    heads = mamba_num_heads(mamba_config, config.hidden_size)
    groups = mamba_config.mamba_num_groups
    if heads % groups != 0:
        raise ValueError(f"the Mamba heads ({heads}; --mamba-num-heads or 2 * --hidden-size / --mamba-head-dim) "
                         f"must be divisible by --mamba-num-groups ({groups})")
    if heads % tp_size != 0:
        raise ValueError(f"the Mamba heads ({heads}) must be divisible by --tensor-model-parallel-size "
                         f"({tp_size}); each rank holds whole heads")
    if groups % tp_size != 0:
        raise ValueError(f"--mamba-num-groups ({groups}) must be divisible by --tensor-model-parallel-size "
                         f"({tp_size}); each rank holds whole groups")
    return hybrid_layer_types(config.num_layers, mamba_config.hybrid_attention_ratio,
                              mamba_config.hybrid_mlp_ratio, mamba_config.hybrid_override_pattern)
