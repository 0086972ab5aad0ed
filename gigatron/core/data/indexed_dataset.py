"""Megatron-compatible indexed token datasets: a ``<prefix>.bin`` / ``<prefix>.idx`` pair.

Byte layout (all integers little-endian), identical to Megatron-LM's "MMIDIDX" format so that files
written by either framework load in the other:

``.idx``::

    offset 0   9 bytes   magic b"MMIDIDX\\x00\\x00"
    offset 9   u64       version (1)
    offset 17  u8        dtype code (see DType)
    offset 18  u64       sequence count S
    offset 26  u64       document count D (= number of documents + 1)
    offset 34  int32[S]  sequence lengths (tokens)
               int64[S]  sequence pointers (byte offset of each sequence in .bin)
               int64[D]  document indices (sequence boundaries; first 0, last S)
               int8[S]   sequence modes (multimodal datasets only)

``.bin``: the token arrays of all sequences concatenated, in the index dtype, no header.
"""

from __future__ import annotations

import enum
import os
import shutil
import struct
from array import array
from typing import Optional, Sequence, Union

import numpy as np

_INDEX_MAGIC = b"MMIDIDX\x00\x00"
_LEGACY_MAGIC = b"TNTIDX\x00\x00"
_INDEX_VERSION = 1
_HEADER_SIZE = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
_COPY_CHUNK_BYTES = 64 * 1024 * 1024
_VALIDATION_CHUNK = 1 << 24  # sequences per block when checking pointers


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair is missing, truncated, or not in Megatron's indexed-dataset format."""


class DType(enum.IntEnum):
    """Token dtype codes stored in the .idx header (Megatron's numbering)."""

    uint8 = 1
    int8 = 2
    int16 = 3
    int32 = 4
    int64 = 5
    float64 = 6
    float32 = 7
    uint16 = 8

    @classmethod
    def code_from_dtype(cls, dtype) -> int:
        """The header code of a numpy dtype (``np.uint16`` -> 8)."""
        name = np.dtype(dtype).name
        if name not in cls.__members__:
            raise ValueError(
                f"dtype {name} cannot be stored in an indexed dataset; use one of "
                f"{', '.join(cls.__members__)}"
            )
        return int(cls[name])

    @classmethod
    def dtype_from_code(cls, code: int) -> type:
        """The numpy scalar type of a header code (8 -> ``np.uint16``)."""
        try:
            member = cls(int(code))
        except ValueError:
            raise ValueError(
                f"unknown dtype code {code}; valid codes are 1..8 ({', '.join(f'{m.value}={m.name}' for m in cls)})"
            ) from None
        return getattr(np, member.name)

    @staticmethod
    def size(key) -> int:
        """Bytes per element of a dtype or a header code."""
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            return np.dtype(DType.dtype_from_code(int(key))).itemsize
        return np.dtype(key).itemsize

    @staticmethod
    def optimal_dtype(vocab_size: Optional[int]) -> type:
        """Megatron's choice of token dtype: uint16 if the vocabulary is smaller than 65,500, else int32."""
        if vocab_size is not None and vocab_size < 65500:
            return np.uint16
        return np.int32


def data_file_path(prefix: str) -> str:
    """``<prefix>.bin``"""
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    """``<prefix>.idx``"""
    return prefix + ".idx"


def _strip_extension(prefix: str) -> str:
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            return prefix[: -len(ext)]
    return prefix


def _temporary_path(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}"


def _as_numpy(tokens) -> np.ndarray:
    if hasattr(tokens, "detach") and hasattr(tokens, "cpu"):  # torch.Tensor
        tokens = tokens.detach().cpu().numpy()
    return np.asarray(tokens)


def write_index_file(
    idx_path: str,
    dtype,
    sequence_lengths: np.ndarray,
    document_indices: np.ndarray,
    sequence_modes: Optional[np.ndarray] = None,
) -> None:
    """Write a complete .idx file (not atomic by itself; callers write to a temporary name)."""
    itemsize = np.dtype(dtype).itemsize
    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
        raise ValueError("sequence lengths must lie in [0, 2**31) to fit the int32 length field")
    pointers = np.zeros(lengths.size, dtype="<i8")
    if lengths.size > 1:
        np.cumsum(lengths[:-1] * itemsize, out=pointers[1:])
    doc = np.asarray(document_indices, dtype="<i8")
    with open(idx_path, "wb") as f:
        f.write(_INDEX_MAGIC)
        f.write(struct.pack("<Q", _INDEX_VERSION))
        f.write(struct.pack("<B", DType.code_from_dtype(dtype)))
        f.write(struct.pack("<Q", lengths.size))
        f.write(struct.pack("<Q", doc.size))
        f.write(lengths.astype("<i4").tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(doc.tobytes(order="C"))
        if sequence_modes is not None:
            f.write(np.asarray(sequence_modes, dtype="<i1").tobytes(order="C"))


class IndexedDatasetBuilder:
    """Writes a ``.bin``/``.idx`` pair.

    Tokens go to a temporary file next to ``bin_path``; :meth:`finalize` writes the index to a
    temporary file too and then renames both into place, so an interrupted run never leaves a pair
    that looks complete. Use either ``add_item`` (one sequence) + ``end_document``, or
    ``add_document`` (a whole document with its sequence lengths), or ``add_index`` (append an
    existing dataset).
    """

    def __init__(self, bin_path: str, dtype=np.int32, multimodal: bool = False):
        self.bin_path = bin_path
        self.dtype = np.dtype(dtype)
        DType.code_from_dtype(self.dtype)  # validates the dtype
        self.multimodal = multimodal
        self._tmp_bin_path = _temporary_path(bin_path)
        self._bin = open(self._tmp_bin_path, "wb")
        self._lengths = array("q")
        self._document_indices = array("q", [0])
        self._modes = array("b") if multimodal else None
        self._finalized = False

    # -- adding data -------------------------------------------------------------------------
    def _check_open(self):
        if self._finalized or self._bin is None:
            raise RuntimeError(f"IndexedDatasetBuilder for {self.bin_path} is already finalized or closed")

    def _write_tokens(self, tokens) -> int:
        arr = _as_numpy(tokens)
        if arr.dtype != self.dtype:
            if arr.size and np.issubdtype(arr.dtype, np.integer) and np.issubdtype(self.dtype, np.integer):
                info = np.iinfo(self.dtype)
                if arr.min() < info.min or arr.max() > info.max:
                    raise ValueError(
                        f"token ids in [{arr.min()}, {arr.max()}] do not fit the dataset dtype "
                        f"{self.dtype.name}; build with a wider dtype (DType.optimal_dtype(vocab_size))"
                    )
            arr = arr.astype(self.dtype)
        self._bin.write(np.ascontiguousarray(arr.reshape(-1), dtype=self.dtype.newbyteorder("<")).tobytes())
        return int(arr.size)

    def add_item(self, tokens, mode: int = 0) -> None:
        """Append one sequence (array, list or tensor of token ids)."""
        self._check_open()
        self._lengths.append(self._write_tokens(tokens))
        if self._modes is not None:
            self._modes.append(mode)

    def end_document(self) -> None:
        """Close the current document (the sequences added since the last boundary)."""
        self._check_open()
        self._document_indices.append(len(self._lengths))

    def add_document(self, tokens, lengths: Sequence[int], modes: Optional[Sequence[int]] = None) -> None:
        """Append a document: ``tokens`` holds its sequences back to back, ``lengths`` their sizes."""
        self._check_open()
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        n = self._write_tokens(tokens)
        if int(lengths.sum()) != n:
            raise ValueError(f"add_document: lengths sum to {int(lengths.sum())} but {n} tokens were given")
        self._lengths.frombytes(lengths.astype(np.int64).tobytes())
        if self._modes is not None:
            m = np.zeros(lengths.size, np.int8) if modes is None else np.asarray(modes, np.int8)
            self._modes.frombytes(m.tobytes())
        self._document_indices.append(len(self._lengths))

    def add_index(self, prefix: str) -> None:
        """Append every document of the dataset at ``prefix`` (its index entries and .bin bytes)."""
        self._check_open()
        other = IndexedDataset(prefix, mmap=False)
        if np.dtype(other.dtype) != self.dtype:
            raise ValueError(
                f"add_index: {prefix} stores {np.dtype(other.dtype).name} tokens but this builder writes "
                f"{self.dtype.name}; both must use the same dtype"
            )
        offset = len(self._lengths)
        self._lengths.frombytes(other.sequence_lengths.astype(np.int64).tobytes())
        self._document_indices.frombytes((other.document_indices[1:].astype(np.int64) + offset).tobytes())
        if self._modes is not None:
            modes = other.sequence_modes
            m = np.zeros(len(other), np.int8) if modes is None else np.asarray(modes, np.int8)
            self._modes.frombytes(m.tobytes())
        other.close()
        with open(data_file_path(_strip_extension(prefix)), "rb") as src:
            shutil.copyfileobj(src, self._bin, _COPY_CHUNK_BYTES)

    # -- finishing ---------------------------------------------------------------------------
    def finalize(self, idx_path: str) -> None:
        """Write the index and move both files into place (.bin first, then .idx)."""
        self._check_open()
        self._bin.close()
        self._bin = None
        tmp_idx = _temporary_path(idx_path)
        try:
            write_index_file(
                tmp_idx,
                self.dtype,
                np.frombuffer(self._lengths, dtype=np.int64),
                np.frombuffer(self._document_indices, dtype=np.int64),
                None if self._modes is None else np.frombuffer(self._modes, dtype=np.int8),
            )
            os.replace(self._tmp_bin_path, self.bin_path)
            os.replace(tmp_idx, idx_path)
        except BaseException:
            for p in (tmp_idx, self._tmp_bin_path):
                if os.path.exists(p):
                    os.remove(p)
            raise
        self._finalized = True

    def close(self) -> None:
        """Abandon an unfinished dataset: close and delete the temporary .bin."""
        if self._bin is not None:
            self._bin.close()
            self._bin = None
        if not self._finalized and os.path.exists(self._tmp_bin_path):
            os.remove(self._tmp_bin_path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class _Index:
    """Parsed and validated .idx file (arrays are views of a memory map)."""

    def __init__(self, idx_path: str, bin_path: str, multimodal: Optional[bool]):
        self.path = idx_path
        if not os.path.isfile(idx_path):
            raise FileNotFoundError(f"indexed dataset index file {idx_path} does not exist")
        if not os.path.isfile(bin_path):
            raise FileNotFoundError(f"indexed dataset data file {bin_path} does not exist (next to {idx_path})")
        file_size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            header = f.read(_HEADER_SIZE)
        magic = header[:9]
        if len(magic) < 9 and _INDEX_MAGIC.startswith(magic):
            raise IndexedDatasetError(
                f"{idx_path}: truncated index ({file_size} bytes; the header alone is {_HEADER_SIZE})"
            )
        if magic != _INDEX_MAGIC:
            if header.startswith(_LEGACY_MAGIC):
                raise IndexedDatasetError(
                    f"{idx_path}: magic {magic!r} is the old Megatron 'cached'/'lazy' indexed dataset format "
                    f"(TNTIDX), which is not supported; re-run tools/preprocess_data.py to write the "
                    f"MMIDIDX format"
                )
            raise IndexedDatasetError(
                f"{idx_path}: not a Megatron indexed-dataset index (magic {magic!r}, expected "
                f"{_INDEX_MAGIC!r}); pass the prefix of a .bin/.idx pair written by preprocess_data"
            )
        if len(header) < _HEADER_SIZE:
            raise IndexedDatasetError(
                f"{idx_path}: truncated header ({file_size} bytes, the header alone is {_HEADER_SIZE})"
            )
        (version,) = struct.unpack("<Q", header[9:17])
        if version != _INDEX_VERSION:
            raise IndexedDatasetError(f"{idx_path}: unsupported index version {version} (only version 1 exists)")
        (code,) = struct.unpack("<B", header[17:18])
        try:
            self.dtype = DType.dtype_from_code(code)
        except ValueError as e:
            raise IndexedDatasetError(f"{idx_path}: {e}") from None
        self.dtype_size = np.dtype(self.dtype).itemsize
        (self.sequence_count,) = struct.unpack("<Q", header[18:26])
        (self.document_count,) = struct.unpack("<Q", header[26:34])
        S, D = self.sequence_count, self.document_count
        expected = _HEADER_SIZE + S * 4 + S * 8 + D * 8
        if multimodal is None:
            multimodal = file_size == expected + S and S > 0
        self.multimodal = bool(multimodal)
        if self.multimodal:
            expected += S
        if file_size != expected:
            what = "truncated" if file_size < expected else "has trailing bytes"
            raise IndexedDatasetError(
                f"{idx_path}: index {what}: header says {S} sequences and {D} document boundaries, which "
                f"needs {expected} bytes, but the file has {file_size}"
            )
        if D < 1:
            raise IndexedDatasetError(f"{idx_path}: document count is 0 (a valid index stores at least [0])")

        self._mmap = np.memmap(idx_path, mode="r", order="C") if file_size > 0 else None
        buf = self._mmap
        offset = _HEADER_SIZE
        self.sequence_lengths = np.frombuffer(buf, dtype="<i4", count=S, offset=offset)
        offset += S * 4
        self.sequence_pointers = np.frombuffer(buf, dtype="<i8", count=S, offset=offset)
        offset += S * 8
        self.document_indices = np.frombuffer(buf, dtype="<i8", count=D, offset=offset)
        offset += D * 8
        self.sequence_modes = np.frombuffer(buf, dtype="<i1", count=S, offset=offset) if self.multimodal else None
        self._validate(bin_path)

    def _validate(self, bin_path: str) -> None:
        p, S = self.path, self.sequence_count
        doc = self.document_indices
        if doc[0] != 0 or doc[-1] != S:
            raise IndexedDatasetError(
                f"{p}: inconsistent document indices: they must start at 0 and end at the sequence count "
                f"{S}, but run from {int(doc[0])} to {int(doc[-1])}"
            )
        if doc.size > 1 and np.any(doc[1:] < doc[:-1]):
            bad = int(np.argmax(doc[1:] < doc[:-1]))
            raise IndexedDatasetError(
                f"{p}: inconsistent document indices: entry {bad + 1} ({int(doc[bad + 1])}) is smaller than "
                f"entry {bad} ({int(doc[bad])})"
            )
        total_tokens = 0
        step = _VALIDATION_CHUNK
        for beg in range(0, S, step):
            lengths = self.sequence_lengths[beg : beg + step].astype(np.int64)
            if lengths.size and lengths.min() < 0:
                raise IndexedDatasetError(f"{p}: negative sequence length in block starting at {beg}")
            expected_ptr = (np.cumsum(lengths) - lengths + total_tokens) * self.dtype_size
            if not np.array_equal(expected_ptr, self.sequence_pointers[beg : beg + step]):
                bad = beg + int(np.argmax(expected_ptr != self.sequence_pointers[beg : beg + step]))
                raise IndexedDatasetError(
                    f"{p}: sequence pointer {bad} is {int(self.sequence_pointers[bad])}, but the lengths "
                    f"before it put it at byte {int(expected_ptr[bad - beg])}"
                )
            total_tokens += int(lengths.sum())
        self.num_tokens = total_tokens
        bin_size = os.path.getsize(bin_path)
        if bin_size != total_tokens * self.dtype_size:
            what = "truncated" if bin_size < total_tokens * self.dtype_size else "longer than the index says"
            raise IndexedDatasetError(
                f"{bin_path}: data file {what}: {p} lists {total_tokens} tokens of "
                f"{np.dtype(self.dtype).name} ({total_tokens * self.dtype_size} bytes), but the file has "
                f"{bin_size} bytes; re-create the dataset"
            )

    def close(self):
        self._mmap = None


class _MMapBinReader:
    def __init__(self, path: str):
        size = os.path.getsize(path)
        self._buffer = np.memmap(path, mode="r", order="C") if size > 0 else np.zeros(0, np.uint8)

    def read(self, dtype, count: int, offset: int) -> np.ndarray:
        return np.frombuffer(self._buffer, dtype=dtype, count=count, offset=offset)

    def close(self):
        self._buffer = None


class _FileBinReader:
    """Reads with file-pointer I/O (``--no-mmap-bin-files``)."""

    def __init__(self, path: str):
        self._path = path

    def read(self, dtype, count: int, offset: int) -> np.ndarray:
        out = np.empty(count, dtype=dtype)
        with open(self._path, "rb", buffering=0) as f:
            f.seek(offset)
            f.readinto(memoryview(out).cast("B"))
        return out

    def close(self):
        pass


class IndexedDataset:
    """Read-only view of a ``.bin``/``.idx`` pair. ``ds[i]`` is sequence ``i`` as a numpy array."""

    def __init__(self, path_prefix: str, multimodal: Optional[bool] = None, mmap: bool = True):
        self.path_prefix = _strip_extension(path_prefix)
        self.multimodal = multimodal
        self.mmap = mmap
        self.index = _Index(index_file_path(self.path_prefix), data_file_path(self.path_prefix), multimodal)
        self.bin_reader = _MMapBinReader(data_file_path(self.path_prefix)) if mmap else _FileBinReader(
            data_file_path(self.path_prefix)
        )

    def __getstate__(self):
        # Reopen by path in another process (e.g. a spawned DataLoader worker) instead of pickling
        # the memory-mapped contents.
        return {"path_prefix": self.path_prefix, "multimodal": self.multimodal, "mmap": self.mmap}

    def __setstate__(self, state):
        self.__init__(state["path_prefix"], multimodal=state["multimodal"], mmap=state["mmap"])

    @staticmethod
    def exists(path_prefix: str) -> bool:
        """Whether both ``<prefix>.idx`` and ``<prefix>.bin`` exist."""
        prefix = _strip_extension(path_prefix)
        return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))

    def __len__(self) -> int:
        return self.index.sequence_count

    def __getitem__(self, idx: Union[int, np.integer, slice]):
        if isinstance(idx, (int, np.integer)):
            i = self._check_index(int(idx))
            return self.bin_reader.read(
                self.dtype, int(self.index.sequence_lengths[i]), int(self.index.sequence_pointers[i])
            )
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("IndexedDataset slices must be contiguous (step 1)")
            if stop <= start:
                return []
            lengths = self.index.sequence_lengths[start:stop].astype(np.int64)
            total = int(lengths.sum())
            flat = self.bin_reader.read(self.dtype, total, int(self.index.sequence_pointers[start]))
            return np.split(flat, np.cumsum(lengths)[:-1])
        raise TypeError(f"IndexedDataset indices must be int or slice, not {type(idx).__name__}")

    def _check_index(self, i: int) -> int:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {i} out of range for {self.path_prefix} with {n} sequences")
        return i

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (to its end if length is None)."""
        i = self._check_index(int(idx))
        seq_len = int(self.index.sequence_lengths[i])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(
                f"get({i}, offset={offset}, length={length}) reaches outside sequence {i} of length {seq_len}"
            )
        ptr = int(self.index.sequence_pointers[i]) + offset * self.index.dtype_size
        return self.bin_reader.read(self.dtype, int(length), ptr)

    @property
    def dtype(self):
        return self.index.dtype

    @property
    def sequence_lengths(self) -> np.ndarray:
        """int32[S] tokens per sequence."""
        return self.index.sequence_lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        """int64[S] byte offset of each sequence in the .bin file."""
        return self.index.sequence_pointers

    @property
    def document_indices(self) -> np.ndarray:
        """int64[D] sequence index boundaries of the documents."""
        return self.index.document_indices

    @property
    def sequence_modes(self) -> Optional[np.ndarray]:
        return self.index.sequence_modes

    @property
    def num_tokens(self) -> int:
        return self.index.num_tokens

    def close(self) -> None:
        self.bin_reader.close()
        self.index.close()

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.path_prefix!r}, sequences={len(self)}, "
            f"documents={len(self.document_indices) - 1}, dtype={np.dtype(self.dtype).name})"
        )


def get_bin_path(prefix: str) -> str:  # Megatron-compatible helper names
    return data_file_path(prefix)


def get_idx_path(prefix: str) -> str:
    return index_file_path(prefix)
