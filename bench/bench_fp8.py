"""FP8 against bf16 on the linear layers of Llama-3-8B-shaped transformer layers (forward + backward).

Each layer holds Llama-3 8B's four linear layers at tensor-parallel size 1:
    linear_qkv   [6144, 4096]   (32 query heads + 2 x 8 key/value groups, head dim 128)
    linear_proj  [4096, 4096]
    linear_fc1   [28672, 4096]  (SwiGLU: gate and up, FFN 14336)
    linear_fc2   [4096, 14336]
on T = seq_length x micro_batch_size tokens ([s, b, h] activations, 4096 x b by default). A step
runs every layer's QKV and fc1 on the layer input, proj on a stand-in attention output, SwiGLU,
fc2, and the backward of all of them into fp32 main_grad buffers, as training does: bf16 returns
bf16 weight gradients that a post-accumulate hook adds into main_grad (our DDP's path); FP8 adds
its fp32 weight gradient into main_grad itself. The delayed recipe also updates its scales after
each step. Attention itself, norms and the optimizer are not timed.

FLOPs: 3 GEMMs (forward, dgrad, wgrad) x 2 x T x N x K per linear, summed; TFLOP/s is shown
against the detected card's dense bf16 and FP8 peaks (gigatron.core.flops.PEAK_TFLOPS).
The first step's outputs are compared with bf16 (relative Frobenius error of the layer outputs).

    python bench/bench_fp8.py                                  # GPU: bf16 and each recipe, eager and compiled
    python bench/bench_fp8.py --modes compiled --json fp8.json # each layer's step under torch.compile only
    python bench/bench_fp8.py --micro-batch-size 2 --layers 4 --format e4m3
    python bench/bench_fp8.py --cpu-smoke                      # tiny shapes on the CPU (checks the script)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gigatron.core.checkpoint.io import atomic_write_text  # noqa: E402
from gigatron.core.flops import device_peak_flops  # noqa: E402
from gigatron.core.fp8 import (  # noqa: E402
    FP8Config,
    FP8LinearState,
    FP8Recipe,
    check_fp8_device,
    fp8_linear,
    update_fp8_states,
)

RECIPES = ("tensorwise", "delayed", "blockwise")


def layer_shapes(hidden: int, ffn: int, heads: int, kv_groups: int) -> dict[str, tuple[int, int]]:
    """Weight shapes [out, in] of one layer's linears."""
    head_dim = hidden // heads
    return {
        "linear_qkv": (hidden + 2 * kv_groups * head_dim, hidden),
        "linear_proj": (hidden, hidden),
        "linear_fc1": (2 * ffn, hidden),
        "linear_fc2": (hidden, ffn),
    }


class Layer:
    """The four linear weights of one layer (bf16, with fp32 main_grad) and their FP8 states."""

    def __init__(self, shapes, device, dtype, config: FP8Config | None, gen):
        self.weights = {}
        self.states = {}
        for name, (n, k) in shapes.items():
            w = torch.nn.Parameter((torch.randn(n, k, generator=gen) / k ** 0.5).to(device, dtype))
            w.main_grad = torch.zeros(n, k, dtype=torch.float32, device=device)
            w.register_post_accumulate_grad_hook(_move_grad_to_main_grad)
            self.weights[name] = w
            if config is not None and config.fp8_recipe == "delayed":
                self.states[name] = FP8LinearState.from_config(config, device)


def _move_grad_to_main_grad(param):
    """What our DDP's hook does for a layer that returns a weight gradient."""
    if param.grad is not None:
        param.main_grad.add_(param.grad)
        param.grad = None


NAMES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def layer_step(x, attn, weights, states, recipe: FP8Recipe | None):
    """(x [s, b, h], attn [s, b, h]) -> (qkv, proj, out): one layer's linears. The weights and
    states are arguments, so that one compiled graph serves every layer."""

    def linear(t, i):
        if recipe is None:
            return F.linear(t, weights[i])
        return fp8_linear(t, weights[i], None, recipe, states[i])

    qkv = linear(x, 0)  # [s, b, qkv]
    proj = linear(attn, 1)  # [s, b, h]
    gate, up = linear(x, 2).chunk(2, dim=-1)  # [s, b, ffn] each
    out = linear(F.silu(gate) * up, 3)  # [s, b, h]
    return qkv, proj, out


def gemm_flops(shapes, tokens: int, num_layers: int) -> float:
    return num_layers * sum(3 * 2 * tokens * n * k for n, k in shapes.values())


def run_variant(name, args, shapes, device, inputs, grads, compiled: bool):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = None if name == "bf16" else FP8Config(fp8=args.format, fp8_recipe=name,
                                                   fp8_amax_history_len=args.amax_history_len if name == "delayed" else 1,
                                                   fp8_amax_compute_algo="max" if name == "delayed" else "most_recent")
    if config is not None:
        check_fp8_device(config, device)
    recipe = None if config is None else FP8Recipe.for_device(config, device)
    gen = torch.Generator().manual_seed(1234)
    layers = [Layer(shapes, device, dtype, config, gen) for _ in range(args.layers)]
    step = layer_step
    if compiled:
        torch._dynamo.reset()  # a fresh cache for each variant
        step = torch.compile(layer_step)
    per_layer = [(tuple(layer.weights[n] for n in NAMES), tuple(layer.states.get(n) for n in NAMES))
                 for layer in layers]
    states = [s for layer in layers for s in layer.states.values()]
    x, attn = inputs

    def iteration():
        outputs = []
        for weights, layer_states in per_layer:
            outputs.extend(step(x, attn, weights, layer_states, recipe))
        torch.autograd.backward(outputs, grads * len(per_layer))
        if states:
            update_fp8_states(states)
        return outputs

    first = [o.detach() for o in iteration()[:3]]
    for _ in range(args.warmup):
        iteration()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.iters):
            iteration()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / args.iters
    else:
        t0 = time.perf_counter()
        for _ in range(args.iters):
            iteration()
        ms = (time.perf_counter() - t0) * 1000 / args.iters
    backend = "" if recipe is None or recipe.kind != "blockwise" else recipe.blockwise_backend
    del layers, per_layer
    return ms, first, backend


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batch-size", type=int, default=1, help="b: tokens per step = seq_length x b")
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2, help="layers in the stack")
    parser.add_argument("--hidden-size", type=int, default=4096)
    parser.add_argument("--ffn-hidden-size", type=int, default=14336)
    parser.add_argument("--num-attention-heads", type=int, default=32)
    parser.add_argument("--num-query-groups", type=int, default=8)
    parser.add_argument("--format", choices=("e4m3", "hybrid"), default="hybrid", help="--fp8-format")
    parser.add_argument("--amax-history-len", type=int, default=1024, help="delayed recipe's history")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated FP8 recipes to time")
    parser.add_argument("--modes", default=None,
                        help="comma-separated: eager, compiled (torch.compile of each layer's step); each mode "
                             "has its own bf16 baseline. Default: eager,compiled (--cpu-smoke: eager)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", default=None, help="also write the rows here (atomically)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on the CPU in fp32, 1 timed step (checks the script, times nothing useful)")
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        device = torch.device("cpu")
        args.seq_length, args.micro_batch_size, args.layers = 32, 2, 2
        args.hidden_size, args.ffn_hidden_size, args.num_attention_heads, args.num_query_groups = 128, 256, 2, 1
        args.warmup, args.iters, args.amax_history_len = 0, 1, 4
        if args.modes is None:
            args.modes = "eager"  # compiling on the CPU takes minutes
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA device (or --cpu-smoke)")
        device = torch.device("cuda")
    modes = [m for m in (args.modes or "eager,compiled").split(",") if m]
    for m in modes:
        if m not in ("eager", "compiled"):
            parser.error(f"--modes: {m!r} is not one of eager, compiled")
    recipes = [r for r in args.recipes.split(",") if r]
    for r in recipes:
        if r not in RECIPES:
            parser.error(f"--recipes: {r!r} is not one of {', '.join(RECIPES)}")

    shapes = layer_shapes(args.hidden_size, args.ffn_hidden_size, args.num_attention_heads, args.num_query_groups)
    tokens = args.seq_length * args.micro_batch_size
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    shape = (args.seq_length, args.micro_batch_size, args.hidden_size)  # [s, b, h]
    inputs = tuple(torch.randn(*shape, generator=gen).to(device, dtype) for _ in range(2))
    grads = [torch.randn(args.seq_length, args.micro_batch_size, n, generator=gen).to(device, dtype) * 1e-3
             for n in (shapes["linear_qkv"][0], args.hidden_size, args.hidden_size)]
    flops = gemm_flops(shapes, tokens, args.layers)

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peaks = {k: device_peak_flops(device, k) for k in ("bf16", "fp8")}
    print(f"device: {card}; torch {torch.__version__}; tokens/step {tokens}; layers {args.layers}; "
          f"--fp8-format {args.format}; modes {', '.join(modes)}")
    for k, p in peaks.items():
        print(f"  {k} peak: {p[1] if p else 'unknown for this device'}")
    print(f"  GEMM FLOPs per step: {flops / 1e12:.3f} TFLOP (3 x 2 x T x N x K per linear)")

    rows = []
    for mode in modes:
        baseline_ms, baseline_out = None, None
        for name in ["bf16"] + recipes:
            ms, outputs, backend = run_variant(name, args, shapes, device, inputs, grads, mode == "compiled")
            if name == "bf16":
                baseline_ms, baseline_out = ms, outputs
            err = max(((o.float() - r.float()).norm() / r.float().norm()).item()
                      for o, r in zip(outputs, baseline_out))
            tflops = flops / (ms * 1e-3) / 1e12
            label = name if name != "bf16" or device.type == "cuda" else "fp32 (CPU baseline)"
            rows.append({
                "mode": mode,
                "variant": label if not backend else f"{label} ({backend})",
                "ms": ms,
                "tflops": tflops,
                "pct_bf16_peak": 100 * tflops / peaks["bf16"][0] if peaks["bf16"] else None,
                "pct_fp8_peak": 100 * tflops / peaks["fp8"][0] if peaks["fp8"] else None,
                "speedup": baseline_ms / ms,
                "rel_err_vs_bf16": err,
                "tokens_per_s": tokens / (ms * 1e-3),
            })
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def pct(v):
        return "   n/a" if v is None else f"{v:5.1f}%"

    print(f"\n{'mode':<9} {'variant':<26} {'ms/step':>9} {'TFLOP/s':>9} {'of bf16 pk':>10} {'of fp8 pk':>10} "
          f"{'speed-up':>9} {'rel err':>8}")
    print("(speed-up: against the bf16 row of the same mode; rel err: layer outputs against bf16)")
    for r in rows:
        print(f"{r['mode']:<9} {r['variant']:<26} {r['ms']:9.2f} {r['tflops']:9.1f} {pct(r['pct_bf16_peak']):>10} "
              f"{pct(r['pct_fp8_peak']):>10} {r['speedup']:8.2f}x {r['rel_err_vs_bf16']:8.4f}")
    if args.json:
        atomic_write_text(args.json, json.dumps({"device": card, "torch": torch.__version__, "tokens": tokens,
                                                 "layers": args.layers, "format": args.format,
                                                 "modes": modes, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
