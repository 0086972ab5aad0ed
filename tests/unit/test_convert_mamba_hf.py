"""HuggingFace Mamba-2 (Mamba2ForCausalLM) and the hybrid families Nemotron-H (NemotronHForCausalLM)
and Bamba (BambaForCausalLM) import/export (gigatron/core/convert/mamba_hf.py): tiny random transformers models -> our logits
within 1e-4 of transformers' (fp32; transformers runs its PyTorch reference path on the CPU);
HF -> `torch` checkpoint at tp 2 -> HF through tools/checkpoint/convert.py is bitwise; a MambaModel
of ours exported to HuggingFace loads in transformers with our logits; what a family cannot hold
is refused with the flag to change."""

import json
import os

import pytest
import torch

import gigatron
from gigatron.core.convert import ConversionError, collect_state, hf_messages, save_hf_checkpoint
from gigatron.core.convert.protocol import (MAMBA_FLAGS, MAMBA_MODEL, MODEL_FLAGS, TOKENIZER_FLAGS, _defaults,
                                            state_to_messages)
from gigatron.core.data.config import DataConfig
from gigatron.core.models.mamba import MambaModel
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.transformer.config import TransformerConfig
from gigatron.core.transformer.mamba.config import MambaConfig

from _hf_fixtures import VOCAB, load_safetensors_dir, run_convert, save_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

NEMOTRON_PATTERN = ["linear_attention", "full_attention", "linear_attention", "mlp"]


def make_mamba2(path, seed=0, **overrides):
    """A tiny random Mamba2ForCausalLM (3 layers, hidden 32, 8 heads of 8, 2 groups, state 16)."""
    import transformers

    kw = dict(vocab_size=VOCAB, hidden_size=32, num_heads=8, head_dim=8, state_size=16, n_groups=2, expand=2,
              num_hidden_layers=3, chunk_size=8, tie_word_embeddings=False)
    kw.update(overrides)
    return save_model(transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**kw)), seed, path)


def make_nemotron_h(path, seed=0, **overrides):
    """A tiny random NemotronHForCausalLM: Mamba, attention (GQA), Mamba, MLP (relu2)."""
    import transformers

    kw = dict(vocab_size=VOCAB, hidden_size=32, layers_block_type=list(NEMOTRON_PATTERN), num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, intermediate_size=48, mamba_num_heads=8, mamba_head_dim=8,
              n_groups=2, ssm_state_size=16, chunk_size=8, max_position_embeddings=64, attn_implementation="eager")
    kw.update(overrides)
    return save_model(transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**kw)), seed, path)


def make_bamba(path, seed=0, **overrides):
    """A tiny random BambaForCausalLM: 3 layers (Mamba, attention, Mamba), each with a SwiGLU MLP."""
    import transformers

    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, attn_layer_indices=[1], num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=48, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2,
              mamba_d_state=16, mamba_chunk_size=8, max_position_embeddings=64, attn_implementation="eager")
    kw.update(overrides)
    return save_model(transformers.BambaForCausalLM(transformers.BambaConfig(**kw)), seed, path)


def _ids(batch=2, seq=19):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(3))


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _ours_logits(path, ids):
    model = gigatron.from_pretrained(path)
    with torch.no_grad():
        return model(ids)


MAKERS = {"mamba2": make_mamba2, "nemotron_h": make_nemotron_h, "bamba": make_bamba}
PATTERNS = {"mamba2": "MMM", "nemotron_h": "M*M-", "bamba": "M-*-M-"}


@pytest.mark.parametrize("family,tied", [("mamba2", False), ("mamba2", True), ("nemotron_h", False),
                                         ("bamba", False)])
def test_import_gives_transformers_logits(tmp_path, family, tied):
    hf = MAKERS[family](str(tmp_path / "hf"), tie_word_embeddings=tied)
    ids = _ids()
    ours = _ours_logits(str(tmp_path / "hf"), ids)
    assert ours.shape == (2, 19, VOCAB)
    assert (ours - _hf_logits(hf, ids)).abs().max().item() < 1e-4
    md, _ = collect_state(hf_messages(str(tmp_path / "hf")))
    assert md[MAMBA_MODEL] and md["untie_embeddings_and_output_weights"] == (not tied)
    assert md["hybrid_override_pattern"] == PATTERNS[family]
    assert (md["mamba_num_heads"], md["mamba_head_dim"], md["mamba_num_groups"], md["mamba_state_dim"]) == (8, 8, 2, 16)


@pytest.mark.parametrize("family", ["mamba2", "nemotron_h", "bamba"])
def test_round_trip_through_a_tp2_checkpoint_is_bitwise(tmp_path, family):
    import transformers

    hf = MAKERS[family](str(tmp_path / "hf"))
    run_convert("--loader", "hf", "--saver", "core", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "ckpt",
                "--target-tensor-parallel-size", 2)
    ids = _ids()
    assert (_ours_logits(str(tmp_path / "ckpt"), ids) - _hf_logits(hf, ids)).abs().max().item() < 1e-4
    run_convert("--loader", "core", "--saver", "hf", "--load-dir", tmp_path / "ckpt", "--save-dir", tmp_path / "back")
    before, after = load_safetensors_dir(str(tmp_path / "hf")), load_safetensors_dir(str(tmp_path / "back"))
    assert sorted(before) == sorted(after)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    with open(tmp_path / "back" / "config.json", encoding="utf-8") as handle:
        cfg = json.load(handle)
    assert cfg["model_type"] == family
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"),
                                                                 attn_implementation="eager").eval()
    assert torch.equal(_hf_logits(reloaded, ids), _hf_logits(hf, ids))


def _our_model(pattern, **overrides):
    kw = dict(num_layers=len(pattern), hidden_size=32, num_attention_heads=4, group_query_attention=True,
              num_query_groups=2, ffn_hidden_size=48, seq_length=32, max_position_embeddings=32,
              normalization="RMSNorm", norm_epsilon=1e-5, position_embedding_type="none", add_bias_linear=False,
              squared_relu=True, attention_dropout=0.0, hidden_dropout=0.0, untie_embeddings_and_output_weights=True)
    kw.update(overrides)
    config = TransformerConfig(**kw)
    mamba = MambaConfig(mamba_state_dim=16, mamba_head_dim=8, mamba_num_groups=2, hybrid_override_pattern=pattern,
                        is_hybrid_model=len(set(pattern)) > 1)
    model = MambaModel(config, mamba, ParallelGroups.single(), VOCAB, seed=11).eval()
    # Non-trivial values where the seeded init has constants (norm weights 1, D 1).
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith(("norm.weight", ".D", "layernorm.weight")):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    md = {name: getattr(config, name) for name in MODEL_FLAGS}
    md.update({name: getattr(mamba, name) for name in MAMBA_FLAGS})
    data = _defaults(DataConfig)
    md.update({name: data.get(name) for name in TOKENIZER_FLAGS})
    md.update({MAMBA_MODEL: True, "true_vocab_size": VOCAB, "tokenizer_dir": None, "params_dtype": "float32",
               "iteration": None, "consumed_train_samples": 0, "consumed_valid_samples": 0, "hf_config": None})
    return model, md


BAMBA_LIKE = dict(squared_relu=False, swiglu=True, position_embedding_type="rope", rotary_percent=0.5,
                  rotary_base=5000)


@pytest.mark.parametrize("pattern,family,overrides", [("MMM", "mamba2", {}), ("M*M-M", "nemotron_h", {}),
                                                      ("M-*-M-", "bamba", BAMBA_LIKE)])
def test_export_of_our_model_loads_in_transformers_with_our_logits(tmp_path, pattern, family, overrides):
    import transformers

    model, md = _our_model(pattern, **overrides)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_hf_checkpoint(state_to_messages(md, tensors), str(tmp_path / "hf"))  # the family is inferred
    with open(tmp_path / "hf" / "config.json", encoding="utf-8") as handle:
        assert json.load(handle)["model_type"] == family
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager").eval()
    assert type(hf).__name__ == {"mamba2": "Mamba2ForCausalLM", "nemotron_h": "NemotronHForCausalLM",
                                 "bamba": "BambaForCausalLM"}[family]
    ids = _ids()
    with torch.no_grad():
        ours = model(ids).transpose(0, 1)
    assert (ours - _hf_logits(hf, ids)).abs().max().item() < 1e-4
    # and back: the same tensors
    md_back, back = collect_state(hf_messages(str(tmp_path / "hf")))
    for name, tensor in back.items():
        assert torch.equal(tensor, tensors[name]), name


def test_export_refuses_what_the_family_cannot_hold(tmp_path):
    _, md = _our_model("M*M-")
    model, _ = _our_model("M*M-")
    tensors = dict(model.state_dict())
    with pytest.raises(ConversionError, match="export it as nemotron_h"):
        save_hf_checkpoint(state_to_messages(md, tensors), str(tmp_path / "a"), family="mamba2")
    with pytest.raises(ConversionError, match="Mamba / hybrid model"):
        save_hf_checkpoint(state_to_messages(md, tensors), str(tmp_path / "b"), family="llama")
    rope_model, rope_md = _our_model("M*M-", position_embedding_type="rope")
    with pytest.raises(ConversionError, match="--position-embedding-type none"):
        save_hf_checkpoint(state_to_messages(rope_md, dict(rope_model.state_dict())), str(tmp_path / "c"))
    swiglu_model, swiglu_md = _our_model("M*M-", squared_relu=False, swiglu=True)
    with pytest.raises(ConversionError, match="--squared-relu"):
        save_hf_checkpoint(state_to_messages(swiglu_md, dict(swiglu_model.state_dict())), str(tmp_path / "d"))
    with pytest.raises(ConversionError, match="'M-' / '\\*-' pairs"):
        save_hf_checkpoint(state_to_messages(md, tensors), str(tmp_path / "e"), family="bamba")
    assert not os.path.exists(tmp_path / "a" / "model.safetensors")


@pytest.mark.parametrize("family,overrides,match", [
    ("mamba2", dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon"),
    ("mamba2", dict(time_step_limit=(0.0, 2.0)), "time_step_limit"),
    ("mamba2", dict(conv_kernel=3), "conv_kernel"),
    ("nemotron_h", dict(layers_block_type=["linear_attention", "moe"]), "MoE layers"),
    ("nemotron_h", dict(mlp_hidden_act="silu"), "mlp_hidden_act"),
    ("bamba", dict(rms_norm_eps=1e-6), "rms_norm_eps"),
    ("bamba", dict(mamba_proj_bias=True), "mamba_proj_bias"),
])
def test_import_refuses_what_gigatron_cannot_compute(tmp_path, family, overrides, match):
    MAKERS[family](str(tmp_path / "hf"), **overrides)
    with pytest.raises(ConversionError, match=match):
        collect_state(hf_messages(str(tmp_path / "hf")))


@pytest.mark.parametrize("family,flag", [("nemotron_h", "use_conv_bias"), ("bamba", "mamba_conv_bias")])
def test_a_model_without_conv_bias_round_trips(tmp_path, family, flag):
    MAKERS[family](str(tmp_path / "hf"), **{flag: False})
    md, tensors = collect_state(hf_messages(str(tmp_path / "hf")))
    assert not tensors["decoder.layers.0.mixer.conv1d.bias"].any()
    save_hf_checkpoint(state_to_messages(md, tensors), str(tmp_path / "back"))
    before, after = load_safetensors_dir(str(tmp_path / "hf")), load_safetensors_dir(str(tmp_path / "back"))
    assert sorted(before) == sorted(after) and all(torch.equal(before[n], after[n]) for n in before)


def test_the_legacy_saver_refuses_a_mamba_model(tmp_path):
    make_mamba2(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="save Mamba .*models with --saver core"):
        run_convert("--loader", "hf", "--saver", "legacy", "--load-dir", tmp_path / "hf", "--save-dir",
                    tmp_path / "legacy")


@pytest.mark.parametrize("saver", ["megatron_torch", "megatron_dist"])
def test_megatron_savers_write_a_mamba_model(tmp_path, saver):
    """Megatron's own layouts hold MambaModels too (tests/unit/test_megatron_mamba_ckpt.py checks
    their names against Megatron-Core): a Mamba-2 imported from HuggingFace and saved in them loads
    back with the same logits."""
    make_mamba2(str(tmp_path / "hf"))
    run_convert("--loader", "hf", "--saver", saver, "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / saver)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(gigatron.from_pretrained(tmp_path / saver)(ids),
                                   gigatron.from_pretrained(tmp_path / "hf")(ids), rtol=0, atol=1e-5)
