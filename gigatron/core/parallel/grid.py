"""Rank layout: which global ranks form each parallel group. Pure functions, no processes.

Each global rank is a mixed-radix number whose digits are its coordinates along the parallel
dimensions, in the order given by the `order` string, the first dimension varying fastest.
With the default order "tp-cp-ep-dp-pp" and ep=1 (the dense layout):

    rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))

A group of kind "tp-dp" holds the ranks that share every coordinate except tp and dp. Expert
layers use a second layout of the same ranks ("MoE parallel folding") with tp = expert tensor
parallel size, ep = expert parallel size, cp = 1 and dp = world / (etp * ep * pp); the pipeline
groups of both layouts coincide. This is the assignment Megatron-LM's RankGenerator makes, so a
rank lands in the same groups as it would there.
"""

from __future__ import annotations

from math import prod
from typing import Optional

__all__ = ["DIMENSIONS", "DENSE_GROUP_KINDS", "EXPERT_GROUP_KINDS", "generate_rank_groups",
           "groups_of_kind", "rank_coordinates"]

DIMENSIONS = ("tp", "cp", "ep", "dp", "pp")

# Result key -> dimensions that vary inside one group, for the dense layout (ep = 1).
DENSE_GROUP_KINDS = {
    "tp": "tp",
    "pp": "pp",
    "dp": "dp",
    "cp": "cp",
    "dp_cp": "dp-cp",
    "mp": "tp-pp",
    "tp_pp": "tp-pp",
    "tp_dp_cp": "tp-dp-cp",
    "tp_dp": "tp-dp",
    "tp_cp": "tp-cp",
}
# Result key -> dimensions that vary inside one group, for the expert layout.
EXPERT_GROUP_KINDS = {
    "ep": "ep",
    "expt_tp": "tp",
    "tp_ep": "tp-ep",
    "tp_ep_pp": "tp-ep-pp",
    "expt_dp": "dp",
}


def _parse_order(order: str) -> list[str]:
    names = order.split("-")
    unknown = [n for n in names if n not in DIMENSIONS]
    if unknown:
        raise ValueError(f"--order '{order}': unknown dimension(s) {unknown}; use names from {list(DIMENSIONS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--order '{order}' names a dimension twice")
    return names


def _full_order(order: str, sizes: dict[str, int]) -> list[str]:
    names = _parse_order(order)
    for name, size in sizes.items():
        if name not in names:
            if size != 1:
                raise ValueError(
                    f"order '{order}' does not mention '{name}' but its size is {size}; add '{name}' to the order"
                )
            names.append(name)
    return names


def groups_of_kind(sizes: dict[str, int], order: str, kind: str) -> list[list[int]]:
    """All groups of one kind ("tp", "dp-cp", ...) for the layout given by `sizes` and `order`.

    The ranks of a group are listed in increasing coordinate order of the varying dimensions
    (first dimension of the order fastest); groups are listed in increasing order of the fixed
    coordinates (again first dimension fastest)."""
    names = _full_order(order, sizes)
    varying = set(kind.split("-"))
    unknown = varying - set(names)
    if unknown:
        raise ValueError(f"group kind '{kind}' names unknown dimension(s) {sorted(unknown)}")
    shape = [sizes[n] for n in names]
    strides = [prod(shape[:i]) for i in range(len(shape))]
    inner = [(s, st) for n, s, st in zip(names, shape, strides) if n in varying]
    outer = [(s, st) for n, s, st in zip(names, shape, strides) if n not in varying]

    def offsets(dims: list[tuple[int, int]]) -> list[int]:
        # Mixed-radix enumeration: first dimension fastest.
        values = [0]
        for size, stride in dims:
            values = [v + i * stride for i in range(size) for v in values]
        return values

    inner_offsets = offsets(inner)
    return [[base + off for off in inner_offsets] for base in offsets(outer)]


def rank_coordinates(rank: int, sizes: dict[str, int], order: str) -> dict[str, int]:
    """Coordinates of a global rank along each dimension of the layout."""
    coords = {}
    for name in _full_order(order, sizes):
        coords[name] = rank % sizes[name]
        rank //= sizes[name]
    return coords


def _check_sizes(world_size: int, tp: int, pp: int, cp: int, ep: int, etp: int) -> None:
    for flag, value in (
        ("world size", world_size),
        ("--tensor-model-parallel-size", tp),
        ("--pipeline-model-parallel-size", pp),
        ("--context-parallel-size", cp),
        ("--expert-model-parallel-size", ep),
        ("--expert-tensor-parallel-size", etp),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    if world_size % (tp * pp * cp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
            f"--pipeline-model-parallel-size ({pp}) x --context-parallel-size ({cp}) = {tp * pp * cp}; "
            f"change the sizes or the number of ranks"
        )
    if world_size % (etp * ep * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by --expert-tensor-parallel-size ({etp}) x "
            f"--expert-model-parallel-size ({ep}) x --pipeline-model-parallel-size ({pp}) = {etp * ep * pp}; "
            f"change the sizes or the number of ranks"
        )


def generate_rank_groups(
    world_size: int,
    tp: int,
    pp: int,
    cp: int = 1,
    ep: int = 1,
    etp: Optional[int] = None,
    order: str = "tp-cp-ep-dp-pp",
) -> dict[str, list[list[int]]]:
    """Every group of every kind, as lists of global ranks.

    Keys: tp, pp, dp, cp, dp_cp, mp (= tp_pp), tp_pp, tp_dp_cp, tp_dp, tp_cp (dense layout),
    embd (first and last rank of each pipeline group), pos_embd (first rank of each pipeline group),
    and ep, expt_tp, tp_ep, tp_ep_pp, expt_dp (expert layout, tp=etp, which defaults to tp).
    """
    etp = tp if etp is None else etp
    _check_sizes(world_size, tp, pp, cp, ep, etp)
    _parse_order(order)
    dense = {"tp": tp, "cp": cp, "ep": 1, "dp": world_size // (tp * pp * cp), "pp": pp}
    expert = {"tp": etp, "cp": 1, "ep": ep, "dp": world_size // (etp * ep * pp), "pp": pp}

    result = {key: groups_of_kind(dense, order, kind) for key, kind in DENSE_GROUP_KINDS.items()}
    for key, kind in EXPERT_GROUP_KINDS.items():
        result[key] = groups_of_kind(expert, order, kind)

    expert_pp = groups_of_kind(expert, order, "pp")
    if sorted(map(sorted, expert_pp)) != sorted(map(sorted, result["pp"])):
        raise ValueError(
            f"order '{order}' places the pipeline dimension differently in the dense and expert "
            f"layouts (tp={tp}, cp={cp}, ep={ep}, etp={etp}); put 'pp' last or first in --order"
        )

    result["embd"] = [[g[0], g[-1]] if len(g) > 1 else list(g) for g in result["pp"]]
    result["pos_embd"] = [[g[0]] for g in result["pp"]]
    return result
