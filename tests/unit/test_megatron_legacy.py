"""Megatron-LM's pre-Megatron-Core ("legacy") GPT layout: fixtures written from Megatron's
documented names (`language_model.encoder.layers.N.self_attention.query_key_value.weight`, …,
tests/megatron_oracle.py) holding a Megatron-Core GPTModel's weights, incl. the published 345M
layout (`release/mp_rank_00/model_optim_rng.pt`, tracker `release`) and the QKV row orders of
checkpoint versions 0 and 1.0, load with Megatron-Core's logits (1e-5, fp32) through
from_pretrained, convert.py --loader legacy, and --load with --use-checkpoint-args;
convert.py --saver legacy writes the layout back."""

import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import megatron_oracle as oracle  # noqa: E402
from script_server import run_python  # noqa: E402

import gigatron  # noqa: E402
from gigatron.core.checkpoint import formats  # noqa: E402
from gigatron.core.checkpoint.io import CheckpointError, safe_torch_load  # noqa: E402
from tests.parallel.harness import free_port  # noqa: E402

pytestmark = pytest.mark.skipif(not oracle.megatron_available(), reason="megatron-core is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CASES = {"v3-iter": ("3.0", "1", False), "v0-release-tp2": ("0", "2", True), "v1-release": ("1.0", "1", True)}


@pytest.fixture(scope="module", params=sorted(CASES))
def legacy_ckpt(request, tmp_path_factory):
    version, tp, release = CASES[request.param]
    root = tmp_path_factory.mktemp(f"legacy_{request.param}")
    oracle.run_oracle("write-legacy", "--kind", "gpt", "--root", str(root), "--version", version, "--tp", tp,
                      *(["--release"] if release else []), port=free_port())
    return root, release


def _reference(root):
    return torch.load(os.path.join(root, "reference.pt"), weights_only=True)


def _convert(*argv):
    out = run_python([os.path.join(ROOT, "tools", "checkpoint", "convert.py"), "--model-type",
                      "GPT", *map(str, argv)], timeout=300, cwd=ROOT,
                     env=dict(os.environ, PYTHONPATH=ROOT))
    return out


def _assert_logits(path, ref):
    with torch.no_grad():
        out = gigatron.from_pretrained(path)(ref["tokens"])
    torch.testing.assert_close(out, ref["logits"], rtol=0, atol=1e-5)


def test_detected_and_from_pretrained_matches_megatron(legacy_ckpt):
    root, release = legacy_ckpt
    _, iteration, module = formats.locate(str(root))
    assert module.NAME == "legacy" and iteration == (None if release else 5)
    _assert_logits(root, _reference(root))


def test_convert_loader_legacy(legacy_ckpt, tmp_path):
    root, _ = legacy_ckpt
    out = _convert("--loader", "legacy", "--saver", "core", "--load-dir", root, "--save-dir", tmp_path / "ours")
    assert out.returncode == 0, out.stderr
    _assert_logits(tmp_path / "ours", _reference(root))
    out = _convert("--loader", "legacy", "--saver", "core", "--load-dir", tmp_path / "ours", "--save-dir",
                   tmp_path / "again")
    assert out.returncode == 2 and "not the pre-Megatron-Core (legacy) layout" in out.stderr


def test_saver_legacy_round_trip(legacy_ckpt, tmp_path):
    """--saver legacy writes Megatron's names, a Namespace args Megatron-LM can read, and a release
    directory for a model without an iteration; it reads back with the same logits."""
    root, release = legacy_ckpt
    if not release:
        pytest.skip("the release fixtures cover this")
    out = _convert("--loader", "legacy", "--saver", "legacy", "--load-dir", root, "--save-dir", tmp_path / "out",
                   "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out" / "latest_checkpointed_iteration.txt").read_text() == "release"
    last = safe_torch_load(str(tmp_path / "out" / "release" / "mp_rank_01_001" / "model_optim_rng.pt"),
                           allow_namespace=True)
    assert isinstance(last["args"], argparse.Namespace) and last["args"].tensor_model_parallel_size == 2
    assert last["checkpoint_version"] == 3.0
    assert "layers.0.self_attention.query_key_value.weight" in last["model"]["language_model"]["encoder"]
    assert "final_layernorm.weight" in last["model"]["language_model"]["encoder"]  # stage-local layer numbers
    assert set(last["model"]["word_embeddings_for_head"]) == {"weight"}  # the tied head on the last stage
    first = safe_torch_load(str(tmp_path / "out" / "release" / "mp_rank_00_000" / "model_optim_rng.pt"),
                            allow_namespace=True)
    assert set(first["model"]["language_model"]["embedding"]) == {"word_embeddings", "position_embeddings"}
    _assert_logits(tmp_path / "out", _reference(root))


def test_load_with_use_checkpoint_args(legacy_ckpt):
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.training.arguments import parse_args
    from gigatron.training.checkpointing import load_args_from_checkpoint, load_checkpoint

    root, release = legacy_ckpt
    args = parse_args(["--load", str(root), "--use-checkpoint-args", "--micro-batch-size", "2",
                       "--num-layers", "1", "--hidden-size", "8", "--num-attention-heads", "2", "--seq-length", "4",
                       "--max-position-embeddings", "4"])
    load_args_from_checkpoint(args)
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.vocab_size) == (2, 64, 4, 4095)
    template = gigatron.from_pretrained(root)
    from gigatron.core.models.gpt import GPTModel

    model = GPTModel(template.config, ParallelGroups.single(), template.padded_vocab_size, seed=3)
    loaded = load_checkpoint(str(root), [model], object() if release else None, None, ParallelGroups.single(),
                             load_optim=not release)
    assert loaded.iteration == (0 if release else 5)
    ref = _reference(root)
    with torch.no_grad():
        logits = model.eval()(ref["tokens"], None, None).transpose(0, 1)
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=1e-5)


def test_pretrain_gpt_starts_from_a_release_checkpoint(legacy_ckpt, tmp_path):
    root, release = legacy_ckpt
    if not release or "v1" not in str(root):  # the tp=1 release checkpoint (the flags take its tp)
        pytest.skip("one end-to-end run is enough")
    out = run_python(
        [os.path.join(ROOT, "pretrain_gpt.py"), "--load", str(root), "--use-checkpoint-args",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1", "--mock-data", "--lr", "1e-4",
         "--eval-iters", "0", "--attention-dropout", "0", "--hidden-dropout", "0", "--distributed-backend", "gloo",
         "--use-cpu-initialization", "--log-interval", "1", "--data-cache-path", str(tmp_path / "cache")],
        timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "iteration        1/       1" in out.stdout + out.stderr


def test_unknown_legacy_names_are_named(tmp_path):
    iter_dir = tmp_path / "release" / "mp_rank_00"
    iter_dir.mkdir(parents=True)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    torch.save({"args": argparse.Namespace(num_layers=1, hidden_size=4, num_attention_heads=1),
                "checkpoint_version": 3.0,
                "model": {"language_model": {"embedding": {"word_embeddings": {"weight": torch.zeros(8, 4)}}},
                          "lm_head": {"bias": torch.zeros(8), "mystery.weight": torch.zeros(2)}}},
               iter_dir / "model_optim_rng.pt")
    with pytest.raises(CheckpointError, match="not a BERT model's.*lm_head.mystery.weight"):
        formats.read_model(str(tmp_path))
