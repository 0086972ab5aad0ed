"""Checks of the Triton kernels of gigatron/core/ops/fused_{norm,activation} on the CPU through the
Triton interpreter. Run by tests/unit/test_fused_kernels.py in a child process with
TRITON_INTERPRET=1 (it must be set before the kernels are defined):

    TRITON_INTERPRET=1 python tests/unit/_fused_interpret.py norm activation layer

Each check compares the kernel with its plain-PyTorch reference (outputs and every gradient) at
small sizes in fp32 and raises AssertionError on a mismatch.
"""

import os
import sys

import torch
from torch.testing import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

TOL = dict(rtol=1e-5, atol=1e-5)


def _grads(fn, inputs, seed=1):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    present = [t for t in leaves if t is not None]
    return list(outs) + list(torch.autograd.grad(loss, present))


def check_norm():
    from gigatron.core.ops.fused_norm import fused_add_norm, reference_add_norm

    gen = torch.Generator().manual_seed(0)
    # 11 rows: the backward's last program gets a partial block of rows; N=40 is not a power of 2.
    for rms in (False, True):
        for zero_centered in (False, True):
            for with_residual in (True, False):
                x = torch.randn(11, 40, generator=gen)
                residual = torch.randn(11, 40, generator=gen) if with_residual else None
                add_bias = torch.randn(40, generator=gen) if with_residual else None
                weight = torch.randn(40, generator=gen)
                bias = None if rms else torch.randn(40, generator=gen)
                inputs = [x, residual, add_bias, weight, bias]

                def run(kernel):
                    def fn(x, r, ab, w, b):
                        y, new = kernel(x, r, ab, w, b, 1e-5, rms, zero_centered)
                        return (y, new) if with_residual else y
                    return fn
                for got, want in zip(_grads(run(fused_add_norm), inputs), _grads(run(reference_add_norm), inputs)):
                    assert_close(got, want, **TOL)
    print("norm ok")


def check_activation():
    from gigatron.core.ops.fused_activation import fused_bias_activation, reference_bias_activation

    gen = torch.Generator().manual_seed(0)
    for kind in ("gelu", "gelu_tanh", "swiglu"):
        for with_bias in (True, False):
            width = 2 * 1100 if kind == "swiglu" else 1100  # > one column block
            x = torch.randn(3, 5, width, generator=gen)
            bias = torch.randn(width, generator=gen) if with_bias else None
            got = _grads(lambda x, b: fused_bias_activation(x, b, kind), [x, bias])
            want = _grads(lambda x, b: reference_bias_activation(x, b, kind), [x, bias])
            for g, w in zip(got, want):
                assert_close(g, w, **TOL)
    print("activation ok")


def check_layer():
    """A TransformerLayer with the fused add+norm and the fused bias-activation switched on for
    CPU tensors (the interpreter) against the same layer unfused: output and every gradient."""
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.core.transformer import mlp as mlp_module
    from gigatron.core.transformer import norm as norm_module
    from gigatron.core.transformer.config import TransformerConfig
    from gigatron.core.transformer.layer import TransformerLayer

    for normalization, swiglu in (("LayerNorm", False), ("RMSNorm", True)):
        config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=8,
                                   max_position_embeddings=8, hidden_dropout=0.0, attention_dropout=0.0,
                                   normalization=normalization, swiglu=swiglu, ffn_hidden_size=48,
                                   use_cpu_initialization=True)
        torch.manual_seed(0)
        layer = TransformerLayer(config, ParallelGroups.single(), 0)
        with torch.no_grad():
            for param in layer.parameters():
                param.copy_(torch.randn(param.shape) * 0.2 + (1.0 if param.dim() == 1 else 0.0))
        x = torch.randn(8, 2, 32)
        params = list(layer.parameters())

        def run():
            leaf = x.clone().requires_grad_()
            out = layer(leaf)
            loss = (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum()
            return [out] + list(torch.autograd.grad(loss, [leaf] + params))

        plain = run()
        saved = (norm_module.fused_norm_available, mlp_module.fused_activation_available)
        norm_module.fused_norm_available = lambda t: True
        mlp_module.fused_activation_available = lambda t: True
        layer.mlp.fused_kind = "swiglu" if swiglu else "gelu"
        layer.mlp.linear_fc1.skip_bias_add = True
        for norm in (layer.input_layernorm, layer.pre_mlp_layernorm):
            norm.persist = True
        try:
            assert layer._fuse_add_and_norm(x)
            fused = run()
        finally:
            norm_module.fused_norm_available, mlp_module.fused_activation_available = saved
        for g, w in zip(fused, plain):
            assert_close(g, w, rtol=1e-4, atol=1e-4)
    print("layer ok")


CHECKS = {"norm": check_norm, "activation": check_activation, "layer": check_layer}

if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the Triton interpreter runs the kernels on the CPU)")
    torch.set_num_threads(1)
    for name in sys.argv[1:] or list(CHECKS):
        CHECKS[name]()
