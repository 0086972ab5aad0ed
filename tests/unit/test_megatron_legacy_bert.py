"""Pre-Megatron-Core ("legacy") BERT checkpoints: the published Megatron BERT 345M layout
(`release/mp_rank_00/model_optim_rng.pt`, tracker `release`; `language_model.embedding.…`,
`language_model.encoder.layers.N.…`, `language_model.pooler.…`, `lm_head.…`, `binary_head.…`),
written by tests/megatron_bert_oracle.py from Megatron's documented names with a Megatron-Core
BertModel's weights, at tensor-parallel size 1 and 2. They load into our BertModel (training's
load_checkpoint, pretrain_bert.py's setup with --use-checkpoint-args, read_model) with Megatron-Core's
logits for the same weights (1e-5, fp32), and write_legacy_bert writes the same layout back."""

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


@pytest.fixture(scope="module", params=[1, 2], ids=lambda tp: f"tp{tp}")
def legacy_bert(request, tmp_path_factory):
    tp = request.param
    root = tmp_path_factory.mktemp(f"legacy_bert_{tp}")
    oracle.run_oracle("write-legacy", "--root", str(root), "--tp", str(tp), *(["--release"] if tp == 1 else []),
                      port=free_port())
    return root, tp


def test_detected_as_legacy_with_megatron_names(legacy_bert):
    root, tp = legacy_bert
    iter_dir, iteration, module = formats.locate(str(root))
    assert module.NAME == "legacy" and module.is_bert(iter_dir)
    assert (iteration is None) == (tp == 1) and (os.path.basename(iter_dir) == "release") == (tp == 1)
    raw = safe_torch_load(os.path.join(iter_dir, "mp_rank_00", "model_optim_rng.pt"), allow_namespace=True)["model"]
    assert set(raw) == {"language_model", "lm_head", "binary_head"}
    assert "layers.0.self_attention.query_key_value.weight" in raw["language_model"]["encoder"]
    assert raw["lm_head"]["bias"].shape == (oracle.VOCAB // tp,)
    assert "megatron.core" not in sys.modules  # Megatron's pickled classes were read as stand-ins


def test_load_checkpoint_matches_megatron_logits(legacy_bert):
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.training.checkpointing import load_checkpoint

    root, _ = legacy_bert
    model = our_model("bert")
    load_checkpoint(str(root), [model], None, None, ParallelGroups.single(), load_optim=False)
    ref = torch.load(root / "reference.pt", weights_only=True)
    check_outputs("bert", ref, *our_outputs("bert", model, ref))


def test_pretrain_bert_load_with_checkpoint_args(legacy_bert):
    root, _ = legacy_bert
    ctx = pretrain_setup("bert", root)
    model = ctx.model[0].module.eval()
    ref = torch.load(root / "reference.pt", weights_only=True)
    check_outputs("bert", ref, *our_outputs("bert", model, ref))


def test_write_legacy_bert_round_trips(legacy_bert, tmp_path):
    from gigatron.core.checkpoint.legacy import write_legacy_bert

    root, tp = legacy_bert
    state = formats.read_model(str(root))
    model = our_model("bert")
    assert set(state.tensors) == {k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    other = 3 - tp
    iter_dir = write_legacy_bert(str(tmp_path), state.tensors, state.args, None, tp=other)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    raw = safe_torch_load(os.path.join(iter_dir, "mp_rank_00", "model_optim_rng.pt"), allow_namespace=True)
    assert raw["args"].tensor_model_parallel_size == other and raw["checkpoint_version"] == 3.0
    assert raw["model"]["lm_head"]["bias"].shape == (oracle.VOCAB // other,)
    assert "dense.weight" in raw["model"]["language_model"]["pooler"]
    back = formats.read_model(str(tmp_path))
    assert set(back.tensors) == set(state.tensors)
    assert all(torch.equal(back.tensors[k], v) for k, v in state.tensors.items())


def test_unknown_legacy_bert_names_are_named(legacy_bert, tmp_path):
    from gigatron.core.checkpoint.legacy import write_legacy_bert

    root, _ = legacy_bert
    state = formats.read_model(str(root))
    write_legacy_bert(str(tmp_path), state.tensors, state.args, 3)
    path = tmp_path / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt"
    raw = safe_torch_load(path, allow_namespace=True)
    raw["model"]["lm_head"]["decoder_extra.weight"] = torch.zeros(2)
    torch.save(raw, path)
    os.remove(tmp_path / "iter_0000003" / "checksums.json")
    with pytest.raises(CheckpointError, match="lm_head.decoder_extra.weight"):
        formats.read_model(str(tmp_path))
