"""A hybrid Mamba model's description (MambaConfig's model fields: the --mamba-* and --hybrid-* flags,
`MAMBA_FLAGS`) survives each way a checkpoint is read back, as test_model_description.py checks for
GPT models: --use-checkpoint-args, the conversion metadata of our torch and torch_dist checkpoints,
the torch writer, `gigatron.from_pretrained`, and tools/checkpoint/convert.py resharding
tp 1 -> 2 -> 1 (bitwise, the fused in_proj / conv1d split segment by segment).

One hybrid run (pretrain_mamba's providers, mock data, one iteration) gives every Mamba field a value
other than its default: a pattern that agrees with the ratios, an explicit head count, and the
hybrid init."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from gigatron.core.convert.protocol import MAMBA_FLAGS, MAMBA_MODEL, MODEL_FLAGS, TOKENIZER_FLAGS
from gigatron.core.transformer.mamba.config import MambaConfig
from gigatron.training import mamba
from gigatron.training.arguments import configs_from_args, parse_args
from gigatron.training.checkpointing import MODEL_SHAPE_ARGS, load_args_from_checkpoint
from gigatron.training.loop import pretrain

from _hf_fixtures import run_convert  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

RUN = ["--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1", "--lr", "1e-3", "--mock-data",
       "--num-workers", "0", "--eval-iters", "0", "--log-interval", "1", "--no-loss-curve", "--vocab-size", "90",
       "--make-vocab-size-divisible-by", "16"]
HYBRID = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--group-query-attention",
          "--num-query-groups", "2", "--ffn-hidden-size", "48", "--seq-length", "16", "--max-position-embeddings", "16",
          "--position-embedding-type", "none", "--normalization", "RMSNorm", "--squared-relu",
          "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--attention-dropout", "0",
          "--hidden-dropout", "0",
          "--hybrid-override-pattern", "M*-M", "--hybrid-attention-ratio", "0.25", "--hybrid-mlp-ratio", "0.25",
          "--mamba-state-dim", "16", "--mamba-head-dim", "8", "--mamba-num-groups", "2", "--mamba-num-heads", "6",
          "--is-hybrid-model"]


def _mamba_values(configs) -> dict:
    return {name: getattr(configs.mamba, name) for name in MAMBA_FLAGS}


def _model_values(configs) -> dict:
    values = {name: getattr(configs.transformer, name) for name in MODEL_FLAGS}
    values.update(_mamba_values(configs))
    values.update({name: getattr(configs.data, name) for name in TOKENIZER_FLAGS})
    return values


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{format: (the run's configs, save dir, its model)}: the hybrid trained one iteration and saved."""
    root = tmp_path_factory.mktemp("mamba-description")
    out = {}
    for fmt in ("torch", "torch_dist"):
        save = str(root / fmt)
        argv = RUN + HYBRID + ["--save", save, "--ckpt-format", fmt, "--data-cache-path", str(root / "cache")]
        ctx = pretrain(mamba.datasets_provider, mamba.model_provider, mamba.forward_step,
                       args=parse_args(argv, extra_args_provider=mamba.extra_args_provider))
        model = ctx.model[0]
        out[fmt] = (ctx.configs, save, getattr(model, "module", model))
    return out


def test_the_run_gives_every_mamba_field_a_value_other_than_its_default(saved):
    defaults = {f.name: f.default for f in dataclasses.fields(MambaConfig)}
    configs = saved["torch"][0]
    untested = {name for name, value in _mamba_values(configs).items() if value == defaults[name]}
    assert untested == set(), f"give these Mamba fields a non-default value: {sorted(untested)}"
    assert set(MAMBA_FLAGS) <= set(MODEL_SHAPE_ARGS)
    assert "hybrid_override_pattern" in MAMBA_FLAGS and "mamba_num_heads" in MAMBA_FLAGS


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_use_checkpoint_args_restores_the_mamba_fields(saved, fmt):
    configs, save, _ = saved[fmt]
    args = parse_args(RUN + ["--load", save, "--use-checkpoint-args"], extra_args_provider=mamba.extra_args_provider)
    load_args_from_checkpoint(args)
    assert _model_values(configs_from_args(args)) == _model_values(configs)


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_conversion_metadata_writer_and_from_pretrained_keep_the_mamba_fields(saved, fmt, tmp_path):
    import gigatron
    from gigatron.core.convert.protocol import mamba_config_from_metadata, state_to_messages
    from gigatron.core.convert.torch_format import read_torch_checkpoint, save_torch_checkpoint

    configs, save, trained = saved[fmt]
    expected = _model_values(configs)
    md, tensors = read_torch_checkpoint(save)
    assert md[MAMBA_MODEL] is True
    assert {k: md[k] for k in expected} == expected
    assert dataclasses.asdict(mamba_config_from_metadata(md)) == dataclasses.asdict(configs.mamba)
    # core -> core at tp 2: the writer records the Mamba flags again
    save_torch_checkpoint(state_to_messages(md, tensors), str(tmp_path / "tp2"), target_tp=2)
    md_again, tensors_again = read_torch_checkpoint(str(tmp_path / "tp2"))
    assert {k: md_again[k] for k in expected} == expected
    assert all(torch.equal(tensors[n], tensors_again[n]) for n in tensors) and set(tensors) == set(tensors_again)
    # from_pretrained builds the same hybrid model: the trained model's logits
    model = gigatron.from_pretrained(save)
    assert type(model.model).__name__ == "MambaModel"
    assert dataclasses.asdict(model.model.mamba_config) == dataclasses.asdict(configs.mamba)
    ids = torch.randint(0, 90, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = _logits(trained, ids)[..., :model.vocab_size].transpose(0, 1)  # the true vocabulary
    assert torch.allclose(_logits(model, ids), reference, atol=1e-5, rtol=0)
    assert torch.equal(_logits(gigatron.from_pretrained(str(tmp_path / "tp2")), ids), _logits(model, ids))


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_convert_py_reshards_a_hybrid_model_tp1_to_2_to_1(saved, fmt, tmp_path):
    from gigatron.core.checkpoint import torch_layout
    from gigatron.core.convert.torch_format import read_torch_checkpoint

    configs, save, _ = saved[fmt]
    run_convert("--loader", "core", "--saver", "core", "--load-dir", save, "--save-dir", tmp_path / "tp2",
                "--target-tensor-parallel-size", 2)
    iter_dir = os.path.join(tmp_path / "tp2", "iter_0000001")
    assert sorted(torch_layout.rank_dirs(iter_dir)) == ["mp_rank_00", "mp_rank_01"]
    shard = torch.load(os.path.join(iter_dir, "mp_rank_01", "model_optim_rng.pt"), weights_only=True)
    # rank 1 holds its heads' slices of every segment: z, x, B, C (each half) and dt (3 of 6 heads)
    in_proj = shard["model"]["decoder.layers.0.mixer.in_proj.weight"]
    assert in_proj.shape == ((2 * 48 + 2 * 2 * 16 + 6) // 2, 32)
    assert {k: shard["args"][k] for k in MAMBA_FLAGS} == _mamba_values(configs)
    run_convert("--loader", "core", "--saver", "core", "--load-dir", tmp_path / "tp2", "--save-dir", tmp_path / "tp1")
    md0, before = read_torch_checkpoint(save)
    md1, after = read_torch_checkpoint(str(tmp_path / "tp1"))
    assert set(before) == set(after) and all(torch.equal(before[n], after[n]) for n in before)
    assert {k: md1[k] for k in MAMBA_FLAGS} == {k: md0[k] for k in MAMBA_FLAGS}
    with open(os.path.join(tmp_path / "tp1", "latest_checkpointed_iteration.txt"), encoding="utf-8") as handle:
        assert handle.read().strip() == "1"
    json.dumps({k: md1[k] for k in MAMBA_FLAGS})  # plain values (the args are stored without pickling)
