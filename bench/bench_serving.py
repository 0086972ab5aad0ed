"""Serving under load: N concurrent streaming clients with Poisson arrivals against the HTTP
server (in process, uvicorn on 127.0.0.1; the clients run in a child process, so that parsing
their streams does not take the server's interpreter lock), next to the same requests run as one
offline batch; and, with --suite, everything the serving targets are measured by, on one GPU.

Model: the 1.3B GPT of bench_decode.py (random weights, bf16, one GPU), or --model llama8b (32
layers, hidden 4096, 32 heads, 8 key/value groups, SwiGLU 14336, RMSNorm, RoPE, vocabulary 128256;
about 16 GB of weights in bf16). Tokens are ids of a NullTokenizer; prompts are random ids.

Load: --requests requests; arrival gaps ~ Exp(1 / --rate) seconds (a Poisson process; --rate 0
sends them all at once); at most --clients in flight (a client takes the next request when its
last one ends); prompt lengths uniform in [--prompt-min, --prompt-max], output lengths uniform in
[--output-min, --output-max] (max_tokens, no early stop: the end-of-document token is banned with
logit_bias so every request generates exactly its length). Each request is a streamed
POST /v1/completions (greedy) with stream_options.include_usage.

Reported (p50 / p99 over requests or gaps):
  - request throughput (requests/s) and output tokens/s over the whole run (first send to last byte);
  - TTFT: time from sending a request to its first text chunk;
  - ITL: gaps between consecutive chunks of a request (one chunk per token here: no stop strings);
  - offline tokens/s: the same requests' output tokens / the time of running them through the
    scheduler's engine with no HTTP (static: batches of --max-batch-size; continuous: all added at
    once to a ContinuousBatcher), the bound "under load within 10% of offline" is measured against;
  - mean_batch: the mean number of sequences a decode step of the continuous batch ran under load;
  - kv_slot_use: the mean share of a KV-cache slot (S positions) a request fills at its end, what
    fixed slots leave unused and paged blocks would lend to other sequences;
  - on a GPU, the bandwidth bound counting the weights and the KV cache. A decode step of b rows,
    row r at position p_r, reads every weight once and each row's keys and values of its p_r + 1
    positions:
        bytes per step = W + sum_r (p_r + 1) * kv,   kv = 2 * layers * key/value groups * head dim * e
        bound tokens/s = b * BW / bytes per step
    (W = the parameters' bytes, e = bytes per element, BW = the copy bandwidth measured in the same
    run: bytes read + written / time of a large device copy). Under load b and the mean p_r + 1 are
    those the continuous batch's decode steps actually ran (its counters); fraction_of_bound is
    output tokens/s over that bound.

--suite (one command per model is safest: --suite-models gpt1p3b, then --suite-models llama8b;
a few minutes each on one H100, most of it the compilations) runs for the 1.3B GPT and, if
its weights and KV cache fit the GPU's free memory, the 8B-shaped Llama:
  1. offline decode through the continuous batcher (its static step captured in CUDA graphs, every
     request present from the start) at batch 1, 8 and 64, prompt 128, 128 new tokens (and batch 8
     again with the few-row Triton kernel instead of cuBLAS, kernels "skinny"; then batch 8 and 64
     with the step compiled by torch.compile first, decode_mode "compiled", batch 8 also with the
     few-row kernel; one compilation each, tens of seconds): tokens/s,
     ms per step and the fraction of the bound above (bench_decode.py's formula, summed over the
     steps' lengths; targets: >= 60% at 8 and 64, >= 70% at 1);
  2. the load run with the continuous scheduler: 64 clients, Poisson arrivals at --rate, lengths
     from the ranges above; output tokens/s over the offline run of the same requests (target:
     >= 0.9) and ITL p99 over the batch-1 step time of 1. (target: <= 2).
It prints one table per model with the card and writes every row to --json.

    python bench/bench_serving.py --suite --suite-models gpt1p3b --json serving_gpt.json    # the GPU runs
    python bench/bench_serving.py --suite --suite-models llama8b --json serving_llama.json  # (one H100)
    python bench/bench_serving.py --suite --cpu-smoke                   # tiny model on CPU: checks the path
    python bench/bench_serving.py --cpu-smoke                           # tiny model on CPU, both schedulers
    python bench/bench_serving.py --scheduler continuous --clients 64 --requests 512 --rate 20
    python bench/bench_serving.py --model llama8b --clients 64 --requests 256 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gigatron.core.checkpoint.io import atomic_write_text  # noqa: E402
from gigatron.core.inference.engine import InferenceEngine, SamplingParams  # noqa: E402
from gigatron.core.models.gpt import GPTModel  # noqa: E402
from gigatron.core.parallel.groups import ParallelGroups  # noqa: E402
from gigatron.core.tokenizers import NullTokenizer  # noqa: E402
from gigatron.core.transformer.config import TransformerConfig  # noqa: E402

SHAPES = {
    "gpt1p3b": dict(num_layers=24, hidden_size=2048, num_attention_heads=16, seq_length=2048,
                    max_position_embeddings=2048, vocab=50257, padded=50304),
    "llama8b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                    group_query_attention=True, ffn_hidden_size=14336, swiglu=True, normalization="RMSNorm",
                    position_embedding_type="rope", untie_embeddings_and_output_weights=True, add_bias_linear=False,
                    seq_length=2048, max_position_embeddings=2048, vocab=128256, padded=128256),
    "smoke": dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=128, max_position_embeddings=128,
                  vocab=500, padded=512),
}


def build_model(name: str, device, dtype):
    shape = dict(SHAPES[name])
    vocab, padded = shape.pop("vocab"), shape.pop("padded")
    config = TransformerConfig(**shape, attention_dropout=0.0, hidden_dropout=0.0, bf16=dtype == torch.bfloat16,
                               params_dtype=dtype, use_cpu_initialization=device.type == "cpu")
    with torch.device(device):
        model = GPTModel(config, ParallelGroups.single(), vocab_size=padded)
    return model.to(device).eval(), vocab


def percentile(values, q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[k]


def make_requests(args, vocab: int):
    rng = random.Random(args.seed)
    out = []
    for _ in range(args.requests):
        n = rng.randint(args.prompt_min, args.prompt_max)
        out.append(([rng.randrange(1, vocab - 1) for _ in range(n)], rng.randint(args.output_min, args.output_max)))
    gaps = [rng.expovariate(args.rate) if args.rate > 0 else 0.0 for _ in out]
    return out, gaps


async def run_load(url: str, requests, gaps, clients: int, eod: int):
    import httpx

    results = []
    queue = asyncio.Queue()
    start = time.perf_counter()

    async def arrivals():
        for item, gap in zip(requests, gaps):
            await asyncio.sleep(gap)
            queue.put_nowait(item)
        for _ in range(clients):
            queue.put_nowait(None)

    async def client(http):
        while True:
            item = await queue.get()
            if item is None:
                return
            prompt, length = item
            payload = {"model": "gigatron", "prompt": prompt, "max_tokens": length, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}, "logit_bias": {str(eod): -100}}
            sent = time.perf_counter()
            stamps, usage = [], None
            async with http.stream("POST", url + "/v1/completions", json=payload) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    body = json.loads(line[6:])
                    if "error" in body:
                        raise RuntimeError(body["error"])
                    if body.get("usage"):
                        usage = body["usage"]
                    if any(c.get("text") for c in body.get("choices", [])):
                        stamps.append(time.perf_counter())
            results.append({"sent": sent, "stamps": stamps, "tokens": usage["completion_tokens"] if usage else 0})

    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=clients + 4)) as http:
        await asyncio.gather(arrivals(), *(client(http) for _ in range(clients)))
    return results, time.perf_counter() - start


def _load_in_child(url: str, requests, gaps, clients: int, eod: int, conn) -> None:
    """The child process of run_load_apart: the clients, their results sent back through conn."""
    try:
        conn.send(("ok", asyncio.run(run_load(url, requests, gaps, clients, eod))))
    except BaseException as exc:  # the parent raises it
        conn.send(("error", repr(exc)))
    finally:
        conn.close()


def run_load_apart(url: str, requests, gaps, clients: int, eod: int):
    """run_load in a child process (spawned): the clients' stream parsing does not compete with
    the server for this interpreter's lock. -> (results, wall seconds)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe(duplex=False)
    process = context.Process(target=_load_in_child, args=(url, requests, gaps, clients, eod, child), daemon=True)
    process.start()
    child.close()
    try:
        status, payload = parent.recv()
    except EOFError:
        raise RuntimeError(f"the load clients' process ended without results (exit code {process.exitcode})")
    finally:
        process.join(timeout=60)
    if status != "ok":
        raise RuntimeError(f"the load clients failed: {payload}")
    return payload


def offline(engine, scheduler: str, requests, max_batch: int, eod: int, max_requests: int, chunk: int) -> float:
    """Output tokens/s of the same requests through the engine, without HTTP."""
    from gigatron.core.inference.continuous import ContinuousBatcher, Sequence

    ban = ((eod, -100.0),)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    total = 0
    if scheduler == "continuous":
        batcher = ContinuousBatcher(engine, max_requests, chunk)
        batcher.warm_up()  # graphs captured before the clock starts, as the server does before it listens
        sync()
        start = time.perf_counter()
        for prompt, length in requests:
            batcher.add(Sequence(prompt, SamplingParams(tokens_to_generate=length, top_k=1, logit_bias=ban)))
        while batcher.busy():
            for seq in batcher.step():
                total += len(seq.generated)
    else:
        for lo in range(0, len(requests), max_batch):
            group = requests[lo: lo + max_batch]
            longest = max(n for _, n in group)
            r = engine.generate_tokens([p for p, _ in group], SamplingParams(tokens_to_generate=longest, top_k=1,
                                                                             logit_bias=ban))
            total += sum(min(len(t) - len(p), n) for t, (p, n) in zip(r.tokens, group))
    sync()
    return total / (time.perf_counter() - start)


def bandwidth_bound(model, rows: float, kv_positions: float, bandwidth: float) -> float:
    """Tokens/s bound of a decode step of `rows` sequences that read kv_positions positions each on
    average (the formula of the module docstring)."""
    from bench_decode import kv_bytes_per_position

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return rows * bandwidth / (weights + rows * kv_positions * kv_bytes_per_position(model))


def run_one(args, scheduler: str, model, vocab: int, device) -> dict:
    from gigatron.core.inference.broadcast import LocalRunner
    from gigatron.core.inference.server.app import build_app
    from gigatron.core.inference.server.background import serve_in_background

    tokenizer = NullTokenizer(vocab)
    seq = model.config.max_position_embeddings
    engine = InferenceEngine(model, tokenizer, max_batch_size=args.max_batch_size, max_sequence_length=seq,
                             decode_mode=args.decode_mode)
    requests, gaps = make_requests(args, vocab)
    if max(len(p) + n for p, n in requests) > seq:
        raise ValueError(f"--prompt-max + --output-max exceed the model's {seq} positions")
    app = build_app(LocalRunner(engine), tokenizer, max_batch_size=args.max_batch_size, max_sequence_length=seq,
                    dynamic_batching=scheduler == "continuous", max_requests=args.max_requests,
                    prefill_chunk=args.prefill_chunk)
    batcher = getattr(app.state.scheduler, "batcher", None)
    if batcher is not None:
        batcher.warm_up()  # as the server tool does before it listens
    server = serve_in_background(app, ready_polls=400)
    try:
        results, wall = run_load_apart(server.url, requests, gaps, args.clients, tokenizer.eod)
    finally:
        server.stop(join_timeout=30)
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["stamps"][0] - r["sent"] for r in results if r["stamps"]]
    itl = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    row = {"scheduler": scheduler, "requests": len(results), "clients": args.clients, "rate": args.rate,
           "request_throughput": len(results) / wall, "output_tokens_per_s": tokens / wall,
           "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
           "itl_p50_ms": 1e3 * percentile(itl, 50), "itl_p99_ms": 1e3 * percentile(itl, 99)}
    if batcher is not None and batcher.decode_steps:
        # The decode steps of the load run (the offline run below has its own batcher).
        row["mean_batch"] = batcher.decoded_rows / batcher.decode_steps
        row["mean_kv_positions"] = batcher.kv_positions_read / max(batcher.decoded_rows, 1)
    # The server's KV cache and graphs (its scheduler was closed by server.stop) go before the
    # offline run allocates its own.
    del app, batcher, server
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    row["offline_tokens_per_s"] = offline(engine, scheduler, requests, args.max_batch_size, tokenizer.eod,
                                          args.max_requests or args.max_batch_size, args.prefill_chunk)
    row["under_load_over_offline"] = row["output_tokens_per_s"] / row["offline_tokens_per_s"]
    # What fixed slots cost: the share of a slot's S positions a request fills at its end (paged
    # blocks would lend the rest to other sequences).
    row["kv_slot_use"] = statistics.mean((len(p) + n) / seq for p, n in requests)
    if device.type == "cuda":
        from bench_decode import measure_bandwidth
        bandwidth = measure_bandwidth(device, 2.0)
        if "mean_batch" in row:
            rows, kv_positions = row["mean_batch"], row["mean_kv_positions"]
        else:
            rows = min(args.clients, args.max_requests or args.max_batch_size)
            kv_positions = statistics.mean(len(p) + n / 2 for p, n in requests)
        bound = bandwidth_bound(model, rows, kv_positions, bandwidth)
        row.update(bandwidth_GBps=bandwidth / 1e9, bound_tokens_per_s=bound,
                   fraction_of_bound=row["output_tokens_per_s"] / bound)
    return row


def offline_decode(model, vocab: int, device, batch: int, prompt_len: int, new_tokens: int, repeats: int,
                   decode_mode: str, bandwidth: float, skinny: bool = False) -> dict:
    """Decode through the continuous batcher with every request present (bench_decode.py's
    ContinuousRun and its timing: N decode steps = time(N + 1 tokens) - time(1 token)), next to the
    bound counting the weights and the KV cache."""
    from bench_decode import ContinuousRun, decode_rate, kv_bytes_per_position, weights_kv_bound

    tokenizer = NullTokenizer(vocab)
    from gigatron.core.inference.decode_step import DecodeKernels

    engine = InferenceEngine(model, tokenizer, max_batch_size=batch, max_sequence_length=prompt_len + new_tokens + 2,
                             decode_mode=decode_mode, _decode_kernels=DecodeKernels(skinny=skinny))
    runner = ContinuousRun(engine, batch, batch * prompt_len)
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, vocab - 1, (batch, prompt_len), generator=g).tolist()
    rate, ms, _ = decode_rate(lambda n: runner.run(prompts, n), batch, new_tokens, device, repeats)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bound = weights_kv_bound(weights, kv_bytes_per_position(model), batch, prompt_len, new_tokens, bandwidth)
    return {"batch": batch, "decode_mode": decode_mode, "kernels": "skinny" if skinny else "default",
            "tokens_per_s": rate, "ms_per_step": ms, "bound_tokens_per_s": bound,
            "fraction_of_bound": rate / bound, "weights_only_limit_tokens_per_s": batch * bandwidth / weights}


def fits(name: str, device, max_requests: int) -> tuple:
    """(whether the model's weights and a KV cache of max_requests full slots fit the free GPU
    memory with 6 GiB to spare, the GiB it needs)."""
    shape = SHAPES[name]
    layers, hidden = shape["num_layers"], shape["hidden_size"]
    heads, groups = shape["num_attention_heads"], shape.get("num_query_groups", shape["num_attention_heads"])
    ffn = shape.get("ffn_hidden_size", 4 * hidden)
    per_layer = hidden * hidden * (2 + 2 * groups / heads) + hidden * ffn * (3 if shape.get("swiglu") else 2)
    embeddings = shape["padded"] * hidden * (2 if shape.get("untie_embeddings_and_output_weights") else 1)
    weights = 2 * (layers * per_layer + embeddings)  # bf16
    kv = 2 * layers * groups * (hidden // heads) * 2 * shape["max_position_embeddings"] * max_requests
    need = (weights + kv) / 2 ** 30 + 6
    if device.type != "cuda":
        return True, need
    return torch.cuda.mem_get_info(device)[0] / 2 ** 30 >= need, need


def _print_table(title: str, rows) -> None:
    print(title)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(f"{row[k]:.4g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys))


def suite(args, device, dtype, card: str) -> dict:
    """--suite: for each model that fits, offline decode at each --suite-batches size and the load
    run with the continuous scheduler (see the module docstring)."""
    from bench_decode import measure_bandwidth

    missing = [pkg for pkg in ("fastapi", "uvicorn") if importlib.util.find_spec(pkg) is None]
    if missing:  # the load run serves over HTTP: say so before minutes of offline runs
        raise SystemExit(f"error: the load run of --suite serves over HTTP and needs {' and '.join(missing)}; "
                         f"install the project's requirements (pip install {' '.join(missing)})")
    out = {"card": card, "models": {}}
    for name in args.suite_models:
        ok, need = fits(name, device, args.max_requests or args.max_batch_size)
        if not ok:
            print(f"{name}: skipped, needs about {need:.0f} GiB of free GPU memory")
            out["models"][name] = {"skipped": f"needs about {need:.0f} GiB"}
            continue
        torch.manual_seed(args.seed)
        model, vocab = build_model(name, device, dtype)
        bandwidth = measure_bandwidth(device, args.copy_gib)
        # The default kernels at every batch size, then the few-row Triton kernel where it applies
        # (2..16 rows) next to cuBLAS; each run's cache and graphs are freed before the next.
        # Then the step compiled by torch.compile (fuses the norms, biases, activations and residual
        # adds that the captured step runs as separate small kernels at batch > 1) at
        # --suite-compiled-batches, with the few-row kernel too where it applies.
        runs = [(b, args.decode_mode, False) for b in args.suite_batches]
        runs += [(b, args.decode_mode, True) for b in args.suite_batches if 2 <= b <= 16]
        compiled = "compiled" if device.type == "cuda" else "eager"  # on CPU: the uncompiled step (smoke)
        runs += [(b, compiled, skinny) for b in args.suite_compiled_batches for skinny in (False, True)
                 if not skinny or 2 <= b <= 16]
        decode_rows = []
        for b, mode, skinny in runs:
            decode_rows.append(offline_decode(model, vocab, device, b, args.suite_prompt, args.suite_new_tokens,
                                              args.repeats, mode, bandwidth, skinny=skinny))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        # The offline table first: it stands even if the load run fails.
        _print_table(f"model {name}, {card}, copy bandwidth {bandwidth / 1e9:.0f} GB/s; offline decode through "
                     f"the continuous batcher (prompt {args.suite_prompt}, {args.suite_new_tokens} new tokens, "
                     f"decode mode {args.decode_mode})", decode_rows)
        load = run_one(args, "continuous", model, vocab, device)
        step_1 = next((r["ms_per_step"] for r in decode_rows if r["batch"] == 1), None)
        if step_1:
            load["batch1_step_ms"] = step_1
            load["itl_p99_over_batch1_step"] = load["itl_p99_ms"] / step_1
        _print_table(f"model {name}, {card}: {args.requests} requests, {args.clients} clients, Poisson "
                     f"{args.rate}/s, prompts {args.prompt_min}-{args.prompt_max}, outputs "
                     f"{args.output_min}-{args.output_max}", [load])
        out["models"][name] = {"copy_bandwidth_bytes_per_s": bandwidth, "decode": decode_rows, "load": load}
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["gpt1p3b", "llama8b"], default="gpt1p3b")
    p.add_argument("--scheduler", choices=["static", "continuous", "both"], default="both")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--rate", type=float, default=16.0, help="mean arrivals per second (0: all at once)")
    p.add_argument("--prompt-min", type=int, default=32)
    p.add_argument("--prompt-max", type=int, default=512)
    p.add_argument("--output-min", type=int, default=32)
    p.add_argument("--output-max", type=int, default=256)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-requests", type=int, default=None, help="continuous slots (default --max-batch-size)")
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--decode-mode", choices=["eager", "cuda_graph", "compiled"], default=None,
                   help="the engine's decode mode (default cuda_graph on a GPU: the continuous batch's step "
                        "captured in CUDA graphs; eager on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file (atomically)")
    p.add_argument("--cpu-smoke", action="store_true", help="a tiny model on CPU, a few requests: checks the path")
    p.add_argument("--suite", action="store_true",
                   help="offline decode at --suite-batches and the load run, for each of --suite-models that fits "
                        "(module docstring)")
    p.add_argument("--suite-models", nargs="+", choices=["gpt1p3b", "llama8b"], default=["gpt1p3b", "llama8b"])
    p.add_argument("--suite-batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--suite-compiled-batches", type=int, nargs="*", default=[8, 64],
                   help="batch sizes also timed with the step compiled by torch.compile (one compilation each, "
                        "tens of seconds); none: skip")
    p.add_argument("--suite-prompt", type=int, default=128)
    p.add_argument("--suite-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="timings of the offline decode (the best is kept)")
    p.add_argument("--copy-gib", type=float, default=2.0, help="size of the bandwidth-measuring copy")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        device, dtype, name = torch.device("cpu"), torch.float32, "smoke"
        args.clients, args.requests, args.rate = 4, 8, 50.0
        args.prompt_min, args.prompt_max, args.output_min, args.output_max = 4, 24, 4, 16
        args.max_batch_size, args.max_requests, args.prefill_chunk = 4, 3, 8
        args.decode_mode = args.decode_mode or "eager"
        args.suite_models, args.suite_batches, args.suite_prompt, args.suite_new_tokens = ["smoke"], [1, 3], 8, 6
        args.suite_compiled_batches = [3]
        args.copy_gib, args.repeats = 0.0625, 1
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_serving.py needs a GPU (or --cpu-smoke)")
        device, dtype, name = torch.device("cuda"), torch.bfloat16, args.model
        args.decode_mode = args.decode_mode or "cuda_graph"
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    if args.suite:
        if args.scheduler == "static":
            raise SystemExit("--suite measures the continuous scheduler; drop --scheduler static")
        result = suite(args, device, dtype, card)
        if args.json:
            atomic_write_text(args.json, json.dumps(result, indent=2))
        return 0
    torch.manual_seed(args.seed)
    model, vocab = build_model(name, device, dtype)
    schedulers = ["static", "continuous"] if args.scheduler == "both" else [args.scheduler]
    rows = [run_one(args, s, model, vocab, device) for s in schedulers]
    print(f"model {name}, {card}, {args.requests} requests, {args.clients} clients, rate {args.rate}/s")
    keys = [k for k in rows[0] if k not in ("requests", "clients", "rate")]
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k]) for k in keys))
    if args.json:
        atomic_write_text(args.json, json.dumps({"model": name, "card": card, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
