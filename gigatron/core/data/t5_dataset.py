"""T5 pretraining samples: span corruption with sentinel tokens.

A sample's sentences (see ``masked_dataset``) are joined and cut to the sample's target length
(tokens past it are dropped). Whole-word spans of geometric length (p = 0.2, at most 10 words) are
masked; span k is replaced in the encoder input by the sentinel ``<extra_id_k>``
(``tokenizer.additional_special_tokens_ids[k]``, so --vocab-extra-ids must be given). The decoder
reads ``[BOS] <extra_id_0> span0 <extra_id_1> span1 ...`` and predicts the same sequence shifted by
one, ending with ``[EOS]``. Spans are chosen so that the decoder sequence fits
``--decoder-seq-length`` and there are enough sentinels.

BOS/EOS: the tokenizer's ``bos``/``eos`` (the BERT WordPiece tokenizers add ``[BOS]``/``[EOS]`` to
the vocabulary, as Megatron does); a tokenizer without them uses ``cls`` as BOS and ``sep`` as EOS.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from .masked_dataset import MaskedDatasetConfig, MaskedWordPieceDataset, _named_id
from .utils import Split

__all__ = ["T5Dataset"]


class T5Dataset(MaskedWordPieceDataset):
    """T5 samples of one document split; ``__getitem__`` returns a dict of tensors:

    ``text_enc`` (int64 [s_enc], padded with pad), ``text_dec`` (int64 [s_dec], padded with pad),
    ``labels`` (int64 [s_dec], -1 on padding), ``loss_mask`` (float32 [s_dec], 1 on real labels),
    ``enc_mask`` (bool [s_enc, s_enc]), ``dec_mask`` (bool [s_dec, s_dec], causal),
    ``enc_dec_mask`` (bool [s_dec, s_enc]) — masks are True where attention is allowed (Megatron's
    dataset convention: the model masks where they are False) — and ``truncated`` (int64 []).
    """

    def __init__(self, indexed_dataset, dataset_path: Optional[str], indices: np.ndarray,
                 num_samples: Optional[int], index_split: Split, config: MaskedDatasetConfig):
        super().__init__(indexed_dataset, dataset_path, indices, num_samples, index_split, config)
        tokenizer = config.tokenizer
        self.sentinel_ids = [int(i) for i in tokenizer.additional_special_tokens_ids]
        bos = _named_id(tokenizer, "bos")
        eos = _named_id(tokenizer, "eos")
        self.bos_id = bos if bos >= 0 else _named_id(tokenizer, "cls")
        self.eos_id = eos if eos >= 0 else _named_id(tokenizer, "sep")
        s_dec = config.decoder_sequence_length
        self._causal = np.tril(np.ones((s_dec, s_dec), dtype=bool))  # [s_dec, s_dec]

    @property
    def max_seq_length(self) -> int:
        return self.config.sequence_length - 2

    @property
    def min_sentences(self) -> int:
        return 1

    def _check_tokenizer(self, tokenizer) -> None:
        if self.config.decoder_sequence_length is None:
            raise ValueError("T5 samples need --decoder-seq-length")
        if not getattr(tokenizer, "additional_special_tokens_ids", None):
            raise ValueError("T5 span masking needs sentinel tokens: pass --vocab-extra-ids 100 (a tokenizer with "
                             "additional_special_tokens_ids <extra_id_0> ...)")
        if _named_id(tokenizer, "bos") < 0 and _named_id(tokenizer, "cls") < 0:
            raise ValueError("T5 samples need a tokenizer with a bos (or cls) id to start the decoder input")
        if _named_id(tokenizer, "eos") < 0 and _named_id(tokenizer, "sep") < 0:
            raise ValueError("T5 samples need a tokenizer with an eos (or sep) id to end the decoder labels")

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        idx = int(idx)
        start, end, target = self._row(idx)
        if idx < 0:
            idx += len(self)
        rng = self.sample_rng(idx)
        tokens = np.concatenate(self.sentences(start, end))  # [n]
        truncated = tokens.size > target
        tokens = tokens[:target]

        s_enc = self.config.sequence_length
        s_dec = self.config.decoder_sequence_length
        masked = self.masker.mask(tokens, rng, self.max_predictions(target),
                                  max_spans=len(self.sentinel_ids), max_decoder_tokens=s_dec)
        encoder, decoder = [], [np.array([self.bos_id])]
        previous_end = 0
        for k, (begin, stop) in enumerate(masked.spans):
            sentinel = np.array([self.sentinel_ids[k]])
            encoder += [tokens[previous_end:begin], sentinel]
            decoder += [sentinel, tokens[begin:stop]]
            previous_end = stop
        encoder.append(tokens[previous_end:])
        encoder = np.concatenate(encoder).astype(np.int64)  # [n_enc]
        decoder_input = np.concatenate(decoder).astype(np.int64)  # [n_dec] = [BOS] s0 span0 s1 span1 ...
        decoder_output = np.concatenate((decoder_input[1:], [self.eos_id])).astype(np.int64)  # [n_dec]
        n_enc, n_dec = encoder.size, decoder_input.size
        assert n_enc <= s_enc and n_dec <= s_dec, (n_enc, s_enc, n_dec, s_dec)

        text_enc = np.full(s_enc, self.pad_id, dtype=np.int64)
        text_enc[:n_enc] = encoder
        text_dec = np.full(s_dec, self.pad_id, dtype=np.int64)
        text_dec[:n_dec] = decoder_input
        labels = np.full(s_dec, -1, dtype=np.int64)
        labels[:n_dec] = decoder_output
        loss_mask = np.zeros(s_dec, dtype=np.float32)
        loss_mask[:n_dec] = 1.0

        enc_mask = np.zeros((s_enc, s_enc), dtype=bool)  # [s_enc, s_enc]
        enc_mask[:n_enc, :n_enc] = True
        dec_mask = self._causal.copy()  # [s_dec, s_dec]
        dec_mask[n_dec:, :] = False
        dec_mask[:, n_dec:] = False
        enc_dec_mask = np.zeros((s_dec, s_enc), dtype=bool)  # [s_dec, s_enc]
        enc_dec_mask[:n_dec, :n_enc] = True
        return {
            "text_enc": torch.from_numpy(text_enc),
            "text_dec": torch.from_numpy(text_dec),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "truncated": torch.tensor(int(truncated), dtype=torch.int64),
            "enc_mask": torch.from_numpy(enc_mask),
            "dec_mask": torch.from_numpy(dec_mask),
            "enc_dec_mask": torch.from_numpy(enc_dec_mask),
        }
