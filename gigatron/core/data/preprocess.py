"""Turn JSON-lines text into Megatron indexed datasets (the library behind tools/preprocess_data.py).

    stats = preprocess(PreprocessConfig(input="corpus.jsonl", output_prefix="out/my-gpt2",
                                        tokenizer_type="GPT2BPETokenizer", vocab_file=..., merge_file=...,
                                        append_eod=True, workers=2))
    # -> out/my-gpt2_text_document.bin / .idx

How the work flows (and why it is fast):
- The main process reads the input (plain or ``.gz``) in blocks of whole lines (``chunk_bytes``)
  and never holds more than a few blocks per worker, so inputs larger than memory stream through.
- Worker processes parse a block's lines (orjson when installed), optionally split sentences, and
  encode all texts of the block in one batch call of the tokenizer library, which runs outside the
  interpreter lock on ``threads_per_worker`` threads. Token ids come back as one numpy array per
  block and JSON key, with sequence lengths and sequences per document: no Python work per token.
- The main process appends documents to one ``IndexedDatasetBuilder`` per key, in input order.
- With ``partitions > 1`` the input is cut into that many line-aligned byte ranges, each processed
  by ``workers / partitions`` workers into its own temporary dataset; these are then concatenated
  (``add_index``) in order, so the output is the same as with one partition.

The files are byte-identical to Megatron's for the same token sequences. As in Megatron, a
sequence (sentence, or whole document without ``split_sentences``) with no tokens is dropped, and
a document with no tokens at all still closes a document (a boundary with no sequences); such
documents are counted and reported. ``append_eod`` adds the end-of-document id to the last sequence
of every non-empty document.

Outputs are written under hidden temporary names and renamed only when every output is complete
and holds tokens; an old dataset of the same name has its ``.idx`` removed before the new pair is
moved in, so an interrupted, failed or empty run never leaves a pair that looks valid and never
replaces an existing dataset. An input without documents or tokens is refused.

Interrupts: workers and partition processes ignore SIGINT (Ctrl-C reaches the whole process group)
and die with their parent (and quietly, by SIGPIPE, if they write to a reader that is gone); the main process turns SIGTERM into an exit that runs the same clean-up
as Ctrl-C: the workers are terminated at once (never waited for; see ``_stop_pool``), partition
processes are killed, temporaries are removed, and nothing is renamed into place. A worker or
partition that dies (killed, out of memory) stops the run with an error instead of a wait forever.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import multiprocessing
import os
import queue as queue_module
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from gigatron.core.data.indexed_dataset import DType, IndexedDatasetBuilder

try:  # orjson parses JSON several times faster than the standard library
    import orjson as _json_lib

    _loads = _json_lib.loads
    _JSONError = _json_lib.JSONDecodeError
except ImportError:  # pragma: no cover - depends on the environment
    import json as _json_lib

    _loads = _json_lib.loads
    _JSONError = ValueError


@dataclass
class PreprocessConfig:
    """Options of tools/preprocess_data.py; field names are its flag names with ``_`` for ``-``."""

    input: str
    """JSON-lines file (one JSON object per line), plain or gzip-compressed (``.gz``)."""
    output_prefix: str
    """Outputs are ``{output_prefix}_{key}_{document|sentence}.bin/.idx``."""
    json_keys: list = field(default_factory=lambda: ["text"])
    """Keys whose text is tokenized; one output pair per key."""
    split_sentences: bool = False
    """Split documents into sentences (each sentence one sequence; outputs named ``_sentence``)."""
    keep_newlines: bool = False
    """With ``split_sentences``: keep the whitespace (newlines) that follows each sentence."""
    lang: str = "english"
    """Language for sentence splitting (english, or a language that pysbd knows)."""
    append_eod: bool = False
    """Append the tokenizer's end-of-document id to every non-empty document."""
    workers: int = 1
    """Worker processes (in all partitions together)."""
    partitions: int = 1
    """Split the input into this many parts processed side by side and merged (must divide workers)."""
    log_interval: int = 1000
    """Print a progress line every this many documents."""
    skip_bad_lines: bool = False
    """Count and skip lines that are not JSON objects with the keys as text, instead of stopping."""
    threads_per_worker: Optional[int] = None
    """Tokenizer library threads in each worker (None: usable cores divided by workers)."""
    chunk_bytes: int = 1 << 20
    """Bytes of input lines handed to a worker at a time."""
    tokenizer_type: Optional[str] = None
    """Megatron's --tokenizer-type name."""
    vocab_file: Optional[str] = None
    """vocab.json (GPT-2) or vocab.txt (BERT)."""
    merge_file: Optional[str] = None
    """merges.txt (GPT-2)."""
    tokenizer_model: Optional[str] = None
    """SentencePiece .model, HuggingFace tokenizer.json or folder, or tiktoken ranks file."""
    vocab_size: Optional[int] = None
    """NullTokenizer / TikTokenizer vocabulary size."""
    vocab_extra_ids: int = 0
    """Number of T5 sentinel tokens added to BERT and SentencePiece vocabularies."""
    tiktoken_pattern: Optional[str] = None
    """TikTokenizer pre-tokenization pattern: v1 or v2."""
    tiktoken_num_special_tokens: int = 1000
    """TikTokenizer: ids reserved for special tokens."""
    tiktoken_special_tokens: Optional[list] = None
    """TikTokenizer special tokens (must include <unk>, <s>, </s>)."""


@dataclass
class PreprocessStats:
    """What a run did (also printed at its end)."""

    documents: int = 0
    """Documents (JSON lines) tokenized."""
    tokens: int = 0
    """Tokens written, over all keys."""
    bytes: int = 0
    """Input bytes read (decompressed)."""
    sequences: int = 0
    """Sequences written, over all keys."""
    empty_documents: dict = field(default_factory=dict)
    """key -> documents with no tokens (written as document boundaries without sequences)."""
    blank_lines: int = 0
    """Whitespace-only lines, ignored."""
    bad_lines: int = 0
    """Lines skipped by ``skip_bad_lines``."""
    bad_line_examples: list = field(default_factory=list)
    """``file:line: problem`` for the first few skipped lines."""
    elapsed: float = 0.0
    """Seconds."""
    outputs: list = field(default_factory=list)
    """Prefixes of the datasets written."""

    def add(self, other: "PreprocessStats") -> None:
        for name in ("documents", "tokens", "bytes", "sequences", "blank_lines", "bad_lines"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for k, v in other.empty_documents.items():
            self.empty_documents[k] = self.empty_documents.get(k, 0) + v
        self.bad_line_examples.extend(other.bad_line_examples)


class PreprocessError(ValueError):
    """Bad input (with ``file:line``) or bad options; nothing was written."""


class _LineError(Exception):
    """Raised in a worker: problem at decompressed byte ``offset`` of the input."""

    def __init__(self, offset: int, message: str):
        super().__init__(offset, message)
        self.offset = offset
        self.message = message


_MAX_EXAMPLES = 5


# ---------------------------------------------------------------------------------------------
# Reading


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _skip_to(f, offset: int, path: str) -> None:
    if path.endswith(".gz"):
        remaining = offset
        while remaining > 0:
            got = f.read(min(remaining, 1 << 22))
            if not got:
                return
            remaining -= len(got)
    else:
        f.seek(offset)


def iter_line_chunks(path: str, chunk_bytes: int, start: int = 0, end: Optional[int] = None):
    """Yield ``(block, offset)``: blocks of whole lines whose first byte lies in ``[start, end)``.

    Offsets count decompressed bytes. A last line without a newline is included.
    """
    with _open_binary(path) as f:
        pos = 0
        if start > 0:
            # Drop the line that straddles ``start``; a line beginning exactly at start is kept.
            _skip_to(f, start - 1, path)
            pos = start - 1 + len(f.readline())
        pending: list[bytes] = []  # bytes read after the last newline seen
        while end is None or pos < end:
            data = f.read(chunk_bytes)
            if not data:
                tail = b"".join(pending)
                if tail:
                    yield tail, pos
                return
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                pending.append(data)
                continue
            block = b"".join(pending) + data[:cut] if pending else data[:cut]
            pending = [data[cut:]] if cut < len(data) else []
            if end is not None and pos + len(block) > end:
                # keep the lines that start before ``end``
                last = block.find(b"\n", end - 1 - pos)
                yield block[: last + 1], pos
                return
            yield block, pos
            pos += len(block)


def input_size(path: str) -> int:
    """Decompressed size of the input in bytes (reads a .gz file through once)."""
    if not path.endswith(".gz"):
        return os.path.getsize(path)
    total = 0
    with gzip.open(path, "rb") as f:
        while True:
            got = f.read(1 << 22)
            if not got:
                return total
            total += len(got)


def line_numbers_at(path: str, offsets: list) -> dict:
    """1-based line number of each decompressed byte offset (one pass over the file)."""
    wanted = sorted(set(offsets))
    result, lines, pos, k = {}, 0, 0, 0
    with _open_binary(path) as f:
        while k < len(wanted):
            block = f.read(1 << 22)
            if not block:
                break
            while k < len(wanted) and wanted[k] < pos + len(block):
                result[wanted[k]] = lines + block.count(b"\n", 0, wanted[k] - pos) + 1
                k += 1
            lines += block.count(b"\n")
            pos += len(block)
    for off in wanted[k:]:
        result[off] = lines + 1
    return result


# ---------------------------------------------------------------------------------------------
# Worker side

_WORKER: dict = {}


def _tokenizer_args(config: PreprocessConfig):
    from types import SimpleNamespace

    return SimpleNamespace(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})


def _die_with_parent(parent_pid: int, sig: int) -> None:
    """Have the kernel send `sig` to this process when its parent exits (Linux), so that a main
    process killed outright leaves no worker behind; exit now if the parent is already gone."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _init_worker(config: PreprocessConfig, threads: int, parent_pid: int) -> None:
    # Ctrl-C is for the main process: it terminates the workers. SIGTERM (sent by terminate) just ends them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # A worker whose reader was just killed (a stopped partition) must end quietly when it writes
    # its result, not print a BrokenPipeError traceback in the moment before its own SIGKILL comes.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    _die_with_parent(parent_pid, signal.SIGKILL)
    # The Rust tokenizers library sizes its thread pool from this variable on first use.
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    from gigatron.core.tokenizers import build_tokenizer
    from gigatron.core.tokenizers.sentence_splitter import SentenceSplitter

    tokenizer = build_tokenizer(_tokenizer_args(config))
    tokenizer.num_threads = threads
    _WORKER.clear()
    _WORKER.update(
        config=config,
        tokenizer=tokenizer,
        dtype=np.dtype(DType.optimal_dtype(tokenizer.vocab_size)),
        eod=tokenizer.eod if config.append_eod else None,
        splitter=SentenceSplitter(config.lang, config.keep_newlines) if config.split_sentences else None,
    )


def _describe_keys(obj: dict) -> str:
    keys = list(obj.keys())
    shown = ", ".join(repr(k) for k in keys[:20])
    return f"[{shown}{', ...' if len(keys) > 20 else ''}]"


def _parse_block(block: bytes, offset: int, keys: list, skip_bad: bool):
    """Texts per key of the block's documents, plus (blank lines, [(offset, problem)] skipped)."""
    texts = {k: [] for k in keys}
    blank, bad = 0, []
    pos = offset
    body = block[:-1] if block.endswith(b"\n") else block
    for line in body.split(b"\n"):
        line_offset = pos
        pos += len(line) + 1
        if not line.strip():
            blank += 1
            continue
        problem = None
        try:
            obj = _loads(line)
        except (_JSONError, ValueError) as e:
            problem = f"malformed JSON ({e})"
        else:
            if not isinstance(obj, dict):
                problem = f"expected a JSON object, found {type(obj).__name__}"
            else:
                values = []
                for k in keys:
                    if k not in obj:
                        problem = (f"key {k!r} not found; keys present: {_describe_keys(obj)} "
                                   "(choose keys with --json-keys)")
                        break
                    v = obj[k]
                    if not (isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))):
                        problem = f"key {k!r} holds {type(v).__name__}, expected text (a string or a list of strings)"
                        break
                    values.append(v)
        if problem is not None:
            if not skip_bad:
                raise _LineError(line_offset, problem + " (or pass --skip-bad-lines to skip such lines)")
            bad.append((line_offset, problem))
            continue
        for k, v in zip(keys, values):
            texts[k].append(v)
    return texts, blank, bad


def _encode_texts(values: list, num_docs: int):
    """Token ids, sequence lengths and sequences per document for one key of a block."""
    w = _WORKER
    splitter, tokenizer = w["splitter"], w["tokenizer"]
    if splitter is None and all(isinstance(v, str) for v in values):
        pieces, piece_doc = values, np.arange(num_docs, dtype=np.int64)
    else:
        pieces, owners = [], []
        for d, v in enumerate(values):
            parts = v if isinstance(v, list) else (splitter.split(v) if splitter is not None else [v])
            pieces.extend(parts)
            owners.append(len(parts))
        piece_doc = np.repeat(np.arange(num_docs, dtype=np.int64), owners)
    ids, lengths = tokenizer.tokenize_batch_to_array(pieces, dtype=w["dtype"])
    keep = lengths > 0  # sequences without tokens are dropped, as in Megatron
    seq_lengths = lengths[keep]
    seq_doc = piece_doc[keep]
    seqs_per_doc = np.bincount(seq_doc, minlength=num_docs).astype(np.int64)
    if w["eod"] is not None and seq_lengths.size:
        last_seq = np.cumsum(seqs_per_doc)[seqs_per_doc > 0] - 1  # last sequence of each non-empty doc
        ends = np.cumsum(seq_lengths)[last_seq]  # token offset just past it
        ids = np.insert(ids, ends, np.asarray(w["eod"], dtype=ids.dtype))
        seq_lengths = seq_lengths.copy()
        seq_lengths[last_seq] += 1
    return ids, seq_lengths, seqs_per_doc


def _encode_block(block: bytes, offset: int):
    cfg: PreprocessConfig = _WORKER["config"]
    texts, blank, bad = _parse_block(block, offset, cfg.json_keys, cfg.skip_bad_lines)
    num_docs = len(texts[cfg.json_keys[0]])
    encoded = {k: _encode_texts(texts[k], num_docs) for k in cfg.json_keys}
    return encoded, num_docs, len(block), blank, bad


# ---------------------------------------------------------------------------------------------
# Main side


def _mp_context():
    # fork: workers inherit the imported modules (no start-up imports, no re-run of the main
    # script). The parent only builds the tokenizer and never encodes, so no tokenizer thread
    # pool exists yet when the workers are forked.
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def output_prefix_for(config: PreprocessConfig, key: str, prefix: Optional[str] = None) -> str:
    level = "sentence" if config.split_sentences else "document"
    return f"{prefix if prefix is not None else config.output_prefix}_{key}_{level}"


def _temp_prefix(final_prefix: str, tag: str = "") -> str:
    d, base = os.path.split(final_prefix)
    return os.path.join(d, f".{base}.partial{tag}-{os.getpid()}")


def _remove_pair(prefix: str) -> None:
    """Delete ``prefix.bin``/``.idx`` and the builder's temporaries (``prefix.bin.tmp-*``...)."""
    for path in glob.glob(glob.escape(prefix) + ".*"):
        if os.path.isfile(path):
            os.remove(path)


def commit_pair(tmp_prefix: str, final_prefix: str) -> None:
    """Move a finished ``tmp_prefix`` pair to ``final_prefix``; an old ``.idx`` goes first."""
    if os.path.exists(final_prefix + ".idx"):
        os.remove(final_prefix + ".idx")
    os.replace(tmp_prefix + ".bin", final_prefix + ".bin")
    os.replace(tmp_prefix + ".idx", final_prefix + ".idx")


class Terminated(SystemExit):
    """Raised in the main process by SIGTERM, so that the clean-up of an interrupt runs."""

    def __init__(self):
        super().__init__(128 + signal.SIGTERM)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


class _TerminateRaises:
    """While active (main thread only), SIGTERM raises `Terminated`; the old handler comes back after."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, _raise_terminated)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


class _WorkersDied(Exception):
    """A pool worker exited while blocks were in flight (its block would never come back)."""


def _wait_for(result, pool, worker_pids: set, poll_seconds: float = 0.5):
    """`result.get()`, but raise `_WorkersDied` if a worker of `pool` has gone (the pool replaces a
    dead worker silently and its task is lost). Our workers never exit on their own."""
    while not result.ready():
        result.wait(poll_seconds)
        if not result.ready() and {p.pid for p in pool._pool} != worker_pids:
            raise _WorkersDied()
    return result.get()


def _stop_pool(pool, grace_seconds: float = 1.0) -> None:
    """Terminate `pool` without waiting on its blocks, and never hang doing so.

    `Pool.terminate` alone can deadlock: once its result thread has stopped reading, a worker that is
    writing a result larger than the pipe holds the result queue's lock forever, and terminate waits
    for that lock to send its sentinel. So terminate runs in a helper thread (it first stops the pool
    from replacing workers); if it has not finished after `grace_seconds`, the workers are killed and
    the helper thread is left behind (a daemon, blocked on a lock no live process holds)."""
    stopper = threading.Thread(target=pool.terminate, name="preprocess-pool-terminate", daemon=True)
    stopper.start()
    stopper.join(grace_seconds)
    if stopper.is_alive():
        for worker in list(pool._pool):
            if worker.exitcode is None:
                worker.kill()
        for worker in list(pool._pool):
            worker.join(grace_seconds)
        stopper.join(0.1)
    if not stopper.is_alive():
        pool.join()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _progress_line(stats: PreprocessStats, start: float, label: str = "") -> str:
    el = max(time.time() - start, 1e-9)
    return (f"{label}Processed {stats.documents} documents ({stats.documents / el:.1f} docs/s), "
            f"{stats.tokens} tokens ({stats.tokens / el / 1e6:.3f} M tokens/s), "
            f"{stats.bytes / el / 1024 / 1024:.2f} MB/s, elapsed {el:.1f} s")


def _process_range(config: PreprocessConfig, workers: int, start: int, end: Optional[int],
                   out_prefixes: dict, dtype, label: str = "") -> PreprocessStats:
    """Tokenize input bytes ``[start, end)`` into finished pairs at ``out_prefixes[key]``."""
    threads = config.threads_per_worker or max(1, _usable_cores() // max(1, workers))
    stats = PreprocessStats(empty_documents={k: 0 for k in config.json_keys})
    builders = {k: IndexedDatasetBuilder(out_prefixes[k] + ".bin", dtype=dtype) for k in config.json_keys}
    t0 = time.time()
    done = False
    pool = _mp_context().Pool(workers, initializer=_init_worker, initargs=(config, threads, os.getpid()))
    worker_pids = {p.pid for p in pool._pool}
    pending: deque = deque()
    try:
        window = 2 * workers + 1

        def collect(result) -> None:
            encoded, num_docs, nbytes, blank, bad = result
            before = stats.documents
            for key, (ids, seq_lengths, seqs_per_doc) in encoded.items():
                _write_documents(builders[key], ids, seq_lengths, seqs_per_doc)
                stats.tokens += int(ids.size)
                stats.sequences += int(seq_lengths.size)
                stats.empty_documents[key] += int(np.count_nonzero(seqs_per_doc == 0))
            stats.documents += num_docs
            stats.bytes += nbytes
            stats.blank_lines += blank
            stats.bad_lines += len(bad)
            room = _MAX_EXAMPLES - len(stats.bad_line_examples)
            stats.bad_line_examples.extend(bad[:max(0, room)])
            if config.log_interval > 0 and stats.documents // config.log_interval > before // config.log_interval:
                _log(_progress_line(stats, t0, label))

        for block, offset in iter_line_chunks(config.input, config.chunk_bytes, start, end):
            pending.append(pool.apply_async(_encode_block, (block, offset)))
            if len(pending) >= window:
                collect(_wait_for(pending.popleft(), pool, worker_pids))
        while pending:
            collect(_wait_for(pending.popleft(), pool, worker_pids))
        for key, builder in builders.items():
            builder.finalize(out_prefixes[key] + ".idx")
        done = True
    except _LineError as e:
        line = line_numbers_at(config.input, [e.offset])[e.offset]
        raise PreprocessError(f"{config.input}:{line}: {e.message}") from None
    except _WorkersDied:
        raise PreprocessError(f"{label}a worker process died while tokenizing {config.input} (killed, or out of "
                              "memory?); nothing was written. Run again, with fewer --workers if memory is "
                              "short") from None
    finally:
        if done:
            pool.close()
            pool.join()
        else:
            _stop_pool(pool)  # at once: a worker's block is never waited for after a failure or an interrupt
        for key, builder in builders.items():
            builder.close()
            if not done:
                _remove_pair(out_prefixes[key])
    stats.elapsed = time.time() - t0
    if stats.bad_line_examples:
        numbers = line_numbers_at(config.input, [off for off, _ in stats.bad_line_examples])
        stats.bad_line_examples = [f"{config.input}:{numbers[off]}: {problem}" for off, problem in stats.bad_line_examples]
    return stats


def _write_documents(builder: IndexedDatasetBuilder, ids: np.ndarray, seq_lengths: np.ndarray,
                     seqs_per_doc: np.ndarray) -> None:
    seq_bounds = np.zeros(seqs_per_doc.size + 1, dtype=np.int64)
    np.cumsum(seqs_per_doc, out=seq_bounds[1:])
    token_offsets = np.zeros(seq_lengths.size + 1, dtype=np.int64)
    np.cumsum(seq_lengths, out=token_offsets[1:])
    token_bounds = token_offsets[seq_bounds].tolist()
    sb = seq_bounds.tolist()
    for d in range(seqs_per_doc.size):
        builder.add_document(ids[token_bounds[d]:token_bounds[d + 1]], seq_lengths[sb[d]:sb[d + 1]])


def _partition_main(config, workers, start, end, out_prefixes, dtype, label, queue, parent_pid) -> None:
    # The parent stops a partition with SIGKILL (on Ctrl-C, SIGTERM or another partition's error) and
    # removes its files; its pool workers die with it. No exception is ever raised here at an
    # arbitrary point, which could leave the pool half torn down and the process unable to exit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # A worker whose reader was just killed (a stopped partition) must end quietly when it writes
    # its result, not print a BrokenPipeError traceback in the moment before its own SIGKILL comes.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    _die_with_parent(parent_pid, signal.SIGKILL)
    try:
        stats = _process_range(config, workers, start, end, out_prefixes, dtype, label)
        queue.put(("ok", stats))
    except PreprocessError as e:
        queue.put(("error", str(e)))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        queue.put(("error", f"{type(e).__name__}: {e}"))


def validate_config(config: PreprocessConfig) -> None:
    """Raise PreprocessError naming the flag and the fix for inconsistent options."""
    if not config.input or not os.path.isfile(config.input):
        raise PreprocessError(f"--input {config.input!r} is not a file")
    if not config.json_keys:
        raise PreprocessError("--json-keys needs at least one key")
    if len(set(config.json_keys)) != len(config.json_keys):
        raise PreprocessError(f"--json-keys lists a key twice: {config.json_keys}")
    if config.workers < 1:
        raise PreprocessError(f"--workers must be at least 1, got {config.workers}")
    if config.partitions < 1 or config.workers % config.partitions != 0:
        raise PreprocessError(f"--workers ({config.workers}) must be a multiple of --partitions "
                              f"({config.partitions}); each partition gets workers/partitions processes")
    out_dir = os.path.dirname(os.path.abspath(config.output_prefix))
    if not os.path.isdir(out_dir):
        raise PreprocessError(f"--output-prefix: folder {out_dir} does not exist; create it first")
    if config.chunk_bytes < 1:
        raise PreprocessError("chunk_bytes must be positive")


def preprocess(config: PreprocessConfig) -> PreprocessStats:
    """Run the whole pipeline; returns the statistics (also printed to stderr).

    Raises PreprocessError for bad options or input (nothing is written, an existing dataset of the
    same name is kept). Ctrl-C raises KeyboardInterrupt and SIGTERM `Terminated` (exit status 143)
    after the same clean-up."""
    validate_config(config)
    from gigatron.core.tokenizers import build_tokenizer

    tokenizer = build_tokenizer(_tokenizer_args(config))  # fail early on bad tokenizer flags
    if config.append_eod and (tokenizer.eod is None or tokenizer.eod < 0):
        raise PreprocessError(f"--append-eod: {config.tokenizer_type} has no end-of-document token")
    finals = {k: output_prefix_for(config, k) for k in config.json_keys}
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    t0 = time.time()
    with _TerminateRaises():
        try:
            if config.partitions == 1:
                temps = {k: _temp_prefix(p) for k, p in finals.items()}
                stats = _process_range(config, config.workers, 0, None, temps, dtype)
            else:
                temps, stats = _run_partitions(config, finals, dtype)
            try:
                check_not_empty(stats, config)
                for key in config.json_keys:
                    commit_pair(temps[key], finals[key])
            except BaseException:
                for p in temps.values():
                    _remove_pair(p)
                raise
        except (KeyboardInterrupt, Terminated) as stop:
            what = "interrupted" if isinstance(stop, KeyboardInterrupt) else "terminated (SIGTERM)"
            existing = [p for p in finals.values() if os.path.exists(p + ".idx")]
            _log(f"{what}: nothing was written" + (f"; the existing {', '.join(existing)} is unchanged" if existing else ""))
            raise
    stats.elapsed = time.time() - t0
    stats.outputs = [finals[k] for k in config.json_keys]
    _report(stats, config)
    return stats


def check_not_empty(stats: PreprocessStats, config: PreprocessConfig) -> None:
    """Refuse to write a dataset without documents or without tokens (an empty or wrong input)."""
    if stats.documents == 0:
        found = []
        if stats.blank_lines:
            found.append(f"{stats.blank_lines} blank lines")
        if stats.bad_lines:
            found.append(f"{stats.bad_lines} bad lines skipped")
        raise PreprocessError(f"--input {config.input} holds no documents ({', '.join(found) or 'it is empty'}); "
                              "nothing was written. Give a JSON-lines file with one object per line")
    if stats.tokens == 0:
        raise PreprocessError(f"--input {config.input}: none of its {stats.documents} documents has any tokens "
                              f"in --json-keys {' '.join(config.json_keys)}; nothing was written. Check the keys "
                              "and the tokenizer")


def _run_partitions(config: PreprocessConfig, finals: dict, dtype):
    size = input_size(config.input)
    P = config.partitions
    bounds = [size * i // P for i in range(P + 1)]
    part_prefixes = [{k: _temp_prefix(p, f"-part{i}") for k, p in finals.items()} for i in range(P)]
    ctx = _mp_context()
    queue = ctx.Queue()
    procs = []
    results: dict = {}
    try:
        for i in range(P):
            p = ctx.Process(target=_partition_main,
                            args=(config, config.workers // P, bounds[i], bounds[i + 1], part_prefixes[i],
                                  dtype, f"[partition {i}] ", queue, os.getpid()))
            p.start()
            procs.append(p)
        while len(results) < P:
            try:
                status, payload = queue.get(timeout=0.5)
            except queue_module.Empty:
                dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise PreprocessError(f"partition {dead[0][0]}'s process died (exit code {dead[0][1]}: killed, or "
                                          "out of memory?); nothing was written") from None
                continue
            if status == "error":
                raise PreprocessError(payload)
            results[len(results)] = payload
        for p in procs:
            p.join()
        stats = PreprocessStats(empty_documents={k: 0 for k in config.json_keys})
        for s in results.values():
            stats.add(s)
        stats.bad_line_examples = stats.bad_line_examples[:_MAX_EXAMPLES]
        temps = {k: _temp_prefix(p) for k, p in finals.items()}
        for key in config.json_keys:
            with IndexedDatasetBuilder(temps[key] + ".bin", dtype=dtype) as builder:
                for i in range(P):
                    builder.add_index(part_prefixes[i][key])
                builder.finalize(temps[key] + ".idx")
        return temps, stats
    except BaseException:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(10)
        for k, p in finals.items():
            _remove_pair(_temp_prefix(p))
        raise
    finally:
        for parts in part_prefixes:
            for prefix in parts.values():
                _remove_pair(prefix)


def _report(stats: PreprocessStats, config: PreprocessConfig) -> None:
    el = max(stats.elapsed, 1e-9)
    _log(f"Done: {stats.documents} documents, {stats.sequences} sequences, {stats.tokens} tokens, "
         f"{stats.bytes / 1e6:.1f} MB in {el:.1f} s ({stats.documents / el:.1f} docs/s, "
         f"{stats.tokens / el / 1e6:.3f} M tokens/s, {stats.bytes / el / 1024 / 1024:.2f} MB/s)")
    for key, n in stats.empty_documents.items():
        if n:
            _log(f"  {n} documents had no tokens in key {key!r}; each is kept as an empty document "
                 f"(a boundary without sequences), as Megatron writes them")
    if stats.blank_lines:
        _log(f"  {stats.blank_lines} blank lines ignored")
    if stats.bad_lines:
        _log(f"  {stats.bad_lines} bad lines skipped (--skip-bad-lines), first ones:")
        for example in stats.bad_line_examples:
            _log(f"    {example}")
    for prefix in stats.outputs:
        _log(f"  wrote {prefix}.bin / .idx")
