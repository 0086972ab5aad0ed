"""Single-process optimizer tests against plain PyTorch references."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from gigatron.core.distributed import DDPConfig, DistributedDataParallel
from gigatron.core.optim import (
    DistributedOptimizer,
    FP32Optimizer,
    MixedPrecisionOptimizer,
    OptimizerConfig,
    get_optimizer,
)
from gigatron.core.parallel.groups import Group, ParallelGroups
from gigatron.core.parallel.tags import set_tensor_parallel_attributes


class Toy(nn.Module):
    def __init__(self, width=12, depth=3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1, bias=False)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(self.norm(x)).squeeze(-1)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _model(dtype=torch.float32, seed=0, device="cpu"):
    torch.manual_seed(seed)
    return Toy().to(device=device, dtype=dtype)


def _batches(n, dtype=torch.float32, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=g).to(device=device, dtype=dtype), torch.randn(16, generator=g).to(device))
            for _ in range(n)]


def _loss(model, x, y):
    return ((model(x).float() - y) ** 2).mean()


def _reference_adamw(model, cfg):
    decay = [p for n, p in model.named_parameters() if not (n.endswith(".bias") or p.dim() == 1)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith(".bias") or p.dim() == 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def _wrap(model, **ddp):
    return DistributedDataParallel(DDPConfig(**ddp), model, ParallelGroups.single())


def _train(ddp, opt, batches, scale=False):
    norms = []
    for x, y in batches:
        opt.zero_grad()
        loss = _loss(ddp, x, y)
        (opt.scale_loss(loss) if scale else loss).backward()
        ddp.finish_grad_sync()
        ok, norm, _ = opt.step()
        assert ok
        norms.append(norm)
    return norms


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_matches_torch_adamw_with_clipping(device):
    cfg = OptimizerConfig(lr=1e-2, weight_decay=0.1, clip_grad=0.05)
    ref = _model(device=device)
    ddp = _wrap(_model(device=device))
    opt = get_optimizer(cfg, [ddp], ParallelGroups.single())
    assert isinstance(opt, FP32Optimizer)
    assert bool(opt.param_groups[0].get("fused")) == (device == "cuda")
    ref_opt = _reference_adamw(ref, cfg)
    batches = _batches(4, device=device)
    norms = _train(ddp, opt, batches)
    for (x, y), norm in zip(batches, norms):
        ref_opt.zero_grad()
        _loss(ref, x, y).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.clip_grad)
        assert norm == pytest.approx(float(ref_norm), rel=1e-5)
        ref_opt.step()
    for p, q in zip(ddp.module.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_param_groups_skip_weight_decay_on_biases_and_norms():
    ddp = _wrap(_model())
    opt = get_optimizer(OptimizerConfig(lr=1e-3, weight_decay=0.05), [ddp], ParallelGroups.single())
    by_mult = {g["wd_mult"]: g for g in opt.param_groups}
    no_wd_ids = {id(p) for p in by_mult[0.0]["params"]}
    for name, p in ddp.module.named_parameters():
        assert (id(p) in no_wd_ids) == (name.endswith(".bias") or p.dim() == 1), name
    assert by_mult[0.0]["weight_decay"] == 0.0 and by_mult[1.0]["weight_decay"] == 0.05


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_mixed_precision_matches_manual_fp32_master_reference(device):
    cfg = OptimizerConfig(lr=1e-2, weight_decay=0.01, clip_grad=1.0, bf16=True, params_dtype=torch.bfloat16)
    ddp = _wrap(_model(torch.bfloat16, device=device))
    opt = get_optimizer(cfg, [ddp], ParallelGroups.single())
    assert isinstance(opt, MixedPrecisionOptimizer) and opt.grad_scaler is None
    ref = _model(torch.bfloat16, device=device)
    masters = {n: p.detach().float().clone() for n, p in ref.named_parameters()}
    ref_opt = torch.optim.AdamW(
        [{"params": [m for n, m in masters.items() if not (n.endswith(".bias") or m.dim() == 1)], "weight_decay": 0.01},
         {"params": [m for n, m in masters.items() if n.endswith(".bias") or m.dim() == 1], "weight_decay": 0.0}],
        lr=cfg.lr)
    batches = _batches(3, torch.bfloat16, device=device)
    _train(ddp, opt, batches)
    for x, y in batches:
        ref.zero_grad()
        _loss(ref, x, y).backward()
        for n, p in ref.named_parameters():
            masters[n].grad = p.grad.float()
        torch.nn.utils.clip_grad_norm_(list(masters.values()), 1.0)
        ref_opt.step()
        with torch.no_grad():
            for n, p in ref.named_parameters():
                p.copy_(masters[n])
    exact = device == "cpu"  # CUDA: fused AdamW vs the reference's kernels may differ in the last bits
    for (n, p), q in zip(ddp.module.named_parameters(), ref.parameters()):
        assert p.dtype == torch.bfloat16
        if exact:
            torch.testing.assert_close(p, q, rtol=0, atol=0)
        else:
            torch.testing.assert_close(p.float(), q.float(), rtol=2.0**-7, atol=1e-6)
    mains = {e.name: e.main_param for e in opt.entries}
    for n, m in masters.items():
        torch.testing.assert_close(mains[n], m, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_dynamic_scaler_skips_overflow_and_unscales(device):
    cfg = OptimizerConfig(lr=1e-2, fp16=True, params_dtype=torch.float16, initial_loss_scale=2.0**10,
                          hysteresis=1, loss_scale_window=2, clip_grad=0.0)
    ddp = _wrap(_model(torch.float16, device=device))
    opt = get_optimizer(cfg, [ddp], ParallelGroups.single())
    x, y = _batches(1, torch.float16, device=device)[0]
    before = [p.detach().clone() for p in ddp.module.parameters()]
    opt.zero_grad()
    opt.scale_loss(_loss(ddp, x, y)).backward()
    ddp.finish_grad_sync()
    first = next(ddp.module.parameters())
    first.main_grad[0, 0] = float("inf")
    ok, norm, zeros = opt.step()
    assert (ok, norm, zeros) == (False, None, None)
    assert float(opt.get_loss_scale()) == 2.0**9  # backoff after `hysteresis` (1) overflow
    for p, b in zip(ddp.module.parameters(), before):
        assert torch.equal(p, b)
    # a clean step: the unscaled gradient equals the fp32 gradient of the same fp16 model
    opt.zero_grad()
    loss = _loss(ddp, x, y)
    opt.scale_loss(loss).backward()
    ddp.finish_grad_sync()
    ref = copy.deepcopy(ddp.module)
    for p in ref.parameters():
        p.grad = None
    _loss(ref, x, y).backward()
    expected = {n: p.grad.float() for n, p in ref.named_parameters()}
    ok, norm, _ = opt.step()
    assert ok
    # the fp32 grad buffer was unscaled in place: it now holds the true gradient
    for e in opt.entries:
        torch.testing.assert_close(e.model_param.main_grad.float(), expected[e.name], rtol=2e-2, atol=1e-3)
    for _ in range(2):  # two clean steps in a row (window 2) -> growth
        opt.zero_grad()
        opt.scale_loss(_loss(ddp, x, y)).backward()
        ddp.finish_grad_sync()
        opt.step()
    assert float(opt.get_loss_scale()) == 2.0**10


def test_accumulation_with_no_sync_equals_big_batch():
    cfg = OptimizerConfig(lr=1e-2)
    a = _wrap(_model())
    b = _wrap(_model())
    (x, y), = _batches(1)
    with a.no_sync():
        (_loss(a, x[:8], y[:8]) / 2).backward()
    (_loss(a, x[8:], y[8:]) / 2).backward()
    a.finish_grad_sync()
    _loss(b, x, y).backward()
    b.finish_grad_sync()
    for p, q in zip(a.module.parameters(), b.module.parameters()):
        assert p.grad is None
        torch.testing.assert_close(p.main_grad, q.main_grad, rtol=1e-5, atol=1e-7)
    del cfg


def test_bf16_accumulates_micro_batches_in_fp32():
    ddp = _wrap(_model(torch.bfloat16))
    (x, y), = _batches(1, torch.bfloat16)
    grads = []
    for half in (slice(0, 8), slice(8, 16)):
        ref = copy.deepcopy(ddp.module)
        _loss(ref, x[half], y[half]).backward()
        grads.append({n: p.grad.float() for n, p in ref.named_parameters()})
    with ddp.no_sync():
        _loss(ddp, x[:8], y[:8]).backward()
    _loss(ddp, x[8:], y[8:]).backward()
    ddp.finish_grad_sync()
    for n, p in ddp.module.named_parameters():
        assert p.main_grad.dtype == torch.float32
        torch.testing.assert_close(p.main_grad, grads[0][n] + grads[1][n], rtol=0, atol=0)


def test_grad_norm_counts_tensor_parallel_duplicates_once():
    groups = dataclasses.replace(ParallelGroups.single(), tp=Group(group=None, size=2, rank=1, ranks=[0, 1]))
    model = _model()
    for layer in model.layers:  # pretend the linears are tensor-parallel shards
        set_tensor_parallel_attributes(layer.weight, True, 0, 1, rank=1, world_size=2)
    ddp = DistributedDataParallel(DDPConfig(), model, groups)
    opt = get_optimizer(OptimizerConfig(lr=1e-3, clip_grad=0.0, log_num_zeros_in_grad=True), [ddp], groups)
    x, y = _batches(1)[0]
    _loss(ddp, x, y).backward()
    ddp.finish_grad_sync()
    expected = torch.sqrt(sum(layer.weight.main_grad.pow(2).sum() for layer in model.layers))
    ok, norm, zeros = opt.step()
    assert norm == pytest.approx(float(expected), rel=1e-6)
    assert zeros == 0


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_roundtrip_resumes_identically(device):
    for bf16 in (False, True):
        dtype = torch.bfloat16 if bf16 else torch.float32
        cfg = OptimizerConfig(lr=1e-2, bf16=bf16, params_dtype=dtype)
        a = _wrap(_model(dtype, device=device))
        opt_a = get_optimizer(cfg, [a], ParallelGroups.single())
        batches = _batches(5, dtype, device=device)
        _train(a, opt_a, batches[:3])
        sd = copy.deepcopy(opt_a.state_dict())
        full = opt_a.state_dict_for_save()
        model_sd = copy.deepcopy(a.module.state_dict())
        resumed = []
        for state in (sd, full):
            b = _wrap(_model(dtype, seed=5, device=device))
            b.module.load_state_dict(model_sd)
            opt_b = get_optimizer(cfg, [b], ParallelGroups.single())
            opt_b.load_state_dict(state)
            _train(b, opt_b, batches[3:])
            resumed.append([p.detach().clone() for p in b.module.parameters()])
        _train(a, opt_a, batches[3:])
        for params in resumed:
            for p, q in zip(a.module.parameters(), params):
                torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_sgd_and_clear_errors():
    ddp = _wrap(_model())
    opt = get_optimizer(OptimizerConfig(lr=0.1, optimizer="sgd", sgd_momentum=0.5), [ddp], ParallelGroups.single())
    assert isinstance(opt.optimizer, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == 0.5
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        get_optimizer(OptimizerConfig(lr=0.1), [_model()], ParallelGroups.single())
    with pytest.raises(ValueError, match="use-distributed-optimizer"):
        get_optimizer(OptimizerConfig(lr=0.1, use_distributed_optimizer=True), [_wrap(_model())], ParallelGroups.single())
    with pytest.raises(ValueError, match="optimizer"):
        OptimizerConfig(lr=0.1, optimizer="lamb")
    with pytest.raises(ValueError, match="overlap-param-gather"):
        DDPConfig(overlap_param_gather=True)
    dist_ddp = _wrap(_model(), use_distributed_optimizer=True)
    assert isinstance(get_optimizer(OptimizerConfig(lr=0.1, use_distributed_optimizer=True), [dist_ddp],
                                    ParallelGroups.single()), DistributedOptimizer)


@pytest.mark.parametrize("dist_opt", [False, True])
def test_reload_model_params_after_loading_weights(dist_opt):
    cfg = OptimizerConfig(lr=1e-2, bf16=True, use_distributed_optimizer=dist_opt)
    ddp = _wrap(_model(torch.bfloat16), use_distributed_optimizer=dist_opt)
    opt = get_optimizer(cfg, [ddp], ParallelGroups.single())
    new_weights = _model(torch.bfloat16, seed=3).state_dict()
    ddp.module.load_state_dict(new_weights)
    opt.reload_model_params()
    for e in opt.entries:
        expected = new_weights[e.name].float().reshape(-1)[e.start:e.end]
        torch.testing.assert_close(e.main_param.reshape(-1), expected, rtol=0, atol=0)
    # a step with zero gradients and zero lr keeps the loaded weights
    for group in opt.param_groups:
        group["lr"] = 0.0
    opt.zero_grad()
    opt.step()
    for name, p in ddp.module.named_parameters():
        assert torch.equal(p, new_weights[name])


def test_precision_flags_must_match_the_model():
    assert OptimizerConfig(lr=1.0, bf16=True).params_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="params_dtype"):
        OptimizerConfig(lr=1.0, bf16=True, params_dtype=torch.float16)
    with pytest.raises(ValueError, match="same precision"):
        get_optimizer(OptimizerConfig(lr=1.0, fp16=True), [_wrap(_model(torch.bfloat16))], ParallelGroups.single())


def test_grad_norm_counts_tied_embedding_on_first_stage_only():
    from gigatron.core.parallel.tags import mark_shared_embedding

    norms = {}
    for pp_rank in (0, 1):
        groups = dataclasses.replace(ParallelGroups.single(), pp=Group(group=None, size=2, rank=pp_rank, ranks=[0, 1]))
        model = _model()
        mark_shared_embedding(model.head.weight)
        ddp = DistributedDataParallel(DDPConfig(), model, groups)
        opt = get_optimizer(OptimizerConfig(lr=1e-3, clip_grad=0.0), [ddp], groups)
        x, y = _batches(1)[0]
        _loss(ddp, x, y).backward()
        ddp.finish_grad_sync()
        everything = torch.sqrt(sum(p.main_grad.pow(2).sum() for p in model.parameters()))
        without_head = torch.sqrt(sum(p.main_grad.pow(2).sum() for n, p in model.named_parameters() if n != "head.weight"))
        _, norms[pp_rank], _ = opt.step()
        expected = everything if pp_rank == 0 else without_head
        assert norms[pp_rank] == pytest.approx(float(expected), rel=1e-6)


def test_sgd_momentum_survives_full_state_roundtrip():
    cfg = OptimizerConfig(lr=0.1, optimizer="sgd", sgd_momentum=0.9)
    a = _wrap(_model())
    opt_a = get_optimizer(cfg, [a], ParallelGroups.single())
    _train(a, opt_a, _batches(2))
    full = opt_a.state_dict_for_save()
    assert full["optimizer"] == "sgd"
    assert all(rec["momentum_buffer"].abs().sum() > 0 for rec in full["params"].values())
    b = _wrap(_model())
    b.module.load_state_dict(a.module.state_dict())
    opt_b = get_optimizer(cfg, [b], ParallelGroups.single())
    opt_b.load_state_dict(full)
    again = opt_b.state_dict_for_save()
    for name, rec in full["params"].items():
        for key, value in rec.items():
            assert torch.equal(value, again["params"][name][key]), (name, key)
    adam = get_optimizer(OptimizerConfig(lr=0.1), [_wrap(_model())], ParallelGroups.single())
    with pytest.raises(ValueError, match="sgd optimizer state"):
        adam.load_state_dict(full)


def test_clip_grads_helpers_match_torch():
    import math

    from gigatron.core.optim.clip_grads import clip_grads_by_total_norm_fp32, count_zeros_fp32, get_grad_norm_fp32

    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(5, 7, generator=g), torch.randn(11, generator=g).bfloat16().float(), torch.zeros(3)]
    grads[0][0] = 0.0
    params = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
    for p, t in zip(params, grads):
        p.grad = t.clone()
    total = get_grad_norm_fp32(grads)
    assert total == pytest.approx(float(torch.nn.utils.clip_grad_norm_(params, 0.3)), rel=1e-6)
    clip_grads_by_total_norm_fp32(grads, 0.3, total)
    for p, t in zip(params, grads):
        torch.testing.assert_close(t, p.grad)
    assert get_grad_norm_fp32(grads, norm_type=math.inf) == pytest.approx(max(float(t.abs().max()) for t in grads))
    assert count_zeros_fp32(grads) == 7 + 3
    with pytest.raises(ValueError, match="norm type"):
        get_grad_norm_fp32(grads, norm_type=1)


def package_import_cycles(package_dir: str, package: str) -> list:
    """Import cycles among the modules of one package, counting every import statement (those
    inside functions too, which only hide a cycle until the function runs). Each cycle is a list
    of module names."""
    import ast
    import os

    modules = {name[:-3] for name in os.listdir(package_dir) if name.endswith(".py") and name != "__init__.py"}
    edges = {module: set() for module in modules}
    for module in modules:
        path = os.path.join(package_dir, module + ".py")
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), filename=path)):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    targets = [node.module] if node.module else [alias.name for alias in node.names]
                elif node.level == 0 and (node.module or "").startswith(package + "."):
                    targets = [node.module[len(package) + 1:]]
            elif isinstance(node, ast.Import):
                targets = [a.name[len(package) + 1:] for a in node.names if a.name.startswith(package + ".")]
            edges[module].update(t.split(".")[0] for t in targets if t and t.split(".")[0] in modules)
    cycles, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(modules):
        if module not in state:
            visit(module, [module])
    return cycles


def test_optimizer_modules_import_one_way():
    """optimizer.py and distrib_optimizer.py do not import each other in a circle: the factory
    that chooses between them (factory.py) sits above both, and gigatron.core.optim re-exports it."""
    import os

    import gigatron.core.optim as optim
    from gigatron.core.optim.factory import get_optimizer as from_factory

    assert package_import_cycles(os.path.dirname(optim.__file__), "gigatron.core.optim") == []
    assert optim.get_optimizer is from_factory


@pytest.mark.parametrize("dist_opt", [False, True], ids=["plain", "distributed"])
def test_fp32_weights_are_checkpointed_once_and_resume_exactly(tmp_path, dist_opt):
    """With fp32 weights the main params are the model weights: the full optimizer state and the
    torch_dist checkpoint store them once (with the model), bf16 runs keep their fp32 copy, and a
    resume from either continues bit for bit."""
    from torch.distributed.checkpoint import FileSystemReader

    from gigatron.core.checkpoint.dist import load_torch_dist, save_torch_dist

    groups = ParallelGroups.single()
    num_params = sum(p.numel() for p in _model().parameters())
    for bf16 in (False, True):
        dtype = torch.bfloat16 if bf16 else torch.float32
        cfg = OptimizerConfig(lr=1e-2, bf16=bf16, params_dtype=dtype, use_distributed_optimizer=dist_opt)

        def build(seed):
            ddp = _wrap(_model(dtype, seed=seed), use_distributed_optimizer=dist_opt)
            return ddp, get_optimizer(cfg, [ddp], groups)

        a, opt_a = build(0)
        batches = _batches(5, dtype)
        _train(a, opt_a, batches[:3])
        full = opt_a.state_dict_for_save()
        assert all(("param" in record) == bf16 for record in full["params"].values())
        path = str(tmp_path / f"ckpt_bf16_{bf16}")
        save_torch_dist(path, [a], opt_a, {"iteration": 3}, groups)
        metadata = FileSystemReader(path).read_metadata().state_dict_metadata
        main_keys = [k for k in metadata if k.startswith("optimizer.state.fp32_param.")]
        stored_bytes = sum(md.size.numel() * md.properties.dtype.itemsize for md in metadata.values()
                           if hasattr(md, "size"))
        model_bytes = num_params * (2 if bf16 else 4)
        assert len(main_keys) == (len(list(a.module.parameters())) if bf16 else 0)
        # model weights + Adam's two fp32 moments (+ the fp32 main copy with bf16 weights)
        assert stored_bytes == model_bytes + num_params * 4 * (3 if bf16 else 2)

        resumed = []
        for load in ("full", "torch_dist"):
            b, opt_b = build(5)
            if load == "full":
                b.module.load_state_dict(a.module.state_dict())
                opt_b.load_state_dict_from_full(copy.deepcopy(full))
            else:
                load_torch_dist(path, [b], opt_b, groups)
            _train(b, opt_b, batches[3:])
            resumed.append([p.detach().clone() for p in b.module.parameters()])
        _train(a, opt_a, batches[3:])
        for params in resumed:
            for p, q in zip(a.module.parameters(), params):
                torch.testing.assert_close(q, p, rtol=0, atol=0)
