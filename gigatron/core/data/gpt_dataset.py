"""GPT pretraining samples cut from an indexed dataset, exactly as Megatron-Core's GPTDataset cuts them.

A split of the dataset's sequences is repeated for as many epochs as the requested number of
samples needs, shuffled (``document_index``), cut into samples of ``seq_length + 1`` tokens that
overlap by one token (``sample_index``) and served in shuffled order (``shuffle_index``). The three
index arrays are cached on disk under a hash of everything that shapes them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from .cache import IndexCache, build_or_load, describe
from .index_helpers import (
    build_document_index,
    build_sample_index,
    build_shuffle_index,
)
from .utils import BlendedDatasetConfig, Split

logger = logging.getLogger(__name__)

_PAD_TOKEN_ID = -1  # used when the tokenizer has no pad token
_SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80


@dataclass
class GPTDatasetConfig(BlendedDatasetConfig):
    """Everything a GPTDataset / BlendedDataset needs (built from DataConfig by the builder);
    ``tokenizer`` needs ``eod`` (and optionally ``pad``)."""

    mock: bool = False
    """Use synthetic documents instead of files."""

    reset_position_ids: bool = False
    """Restart position ids after each end-of-document token."""

    reset_attention_mask: bool = False
    """Do not attend across end-of-document tokens."""

    eod_mask_loss: bool = False
    """Zero the loss on end-of-document tokens."""

    create_attention_mask: bool = True
    """Return the [1, s, s] attention mask with each sample."""

    drop_last_partial_validation_sequence: bool = True
    """Drop the last, incomplete validation sample (else it is padded)."""

    add_extra_token_to_sequence: bool = True
    """Read seq_length + 1 tokens per sample so the labels are the inputs shifted by one."""

    vocab_size: Optional[int] = None
    """Token ids must lie in [0, vocab_size); a sample holding another id raises an error naming the
    file and the document. None: the tokenizer's ``vocab_size`` (its ids, special tokens included,
    before padding: an id beyond them cannot come from this tokenizer). Mock data is not checked."""


def tokenizer_identifiers(tokenizer) -> Dict[str, Any]:
    """What of the tokenizer a cache description records."""
    if tokenizer is None:
        return {"class": None}
    if hasattr(tokenizer, "unique_identifiers") and isinstance(tokenizer.unique_identifiers, dict):
        return dict(tokenizer.unique_identifiers)
    out: Dict[str, Any] = {"class": type(tokenizer).__name__}
    for name in ("vocab_size", "eod", "pad"):
        try:
            value = getattr(tokenizer, name)
        except Exception:
            continue
        if isinstance(value, (int, np.integer)):
            out[name] = int(value)
    return out


class TokenIdError(ValueError):
    """A sample holds a token id outside the vocabulary."""


def _tokenizer_vocab_size(tokenizer) -> Optional[int]:
    try:
        value = tokenizer.vocab_size
    except Exception:  # noqa: BLE001 - a stand-in tokenizer without one: nothing to check against
        return None
    return int(value) if isinstance(value, (int, np.integer)) and value > 0 else None


def pad_token_id(tokenizer) -> int:
    try:
        pad = tokenizer.pad
    except Exception:
        return _PAD_TOKEN_ID
    return _PAD_TOKEN_ID if pad is None else int(pad)


# --------------------------------------------------------------------------------------------
# the three indices
# --------------------------------------------------------------------------------------------


def num_epochs_for(tokens_per_epoch: int, num_samples: Optional[int], sequence_length: int, extra: int) -> int:
    """Smallest E with ``E * tokens_per_epoch >= num_samples * sequence_length + extra`` (1 if no target)."""
    if num_samples is None:
        return 1
    needed = num_samples * sequence_length + extra
    return max(1, -(-needed // tokens_per_epoch))


def build_gpt_indices(
    sequence_lengths: np.ndarray,
    indices: np.ndarray,
    num_samples: Optional[int],
    sequence_length: int,
    random_seed: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: bool = True,
) -> Dict[str, np.ndarray]:
    """document_index, sample_index and shuffle_index for one split (``indices``: its sequence ids)."""
    extra = int(add_extra_token_to_sequence)
    indices = np.asarray(indices)
    tokens_per_epoch = int(np.asarray(sequence_lengths)[indices].sum(dtype=np.int64))
    if tokens_per_epoch <= extra:
        raise ValueError(
            f"the split has {len(indices)} sequences holding {tokens_per_epoch} tokens, too few to cut "
            f"a sample from; give the split more data (--split) or use a larger dataset"
        )
    num_epochs = num_epochs_for(tokens_per_epoch, num_samples, sequence_length, extra)
    separate_final_epoch = False
    num_samples_sans_final_epoch = 0
    if num_epochs > 1:
        num_samples_sans_final_epoch = ((num_epochs - 1) * tokens_per_epoch - extra) // sequence_length
        num_samples_from_final_epoch = num_samples - num_samples_sans_final_epoch
        num_samples_per_epoch = (tokens_per_epoch - extra) // sequence_length
        assert 0 <= num_samples_from_final_epoch <= num_samples_per_epoch + 1
        separate_final_epoch = num_samples_from_final_epoch < int(
            _SEPARATE_FINAL_EPOCH_THRESHOLD * num_samples_per_epoch
        )

    rng = np.random.RandomState(random_seed)
    document_index = build_document_index(indices, num_epochs, rng, separate_final_epoch)
    sample_index = build_sample_index(
        sequence_lengths, document_index, sequence_length, num_epochs, tokens_per_epoch,
        drop_last_partial_sequence, bool(extra),
    )
    total = sample_index.shape[0] - 1
    first = num_samples_sans_final_epoch if separate_final_epoch else total
    shuffle_index = build_shuffle_index(first, total, rng)
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------


def get_ltor_masks_and_position_ids(
    tokens: torch.Tensor,
    eod_token: int,
    reset_position_ids: bool,
    reset_attention_mask: bool,
    eod_mask_loss: bool,
    create_attention_mask: bool,
):
    """Left-to-right masks for one sample ``tokens [s]``.

    Returns ``attention_mask`` (bool [1, s, s], True = masked, or None), ``loss_mask`` (float32 [s])
    and ``position_ids`` (int64 [s]). With resets, a document starts after each EOD token: positions
    restart at 0 there and attention does not reach back across it.
    """
    s = tokens.numel()
    is_eod = tokens == eod_token  # [s]
    loss_mask = torch.ones(s, dtype=torch.float32)
    if eod_mask_loss:
        loss_mask[is_eod] = 0.0
    position_ids = torch.arange(s, dtype=torch.long)
    segment = None
    if reset_position_ids or reset_attention_mask:
        eods_before = torch.cumsum(is_eod.long(), 0) - is_eod.long()  # [s] EOD tokens strictly before
        segment = eods_before
        if reset_position_ids:
            starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(is_eod).flatten() + 1])  # [n_eod+1]
            position_ids = position_ids - starts[segment]
    attention_mask = None
    if create_attention_mask:
        allowed = torch.ones(s, s, dtype=torch.bool).tril_()  # [s, s]
        if reset_attention_mask:
            allowed &= segment[:, None] == segment[None, :]  # [s, s]
        attention_mask = (~allowed).unsqueeze(0)  # [1, s, s]
    return attention_mask, loss_mask, position_ids


# --------------------------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------------------------


class GPTDataset(torch.utils.data.Dataset):
    """Samples of one split of one (indexed or mock) low-level dataset."""

    def __init__(
        self,
        indexed_dataset,
        dataset_path: Optional[str],
        indices: np.ndarray,
        num_samples: Optional[int],
        index_split: Split,
        config: GPTDatasetConfig,
    ):
        self.dataset = indexed_dataset
        self.dataset_path = dataset_path
        self.indices = np.asarray(indices)
        self.num_samples = num_samples
        self.index_split = index_split
        self.config = config
        if config.tokenizer is None or getattr(config.tokenizer, "eod", None) is None:
            raise ValueError("GPTDataset needs a tokenizer with an `eod` token id")
        self._eod = int(config.tokenizer.eod)
        self._pad_token_id = pad_token_id(config.tokenizer)
        self._vocab_size = None if config.mock else (config.vocab_size or _tokenizer_vocab_size(config.tokenizer))

        self.unique_identifiers = {
            "class": type(self).__name__,
            "dataset_path": dataset_path,
            "num_samples": num_samples,
            "index_split": index_split.name,
            "random_seed": config.random_seed,
            "sequence_length": config.sequence_length,
            "split": config.split,
            "split_matrix": config.split_matrix,
            "tokenizer": tokenizer_identifiers(config.tokenizer),
            "add_extra_token_to_sequence": config.add_extra_token_to_sequence,
            "drop_last_partial_validation_sequence": config.drop_last_partial_validation_sequence,
            "reset_position_ids": config.reset_position_ids,
            "reset_attention_mask": config.reset_attention_mask,
            "eod_mask_loss": config.eod_mask_loss,
            "low_level_dataset": self._low_level_fingerprint(),
        }
        self.unique_description = describe(self.unique_identifiers)
        self.built_anew_on_cache_miss = False
        arrays = self._build_or_load_indices()
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

        self._masks_cacheable = not (config.reset_position_ids or config.reset_attention_mask or config.eod_mask_loss)
        self._cached_masks = None

    # Data that shape the indices beyond the config: the sizes of the low-level dataset.
    def _low_level_fingerprint(self) -> Dict[str, Any]:
        lengths = self.dataset.sequence_lengths
        return {"num_sequences": int(len(lengths)), "num_tokens": int(np.sum(lengths, dtype=np.int64))}

    def _cache_directory(self) -> Optional[str]:
        if self.config.path_to_cache:
            return self.config.path_to_cache
        if self.config.mock or self.dataset_path is None:
            return None
        # Megatron's default: a folder named after the dataset prefix, <prefix>/cache/<Class>_indices.
        return os.path.join(os.path.abspath(self.dataset_path), "cache", f"{type(self).__name__}_indices")

    def _build_or_load_indices(self) -> Dict[str, np.ndarray]:
        cache = IndexCache(
            self._cache_directory(), type(self).__name__, self.index_split.name, self.unique_description,
            ("document_index", "sample_index", "shuffle_index"),
        )
        self.unique_description_hash = cache.hash
        drop_last = True
        if self.index_split == Split.valid:
            drop_last = self.config.drop_last_partial_validation_sequence

        def build():
            try:
                return build_gpt_indices(
                    self.dataset.sequence_lengths, self.indices, self.num_samples, self.config.sequence_length,
                    self.config.random_seed, drop_last, self.config.add_extra_token_to_sequence,
                )
            except ValueError as e:
                raise ValueError(f"{self.index_split.name} split of {self.dataset_path or 'mock data'}: {e}") from None

        arrays, self.built_anew_on_cache_miss = build_or_load(
            cache, build, f"{type(self).__name__} {self.index_split.name} ({self.dataset_path})"
        )
        return arrays

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def _sample_tokens(self, idx: int) -> Tuple[np.ndarray, np.ndarray]:
        """Tokens of sample ``idx`` (seq_length + extra, padded) and the document ids they come from."""
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"sample {idx} out of range for {type(self).__name__} with {n} samples")
        j = int(self.shuffle_index[idx])
        beg, beg_offset = (int(x) for x in self.sample_index[j])
        end, end_offset = (int(x) for x in self.sample_index[j + 1])
        extra = int(self.config.add_extra_token_to_sequence)
        document_ids, parts = [], []
        for i in range(beg, end + 1):
            doc = int(self.document_index[i])
            offset = beg_offset if i == beg else 0
            length = (end_offset + extra - offset) if i == end else None
            document_ids.append(doc)
            parts.append(self.dataset.get(doc, offset=offset, length=length))
        if self._vocab_size is not None:
            for doc, part in zip(document_ids, parts):
                if part.size and (part.max() >= self._vocab_size or part.min() < 0):
                    raise TokenIdError(self._token_id_error(doc, part))
        wanted = self.config.sequence_length + extra
        num = sum(len(p) for p in parts)
        if num < wanted:
            parts.append(np.full(wanted - num, self._pad_token_id, dtype=np.int64))
        return np.concatenate(parts).astype(np.int64, copy=False), np.array(document_ids, dtype=np.int64)

    def _token_id_error(self, sequence: int, part: np.ndarray) -> str:
        bad = np.flatnonzero((part >= self._vocab_size) | (part < 0))
        token = int(part[bad[0]])
        where = f"sequence {sequence}"
        bounds = getattr(self.dataset, "document_indices", None)
        if bounds is not None and len(bounds):
            document = int(np.searchsorted(bounds, sequence, side="right")) - 1
            where = f"document {document}" + (f" (sequence {sequence})" if document != sequence else "")
        source = f"{self.dataset_path}.bin" if self.dataset_path else type(self.dataset).__name__
        return (f"{source}: {where} holds token id {token}, outside the vocabulary of {self._vocab_size} ids "
                f"(0..{self._vocab_size - 1}), so the model's embedding cannot look it up. The data was made "
                "with another tokenizer (or is corrupt): preprocess it again with this run's tokenizer flags, "
                "or train with the tokenizer it was made with")

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        text, _ = self._sample_tokens(0 if idx is None else int(idx))
        text = torch.from_numpy(text)  # [seq_length + extra]
        if self.config.add_extra_token_to_sequence:
            tokens = text[:-1].contiguous()  # [s]
            labels = text[1:].contiguous()  # [s]
        else:
            tokens = text
            labels = torch.roll(text, shifts=-1, dims=0)
            labels[-1] = self._pad_token_id

        if self._masks_cacheable and self._cached_masks is not None:
            attention_mask, loss_mask, position_ids = self._cached_masks
            loss_mask = loss_mask.clone()
        else:
            attention_mask, loss_mask, position_ids = get_ltor_masks_and_position_ids(
                tokens, self._eod, self.config.reset_position_ids, self.config.reset_attention_mask,
                self.config.eod_mask_loss, self.config.create_attention_mask,
            )
            if self._masks_cacheable:
                self._cached_masks = (attention_mask, loss_mask.clone(), position_ids)

        loss_mask[labels == self._pad_token_id] = 0.0  # padding carries no loss
        tokens[tokens == self._pad_token_id] = 0  # ... and must be a valid embedding row
        labels[labels == self._pad_token_id] = 0
        if idx is None:  # a batch-padding sample
            loss_mask = torch.zeros_like(loss_mask)

        sample = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
        if self.config.create_attention_mask:
            sample["attention_mask"] = attention_mask
        return sample
