"""MoE in the GPT model and the training layer: layer selection, a tiny MoE GPT that trains on CPU,
aux losses in the logged losses, the MoE flags and their named errors, FLOPs, grad buffers."""

import pytest
import torch

from gigatron.core.config import TransformerConfig
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.transformer.moe import MoEConfig, MoELayer
from gigatron.core.transformer.mlp import MLP
from gigatron.training.arguments import configs_from_args, parse_args
from gigatron.training.validate import validate_args


def _config(**kw):
    base = dict(num_layers=4, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32, add_bias_linear=False,
                hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, max_position_embeddings=16)
    base.update(kw)
    return TransformerConfig(**base)


def _gpt(moe_config, **kw):
    from gigatron.core.models.gpt import GPTModel

    return GPTModel(_config(**kw), ParallelGroups.single(), vocab_size=64, seed=7, moe_config=moe_config)


def test_moe_layer_freq_selects_layers_and_none_stays_dense():
    model = _gpt(MoEConfig(num_experts=4, moe_router_topk=2, moe_layer_freq=[1, 0, 0, 1]))
    kinds = [type(layer.mlp) for layer in model.decoder.layers]
    assert kinds == [MoELayer, MLP, MLP, MoELayer]
    assert [type(layer.mlp) for layer in _gpt(MoEConfig(num_experts=4, moe_layer_freq=2)).decoder.layers] == \
        [MoELayer, MLP, MoELayer, MLP]
    dense = _gpt(None)
    assert all(type(layer.mlp) is MLP for layer in dense.decoder.layers)
    names = {n for n, _ in model.named_parameters()}
    assert "decoder.layers.0.mlp.router.weight" in names
    assert "decoder.layers.3.mlp.experts.local_experts.3.linear_fc2.weight" in names
    assert "decoder.layers.1.mlp.linear_fc1.weight" in names


def test_expert_tags_live_in_tags_module():
    from gigatron.core.parallel import tags
    from gigatron.core.transformer.moe import experts

    assert experts.mark_expert_parallel is tags.mark_expert_parallel
    assert experts.is_expert_parallel is tags.is_expert_parallel
    p = torch.nn.Parameter(torch.zeros(2))
    assert not tags.is_expert_parallel(p)
    tags.mark_expert_parallel(p)
    assert tags.is_expert_parallel(p)


def test_ddp_puts_expert_params_in_their_own_buffers():
    from gigatron.core.distributed import DDPConfig, DistributedDataParallel
    from gigatron.core.parallel.tags import is_expert_parallel

    model = _gpt(MoEConfig(num_experts=4, moe_router_topk=2, moe_layer_freq=[1, 0, 0, 1]))
    ddp = DistributedDataParallel(DDPConfig(), model, ParallelGroups.single())
    expert_buffers = [b for b in ddp.grad_buffers if b.is_expert]
    dense_buffers = [b for b in ddp.grad_buffers if not b.is_expert]
    assert len(expert_buffers) == 1 and len(dense_buffers) == 1
    assert all(is_expert_parallel(p) for p in expert_buffers[0].params)
    assert not any(is_expert_parallel(p) for p in dense_buffers[0].params)
    assert len(expert_buffers[0].params) == 2 * 4 * 2  # 2 MoE layers x 4 experts x (fc1, fc2)


def test_tiny_moe_gpt_overfits_one_batch_with_aux_loss():
    """Core-level loop: the loss on one repeated batch falls, the aux loss is recorded per MoE
    layer and its gradient reaches the router."""
    from gigatron.core.distributed import DDPConfig, DistributedDataParallel
    from gigatron.core.optim import OptimizerConfig, get_optimizer
    from gigatron.core.transformer.moe import get_aux_loss_tracker

    torch.manual_seed(0)
    groups = ParallelGroups.single()
    moe = MoEConfig(num_experts=4, moe_router_topk=2, moe_aux_loss_coeff=1e-2, moe_layer_freq=[1, 0, 0, 1])
    model = DistributedDataParallel(DDPConfig(), _gpt(moe), groups)
    optimizer = get_optimizer(OptimizerConfig(lr=1e-2), [model], groups)
    tokens = torch.randint(0, 64, (2, 16))
    labels = torch.roll(tokens, -1, dims=1)
    tracker = get_aux_loss_tracker()
    losses = []
    for _ in range(15):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        tracker.clear()
        tracker.set_backward_scale(1.0)
        loss = model(tokens, None, None, labels=labels).mean()
        loss.backward()
        model.finish_grad_sync()
        router = model.module.decoder.layers[0].mlp.router.weight
        assert router.main_grad.abs().sum() > 0
        assert sorted(tracker.values("load_balancing_loss")) == [0, 3]
        ok, norm, _ = optimizer.step()
        assert ok and norm > 0
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    tracker.clear()


def _eager_and_compiled_aux_losses(error_on_recompile: bool, **config):
    """The aux and z losses the tracker holds after two micro-batches of a 4-layer MoE GPT, eager
    and with every layer compiled (dynamo only); also the routers of the compiled model."""
    from gigatron.core.transformer.moe import get_aux_loss_tracker

    # bf16 and the grouped GEMM: the one expert path without a host read (the loop reads the
    # per-expert counts, a graph break whose resumed frame depends on them).
    moe = MoEConfig(num_experts=4, moe_router_topk=2, moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3,
                    moe_grouped_gemm=True)
    config.update(bf16=True, params_dtype=torch.bfloat16)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    labels = torch.roll(tokens, -1, dims=1)
    tracker = get_aux_loss_tracker()

    def two_microbatches(model):
        tracker.clear()
        tracker.set_backward_scale(0.5)
        for _ in range(2):
            model(tokens, None, None, labels=labels).mean().backward()
        values = {name: tracker.values(name) for name in ("load_balancing_loss", "z_loss")}
        tracker.clear()
        return values

    expected = two_microbatches(_gpt(moe, **config))
    model = _gpt(moe, **config)
    for layer in model.decoder.layers:
        layer.compile(backend="eager")  # dynamo's tracing and guards, without Inductor's build time
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(error_on_recompile=error_on_recompile):
            got = two_microbatches(model)
    finally:
        torch._dynamo.reset()
    return expected, got, [layer.mlp.router for layer in model.decoder.layers]


def _assert_same_aux_losses(expected, got):
    assert sorted(got["load_balancing_loss"]) == [0, 1, 2, 3]
    for name in expected:
        assert got[name].keys() == expected[name].keys()
        for layer_number, value in expected[name].items():
            assert got[name][layer_number] == pytest.approx(value, rel=1e-5)


@pytest.mark.slow
def test_compiled_moe_layers_compile_once_and_record_every_layers_aux_losses():
    """--torch-compile compiles each layer: the MoE layers of every depth and micro-batch must share
    one graph (no recompile per layer number or per tracker state, which would end in the
    recompile limit and eager layers), and the aux losses queued by the compiled routers reach
    the tracker with the eager values."""
    expected, got, _ = _eager_and_compiled_aux_losses(error_on_recompile=True)
    _assert_same_aux_losses(expected, got)


@pytest.mark.slow
def test_compiled_moe_layers_outside_block_recompute_record_their_aux_losses():
    """Block recompute of the first 2 of 4 layers: the two layers it runs without a checkpoint
    also hand their queued aux losses to the tracker (the checkpointed forward runs without grad,
    a global state dynamo compiles separately, so recompiles are allowed here)."""
    expected, got, routers = _eager_and_compiled_aux_losses(
        error_on_recompile=False, recompute_granularity="full", recompute_method="block", recompute_num_layers=2)
    _assert_same_aux_losses(expected, got)
    assert not any(router.pending_aux_losses for router in routers)


TINY = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-2",
        "--mock-data", "--vocab-size", "4096", "--num-workers", "0", "--log-interval", "1",
        "--eval-interval", "100", "--eval-iters", "0", "--attention-dropout", "0", "--hidden-dropout", "0",
        "--lr-warmup-iters", "2", "--lr-decay-style", "constant"]
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--disable-bias-linear", "--moe-aux-loss-coeff", "1e-2",
       "--moe-z-loss-coeff", "1e-3"]


def test_pretrain_moe_gpt_logs_aux_losses(tmp_path, capsys):
    from gigatron.training import gpt
    from gigatron.training.loop import pretrain

    torch.set_num_threads(1)
    args = parse_args(TINY + MOE + ["--train-iters", "8", "--moe-per-layer-logging",
                                    "--data-cache-path", str(tmp_path)])
    ctx = pretrain(gpt.datasets_provider, gpt.model_provider, gpt.forward_step, args=args)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "consumed samples" in line]
    assert len(lines) == 8
    for line in lines:
        for key in ("lm loss", "load_balancing_loss", "load_balancing_loss layer_0", "load_balancing_loss layer_1",
                    "z_loss"):
            assert f"| {key}: " in line, line
    history = [loss for _, loss in ctx.log.train_history]
    assert min(history[-3:]) < history[0]
    # The logged balancing loss is E * sum_e f_e P_e (1 when perfectly balanced, at most E).
    value = float(lines[-1].split("| load_balancing_loss: ")[1].split(" ")[0])
    assert 0.9 < value < 4.0
    assert any(isinstance(m, MoELayer) for m in ctx.model[0].modules())


def test_moe_flags_parse_into_moe_config():
    args = parse_args(TINY + MOE + ["--train-iters", "1", "--moe-layer-freq", "([1]*1+[0]*1)*1",
                                    "--moe-ffn-hidden-size", "24", "--moe-shared-expert-intermediate-size", "16",
                                    "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                                    "--moe-token-dispatcher-type", "alltoall", "--moe-grouped-gemm",
                                    "--expert-model-parallel-size", "1"])
    validate_args(args, world_size=1)
    configs = configs_from_args(args)
    moe = configs.moe
    assert isinstance(moe, MoEConfig)
    assert (moe.num_experts, moe.moe_router_topk, moe.moe_layer_freq, moe.moe_ffn_hidden_size) == (4, 2, [1, 0], 24)
    assert moe.moe_shared_expert_intermediate_size == 16 and moe.moe_grouped_gemm
    assert moe.moe_router_enable_expert_bias and moe.moe_token_dispatcher_type == "alltoall"
    assert configs.parallel.expert_model_parallel_size == 1
    assert parse_args(TINY + ["--train-iters", "1"]).num_experts is None
    with pytest.raises(SystemExit):
        parse_args(TINY + MOE + ["--moe-layer-freq", "[1, x]"])


@pytest.mark.parametrize("extra, world, match", [
    (["--expert-model-parallel-size", "3"], 3, "--num-experts \\(4\\) must be divisible by --expert-model-parallel-size"),
    (["--expert-model-parallel-size", "2", "--tensor-model-parallel-size", "2"], 4, "needs --sequence-parallel"),
    (["--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "2"], 2,
     "not divisible by --expert-tensor-parallel-size"),
    (["--moe-router-topk", "5"], 1, "--moe-router-topk \\(5\\) must be between 1 and --num-experts"),
    (["--moe-layer-freq", "[1,0,1]"], 1, "--moe-layer-freq as a list must hold 2 entries"),
    (["--moe-router-enable-expert-bias"], 1, "needs --moe-router-score-function sigmoid"),
    (["--moe-ffn-hidden-size", "33", "--expert-tensor-parallel-size", "2", "--tensor-model-parallel-size", "2",
      "--sequence-parallel"], 2, "must be divisible by --expert-tensor-parallel-size"),
], ids=["ep-divides-experts", "tp-needs-sp", "world-expert-layout", "topk", "freq-length", "bias-sigmoid",
        "ffn-etp"])
def test_bad_moe_flag_combinations_fail_with_named_errors(extra, world, match):
    args = parse_args(TINY + MOE + ["--train-iters", "1", "--global-batch-size", str(2 * world)] + extra)
    with pytest.raises(ValueError, match=match):
        configs_from_args(validate_args(args, world_size=world))  # the MoEConfig checks its own flags


def test_grouped_gemm_expert_parallel_checkpoints_take_either_format(tmp_path):
    """torch_dist saves every expert under its global number, GroupedMLP's weight1/weight2 split
    per expert, so --moe-grouped-gemm at ep > 1 is accepted in both formats."""
    argv = TINY + MOE + ["--train-iters", "1", "--expert-model-parallel-size", "2", "--save", str(tmp_path)]
    for fmt in ("torch_dist", "torch"):
        validate_args(parse_args(argv + ["--ckpt-format", fmt, "--moe-grouped-gemm"]), world_size=2)
        validate_args(parse_args(argv + ["--ckpt-format", fmt]), world_size=2)


def test_moe_needs_disable_bias_linear_and_ep_needs_experts():
    args = parse_args(TINY + ["--num-experts", "4", "--train-iters", "1"])
    with pytest.raises(ValueError, match="--disable-bias-linear"):
        validate_args(args, world_size=1)
    args = parse_args(TINY + ["--expert-model-parallel-size", "2", "--train-iters", "1"])
    with pytest.raises(ValueError, match="needs an MoE model: pass --num-experts"):
        validate_args(args, world_size=2)


def test_flops_count_active_experts_and_shared_experts():
    from gigatron.core.flops import num_floating_point_operations

    cfg = _config(num_layers=4, hidden_size=16, ffn_hidden_size=32)
    dense = num_floating_point_operations(cfg, 64, 2, 8)
    assert num_floating_point_operations(cfg, 64, 2, 8, moe_config=None) == dense
    assert num_floating_point_operations(cfg, 64, 2, 8, moe_config=MoEConfig()) == dense  # no experts
    tokens, h = 2 * 8, 16
    # Two MoE layers (freq 2), top-2 of experts with ffn 24 plus a shared expert of 8, replacing ffn 32.
    moe = MoEConfig(num_experts=8, moe_router_topk=2, moe_layer_freq=2, moe_ffn_hidden_size=24,
                    moe_shared_expert_intermediate_size=8)
    expected = dense + 6.0 * tokens * 2 * (2 * h * (24 * 2 + 8) - 2 * h * 32)
    assert num_floating_point_operations(cfg, 64, 2, 8, moe_config=moe) == pytest.approx(expected)


def test_training_moves_the_expert_bias_after_each_step(tmp_path):
    from gigatron.training import gpt
    from gigatron.training.loop import pretrain
    from gigatron.core.transformer.moe import TopKRouter

    torch.set_num_threads(1)
    args = parse_args(TINY + ["--num-experts", "4", "--moe-router-topk", "2", "--disable-bias-linear",
                              "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                              "--moe-router-load-balancing-type", "none", "--moe-router-bias-update-rate", "0.01",
                              "--train-iters", "3", "--data-cache-path", str(tmp_path)])
    ctx = pretrain(gpt.datasets_provider, gpt.model_provider, gpt.forward_step, args=args)
    routers = [m for m in ctx.model[0].modules() if isinstance(m, TopKRouter)]
    assert len(routers) == 2
    for router in routers:
        # Each step moves every bias by +-rate (or 0 for an exactly average expert); counts reset.
        steps = router.expert_bias / 0.01
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() > 0
        assert router.expert_bias.abs().max() <= 3 * 0.01 + 1e-6
        assert float(router.local_tokens_per_expert.sum()) == 0.0


def test_grouped_gemm_torch_dist_checkpoint_converts_per_expert(tmp_path):
    """torch_dist stores GroupedMLP experts under their per-expert names, so conversion takes a
    --moe-grouped-gemm checkpoint as it takes a SequentialMLP one (the converter refuses only
    grouped weight1/weight2 tensors, which no reader of the registry hands it)."""
    from gigatron.core.convert.torch_format import read_torch_checkpoint
    from gigatron.training import gpt
    from gigatron.training.loop import pretrain

    torch.set_num_threads(1)
    save = str(tmp_path / "ckpt")
    args = parse_args(TINY + MOE + ["--train-iters", "3", "--moe-grouped-gemm", "--ckpt-format", "torch_dist",
                                    "--save", save, "--data-cache-path", str(tmp_path)])
    ctx = pretrain(gpt.datasets_provider, gpt.model_provider, gpt.forward_step, args=args)
    metadata, tensors = read_torch_checkpoint(save)
    experts = sorted(name for name in tensors if ".local_experts." in name)
    assert experts and not any(".experts.weight" in name for name in tensors)
    grouped = {name: p for name, p in ctx.model[0].module.named_parameters() if name.endswith("experts.weight1")}
    assert grouped  # the run's experts were GroupedMLP weights
