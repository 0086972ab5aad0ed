"""Zero-shot GPT tasks: windowing, detokenizer, perplexity formulas, LAMBADA, the tasks/main.py driver."""

import json
import math
import os
import re

import numpy as np
import pytest
import torch

from gigatron.core.models.gpt import GPTModel
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.transformer.config import TransformerConfig
from tasks.zeroshot_gpt.datasets import (
    EvalDataError,
    LambadaDataset,
    LMWindowDataset,
    build_lambada_dataset,
    lambada_tokens,
    num_windows,
    read_wikitext,
)
from tasks.zeroshot_gpt.detokenizer import get_detokenizer, wikitext_detokenizer
from tasks.zeroshot_gpt.evaluate import (
    evaluate_sums,
    lambada_results,
    true_vocab_argmax,
    true_vocab_nll,
    wikitext_results,
)

VOCAB, PADDED = 50, 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class WordTokenizer:
    """Test fixture: one id per whitespace-separated word (fixed table), eod = 0."""

    def __init__(self, words):
        self.ids = {w: i + 1 for i, w in enumerate(words)}
        self.eod = 0
        self.vocab_size = len(words) + 1

    def tokenize(self, text):
        return [self.ids[w] for w in text.split()]


def _config(**kw):
    base = dict(num_layers=2, hidden_size=16, num_attention_heads=2, seq_length=8, attention_dropout=0.0,
                hidden_dropout=0.0, use_cpu_initialization=True)
    base.update(kw)
    return TransformerConfig(**base)


def _eval(model, dataset, metric, mbs=3):
    groups = ParallelGroups.single()
    return evaluate_sums([model], dataset, metric, groups=groups, config=model.config, micro_batch_size=mbs,
                         vocab_size=VOCAB, device=torch.device("cpu"))


# ------------------------------------------------------------------ windows


@pytest.mark.parametrize("seq_length,stride", [(8, 8), (8, 3), (8, 1), (5, 2), (6, 4), (4, 4)])
@pytest.mark.parametrize("num_tokens", [2, 3, 5, 8, 9, 10, 17, 40])
def test_windows_count_every_target_once(num_tokens, seq_length, stride):
    tokens = list(range(100, 100 + num_tokens))
    ds = LMWindowDataset(tokens, seq_length, pad_id=0, stride=stride)
    assert len(ds) == math.ceil(max(num_tokens - 1 - stride, 0) / stride) + 1 == num_windows(num_tokens, stride)
    counts = np.zeros(num_tokens, dtype=int)
    for k in range(len(ds)):
        item = ds[k]
        assert item["text"].shape == (seq_length + 1,) and item["pad_mask"].shape == (seq_length,)
        for j in np.nonzero(item["pad_mask"])[0]:
            target = item["text"][j + 1]
            assert target != 0, "a padded position is counted"
            counts[target - 100] += 1
            assert target - 100 == k * stride + j + 1  # the target is the right token of the stream
    assert counts[0] == 0 and (counts[1:] == 1).all()


def test_window_flags_are_checked():
    with pytest.raises(ValueError, match="--overlapping-eval"):
        LMWindowDataset([1, 2, 3], 4, 0, stride=5)
    with pytest.raises(EvalDataError, match="at least 2"):
        LMWindowDataset([1], 4, 0, stride=2)


# ------------------------------------------------------------------ detokenizer


def test_wikitext_detokenizer_rules():
    raw = (" = = Early life = = \n The 1 @,@ 000 @-@ year old king 's army , led by the kings ' sons , "
           "marched 3 @.@ 5 km ( about 2 miles ) at 5 ° N ; \" quietly \" ! Then : [ it ] ? \n")
    out = wikitext_detokenizer(raw)
    assert out == (" == Early life ==\nThe 1,000-year old king's army, led by the kings' sons, "
                   "marched 3.5 km (about 2 miles) at 5°N; \"quietly\"! Then: [it]?\n")
    assert wikitext_detokenizer(" = = = = Deep = = = = ") == " ==== Deep ==== "
    assert get_detokenizer("data/wikitext-103/wiki.test.tokens") is wikitext_detokenizer
    assert get_detokenizer("other.txt") is None


def test_read_wikitext_counts_original_words(tmp_path):
    path = tmp_path / "wiki.test.tokens"
    path.write_text(" = Title = \n a b @-@ c \n", encoding="utf-8")
    seen = {}

    def tokenize(text):
        seen["text"] = text
        return list(range(len(text.split())))

    corpus = read_wikitext(str(path), tokenize)
    assert corpus.num_original_tokens == len(" = Title = \n a b @-@ c \n".strip().split(" "))
    assert seen["text"] == wikitext_detokenizer(" = Title = \n a b @-@ c \n")
    assert corpus.num_tokenized_tokens == len(seen["text"].split())
    with pytest.raises(EvalDataError, match="not found"):
        read_wikitext(str(tmp_path / "missing"), tokenize)


# ------------------------------------------------------------------ true-vocabulary logits


def test_padded_vocab_gets_no_probability():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 2, PADDED, generator=g)
    logits[..., VOCAB:] = 100.0  # padded entries would win everything if they counted
    targets = torch.randint(0, VOCAB, (5, 2), generator=g)
    tp = ParallelGroups.single().tp
    expected = torch.nn.functional.cross_entropy(logits[..., :VOCAB].reshape(-1, VOCAB), targets.reshape(-1),
                                                 reduction="none").view(5, 2)
    torch.testing.assert_close(true_vocab_nll(logits, targets, VOCAB, tp), expected)
    assert torch.equal(true_vocab_argmax(logits, VOCAB, tp), logits[..., :VOCAB].argmax(-1))


def test_uniform_model_perplexity_is_closed_form():
    """A GPT whose weights are all zero gives logits 0 over the padded vocabulary: over the true
    vocabulary it is uniform, so every target costs ln(V) and ppl = V."""
    model = GPTModel(_config(), ParallelGroups.single(), PADDED, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, VOCAB, (37,), generator=g).tolist()
    ds = LMWindowDataset(tokens, 8, pad_id=0, stride=3)
    sums = _eval(model, ds, "loss")
    assert float(sums[1]) == len(tokens) - 1
    torch.testing.assert_close(float(sums[0]), (len(tokens) - 1) * math.log(VOCAB), rtol=1e-5, atol=1e-5)
    res = wikitext_results(float(sums[0]), float(sums[1]), len(tokens), num_original_tokens=25)
    assert res["avg_loss"] == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert res["ppl"] == pytest.approx(VOCAB, rel=1e-5)
    ratio = (len(tokens) - 1) / 24
    assert res["token_ratio"] == pytest.approx(ratio)
    assert res["adjusted_ppl"] == pytest.approx(math.exp(math.log(VOCAB) * ratio), rel=1e-5)


def test_perplexity_formula_caps_at_20():
    res = wikitext_results(nll_sum=30.0 * 9, num_counted=9, num_tokenized_tokens=10, num_original_tokens=4)
    assert res["ppl"] == pytest.approx(math.exp(20.0))
    assert res["adjusted_ppl"] == pytest.approx(math.exp(20.0))
    with pytest.raises(RuntimeError, match="counted"):
        wikitext_results(1.0, 8, 10, 4)


def test_windowed_loss_equals_direct_per_target_loss():
    """Random model: the windowed NLL sum equals the sum, over targets, of the NLL computed from
    the window that counts it (checked target by target against a plain forward)."""
    model = GPTModel(_config(), ParallelGroups.single(), PADDED, seed=7)
    model.eval()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(1, VOCAB, (23,), generator=g).tolist()
    ds = LMWindowDataset(tokens, 8, pad_id=0, stride=3)
    expected = 0.0
    with torch.no_grad():
        for k in range(len(ds)):
            item = ds[k]
            text = torch.from_numpy(item["text"])[None]
            logits = model(text[:, :-1])[..., :VOCAB].float()  # [s, 1, V]
            logp = torch.log_softmax(logits[:, 0], dim=-1)  # [s, V]
            nll = -logp.gather(-1, text[0, 1:, None]).squeeze(-1)  # [s]
            expected += float((nll * torch.from_numpy(item["pad_mask"])).sum())
    sums = _eval(model, ds, "loss", mbs=2)
    assert float(sums[0]) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------ LAMBADA


def test_lambada_strict_and_plain_targets():
    tok = WordTokenizer(["the", "cat", "sat", "on", "mat", "Ġmat", "ma", "t"])

    def tokenize(text):  # " mat" becomes two tokens "ma" "t" to exercise multi-token targets
        out = []
        for i, w in enumerate(text.split(" ")):
            if not w:
                continue
            out += [tok.ids["ma"], tok.ids["t"]] if (w == "mat" and text.startswith(" ") and i == 1) else [tok.ids[w]]
        return out

    context, target = lambada_tokens("the cat sat on mat", tokenize, strict=False)
    assert target == [tok.ids["mat"]] and context == [tok.ids[w] for w in "the cat sat on".split()]
    context, target = lambada_tokens("the cat sat on mat", tokenize, strict=True)
    assert context == [tok.ids[w] for w in "the cat sat on".split()]
    assert target == [tok.ids["ma"], tok.ids["t"]]


class ControlledArgmax(torch.nn.Module):
    """Test fixture: a 'model' whose greedy prediction after token x is table[x] (vocab-parallel
    logits [s, b, Vp], padded entries very large so that masking them matters)."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.pre_process = True
        self.post_process = True
        self.config = _config()

    def forward(self, ids, position_ids=None, attention_mask=None):
        logits = torch.zeros(ids.shape[1], ids.shape[0], PADDED)  # [s, b, Vp]
        logits[..., VOCAB:] = 50.0
        predicted = self.table[ids].transpose(0, 1)  # [s, b]
        logits.scatter_(-1, predicted.unsqueeze(-1), 10.0)
        return logits


def test_lambada_accuracy_strict_needs_every_target_token():
    table = torch.arange(VOCAB) % VOCAB + 1  # predicts x + 1
    table[VOCAB - 1] = 1
    model = ControlledArgmax(table)
    samples = [
        ([1, 2, 3], [4]),  # correct
        ([1, 2, 3], [4, 5, 6]),  # correct: each token predicted from the previous one
        ([1, 2, 3], [4, 9]),  # second token wrong
        ([5], [7]),  # wrong
        ([10, 11], [12, 13]),  # correct
    ]
    ds = LambadaDataset(samples, seq_length=6, pad_id=0)
    sums = _eval(model, ds, "accuracy", mbs=2)
    assert (float(sums[0]), float(sums[1])) == (3.0, 5.0)
    assert lambada_results(3.0, 5.0)["avg_accuracy"] == pytest.approx(0.6)
    with pytest.raises(EvalDataError, match="--seq-length"):
        LambadaDataset([([1] * 10, [2])], seq_length=6, pad_id=0)


def test_lambada_file_reading(tmp_path):
    tok = WordTokenizer(["a", "b", "c", "d"])
    path = tmp_path / "lambada.jsonl"
    path.write_text(json.dumps({"text": "a b c"}) + "\n\n" + json.dumps({"text": "d a"}) + "\n")
    ds = build_lambada_dataset(str(path), tok, seq_length=4, strict=True)
    assert len(ds) == 2 and ds.samples[0] == ([1, 2], [3])
    path.write_text(json.dumps({"text": "a b"}) + "\nnot json\n")
    with pytest.raises(EvalDataError, match="line 2"):
        build_lambada_dataset(str(path), tok, seq_length=4, strict=True)


# ------------------------------------------------------------------ the driver


def _model_flags(tmp_path):
    return ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "8",
            "--max-position-embeddings", "8", "--micro-batch-size", "3", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", str(VOCAB - 1), "--make-vocab-size-divisible-by", "32", "--attention-dropout", "0",
            "--hidden-dropout", "0", "--seed", "11", "--use-cpu-initialization", "--distributed-backend", "gloo"]


def test_main_wikitext_and_lambada_write_results(tmp_path, capsys):
    """Results go beside the checkpoint (named with the task, the data file and the time) or to
    --results-path; the checkpoint folder is left alone and no results file is ever replaced."""
    from gigatron.training.checkpointing import save_checkpoint
    from tasks.main import main, parse_task_args

    flags = _model_flags(tmp_path)
    wiki = tmp_path / "wiki.test.tokens"
    wiki.write_text(" ".join(str(i % 40 + 1) for i in range(45)) + " \n")
    lambada = tmp_path / "lambada.jsonl"
    lambada.write_text("".join(json.dumps({"text": f"{i} {i + 1} {i + 2}"}) + "\n" for i in range(1, 8)))

    # A checkpoint of a model with known weights (seed 5); the task must load it.
    args, _ = parse_task_args(flags + ["--task", "WIKITEXT103", "--valid-data", str(wiki)])
    config = _config(seq_length=8)
    model = GPTModel(config, ParallelGroups.single(), PADDED, seed=5)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(str(ckpt), 3, [model], None, None, args, ParallelGroups.single(), save_optim=False,
                    save_rng=False)
    checkpoint_files = sorted(os.listdir(ckpt))

    wiki_flags = flags + ["--task", "WIKITEXT103", "--valid-data", str(wiki), "--overlapping-eval", "3",
                          "--load", str(ckpt)]
    results = main(wiki_flags)
    got = results[os.path.abspath(wiki)]
    tokens = [int(t) for t in wiki.read_text().split()]
    sums = _eval(model, LMWindowDataset(tokens, 8, pad_id=VOCAB - 1, stride=3), "loss")
    expected = wikitext_results(float(sums[0]), float(sums[1]), len(tokens), len(wiki.read_text().strip().split(" ")))
    assert got["avg_loss"] == pytest.approx(expected["avg_loss"], rel=1e-6)
    assert got["adjusted_ppl"] == pytest.approx(expected["adjusted_ppl"], rel=1e-6)
    assert sorted(os.listdir(ckpt)) == checkpoint_files  # nothing written into the checkpoint
    (first,) = sorted(tmp_path.glob("ckpt.WIKITEXT103.wiki.test.tokens.*.json"))
    assert re.fullmatch(r"ckpt\.WIKITEXT103\.wiki\.test\.tokens\.\d{8}-\d{6}\.json", first.name)
    record = json.loads(first.read_text())
    assert record["iteration"] == 3 and record["results"][os.path.abspath(wiki)]["ppl"] == pytest.approx(got["ppl"])
    first_text = first.read_text()
    main(wiki_flags)  # a second run (possibly within the same second) keeps the first file
    assert len(list(tmp_path.glob("ckpt.WIKITEXT103.wiki.test.tokens.*.json"))) == 2
    assert first.read_text() == first_text

    chosen = tmp_path / "out" / "lambada.json"
    lambada_flags = flags + ["--task", "LAMBADA", "--valid-data", str(lambada), "--strict-lambada", "--load",
                             str(ckpt), "--results-path", str(chosen)]
    results = main(lambada_flags)
    acc = results[os.path.abspath(lambada)]
    assert acc["total_examples"] == 7 and 0 <= acc["number_correct"] <= 7
    assert json.loads(chosen.read_text())["results"][os.path.abspath(lambada)]["total_examples"] == 7
    chosen.write_text("kept")
    capsys.readouterr()
    main(lambada_flags)
    assert chosen.read_text() == "kept"
    again = tmp_path / "out" / "lambada-1.json"
    assert json.loads(again.read_text())["task"] == "LAMBADA"
    assert f"{chosen} exists and is kept; results written to {again}" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "out")) == ["lambada-1.json", "lambada.json"]  # no temporary left


def test_results_file_names_and_never_replaces(tmp_path):
    from tasks.eval_utils import default_results_path, write_results_file

    when = 1_800_000_000.0
    stamp = __import__("time").strftime("%Y%m%d-%H%M%S", __import__("time").localtime(when))
    path = default_results_path(str(tmp_path / "runs" / "gpt"), "LAMBADA", ["/data/lambada test.jsonl"], when)
    assert path == str(tmp_path / "runs" / f"gpt.LAMBADA.lambada_test.jsonl.{stamp}.json")
    many = default_results_path(str(tmp_path / "c/"), "RACE", ["a/dev/middle", "b/dev/high", "x", "y"], when)
    assert os.path.basename(many) == f"c.RACE.middle+high+x+1more.{stamp}.json"
    target = str(tmp_path / "new" / "r.json")
    assert write_results_file(target, {"n": 1}) == target
    assert write_results_file(target, {"n": 2}) == str(tmp_path / "new" / "r-1.json")
    assert write_results_file(target, {"n": 3}) == str(tmp_path / "new" / "r-2.json")
    assert json.loads(open(target).read()) == {"n": 1}
    assert sorted(os.listdir(tmp_path / "new")) == ["r-1.json", "r-2.json", "r.json"]


def test_results_file_without_hard_links(tmp_path, monkeypatch):
    """Where the file system has no hard links the name is claimed exclusively, then replaced."""
    from tasks.eval_utils import write_results_file

    def no_links(src, dst):
        raise PermissionError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    target = str(tmp_path / "r.json")
    assert write_results_file(target, {"n": 1}) == target
    assert write_results_file(target, {"n": 2}) == str(tmp_path / "r-1.json")
    assert json.loads(open(target).read()) == {"n": 1}
    assert sorted(os.listdir(tmp_path)) == ["r-1.json", "r.json"]
