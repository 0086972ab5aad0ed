import os
import struct

import numpy as np
import pytest
import torch

from gigatron.core.data.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
)

ALL_DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.int64, np.float64, np.float32, np.uint16]


# An independent writer following the documented byte layout (struct + plain Python lists).
def reference_write(prefix, dtype, docs):
    """docs: list of documents, each a list of sequences (lists of ints)."""
    codes = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7, np.uint16: 8}
    itemsize = np.dtype(dtype).itemsize
    lengths, doc_idx = [], [0]
    with open(prefix + ".bin", "wb") as f:
        for doc in docs:
            for seq in doc:
                f.write(np.array(seq, dtype=np.dtype(dtype).newbyteorder("<")).tobytes())
                lengths.append(len(seq))
            doc_idx.append(len(lengths))
    pointers, p = [], 0
    for n in lengths:
        pointers.append(p)
        p += n * itemsize
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", codes[dtype]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(b"".join(struct.pack("<i", n) for n in lengths))
        f.write(b"".join(struct.pack("<q", x) for x in pointers))
        f.write(b"".join(struct.pack("<q", x) for x in doc_idx))


def random_docs(rng, num_docs=7, vmax=100):
    docs = []
    for d in range(num_docs):
        nseq = int(rng.integers(0, 4)) if d != 0 else 2
        docs.append([rng.integers(0, vmax, size=int(rng.integers(0, 9))).tolist() for _ in range(nseq)])
    return docs


def write_ours(prefix, dtype, docs, mode="item"):
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        if mode == "item":
            for seq in doc:
                b.add_item(torch.tensor(seq, dtype=torch.int64))
            b.end_document()
        else:
            flat = np.array([t for seq in doc for t in seq], dtype=np.int64)
            b.add_document(flat, [len(s) for s in doc])
    b.finalize(prefix + ".idx")


def test_dtype_codes():
    assert [DType.code_from_dtype(d) for d in ALL_DTYPES] == [1, 2, 3, 4, 5, 6, 7, 8]
    for d in ALL_DTYPES:
        assert DType.dtype_from_code(DType.code_from_dtype(d)) is d
    assert DType.optimal_dtype(50257) is np.uint16
    assert DType.optimal_dtype(65499) is np.uint16
    assert DType.optimal_dtype(65500) is np.int32
    assert DType.size(8) == 2 and DType.size(np.int64) == 8
    with pytest.raises(ValueError, match="unknown dtype code 9"):
        DType.dtype_from_code(9)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("mode", ["item", "document"])
def test_round_trip_and_byte_identity(tmp_path, dtype, mode):
    rng = np.random.default_rng(0)
    docs = random_docs(rng)
    ours, ref = str(tmp_path / "ours"), str(tmp_path / "ref")
    write_ours(ours, dtype, docs, mode)
    reference_write(ref, dtype, docs)
    for ext in (".bin", ".idx"):
        assert open(ours + ext, "rb").read() == open(ref + ext, "rb").read()
    seqs = [s for d in docs for s in d]
    for mmap in (True, False):
        ds = IndexedDataset(ours, mmap=mmap)
        assert len(ds) == len(seqs)
        assert ds.dtype is dtype
        for i, s in enumerate(seqs):
            np.testing.assert_array_equal(ds[i], np.array(s, dtype=dtype))
            assert ds[i].dtype == dtype
        expected_doc = np.cumsum([0] + [len(d) for d in docs])
        np.testing.assert_array_equal(ds.document_indices, expected_doc)
        np.testing.assert_array_equal(ds.sequence_lengths, [len(s) for s in seqs])


def test_golden_index_bytes(tmp_path):
    # Two documents: [[1, 2, 3]], [[4], [5, 6]] as uint16.
    prefix = str(tmp_path / "g")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    b.add_item([1, 2, 3])
    b.end_document()
    b.add_document(np.array([4, 5, 6]), [1, 2])
    b.finalize(prefix + ".idx")
    golden = bytes.fromhex(
        "4d4d494449445800 00"  # magic MMIDIDX\0\0
        "0100000000000000"  # version 1
        "08"  # dtype code 8 = uint16
        "0300000000000000"  # 3 sequences
        "0300000000000000"  # 3 document boundaries
        "03000000 01000000 02000000"  # lengths
        "0000000000000000 0600000000000000 0800000000000000"  # byte pointers
        "0000000000000000 0100000000000000 0300000000000000"  # document indices
        .replace(" ", "")
    )
    assert open(prefix + ".idx", "rb").read() == golden
    assert open(prefix + ".bin", "rb").read() == np.array([1, 2, 3, 4, 5, 6], "<u2").tobytes()


def test_get_slices_and_exists(tmp_path):
    prefix = str(tmp_path / "d")
    assert not IndexedDataset.exists(prefix)
    write_ours(prefix, np.int32, [[[0, 1, 2, 3, 4]], [[5, 6], [7, 8, 9]]])
    assert IndexedDataset.exists(prefix)
    ds = IndexedDataset(prefix)
    np.testing.assert_array_equal(ds.get(0, offset=1, length=3), [1, 2, 3])
    np.testing.assert_array_equal(ds.get(0, offset=2), [2, 3, 4])
    np.testing.assert_array_equal(ds.get(2, length=2), [7, 8])
    parts = ds[0:3]
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]
    np.testing.assert_array_equal(ds[-1], [7, 8, 9])
    np.testing.assert_array_equal(ds.sequence_pointers, [0, 20, 28])
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(IndexError):
        ds.get(1, offset=1, length=2)


def test_add_index_concatenates(tmp_path):
    rng = np.random.default_rng(1)
    parts = [random_docs(rng, 5) for _ in range(3)]
    for k, docs in enumerate(parts):
        write_ours(str(tmp_path / f"p{k}"), np.uint16, docs)
    merged = str(tmp_path / "merged")
    b = IndexedDatasetBuilder(merged + ".bin", dtype=np.uint16)
    for k in range(3):
        b.add_index(str(tmp_path / f"p{k}"))
    b.finalize(merged + ".idx")
    ref = str(tmp_path / "ref")
    reference_write(ref, np.uint16, [d for docs in parts for d in docs])
    for ext in (".bin", ".idx"):
        assert open(merged + ext, "rb").read() == open(ref + ext, "rb").read()


def test_add_index_dtype_mismatch(tmp_path):
    write_ours(str(tmp_path / "a"), np.uint16, [[[1, 2]]])
    b = IndexedDatasetBuilder(str(tmp_path / "b.bin"), dtype=np.int32)
    with pytest.raises(ValueError, match="same dtype"):
        b.add_index(str(tmp_path / "a"))
    b.close()


def test_unfinished_builder_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "x")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    b.add_item([1, 2, 3])
    b.end_document()
    assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")
    assert not IndexedDataset.exists(prefix)
    b.close()
    assert os.listdir(tmp_path) == []


def test_token_out_of_range_for_dtype(tmp_path):
    b = IndexedDatasetBuilder(str(tmp_path / "x.bin"), dtype=np.uint16)
    with pytest.raises(ValueError, match="do not fit"):
        b.add_item([1, 70000])
    b.close()


# --- corrupt files ----------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path):
    prefix = str(tmp_path / "good")
    write_ours(prefix, np.int32, [[[1, 2, 3], [4]], [[5, 6]]])
    return prefix


def _rewrite(path, fn):
    data = bytearray(open(path, "rb").read())
    data = fn(data)
    open(path, "wb").write(bytes(data))


def test_truncated_bin(good):
    _rewrite(good + ".bin", lambda d: d[:-4])
    with pytest.raises(IndexedDatasetError, match=r"good\.bin.*truncated.*6 tokens"):
        IndexedDataset(good)


def test_bin_with_extra_bytes(good):
    _rewrite(good + ".bin", lambda d: d + b"\0\0\0\0")
    with pytest.raises(IndexedDatasetError, match="longer than the index"):
        IndexedDataset(good)


def test_truncated_idx(good):
    _rewrite(good + ".idx", lambda d: d[:-8])
    with pytest.raises(IndexedDatasetError, match=r"good\.idx.*truncated"):
        IndexedDataset(good)


def test_short_idx_header(good):
    _rewrite(good + ".idx", lambda d: d[:20])
    with pytest.raises(IndexedDatasetError, match="truncated"):
        IndexedDataset(good)
    _rewrite(good + ".idx", lambda d: d[:5])
    with pytest.raises(IndexedDatasetError, match="truncated"):
        IndexedDataset(good)


def test_wrong_magic(good):
    _rewrite(good + ".idx", lambda d: b"GARBAGE!!" + d[9:])
    with pytest.raises(IndexedDatasetError, match=r"good\.idx.*magic b'GARBAGE!!'"):
        IndexedDataset(good)


def test_legacy_magic(good):
    _rewrite(good + ".idx", lambda d: b"TNTIDX\x00\x00" + d[8:])
    with pytest.raises(IndexedDatasetError, match="TNTIDX"):
        IndexedDataset(good)


def test_unknown_version(good):
    _rewrite(good + ".idx", lambda d: d[:9] + struct.pack("<Q", 2) + d[17:])
    with pytest.raises(IndexedDatasetError, match="version 2"):
        IndexedDataset(good)


def test_unknown_dtype_code(good):
    _rewrite(good + ".idx", lambda d: d[:17] + bytes([9]) + d[18:])
    with pytest.raises(IndexedDatasetError, match="dtype code 9"):
        IndexedDataset(good)


def test_inconsistent_document_indices(good):
    # document indices start at 34 + 3*4 + 3*8 = 70; set the last one to 2 (should be 3)
    _rewrite(good + ".idx", lambda d: d[:70 + 16] + struct.pack("<q", 2))
    with pytest.raises(IndexedDatasetError, match="document indices"):
        IndexedDataset(good)
    _rewrite(good + ".idx", lambda d: d[:70 + 8] + struct.pack("<q", 4) + struct.pack("<q", 3))
    with pytest.raises(IndexedDatasetError, match="document indices"):
        IndexedDataset(good)


def test_inconsistent_pointer(good):
    _rewrite(good + ".idx", lambda d: d[:34 + 12 + 8] + struct.pack("<q", 4) + d[34 + 12 + 16 :])
    with pytest.raises(IndexedDatasetError, match="pointer 1"):
        IndexedDataset(good)


def test_missing_files(tmp_path, good):
    with pytest.raises(FileNotFoundError, match="nope.idx"):
        IndexedDataset(str(tmp_path / "nope"))
    os.remove(good + ".bin")
    with pytest.raises(FileNotFoundError, match=r"good\.bin"):
        IndexedDataset(good)


def test_pickle_reopens_by_path(tmp_path):
    import pickle

    prefix = str(tmp_path / "d")
    write_ours(prefix, np.uint16, [[list(range(1000))]])
    ds = IndexedDataset(prefix)
    blob = pickle.dumps(ds)
    assert len(blob) < 1000  # the token data is not pickled
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again[0], ds[0])


def test_multimodal_modes_round_trip(tmp_path):
    prefix = str(tmp_path / "mm")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32, multimodal=True)
    b.add_item([1, 2], mode=0)
    b.add_item([3], mode=1)
    b.end_document()
    b.finalize(prefix + ".idx")
    ds = IndexedDataset(prefix, multimodal=True)
    assert ds.sequence_modes.tolist() == [0, 1]
    assert os.path.getsize(prefix + ".idx") == 34 + 2 * 4 + 2 * 8 + 2 * 8 + 2
