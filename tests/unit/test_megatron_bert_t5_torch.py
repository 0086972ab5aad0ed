"""BERT and T5 in Megatron-LM's own `torch` layout (iter_N/mp_rank_TT/model_optim_rng.pt with a
pickled Namespace as args), both directions, with megatron-core as the oracle
(tests/megatron_bert_oracle.py): Megatron-Core's BertModel / T5Model state dicts saved as Megatron-LM
saves them at tensor-parallel size 1 and 2 load into our models (training's load_checkpoint, and
read_model's full tensors) with Megatron-Core's logits (1e-5, fp32); and our models written by
encoder_layout.write_megatron_torch load strictly into Megatron-Core's models."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import megatron_bert_oracle as oracle  # noqa: E402
import megatron_oracle  # noqa: E402
from _bert_t5_fixtures import check_outputs, our_model, our_outputs, pretrain_setup  # noqa: E402

from gigatron.core.checkpoint import formats  # noqa: E402
from gigatron.core.checkpoint.io import CheckpointError, safe_torch_load  # noqa: E402
from tests.parallel.harness import free_port  # noqa: E402

pytestmark = pytest.mark.skipif(not megatron_oracle.megatron_available(), reason="megatron-core is not installed")


@pytest.fixture(scope="module", params=[("bert", 1), ("bert", 2), ("t5", 1), ("t5", 2)],
                ids=lambda p: f"{p[0]}-tp{p[1]}")
def megatron_ckpt(request, tmp_path_factory):
    kind, tp = request.param
    root = tmp_path_factory.mktemp(f"mtorch_{kind}_{tp}")
    oracle.run_oracle("write-torch", "--kind", kind, "--root", str(root), "--tp", str(tp), processes=tp,
                      port=free_port())
    return root, kind


def test_megatron_torch_bert_t5_loads_with_megatron_logits(megatron_ckpt):
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.training.checkpointing import load_checkpoint

    root, kind = megatron_ckpt
    assert formats.locate(str(root))[2].NAME == "megatron_torch"
    ref = torch.load(root / "reference.pt", weights_only=True)
    model = our_model(kind)
    loaded = load_checkpoint(str(root), [model], None, None, ParallelGroups.single(), load_optim=False)
    assert (loaded.iteration, loaded.consumed_train_samples) == (5, 40)
    check_outputs(kind, ref, *our_outputs(kind, model, ref))



def test_pretrain_load_with_checkpoint_args(megatron_ckpt):
    """pretrain_bert.py / pretrain_t5.py --load DIR --use-checkpoint-args: the model is built from
    Megatron's args and starts from Megatron's weights at its iteration."""
    root, kind = megatron_ckpt
    ctx = pretrain_setup(kind, root)
    assert ctx.iteration == 5
    model = ctx.model[0].module.eval()
    assert type(model).__name__ == ("BertModel" if kind == "bert" else "T5Model")
    ref = torch.load(root / "reference.pt", weights_only=True)
    check_outputs(kind, ref, *our_outputs(kind, model, ref))

def test_read_model_merges_tensor_parallel_files(megatron_ckpt):
    root, kind = megatron_ckpt
    state = formats.read_model(str(root))
    model = our_model(kind)
    assert set(state.tensors) == {k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    model.load_state_dict(state.tensors, strict=True)
    ref = torch.load(root / "reference.pt", weights_only=True)
    check_outputs(kind, ref, *our_outputs(kind, model, ref))


@pytest.mark.parametrize("kind,te", [("bert", False), ("bert", True), ("t5", False)])
def test_megatron_core_loads_our_bert_t5_torch_file(tmp_path, kind, te):
    from gigatron.core.checkpoint.encoder_layout import write_megatron_torch

    model = our_model(kind, seed=7)
    tensors = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    args = dict(num_layers=2, hidden_size=oracle.HIDDEN, num_attention_heads=oracle.HEADS, ffn_hidden_size=oracle.FFN)
    write_megatron_torch(str(tmp_path), tensors, args, 5, tp=1, transformer_engine=te)
    # Gigatron reads its own output back (Transformer Engine's fused names unfused)
    back = formats.read_model(str(tmp_path))
    assert all(torch.equal(back.tensors[k], v) for k, v in tensors.items()) and set(back.tensors) == set(tensors)
    if te:  # Megatron-Core's local spec (the oracle) expects the unfused names
        return
    oracle.run_oracle("load-torch", "--kind", kind, "--root", str(tmp_path), port=free_port())
    ref = torch.load(tmp_path / "reference.pt", weights_only=True)
    check_outputs(kind, ref, *our_outputs(kind, model, ref))


def test_tensor_parallel_write_round_trips(tmp_path):
    from gigatron.core.checkpoint.encoder_layout import write_megatron_torch

    model = our_model("t5", seed=3)
    tensors = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    write_megatron_torch(str(tmp_path), tensors, dict(num_layers=2), 5, tp=2)
    shard = safe_torch_load(tmp_path / "iter_0000005" / "mp_rank_01" / "model_optim_rng.pt", allow_namespace=True)
    assert shard["model"]["decoder.layers.0.cross_attention.linear_kv.weight"].shape[0] == 2 * oracle.HIDDEN // 2
    back = formats.read_model(str(tmp_path))
    assert all(torch.equal(back.tensors[k], v) for k, v in tensors.items())


def test_a_pipeline_split_bert_is_refused_with_the_fix(tmp_path):
    from gigatron.core.checkpoint.encoder_layout import write_megatron_torch

    model = our_model("bert")
    write_megatron_torch(str(tmp_path), {k: v for k, v in model.state_dict().items()}, dict(num_layers=2), 5)
    iter_dir = tmp_path / "iter_0000005"
    os.rename(iter_dir / "mp_rank_00", iter_dir / "mp_rank_00_000")
    with pytest.raises(CheckpointError, match="pipeline-parallel size 1"):
        formats.read_model(str(tmp_path))
