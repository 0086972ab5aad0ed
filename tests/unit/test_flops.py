"""FLOPs counting (Megatron's formula and the paper formula) and the device peak lookup."""

import pytest
import torch

from gigatron.core.flops import device_peak_flops, num_floating_point_operations, paper_flops
from gigatron.core.transformer.config import TransformerConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def gpt_1p3b(**kw):
    return TransformerConfig(num_layers=24, hidden_size=2048, num_attention_heads=16, seq_length=2048, **kw)


def test_megatron_formula_on_1p3b_by_hand():
    cfg = gpt_1p3b()
    B, s, L, h, V = 8, 2048, 24, 2048, 50304
    # Per token and layer, forward multiply-adds: QKV 3h^2, proj h^2, attention s*h (half of 2*s*h),
    # MLP 8h^2; logits h*V. Times 2 (FLOPs per MAC) times 3 (fwd, wgrad, dgrad).
    per_token = L * (4 * h * h + s * h + 8 * h * h) + h * V
    expected = 6 * B * s * per_token
    assert num_floating_point_operations(cfg, V, B, s) == pytest.approx(expected, rel=1e-12)
    # Megatron's own expression (training.py) for the same config.
    megatron = 12 * B * s * L * h * h * ((1 + 1 + s / h / 2) + 4 + V / (2 * L * h))
    assert num_floating_point_operations(cfg, V, B, s) == pytest.approx(megatron, rel=1e-12)
    assert 1.3e14 < expected < 1.5e14  # about 6 * 1.3e9 params * 16k tokens, plus attention


def test_megatron_formula_gqa_and_swiglu():
    cfg = gpt_1p3b(group_query_attention=True, num_query_groups=4, swiglu=True, ffn_hidden_size=5632)
    B, s, L, h, V = 1, 2048, 24, 2048, 32000
    d, nh, ng, f = 128, 16, 4, 5632
    qkv_proj = h * nh * d + 2 * h * ng * d + nh * d * h
    per_token = L * (qkv_proj + s * nh * d + 3 * h * f) + h * V
    assert num_floating_point_operations(cfg, V, B, s) == pytest.approx(6 * B * s * per_token, rel=1e-12)


def test_paper_formula():
    cfg = gpt_1p3b()
    B, s, L, h, V = 8, 2048, 24, 2048, 50304
    assert paper_flops(cfg, V, B, s) == 6 * B * s * (L * (12 * h * h + s * h) + h * V)
    # For a plain GPT (multi-head attention, 4h GeLU MLP) both conventions agree ...
    assert paper_flops(cfg, V, B, s) == pytest.approx(num_floating_point_operations(cfg, V, B, s), rel=1e-12)
    # ... but the paper formula ignores GQA and SwiGLU widths.
    gqa = gpt_1p3b(group_query_attention=True, num_query_groups=2, swiglu=True)
    assert paper_flops(gqa, V, B, s) == paper_flops(cfg, V, B, s)
    assert num_floating_point_operations(gqa, V, B, s) < paper_flops(gqa, V, B, s)


@pytest.mark.parametrize("name, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756.0),
    ("NVIDIA H100 NVL", torch.float16, 835.0),
    ("NVIDIA H200", torch.bfloat16, 989.4),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),
    ("NVIDIA H100 80GB HBM3", torch.float32, 494.7),
])
def test_device_peak_lookup(name, dtype, peak):
    value, description = device_peak_flops(dtype=dtype, device_name=name)
    assert value == peak and name in description


def test_device_peak_cpu_and_unknown():
    assert device_peak_flops("cpu") is None
    assert device_peak_flops(device_name="Some Future GPU") is None
    assert device_peak_flops(dtype=torch.bfloat16, device_name="Tesla V100-SXM2-16GB") is None  # no bf16
