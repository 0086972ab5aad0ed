"""BERT pretraining samples: two segments, whole-word n-gram masking and the sentence-order label.

A sample's sentences (see ``masked_dataset``) are cut at a random pivot into segment A (the
sentences before it) and B (the rest). With the binary head, A and B are swapped with probability
0.5 and ``is_random`` says so (sentence-order prediction). The longer segment loses tokens, one at
a time from its front or back at random, until both fit the sample's target length; the sample is
``[CLS] A [SEP] B [SEP]`` padded to ``seq_length``. Of the masked tokens 80% become ``[MASK]``, 10%
a random ordinary token and 10% stay as they are. Without the binary head (--bert-no-binary-head)
the sample is ``[CLS] A [SEP]`` over all its sentences.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .masked_dataset import MaskedDatasetConfig, MaskedWordPieceDataset, _named_id
from .utils import Split

__all__ = ["BERTDataset", "truncate_segments"]


def truncate_segments(a: np.ndarray, b: np.ndarray, target: int, rng: np.random.RandomState
                      ) -> Tuple[np.ndarray, np.ndarray, bool]:
    """Shorten the longer of ``a``/``b`` (``b`` on ties) one token at a time until
    ``len(a) + len(b) <= target``, each token taken from the front or the back with probability 1/2.

    The lengths this loop ends at do not depend on the coin flips, so they are computed directly and
    the number of tokens taken from the front of each segment is drawn as a Binomial(removed, 1/2).
    Returns ``(a, b, truncated)``.
    """
    la, lb = len(a), len(b)
    excess = la + lb - target
    if excess <= 0:
        return a, b, False
    keep_a, keep_b = la, lb
    if keep_a > keep_b:
        d = min(excess, keep_a - keep_b)
        keep_a, excess = keep_a - d, excess - d
    elif keep_b > keep_a:
        d = min(excess, keep_b - keep_a)
        keep_b, excess = keep_b - d, excess - d
    keep_b -= (excess + 1) // 2  # equal lengths: b first on every tie
    keep_a -= excess // 2
    front_a = int(rng.binomial(la - keep_a, 0.5)) if la > keep_a else 0
    front_b = int(rng.binomial(lb - keep_b, 0.5)) if lb > keep_b else 0
    return a[front_a:front_a + keep_a], b[front_b:front_b + keep_b], True


class BERTDataset(MaskedWordPieceDataset):
    """BERT samples of one document split; ``__getitem__`` returns a dict of tensors:

    ``text`` (int64 [s]), ``types`` (int64 [s]: 0 for [CLS], A and the first [SEP], 1 for B and the
    last [SEP], 0 on padding), ``labels`` (int64 [s]: the original token where masked, -1 elsewhere),
    ``is_random`` (int64 []: 1 if A and B were swapped), ``padding_mask`` (int64 [s]: 1 real, 0 pad),
    ``loss_mask`` (float32 [s]: 1 where masked), ``truncated`` (int64 []: 1 if tokens were cut).
    """

    def __init__(self, indexed_dataset, dataset_path: Optional[str], indices: np.ndarray,
                 num_samples: Optional[int], index_split: Split, config: MaskedDatasetConfig):
        super().__init__(indexed_dataset, dataset_path, indices, num_samples, index_split, config)
        tokenizer = config.tokenizer
        self.cls_id = int(tokenizer.cls)
        self.sep_id = int(tokenizer.sep)
        self.mask_id = int(tokenizer.mask)
        special = np.zeros(int(self.masker.is_special.size), dtype=bool)
        special[np.asarray(self.special_ids, dtype=np.int64)] = True
        vocab_ids = np.asarray(sorted(int(i) for i in tokenizer.inv_vocab), dtype=np.int64)
        self.replacement_ids = vocab_ids[~special[vocab_ids]]  # ordinary tokens, for the 10% random case
        if self.replacement_ids.size == 0:
            raise ValueError("the tokenizer's vocabulary has no ordinary token to use as a random replacement")

    @property
    def max_seq_length(self) -> int:
        return self.config.sequence_length - 3  # [CLS] A [SEP] B [SEP]

    @property
    def min_sentences(self) -> int:
        return 2 if self.config.classification_head else 1

    def _check_tokenizer(self, tokenizer) -> None:
        missing = [name for name in ("cls", "sep", "mask") if _named_id(tokenizer, name) < 0]
        if missing:
            raise ValueError(f"BERT samples need a tokenizer with {', '.join(missing)} ids; use "
                             f"--tokenizer-type BertWordPieceLowerCase or BertWordPieceCase")
        if getattr(tokenizer, "inv_vocab", None) is None:
            raise ValueError("BERT masking needs the tokenizer's vocabulary (inv_vocab) to find whole words "
                             "and random replacement tokens")

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        idx = int(idx)
        start, end, target = self._row(idx)
        if idx < 0:
            idx += len(self)
        rng = self.sample_rng(idx)
        sentences = self.sentences(start, end)
        if self.config.classification_head:
            if len(sentences) < 2:
                raise ValueError(f"sample {idx} has {len(sentences)} sentence(s); the binary head needs two")
            pivot = int(rng.randint(1, len(sentences)))
            is_random = bool(rng.random_sample() < 0.5)
        else:
            pivot, is_random = len(sentences), False
        empty = np.zeros(0, dtype=np.int64)
        a = np.concatenate(sentences[:pivot]) if pivot > 0 else empty
        b = np.concatenate(sentences[pivot:]) if pivot < len(sentences) else empty
        if is_random:
            a, b = b, a
        a, b, truncated = truncate_segments(a, b, target, rng)

        cls, sep = np.array([self.cls_id]), np.array([self.sep_id])
        parts = [cls, a, sep]
        if self.config.classification_head:
            parts += [b, sep]
        tokens = np.concatenate(parts).astype(np.int64)  # [n]
        types = np.zeros(tokens.size, dtype=np.int64)  # [n]
        types[len(a) + 2:] = 1

        masked = self.masker.mask(tokens, rng, self.max_predictions(target))
        positions = masked.positions
        text = tokens.copy()
        labels_real = np.full(tokens.size, -1, dtype=np.int64)
        labels_real[positions] = tokens[positions]
        # 80% [MASK], 10% a random ordinary token, 10% unchanged (decided per token)
        first_draw = rng.random_sample(positions.size)
        second_draw = rng.random_sample(positions.size)
        random_ids = self.replacement_ids[rng.randint(0, self.replacement_ids.size, size=positions.size)]
        replacement = np.where(first_draw < 0.8, self.mask_id,
                               np.where(second_draw < 0.5, tokens[positions], random_ids))
        text[positions] = replacement

        s = self.config.sequence_length
        n = tokens.size
        assert n <= s, f"sample {idx} has {n} tokens for a sequence length of {s}"
        out_text = np.full(s, self.pad_id, dtype=np.int64)
        out_text[:n] = text
        out_types = np.zeros(s, dtype=np.int64)
        out_types[:n] = types
        out_labels = np.full(s, -1, dtype=np.int64)
        out_labels[:n] = labels_real
        padding_mask = np.zeros(s, dtype=np.int64)
        padding_mask[:n] = 1
        loss_mask = np.zeros(s, dtype=np.float32)
        loss_mask[positions] = 1.0
        return {
            "text": torch.from_numpy(out_text),
            "types": torch.from_numpy(out_types),
            "labels": torch.from_numpy(out_labels),
            "is_random": torch.tensor(int(is_random), dtype=torch.int64),
            "padding_mask": torch.from_numpy(padding_mask),
            "loss_mask": torch.from_numpy(loss_mask),
            "truncated": torch.tensor(int(truncated), dtype=torch.int64),
        }
