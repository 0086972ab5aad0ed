"""Megatron-Core torch_dist checkpoints of mixture-of-experts models (SequentialMLP experts stacked
as [layer, global expert, ...] under `decoder.layers.mlp.experts.experts.*`, the router under
`decoder.layers.mlp.router.weight`), written by megatron-core at expert-parallel size 1 and 2:
from_pretrained and --load hold exactly Megatron-Core's own weights (its MoE forward needs CUDA,
so the weights are the oracle here; the dense layers' logits are checked in test_megatron_dist.py)."""

import glob
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import megatron_oracle as oracle  # noqa: E402

import gigatron  # noqa: E402
from gigatron.core.checkpoint import formats  # noqa: E402
from tests.parallel.harness import free_port  # noqa: E402

pytestmark = pytest.mark.skipif(not oracle.megatron_available(), reason="megatron-core is not installed")

NUM_EXPERTS = 4


def megatron_moe(root, ep):
    oracle.run_oracle("write-dist", "--kind", "moe", "--root", str(root), "--ep", str(ep), processes=ep,
                      port=free_port())
    return root


def megatron_weights(root) -> dict:
    """Megatron-Core's own state dict, its local experts renamed to global expert numbers."""
    files = sorted(glob.glob(os.path.join(root, "weights_rank*.pt")))
    per_rank = NUM_EXPERTS // len(files)
    merged = {}
    for rank, path in enumerate(files):
        for name, tensor in torch.load(path, weights_only=True).items():
            if ".local_experts." in name:
                head, rest = name.split(".local_experts.")
                local, tail = rest.split(".", 1)
                name = f"{head}.local_experts.{rank * per_rank + int(local)}.{tail}"
            elif rank > 0:
                continue  # dense weights: Megatron writes data-parallel replica 0 (rank 0)
            merged[name] = tensor
    return merged


@pytest.fixture(scope="module", params=[1, 2], ids=lambda ep: f"ep{ep}")
def moe_ckpt(request, tmp_path_factory):
    return megatron_moe(tmp_path_factory.mktemp(f"mcore_moe_ep{request.param}"), request.param)


def _assert_same(ours: dict, theirs: dict):
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def test_from_pretrained_holds_megatrons_weights(moe_ckpt):
    assert formats.locate(str(moe_ckpt))[2].NAME == "megatron_torch_dist"
    model = gigatron.from_pretrained(moe_ckpt).model
    _assert_same(model.state_dict(), megatron_weights(moe_ckpt))


def test_load_checkpoint_holds_megatrons_weights(moe_ckpt):
    from gigatron.core.models.gpt import GPTModel
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.training.checkpointing import load_checkpoint

    template = gigatron.from_pretrained(moe_ckpt)
    from gigatron.core.convert.protocol import moe_config_from_metadata

    model = GPTModel(template.config, ParallelGroups.single(), template.padded_vocab_size, seed=5,
                     moe_config=moe_config_from_metadata(template.metadata))
    loaded = load_checkpoint(str(moe_ckpt), [model], None, None, ParallelGroups.single(), load_optim=False)
    assert loaded.iteration == 5
    _assert_same(model.state_dict(), megatron_weights(moe_ckpt))


def test_grouped_gemm_experts_load_megatrons_weights(moe_ckpt):
    """Megatron-Core writes its experts in one layout whatever their implementation (its GroupedMLP
    and TEGroupedMLP save as SequentialMLP does): the checkpoint loads into our --moe-grouped-gemm
    experts too, which then compute exactly what the per-expert model loaded from it computes."""
    import dataclasses

    from gigatron.core.convert.protocol import moe_config_from_metadata
    from gigatron.core.models.gpt import GPTModel
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.training.checkpointing import load_checkpoint

    template = gigatron.from_pretrained(moe_ckpt)
    grouped_config = dataclasses.replace(moe_config_from_metadata(template.metadata), moe_grouped_gemm=True)
    grouped = GPTModel(template.config, ParallelGroups.single(), template.padded_vocab_size, seed=5,
                       moe_config=grouped_config)
    load_checkpoint(str(moe_ckpt), [grouped], None, None, ParallelGroups.single(), load_optim=False)
    assert any("GroupedMLP" in type(m).__name__ for m in grouped.modules())
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = template.model.eval()(tokens)
        got = grouped.eval()(tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
