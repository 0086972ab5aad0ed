"""Tensor layouts: full (logical) tensors <-> tensor-parallel shards, and the fused QKV layout.

Shape legend: h = hidden, d = head dim (kv_channels), nh = query heads, ng = key/value groups,
hpg = nh / ng query heads per group, f = ffn hidden, V = true vocabulary, Vp = padded vocabulary,
tp = tensor-parallel size.

A *full* tensor is the whole logical parameter, independent of the parallel layout:
- linear_qkv: Megatron's grouped layout [ng * (hpg + 2) * d, h]; for each group g the rows of its
  hpg query heads, then K_g, then V_g.
- linear_fc1 with SwiGLU: [gate (f rows); up (f rows)] (the global concatenation).
- word embedding / output layer: [V, h] with the TRUE vocabulary (padding rows are added when
  sharding and removed when merging).

The shards are what GPTModel holds on tensor-parallel rank r:
- column-parallel (linear_qkv, linear_fc1, word embedding, output layer, multi-latent attention's
  linear_q_proj / linear_q_up_proj / linear_kv_up_proj, multi-token prediction's eh_proj):
  contiguous dim-0 chunks,
  except the SwiGLU fc1, where rank r holds [gate_r; up_r];
- row-parallel (linear_proj.weight, linear_fc2.weight): contiguous dim-1 chunks;
- routed experts (mlp.experts.local_experts.j.*, split over the expert tensor-parallel ranks,
  which the converter takes to be the tp ranks): linear_fc1 like the dense fc1, linear_fc2 like
  the dense fc2; the router (mlp.router.weight [E, h]) is replicated;
- Mamba mixers (decoder.layers.{i}.mixer.*): in_proj.weight and conv1d.weight/bias split by
  rows segment by segment (rank r holds [z_r; x_r; B_r; C_r; dt_r] and [x_r; B_r; C_r]; the
  segment sizes come from the Mamba flags, `mamba_segments`), A_log, D, dt_bias and norm.weight
  split by rows, out_proj.weight by columns;
- everything else (norms, row-parallel biases, position embeddings): replicated.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

__all__ = [
    "VOCAB_PARAMS",
    "partition_of",
    "mamba_segments",
    "qkv_to_grouped",
    "grouped_to_qkv",
    "split_for_tp",
    "merge_from_tp",
    "pad_vocab",
    "compact",
]

# Parameters whose dim 0 is the vocabulary.
VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")

_COLUMN_SUFFIXES = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
                    "mlp.linear_fc1.weight", "mlp.linear_fc1.bias",
                    # multi-latent attention's per-head projections; its down-projections and latent
                    # norms are replicated
                    "self_attention.linear_q_proj.weight", "self_attention.linear_q_up_proj.weight",
                    "self_attention.linear_kv_up_proj.weight",
                    # multi-token prediction's projection of [embedding; hidden]
                    ".eh_proj.weight")
_ROW_SUFFIXES = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight", ".mixer.out_proj.weight")
_MAMBA_IN_PROJ = ".mixer.in_proj.weight"
_MAMBA_CONV = (".mixer.conv1d.weight", ".mixer.conv1d.bias")
_MAMBA_ROWS = (_MAMBA_IN_PROJ,) + _MAMBA_CONV + (".mixer.A_log", ".mixer.D", ".mixer.dt_bias", ".mixer.norm.weight")


def mamba_segments(name: str, args: dict) -> Optional[List[int]]:
    """The logical segment sizes of a Mamba mixer's fused tensor `name` (in_proj: [z, x, B, C, dt];
    conv1d: [x, B, C]) from the Mamba flags in `args` (a checkpoint's args or conversion metadata);
    None for any other tensor."""
    if not (name.endswith(_MAMBA_IN_PROJ) or name.endswith(_MAMBA_CONV)):
        return None
    missing = [k for k in ("hidden_size", "mamba_head_dim", "mamba_num_groups", "mamba_state_dim") if args.get(k) is None]
    if missing:
        raise ValueError(f"{name} is a Mamba mixer tensor split segment by segment, but the checkpoint's args lack "
                         f"{missing}; its tensor-parallel shards cannot be merged or split without the Mamba flags")
    from gigatron.core.transformer.mamba.config import MambaConfig, mamba_num_heads
    from gigatron.core.transformer.mamba.layout import conv_segments, in_proj_segments

    mc = MambaConfig(mamba_state_dim=int(args["mamba_state_dim"]), mamba_head_dim=int(args["mamba_head_dim"]),
                     mamba_num_groups=int(args["mamba_num_groups"]),
                     mamba_num_heads=None if args.get("mamba_num_heads") is None else int(args["mamba_num_heads"]))
    heads = mamba_num_heads(mc, int(args["hidden_size"]))
    d_inner = heads * mc.mamba_head_dim
    if name.endswith(_MAMBA_IN_PROJ):
        return in_proj_segments(d_inner, mc.mamba_num_groups, mc.mamba_state_dim, heads)
    return conv_segments(d_inner, mc.mamba_num_groups, mc.mamba_state_dim)


def partition_of(name: str, swiglu: bool) -> tuple[Optional[int], int]:
    """(partition dim or None if replicated, stride) of the parameter called `name`."""
    if name in VOCAB_PARAMS:
        return 0, 1
    if ".mlp.experts.local_experts." in name:
        # Routed experts, split over the expert tensor-parallel ranks (Megatron's default: the
        # tensor-parallel size): fc1 [fo, h] by rows ([gate_r; up_r] with SwiGLU), fc2 [h, f] by columns.
        if name.endswith(".linear_fc1.weight"):
            return 0, 2 if swiglu else 1
        if name.endswith(".linear_fc2.weight"):
            return 1, 1
    if name.endswith(_MAMBA_ROWS):
        return 0, 1
    if name.endswith(_COLUMN_SUFFIXES):
        stride = 2 if swiglu and ".mlp.linear_fc1." in name else 1
        return 0, stride
    if name.endswith(_ROW_SUFFIXES):
        return 1, 1
    return None, 1


def qkv_to_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int,
                   head_dim: int) -> torch.Tensor:
    """Separate Q [nh*d, ...], K [ng*d, ...], V [ng*d, ...] (weights [., h] or biases [.])
    -> Megatron's grouped linear_qkv [ng*(hpg+2)*d, ...]."""
    _check_heads(num_heads, num_groups)
    hpg = num_heads // num_groups
    rest = tuple(q.shape[1:])
    _check_rows("q", q, num_heads * head_dim)
    _check_rows("k", k, num_groups * head_dim)
    _check_rows("v", v, num_groups * head_dim)
    qg = q.reshape(num_groups, hpg * head_dim, *rest)  # [ng, hpg*d, ...]
    kg = k.reshape(num_groups, head_dim, *rest)  # [ng, d, ...]
    vg = v.reshape(num_groups, head_dim, *rest)  # [ng, d, ...]
    grouped = torch.cat([qg, kg, vg], dim=1)  # [ng, (hpg+2)*d, ...]
    return grouped.reshape(num_groups * (hpg + 2) * head_dim, *rest).contiguous()  # [ng*(hpg+2)*d, ...]


def grouped_to_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int, head_dim: int):
    """Inverse of `qkv_to_grouped`: [ng*(hpg+2)*d, ...] -> (Q [nh*d, ...], K [ng*d, ...], V [ng*d, ...])."""
    _check_heads(num_heads, num_groups)
    hpg = num_heads // num_groups
    rest = tuple(qkv.shape[1:])
    _check_rows("linear_qkv", qkv, num_groups * (hpg + 2) * head_dim)
    grouped = qkv.reshape(num_groups, (hpg + 2) * head_dim, *rest)  # [ng, (hpg+2)*d, ...]
    q, k, v = torch.split(grouped, [hpg * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(num_heads * head_dim, *rest).contiguous(),  # [nh*d, ...]
            k.reshape(num_groups * head_dim, *rest).contiguous(),  # [ng*d, ...]
            v.reshape(num_groups * head_dim, *rest).contiguous())  # [ng*d, ...]


def _check_heads(num_heads: int, num_groups: int) -> None:
    if num_groups < 1 or num_heads % num_groups != 0:
        raise ValueError(f"{num_heads} attention heads do not divide into {num_groups} key/value groups")


def _check_rows(what: str, t: torch.Tensor, rows: int) -> None:
    if t.shape[0] != rows:
        raise ValueError(f"{what} has {t.shape[0]} rows, expected {rows} from the head counts and head dim; "
                         "the checkpoint does not match its config")


def pad_vocab(t: torch.Tensor, padded_size: int) -> torch.Tensor:
    """[V, ...] -> [Vp, ...] with zero rows appended (padded entries never carry information)."""
    if t.shape[0] > padded_size:
        raise ValueError(f"vocabulary tensor has {t.shape[0]} rows, more than the padded size {padded_size}")
    if t.shape[0] == padded_size:
        return t
    pad = torch.zeros((padded_size - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=0)


def _check_segments(name: str, segments) -> None:
    if segments is None and (name.endswith(_MAMBA_IN_PROJ) or name.endswith(_MAMBA_CONV)):
        raise ValueError(f"{name} is split over tensor-parallel ranks segment by segment; pass its segments "
                         "(mamba_segments(name, args))")


def split_for_tp(name: str, full: torch.Tensor, tp: int, swiglu: bool,
                 segments: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
    """The tp shards of the full tensor `name` (vocabulary tensors must already be padded).
    `segments`: the logical segment sizes of a tensor split segment by segment (mamba_segments)."""
    from gigatron.core.parallel.init import local_shard

    dim, stride = partition_of(name, swiglu)
    if dim is None or tp == 1:
        return [full.contiguous() for _ in range(tp)] if dim is None else [full.contiguous()]
    _check_segments(name, segments)
    size = full.shape[dim]
    blocks = list(segments) if segments is not None else [size // stride] * stride
    if size % stride != 0 or sum(blocks) != size or any(n % tp for n in blocks):
        raise ValueError(f"{name}: dimension {dim} of size {size} does not split over "
                         f"--target-tensor-parallel-size {tp}" + (" (SwiGLU halves)" if stride > 1 else "")
                         + (f" segment by segment {tuple(blocks)}" if segments is not None else ""))
    return [local_shard(full, dim, stride, r, tp, segments).contiguous() for r in range(tp)]


def merge_from_tp(name: str, shards: Sequence[torch.Tensor], swiglu: bool,
                  segments: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The full tensor from its tp shards (replicated tensors: the first copy)."""
    from gigatron.core.parallel.init import merge_shards

    dim, stride = partition_of(name, swiglu)
    if dim is None or len(shards) == 1:
        return shards[0]
    _check_segments(name, segments)
    return merge_shards(shards, dim, stride, segments)


def compact(t: torch.Tensor) -> torch.Tensor:
    """`t` as a contiguous tensor owning exactly its data (a saved view would otherwise carry its
    whole storage, and safetensors refuses tensors that share memory)."""
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return t.contiguous().clone()
    return t
