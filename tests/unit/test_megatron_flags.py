"""Megatron's flags as its example scripts use them: every flag of the GPT/BERT/T5 training scripts
is either accepted by all three of our training parsers, or refused with one line that names the
capability Gigatron does not have yet (never argparse's "unrecognized arguments").

The list of flags is this test's own data file, tests/data/megatron_flags.tsv: each flag that
Megatron's example scripts use and that Gigatron's GPT parser did not accept when the list was
taken, with the entry point it belongs to and what to expect of it."""

from __future__ import annotations

import contextlib
import re
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from gigatron.training import arguments as A
from gigatron.training import bert, t5

FLAGS_FILE = Path(__file__).resolve().parents[1] / "data" / "megatron_flags.tsv"
TRAINING_ENTRIES = {"training", "pretrain_t5"}
OTHER_ENTRIES = {"pretrain_mamba", "inference", "multimodal", "rl", "export", "launcher", "tools", "removed"}

# A valid value for the flags whose generic value (first choice, "2") would not do.
VALUES = {
    "--window-size": ["4,0"],
    "--padded-vocab-size": ["512"],
    "--dist-ckpt-strictness": ["assume_ok_unexpected"],
    "--rope-scaling-factor": ["8.0"],
}


def _rows():
    rows = []
    for line in FLAGS_FILE.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#") or line.startswith("flag\t"):
            continue
        flag, scripts, entry, expect, note = line.split("\t")
        rows.append((flag, int(scripts), entry, expect, note))
    return rows


ROWS = _rows()
PROVIDERS = {"pretrain_gpt": None, "pretrain_bert": bert.extra_args_provider, "pretrain_t5": t5.extra_args_provider}


def _argv_for(parser, flag):
    if flag in VALUES:
        return [flag, *VALUES[flag]]
    action = parser._option_string_actions.get(flag)  # noqa: SLF001
    if action is None or action.nargs == 0:
        return [flag]
    if action.choices:
        return [flag, str(list(action.choices)[-1])]
    kind = getattr(action.type, "__name__", "str")
    return [flag, "2.0" if kind == "float" else "2"]


def _parse_error(argv, provider=None) -> str:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        A.parse_args(argv, extra_args_provider=provider)
    return err.getvalue()


def test_the_data_file_is_complete_and_classified():
    assert len(ROWS) == 286
    assert len({r[0] for r in ROWS}) == len(ROWS)
    for flag, _, entry, expect, _ in ROWS:
        assert entry in TRAINING_ENTRIES | OTHER_ENTRIES, flag
        if entry in TRAINING_ENTRIES:
            assert expect == "accepted" or expect.startswith("needs: "), flag


@pytest.mark.parametrize("script", sorted(PROVIDERS))
def test_every_training_flag_is_accepted_or_names_its_missing_capability(script):
    provider = PROVIDERS[script]
    parser = A.build_parser(extra_args_provider=provider)
    for flag, _, entry, expect, _ in ROWS:
        if entry not in TRAINING_ENTRIES or (entry == "pretrain_t5" and script != "pretrain_t5"):
            continue
        if expect == "accepted":
            args = A.parse_args(_argv_for(parser, flag), extra_args_provider=provider)
            assert args._explicit or flag in A.ACCEPTED_NO_EFFECT, f"{script}: {flag} parsed but set nothing"
        else:
            message = _parse_error([flag], provider)
            capability = expect[len("needs: "):]
            assert f"{flag} needs {capability}, which Gigatron does not have yet" in message, (script, message)
            assert "unrecognized" not in message


def test_flags_of_other_scripts_are_never_silently_accepted():
    for flag, _, entry, _, _ in ROWS:
        if entry in OTHER_ENTRIES - {"pretrain_mamba"}:
            message = _parse_error([flag])
            assert "error:" in message, flag


def test_mamba_flags_send_pretrain_gpt_users_to_pretrain_mamba():
    from gigatron.training.entry import pretrain_gpt_main

    parser = A.build_parser()
    flags = [row[0] for row in ROWS if row[2] == "pretrain_mamba"]
    assert flags
    for flag in flags:
        with pytest.raises(ValueError, match="pretrain_mamba.py"):
            pretrain_gpt_main(_argv_for(parser, flag) + ["--vocab-size", "64"])


def test_a_missing_capability_is_one_line_naming_it():
    message = _parse_error(["--moe-latent-size", "1", "--num-layers", "2"])
    lines = [line for line in message.splitlines() if "error:" in line]
    assert lines == [lines[0]]
    assert "--moe-latent-size needs latent MoE, which Gigatron does not have yet" in lines[0]
    assert "unrecognized" not in message
    # The family prefix covers flags that the list does not name.
    assert "needs CUDA graphs" in _parse_error(["--cuda-graph-future-flag", "2"])
    # A plain typo is still an unknown flag with suggestions.
    assert "unrecognized arguments: --num-layer" in _parse_error(["--num-layer", "2"])


# ------------------------------------------------------------------ flags with behaviour


def _configs(argv, provider=None, world_size=1):
    from gigatron.training.validate import validate_args

    base = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "4", "--seq-length", "8",
            "--max-position-embeddings", "8", "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3",
            "--mock-data", "--vocab-size", "64"]
    args = A.parse_args(base + list(argv), extra_args_provider=provider)
    return A.configs_from_args(validate_args(args, world_size))


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_transformer_impl_selects_our_layers(impl):
    assert _configs(["--transformer-impl", impl]).transformer.transformer_impl == impl
    assert _configs([]).transformer.transformer_impl == "transformer_engine"  # Megatron's default


@pytest.mark.parametrize("argv, expected", [
    (["--use-rotary-position-embeddings"], "rope"),
    (["--use-rotary-position-embeddings", "--no-position-embedding"], "rope"),
    (["--no-position-embedding", "--use-rotary-position-embeddings"], "rope"),
    (["--no-position-embedding"], "none"),
    (["--no-position-embedding", "--position-embedding-type", "rope"], "rope"),
])
def test_megatron_position_embedding_switches(argv, expected):
    assert _configs(argv).transformer.position_embedding_type == expected


def test_llama3_rope_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from gigatron.core.transformer.rope import RotaryEmbedding

    head_dim, base, factor = 64, 500000.0, 8.0
    cfg = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                      max_position_embeddings=131072,
                      rope_parameters={"rope_type": "llama3", "rope_theta": base, "factor": factor,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})
    hf_inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    assert attention_factor == 1.0
    ours = RotaryEmbedding(head_dim, rotary_base=base, rope_scaling=True, rope_scaling_factor=factor)
    plain = RotaryEmbedding(head_dim, rotary_base=base)
    torch.testing.assert_close(ours.inv_freq, hf_inv_freq.float(), rtol=1e-6, atol=0)
    # The scaling changes the low frequencies only: the highest ones are kept, the lowest divided by 8.
    assert ours.inv_freq[0] == plain.inv_freq[0]
    torch.testing.assert_close(ours.inv_freq[-1], plain.inv_freq[-1] / factor)
    t = _configs(["--use-rotary-position-embeddings", "--use-rope-scaling", "--rope-scaling-factor", "16"]).transformer
    assert t.use_rope_scaling and t.rope_scaling_factor == 16.0
    with pytest.raises(ValueError, match="--use-rope-scaling .* needs --position-embedding-type rope"):
        _configs(["--use-rope-scaling"])


def test_sliding_window_attention_masks_the_far_past():
    from gigatron.core.transformer.attention import core_attention, sliding_window_mask

    mask = sliding_window_mask(5, 5, (1, 0))
    expected = ~(torch.eye(5, dtype=torch.bool) | torch.eye(5, dtype=torch.bool).roll(-1, dims=1).tril())
    expected |= torch.ones(5, 5, dtype=torch.bool).triu(1)
    assert torch.equal(mask | torch.ones(5, 5, dtype=torch.bool).triu(1), expected)
    # With a KV cache the queries are the newest positions.
    assert torch.equal(sliding_window_mask(1, 5, (1, 0)), torch.tensor([[True, True, True, False, False]]))
    # Our attention with a window equals attention over the window only.
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    out = core_attention(q, k, v, (causal | sliding_window_mask(6, 6, (2, 0)))[None, None], backend="local")
    last = core_attention(q[:, :, 5:], k[:, :, 3:], v[:, :, 3:], torch.zeros(1, 3, dtype=torch.bool)[None, None],
                          backend="local")
    torch.testing.assert_close(out[:, :, 5:], last)
    assert _configs(["--window-size", "4,0"]).transformer.window_size == (4, 0)
    assert _configs(["--window-size", "(4, -1)"]).transformer.window_size == (4, -1)
    assert "is not two integers" in _parse_error(["--window-size", "4"])


def test_mistral_with_a_short_sliding_window_matches_transformers(tmp_path):
    import gigatron
    from _hf_fixtures import make_hf_model

    hf = make_hf_model("mistral", tmp_path / "hf", sliding_window=4, rope_theta=5000.0, rms_norm_eps=1e-5)
    model = gigatron.from_pretrained(tmp_path / "hf")
    assert model.config.window_size == (3, 0)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
        full = gigatron.from_pretrained(tmp_path / "hf")
        full.config.window_size = None
        for module in full.modules():
            if hasattr(module, "window_size"):
                module.window_size = None
        torch.testing.assert_close(model(ids), ref, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(full(ids), ref, atol=1e-3)  # the window matters at this length
    # Exported back to HuggingFace, the window is kept.
    from _hf_fixtures import run_convert
    run_convert("--loader", "hf", "--saver", "core", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "ckpt")
    run_convert("--loader", "core", "--saver", "hf", "--load-dir", tmp_path / "ckpt", "--save-dir", tmp_path / "back")
    import json
    assert json.loads((tmp_path / "back" / "config.json").read_text())["sliding_window"] == 4


def test_llama3_scaled_llama_matches_transformers(tmp_path):
    import gigatron
    from _hf_fixtures import make_hf_model

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    hf = make_hf_model("llama", tmp_path / "hf", rope_scaling=scaling, rope_theta=500000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=16384)
    model = gigatron.from_pretrained(tmp_path / "hf")
    assert model.config.use_rope_scaling and model.config.rope_scaling_factor == 8.0
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_apply_query_key_layer_scaling_means_an_fp32_softmax():
    t = _configs(["--apply-query-key-layer-scaling"]).transformer
    assert t.apply_query_key_layer_scaling and t.attention_softmax_in_fp32


def test_xavier_uniform_init():
    from gigatron.core.transformer.mlp import normal_init_method, scaled_init_method

    t = _configs(["--init-method-xavier-uniform"]).transformer
    torch.manual_seed(0)
    w = normal_init_method(t)(torch.empty(300, 100))
    bound = (6 / 400) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound  # uniform on [-a, a], not normal
    assert repr(scaled_init_method(t)) == "xavier_uniform"
    assert repr(normal_init_method(_configs([]).transformer)) == "normal(std=0.02)"
    with pytest.raises(ValueError, match="--init-method-xavier-uniform is not supported with --num-experts"):
        _configs(["--init-method-xavier-uniform", "--num-experts", "2", "--disable-bias-linear"])


def test_use_legacy_models_points_to_conversion():
    with pytest.raises(ValueError, match="convert.py --model-type GPT --loader legacy --saver core"):
        _configs(["--use-legacy-models"])


def test_deterministic_mode(monkeypatch):
    from gigatron.training import initialize as init

    with pytest.raises(ValueError, match="--deterministic-mode cannot use FlashAttention"):
        _configs(["--deterministic-mode", "--use-flash-attn"])
    assert _configs(["--deterministic-mode"]).training.deterministic_mode
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    calls = []
    monkeypatch.setattr(init.torch, "use_deterministic_algorithms", lambda flag: calls.append(flag))
    init.enable_deterministic_mode()
    assert calls == [True]
    import os
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_padded_vocab_size():
    from gigatron.training.entry import padded_vocab_size_from_args

    data = _configs(["--padded-vocab-size", "100"]).data
    assert padded_vocab_size_from_args(data, 1) == 100
    data.padded_vocab_size = 10
    with pytest.raises(ValueError, match=r"--padded-vocab-size \(10\) is smaller than the tokenizer's vocabulary"):
        padded_vocab_size_from_args(data, 1)
    with pytest.raises(ValueError, match="must be a positive multiple of --tensor-model-parallel-size"):
        _configs(["--padded-vocab-size", "101", "--tensor-model-parallel-size", "2"], world_size=2)


def test_dist_ckpt_strictness_choices():
    assert _configs([]).checkpoint.dist_ckpt_strictness == "assume_ok_unexpected"
    assert _configs(["--dist-ckpt-strictness", "log_all"]).checkpoint.dist_ckpt_strictness == "log_all"
    assert "invalid choice" in _parse_error(["--dist-ckpt-strictness", "lenient"])


def test_scripts_default_their_tokenizer_as_megatron_does():
    args = A.default_tokenizer_type(A.parse_args([]), "GPT2BPETokenizer")
    assert args.tokenizer_type == "GPT2BPETokenizer"
    # --vocab-size alone still means a NullTokenizer; an explicit type is kept.
    assert A.default_tokenizer_type(A.parse_args(["--vocab-size", "64"]), "GPT2BPETokenizer").tokenizer_type is None
    given = A.parse_args(["--tokenizer-type", "NullTokenizer"])
    assert A.default_tokenizer_type(given, "BertWordPieceLowerCase").tokenizer_type == "NullTokenizer"


def test_calculate_per_token_loss_divides_once_by_the_tokens_of_the_step():
    """Micro-batches with different token counts: the per-token loss weighs every token alike
    (sum over the step / its token count), the default weighs every micro-batch alike."""
    from types import SimpleNamespace

    from torch import nn

    from gigatron.core.pipeline import forward_backward_no_pipelining
    from gigatron.training.gpt import loss_func

    def run(per_token):
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        model.ddp_config = SimpleNamespace(calculate_per_token_loss=per_token)
        model.no_sync = contextlib.nullcontext
        gen = torch.Generator().manual_seed(1)
        batches = [(torch.randn(2, 4, 3, generator=gen), torch.randn(2, 4, generator=gen), mask)
                   for mask in (torch.ones(2, 4), torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]))]
        it = iter(batches)
        seen = []

        def forward_step(_iterator, chunk):
            x, y, mask = next(it)
            losses = (chunk(x).squeeze(-1) - y) ** 2  # [b, s]
            return losses, lambda out: loss_func(mask, out, per_token=per_token)

        def finalize(chunks, num_tokens=None):
            seen.append(num_tokens)
            if num_tokens is not None:
                for p in chunks[0].parameters():
                    p.grad /= num_tokens
        forward_backward_no_pipelining(forward_step_func=forward_step, data_iterator=None, model=model,
                                       num_microbatches=2, finalize_model_grads_func=finalize)
        return model, batches, seen

    model, batches, seen = run(per_token=True)
    assert float(seen[0]) == 9.0  # 8 + 1 tokens
    reference = nn.Linear(3, 1)
    reference.load_state_dict({k: v for k, v in model.state_dict().items()})
    total = sum((((reference(x).squeeze(-1) - y) ** 2) * m).sum() for x, y, m in batches) / 9.0
    total.backward()
    for ours, ref in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, ref.grad)
    mean_model, _, seen = run(per_token=False)
    assert seen == [None]
    assert not torch.allclose(mean_model.weight.grad, model.weight.grad)


def test_per_token_loss_needs_a_loss_func_that_returns_the_token_count():
    from types import SimpleNamespace

    from torch import nn

    from gigatron.core.pipeline import forward_backward_no_pipelining

    model = nn.Linear(1, 1)
    model.ddp_config = SimpleNamespace(calculate_per_token_loss=True)
    model.no_sync = contextlib.nullcontext

    def forward_step(_iterator, chunk):
        return chunk(torch.ones(1, 1)).sum(), lambda out: (out, {})

    with pytest.raises(ValueError, match="--calculate-per-token-loss needs a loss_func that returns"):
        forward_backward_no_pipelining(forward_step_func=forward_step, data_iterator=None, model=model,
                                       num_microbatches=1)
    assert _configs(["--calculate-per-token-loss"]).ddp.calculate_per_token_loss


TINY_RUN = ["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "16",
            "--max-position-embeddings", "16", "--micro-batch-size", "1", "--lr", "1e-3", "--mock-data",
            "--vocab-size", "4100", "--make-vocab-size-divisible-by", "64", "--num-workers", "0", "--eval-iters", "0",
            "--no-loss-curve"]


def _pretrain_gpt(argv):
    from gigatron.training import gpt
    from gigatron.training.loop import pretrain

    return pretrain(gpt.datasets_provider, gpt.model_provider, gpt.forward_step, args=A.parse_args(TINY_RUN + argv))


def test_tensorboard_log_interval_is_honoured(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.set_num_threads(1)
    _pretrain_gpt(["--train-iters", "6", "--log-interval", "3", "--tensorboard-dir", str(tmp_path / "tb"),
                   "--tensorboard-log-interval", "2", "--data-cache-path", str(tmp_path / "cache"),
                   "--transformer-impl", "local"])
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert steps["lm loss"] == [2, 4, 6] and steps["learning-rate"] == [2, 4, 6] and steps["grad-norm"] == [2, 4, 6]
    assert steps["iteration-time"] == [3, 6]  # measured over a log interval
    out = capsys.readouterr().out
    assert out.count("--transformer-impl local: Gigatron's own PyTorch layers") == 1


def test_dataloader_type_external_uses_the_providers_iterators(tmp_path):
    from gigatron.training import gpt
    from gigatron.training.loop import pretrain

    torch.set_num_threads(1)
    argv = TINY_RUN + ["--train-iters", "2", "--dataloader-type", "external", "--data-cache-path", str(tmp_path)]
    drawn = []

    def provider(ctx, num_samples):
        train, valid, test = gpt.datasets_provider(ctx, num_samples)

        def batches():  # the user's own loader: micro-batches of one sample, counted
            for index in range(len(train)):
                drawn.append(index)
                yield torch.utils.data.default_collate([train[index]])
        return batches(), None, None

    ctx = pretrain(provider, gpt.model_provider, gpt.forward_step, args=A.parse_args(argv))
    assert ctx.iteration == 2 and drawn == [0, 1]
    with pytest.raises(ValueError, match="--dataloader-type external takes the datasets provider's result"):
        pretrain(gpt.datasets_provider, gpt.model_provider, gpt.forward_step, args=A.parse_args(argv))


def test_no_data_sharding_reaches_the_cyclic_sampler(tmp_path, monkeypatch):
    import gigatron.core.data as data_module
    from gigatron.core.data.samplers import RandomSampler

    samplers = []
    original = data_module.build_pretraining_data_loader

    def recording(*args, **kwargs):
        loader = original(*args, **kwargs)
        samplers.append(loader.batch_sampler)
        return loader
    monkeypatch.setattr(data_module, "build_pretraining_data_loader", recording)
    torch.set_num_threads(1)
    _pretrain_gpt(["--train-iters", "1", "--dataloader-type", "cyclic", "--no-data-sharding",
                   "--data-cache-path", str(tmp_path)])
    assert isinstance(samplers[0], RandomSampler) and samplers[0].data_sharding is False
    assert _configs([]).data.data_sharding is True


def test_decoupled_lr_trains_the_embedding_and_output_layer_at_their_own_rate(tmp_path):
    torch.set_num_threads(1)
    ctx = _pretrain_gpt(["--train-iters", "4", "--lr", "1e-3", "--min-lr", "1e-5", "--decoupled-lr", "5e-3",
                         "--decoupled-min-lr", "1e-4", "--lr-decay-style", "linear", "--lr-decay-iters", "8",
                         "--untie-embeddings-and-output-weights", "--data-cache-path", str(tmp_path)])
    groups = ctx.optimizer.param_groups
    decoupled = [g for g in groups if "max_lr" in g]
    others = [g for g in groups if "max_lr" not in g]
    assert decoupled and others
    # Half way through the linear decay: min + (max - min) / 2 for each schedule.
    for g in decoupled:
        assert g["lr"] == pytest.approx(1e-4 + (5e-3 - 1e-4) / 2)
    for g in others:
        assert g["lr"] == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)
    ctx_plain = _pretrain_gpt(["--train-iters", "1", "--data-cache-path", str(tmp_path)])
    assert all("max_lr" not in g for g in ctx_plain.optimizer.param_groups)
    with pytest.raises(ValueError, match="--decoupled-min-lr needs --decoupled-lr"):
        _configs(["--decoupled-min-lr", "1e-5"])


def test_moe_apply_probs_on_input_scales_the_expert_input():
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.core.parallel.init import initialize_parameters
    from gigatron.core.transformer.config import TransformerConfig
    from gigatron.core.transformer.moe import MoEConfig, MoELayer
    from gigatron.core.transformer.moe.aux_losses import MoEAuxLossTracker

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, ffn_hidden_size=12,
                               seq_length=4, add_bias_linear=False)
    moe = MoEConfig(num_experts=3, moe_router_topk=1, moe_apply_probs_on_input=True)
    layer = MoELayer(config, moe, ParallelGroups.single(), 0, aux_loss_tracker=MoEAuxLossTracker())
    initialize_parameters(layer, 3)
    x = torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = layer(x)[0].reshape(-1, 8)
        probs, routing_map = layer.router(x)
        for t, token in enumerate(x.reshape(-1, 8)):
            e = int(routing_map[t].nonzero())
            expert = layer.experts.local_experts[e]
            hidden = (token * probs[t, e]) @ expert.linear_fc1.weight.t()
            expected = layer.experts.activation(hidden) @ expert.linear_fc2.weight.t()
            torch.testing.assert_close(out[t], expected)
    with pytest.raises(ValueError, match="--moe-apply-probs-on-input .* needs --moe-router-topk 1"):
        MoEConfig(num_experts=3, moe_router_topk=2, moe_apply_probs_on_input=True)


def test_moe_layer_recompute_is_selective_recompute_of_the_moe_layers():
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.core.transformer.layer import TransformerLayer

    moe = ["--num-experts", "2", "--disable-bias-linear", "--moe-layer-freq", "[1,0]"]
    configs = _configs(moe + ["--moe-layer-recompute"])
    t = configs.transformer
    assert t.recompute_granularity == "selective" and t.recompute_modules == ["core_attn", "moe"]
    assert _configs(moe + ["--moe-layer-recompute", "--recompute-granularity", "full", "--recompute-method",
                           "uniform", "--recompute-num-layers", "1"]).transformer.recompute_granularity == "full"
    groups = ParallelGroups.single()
    assert TransformerLayer(t, groups, 0, configs.moe).recompute_mlp  # the MoE layer
    assert not TransformerLayer(t, groups, 1, configs.moe).recompute_mlp  # a dense layer


@pytest.mark.parametrize("level, names", [
    (0, set()),
    (1, {"forward-backward", "optimizer", "loss-all-reduce"}),
    (2, {"forward-backward", "optimizer", "loss-all-reduce", "forward-compute", "backward-compute"}),
])
def test_timing_log_level_and_timers_in_tensorboard(tmp_path, capsys, level, names):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.set_num_threads(1)
    _pretrain_gpt(["--train-iters", "2", "--log-interval", "2", "--timing-log-level", str(level),
                   "--log-timers-to-tensorboard", "--tensorboard-dir", str(tmp_path / "tb"),
                   "--data-cache-path", str(tmp_path / "cache")])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("timers (ms per iteration)")]
    assert len(lines) == (1 if names else 0)
    if names:
        assert {part.split(":")[0].strip() for part in lines[0].split(": ", 1)[1].split(" | ")} == names
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {t[:-len("-time")] for t in events.Tags()["scalars"] if t.endswith("-time") and t != "iteration-time"} \
        == names


def test_spec_builds_the_layers_with_the_users_function(tmp_path):
    module = tmp_path / "my_layers.py"
    module.write_text(
        "from gigatron.core.transformer.layer import TransformerLayer\n"
        "BUILT = []\n"
        "class Doubled(TransformerLayer):\n"
        "    def forward(self, hidden, *args, **kwargs):\n"
        "        return 2 * super().forward(hidden, *args, **kwargs)\n"
        "def layer_spec(config, groups, layer_number, moe_config=None):\n"
        "    BUILT.append(layer_number)\n"
        "    return Doubled(config, groups, layer_number, moe_config=moe_config)\n", encoding="utf-8")
    torch.set_num_threads(1)
    ctx = _pretrain_gpt(["--train-iters", "1", "--num-layers", "2", "--spec", str(module), "layer_spec",
                         "--data-cache-path", str(tmp_path / "cache")])
    layers = ctx.model[0].module.decoder.layers
    assert [type(layer).__name__ for layer in layers] == ["Doubled", "Doubled"]
    with pytest.raises(ValueError, match="--spec takes MODULE FUNCTION"):
        _configs(["--spec", str(module)])
    from gigatron.training.gpt import load_layer_spec
    with pytest.raises(ValueError, match="has no function 'missing'"):
        load_layer_spec([str(module), "missing"])
    with pytest.raises(ValueError, match="cannot import no_such_module_here"):
        load_layer_spec(["no_such_module_here", "f"])


def test_the_readme_lists_every_flag_accepted_without_effect():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("Accepted without effect", 1)[1].split("Refused with one line", 1)[0]
    listed = set(re.findall(r"^\| `(--[a-z0-9-]+)` \|", section, flags=re.M))
    assert listed == set(A.ACCEPTED_NO_EFFECT)


def _lm_losses(output: str) -> list:
    return [float(v) for v in re.findall(r"lm loss: ([0-9.E+-]+)", output)]


def test_per_token_loss_over_two_data_parallel_ranks_equals_one_rank(tmp_path):
    """The step's gradient is the sum over all its tokens (micro-batches and data-parallel ranks)
    divided once by their count: two data-parallel ranks train as one rank does."""
    import os
    import socket
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    argv = TINY_RUN + ["--train-iters", "3", "--global-batch-size", "4", "--log-interval", "1",
                       "--calculate-per-token-loss", "--eod-mask-loss", "--seed", "7", "--hidden-dropout", "0",
                       "--attention-dropout", "0", "--optimizer", "sgd", "--lr", "0.5",
                       "--data-cache-path", str(tmp_path / "cache")]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    runs = {}
    for procs in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port",
               str(port), str(root / "pretrain_gpt.py"), *argv]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        runs[procs] = _lm_losses(result.stdout + result.stderr)
    assert len(runs[1]) == len(runs[2]) == 3
    np.testing.assert_allclose(runs[2], runs[1], rtol=2e-5)
