"""Writing Megatron-Core's own torch_dist (convert.py --saver megatron_dist): Megatron-Core's
dist_checkpointing.load reads the directory into its own GPTModel (strict load_state_dict), at
tensor-parallel size 1 and 2, and its forward gives the logits Gigatron gives for the source
checkpoint (1e-5, fp32) — for a Megatron-trained model and for one trained by pretrain_gpt.py."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import megatron_oracle as oracle  # noqa: E402
from script_server import run_python  # noqa: E402

import gigatron  # noqa: E402
from gigatron.core.checkpoint import formats  # noqa: E402
from gigatron.core.checkpoint.megatron_dist import MEGATRON_RECORD  # noqa: E402
from tests.parallel.harness import free_port  # noqa: E402

pytestmark = pytest.mark.skipif(not oracle.megatron_available(), reason="megatron-core is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*argv):
    return run_python([*map(str, argv)], timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))


def _to_megatron(source, dest):
    out = _run(os.path.join(ROOT, "tools", "checkpoint", "convert.py"), "--model-type", "GPT", "--loader", "core",
               "--saver", "megatron_dist", "--load-dir", source, "--save-dir", dest)
    assert out.returncode == 0, out.stderr
    return dest


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A Megatron-LM `torch` checkpoint of the Llama-style oracle model (its logits verified in
    test_megatron_torch.py)."""
    root = tmp_path_factory.mktemp("megatron_source")
    oracle.run_oracle("write-torch", "--kind", "llama", "--root", str(root), port=free_port())
    return root


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_core_loads_what_we_write(source, tmp_path, tp):
    dest = _to_megatron(source, tmp_path / "mcore")
    record = json.loads((dest / "iter_0000005" / "metadata.json").read_text())
    assert record == MEGATRON_RECORD  # Megatron's own four keys: its config dataclass takes nothing else
    assert formats.locate(str(dest))[2].NAME == "megatron_torch_dist"
    oracle.run_oracle("logits", "--kind", "llama", "--root", str(dest), "--tp", str(tp), processes=tp,
                      port=free_port())
    megatron = torch.load(dest / "reference.pt", weights_only=True)
    with torch.no_grad():
        ours = gigatron.from_pretrained(source)(megatron["tokens"])
    torch.testing.assert_close(megatron["logits"], ours, rtol=0, atol=1e-5)


def test_a_model_trained_by_gigatron_loads_in_megatron_core(source, tmp_path):
    """pretrain_gpt.py trains one iteration from the Megatron weights and saves its own torch_dist;
    converted, Megatron-Core gives the logits of the trained model."""
    out = _run(os.path.join(ROOT, "pretrain_gpt.py"), "--load", source, "--use-checkpoint-args", "--no-load-optim",
               "--no-load-rng", "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "6",
               "--mock-data", "--lr", "1e-2", "--eval-iters", "0", "--attention-dropout", "0", "--hidden-dropout",
               "0", "--distributed-backend", "gloo", "--use-cpu-initialization", "--save", tmp_path / "trained",
               "--save-interval", "6", "--ckpt-format", "torch_dist", "--data-cache-path", tmp_path / "cache")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    dest = _to_megatron(tmp_path / "trained", tmp_path / "mcore")
    oracle.run_oracle("logits", "--kind", "llama", "--root", str(dest), "--iteration", "6", port=free_port())
    megatron = torch.load(dest / "reference.pt", weights_only=True)
    with torch.no_grad():
        trained = gigatron.from_pretrained(tmp_path / "trained")(megatron["tokens"])
        before = gigatron.from_pretrained(source)(megatron["tokens"])
    assert not torch.allclose(trained, before, atol=1e-3)  # the training step changed the model
    torch.testing.assert_close(megatron["logits"], trained, rtol=0, atol=1e-5)


def test_refuses_to_overwrite(source, tmp_path):
    dest = _to_megatron(source, tmp_path / "mcore")
    out = _run(os.path.join(ROOT, "tools", "checkpoint", "convert.py"), "--model-type", "GPT", "--loader", "core",
               "--saver", "megatron_dist", "--load-dir", source, "--save-dir", dest)
    assert out.returncode == 2 and "already exists" in out.stderr
