"""Megatron-Core's own torch_dist checkpoints load at another parallel layout of the reader (gloo):
written by megatron-core at tp=2 and read at tp=2 by two Gigatron ranks (the per-token loss equals
the cross-entropy of Megatron-Core's own logits), written at pp=2 and read at pp=2 (every stage
holds exactly the weights whose logits matched Megatron-Core in one process), and a tp=2 writer
read at pp=2."""

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

from tests import megatron_oracle as oracle
from tests.parallel.harness import run_distributed
from tests.unit.test_megatron_dist import write_megatron_dist

pytestmark = [pytest.mark.skipif(not oracle.megatron_available(), reason="megatron-core is not installed"),
              pytest.mark.usefixtures("one_thread")]


def _build(rank, world_size, root, tp, pp):
    import gigatron
    from gigatron.core.models.gpt import GPTModel
    from gigatron.core.parallel.config import ParallelConfig
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.training.checkpointing import load_checkpoint

    template = gigatron.from_pretrained(root)
    groups = ParallelGroups.build(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    config = dataclasses.replace(template.config, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model = GPTModel(config, groups, template.padded_vocab_size, pre_process=groups.pp.rank == 0,
                     post_process=groups.pp.rank == pp - 1, seed=77)
    loaded = load_checkpoint(str(root), [model], None, None, groups, load_optim=False)
    return groups, model.eval(), loaded


def _tp_loss(rank, world_size, root):
    groups, model, loaded = _build(rank, world_size, root, tp=2, pp=1)
    ref = torch.load(os.path.join(root, "reference.pt"), weights_only=True)
    tokens = ref["tokens"]
    labels = torch.roll(tokens, -1, dims=1)
    with torch.no_grad():
        loss = model(tokens, None, None, labels=labels)  # [b, s]
    return loaded.iteration, loss


def _pp_weights(rank, world_size, root):
    from gigatron.core.checkpoint.dist.sharding import global_param_name

    groups, model, loaded = _build(rank, world_size, root, tp=1, pp=2)
    return {global_param_name(model, name): p.detach().clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def tp2_ckpt(tmp_path_factory):
    return write_megatron_dist(tmp_path_factory.mktemp("mcore_tp2"), "llama", 2, 1, layers=2)


@pytest.fixture(scope="module")
def pp2_ckpt(tmp_path_factory):
    return write_megatron_dist(tmp_path_factory.mktemp("mcore_pp2"), "gpt", 1, 2, layers=4)


def test_tp2_writer_read_at_tp2(tp2_ckpt):
    ref = torch.load(os.path.join(tp2_ckpt, "reference.pt"), weights_only=True)
    labels = torch.roll(ref["tokens"], -1, dims=1)
    expected = F.cross_entropy(ref["logits"].flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    for iteration, loss in run_distributed(_tp_loss, 2, str(tp2_ckpt)):
        assert iteration == 5
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", ["pp2", "tp2"])
def test_read_at_pp2(which, pp2_ckpt, tp2_ckpt):
    import gigatron

    root = pp2_ckpt if which == "pp2" else tp2_ckpt
    whole = gigatron.from_pretrained(root).model.state_dict()  # its logits match Megatron-Core's (unit tests)
    stages = run_distributed(_pp_weights, 2, str(root))
    names = set()
    for stage in stages:
        for name, tensor in stage.items():
            if name == "output_layer.weight" and name not in whole:
                name = "embedding.word_embeddings.weight"  # the tied copy on the last stage
            torch.testing.assert_close(tensor, whole[name], rtol=0, atol=0)
            names.add(name)
    assert names == {k for k in whole if not k.endswith("_extra_state")}


def _ep_weights(rank, world_size, root):
    import gigatron
    from gigatron.core.checkpoint.dist.sharding import global_param_name
    from gigatron.core.convert.protocol import moe_config_from_metadata
    from gigatron.core.models.gpt import GPTModel
    from gigatron.core.parallel.config import ParallelConfig
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.training.checkpointing import load_checkpoint

    template = gigatron.from_pretrained(root)
    groups = ParallelGroups.build(ParallelConfig(expert_model_parallel_size=2))
    model = GPTModel(template.config, groups, template.padded_vocab_size, seed=8,
                     moe_config=moe_config_from_metadata(template.metadata))
    load_checkpoint(str(root), [model], None, None, groups, load_optim=False)
    return {global_param_name(model, name): p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("writer_ep", [1, 2])
def test_moe_read_at_expert_parallel_size_2(writer_ep, tmp_path):
    """Megatron-Core's MoE torch_dist (written at ep 1 or 2) read by two expert-parallel ranks: each
    holds its own experts (global numbers) and the shared dense weights, exactly Megatron's."""
    from tests.unit.test_megatron_dist_moe import megatron_moe, megatron_weights

    root = megatron_moe(tmp_path / "moe", writer_ep)
    theirs = megatron_weights(root)
    seen = set()
    for weights in run_distributed(_ep_weights, 2, str(root)):
        for name, tensor in weights.items():
            torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=0)
            seen.add(name)
    assert seen == set(theirs)
