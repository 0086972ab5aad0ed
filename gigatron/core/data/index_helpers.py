"""Index builders for GPT-style and blended datasets.

All builders reproduce Megatron-LM's indices bit for bit (same RNG calls in the same order, same
integer arithmetic, same tie-breaking), but are vectorized with numpy:

* ``build_document_index``: the split's document ids tiled once per epoch and shuffled.
* ``build_sample_index``: where each sample starts, as rows ``(position in document_index, token
  offset)``; computed with one cumulative sum and one ``searchsorted`` instead of a walk.
* ``build_shuffle_index``: a shuffled ``arange`` (two independently shuffled ranges when the final
  epoch is kept separate).
* ``build_blending_indices`` / ``build_exhaustive_blending_indices``: the greedy error-minimising
  interleaving of several datasets. This recurrence is sequential by nature (each choice changes the
  next), so it runs as a small C routine compiled on first use with the system C compiler; where no
  compiler is available an equivalent pure-Python loop is used (slow for millions of samples).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from typing import Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

_INT32_MAX = np.iinfo(np.int32).max


# --------------------------------------------------------------------------------------------
# document / sample / shuffle indices
# --------------------------------------------------------------------------------------------


def build_document_index(
    documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_final_epoch: bool
) -> np.ndarray:
    """The split's document (sequence) ids repeated ``num_epochs`` times and shuffled (int32).

    With ``separate_final_epoch`` the first ``num_epochs - 1`` epochs are shuffled together and the
    last epoch on its own, then concatenated (same RNG draws, in the same order, as Megatron).
    """
    documents = np.asarray(documents)
    if not separate_final_epoch or num_epochs == 1:
        document_index = np.tile(documents.astype(np.int32, copy=False), num_epochs)  # [num_epochs * n]
        rng.shuffle(document_index)
        return document_index
    first = build_document_index(documents, num_epochs - 1, rng, False)
    last = build_document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def num_samples_in_tokens(
    num_tokens: int, sequence_length: int, drop_last_partial_sequence: bool, add_extra_token_to_sequence: bool
) -> int:
    """How many samples of ``sequence_length`` (+1 overlapping token) fit in ``num_tokens`` tokens.

    Keeping the last partial sample rounds up with exact integers; Megatron's C++ rounds a
    single-precision float there, which differs (by one sample) only beyond 2**24 tokens.
    """
    extra = int(add_extra_token_to_sequence)
    if drop_last_partial_sequence:
        return (num_tokens - extra) // sequence_length
    return -((extra - num_tokens) // sequence_length)  # exact ceil((num_tokens - extra) / sequence_length)


def build_sample_index(
    sequence_lengths: np.ndarray,
    document_index: np.ndarray,
    sequence_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: bool = True,
) -> np.ndarray:
    """Start of every sample: ``[num_samples + 1, 2]`` rows ``(position in document_index, offset)``.

    Think of the documents of ``document_index`` laid end to end as one token stream. Sample ``k``
    covers stream tokens ``[k*L, k*L + L + extra)`` (``L = sequence_length``, ``extra`` = 1 when the
    label of the last position is read from the next token), so consecutive samples overlap by
    ``extra`` tokens. Row ``k`` (k >= 1) names the document holding the last token the previous
    sample consumed, ``t = k*L + extra - 1``, and the offset ``t - start + 1 - extra`` within it;
    row 0 is ``(0, 0)``. This is exactly what Megatron's token-by-token walk produces. When the last
    partial sample is kept, its end row points at the last token of the stream.

    Dtype: int32, or int64 when ``max(len(document_index), max length)`` exceeds int32.
    """
    if sequence_length < 1:
        raise ValueError(f"sequence length must be positive, got {sequence_length}")
    extra = int(add_extra_token_to_sequence)
    total_tokens = int(num_epochs) * int(tokens_per_epoch)
    num_samples = num_samples_in_tokens(total_tokens, sequence_length, drop_last_partial_sequence, bool(extra))
    num_samples = max(num_samples, 0)
    doc_sizes = np.asarray(sequence_lengths)[document_index].astype(np.int64)  # [len(document_index)]
    cum_end = np.cumsum(doc_sizes)  # stream position just past each document
    if cum_end.size == 0 or int(cum_end[-1]) != total_tokens:
        raise ValueError(
            f"document index holds {int(cum_end[-1]) if cum_end.size else 0} tokens, expected "
            f"{num_epochs} epochs x {tokens_per_epoch} tokens"
        )
    max_value = max(len(document_index), int(np.max(sequence_lengths)) if len(sequence_lengths) else 0)
    dtype = np.int32 if max_value <= _INT32_MAX else np.int64

    sample_index = np.zeros((num_samples + 1, 2), dtype=dtype)  # [num_samples + 1, 2]
    if num_samples == 0:
        return sample_index
    last_token = np.arange(1, num_samples + 1, dtype=np.int64) * sequence_length + (extra - 1)
    np.minimum(last_token, total_tokens - 1, out=last_token)  # only a kept partial sample reaches past
    position = np.searchsorted(cum_end, last_token, side="right")  # document holding that token
    offset = last_token - (cum_end[position] - doc_sizes[position]) + (1 - extra)
    sample_index[1:, 0] = position
    sample_index[1:, 1] = offset
    return sample_index


def build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """``arange(num_samples)`` shuffled, followed by ``arange(num_samples, total_size)`` shuffled.

    uint32, or int64 when ``total_size`` reaches ``2**32 - 2``.
    """
    dtype = np.uint32
    if total_size >= np.iinfo(np.uint32).max - 1:
        dtype = np.int64
    first = np.arange(0, num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


# --------------------------------------------------------------------------------------------
# blending
# --------------------------------------------------------------------------------------------

_BLENDING_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>

/* For each sample s pick the dataset i with the largest error w[i]*max(s,1) - count[i]
   (the first one on ties) and record (i, count[i]). */
int gigatron_build_blending_indices(int16_t *dataset_index, int64_t *dataset_sample_index,
                                    const double *weights, int32_t num_datasets, int64_t size)
{
    int64_t *counts = (int64_t *)calloc((size_t)num_datasets, sizeof(int64_t));
    if (counts == NULL) return 1;
    for (int64_t s = 0; s < size; ++s) {
        double sd = s > 1 ? (double)s : 1.0;
        int32_t best = 0;
        double best_error = weights[0] * sd - (double)counts[0];
        for (int32_t i = 1; i < num_datasets; ++i) {
            double error = weights[i] * sd - (double)counts[i];
            if (error > best_error) { best_error = error; best = i; }
        }
        dataset_index[s] = (int16_t)best;
        dataset_sample_index[s] = counts[best];
        counts[best] += 1;
    }
    free(counts);
    return 0;
}

/* Same rule with weights = size[i] / sum(size), restricted to datasets not yet exhausted,
   until every dataset is used up. */
int gigatron_build_exhaustive_blending_indices(int16_t *dataset_index, int64_t *dataset_sample_index,
                                               const int64_t *sizes, int32_t num_datasets)
{
    int64_t total = 0;
    for (int32_t i = 0; i < num_datasets; ++i) total += sizes[i];
    int64_t *counts = (int64_t *)calloc((size_t)num_datasets, sizeof(int64_t));
    double *weights = (double *)malloc(sizeof(double) * (size_t)(num_datasets > 0 ? num_datasets : 1));
    int32_t *unspent = (int32_t *)malloc(sizeof(int32_t) * (size_t)(num_datasets > 0 ? num_datasets : 1));
    if (counts == NULL || weights == NULL || unspent == NULL) { free(counts); free(weights); free(unspent); return 1; }
    int32_t num_unspent = 0;
    for (int32_t i = 0; i < num_datasets; ++i) {
        weights[i] = (double)sizes[i] / (double)total;
        if (sizes[i] > 0) unspent[num_unspent++] = i;
    }
    int64_t s = 0;
    while (num_unspent > 0) {
        double sd = s > 1 ? (double)s : 1.0;
        int32_t best_pos = 0;
        int32_t best = unspent[0];
        double best_error = weights[best] * sd - (double)counts[best];
        for (int32_t k = 1; k < num_unspent; ++k) {
            int32_t i = unspent[k];
            double error = weights[i] * sd - (double)counts[i];
            if (error > best_error) { best_error = error; best = i; best_pos = k; }
        }
        dataset_index[s] = (int16_t)best;
        dataset_sample_index[s] = counts[best];
        counts[best] += 1;
        if (counts[best] == sizes[best]) {
            for (int32_t k = best_pos; k + 1 < num_unspent; ++k) unspent[k] = unspent[k + 1];
            num_unspent -= 1;
        }
        s += 1;
    }
    free(counts); free(weights); free(unspent);
    return 0;
}
"""

_lib_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_lib_failed = False


def _library_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gigatron", "data_helpers")


def _find_compiler() -> str:
    candidates = [(sysconfig.get_config_var("CC") or "").split()[:1], ["cc"], ["gcc"], ["clang"]]
    for c in candidates:
        if c and shutil.which(c[0]):
            return c[0]
    raise RuntimeError("no C compiler found (tried $CC from sysconfig, cc, gcc, clang)")


def _compile_library() -> Optional[ctypes.CDLL]:
    digest = hashlib.sha1((_BLENDING_SOURCE + sys.platform + sysconfig.get_platform()).encode()).hexdigest()[:16]
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    directory = _library_dir()
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        directory = os.path.join(tempfile.gettempdir(), f"gigatron-data-helpers-{os.getuid() if hasattr(os, 'getuid') else 0}")
        os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"blending_{digest}{suffix}")
    if not os.path.exists(path):
        compiler = _find_compiler()
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            src = os.path.join(tmp, "blending.c")
            out = os.path.join(tmp, "blending" + suffix)
            with open(src, "w") as f:
                f.write(_BLENDING_SOURCE)
            # -ffp-contract=off: keep multiply and subtract separately rounded (no FMA), as numpy does.
            cmd = [compiler, "-O2", "-shared", "-fPIC", "-ffp-contract=off", "-o", out, src]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip()}")
            os.replace(out, path)
    lib = ctypes.CDLL(path)
    i16p = np.ctypeslib.ndpointer(np.int16, flags="C_CONTIGUOUS")
    i64p = np.ctypeslib.ndpointer(np.int64, flags="C_CONTIGUOUS")
    f64p = np.ctypeslib.ndpointer(np.float64, flags="C_CONTIGUOUS")
    lib.gigatron_build_blending_indices.argtypes = [i16p, i64p, f64p, ctypes.c_int32, ctypes.c_int64]
    lib.gigatron_build_blending_indices.restype = ctypes.c_int
    lib.gigatron_build_exhaustive_blending_indices.argtypes = [i16p, i64p, i64p, ctypes.c_int32]
    lib.gigatron_build_exhaustive_blending_indices.restype = ctypes.c_int
    return lib


def _native_library() -> Optional[ctypes.CDLL]:
    """The compiled blending routines, or None when they cannot be built here."""
    global _lib, _lib_failed
    with _lib_lock:
        if _lib is None and not _lib_failed:
            try:
                _lib = _compile_library()
            except (OSError, RuntimeError, FileNotFoundError) as e:
                _lib_failed = True
                logger.warning(
                    "could not compile the blending-index helper (%s); using the pure-Python loop, which "
                    "takes seconds per million samples. Install a C compiler (cc) to speed it up.",
                    e,
                )
        return _lib


def _blending_python(weights: np.ndarray, size: int):
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    w = [float(x) for x in weights]
    counts = [0] * len(w)
    k = len(w)
    for s in range(size):
        sd = float(s) if s > 1 else 1.0
        best, best_error = 0, w[0] * sd - counts[0]
        for i in range(1, k):
            error = w[i] * sd - counts[i]
            if error > best_error:
                best, best_error = i, error
        dataset_index[s] = best
        dataset_sample_index[s] = counts[best]
        counts[best] += 1
    return dataset_index, dataset_sample_index


def _exhaustive_python(sizes: np.ndarray):
    sizes = [int(x) for x in sizes]
    total = sum(sizes)
    weights = [x / total for x in sizes]
    counts = [0] * len(sizes)
    unspent = [i for i, n in enumerate(sizes) if n > 0]
    dataset_index = np.zeros(total, dtype=np.int16)
    dataset_sample_index = np.zeros(total, dtype=np.int64)
    s = 0
    while unspent:
        sd = float(s) if s > 1 else 1.0
        best = unspent[0]
        best_error = weights[best] * sd - counts[best]
        for i in unspent[1:]:
            error = weights[i] * sd - counts[i]
            if error > best_error:
                best, best_error = i, error
        dataset_index[s] = best
        dataset_sample_index[s] = counts[best]
        counts[best] += 1
        if counts[best] == sizes[best]:
            unspent.remove(best)
        s += 1
    return dataset_index, dataset_sample_index


def _check_num_datasets(n: int) -> None:
    if not 0 < n < 32767:
        raise ValueError(f"blending needs between 1 and 32766 datasets, got {n}")


def build_blending_indices(weights: Sequence[float], size: int, use_native: bool = True):
    """Greedy deterministic blend of ``len(weights)`` datasets into ``size`` samples.

    Sample ``s`` comes from the dataset with the largest ``weights[i] * max(s, 1) - count_i`` (first
    one on ties), which keeps every dataset's share within one sample of its weight.
    Returns ``(dataset_index int16[size], dataset_sample_index int64[size])``.
    """
    w = np.ascontiguousarray(weights, dtype=np.float64)
    _check_num_datasets(w.size)
    size = int(size)
    lib = _native_library() if use_native else None
    if lib is None:
        return _blending_python(w, size)
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    if lib.gigatron_build_blending_indices(dataset_index, dataset_sample_index, w, w.size, size) != 0:
        raise MemoryError("build_blending_indices: out of memory")
    return dataset_index, dataset_sample_index


def build_exhaustive_blending_indices(sizes: Sequence[int], use_native: bool = True):
    """Blend every sample of every dataset (weights = sizes), dropping a dataset once it is used up.

    Returns ``(dataset_index int16[sum(sizes)], dataset_sample_index int64[sum(sizes)])``.
    """
    n = np.ascontiguousarray(sizes, dtype=np.int64)
    _check_num_datasets(n.size)
    if np.any(n < 0):
        raise ValueError(f"dataset sizes must be non-negative, got {n.tolist()}")
    lib = _native_library() if use_native else None
    if lib is None:
        return _exhaustive_python(n)
    total = int(n.sum())
    dataset_index = np.zeros(total, dtype=np.int16)
    dataset_sample_index = np.zeros(total, dtype=np.int64)
    if total and lib.gigatron_build_exhaustive_blending_indices(dataset_index, dataset_sample_index, n, n.size) != 0:
        raise MemoryError("build_exhaustive_blending_indices: out of memory")
    return dataset_index, dataset_sample_index
