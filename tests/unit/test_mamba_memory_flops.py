"""The memory estimate and the model FLOPs of hybrid Mamba models.

Parameters: stage_parameter_numels with a MambaConfig lists exactly the MambaModel's parameters in
registration order (per tensor-parallel rank: the tp=1 model's tensors divided by their tags).
Activations: each layer kind keeps what the estimate says, counted with saved_tensors_hooks on the
CPU (whose conv1d, chunked scan and gated norm keep only their inputs, as the Triton kernels do).
FLOPs follow the per-kind counts. tools/estimate_memory.py and pretrain_mamba.py --dry-run take
the Mamba flags."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gigatron.core import memory
from gigatron.core.flops import num_floating_point_operations
from gigatron.core.models.mamba import MambaModel
from gigatron.core.parallel import tags
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.parallel.random import model_parallel_seed
from gigatron.core.transformer.config import TransformerConfig
from gigatron.core.transformer.mamba.config import MambaConfig
from tests.unit.test_memory_estimator import saved_activation_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB, SEQ, MBS = 96, 40, 3

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _configs(**kw):
    base = dict(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=SEQ, attention_dropout=0.0,
                hidden_dropout=0.0, normalization="RMSNorm", position_embedding_type="none", add_bias_linear=False,
                swiglu=True, ffn_hidden_size=48)
    base.update(kw)
    mc = MambaConfig(mamba_state_dim=8, mamba_head_dim=8, mamba_num_groups=2, hybrid_override_pattern="M*M-")
    return TransformerConfig(**base), mc


@pytest.mark.parametrize("kw", [{}, {"normalization": "LayerNorm", "add_bias_linear": True},
                                {"untie_embeddings_and_output_weights": True}])
def test_parameter_numels_match_the_model(kw):
    cfg, mc = _configs(**kw)
    model = MambaModel(cfg, mc, ParallelGroups.single(), VOCAB)
    listed = memory.stage_parameter_numels(cfg, VOCAB, mamba_config=mc)
    assert [n for n, _ in listed] == [p.numel() for p in model.parameters()]
    # tp=2: every tensor-parallel parameter holds half of the tp=1 tensor
    cfg2, _ = _configs(tensor_model_parallel_size=2, **kw)
    per_rank = [p.numel() // (2 if tags.is_tensor_parallel(p) else 1) for p in model.parameters()]
    assert [n for n, _ in memory.stage_parameter_numels(cfg2, VOCAB, mamba_config=mc)] == per_rank


def _measure_layers(cfg, mc):
    seq = cfg.seq_length
    groups = ParallelGroups.single()
    model_parallel_seed(1, groups)
    model = MambaModel(cfg, mc, groups, VOCAB).to(cfg.params_dtype)
    model.train()
    out = []
    for layer in model.decoder.layers:
        hidden = torch.randn(seq, MBS, cfg.hidden_size, dtype=cfg.params_dtype, requires_grad=True)
        if not hasattr(layer, "mixer"):
            layer(hidden).sum().backward()  # the attention backend probe runs outside the counter
        out.append(saved_activation_bytes(model, lambda: layer(hidden)))
    return out


@pytest.mark.parametrize("kw", [{}, {"hidden_dropout": 0.1}, {"params_dtype": torch.bfloat16},
                                {"normalization": "LayerNorm"}, {"seq_length": 2 * 128}],
                         ids=["fp32", "dropout", "bf16", "layernorm", "whole-chunks"])
def test_each_layer_kind_keeps_what_the_estimate_says(kw):
    cfg, mc = _configs(**kw)
    measured = _measure_layers(cfg, mc)
    kinds = memory.hybrid_layer_kinds(cfg, mc)
    assert kinds == list("M*M-")
    for kind, got in zip(kinds, measured):
        terms = memory.hybrid_layer_activation_bytes(cfg, mc, kind, MBS, cfg.seq_length, device_type="cpu")
        assert got == sum(terms.values()), (kind, got, terms)
    stage = memory.stage_activation_bytes(cfg, MBS, cfg.seq_length, VOCAB, device_type="cpu", mamba_config=mc)
    assert stage["transformer layers"] == sum(measured)


def test_hybrid_flops_count_each_layer_kind():
    cfg, mc = _configs()
    h, V, b, s = 32, VOCAB, 2, SEQ
    I, GN, H = 64, 16, 8  # 8 heads of 8, 2 groups of state 8
    mamba = 6 * b * s * (h * (2 * I + 2 * GN + H) + I * h) + 21 * b * s * I * 8
    attention = 6 * b * s * (2 * h * 32 * 2 + 32 * s)  # MHA: QKV + proj as 2 h x 32 (1 + 1), core attention
    mlp = 6 * b * s * (2 * h * 48 * 1.5)
    logits = 6 * b * s * h * V
    want = 2 * mamba + attention + mlp + logits
    assert num_floating_point_operations(cfg, V, b, s, mamba_config=mc) == pytest.approx(want, rel=1e-12)
    # a pure Mamba stack of the same depth: only Mamba layers
    pure = MambaConfig(mamba_state_dim=8, mamba_head_dim=8, mamba_num_groups=2)
    assert num_floating_point_operations(cfg, V, b, s, mamba_config=pure) == pytest.approx(4 * mamba + logits)


def _tool(*argv, **env_vars):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **env_vars)
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, env=env)


MAMBA_8B = ["--num-layers", "56", "--hidden-size", "4096", "--num-attention-heads", "32", "--group-query-attention",
            "--num-query-groups", "8", "--hybrid-attention-ratio", "0.08", "--hybrid-mlp-ratio", "0.5",
            "--seq-length", "4096", "--micro-batch-size", "1", "--global-batch-size", "8", "--bf16",
            "--position-embedding-type", "none", "--disable-bias-linear", "--normalization", "RMSNorm",
            "--untie-embeddings-and-output-weights", "--tensor-model-parallel-size", "4", "--sequence-parallel",
            "--padded-vocab-size", "256000"]


def test_estimate_memory_tool_takes_the_mamba_flags():
    spec = ["--spec", "megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec"]
    result = _tool(os.path.join(ROOT, "tools", "estimate_memory.py"), *MAMBA_8B, *spec, "--mamba-state-dim", "128")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "hybrid Mamba pattern M-M-M--M-M*-" in text
    # the 8B hybrid: about 8.7B parameters over 4 tensor-parallel ranks (untied 256k vocabulary)
    cfg_line = next(line for line in result.stdout.splitlines() if line.startswith("pp=0"))
    per_rank = float(cfg_line.split()[1].rstrip("M"))
    assert 2100 < per_rank < 2250
    gpt = _tool(os.path.join(ROOT, "tools", "estimate_memory.py"),
                *[a for a in MAMBA_8B if a not in ("--hybrid-attention-ratio", "--hybrid-mlp-ratio", "0.08", "0.5")])
    assert gpt.returncode == 0 and "hybrid Mamba" not in gpt.stdout


def test_pretrain_mamba_dry_run_estimates_the_hybrid_model():
    result = _tool(os.path.join(ROOT, "pretrain_mamba.py"), *MAMBA_8B[:-2], "--vocab-size", "1000", "--dry-run", "--train-iters", "10", "--lr", "1e-4", "--mock-data",
                   WORLD_SIZE="4", RANK="0")
    assert result.returncode == 0, result.stderr
    assert "hybrid Mamba pattern" in " ".join(result.stdout.split())
