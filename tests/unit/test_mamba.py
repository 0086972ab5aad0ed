"""Mamba-2 and hybrid models: the flags and the hybrid allocation (against Megatron-Core's when it
is installed), the fused parameters' tensor-parallel layout, the mixer and the hybrid model against
compositions of the reference pieces, parameter names and shapes as Megatron-Core's, pipeline
stages, and a few training steps."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from gigatron.core.models.mamba import MambaModel
from gigatron.core.ops.causal_conv1d import reference_causal_conv1d
from gigatron.core.ops.ssd import reference_ssd_scan
from gigatron.core.parallel.groups import Group, ParallelGroups
from gigatron.core.transformer.config import TransformerConfig
from gigatron.core.transformer.mamba.config import (
    MambaConfig,
    allocate_hybrid_layers,
    hybrid_layer_types,
    mamba_num_heads,
    validate_mamba,
)
from gigatron.core.transformer.mamba.layout import (
    conv_segments,
    from_rank_major,
    in_proj_segments,
    rank_major_order,
    to_rank_major,
)
from gigatron.core.transformer.mamba.mixer import MambaMixer, reference_gated_rmsnorm
from gigatron.core.transformer.mamba.stack import AttentionLayer, MambaLayer, MLPLayer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

VOCAB = 64


def tconfig(**kw):
    base = dict(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=24, attention_dropout=0.0,
                hidden_dropout=0.0, normalization="RMSNorm", position_embedding_type="none",
                add_bias_linear=False, swiglu=True)
    base.update(kw)
    return TransformerConfig(**base)


def mconfig(**kw):
    base = dict(mamba_state_dim=8, mamba_head_dim=8, mamba_num_groups=2)
    base.update(kw)
    return MambaConfig(**base)


# ------------------------------------------------------------------------------- flags and pattern
def test_defaults_are_megatrons():
    c = MambaConfig()
    assert (c.mamba_state_dim, c.mamba_head_dim, c.mamba_num_groups, c.mamba_num_heads) == (128, 64, 8, None)
    assert (c.hybrid_override_pattern, c.hybrid_attention_ratio, c.hybrid_mlp_ratio) == (None, 0.0, 0.0)
    assert mamba_num_heads(c, 2048) == 64  # 2 * hidden / head dim


@pytest.mark.parametrize("kw,match", [
    (dict(mamba_state_dim=0), "--mamba-state-dim"),
    (dict(mamba_head_dim=-4), "--mamba-head-dim"),
    (dict(mamba_num_heads=12, mamba_num_groups=8), "--mamba-num-heads .* --mamba-num-groups"),
    (dict(hybrid_attention_ratio=1.5), "--hybrid-attention-ratio"),
    (dict(hybrid_attention_ratio=0.6, hybrid_mlp_ratio=0.6), "exceed 1"),
    (dict(hybrid_override_pattern="M*X-"), "'X'"),
    (dict(hybrid_override_pattern=""), "empty"),
])
def test_bad_flags_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        MambaConfig(**kw)


def test_flags_against_the_model_and_tp():
    with pytest.raises(ValueError, match="--num-layers is 4"):
        validate_mamba(mconfig(hybrid_override_pattern="M*M"), tconfig(), 1)
    with pytest.raises(ValueError, match="--mamba-head-dim"):
        validate_mamba(mconfig(mamba_head_dim=48), tconfig(), 1)  # 64 % 48
    with pytest.raises(ValueError, match="--tensor-model-parallel-size"):
        validate_mamba(mconfig(mamba_num_groups=2), tconfig(), 4)  # 2 groups over 4 ranks
    with pytest.raises(ValueError, match="layer counts"):
        validate_mamba(mconfig(hybrid_override_pattern="MMMM", hybrid_attention_ratio=0.25), tconfig(), 1)
    assert validate_mamba(mconfig(hybrid_override_pattern="M*M-"), tconfig(), 2) == ["M", "*", "M", "-"]


def test_allocation_spreads_attention_then_mlp():
    assert allocate_hybrid_layers(4) == ["M"] * 4
    assert "".join(allocate_hybrid_layers(10, 0.2)) == "MMM*MM*MMM"
    assert "".join(allocate_hybrid_layers(10, 0.0, 0.5)) == "M-M-M-M-M-"
    assert "".join(allocate_hybrid_layers(56, 0.08, 0.5)) == \
        "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"
    # Python's round: 10 * 0.25 = 2.5 rounds to 2 attention layers.
    assert allocate_hybrid_layers(10, 0.25).count("*") == 2
    pattern = "M*-M*-M*-"
    assert hybrid_layer_types(9, override_pattern=pattern) == list(pattern)


def _megatron_allocation():
    """Megatron-Core's allocation module, loaded on its own (importing megatron.core takes seconds):
    run as a script it defines its logging helper itself."""
    import importlib.util
    import os
    spec = importlib.util.find_spec("megatron")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("megatron-core is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "core", "ssm", "mamba_hybrid_layer_allocation.py")
    if not os.path.isfile(path):
        pytest.skip("megatron-core has no mamba_hybrid_layer_allocation.py")
    module_spec = importlib.util.spec_from_file_location("__main__", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_allocation_equals_megatron_core():
    alloc = _megatron_allocation()
    for layers in (1, 2, 5, 9, 10, 24, 48, 52, 56):
        for attention in (0.0, 0.08, 0.1, 0.25, 0.5, 1.0):
            for mlp in (0.0, 0.1, 0.3, 0.5):
                if attention + mlp <= 1.0:
                    assert allocate_hybrid_layers(layers, attention, mlp) == \
                        alloc.allocate_layers(layers, attention, mlp), (layers, attention, mlp)
    pattern = "MM-*MM-*MM*-MM*-MM*-MM*-M*M-M*M-M*M-M*M-*MM-*MM-"
    assert hybrid_layer_types(48, 0.25, 0.25, pattern) == alloc.allocate_layers(48, 0.25, 0.25, pattern)


# ------------------------------------------------------------------------------- layout
def test_rank_major_layout_gives_each_rank_its_segment_slices():
    segments = [4, 4, 2, 2, 2]
    canonical = torch.arange(14.0)
    rm = to_rank_major(canonical, segments, 2)
    # rank 0: z[0:2] x[0:2] B[0:1] C[0:1] dt[0:1]; rank 1 the other halves
    assert rm.tolist() == [0, 1, 4, 5, 8, 10, 12, 2, 3, 6, 7, 9, 11, 13]
    assert torch.equal(from_rank_major(rm, segments, 2), canonical)
    assert torch.equal(rank_major_order(segments, 1), torch.arange(14))
    assert in_proj_segments(64, 2, 8, 8) == [64, 64, 16, 16, 8]
    assert conv_segments(64, 2, 8) == [64, 16, 16]


# ------------------------------------------------------------------------------- the mixer
def reference_mixer(mixer, hidden):
    """The mixer from its parameters and the reference pieces (tp = 1, [s, b, h])."""
    s, b, _ = hidden.shape
    I, G, N, H, P = mixer.d_inner, mixer.num_groups, mixer.state_dim, mixer.num_heads, mixer.head_dim
    zxbcdt = hidden @ mixer.in_proj.weight.t()
    z, xbc, dt = torch.split(zxbcdt, [I, I + 2 * G * N, H], dim=-1)
    xbc = reference_causal_conv1d(xbc.transpose(0, 1), mixer.conv1d.weight[:, 0], mixer.conv1d.bias)  # [b, s, .]
    x, B, C = torch.split(xbc, [I, G * N, G * N], dim=-1)
    dt = F.softplus(dt + mixer.dt_bias).transpose(0, 1)
    y, _ = reference_ssd_scan(x.reshape(b, s, H, P), dt, -torch.exp(mixer.A_log), B.reshape(b, s, G, N),
                              C.reshape(b, s, G, N), mixer.D)
    y = y.reshape(b, s, I).transpose(0, 1)
    y = reference_gated_rmsnorm(y, z, mixer.norm.weight, I // G)
    return y @ mixer.out_proj.weight.t()


def test_gated_norm_normalizes_each_group():
    gen = torch.Generator().manual_seed(0)
    y, z = torch.randn(3, 12, generator=gen), torch.randn(3, 12, generator=gen)
    out = reference_gated_rmsnorm(y, z, torch.ones(12), group_size=4)
    g = (y * F.silu(z)).view(3, 3, 4)
    torch.testing.assert_close(out.view(3, 3, 4).pow(2).mean(-1), g.pow(2).mean(-1) / (g.pow(2).mean(-1) + 1e-5))


def test_mixer_parameters_are_megatrons():
    cfg, mc = tconfig(), mconfig()
    mixer = MambaMixer(cfg, mc, ParallelGroups.single(), layer_number=0)
    H, P, G, N, h = 8, 8, 2, 8, 32  # heads = 2 * 32 / 8
    I = H * P
    shapes = {name: tuple(p.shape) for name, p in mixer.named_parameters()}
    assert shapes == {
        "in_proj.weight": (2 * I + 2 * G * N + H, h),
        "conv1d.weight": (I + 2 * G * N, 1, 4),
        "conv1d.bias": (I + 2 * G * N,),
        "dt_bias": (H,), "A_log": (H,), "D": (H,),
        "norm.weight": (I,),
        "out_proj.weight": (h, I),
    }


def test_mixer_equals_reference_composition():
    cfg, mc = tconfig(), mconfig()
    mixer = MambaMixer(cfg, mc, ParallelGroups.single(), layer_number=0, chunk_size=8)
    from gigatron.core.parallel.init import initialize_parameters
    initialize_parameters(mixer, seed=3)
    # Initialization as Megatron's: A in [-16, -1], softplus(dt_bias) in [1e-3, 0.1], D = 1.
    A = -torch.exp(mixer.A_log)
    assert (A <= -1).all() and (A >= -16).all()
    dt = F.softplus(mixer.dt_bias)
    assert (dt >= 1e-3 - 1e-7).all() and (dt <= 0.1 + 1e-7).all()
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    assert mixer.conv1d.weight.abs().max() <= 0.5
    hidden = torch.randn(21, 2, 32, generator=torch.Generator().manual_seed(1))
    out, bias = mixer(hidden)
    assert bias is None and out.shape == (21, 2, 32)
    torch.testing.assert_close(out, reference_mixer(mixer, hidden), rtol=1e-4, atol=1e-5)


def test_mixer_is_causal():
    mixer = MambaMixer(tconfig(), mconfig(), ParallelGroups.single(), layer_number=0, chunk_size=8)
    from gigatron.core.parallel.init import initialize_parameters
    initialize_parameters(mixer, seed=3)
    hidden = torch.randn(20, 1, 32)
    changed = hidden.clone()
    changed[12:] += 1.0
    torch.testing.assert_close(mixer(hidden)[0][:12], mixer(changed)[0][:12])


# ------------------------------------------------------------------------------- the hybrid model
def test_model_parameter_names_follow_megatron():
    model = MambaModel(tconfig(), mconfig(hybrid_override_pattern="M*M-"), ParallelGroups.single(), VOCAB)
    names = {n for n, _ in model.named_parameters()}
    assert model.layer_types == ["M", "*", "M", "-"]
    assert isinstance(model.decoder.layers[0], MambaLayer) and isinstance(model.decoder.layers[1], AttentionLayer)
    assert isinstance(model.decoder.layers[3], MLPLayer)
    mamba = {f"decoder.layers.0.{n}" for n in ("norm.weight", "mixer.in_proj.weight", "mixer.conv1d.weight",
                                                "mixer.conv1d.bias", "mixer.A_log", "mixer.D", "mixer.dt_bias",
                                                "mixer.norm.weight", "mixer.out_proj.weight")}
    attention = {f"decoder.layers.1.{n}" for n in ("input_layernorm.weight", "self_attention.linear_qkv.weight",
                                                    "self_attention.linear_proj.weight")}
    mlp = {f"decoder.layers.3.{n}" for n in ("pre_mlp_layernorm.weight", "mlp.linear_fc1.weight",
                                              "mlp.linear_fc2.weight")}
    assert mamba <= names and attention <= names and mlp <= names
    assert {"embedding.word_embeddings.weight", "decoder.final_norm.weight"} <= names
    assert not any(n.startswith("decoder.layers.1.mlp") or n.startswith("decoder.layers.3.self_attention")
                   for n in names)


def test_hybrid_init_scales_the_output_projections():
    cfg = tconfig(num_layers=8, hidden_size=64, init_method_std=0.02)
    pattern = "M*M-M*M-"
    plain = MambaModel(cfg, mconfig(hybrid_override_pattern=pattern), ParallelGroups.single(), VOCAB)
    hybrid = MambaModel(cfg, mconfig(hybrid_override_pattern=pattern, is_hybrid_model=True),
                        ParallelGroups.single(), VOCAB)
    for name in ("decoder.layers.0.mixer.out_proj.weight", "decoder.layers.1.self_attention.linear_proj.weight",
                 "decoder.layers.3.mlp.linear_fc2.weight"):
        std_plain = dict(plain.named_parameters())[name].std().item()
        std_hybrid = dict(hybrid.named_parameters())[name].std().item()
        assert std_plain == pytest.approx(0.02 / math.sqrt(16), rel=0.15), name
        assert std_hybrid == pytest.approx(0.02 / math.sqrt(8), rel=0.15), name


def reference_model_loss(model, ids, labels):
    """Embedding, then each layer from the reference pieces (Mamba) or its own modules (attention,
    MLP), the final norm, the tied output layer and cross entropy."""
    h = F.embedding(ids, model.embedding.word_embeddings.weight).transpose(0, 1)  # [s, b, h]
    for symbol, layer in zip(model.layer_types, model.decoder.layers):
        if symbol == "M":
            h = h + reference_mixer(layer.mixer, layer.norm(h))
        elif symbol == "*":
            out, _ = layer.self_attention(layer.input_layernorm(h))
            h = h + out
        else:
            out, _ = layer.mlp(layer.pre_mlp_layernorm(h))
            h = h + out
    h = model.decoder.final_norm(h)
    logits = h @ model.embedding.word_embeddings.weight.t()  # [s, b, V]
    return F.cross_entropy(logits.flatten(0, 1), labels.t().flatten(), reduction="none").view(ids.shape[1], -1).t()


def batch(seed=0, b=2, s=24):
    tokens = torch.randint(0, VOCAB, (b, s + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def test_model_forward_equals_reference_composition():
    model = MambaModel(tconfig(), mconfig(hybrid_override_pattern="M*M-"), ParallelGroups.single(), VOCAB, seed=7)
    for layer in model.decoder.layers:
        if hasattr(layer, "mixer"):
            layer.mixer.chunk_size = 8  # 24 tokens: three chunks
    ids, labels = batch()
    loss = model(ids, labels=labels)
    assert loss.shape == (2, 24) and loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference_model_loss(model, ids, labels), rtol=1e-4, atol=1e-5)
    logits = model(ids)
    assert logits.shape == (24, 2, VOCAB)


def test_pipeline_stages_compose_to_the_whole_model():
    cfg1 = tconfig(num_layers=4)
    mc = mconfig(hybrid_override_pattern="M*-M")
    whole = MambaModel(cfg1, mc, ParallelGroups.single(), VOCAB, seed=11)
    ids, labels = batch(1)
    want = whole(ids, labels=labels)
    cfg2 = dataclasses.replace(cfg1, pipeline_model_parallel_size=2)
    stages = []
    for rank in range(2):
        groups = dataclasses.replace(ParallelGroups.single(), pp=Group(None, size=2, rank=rank, ranks=[0, 1]))
        stages.append(MambaModel(cfg2, mc, groups, VOCAB, pre_process=rank == 0, post_process=rank == 1, seed=11))
    assert stages[0].decoder.local_layer_types == ["M", "*"] and stages[1].decoder.local_layer_types == ["-", "M"]
    assert stages[1].decoder.layer_offset == 2
    hidden = stages[0](ids)
    stages[1].set_input_tensor(hidden)
    # The last stage holds its own copy of the tied output weight, seeded like the word embedding.
    torch.testing.assert_close(stages[1](None, labels=labels), want, rtol=1e-5, atol=1e-6)
    whole_params = dict(whole.named_parameters())
    for name, p in stages[1].named_parameters():
        if name.startswith("decoder.layers."):
            i = int(name.split(".")[2])
            name = name.replace(f"decoder.layers.{i}.", f"decoder.layers.{i + 2}.")
        elif name == "output_layer.weight":
            name = "embedding.word_embeddings.weight"
        assert torch.equal(p, whole_params[name]), name


def test_unsupported_layouts_are_refused():
    with pytest.raises(ValueError, match="virtual-pipeline"):
        cfg = tconfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2, num_layers=4)
        groups = dataclasses.replace(ParallelGroups.single(vp_size=2), pp=Group(None, size=2, rank=0, ranks=[0, 1]))
        MambaModel(cfg, mconfig(), groups, VOCAB)
    with pytest.raises(ValueError, match="context parallelism"):
        groups = dataclasses.replace(ParallelGroups.single(), cp=Group(None, size=2, rank=0, ranks=[0, 1]))
        MambaModel(tconfig(), mconfig(), groups, VOCAB)
    with pytest.raises(ValueError, match="--num-experts"):
        MambaModel(tconfig(), mconfig(hybrid_override_pattern="MEM-"), ParallelGroups.single(), VOCAB)


def test_moe_layers_of_the_pattern():
    """`E` layers hold an MoE layer (router and experts) under `mlp`, after `pre_mlp_layernorm`."""
    from gigatron.core.transformer.moe.config import MoEConfig
    from gigatron.core.transformer.moe.moe_layer import MoELayer
    moe = MoEConfig(num_experts=4, moe_router_topk=2)
    model = MambaModel(tconfig(), mconfig(hybrid_override_pattern="ME*E"), ParallelGroups.single(), VOCAB,
                       moe_config=moe)
    assert isinstance(model.decoder.layers[1].mlp, MoELayer) and isinstance(model.decoder.layers[3].mlp, MoELayer)
    names = {n for n, _ in model.named_parameters()}
    assert {"decoder.layers.1.pre_mlp_layernorm.weight", "decoder.layers.1.mlp.router.weight"} <= names
    ids, labels = batch(4)
    loss = model(ids, labels=labels).mean()
    loss.backward()
    assert torch.isfinite(loss) and model.decoder.layers[3].mlp.router.weight.grad is not None


def train_losses(model, steps=8, lr=3e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ids, labels = batch(2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(ids, labels=labels).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_tiny_hybrid_model_trains():
    model = MambaModel(tconfig(), mconfig(hybrid_override_pattern="M*M-", is_hybrid_model=True),
                       ParallelGroups.single(), VOCAB, seed=5)
    losses = train_losses(model)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.3, losses
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_full_recompute_keeps_loss_and_gradients():
    def run(**kw):
        model = MambaModel(tconfig(**kw), mconfig(hybrid_override_pattern="M*M-"), ParallelGroups.single(),
                           VOCAB, seed=9)
        ids, labels = batch(3)
        loss = model(ids, labels=labels).mean()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss, grads = run()
    for method in ("uniform", "block"):
        loss2, grads2 = run(recompute_granularity="full", recompute_method=method, recompute_num_layers=2)
        torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
        for name in grads:
            torch.testing.assert_close(grads2[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.gpu
def test_mixer_on_gpu_equals_cpu_chunked_path():
    """The mixer with the Triton conv and scan (bf16 and fp32) against the same mixer on the CPU."""
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        cfg = tconfig(params_dtype=dtype, use_cpu_initialization=True)
        mixer = MambaMixer(cfg, mconfig(mamba_head_dim=16, mamba_state_dim=16), ParallelGroups.single(), 0,
                           chunk_size=16)
        from gigatron.core.parallel.init import initialize_parameters
        initialize_parameters(mixer, seed=4)
        hidden = torch.randn(50, 2, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
        grad = torch.randn(50, 2, 32, generator=torch.Generator().manual_seed(3)).to(dtype)
        results = []
        for device in ("cpu", "cuda"):
            m = mixer.to(device)
            m.zero_grad()
            h = hidden.detach().to(device).requires_grad_()
            out, _ = m(h)
            (out.float() * grad.to(device).float()).sum().backward()
            results.append([out.detach().cpu(), h.grad.cpu()] + [p.grad.detach().cpu() for p in m.parameters()])
        for a, b in zip(results[1], results[0]):
            scale = b.float().abs().max().clamp(min=1e-3)
            assert ((a.float() - b.float()).abs().max() / scale) <= tol


def test_hybrid_model_trains_with_the_product_stack():
    """The data-parallel wrapper, the bf16 mixed-precision optimizer and the schedule of one process
    (what pretrain_gpt.py runs) train a hybrid model: the loss of a repeated batch falls."""
    from functools import partial

    from gigatron.core.distributed import DDPConfig, DistributedDataParallel, finalize_model_grads
    from gigatron.core.optim import OptimizerConfig, get_optimizer
    from gigatron.core.pipeline import get_forward_backward_func

    groups = ParallelGroups.single()
    cfg = tconfig(bf16=True)
    model = DistributedDataParallel(
        DDPConfig(), MambaModel(cfg, mconfig(hybrid_override_pattern="M*M-", is_hybrid_model=True), groups, VOCAB,
                                seed=3), groups)
    optimizer = get_optimizer(OptimizerConfig(lr=3e-3, bf16=True, clip_grad=1.0), [model], groups)
    ids, labels = batch(5)

    def forward_step(data_iterator, model):
        tokens, targets = next(data_iterator)
        per_token = model(tokens, labels=targets)  # [b, s]

        def loss_func(out):
            loss = out.float().mean()
            return loss, {"lm loss": torch.stack([out.float().sum().detach(), torch.tensor(float(out.numel()))])}
        return per_token, partial(loss_func)

    forward_backward = get_forward_backward_func(1, None)
    losses = []
    for _ in range(6):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        logged = forward_backward(
            forward_step_func=forward_step, data_iterator=iter([(ids, labels)] * 2), model=[model],
            num_microbatches=2, seq_length=24, micro_batch_size=2, groups=groups, config=cfg,
            grad_scale_func=optimizer.scale_loss,
            finalize_model_grads_func=lambda chunks: finalize_model_grads(chunks, groups, cfg))
        ok, grad_norm, _ = optimizer.step()
        assert ok and math.isfinite(grad_norm)
        total = torch.stack([d["lm loss"] for d in logged]).sum(0)
        losses.append(float(total[0] / total[1]))
    assert losses[-1] < losses[0] - 0.2, losses
