"""What a checkpoint records about its model is derived from the config dataclasses' model fields,
and every such field survives each way a checkpoint is read back: --use-checkpoint-args, the
converters (core torch / torch_dist readers and the torch writer), `gigatron.from_pretrained`, and
the HuggingFace export and import where the family can represent the field.

The variants below train one iteration through `pretrain` (mock data) and save; together they give
every model field a value other than its default (checked, so a new field cannot be forgotten)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from gigatron.core.convert.protocol import MODEL_FLAGS, MOE_FLAGS, TOKENIZER_FLAGS, ConversionError
from gigatron.core.data.config import DataConfig
from gigatron.core.transformer.config import TransformerConfig
from gigatron.core.transformer.moe.config import MoEConfig
from gigatron.training import gpt
from gigatron.training.arguments import configs_from_args, parse_args
from gigatron.training.checkpointing import MODEL_SHAPE_ARGS, load_args_from_checkpoint
from gigatron.training.loop import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

RUN = ["--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1", "--lr", "1e-3", "--mock-data",
       "--num-workers", "0", "--eval-iters", "0", "--log-interval", "1", "--no-loss-curve"]
DATA = ["--vocab-size", "4100", "--make-vocab-size-divisible-by", "64", "--vocab-extra-ids", "3",
        "--tiktoken-pattern", "v2", "--tiktoken-num-special-tokens", "500", "--tiktoken-special-tokens", "<unk>",
        "<s>", "</s>"]

VARIANTS = {
    # Every dense model field that a Llama-like model can take, at once (not exportable to HuggingFace).
    "dense": ["--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "48", "--num-attention-heads", "4",
              "--kv-channels", "16", "--group-query-attention", "--num-query-groups", "2", "--seq-length", "32",
              "--max-position-embeddings", "48", "--position-embedding-type", "rope", "--rotary-base", "5000",
              "--rotary-percent", "0.5", "--rotary-interleaved", "--rotary-seq-len-interpolation-factor", "4.0",
              "--normalization", "RMSNorm", "--norm-epsilon", "1e-6", "--apply-layernorm-1p", "--swiglu",
              "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--add-qkv-bias", "--qk-layernorm",
              "--attention-dropout", "0.05", "--hidden-dropout", "0.02", "--apply-residual-connection-post-layernorm"],
    "squared_relu": ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
                     "--squared-relu"],
    # GPT-2: learned positions, tanh GeLU; exportable to HuggingFace.
    "gpt2": ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
             "--max-position-embeddings", "40", "--openai-gelu", "--norm-epsilon", "1e-6",
             "--attention-dropout", "0.05", "--hidden-dropout", "0.02"],
    # Llama with linear RoPE scaling; exportable to HuggingFace.
    "llama": ["--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "48", "--num-attention-heads", "4",
              "--group-query-attention", "--num-query-groups", "2", "--seq-length", "32",
              "--max-position-embeddings", "64", "--position-embedding-type", "rope", "--rotary-base", "5000",
              "--rotary-seq-len-interpolation-factor", "4.0", "--normalization", "RMSNorm", "--norm-epsilon", "1e-6",
              "--swiglu", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
              "--attention-dropout", "0.05", "--hidden-dropout", "0"],
    # Llama 3.1 frequency scaling and a sliding attention window.
    "llama3_window": ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
                      "--use-rotary-position-embeddings", "--no-position-embedding", "--use-rope-scaling",
                      "--rope-scaling-factor", "16", "--window-size", "7,0", "--normalization", "RMSNorm",
                      "--swiglu", "--disable-bias-linear"],
    # Top-1 MoE with the routing probability applied to the expert input.
    "moe_top1": ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
                 "--disable-bias-linear", "--num-experts", "2", "--moe-router-topk", "1",
                 "--moe-apply-probs-on-input"],
    # Mixture of experts: every router and capacity field the converters carry.
    "moe": ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
            "--num-experts", "4", "--moe-layer-freq", "[1,0]", "--moe-ffn-hidden-size", "24",
            "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-router-topk", "2", "--moe-router-pre-softmax",
            "--moe-router-num-groups", "2", "--moe-router-group-topk", "1", "--moe-router-topk-scaling-factor", "2.0",
            "--moe-router-dtype", "fp32", "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff", "0.001",
            "--moe-input-jitter-eps", "0.01", "--moe-expert-capacity-factor", "1.5",
            "--moe-pad-expert-input-to-capacity", "--moe-token-drop-policy", "position",
            "--moe-router-bias-update-rate", "0.01"],
    # Multi-latent attention with YaRN RoPE and a multi-token prediction block.
    "mla": ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--max-position-embeddings", "32", "--position-embedding-type", "rope", "--normalization", "RMSNorm",
            "--swiglu", "--disable-bias-linear", "--multi-latent-attention", "--q-lora-rank", "12",
            "--kv-lora-rank", "8", "--qk-head-dim", "6", "--qk-pos-emb-head-dim", "4", "--v-head-dim", "5",
            "--rotary-scaling-factor", "40", "--mscale", "0.9", "--mscale-all-dim", "0.7", "--rope-type", "yarn",
            "--mtp-num-layers", "1", "--mtp-loss-scaling-factor", "0.2"],
    # Shared experts and the expert bias: recorded and restored, but refused by the converters.
    "moe_shared": ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
                   "--swiglu", "--disable-bias-linear", "--num-experts", "4", "--moe-router-topk", "1",
                   "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                   "--moe-shared-expert-intermediate-size", "16"],
}
CONVERTIBLE = ("dense", "squared_relu", "gpt2", "llama", "moe", "mla")
HF_FAMILY = {"gpt2": "gpt2", "llama": "llama"}
# Training-only regularization that a HuggingFace family has no field for (Llama has no residual dropout).
HF_UNREPRESENTED = {"llama": {"hidden_dropout"}, "gpt2": set()}


def _model_values(configs) -> dict:
    values = {name: getattr(configs.transformer, name) for name in MODEL_FLAGS}
    if configs.moe.num_experts is not None:
        values.update({name: getattr(configs.moe, name) for name in MOE_FLAGS})
    values.update({name: getattr(configs.data, name) for name in TOKENIZER_FLAGS})
    return values


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{(variant, format): (the run's configs, save dir)}: each variant trained one iteration and saved."""
    root = tmp_path_factory.mktemp("model-description")
    out = {}
    for name, flags in VARIANTS.items():
        for fmt in ("torch", "torch_dist"):
            save = str(root / f"{name}-{fmt}")
            argv = RUN + DATA + flags + ["--save", save, "--ckpt-format", fmt,
                                         "--data-cache-path", str(root / "cache")]
            ctx = pretrain(gpt.datasets_provider, gpt.model_provider, gpt.forward_step, args=parse_args(argv))
            out[(name, fmt)] = (ctx.configs, save)
    return out


def test_the_variants_give_every_model_field_a_value_other_than_its_default(saved):
    defaults = {**{f.name: f.default for f in dataclasses.fields(TransformerConfig)},
                **{f.name: f.default for f in dataclasses.fields(MoEConfig)},
                **{f.name: f.default for f in dataclasses.fields(DataConfig)}}
    changed = set()
    for configs, _ in saved.values():
        changed.update(name for name, value in _model_values(configs).items() if value != defaults[name])
    wanted = set(MODEL_FLAGS) | set(MOE_FLAGS) | set(TOKENIZER_FLAGS)
    untested = wanted - changed - {"vocab_file", "merge_file", "tokenizer_model"}  # test_tokenizer_paths_*
    assert untested == set(), f"give these model fields a non-default value in a variant: {sorted(untested)}"


def test_model_description_is_derived_from_the_configs():
    assert "rotary_seq_len_interpolation_factor" in MODEL_FLAGS
    assert "apply_residual_connection_post_layernorm" in MODEL_FLAGS
    for run_setting in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "bf16", "recompute_granularity",
                        "attention_backend", "sequence_parallel"):
        assert run_setting not in MODEL_FLAGS and run_setting not in MODEL_SHAPE_ARGS
    assert "moe_token_dispatcher_type" not in MOE_FLAGS and "moe_grouped_gemm" not in MOE_FLAGS
    assert {"vocab_extra_ids", "make_vocab_size_divisible_by", "tiktoken_pattern"} <= set(TOKENIZER_FLAGS)
    assert set(MODEL_FLAGS) | set(MOE_FLAGS) | set(TOKENIZER_FLAGS) <= set(MODEL_SHAPE_ARGS)


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_use_checkpoint_args_restores_every_model_field(saved, variant, fmt):
    configs, save = saved[(variant, fmt)]
    args = parse_args(RUN + ["--load", save, "--use-checkpoint-args"])
    load_args_from_checkpoint(args)
    assert _model_values(configs_from_args(args)) == _model_values(configs)


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
@pytest.mark.parametrize("variant", CONVERTIBLE)
def test_converters_and_from_pretrained_keep_every_model_field(saved, variant, fmt, tmp_path):
    import gigatron
    from gigatron.core.convert.protocol import moe_config_from_metadata, state_to_messages, \
        transformer_config_from_metadata
    from gigatron.core.convert.torch_format import read_torch_checkpoint, save_torch_checkpoint

    configs, save = saved[(variant, fmt)]
    expected = _model_values(configs)
    md, tensors = read_torch_checkpoint(save)
    assert {k: md[k] for k in expected} == expected
    config = transformer_config_from_metadata(md)
    assert {k: getattr(config, k) for k in MODEL_FLAGS} == {k: expected[k] for k in MODEL_FLAGS}
    if configs.moe.num_experts is not None:
        moe = moe_config_from_metadata(md)
        assert {k: getattr(moe, k) for k in MOE_FLAGS} == {k: expected[k] for k in MOE_FLAGS}
    # core torch -> core torch: the writer records every field again
    save_torch_checkpoint(state_to_messages(md, tensors), str(tmp_path / "again"), target_tp=1, target_pp=1)
    md_again, _ = read_torch_checkpoint(str(tmp_path / "again"))
    assert {k: md_again[k] for k in expected} == expected
    # from_pretrained builds the model from the same description (dropout off for inference)
    model = gigatron.from_pretrained(save)
    inference = dict(attention_dropout=0.0, hidden_dropout=0.0)
    assert {k: getattr(model.config, k) for k in MODEL_FLAGS} == {k: inference.get(k, expected[k]) for k in MODEL_FLAGS}


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_converters_refuse_what_they_cannot_represent(saved, fmt):
    from gigatron.core.checkpoint.io import CheckpointError
    from gigatron.core.convert.torch_format import read_torch_checkpoint

    _, save = saved[("moe_shared", fmt)]
    with pytest.raises((ConversionError, CheckpointError), match="shared experts|expert-bias|expert bias"):
        read_torch_checkpoint(save)


@pytest.mark.parametrize("variant", sorted(HF_FAMILY))
def test_huggingface_export_and_import_keep_what_the_family_represents(saved, variant, tmp_path):
    from gigatron.core.convert.hf import hf_messages, save_hf_checkpoint
    from gigatron.core.convert.protocol import collect_state
    from gigatron.core.convert.torch_format import torch_checkpoint_messages

    configs, save = saved[(variant, "torch")]
    save_hf_checkpoint(torch_checkpoint_messages(save), str(tmp_path / "hf"), family=HF_FAMILY[variant])
    md, _ = collect_state(hf_messages(str(tmp_path / "hf")))
    expected = {name: getattr(configs.transformer, name) for name in MODEL_FLAGS}
    skipped = HF_UNREPRESENTED[variant] | {"seq_length"}  # HF records no training sequence length
    assert {k: md[k] for k in expected if k not in skipped} == {k: v for k, v in expected.items() if k not in skipped}


def test_huggingface_export_refuses_fields_it_cannot_represent(saved, tmp_path):
    from gigatron.core.convert.hf import save_hf_checkpoint
    from gigatron.core.convert.torch_format import torch_checkpoint_messages

    _, save = saved[("dense", "torch")]
    with pytest.raises(ConversionError, match="--apply-residual-connection-post-layernorm"):
        save_hf_checkpoint(torch_checkpoint_messages(save), str(tmp_path / "hf"), family="llama")
