"""Decode throughput of the 1.3B GPT (random weights): tokens/s at batch 1, 8 and 64, next to the
memory-bandwidth limit and to HuggingFace transformers `generate` on the same weights.

Model: Megatron's classic 1.3B GPT (24 layers, hidden 2048, 16 heads, 2048 positions, vocabulary
50257 padded to 50304, LayerNorm, GeLU, tied embeddings), bf16, one GPU.

Decode tokens/s = batch * N / (time(prompt + N + 1 tokens) - time(prompt + 1 token)): the prefill
and the first sampled token are subtracted, so only the KV-cached one-token steps are counted.
ms/token is the time of one such step (one new token in every row), 1000 * batch / tokens/s.
Both engines decode greedily with no early stop (ours: stop_at_eod off; HF: min_new_tokens).

Bandwidth limits (BW = the copy bandwidth, measured in the same run with a large device-to-device
copy: bytes read + written / time):
  - weights only ("bandwidth_limit", "fraction_of_limit"): each decode step reads every weight
    once, so at batch b at most b * BW / W tokens/s, W = the parameters' bytes;
  - weights and KV cache ("bound", "fraction_of_bound"; the issue's target): decode step j (j = 0
    .. N-1 after a prompt of P tokens) of b rows reads every weight once and, for each row, the
    keys and values of its P + j + 1 positions:
        bytes_j = W + b * (P + j + 1) * kv,   kv = 2 * layers * key/value groups * head dim * bytes per element
    and the N timed steps cannot take less than sum_j bytes_j / BW, so
        bound tokens/s = b * N * BW / sum_j bytes_j.

Modes: eager (the model run op by op each step), cuda_graph (each step one CUDA graph replay),
compiled (the step compiled by torch.compile, then captured in a CUDA graph), a "-skinny" suffix
(continuous-skinny, compiled-skinny: linear layers of 2 to 16 rows through the Triton few-row
kernel, gigatron/core/ops/skinny_gemm.py, instead of cuBLAS), continuous (the
continuous batcher of the server's --inference-dynamic-batching with every request present from
the start: its static-shape step captured in a CUDA graph per batch size, each row attending over
its own slots), continuous-compiled (that step compiled first); the graph modes run
one-row steps (batch 1) through the Triton GEMV, and a "-cublas" suffix (cuda_graph-cublas,
compiled-cublas) keeps cuBLAS there, to show what the kernel brings.

--profile runs torch.profiler over the decode steps (prefill excluded) of one batch-1 generation
per graph mode and prints the 15 ops with the most device time and the 15 with the
most CPU time, after a line with the wall time, device busy time and kernel count per step: a
device busy far below the wall time means the host is the bottleneck, a busy time near the wall
time points at the kernels in the table. A second line sums the device's idle time between
consecutive kernels per step, with the kernel pairs around the largest gaps: small gaps mean
fewer (fused) kernels would not pay, the kernels themselves must get faster.

The HF model is the same weights exported with gigatron.core.convert (save_hf_checkpoint, GPT-2
layout) and loaded as GPT2LMHeadModel in bf16 with SDPA attention.

    python bench/bench_decode.py                        # GPU: batch 1, 8, 64; eager and CUDA graphs
    python bench/bench_decode.py --cpu-smoke            # tiny model on CPU: checks the whole path
    python bench/bench_decode.py --profile --no-hf --batch-sizes 1   # plus where a decode step's time goes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gigatron.core.checkpoint.io import atomic_write_text  # noqa: E402
from gigatron.core.inference.decode_step import DecodeKernels  # noqa: E402
from gigatron.core.inference.engine import InferenceEngine, SamplingParams  # noqa: E402
from gigatron.core.models.gpt import GPTModel  # noqa: E402
from gigatron.core.parallel.groups import ParallelGroups  # noqa: E402
from gigatron.core.tokenizers import NullTokenizer  # noqa: E402
from gigatron.core.transformer.config import TransformerConfig  # noqa: E402

MODES = ["eager", "cuda_graph", "compiled", "cuda_graph-cublas", "compiled-cublas", "cuda_graph-unfused",
         "compiled-unfused", "compiled-nopdl", "continuous", "continuous-compiled", "continuous-skinny",
         "compiled-skinny"]
FULL = dict(layers=24, hidden=2048, heads=16, seq=2048, vocab=50257, padded=50304)
SMOKE = dict(layers=2, hidden=64, heads=4, seq=128, vocab=500, padded=512)


def build_model(shape: dict, device, dtype):
    config = TransformerConfig(
        num_layers=shape["layers"], hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
        seq_length=shape["seq"], max_position_embeddings=shape["seq"], attention_dropout=0.0, hidden_dropout=0.0,
        bf16=dtype == torch.bfloat16, params_dtype=dtype, use_cpu_initialization=device.type == "cpu")
    with torch.device(device):
        model = GPTModel(config, ParallelGroups.single(), vocab_size=shape["padded"])
    return model.to(device).eval()


def export_hf(model, shape: dict, dtype, device):
    """The same weights as a transformers GPT2LMHeadModel (through the checkpoint converter)."""
    from transformers import GPT2LMHeadModel

    from gigatron.core.convert.hf import save_hf_checkpoint
    from gigatron.core.convert.protocol import state_to_messages
    from gigatron.core.convert.torch_format import metadata_from_args

    args = dict(num_layers=shape["layers"], hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
                ffn_hidden_size=4 * shape["hidden"], seq_length=shape["seq"], max_position_embeddings=shape["seq"],
                kv_channels=shape["hidden"] // shape["heads"], make_vocab_size_divisible_by=128,
                vocab_size=shape["vocab"], hidden_dropout=0.0, attention_dropout=0.0, norm_epsilon=1e-5)
    md = metadata_from_args(args, shape["vocab"], None, torch.float32)
    tensors = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    # Conversion messages carry the true vocabulary (the padded rows are never used).
    tensors["embedding.word_embeddings.weight"] = tensors["embedding.word_embeddings.weight"][: shape["vocab"]]
    with tempfile.TemporaryDirectory() as folder:
        save_hf_checkpoint(state_to_messages(md, tensors), folder, family="gpt2")
        hf = GPT2LMHeadModel.from_pretrained(folder, torch_dtype=dtype, attn_implementation="sdpa")
    return hf.to(device).eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device, gib: float) -> float:
    """Bytes per second of a large device copy (read + write)."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    sync(device)
    reps = 10
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    elapsed = time.perf_counter() - start
    del src, dst
    return 2 * n * 2 * reps / elapsed


def timed(fn, device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def decode_rate(run, batch: int, new_tokens: int, device, repeats: int):
    """(tokens/s of the decode steps, ms per decode step, outputs of the long run) for run(n)
    generating n tokens."""
    run(new_tokens + 1)  # warm-up (kernels, and a CUDA graph for every attention length the run uses)
    short = timed(lambda: run(1), device, repeats)
    out = {}
    long = timed(lambda: out.setdefault("x", run(new_tokens + 1)), device, repeats)
    step = max(long - short, 1e-9) / new_tokens
    return batch / step, 1000.0 * step, out["x"]


def kv_bytes_per_position(model) -> int:
    """Bytes of the keys and values of one position of one sequence, every layer."""
    config = model.config
    element = next(model.parameters()).element_size()
    return 2 * config.num_layers * config.num_query_groups * config.kv_channels * element


def weights_kv_bound(weight_bytes: int, kv_per_position: int, batch: int, prompt_len: int, steps: int,
                     bandwidth: float) -> float:
    """Tokens/s bound of `steps` decode steps of `batch` rows after prompts of prompt_len tokens:
    b * N * BW / sum_j (W + b * (P + j + 1) * kv) (the module docstring)."""
    total = sum(weight_bytes + batch * (prompt_len + j + 1) * kv_per_position for j in range(steps))
    return batch * steps * bandwidth / total


class ContinuousRun:
    """run(prompts, n) -> token lists: the prompts through one ContinuousBatcher of len(prompts)
    slots (the server's --inference-dynamic-batching), every request added before the first step,
    greedy, n tokens each. The batcher (and its captured steps) is kept across calls."""

    def __init__(self, engine: InferenceEngine, batch: int, prefill_chunk: int):
        from gigatron.core.inference.continuous import ContinuousBatcher

        # Every request is present from the start: each step runs all `batch` rows, one bucket.
        self.batcher = ContinuousBatcher(engine, batch, prefill_chunk, static_step=True, graph_buckets=[batch])
        self.batcher.warm_up()

    def run(self, prompts, n: int):
        from gigatron.core.inference.continuous import Sequence

        params = SamplingParams(tokens_to_generate=n, top_k=1, stop_at_eod=False)
        seqs = [Sequence(list(p), params) for p in prompts]
        for seq in seqs:
            self.batcher.add(seq)
        while self.batcher.busy():
            self.batcher.step()
        return [list(p) + seq.generated for p, seq in zip(prompts, seqs)]


def make_engine(model, tokenizer, batch: int, max_sequence_length: int, mode: str) -> InferenceEngine:
    """The engine a bench mode names: "<decode mode>", "<decode mode>-cublas" (cuBLAS and cuDNN,
    no Triton decode kernels) or "<decode mode>-unfused" (the Triton GEMV per linear layer, the
    rest of a layer as PyTorch ops) or "<decode mode>-nopdl" (the Triton decode kernels launched
    one after another, without programmatic dependent launch)."""
    decode_mode, _, variant = mode.partition("-")
    skinny = variant == "skinny"
    if decode_mode == "continuous":  # the continuous batcher's step: captured (compiled first), on CPU run as is
        on_cuda = next(model.parameters()).is_cuda
        decode_mode = ("compiled" if variant == "compiled" else "cuda_graph") if on_cuda else "eager"
        variant = ""
    kernels = DecodeKernels(gemv=variant != "cublas", fused=variant != "unfused", attention=variant != "unfused",
                            pdl=variant not in ("unfused", "nopdl"), skinny=skinny)
    return InferenceEngine(model, tokenizer, max_batch_size=batch, max_sequence_length=max_sequence_length,
                           decode_mode=decode_mode, _decode_kernels=kernels)


def format_idle_gaps(device_events, steps: int) -> str:
    """gigatron.training.profiling.idle_gaps of the profiled device events, as printed lines."""
    from gigatron.training.profiling import idle_gaps
    gaps = idle_gaps(((e.time_range.start, e.time_range.end, e.name) for e in device_events), steps)
    lines = [f"idle between kernels: {gaps['idle_ms']:.3f} ms/step over {gaps['gaps']:.0f} gaps/step, "
             f"median {gaps['median_us']:.2f} us (the gap between steps included)"]
    lines += [f"  {ms:.4f} ms/step in {count:.1f} gaps/step: {before} -> {after}"
              for before, after, ms, count in gaps["pairs"]]
    return "\n".join(lines)


def profile_decode(engine, prompt, steps: int, device, mode: str) -> None:
    """Profile the decode steps (not the prefill) of one greedy generation and print the tables."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(tokens_to_generate=steps + 1, top_k=1, stop_at_eod=False)
    engine.generate_tokens([prompt], params)  # warm-up: kernels, CUDA graphs
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    decode_steps = engine._decode_steps
    result = {}

    def profiled(*args, **kwargs):  # the engine's step loop, under the profiler
        sync(device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            out = decode_steps(*args, **kwargs)
            sync(device)
            result["wall"] = time.perf_counter() - start
        result["prof"] = prof
        return out

    engine._decode_steps = profiled
    try:
        engine.generate_tokens([prompt], params)
    finally:
        del engine._decode_steps  # back to the class's method
    events = result["prof"].key_averages()
    line = f"profile {mode} batch 1: {steps} decode steps, wall {1000 * result['wall'] / steps:.3f} ms/step"
    if device.type == "cuda":
        # Device-side events only (kernels, copies): the CPU ops that launch them carry the same time.
        on_device = [e for e in result["prof"].events() if e.device_type == torch.autograd.DeviceType.CUDA
                     and not getattr(e, "is_user_annotation", False)]
        busy = sum(e.self_device_time_total for e in on_device) / 1000.0  # ms
        line += f", device busy {busy / steps:.3f} ms/step, {len(on_device) / steps:.0f} kernels and copies/step"
    print(line)
    if device.type == "cuda":
        print(format_idle_gaps(on_device, steps))
        print(events.table(sort_by="self_cuda_time_total", row_limit=15))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))


def _fmt(key: str, value) -> str:
    if not isinstance(value, float):
        return str(value)
    if key.endswith(("fraction_of_limit", "fraction_of_bound", "ms_per_token")):
        return f"{value:.3f}"
    return f"{value:.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, checks the whole path")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--prompt-length", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--modes", nargs="+", default=None, choices=MODES,
                        help="engines to time: eager, cuda_graph, compiled (torch.compile + CUDA graph), with the "
                             "Triton decode kernels; a -cublas suffix keeps cuBLAS and cuDNN, -unfused the plain "
                             "GEMV per linear layer, -nopdl launches without programmatic dependent launch")
    parser.add_argument("--copy-gib", type=float, default=4.0, help="size of the bandwidth-measuring copy")
    parser.add_argument("--json", default=None, help="also write the results here (atomically)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the decode steps at batch 1 (torch.profiler) and print the top ops")
    parser.add_argument("--profile-steps", type=int, default=16, help="decode steps under the profiler")
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        device, dtype, shape = torch.device("cpu"), torch.float32, SMOKE
        batches = args.batch_sizes or [1, 4]
        prompt_len, new_tokens = args.prompt_length or 8, args.new_tokens or 8
        modes = args.modes or ["eager", "continuous"]
        copy_gib = min(args.copy_gib, 0.125)
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_decode.py needs a GPU; use --cpu-smoke to check it on CPU")
        device, dtype, shape = torch.device("cuda"), torch.bfloat16, FULL
        batches = args.batch_sizes or [1, 8, 64]
        prompt_len, new_tokens = args.prompt_length or 128, args.new_tokens or 128
        modes = args.modes or ["eager", "cuda_graph-cublas", "cuda_graph", "compiled", "continuous"]
        copy_gib = args.copy_gib

    torch.manual_seed(0)
    model = build_model(shape, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = measure_bandwidth(device, copy_gib)
    tokenizer = NullTokenizer(shape["vocab"] - 1)  # ids 0..V-2 plus the end-of-document id V-1
    hf = None if args.no_hf else export_hf(model, shape, dtype, device)
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} | weights "
          f"{weight_bytes / 1e9:.3f} GB | copy bandwidth {bandwidth / 1e9:.1f} GB/s | prompt {prompt_len} | "
          f"new tokens {new_tokens}")
    kv = kv_bytes_per_position(model)
    rows = []
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, shape["vocab"] - 1, (batch, prompt_len), generator=g)
        limit = batch * bandwidth / weight_bytes
        bound = weights_kv_bound(weight_bytes, kv, batch, prompt_len, new_tokens, bandwidth)
        row = {"batch": batch, "bandwidth_limit_tokens_per_s": limit,
               "bandwidth_limit_ms_per_token": 1000.0 * weight_bytes / bandwidth, "bound_tokens_per_s": bound}
        ours_tokens = None
        for mode in modes:
            engine = make_engine(model, tokenizer, batch, prompt_len + new_tokens + 2, mode)
            if mode.startswith("continuous"):
                runner = ContinuousRun(engine, batch, batch * prompt_len)

                def run(n, runner=runner):
                    return runner.run(prompts.tolist(), n)
            else:
                def run(n, engine=engine):
                    params = SamplingParams(tokens_to_generate=n, top_k=1, stop_at_eod=False)
                    return engine.generate_tokens(prompts.tolist(), params).tokens

            rate, ms, tokens = decode_rate(run, batch, new_tokens, device, args.repeats)
            row[f"gigatron_{mode}_tokens_per_s"] = rate
            row[f"gigatron_{mode}_ms_per_token"] = ms
            row[f"gigatron_{mode}_fraction_of_limit"] = rate / limit
            row[f"gigatron_{mode}_fraction_of_bound"] = rate / bound
            if ours_tokens is None:
                ours_tokens = tokens
            elif tokens != ours_tokens:
                row[f"{mode}_differs_from_eager"] = True
        if hf is not None:
            ids = prompts.to(device)

            def run_hf(n):
                with torch.no_grad():
                    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, use_cache=True, pad_token_id=shape["vocab"] - 1)
                return out.tolist()

            rate, ms, hf_tokens = decode_rate(run_hf, batch, new_tokens, device, args.repeats)
            row["hf_generate_tokens_per_s"] = rate
            row["hf_generate_ms_per_token"] = ms
            # Greedy continuations agree until numerics (bf16) first pick a different argmax.
            agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) - prompt_len
                     for x, y in zip(ours_tokens, hf_tokens)]
            row["greedy_tokens_equal_to_hf"] = min(agree)
        rows.append(row)
        print(" | ".join(f"{k} {_fmt(k, v)}" for k, v in row.items()), flush=True)
    if args.profile:
        prompt = torch.randint(0, shape["vocab"] - 1, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
        for mode in [m for m in modes if m != "eager" or device.type == "cpu"]:
            engine = make_engine(model, tokenizer, 1, prompt_len + args.profile_steps + 2, mode)
            profile_decode(engine, prompt, args.profile_steps, device, mode)
    if args.cpu_smoke:
        for row in rows:
            assert all(row[f"gigatron_{m}_tokens_per_s"] > 0 and row[f"gigatron_{m}_ms_per_token"] > 0 for m in modes)
            if not args.no_hf:
                # fp32 on CPU: the same weights must give the same greedy tokens.
                assert row["greedy_tokens_equal_to_hf"] == new_tokens + 1, row
        print("cpu smoke: ok")
    if args.json:
        result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "weight_bytes": weight_bytes, "copy_bandwidth_bytes_per_s": bandwidth,
                  "prompt_length": prompt_len, "new_tokens": new_tokens, "rows": rows}
        atomic_write_text(args.json, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
