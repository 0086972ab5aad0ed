"""gigatron.core.memory against what a CPU run really holds.

Activations: the bytes a forward pass keeps for backward, counted with saved_tensors_hooks (each
storage once, parameters excluded), equal the estimator's terms exactly for tiny GPTs in each
recompute mode, with dropout, RoPE/SwiGLU/GQA/RMSNorm, bf16, the fused loss, a pipeline stage, and
tensor + sequence parallelism on two gloo ranks. Model state: parameters, gradient buffers, fp32 main
parameters and Adam states after one step equal state_bytes for dp = 1 and for the distributed
optimizer at dp = 2 (DistributedOptimizer.memory_bytes()). The command-line side: --dry-run prints
the table and exits 0, tools/estimate_memory.py runs for the 1.3B and a 70B configuration, and
--record-memory-history without CUDA stops with a message saying so.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist

from gigatron.core import memory
from gigatron.core.models.gpt import GPTModel
from gigatron.core.parallel.groups import Group, ParallelGroups
from gigatron.core.parallel.random import model_parallel_seed
from gigatron.core.transformer.config import TransformerConfig
from tests.parallel.harness import run_distributed

VOCAB, SEQ, MBS = 96, 40, 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(**kw):
    base = dict(num_layers=3, hidden_size=64, num_attention_heads=4, seq_length=SEQ, attention_dropout=0.0,
                hidden_dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


def saved_activation_bytes(model, run) -> int:
    """Bytes of the distinct storages that `run()` saves for backward, parameters excluded.

    Tensors kept by the layernorm-recompute hooks (which sit inside this counter) are counted too."""
    from gigatron.core.transformer import layer as layer_module

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept, seen = [], {}

    def pack(t):
        kept.append(t)  # keeps every storage alive, so no address is reused while counting
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    original = layer_module._DiscardNormOutput.pack

    def discard_pack(self, t):
        packed = original(self, t)
        if isinstance(packed, torch.Tensor):
            pack(packed)
        return packed

    layer_module._DiscardNormOutput.pack = discard_pack
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run()
    finally:
        layer_module._DiscardNormOutput.pack = original
    del out
    return sum(seen.values())


def _inputs(b=MBS, s=SEQ):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    pos = torch.arange(s)[None].expand(b, s).contiguous()  # the training batch passes position ids
    return ids, pos


def _measure(cfg, groups=None, pre_process=True, post_process=True):
    groups = groups or ParallelGroups.single()
    model_parallel_seed(1, groups)
    model = GPTModel(cfg, groups, VOCAB, pre_process=pre_process, post_process=post_process)
    model.train()
    ids, pos = _inputs()
    if not pre_process:
        hidden = torch.randn(SEQ, MBS, cfg.hidden_size, requires_grad=True)
        model.set_input_tensor(hidden)
    model(ids, pos, labels=ids).sum().backward()  # runs the attention probe outside the counter
    if not pre_process:
        model.set_input_tensor(torch.randn(SEQ, MBS, cfg.hidden_size, requires_grad=True))
    labels = ids if post_process else None
    return saved_activation_bytes(model, lambda: model(ids if pre_process else None, pos, labels=labels))


VARIANTS = {
    "no recompute": {},
    "hidden dropout": dict(hidden_dropout=0.1),
    "rope swiglu gqa rmsnorm": dict(normalization="RMSNorm", position_embedding_type="rope", swiglu=True,
                                    group_query_attention=True, num_query_groups=2),
    "fused loss untied": dict(cross_entropy_loss_fusion=True, untie_embeddings_and_output_weights=True),
    "selective core_attn": dict(recompute_granularity="selective"),
    "selective mlp": dict(recompute_granularity="selective", recompute_modules=["mlp"], hidden_dropout=0.1),
    "selective layernorm": dict(recompute_granularity="selective", recompute_modules=["layernorm"]),
    "selective all": dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp", "layernorm"]),
    "full uniform 1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full uniform 2": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2,
                           position_embedding_type="rope"),
    "full block 2 of 3": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
    "squared relu": dict(squared_relu=True),
    "openai gelu": dict(openai_gelu=True),
    "fp32 residual 1p": dict(fp32_residual_connection=True, apply_layernorm_1p=True),
    "bf16": dict(bf16=True),
    "bf16 rmsnorm 1p": dict(bf16=True, normalization="RMSNorm", apply_layernorm_1p=True),
    "local attention": dict(attention_backend="local"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_activation_bytes_equal_saved_tensors(name):
    cfg = tiny(**VARIANTS[name])
    estimate = memory.stage_activation_bytes(cfg, MBS, SEQ, VOCAB, device_type="cpu")
    assert sum(estimate.values()) == _measure(cfg), estimate


def test_per_layer_bytes_are_what_one_more_layer_adds():
    """layer_activation_bytes is the increment of one layer, for each recompute mode."""
    for extra in ({}, dict(recompute_granularity="selective", recompute_modules=["mlp"])):
        two, three = _measure(tiny(num_layers=2, **extra)), _measure(tiny(num_layers=3, **extra))
        per_layer = memory.layer_activation_bytes(tiny(**extra), MBS, SEQ, device_type="cpu")
        assert three - two == sum(per_layer.values())


@pytest.mark.parametrize("pp_rank", [0, 1])
def test_pipeline_stage_activation_bytes(pp_rank):
    cfg = tiny(num_layers=4, pipeline_model_parallel_size=2, hidden_dropout=0.1)
    single = ParallelGroups.single()
    groups = dataclasses.replace(single, pp=Group(group=None, size=2, rank=pp_rank, ranks=[0, 1]))
    measured = _measure(cfg, groups, pre_process=pp_rank == 0, post_process=pp_rank == 1)
    estimate = memory.stage_activation_bytes(cfg, MBS, SEQ, VOCAB, pp_rank=pp_rank, device_type="cpu")
    assert sum(estimate.values()) == measured, estimate


# ----------------------------------------------------------------------- tensor + sequence parallel


TP_VARIANTS = {
    "sp dropout": dict(sequence_parallel=True, hidden_dropout=0.1),
    "sp fused mlp-recompute": dict(sequence_parallel=True, cross_entropy_loss_fusion=True,
                                   recompute_granularity="selective", recompute_modules=["mlp"]),
    "full distributed": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1,
                             distribute_saved_activations=True),
}


def _tp_worker(rank, world_size):
    from gigatron.core.parallel.config import ParallelConfig

    measured = {}
    for name, kwargs in TP_VARIANTS.items():
        cfg = tiny(tensor_model_parallel_size=world_size, **kwargs)
        groups = ParallelGroups.build(ParallelConfig(tensor_model_parallel_size=world_size,
                                                     sequence_parallel=cfg.sequence_parallel))
        measured[name] = _measure(cfg, groups)
    return measured


def test_tensor_parallel_activation_bytes():
    """tp = 2 on two gloo ranks: sequence parallelism (norms, dropout and residuals on s/tp), the
    sharded attention and MLP, and --distribute-saved-activations."""
    results = run_distributed(_tp_worker, 2, timeout=180)
    for name, kwargs in TP_VARIANTS.items():
        cfg = tiny(tensor_model_parallel_size=2, **kwargs)
        estimate = sum(memory.stage_activation_bytes(cfg, MBS, SEQ, VOCAB, device_type="cpu").values())
        assert [r[name] for r in results] == [estimate, estimate], name


# ----------------------------------------------------------------------- schedules


def test_microbatches_in_flight_follow_the_plans():
    from gigatron.core.pipeline.schedules import build_1f1b_plan, build_interleaved_plan

    for pp in (2, 4):
        for rank in range(pp):
            for m in (1, 3, 8):
                assert memory.microbatches_in_flight(rank, pp, m) == min(pp - rank, m)
                assert build_1f1b_plan(rank, pp, m).max_in_flight() == min(pp - rank, m)
            # interleaved: warm-up (pp - rank - 1) * 2 + (V - 1) * pp forwards, then one more
            assert memory.microbatches_in_flight(rank, pp, 8, vp_size=2) == \
                build_interleaved_plan(rank, pp, 2, 8).max_in_flight() == min((pp - rank - 1) * 2 + pp + 1, 16)
    assert memory.microbatches_in_flight(0, 1, 8) == 1


# ----------------------------------------------------------------------- model state


def _state_of(cfg, ddp_kwargs, groups, dist_opt):
    from gigatron.core.distributed import DDPConfig, DistributedDataParallel
    from gigatron.core.optim import OptimizerConfig, get_optimizer

    model_parallel_seed(1, groups)
    model = GPTModel(cfg, groups, VOCAB)
    ddp_config = DDPConfig(use_distributed_optimizer=dist_opt, **ddp_kwargs)
    ddp = DistributedDataParallel(ddp_config, model, groups)
    opt_config = OptimizerConfig(lr=1e-3, bf16=cfg.bf16, params_dtype=cfg.params_dtype,
                                 use_distributed_optimizer=dist_opt)
    optimizer = get_optimizer(opt_config, [ddp], groups)
    ids, pos = _inputs()
    ddp(ids, pos, labels=ids).mean().backward()
    ddp.finish_grad_sync()
    optimizer.step()
    return ddp_config, opt_config, ddp, optimizer


def _state_counted(ddp, optimizer):
    """Count the tensors a non-distributed run holds."""
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.grad_buffers)
    params = sum(p.numel() * p.element_size() for p in ddp.module.parameters())
    mains = sum(e.main_param.numel() * e.main_param.element_size() for e in optimizer.entries
                if e.main_param.data_ptr() != e.model_param.data_ptr())
    states = sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
                 if torch.is_tensor(v) and v.dim() > 0)
    return {"params": params, "grads": grads, "main_params": mains, "optimizer_states": states}


@pytest.mark.parametrize("kwargs", [dict(bf16=True), dict(), dict(bf16=True, untie_embeddings_and_output_weights=True,
                                                                  swiglu=True, add_bias_linear=False)])
def test_state_bytes_single_rank(kwargs):
    cfg = tiny(**kwargs)
    ddp_config, opt_config, ddp, optimizer = _state_of(cfg, {}, ParallelGroups.single(), False)
    estimate = memory.state_bytes(cfg, ddp_config, opt_config, VOCAB)
    counted = _state_counted(ddp, optimizer)
    assert {k: estimate[k] for k in counted} == counted
    n = estimate["num_parameters"]
    assert n == sum(p.numel() for p in ddp.module.parameters())
    if cfg.bf16:
        assert sum(counted.values()) == 18 * n  # Megatron's table: bf16 params, fp32 grads, Adam


DDP_VARIANTS = {"one bucket": {}, "small buckets": dict(overlap_grad_reduce=True, bucket_size=20000)}


def _dist_opt_worker(rank, world_size):
    from gigatron.core.parallel.config import ParallelConfig

    groups = ParallelGroups.build(ParallelConfig())
    cfg = tiny(bf16=True)
    results = {}
    for name, ddp_kwargs in DDP_VARIANTS.items():
        ddp_config, opt_config, ddp, optimizer = _state_of(cfg, ddp_kwargs, groups, True)
        estimate = memory.state_bytes(cfg, ddp_config, opt_config, VOCAB, dp_size=world_size, dp_rank=rank)
        keys = ("params", "grads", "main_params", "optimizer_states")
        results[name] = (optimizer.memory_bytes(), {k: estimate[k] for k in keys})
    return results


def test_state_bytes_distributed_optimizer_dp2():
    """DistributedOptimizer.memory_bytes() on each of two data-parallel ranks equals state_bytes for
    that rank: padded buffers, the rank's shard of main params and Adam moments (6 + 12/dp)."""
    results = run_distributed(_dist_opt_worker, 2, timeout=180)
    for rank_results in results:
        for name in DDP_VARIANTS:
            measured, estimate = rank_results[name]
            assert measured == estimate, name


# ----------------------------------------------------------------------- command line

ONE3B = ["--num-layers", "24", "--hidden-size", "2048", "--num-attention-heads", "16", "--seq-length", "2048",
         "--max-position-embeddings", "2048", "--micro-batch-size", "4", "--global-batch-size", "32", "--bf16",
         "--vocab-size", "50257", "--attention-dropout", "0", "--hidden-dropout", "0", "--lr", "1e-4",
         "--train-iters", "10", "--mock-data"]
LLAMA70B = ["--num-layers", "80", "--hidden-size", "8192", "--ffn-hidden-size", "28672", "--num-attention-heads",
            "64", "--group-query-attention", "--num-query-groups", "8", "--seq-length", "4096",
            "--max-position-embeddings", "4096", "--position-embedding-type", "rope", "--normalization", "RMSNorm",
            "--swiglu", "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--micro-batch-size", "1",
            "--global-batch-size", "128", "--bf16", "--vocab-size", "128256", "--attention-dropout", "0",
            "--hidden-dropout", "0", "--lr", "1e-4", "--train-iters", "10", "--mock-data",
            "--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size", "4", "--sequence-parallel",
            "--use-distributed-optimizer", "--recompute-granularity", "full", "--recompute-method", "uniform",
            "--recompute-num-layers", "1", "--cross-entropy-loss-fusion"]


def test_estimate_tool_runs_for_1p3b_and_70b(capsys):
    import tools.estimate_memory as tool

    assert tool.main(ONE3B + ["--device-memory-gib", "80"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("pp=")]
    assert rows == [rows[0]] and rows[0][1] == "1315.8M"
    assert "largest micro-batch size that fits in 80 GiB" in " ".join(out.split())
    assert tool.main(LLAMA70B + ["--world-size", "64"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines() if line.startswith("pp=")] == ["pp=0", "pp=1", "pp=2", "pp=3"]
    assert "recompute full (uniform, 1 layers)" in " ".join(out.split())


def _tool_output(capsys, argv):
    import tools.estimate_memory as tool

    assert tool.main(argv) == 0
    return capsys.readouterr().out


MODEL_ONLY = ["--num-layers", "32", "--hidden-size", "4096", "--num-attention-heads", "32", "--seq-length", "4096",
              "--max-position-embeddings", "4096", "--micro-batch-size", "1", "--global-batch-size", "256", "--bf16"]


def test_estimate_tool_needs_only_model_layout_batch_and_precision(capsys):
    out = _tool_output(capsys, MODEL_ONLY)  # no --train-iters, --lr, data source or tokenizer
    text = " ".join(out.split())
    assert "padded vocab 50304" in text and "assumed GPT-2's 50257 ids, padded to 50304" in text
    default_row = [line for line in out.splitlines() if line.startswith("pp=0")]
    out = _tool_output(capsys, MODEL_ONLY + ["--vocab-size", "32000"])  # NullTokenizer: 32001 ids, padded
    assert "padded vocab 32128" in " ".join(out.split()) and "assumed" not in out
    out = _tool_output(capsys, MODEL_ONLY + ["--padded-vocab-size", "50304"])  # as given
    assert "padded vocab 50304" in " ".join(out.split()) and "assumed" not in out
    assert [line for line in out.splitlines() if line.startswith("pp=0")] == default_row
    # training flags, when given, are still checked
    import tools.estimate_memory as tool

    with pytest.raises(ValueError, match="--train-iters and --train-samples are mutually exclusive"):
        tool.main(MODEL_ONLY + ["--train-iters", "10", "--train-samples", "100"])
    # Both, as in training: --padded-vocab-size gives the rows (Megatron's --padded-vocab-size).
    out = _tool_output(capsys, MODEL_ONLY + ["--padded-vocab-size", "50432", "--vocab-size", "50257"])
    assert "padded vocab 50432" in " ".join(out.split())


@pytest.mark.parametrize("overheads", [[], ["--cuda-context-gib", "0.5", "--allocator-overhead-fraction", "0.05"]])
def test_estimate_table_fits_a_terminal_at_pp16(capsys, overheads):
    argv = ["--num-layers", "128", "--hidden-size", "16384", "--num-attention-heads", "128", "--seq-length", "8192",
            "--max-position-embeddings", "8192", "--micro-batch-size", "1", "--global-batch-size", "1024",
            "--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size", "16", "--world-size", "256",
            "--num-layers-per-virtual-pipeline-stage", "2", "--use-distributed-optimizer", "--sequence-parallel",
            "--bf16", "--vocab-size", "128256", "--device-memory-gib", "80", *overheads]
    out = _tool_output(capsys, argv)
    lines = out.splitlines()
    assert [line.split()[0] for line in lines if line.startswith("pp=")] == [f"pp={i}" for i in range(16)]
    assert max(len(line) for line in lines) <= (80 if not overheads else 100), max(lines, key=len)
    if overheads:
        assert "reserve" in lines[3] and "context" in lines[3] and "=total" in lines[3]


def test_estimate_tool_user_errors_are_one_line():
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, os.path.join(root, "tools", "estimate_memory.py"), "--num-layers", "2",
                           "--hidden-size", "64", "--num-attention-heads", "3", "--seq-length", "16",
                           "--max-position-embeddings", "16", "--micro-batch-size", "1"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "num-attention-heads" in done.stderr
    assert "Traceback" not in done.stderr


def test_1p3b_state_is_18_bytes_per_parameter_and_activations_follow_the_layers():
    from gigatron.core.distributed import DDPConfig
    from gigatron.core.optim import OptimizerConfig

    cfg = TransformerConfig(num_layers=24, hidden_size=2048, num_attention_heads=16, seq_length=2048,
                            attention_dropout=0.0, hidden_dropout=0.0, bf16=True)
    opt = OptimizerConfig(lr=1e-4, bf16=True, params_dtype=torch.bfloat16)
    (rank,) = memory.estimate_memory(cfg, DDPConfig(), opt, vocab_size=50304, micro_batch_size=4, seq_length=2048,
                                     num_microbatches=8)
    t = rank.terms
    assert t.state == 18 * t.num_parameters
    # Per layer at b=4, s=2048, h=2048, bf16, flash attention: 16 sbh bf16 values (x, qkv in, mid, fc1 in,
    # qkv out x3, attention out, fc1 out x4, GeLU out x4) + fp32 norm statistics
    # and log-sum-exp.
    s, b, h = 2048, 4, 2048
    per_layer = memory.layer_activation_bytes(cfg, b, s)
    assert sum(per_layer.values()) == 16 * s * b * h * 2 + 4 * s * b * 4 + b * 16 * s * 4
    full = dataclasses.replace(cfg, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    (rank_full,) = memory.estimate_memory(full, DDPConfig(), opt, vocab_size=50304, micro_batch_size=4,
                                          seq_length=2048, num_microbatches=8)
    assert rank_full.terms.activations < t.activations / 5


def test_dry_run_prints_the_estimate_and_exits_zero(capsys):
    from gigatron.training.entry import pretrain_gpt_main

    assert pretrain_gpt_main(ONE3B + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "memory estimate per rank" in out and "=alloc" in out and "optim: optimizer state" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_record_memory_history_without_cuda_fails_clearly(tmp_path):
    from gigatron.training.entry import pretrain_gpt_main

    argv = ["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "16",
            "--micro-batch-size", "1", "--vocab-size", "64", "--mock-data", "--lr", "1e-3", "--train-iters", "1",
            "--record-memory-history", "--memory-snapshot-path", str(tmp_path / "snap.pickle")]
    with pytest.raises(ValueError, match="--record-memory-history needs CUDA"):
        pretrain_gpt_main(argv)
    assert not (tmp_path / "snap.pickle").exists()


def test_largest_micro_batch_is_the_edge_of_fitting():
    from gigatron.core.distributed import DDPConfig
    from gigatron.core.optim import OptimizerConfig

    cfg = TransformerConfig(num_layers=24, hidden_size=2048, num_attention_heads=16, seq_length=2048,
                            attention_dropout=0.0, hidden_dropout=0.0, bf16=True)
    opt = OptimizerConfig(lr=1e-4, bf16=True, params_dtype=torch.bfloat16)
    budget = 40 * memory.GIB
    best = memory.largest_micro_batch(budget, cfg, DDPConfig(), opt, vocab_size=50304, seq_length=2048,
                                      global_batch_size=64)
    assert best is not None

    def total(mbs):
        (rank,) = memory.estimate_memory(cfg, DDPConfig(), opt, vocab_size=50304, micro_batch_size=mbs,
                                         seq_length=2048, num_microbatches=64 // mbs)
        return rank.terms.total

    assert total(best) <= budget < total(best * 2)
    assert memory.largest_micro_batch(memory.GIB, cfg, DDPConfig(), opt, vocab_size=50304, seq_length=2048,
                                      global_batch_size=64) is None


@pytest.mark.gpu
def test_record_memory_history_writes_a_snapshot_and_the_log_has_per_rank_memory(tmp_path, capsys):
    import pickle

    from gigatron.training.entry import pretrain_gpt_main

    snapshot = tmp_path / "snap.pickle"
    argv = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
            "--max-position-embeddings", "64", "--micro-batch-size", "2", "--global-batch-size", "4", "--bf16",
            "--vocab-size", "4096", "--mock-data", "--lr", "1e-3", "--train-iters", "2", "--log-interval", "1",
            "--eval-iters", "0", "--num-workers", "0", "--data-cache-path", str(tmp_path / "cache"),
            "--record-memory-history", "--memory-snapshot-path", str(snapshot)]
    assert pretrain_gpt_main(argv) == 0
    out = capsys.readouterr().out
    assert "[Rank 0] (after 1 iterations) memory (MB) | allocated:" in out and "max reserved:" in out
    with open(snapshot, "rb") as handle:
        data = pickle.load(handle)
    assert data["segments"] and "device_traces" in data
    assert not list(tmp_path.glob("snap.pickle.tmp*"))
