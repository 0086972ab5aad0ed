"""Megatron-LM's own `torch` checkpoints (mp_rank_XX/model_optim_rng.pt with a pickled
argparse.Namespace that holds Megatron's enums, signal.Signals and numpy RNG arrays) load as they
are — from_pretrained, convert.py --loader core and --load — through the allow-listed unpickler,
with Megatron-Core's own logits as the oracle (written by Megatron-Core in a subprocess, see
tests/megatron_oracle.py). Anything outside the allow-list is refused and runs nothing."""

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
from gigatron.core.checkpoint.io import CheckpointError  # noqa: E402

pytestmark = pytest.mark.skipif(not oracle.megatron_available(), reason="megatron-core is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module", params=["gpt", "llama"])
def megatron_ckpt(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"megatron_torch_{request.param}")
    oracle.run_oracle("write-torch", "--kind", request.param, "--root", str(root), "--iteration", "5")
    return root, request.param


def _reference(root):
    return torch.load(os.path.join(root, "reference.pt"), weights_only=True)


def test_megatron_file_is_what_megatron_writes(megatron_ckpt):
    """The fixture really pickles Megatron's classes: a plain weights-only load refuses it."""
    root, _ = megatron_ckpt
    path = root / "iter_0000005" / "mp_rank_00" / "model_optim_rng.pt"
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    assert {"argparse.Namespace", "megatron.core.enums.ModelType", "megatron.core.transformer.enums.AttnBackend",
            "signal.Signals"} <= unsafe
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)


def test_detected_and_args_read_as_plain_flags(megatron_ckpt):
    root, kind = megatron_ckpt
    _, iteration, module = formats.locate(str(root))
    assert module.NAME == "megatron_torch" and iteration == 5
    args = formats.read_args(str(root))
    assert args["num_layers"] == 2 and args["model_type"] == "ModelType.encoder_or_decoder"
    assert args["attention_backend"] == "AttnBackend.auto" and args["exit_signal"] == "Signals.SIGTERM"
    assert args["params_dtype"] == "float32" and args["swiglu"] == (kind == "llama")


def test_from_pretrained_matches_megatron_logits(megatron_ckpt):
    root, _ = megatron_ckpt
    ref = _reference(root)
    model = gigatron.from_pretrained(root)
    with torch.no_grad():
        out = model(ref["tokens"])
    torch.testing.assert_close(out, ref["logits"], rtol=0, atol=1e-5)


def test_convert_loader_core_reads_it(megatron_ckpt, tmp_path):
    root, _ = megatron_ckpt
    out = run_python([os.path.join(ROOT, "tools", "checkpoint", "convert.py"), "--model-type",
                      "GPT", "--loader", "core", "--saver", "core", "--load-dir", str(root), "--save-dir",
                      str(tmp_path / "ours"), "--target-tensor-parallel-size", "2"],
                     timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr
    ref = _reference(root)
    with torch.no_grad():
        logits = gigatron.from_pretrained(tmp_path / "ours")(ref["tokens"])
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=1e-5)


def _fresh_model(root):
    from gigatron.core.models.gpt import GPTModel
    from gigatron.core.parallel.groups import ParallelGroups

    template = gigatron.from_pretrained(root)
    return GPTModel(template.config, ParallelGroups.single(), template.padded_vocab_size, seed=42)


def test_load_resumes_weights_iteration_and_samples(megatron_ckpt):
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.training.checkpointing import load_checkpoint

    root, _ = megatron_ckpt
    ref = _reference(root)
    model = _fresh_model(root)
    loaded = load_checkpoint(str(root), [model], None, None, ParallelGroups.single(), load_optim=False)
    assert (loaded.iteration, loaded.consumed_train_samples, loaded.consumed_valid_samples) == (5, 40, 10)
    assert loaded.num_floating_point_operations_so_far == 123.0
    with torch.no_grad():
        logits = model.eval()(ref["tokens"], None, None).transpose(0, 1)
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=1e-5)


def test_load_with_optimizer_says_what_to_run(megatron_ckpt):
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.training.checkpointing import load_checkpoint

    root, _ = megatron_ckpt
    with pytest.raises(CheckpointError, match="--no-load-optim"):
        load_checkpoint(str(root), [_fresh_model(root)], object(), None, ParallelGroups.single())


def test_pretrain_gpt_resumes_a_megatron_run(megatron_ckpt, tmp_path):
    root, kind = megatron_ckpt
    if kind != "gpt":
        pytest.skip("one end-to-end run is enough")
    out = run_python(
        [os.path.join(ROOT, "pretrain_gpt.py"), "--load", str(root), "--use-checkpoint-args",
         "--no-load-optim", "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "6",
         "--mock-data", "--lr", "1e-4", "--eval-iters", "0", "--attention-dropout", "0", "--hidden-dropout", "0",
         "--distributed-backend", "gloo", "--use-cpu-initialization", "--log-interval", "1",
         "--data-cache-path", str(tmp_path / "cache")],
        timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "iteration        6/       6" in log and "iteration        5/" not in log


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_objects_outside_the_allow_list_are_refused(megatron_ckpt, tmp_path):
    """A Megatron-looking file whose args carry any other object is refused by every entry point;
    the payload never runs."""
    root, _ = megatron_ckpt
    marker = tmp_path / "PWNED"
    bad = tmp_path / "bad"
    (bad / "iter_0000005" / "mp_rank_00").mkdir(parents=True)
    (bad / "latest_checkpointed_iteration.txt").write_text("5")
    state = {"args": argparse.Namespace(num_layers=2, evil=_Payload(marker)), "iteration": 5,
             "checkpoint_version": 3.0, "model": {"embedding.word_embeddings.weight": torch.zeros(4, 4)}}
    torch.save(state, bad / "iter_0000005" / "mp_rank_00" / "model_optim_rng.pt")
    with pytest.raises(CheckpointError, match="refuses"):
        gigatron.from_pretrained(bad)
    with pytest.raises(CheckpointError, match="refuses"):
        formats.read_args(str(bad))
    assert not marker.exists()


def test_a_flag_named_like_legacy_keys_does_not_make_it_legacy(tmp_path):
    """Detection looks for the state-dict key `language_model`, not for the text inside a flag name."""
    rank_dir = tmp_path / "iter_0000001" / "mp_rank_00"
    rank_dir.mkdir(parents=True)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("1")
    torch.save({"args": argparse.Namespace(num_layers=1, language_model_type="llama3"), "iteration": 1,
                "model": {"embedding.word_embeddings.weight": torch.zeros(4, 4)}}, rank_dir / "model_optim_rng.pt")
    assert formats.locate(str(tmp_path))[2].NAME == "megatron_torch"
