"""convert.py --saver megatron_torch writes `torch` files Megatron-LM's loader reads: `args` an
argparse.Namespace (Megatron reads args.tensor_model_parallel_size and friends), the model with the
`_extra_state` entries Megatron-Core's modules expect. Megatron-Core's GPTModel loads them with a
strict load_state_dict and gives Gigatron's logits; the Transformer Engine variant (fused-norm
names) reads back into Gigatron with the same logits."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import megatron_oracle as oracle  # noqa: E402
from script_server import run_python  # noqa: E402

import gigatron  # noqa: E402
from gigatron.core.checkpoint import formats  # noqa: E402
from gigatron.core.checkpoint.io import safe_torch_load  # noqa: E402
from tests.parallel.harness import free_port  # noqa: E402

pytestmark = pytest.mark.skipif(not oracle.megatron_available(), reason="megatron-core is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module", params=["gpt", "llama"])
def source(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"source_{request.param}")
    oracle.run_oracle("write-torch", "--kind", request.param, "--root", str(root), port=free_port())
    return root, request.param


def _save(source, dest, impl):
    out = run_python([os.path.join(ROOT, "tools", "checkpoint", "convert.py"), "--model-type",
                      "GPT", "--loader", "core", "--saver", "megatron_torch", "--saver-transformer-impl", impl,
                      "--load-dir", str(source), "--save-dir", str(dest)], timeout=300, cwd=ROOT,
                     env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr
    return dest


def test_megatron_core_loads_it_strictly(source, tmp_path):
    root, kind = source
    dest = _save(root, tmp_path / "out", "local")
    oracle.run_oracle("load-torch", "--kind", kind, "--root", str(dest), port=free_port())
    megatron = torch.load(dest / "reference.pt", weights_only=True)
    with torch.no_grad():
        ours = gigatron.from_pretrained(root)(megatron["tokens"])
    torch.testing.assert_close(megatron["logits"], ours, rtol=0, atol=1e-5)


def test_transformer_engine_names_read_back(source, tmp_path):
    root, kind = source
    dest = _save(root, tmp_path / "te", "transformer_engine")
    state = safe_torch_load(str(dest / "iter_0000005" / "mp_rank_00" / "model_optim_rng.pt"), allow_namespace=True)
    assert state["args"].transformer_impl == "transformer_engine"
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in state["model"]
    assert not any(".input_layernorm." in name for name in state["model"])
    assert formats.locate(str(dest))[2].NAME == "megatron_torch"
    ref = torch.load(os.path.join(root, "reference.pt"), weights_only=True)
    with torch.no_grad():
        out = gigatron.from_pretrained(dest)(ref["tokens"])
    torch.testing.assert_close(out, ref["logits"], rtol=0, atol=1e-5)
