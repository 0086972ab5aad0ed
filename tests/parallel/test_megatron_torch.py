"""Megatron-LM's own `torch` checkpoint (one mp_rank_00 file, written by megatron-core's model in a
subprocess) and a legacy one (two tensor-parallel files, checkpoint version 0) loaded with --load
by two Gigatron ranks at tensor-parallel size 2 and pipeline size 2: the per-token loss at tp=2 is
the cross-entropy of Megatron-Core's own logits, and each pipeline stage holds exactly the weights
whose logits matched Megatron-Core in one process."""

import os

import pytest
import torch
import torch.nn.functional as F

from tests import megatron_oracle as oracle
from tests.parallel.harness import free_port, run_distributed
from tests.parallel.test_megatron_dist import _pp_weights, _tp_loss

pytestmark = [pytest.mark.skipif(not oracle.megatron_available(), reason="megatron-core is not installed"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module", params=["torch", "legacy"])
def ckpt(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"megatron_{request.param}")
    if request.param == "torch":
        oracle.run_oracle("write-torch", "--kind", "llama", "--root", str(root), port=free_port())
    else:
        oracle.run_oracle("write-legacy", "--kind", "gpt", "--root", str(root), "--tp", "2", "--version", "0",
                          port=free_port())
    return root


def test_read_at_tp2(ckpt):
    ref = torch.load(os.path.join(ckpt, "reference.pt"), weights_only=True)
    labels = torch.roll(ref["tokens"], -1, dims=1)
    expected = F.cross_entropy(ref["logits"].flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    for iteration, loss in run_distributed(_tp_loss, 2, str(ckpt)):
        assert iteration == 5
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)


def test_read_at_pp2(ckpt):
    import gigatron

    whole = gigatron.from_pretrained(ckpt).model.state_dict()
    names = set()
    for stage in run_distributed(_pp_weights, 2, str(ckpt)):
        for name, tensor in stage.items():
            if name == "output_layer.weight" and name not in whole:
                name = "embedding.word_embeddings.weight"
            torch.testing.assert_close(tensor, whole[name], rtol=0, atol=0)
            names.add(name)
    assert names == set(whole)
