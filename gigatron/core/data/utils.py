"""Splits and blends: parsing Megatron's ``--split`` and ``--data-path`` values."""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np


class Split(enum.Enum):
    train = 0
    valid = 1
    test = 2


def normalize(weights: Sequence[float]) -> List[float]:
    """Divide by the sum (float64), as Megatron does."""
    w = np.array(weights, dtype=np.float64)
    total = np.sum(w)
    if not total > 0:
        raise ValueError(f"weights {list(weights)} must have a positive sum")
    return (w / total).tolist()


def parse_and_normalize_split(split: str) -> List[float]:
    """``"969, 30, 1"`` -> ``[0.969, 0.03, 0.001]`` (missing entries are 0)."""
    values = [float(x) for x in re.findall(r"[.0-9]+", split)]
    if not values or len(values) > len(Split):
        raise ValueError(
            f"--split {split!r} must list 1 to 3 non-negative proportions for train, validation and test, "
            f"e.g. --split 969,30,1"
        )
    values = values + [0.0] * (len(Split) - len(values))
    if sum(values) <= 0:
        raise ValueError(f"--split {split!r} gives every split zero weight")
    return normalize(values)


def convert_split_vector_to_split_matrix(
    vector_a: Sequence[float], vector_b: Optional[Sequence[float]] = None
) -> List[Optional[Tuple[float, float]]]:
    """Turn split proportions into bookends ``[(0, a0), (a0, a0+a1), (a0+a1, 1)]``.

    With ``vector_b`` the overlap of both bookend lists; a split of zero width becomes None.
    The running sums are formed left to right in floating point exactly as Megatron forms them.
    """
    if vector_b is None:
        vector_b = vector_a

    def bookends(vector):
        expansion = [0]
        for x in vector:
            expansion.append(expansion[-1] + x)
        return list(zip(expansion[:-1], expansion[1:]))

    matrix: List[Optional[Tuple[float, float]]] = []
    for a, b in zip(bookends(vector_a), bookends(vector_b)):
        if min(a[1], b[1]) <= max(a[0], b[0]):
            matrix.append(None)
        else:
            matrix.append((max(a[0], b[0]), min(a[1], b[1])))
    return matrix


def split_indices(num_elements: int, bookend: Tuple[float, float]) -> np.ndarray:
    """The element ids ``arange(round(beg*N), round(end*N))`` (int32) of one split."""
    beg = int(round(bookend[0] * float(num_elements)))
    end = int(round(bookend[1] * float(num_elements)))
    return np.arange(beg, end, dtype=np.int32)


def get_blend_from_list(blend: Optional[Sequence[str]]) -> Optional[Tuple[List[str], Optional[List[float]]]]:
    """``["0.3", "A", "0.7", "B"]`` -> ``(["A", "B"], [0.3, 0.7])``; ``["A", "B"]`` -> ``(["A", "B"], None)``."""
    if blend is None:
        return None
    blend = [str(x) for x in blend]
    if len(blend) == 0:
        return None
    if len(blend) % 2 == 1:
        return [b.strip() for b in blend], None
    raw_weights, raw_prefixes = blend[0::2], blend[1::2]
    weights: List[Optional[float]] = []
    for raw in raw_weights:
        try:
            weights.append(float(raw))
        except ValueError:
            weights.append(None)
    if all(w is None for w in weights):
        return [b.strip() for b in blend], None
    if any(w is None for w in weights):
        bad = [raw for raw, w in zip(raw_weights, weights) if w is None]
        raise ValueError(
            f"data path list {blend} mixes weights and prefixes: {bad} are not numbers. Give either "
            f"'weight1 prefix1 weight2 prefix2 ...' or 'prefix1 prefix2 ...'"
        )
    for w, prefix in zip(weights, raw_prefixes):
        if not w > 0:
            raise ValueError(f"blend weight {w} for {prefix} must be positive; drop the dataset instead")
    return [p.strip() for p in raw_prefixes], weights  # type: ignore[return-value]


def read_data_args_file(path: str) -> List[str]:
    """The whitespace-separated contents of a ``--data-args-path`` file."""
    with open(path) as f:
        return f.read().split()


def read_per_split_data_args_file(path: str) -> List[Optional[List[str]]]:
    """``{"train": [...], "valid": [...], "test": [...]}`` from ``--per-split-data-args-path``."""
    with open(path) as f:
        spec = json.load(f)
    if not isinstance(spec, dict) or not set(spec) <= {"train", "valid", "test"}:
        raise ValueError(f"{path}: expected a JSON object with keys among train, valid, test")
    out: List[Optional[List[str]]] = []
    for key in ("train", "valid", "test"):
        value = spec.get(key)
        if isinstance(value, str):
            value = value.split()
        out.append([str(v) for v in value] if value else None)
    return out


@dataclass
class BlendedDatasetConfig:
    """What every dataset built from --data-path / --split / per-split paths shares (the GPT and
    the masked dataset configs extend it)."""

    random_seed: int
    """Seed of the numpy RandomState that shuffles documents and samples."""

    sequence_length: int
    """Tokens per sample."""

    tokenizer: Any = None
    """The run's tokenizer (each dataset names the ids it needs)."""

    blend: Optional[Tuple[List[str], Optional[List[float]]]] = None
    """(prefixes, weights or None) split by ``split``."""

    blend_per_split: Optional[List[Optional[Tuple[List[str], Optional[List[float]]]]]] = None
    """One (prefixes, weights) per split, for --train/valid/test-data-path."""

    split: Optional[str] = None
    """The --split string, e.g. "969,30,1"."""

    split_matrix: Optional[List[Optional[Tuple[float, float]]]] = field(init=False, default=None)
    """Bookends of each split (derived from ``split``)."""

    path_to_cache: Optional[str] = None
    """Cache directory for the indices (default: <prefix>/cache/<Class>_indices, as Megatron)."""

    mmap_bin_files: bool = True
    """Memory-map the .bin files."""

    def __post_init__(self):
        if self.sequence_length is None or self.sequence_length < 1:
            raise ValueError(f"--seq-length must be a positive integer, got {self.sequence_length}")
        if self.blend_per_split is not None and any(self.blend_per_split):
            if self.split is not None:
                raise ValueError(
                    "--split cannot be combined with --train-data-path/--valid-data-path/--test-data-path: "
                    "per-split paths already say which data each split uses; drop --split"
                )
        elif self.split is not None:
            self.split_matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(self.split))
