"""Time one MoE layer (router, dispatch, experts, combine; forward + backward) on one GPU, with
the experts as SequentialMLP (a loop) and GroupedMLP (torch._grouped_mm), and the grouped GEMM
alone against its loop reference.

    python bench/bench_moe.py [--hidden 2048] [--moe-ffn 1408] [--experts 64] [--topk 6]
                              [--tokens 8192] [--iters 20] [--cpu-smoke]
                              [--fp8 tensorwise,delayed,blockwise] [--fp8-format hybrid]

Default shape: a DeepSeek-V2-Lite-like layer (h 2048, 64 experts of ffn 1408, top-6, SwiGLU), bf16.
Expert FLOPs counted as 6 * h * ffn * tokens * topk per forward (SwiGLU fc1 of 2*ffn rows plus
fc2), x3 for forward + backward; the router and the shared experts are not counted.
--cpu-smoke runs tiny fp32 shapes on the CPU for a few iterations and checks that both expert
implementations agree (a check that the script runs, not a measurement).
--fp8 RECIPES adds rows for the GroupedMLP layer with its experts' grouped GEMMs in FP8 (each
recipe against the bf16 grouped layer in the same run: time, speed-up, which grouped GEMM path the
recipe probed, output difference); the delayed recipe updates its scales after every step.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gigatron.core.parallel.groups import ParallelGroups  # noqa: E402
from gigatron.core.parallel.init import initialize_parameters  # noqa: E402
from gigatron.core.transformer.config import TransformerConfig  # noqa: E402
from gigatron.core.transformer.moe import MoEConfig, MoELayer  # noqa: E402
from gigatron.core.transformer.moe.aux_losses import MoEAuxLossTracker  # noqa: E402
from gigatron.core.transformer.moe.grouped_gemm import grouped_mm, grouped_mm_supported  # noqa: E402


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, iters, warmup, device):
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def build_layer(args, grouped, dtype, device):
    heads = 16 if args.hidden % 16 == 0 else 1
    config = TransformerConfig(num_layers=1, hidden_size=args.hidden, num_attention_heads=heads,
                               ffn_hidden_size=args.moe_ffn, seq_length=args.tokens, add_bias_linear=False,
                               swiglu=True, bf16=dtype == torch.bfloat16,
                               use_cpu_initialization=device.type == "cpu")
    moe = MoEConfig(num_experts=args.experts, moe_router_topk=args.topk, moe_ffn_hidden_size=args.moe_ffn,
                    moe_grouped_gemm=grouped, moe_aux_loss_coeff=1e-2, moe_token_dispatcher_type="alltoall",
                    moe_router_dtype="fp32")
    layer = MoELayer(config, moe, ParallelGroups.single(), 0, aux_loss_tracker=MoEAuxLossTracker())
    initialize_parameters(layer, 1234, device=device)
    return layer.to(device)


def bench_layer(args, dtype, device):
    torch.manual_seed(0)
    x = torch.randn(args.tokens, 1, args.hidden, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    flops = 3 * 6 * args.hidden * args.moe_ffn * args.tokens * args.topk
    outputs = {}
    for grouped in (False, True):
        layer = build_layer(args, grouped, dtype, device)
        inp = x.clone().requires_grad_(True)

        def step():
            out, _ = layer(inp)
            out.backward(grad)
            return out

        outputs[grouped] = step().detach().float()
        seconds = time_it(step, args.iters, args.warmup, device)
        name = "GroupedMLP" if grouped else "SequentialMLP"
        print(f"MoELayer {name:14s} fwd+bwd {seconds * 1e3:9.3f} ms  "
              f"{args.tokens / seconds:12.0f} tokens/s  {flops / seconds / 1e12:7.2f} expert TFLOP/s")
        del layer
    diff = (outputs[False] - outputs[True]).abs().max().item()
    scale = outputs[False].abs().max().item()
    print(f"max |Sequential - Grouped| = {diff:.3e} (output max {scale:.3e})")
    if not diff <= 2e-2 * max(scale, 1e-6):
        raise SystemExit("SequentialMLP and GroupedMLP disagree")


def enable_expert_fp8(layer, recipe_name: str, fp8_format: str, device):
    """Switch the layer's GroupedMLP experts to FP8 (as enable_fp8 does in a model); return
    (recipe, delayed states)."""
    from gigatron.core.fp8 import FP8Config, FP8LinearState, FP8Recipe
    from gigatron.core.transformer.moe.experts import GroupedMLP

    extra = dict(fp8_amax_history_len=1024, fp8_amax_compute_algo="max") if recipe_name == "delayed" else {}
    config = FP8Config(fp8=fp8_format, fp8_recipe=recipe_name, **extra)
    recipe = FP8Recipe.for_device(config, device)
    states = []
    for module in layer.modules():
        if isinstance(module, GroupedMLP):
            for _, slot in module.fp8_slots():
                state = FP8LinearState.from_config(config, device) if recipe.kind == "delayed" else None
                slot.enable_fp8(recipe, state)
                states += [state] if state is not None else []
    return recipe, states


def bench_fp8_layer(args, dtype, device):
    """The GroupedMLP layer with bf16 experts against each --fp8 recipe, side by side."""
    from gigatron.core.fp8 import update_fp8_states

    torch.manual_seed(0)
    x = torch.randn(args.tokens, 1, args.hidden, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    flops = 3 * 6 * args.hidden * args.moe_ffn * args.tokens * args.topk
    print(f"| GroupedMLP experts (--fp8-format {args.fp8_format}) | grouped GEMM path | fwd+bwd ms | expert TFLOP/s "
          f"| speed-up | output rel. diff vs first row |")
    print("|---|---|---|---|---|---|")
    baseline = reference = None
    plain = str(dtype).replace("torch.", "")
    for name in [plain] + [r for r in args.fp8.split(",") if r]:
        layer = build_layer(args, True, dtype, device)
        path, states = "torch._grouped_mm or loop", []
        if name != plain:
            recipe, states = enable_expert_fp8(layer, name, args.fp8_format, device)
            path = ("per-expert fp8_linear" if recipe.kind == "blockwise" else
                    "torch._scaled_grouped_mm" if recipe.grouped_backend == "scaled_grouped_mm" else "emulated")
        inp = x.clone().requires_grad_(True)

        def step():
            out, _ = layer(inp)
            out.backward(grad)
            if states:
                update_fp8_states(states)
            return out

        seconds = time_it(step, args.iters, args.warmup, device)
        out = step().detach().float()  # after the warm-up steps: delayed scales from real amaxes
        reference = out if reference is None else reference
        baseline = seconds if baseline is None else baseline
        diff = ((out - reference).norm() / reference.norm().clamp(min=1e-12)).item()
        print(f"| {name} | {path} | {seconds * 1e3:.3f} | {flops / seconds / 1e12:.1f} | {baseline / seconds:.2f}x "
              f"| {diff:.2e} |", flush=True)
        del layer


def print_profile(step, device, title: str, row_limit: int, width: int) -> None:
    """torch.profiler over 5 calls of step(): the top ops by device time (CPU time on the CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            step()
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"profile of 5 {title} (sorted by {sort}):")
    print(prof.key_averages().table(sort_by=sort, row_limit=row_limit, max_name_column_width=width))


def profile_layer(args, dtype, device):
    """Where a GroupedMLP layer's forward + backward spends its time: torch.profiler's top ops."""
    torch.manual_seed(0)
    layer = build_layer(args, True, dtype, device)
    x = torch.randn(args.tokens, 1, args.hidden, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)

    def step():
        out, _ = layer(x)
        out.backward(grad)

    time_it(step, 1, args.warmup, device)
    print_profile(step, device, "forward + backward steps of the GroupedMLP layer", 30, 60)


def bench_dispatch_variants(args, dtype, device):
    """The grouped layer's forward + backward with each dropless permutation (the top-k sort with
    gather-only backward, and the generic nonzero permute with index_add combine), eager and under
    torch.compile of the whole layer, side by side; with --profile also the compiled top-k layer's
    top kernels."""
    torch.manual_seed(0)
    x = torch.randn(args.tokens, 1, args.hidden, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    flops = 3 * 6 * args.hidden * args.moe_ffn * args.tokens * args.topk
    reference = None
    print("| permutation | compile | fwd+bwd ms | expert TFLOP/s | max diff vs first row |")
    print("|---|---|---|---|---|")
    for permutation in ("topk-sort", "nonzero"):
        for compiled in (False, True):
            layer = build_layer(args, True, dtype, device)
            if permutation == "nonzero":
                layer.token_dispatcher.exact_topk = None  # the generic (capacity-capable) path
            run = torch.compile(layer) if compiled else layer
            inp = x.clone().requires_grad_(True)

            def step():
                out, _ = run(inp)
                out.backward(grad)
                return out

            out = step().detach().float()
            reference = out if reference is None else reference
            seconds = time_it(step, args.iters, args.warmup, device)
            print(f"| {permutation} | {'yes' if compiled else 'no'} | {seconds * 1e3:.3f} | "
                  f"{flops / seconds / 1e12:.1f} | {(out - reference).abs().max().item():.2e} |", flush=True)
            if args.profile and compiled and permutation == "topk-sort" and device.type == "cuda":
                print_profile(step, device, "compiled forward + backward steps (top-k sort permutation)", 25, 70)
            del layer, run


def bench_grouped_gemm(args, dtype, device):
    rows = args.tokens * args.topk
    counts = torch.full((args.experts,), rows // args.experts, dtype=torch.long)
    counts[0] += rows - int(counts.sum())
    x = torch.randn(rows, args.hidden, device=device, dtype=dtype)
    w = torch.randn(args.experts, args.hidden, 2 * args.moe_ffn, device=device, dtype=dtype)
    flops = 2 * rows * args.hidden * 2 * args.moe_ffn
    kernel = grouped_mm_supported(x, w)
    for use_kernel in ((False, True) if kernel else (False,)):
        seconds = time_it(lambda: grouped_mm(x, w, counts, use_kernel=use_kernel), args.iters, args.warmup, device)
        name = "torch._grouped_mm" if use_kernel else "loop"
        print(f"grouped GEMM fc1 {name:17s} {seconds * 1e3:9.3f} ms  {flops / seconds / 1e12:7.2f} TFLOP/s")
    if not kernel:
        print("torch._grouped_mm does not support these inputs here; only the loop was timed")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--moe-ffn", type=int, default=1408)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--topk", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny fp32 shapes on the CPU (checks the script runs)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops of the grouped layer")
    parser.add_argument("--dispatch-variants", action="store_true",
                        help="also time the grouped layer with each dropless permutation, eager and compiled")
    parser.add_argument("--fp8", default="", help="comma-separated FP8 recipes (tensorwise, delayed, blockwise) "
                        "to time the GroupedMLP layer's experts in, against bf16")
    parser.add_argument("--fp8-format", choices=("e4m3", "hybrid"), default="hybrid")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.hidden, args.moe_ffn, args.experts, args.topk, args.tokens = 32, 48, 8, 2, 64
        args.iters, args.warmup = 2, 1
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_moe.py needs a CUDA device (or pass --cpu-smoke)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    if device.type == "cpu":
        print(f"device: CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}")
    print(f"shape: hidden {args.hidden}, {args.experts} experts of ffn {args.moe_ffn} (SwiGLU), top-{args.topk}, "
          f"{args.tokens} tokens, {dtype}")
    bench_layer(args, dtype, device)
    bench_grouped_gemm(args, dtype, device)
    if args.fp8:
        bench_fp8_layer(args, dtype, device)
    if args.profile:
        profile_layer(args, dtype, device)
    if args.dispatch_variants:
        bench_dispatch_variants(args, dtype, device)


if __name__ == "__main__":
    main()
