"""convert.py --model-type BERT / T5 between Megatron's layouts (Megatron-Core's torch_dist,
Megatron-LM's torch files, the legacy BERT layout): what Megatron-Core wrote (tests/megatron_bert_oracle.py)
converts, and Megatron-Core loads the converted torch_dist strictly with its own logits; every
conversion keeps the tensors exactly."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import megatron_bert_oracle as oracle  # noqa: E402
import megatron_oracle  # noqa: E402
from script_server import run_python  # noqa: E402

from gigatron.core.checkpoint import formats  # noqa: E402
from tests.parallel.harness import free_port  # noqa: E402

pytestmark = pytest.mark.skipif(not megatron_oracle.megatron_available(), reason="megatron-core is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def convert(*argv):
    return run_python([os.path.join(ROOT, "tools", "checkpoint", "convert.py"), *map(str, argv)],
                       timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))


def same_tensors(a, b):
    sa, sb = formats.read_model(str(a)), formats.read_model(str(b))
    assert set(sa.tensors) == set(sb.tensors)
    assert all(torch.equal(sa.tensors[k], sb.tensors[k]) for k in sa.tensors)
    return sb


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_megatron_torch_to_torch_dist_loads_in_megatron_core(tmp_path, kind):
    source = tmp_path / "source"
    oracle.run_oracle("write-torch", "--kind", kind, "--root", str(source), "--tp", "2", processes=2,
                      port=free_port())
    out = convert("--model-type", kind.upper(), "--loader", "core", "--saver", "megatron_dist", "--load-dir", source,
                  "--save-dir", tmp_path / "dist")
    assert out.returncode == 0, out.stderr
    assert formats.locate(str(tmp_path / "dist"))[2].NAME == "megatron_torch_dist"
    same_tensors(source, tmp_path / "dist")
    expected = torch.load(source / "reference.pt", weights_only=True)
    oracle.run_oracle("logits", "--kind", kind, "--root", str(tmp_path / "dist"), port=free_port())
    got = torch.load(tmp_path / "dist" / "reference.pt", weights_only=True)
    torch.testing.assert_close(got["logits"], expected["logits"], rtol=0, atol=1e-5)
    # and back to Megatron-LM's torch files at another tensor-parallel size
    out = convert("--model-type", kind.upper(), "--loader", "core", "--saver", "megatron_torch", "--load-dir",
                  tmp_path / "dist", "--save-dir", tmp_path / "torch1", "--target-tensor-parallel-size", "1",
                  "--saver-transformer-impl", "local")
    assert out.returncode == 0, out.stderr
    assert formats.locate(str(tmp_path / "torch1"))[2].NAME == "megatron_torch"
    same_tensors(source, tmp_path / "torch1")


def test_legacy_bert_converts_both_ways(tmp_path):
    source = tmp_path / "legacy"
    oracle.run_oracle("write-legacy", "--root", str(source), "--release", port=free_port())
    out = convert("--model-type", "BERT", "--loader", "legacy", "--saver", "megatron_dist", "--load-dir", source,
                  "--save-dir", tmp_path / "dist")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "dist" / "release").is_dir()
    same_tensors(source, tmp_path / "dist")
    out = convert("--model-type", "BERT", "--loader", "core", "--saver", "legacy", "--load-dir", tmp_path / "dist",
                  "--save-dir", tmp_path / "legacy2", "--target-tensor-parallel-size", "2")
    assert out.returncode == 0, out.stderr
    state = same_tensors(source, tmp_path / "legacy2")
    assert formats.locate(str(tmp_path / "legacy2"))[2].NAME == "legacy" and state.iteration is None


def test_wrong_model_type_and_plugins_are_clear_errors(tmp_path):
    source = tmp_path / "legacy"
    oracle.run_oracle("write-legacy", "--root", str(source), port=free_port())
    out = convert("--model-type", "T5", "--loader", "core", "--saver", "megatron_dist", "--load-dir", source,
                  "--save-dir", tmp_path / "a")
    assert out.returncode == 2 and "holds a BERT model; use --model-type BERT" in out.stderr
    out = convert("--model-type", "T5", "--loader", "core", "--saver", "legacy", "--load-dir", source,
                  "--save-dir", tmp_path / "b")
    assert out.returncode == 2 and "--model-type T5 is converted" in out.stderr
    out = convert("--model-type", "BERT", "--loader", "hf", "--saver", "megatron_dist", "--load-dir", source,
                  "--save-dir", tmp_path / "c")
    assert out.returncode == 2 and "--model-type BERT is converted" in out.stderr
    out = convert("--model-type", "GPT", "--loader", "core", "--saver", "core", "--load-dir", source,
                  "--save-dir", tmp_path / "d")  # a BERT's encoder is never taken for a GPT's decoder
    assert out.returncode == 2 and "holds a BERT model, not a GPT" in out.stderr
    import gigatron
    from gigatron.core.convert.protocol import ConversionError

    with pytest.raises(ConversionError, match="from_pretrained loads GPT models"):
        gigatron.from_pretrained(source)
    assert not any((tmp_path / d).exists() for d in "abcd")
