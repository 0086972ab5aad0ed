"""On-disk cache of dataset indices, named as Megatron names them.

A cache entry is ``<md5>-<Class>-<split>-description.txt`` plus one ``<md5>-<Class>-<split>-<name>.npy``
per array, where ``md5`` hashes the JSON description of everything that shapes the arrays. Arrays
are written first, each under a temporary name and then renamed; the description is written
last, so its presence marks a complete entry. A reader also checks that the stored description
equals its own, so a hash collision or a hand-edited file never passes for a hit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Callable, Dict, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)


def describe(identifiers: dict) -> str:
    """The JSON text that is hashed and stored as ``description.txt``."""
    return json.dumps(identifiers, indent=4, default=_json_default)


def _json_default(obj):
    if hasattr(obj, "unique_identifiers"):
        return obj.unique_identifiers
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot describe {type(obj).__name__} in a dataset cache description")


def description_hash(description: str) -> str:
    return hashlib.md5(description.encode("utf-8")).hexdigest()


def _atomic_save_npy(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


class IndexCache:
    """The files of one cache entry (``directory`` may be None: no cache, always build)."""

    def __init__(self, directory: Optional[str], class_name: str, split_name: str, description: str,
                 array_names: Sequence[str]):
        self.directory = directory
        self.description = description
        self.hash = description_hash(description)
        self.base = f"{self.hash}-{class_name}-{split_name}"
        self.array_names = list(array_names)

    def path(self, affix: str) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, f"{self.base}-{affix}")

    @property
    def description_path(self) -> str:
        return self.path("description.txt")

    def array_path(self, name: str) -> str:
        return self.path(f"{name}.npy")

    def is_hit(self) -> bool:
        if self.directory is None or not os.path.isfile(self.description_path):
            return False
        if not all(os.path.isfile(self.array_path(n)) for n in self.array_names):
            return False
        with open(self.description_path, encoding="utf-8") as f:
            return f.read() == self.description

    def load(self) -> Dict[str, np.ndarray]:
        return {n: np.load(self.array_path(n), allow_pickle=False, mmap_mode="r") for n in self.array_names}

    def save(self, arrays: Dict[str, np.ndarray]) -> None:
        assert self.directory is not None
        os.makedirs(self.directory, exist_ok=True)
        for n in self.array_names:
            _atomic_save_npy(self.array_path(n), arrays[n])
        _atomic_write_text(self.description_path, self.description)


def build_or_load(cache: IndexCache, build: Callable[[], Dict[str, np.ndarray]], what: str):
    """Load the entry if complete, else build it (and save it when there is a directory).

    Returns ``(arrays, built)``. Ranks that call this after the building rank's barrier find a hit;
    a rank that cannot see the building rank's files (a cache directory that is not shared between
    nodes) builds the same arrays itself, which is deterministic, instead of failing.
    """
    if cache.is_hit():
        logger.info("loading %s indices from %s-*", what, os.path.join(cache.directory, cache.base))
        return cache.load(), False
    logger.info("building %s indices", what)
    arrays = build()
    if cache.directory is not None:
        cache.save(arrays)
        logger.info("saved %s indices to %s-*", what, os.path.join(cache.directory, cache.base))
    return arrays, True
