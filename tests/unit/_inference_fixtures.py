"""Tiny GPT models and a character tokenizer shared by the generation tests."""

import string

import torch

from gigatron.core.models.gpt import GPTModel
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.transformer.config import TransformerConfig


class CharTokenizer:
    """Test tokenizer: id 0 is the end-of-document token, then one id per character of
    `alphabet`, including "\\n" and ":"."""

    def __init__(self, alphabet: str = string.ascii_lowercase + " \n:.,"):
        self.alphabet = alphabet
        self.index = {c: i + 1 for i, c in enumerate(alphabet)}

    @property
    def vocab_size(self):
        return len(self.alphabet) + 1

    @property
    def eod(self):
        return 0

    @property
    def pad(self):
        return 0

    def tokenize(self, text):
        return [self.index[c] for c in text]

    def detokenize(self, ids):
        return "".join("<eod>" if i == 0 else self.alphabet[i - 1] for i in ids)


def tiny_config(**kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=64,
                max_position_embeddings=64, attention_dropout=0.0, hidden_dropout=0.0,
                use_cpu_initialization=True)
    base.update(kw)
    return TransformerConfig(**base)


PADDED_VOCAB = 40  # the char tokenizer has 32 tokens; 8 padded entries


def tiny_model(seed=7, groups=None, **kw):
    config = tiny_config(**kw)
    groups = groups or ParallelGroups.single()
    model = GPTModel(config, groups, PADDED_VOCAB, seed=seed)
    return model.eval()
