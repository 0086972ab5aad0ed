"""BERT and T5 in Megatron-Core's own torch_dist layout, both directions, with megatron-core itself
as the oracle (tests/megatron_bert_oracle.py, in subprocesses): Megatron-Core's BertModel /
T5Model saved by its dist_checkpointing at tensor-parallel size 1 and 2 load into our BertModel /
T5Model (training's load_checkpoint) with Megatron-Core's own logits (1e-5, fp32); and our models
written by write_megatron_dist load strictly into Megatron-Core's models at tp 1 and 2 with the
logits we compute."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import megatron_bert_oracle as oracle  # noqa: E402
import megatron_oracle  # noqa: E402
from _bert_t5_fixtures import check_outputs, our_model, our_outputs, pretrain_setup  # noqa: E402

from gigatron.core.checkpoint import formats  # noqa: E402
from gigatron.core.checkpoint.io import CheckpointError  # noqa: E402
from tests.parallel.harness import free_port  # noqa: E402

pytestmark = pytest.mark.skipif(not megatron_oracle.megatron_available(), reason="megatron-core is not installed")


# ------------------------------------------------------------------ Megatron-Core -> Gigatron


@pytest.fixture(scope="module", params=[("bert", 1), ("bert", 2), ("t5", 1), ("t5", 2)],
                ids=lambda p: f"{p[0]}-tp{p[1]}")
def megatron_ckpt(request, tmp_path_factory):
    kind, tp = request.param
    root = tmp_path_factory.mktemp(f"mcore_{kind}_{tp}")
    oracle.run_oracle("write-dist", "--kind", kind, "--root", str(root), "--tp", str(tp), processes=tp,
                      port=free_port())
    oracle.run_oracle("logits", "--kind", kind, "--root", str(root), port=free_port())
    return root, kind


def test_megatron_bert_t5_torch_dist_loads_with_megatron_logits(megatron_ckpt):
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.training.checkpointing import load_checkpoint

    root, kind = megatron_ckpt
    iter_dir, iteration, module = formats.locate(str(root))
    assert module.NAME == "megatron_torch_dist" and iteration == 5
    ref = torch.load(root / "reference.pt", weights_only=True)
    model = our_model(kind)
    loaded = load_checkpoint(str(root), [model], None, None, ParallelGroups.single(), load_optim=False)
    assert loaded.iteration == 5
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

def test_read_model_gives_our_names(megatron_ckpt):
    root, kind = megatron_ckpt
    state = formats.read_model(str(root))
    ours = {k for k, v in our_model(kind).state_dict().items() if isinstance(v, torch.Tensor)}
    assert set(state.tensors) == ours  # T5's aliased copies are dropped, stacked layers split


def test_a_bert_checkpoint_does_not_fit_a_t5_model(megatron_ckpt):
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.training.checkpointing import load_checkpoint

    root, kind = megatron_ckpt
    other = our_model("t5" if kind == "bert" else "bert")
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_checkpoint(str(root), [other], None, None, ParallelGroups.single(), load_optim=False)


# ------------------------------------------------------------------ Gigatron -> Megatron-Core


def write_ours(kind, root):
    """Our model's weights as Megatron-Core's torch_dist (convert.py --saver megatron_dist's writer)."""
    from gigatron.core.checkpoint.megatron_dist import write_megatron_dist

    model = our_model(kind, seed=7)
    tensors = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    args = dict(num_layers=2, hidden_size=oracle.HIDDEN, num_attention_heads=oracle.HEADS, ffn_hidden_size=oracle.FFN,
                padded_vocab_size=oracle.VOCAB, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                untie_embeddings_and_output_weights=False)
    if kind == "t5":
        args.update(encoder_num_layers=2, decoder_num_layers=2)
    write_megatron_dist(str(root), tensors, args, 5)
    return model


@pytest.mark.parametrize("kind,tp", [("bert", 1), ("bert", 2), ("t5", 1), ("t5", 2)])
def test_megatron_core_loads_our_bert_t5_strictly(tmp_path, kind, tp):
    model = write_ours(kind, tmp_path)
    oracle.run_oracle("logits", "--kind", kind, "--root", str(tmp_path), "--tp", str(tp), processes=tp,
                      port=free_port())
    ref = torch.load(tmp_path / "reference.pt", weights_only=True)
    check_outputs(kind, ref, *our_outputs(kind, model, ref))
