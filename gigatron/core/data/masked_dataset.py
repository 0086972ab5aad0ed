"""What BERT and T5 pretraining samples share: sentence packing and masked-language-model masking.

Both models read a sentence-level indexed dataset (``tools/preprocess_data.py --split-sentences``:
one sequence per sentence, documents marked by ``document_indices``) and split it by DOCUMENT.

**Sample mapping.** Whole sentences of one document are packed into samples of up to
``max_seq_length`` tokens. Each sample aims at a target length: ``max_seq_length``, or, with
probability ``short_seq_prob``, a random length in ``[2, max_seq_length]``. A sample closes at the
first sentence where it has reached its target, holds at least ``min_sentences`` sentences and
leaves at least two sentences of the document for the next sample; the last sample of a document
takes the rest. Documents with fewer than ``min_sentences`` sentences are skipped. This is repeated
over as many epochs (fresh random targets each) as the requested number of samples needs; whole
epochs are kept and the rows ``(start_sentence, end_sentence (exclusive), target_length)`` are
shuffled. The rows are cached on disk (``IndexCache``) under a hash of everything that shapes them.

The packing is vectorized: every sentence gets the random target that a sample starting there
would use, one ``searchsorted`` over the cumulative sentence lengths gives the sentence where such
a sample closes, and the chains of samples through the documents are followed for all documents
(and epochs) at once.

**Masking.** Candidates are whole words: a WordPiece continuation (``##...``) belongs to the token
before it. ``min(max_predictions, max(1, round(len(tokens) * mask_prob)))`` tokens are masked, in
n-grams of whole words: each candidate word, in random order, starts an n-gram whose length is drawn
from ``P(n) ~ 1/n`` for ``n <= 3`` (BERT) or from a geometric distribution (``p = 0.2``, capped at 10;
SpanBERT, T5). An n-gram that would exceed the budget is shortened word by word (a word is never
split); one that overlaps an earlier n-gram or would cross a special token is dropped. Every random
draw of a sample comes from ``numpy.random.RandomState((seed + index) % 2**32)``.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .builder import GPTDatasetBuilder, gpt_dataset_config_from_data_config
from .cache import IndexCache, build_or_load, describe
from .config import DataConfig
from .gpt_dataset import tokenizer_identifiers
from .indexed_dataset import IndexedDataset
from .utils import BlendedDatasetConfig, Split, split_indices

logger = logging.getLogger(__name__)

_MAX_DOCUMENTS_PER_BATCH = 1 << 22  # documents (times epochs) packed at once when many epochs are needed
_T5_GEOMETRIC_P = 0.2
_T5_MAX_NGRAM = 10
_BERT_MAX_NGRAM = 3


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


@dataclass
class MaskedDatasetConfig(BlendedDatasetConfig):
    """Everything a BERTDataset / T5Dataset (and their blend) needs; built from DataConfig.
    ``sequence_length`` is the BERT sequence (specials included) or the T5 encoder sequence;
    ``tokenizer`` is WordPiece-style (``cls``, ``sep``, ``mask``, ``pad``, ``inv_vocab``; T5 also
    ``additional_special_tokens_ids``, ``bos``/``eos``); ``split`` gives proportions of documents."""

    masking_probability: float = 0.15
    """Share of the tokens of a sample that are masked (--mask-prob)."""

    short_sequence_probability: float = 0.1
    """Probability that a sample aims at a random shorter length (--short-seq-prob)."""

    masking_max_ngram: int = _BERT_MAX_NGRAM
    """Longest masked n-gram, in whole words."""

    masking_use_geometric_distribution: bool = False
    """Draw n-gram lengths from geometric(0.2) (T5 / SpanBERT) instead of P(n) ~ 1/n (BERT)."""

    classification_head: bool = True
    """BERT: two segments and the sentence-order label (--bert-no-binary-head turns it off)."""

    decoder_sequence_length: Optional[int] = None
    """T5 only: decoder tokens per sample (--decoder-seq-length)."""

    mock: bool = field(init=False, default=False)
    """Masked datasets read real files only (the GPT builder reads this field)."""

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.masking_probability <= 1.0:
            raise ValueError(f"--mask-prob must be in (0, 1], got {self.masking_probability}")
        if not 0.0 <= self.short_sequence_probability <= 1.0:
            raise ValueError(f"--short-seq-prob must be in [0, 1], got {self.short_sequence_probability}")
        if self.masking_max_ngram < 1:
            raise ValueError(f"masking_max_ngram must be >= 1, got {self.masking_max_ngram}")


# --------------------------------------------------------------------------------------------
# sample mapping
# --------------------------------------------------------------------------------------------


def _draw_targets(rng: np.random.RandomState, shape, max_seq_length: int, short_seq_prob: float) -> np.ndarray:
    """Target lengths: ``max_seq_length``, or uniform in [2, max_seq_length] with prob short_seq_prob."""
    targets = np.full(shape, max_seq_length, dtype=np.int64)
    if short_seq_prob > 0:
        short = rng.random_sample(shape) < short_seq_prob
        lengths = rng.randint(2, max_seq_length + 1, size=shape)
        targets[short] = lengths[short]
    return targets


def build_sample_mapping(
    document_indices: np.ndarray,
    sequence_lengths: np.ndarray,
    num_samples: Optional[int],
    max_seq_length: int,
    short_seq_prob: float,
    seed: int,
    min_sentences: int,
) -> np.ndarray:
    """Pack whole sentences of each document into samples; see the module docstring.

    ``document_indices``: sentence boundaries of the split's documents (``[D + 1]``, absolute
    sentence ids, as in ``IndexedDataset.document_indices``); ``sequence_lengths``: tokens of every
    sentence of the dataset. ``num_samples=None`` builds one epoch. Returns int64
    ``[num_rows, 3]`` rows ``(start_sentence, end_sentence, target_length)``, shuffled, with
    ``num_rows >= num_samples``.
    """
    if max_seq_length < 2:
        raise ValueError(f"samples must hold at least 2 tokens, got a maximum of {max_seq_length}")
    if min_sentences < 1:
        raise ValueError(f"min_sentences must be >= 1, got {min_sentences}")
    bounds = np.asarray(document_indices, dtype=np.int64)
    lengths = np.asarray(sequence_lengths)
    first, last = bounds[:-1], bounds[1:]
    counts = last - first  # [D] sentences per document
    keep = counts >= min_sentences
    first, counts = first[keep], counts[keep]
    if counts.size == 0:
        raise ValueError(
            f"no document of the split has {min_sentences} or more sentences, so no sample can be built"
        )
    # Local numbering: the kept documents' sentences one after another.
    n = int(counts.sum())
    local_doc_start = np.concatenate(([0], np.cumsum(counts)[:-1]))  # [D']
    sentence_ids = np.repeat(first - local_doc_start, counts) + np.arange(n, dtype=np.int64)  # [n] absolute ids
    doc_end = np.repeat(local_doc_start + counts, counts)  # [n] local end (exclusive) of each sentence's doc
    cumulative = np.concatenate(([0], np.cumsum(lengths[sentence_ids], dtype=np.int64)))  # [n + 1]
    num_docs = counts.size
    rng = np.random.RandomState(seed)

    def epochs(k: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Rows of k more epochs as (epoch in 0..k-1, local start, local end, target), in order.

        All documents of all k epochs advance together: each round closes one sample of every
        document that still has sentences left.
        """
        epoch = np.repeat(np.arange(k, dtype=np.int64), num_docs)  # [k * D']
        current = np.tile(local_doc_start, k)  # [k * D'] each document's first sample
        rows = []
        while current.size:
            target = _draw_targets(rng, current.size, max_seq_length, short_seq_prob)
            stop = doc_end[current]
            by_length = np.searchsorted(cumulative, cumulative[current] + target, side="left") - 1
            close = np.maximum(by_length, current + (min_sentences - 1))
            # closing later than stop - 3 would leave fewer than two sentences: take the rest
            close = np.where(close > stop - 3, stop - 1, close)
            rows.append((epoch, current, close + 1, target))
            more = close + 1 < stop
            epoch, current = epoch[more], close[more] + 1
        epoch, start, end, target = (np.concatenate(c) for c in zip(*rows))
        order = np.argsort(epoch * n + start, kind="stable")  # epoch, then document, then position
        return epoch[order], start[order], end[order], target[order]

    starts, ends, targets, per_epoch = [], [], [], []
    total = 0
    epochs_built = 0
    while epochs_built == 0 or (num_samples is not None and total < num_samples):
        if epochs_built == 0:
            k = 1
        else:
            average = max(1.0, total / epochs_built)
            k = max(1, math.ceil((num_samples - total) / average))
            k = min(k, max(1, _MAX_DOCUMENTS_PER_BATCH // num_docs))
        e, s, t_end, t = epochs(k)
        counts_k = np.bincount(e, minlength=k)
        starts.append(s)
        ends.append(t_end)
        targets.append(t)
        per_epoch.extend(counts_k.tolist())
        total += int(counts_k.sum())
        epochs_built += k

    start = np.concatenate(starts)
    end = np.concatenate(ends)
    target = np.concatenate(targets)
    if num_samples is not None:
        # keep whole epochs: up to the first one at which num_samples is reached
        cumulative_rows = np.cumsum(per_epoch)
        num_epochs = int(np.searchsorted(cumulative_rows, num_samples, side="left")) + 1
        num_rows = int(cumulative_rows[num_epochs - 1])
        start, end, target = start[:num_rows], end[:num_rows], target[:num_rows]
    mapping = np.empty((start.size, 3), dtype=np.int64)
    mapping[:, 0] = sentence_ids[start]
    mapping[:, 1] = mapping[:, 0] + (end - start)
    mapping[:, 2] = target
    return mapping[rng.permutation(start.size)]  # shuffled rows


# --------------------------------------------------------------------------------------------
# masking
# --------------------------------------------------------------------------------------------


def ngram_probabilities(max_ngram: int) -> np.ndarray:
    """BERT's n-gram length distribution ``P(n) ~ 1/n`` for ``n = 1..max_ngram``."""
    weights = 1.0 / np.arange(1, max_ngram + 1)
    return weights / weights.sum()


def draw_ngram_lengths(rng: np.random.RandomState, size: int, max_ngram: int, geometric: bool) -> np.ndarray:
    """``size`` n-gram lengths: ``min(geometric(0.2), max_ngram)`` or ``P(n) ~ 1/n`` up to max_ngram."""
    if geometric:
        return np.minimum(rng.geometric(_T5_GEOMETRIC_P, size=size), max_ngram)
    return rng.choice(max_ngram, size=size, p=ngram_probabilities(max_ngram)) + 1


@dataclass
class MaskingResult:
    """The masked n-grams of one sample."""

    positions: np.ndarray
    """int64 [m] masked token positions, ascending."""

    spans: List[Tuple[int, int]]
    """Masked n-grams as token ranges ``[begin, end)``, ascending and disjoint."""

    span_words: List[int]
    """Whole words in each span (the realized n-gram length)."""


class WordPieceMasker:
    """Whole-word n-gram masking for one tokenizer; ``mask(tokens, rng, ...)`` per sample."""

    def __init__(self, tokenizer, masking_probability: float, max_ngram: int, geometric: bool,
                 special_ids: Sequence[int]):
        self.masking_probability = float(masking_probability)
        self.max_ngram = int(max_ngram)
        self.geometric = bool(geometric)
        inv_vocab = _inv_vocab(tokenizer)
        size = max([int(tokenizer.vocab_size)] + [int(i) + 1 for i in inv_vocab] + [int(i) + 1 for i in special_ids])
        self.is_continuation = np.zeros(size, dtype=bool)  # [V] WordPiece "##" pieces
        for i, token in inv_vocab.items():
            if isinstance(token, str) and token.startswith("##"):
                self.is_continuation[int(i)] = True
        self.is_special = np.zeros(size, dtype=bool)  # [V] never masked
        for i in special_ids:
            if i is not None and int(i) >= 0:
                self.is_special[int(i)] = True

    def num_to_mask(self, num_tokens: int, max_predictions: int) -> int:
        return min(max_predictions, max(1, int(round(num_tokens * self.masking_probability))))

    def mask(self, tokens: np.ndarray, rng: np.random.RandomState, max_predictions: int,
             max_spans: Optional[int] = None, max_decoder_tokens: Optional[int] = None) -> MaskingResult:
        """Choose the masked whole-word n-grams of ``tokens``.

        ``max_spans`` caps the number of n-grams (T5 sentinels); ``max_decoder_tokens`` keeps
        ``masked tokens + spans + 1`` within a T5 decoder length.
        """
        tokens = np.asarray(tokens)
        budget = self.num_to_mask(len(tokens), max_predictions)
        if len(tokens) == 0:
            return MaskingResult(np.zeros(0, dtype=np.int64), [], [])
        lookup = np.clip(tokens, 0, self.is_special.size - 1)
        candidate = ~self.is_special[lookup]  # [L]
        candidate &= (tokens >= 0) & (tokens < self.is_special.size)
        previous_candidate = np.concatenate(([False], candidate[:-1]))  # [L]
        word_start = candidate & ~(self.is_continuation[lookup] & previous_candidate)  # [L]
        starts = np.flatnonzero(word_start)  # [W]
        num_words = starts.size
        if num_words == 0:
            return MaskingResult(np.zeros(0, dtype=np.int64), [], [])
        word_of_token = np.cumsum(word_start) - 1  # [L]
        word_lengths = np.bincount(word_of_token[candidate], minlength=num_words)  # [W]
        ends = starts + word_lengths  # [W] exclusive
        # runs of adjacent words (an n-gram never crosses a special token)
        adjacent = np.concatenate((starts[1:] == ends[:-1], [False]))  # [W] word i+1 follows word i directly
        breaks = np.flatnonzero(~adjacent)  # last word of each run
        run_end = np.repeat(breaks + 1, np.diff(np.concatenate(([-1], breaks))))  # [W] exclusive

        order = rng.permutation(num_words)
        lengths = draw_ngram_lengths(rng, num_words, self.max_ngram, self.geometric)
        cumulative = np.concatenate(([0], np.cumsum(word_lengths))).tolist()  # tokens before word i
        run_end = run_end.tolist()
        covered = bytearray(num_words)
        chosen: List[Tuple[int, int]] = []
        num_masked = 0
        for first, n in zip(order.tolist(), lengths.tolist()):
            if num_masked >= budget or (max_spans is not None and len(chosen) >= max_spans):
                break
            last = min(first + n, run_end[first])
            while last > first:
                count = cumulative[last] - cumulative[first]
                fits = num_masked + count <= budget
                if fits and max_decoder_tokens is not None:
                    fits = num_masked + count + len(chosen) + 2 <= max_decoder_tokens
                if fits:
                    break
                last -= 1
            if last == first or any(covered[first:last]):
                continue
            covered[first:last] = b"\x01" * (last - first)
            chosen.append((first, last))
            num_masked += cumulative[last] - cumulative[first]
        chosen.sort()
        spans = [(int(starts[a]), int(ends[b - 1])) for a, b in chosen]
        covered_words = np.frombuffer(bytes(covered), dtype=np.uint8).astype(bool)  # [W]
        token_covered = np.zeros(len(tokens), dtype=bool)  # [L]
        token_covered[candidate] = covered_words[word_of_token[candidate]]
        return MaskingResult(np.flatnonzero(token_covered).astype(np.int64), spans, [b - a for a, b in chosen])


def _inv_vocab(tokenizer) -> Dict[int, Any]:
    inv = getattr(tokenizer, "inv_vocab", None)
    return inv if isinstance(inv, dict) else {}


def special_token_ids(tokenizer) -> List[int]:
    """Ids that are never masked nor drawn as random replacements: the tokenizer's named specials,
    its sentinels and vocabulary entries written ``[...]`` (``[UNK]``, ``[unused0]`` ...)."""
    ids = set()
    for name in ("cls", "sep", "pad", "mask", "bos", "eos", "eod"):
        if _named_id(tokenizer, name) >= 0:
            ids.add(_named_id(tokenizer, name))
    ids.update(int(i) for i in (getattr(tokenizer, "additional_special_tokens_ids", None) or []))
    for i, token in _inv_vocab(tokenizer).items():
        if isinstance(token, str) and len(token) > 2 and token.startswith("[") and token.endswith("]"):
            ids.add(int(i))
    return sorted(ids)


def _named_id(tokenizer, name: str) -> int:
    """The tokenizer's `name` id (cls, sep, mask …), or -1 when it has none."""
    value = getattr(tokenizer, name, None)
    return -1 if value is None else int(value)


# --------------------------------------------------------------------------------------------
# the dataset base class
# --------------------------------------------------------------------------------------------


class MaskedWordPieceDataset(torch.utils.data.Dataset, abc.ABC):
    """Samples of one document split of a sentence-level indexed dataset (BERT / T5 base class).

    Subclasses set ``min_sentences`` / ``max_seq_length`` for the mapping and build samples in
    ``__getitem__`` from ``self.sample_index[idx]`` with ``self.sample_rng(idx)``.
    """

    def __init__(
        self,
        indexed_dataset,
        dataset_path: Optional[str],
        indices: np.ndarray,
        num_samples: Optional[int],
        index_split: Split,
        config: MaskedDatasetConfig,
    ):
        self.dataset = indexed_dataset
        self.dataset_path = dataset_path
        self.indices = np.asarray(indices)
        self.num_samples = num_samples
        self.index_split = index_split
        self.config = config
        if config.tokenizer is None:
            raise ValueError(f"{type(self).__name__} needs a tokenizer")
        self._check_tokenizer(config.tokenizer)
        self._check_sentence_level()
        self.pad_id = max(0, _named_id(config.tokenizer, "pad"))
        self.special_ids = special_token_ids(config.tokenizer)
        self.masker = WordPieceMasker(
            config.tokenizer, config.masking_probability, config.masking_max_ngram,
            config.masking_use_geometric_distribution, self.special_ids,
        )

        self.unique_identifiers = {
            "class": type(self).__name__,
            "dataset_path": dataset_path,
            "num_samples": num_samples,
            "index_split": index_split.name,
            "random_seed": config.random_seed,
            "sequence_length": config.sequence_length,
            "max_seq_length": self.max_seq_length,
            "min_sentences": self.min_sentences,
            "short_sequence_probability": config.short_sequence_probability,
            "masking_probability": config.masking_probability,
            "masking_max_ngram": config.masking_max_ngram,
            "masking_use_geometric_distribution": config.masking_use_geometric_distribution,
            "classification_head": config.classification_head,
            "decoder_sequence_length": config.decoder_sequence_length,
            "split": config.split,
            "split_matrix": config.split_matrix,
            "documents": [int(self.indices[0]), int(self.indices[-1]) + 1] if self.indices.size else [0, 0],
            "tokenizer": tokenizer_identifiers(config.tokenizer),
            "low_level_dataset": self._low_level_fingerprint(),
        }
        self.unique_description = describe(self.unique_identifiers)
        self.built_anew_on_cache_miss = False
        self.sample_index = self._build_or_load_sample_index()

    # -- what subclasses define --------------------------------------------------------------
    @property
    @abc.abstractmethod
    def max_seq_length(self) -> int:
        """Longest sample the mapping packs (tokens of text, specials excluded)."""

    @property
    @abc.abstractmethod
    def min_sentences(self) -> int:
        """Fewest sentences per sample (documents with fewer are skipped)."""

    def _check_tokenizer(self, tokenizer) -> None:
        """Raise ValueError when the tokenizer lacks an id the samples need."""

    # -- checks -------------------------------------------------------------------------------
    def _check_sentence_level(self) -> None:
        """Reject a document-level dataset where the model needs sentences."""
        if self.min_sentences < 2:
            return
        bounds = np.asarray(self.dataset.document_indices)
        if bounds.size < 2 or int(np.max(np.diff(bounds))) <= 1:
            raise ValueError(
                f"{type(self).__name__}: every document of {self.dataset_path} is a single sequence, so this "
                f"is a document-level dataset (e.g. <prefix>_text_document), but BERT's sentence-order head "
                f"needs documents split into sentences. Run tools/preprocess_data.py with --split-sentences "
                f"and pass the resulting <prefix>_text_sentence as --data-path (or train without the binary "
                f"head: --bert-no-binary-head)"
            )

    def _low_level_fingerprint(self) -> Dict[str, Any]:
        lengths = self.dataset.sequence_lengths
        return {
            "num_sequences": int(len(lengths)),
            "num_documents": int(len(self.dataset.document_indices) - 1),
            "num_tokens": int(np.sum(lengths, dtype=np.int64)),
        }

    # -- sample mapping -----------------------------------------------------------------------
    def _cache_directory(self) -> Optional[str]:
        if self.config.path_to_cache:
            return self.config.path_to_cache
        if self.dataset_path is None:
            return None
        return os.path.join(os.path.abspath(self.dataset_path), "cache", f"{type(self).__name__}_indices")

    def _build_or_load_sample_index(self) -> np.ndarray:
        cache = IndexCache(self._cache_directory(), type(self).__name__, self.index_split.name,
                           self.unique_description, ("sample_index",))
        self.unique_description_hash = cache.hash

        def build():
            if self.indices.size == 0:
                raise ValueError(f"the {self.index_split.name} split of {self.dataset_path} has no documents; "
                                 f"give it a larger share (--split) or use more data")
            bounds = np.asarray(self.dataset.document_indices)[int(self.indices[0]): int(self.indices[-1]) + 2]
            try:
                mapping = build_sample_mapping(
                    bounds, self.dataset.sequence_lengths, self.num_samples, self.max_seq_length,
                    self.config.short_sequence_probability, self.config.random_seed, self.min_sentences,
                )
            except ValueError as e:
                raise ValueError(f"{self.index_split.name} split of {self.dataset_path}: {e}") from None
            return {"sample_index": mapping}

        arrays, self.built_anew_on_cache_miss = build_or_load(
            cache, build, f"{type(self).__name__} {self.index_split.name} ({self.dataset_path})"
        )
        return arrays["sample_index"]

    # -- helpers for __getitem__ --------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.sample_index.shape[0])

    def _row(self, idx: int) -> Tuple[int, int, int]:
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"sample {idx} out of range for {type(self).__name__} with {n} samples")
        start, end, target = (int(x) for x in self.sample_index[idx])
        return start, end, target

    def sample_rng(self, idx: int) -> np.random.RandomState:
        """The random state of sample ``idx`` (every draw of the sample comes from it)."""
        return np.random.RandomState((self.config.random_seed + int(idx)) % 2**32)

    def sentences(self, start: int, end: int) -> List[np.ndarray]:
        """Token arrays (int64) of sentences ``start .. end - 1``."""
        return [s.astype(np.int64) for s in self.dataset[start:end]]

    def max_predictions(self, target_length: int) -> int:
        """The masking cap of a sample: ``mask_prob * target_length`` tokens (at least 1)."""
        return max(1, int(self.config.masking_probability * target_length))


# --------------------------------------------------------------------------------------------
# building the splits
# --------------------------------------------------------------------------------------------


class MaskedDatasetBuilder(GPTDatasetBuilder):
    """The GPT builder's splits and blends, with document splits of a masked dataset class."""

    def __init__(self, dataset_class: type, config: MaskedDatasetConfig, sizes):
        super().__init__(config, sizes)
        self.dataset_class = dataset_class

    def _splits(self, prefix: Optional[str], split_matrix, sizes):
        low_level = IndexedDataset(prefix, mmap=self.config.mmap_bin_files)
        num_documents = len(low_level.document_indices) - 1
        out: List[Optional[MaskedWordPieceDataset]] = []
        for i, split in enumerate(Split):
            if split_matrix[i] is None or sizes[i] == 0:
                out.append(None)
                continue
            indices = split_indices(num_documents, split_matrix[i])
            out.append(self.dataset_class(low_level, prefix, indices, sizes[i], split, self.config))
        return out


def masked_dataset_config_from_data_config(config: DataConfig, tokenizer, kind: str) -> MaskedDatasetConfig:
    """Resolve data sources, split and lengths for ``kind`` ("bert" or "t5")."""
    if kind not in ("bert", "t5"):
        raise ValueError(f"kind must be 'bert' or 't5', got {kind!r}")
    if config.mock_data:
        raise ValueError("--mock-data builds GPT data only; give BERT/T5 a sentence-level --data-path")
    if kind == "bert":
        if config.seq_length is None:
            raise ValueError("--seq-length is required to build BERT datasets")
        if config.seq_length < 5:
            raise ValueError(f"--seq-length {config.seq_length} is too short for BERT: [CLS] A [SEP] B [SEP] "
                             f"needs at least 5 tokens")
        seq_length, decoder = config.seq_length, None
    else:
        seq_length = config.encoder_seq_length if config.encoder_seq_length is not None else config.seq_length
        if seq_length is None:
            raise ValueError("--encoder-seq-length (or --seq-length) is required to build T5 datasets")
        if seq_length < 4:
            raise ValueError(f"--encoder-seq-length {seq_length} is too short for T5; give at least 4")
        decoder = config.decoder_seq_length
        if decoder is None:
            raise ValueError("--decoder-seq-length is required to build T5 datasets (e.g. 128)")
        if decoder < 4:
            raise ValueError(f"--decoder-seq-length {decoder} is too short for T5; give at least 4")
    resolved = gpt_dataset_config_from_data_config(dataclasses.replace(config, seq_length=seq_length), tokenizer)
    return MaskedDatasetConfig(
        random_seed=config.seed,
        sequence_length=seq_length,
        tokenizer=tokenizer,
        blend=resolved.blend,
        blend_per_split=resolved.blend_per_split,
        split=resolved.split,
        path_to_cache=config.data_cache_path,
        mmap_bin_files=config.mmap_bin_files,
        masking_probability=config.mask_prob,
        short_sequence_probability=config.short_seq_prob,
        masking_max_ngram=_BERT_MAX_NGRAM if kind == "bert" else _T5_MAX_NGRAM,
        masking_use_geometric_distribution=kind == "t5",
        classification_head=bool(config.bert_binary_head) if kind == "bert" else False,
        decoder_sequence_length=decoder,
    )
