"""Serving under load: N concurrent streaming clients with Poisson arrivals against the HTTP
server (in process, uvicorn on 127.0.0.1), next to the same requests run as one offline batch.

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
  - kv_slot_use: the mean share of a KV-cache slot (S positions) a request fills at its end, what
    fixed slots leave unused and paged blocks would lend to other sequences;
  - on a GPU, the decode bandwidth bound: a step of b rows at kv positions each reads every weight
    once and each row's keys and values up to its position, so
        step time >= (W + sum_r 2 * L * kv_len_r * g * d * e) / BW,
    W = weight bytes, L layers, g key/value groups, d head dim, e bytes per element, BW the copy
    bandwidth measured in the same run (bytes read + written / time of a large device copy); the
    bound in tokens/s is b over that time, at the mean kv length of the run's requests, and the
    fraction reported is output tokens/s over the bound at the mean number of running sequences.

    python bench/bench_serving.py --cpu-smoke                         # tiny model on CPU, both schedulers
    python bench/bench_serving.py --scheduler continuous --clients 64 --requests 512 --rate 20
    python bench/bench_serving.py --model llama8b --clients 64 --requests 256 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def bandwidth_bound(model, engine, rows: float, kv_len: float, bandwidth: float) -> float:
    """Tokens/s bound of a decode step of `rows` sequences at mean kv length kv_len (the formula of
    the module docstring)."""
    config = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    element = next(model.parameters()).element_size()
    kv = 2 * config.num_layers * kv_len * config.num_query_groups * config.kv_channels * element
    return rows * bandwidth / (weights + rows * kv)


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
    server = serve_in_background(app, ready_polls=400)
    try:
        results, wall = asyncio.run(run_load(server.url, requests, gaps, args.clients, tokenizer.eod))
    finally:
        server.stop(join_timeout=30)
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["stamps"][0] - r["sent"] for r in results if r["stamps"]]
    itl = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    row = {"scheduler": scheduler, "requests": len(results), "clients": args.clients, "rate": args.rate,
           "request_throughput": len(results) / wall, "output_tokens_per_s": tokens / wall,
           "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
           "itl_p50_ms": 1e3 * percentile(itl, 50), "itl_p99_ms": 1e3 * percentile(itl, 99),
           "offline_tokens_per_s": offline(engine, scheduler, requests, args.max_batch_size, tokenizer.eod,
                                           args.max_requests or args.max_batch_size, args.prefill_chunk)}
    row["under_load_over_offline"] = row["output_tokens_per_s"] / row["offline_tokens_per_s"]
    # What fixed slots cost: the share of a slot's S positions a request fills at its end (paged
    # blocks would lend the rest to other sequences).
    row["kv_slot_use"] = statistics.mean((len(p) + n) / seq for p, n in requests)
    if device.type == "cuda":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_decode import measure_bandwidth
        bandwidth = measure_bandwidth(device, 2.0)
        mean_kv = statistics.mean(len(p) + n / 2 for p, n in requests)
        rows = min(args.clients, args.max_requests or args.max_batch_size)
        bound = bandwidth_bound(model, engine, rows, mean_kv, bandwidth)
        row.update(bandwidth_GBps=bandwidth / 1e9, bound_tokens_per_s=bound,
                   fraction_of_bound=row["output_tokens_per_s"] / bound)
    return row


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
    p.add_argument("--decode-mode", choices=["eager", "cuda_graph", "compiled"], default="eager")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file (atomically)")
    p.add_argument("--cpu-smoke", action="store_true", help="a tiny model on CPU, a few requests: checks the path")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        device, dtype, name = torch.device("cpu"), torch.float32, "smoke"
        args.clients, args.requests, args.rate = 4, 8, 50.0
        args.prompt_min, args.prompt_max, args.output_min, args.output_max = 4, 24, 4, 16
        args.max_batch_size, args.max_requests, args.prefill_chunk = 4, 3, 8
        args.decode_mode = "eager"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_serving.py needs a GPU (or --cpu-smoke)")
        device, dtype, name = torch.device("cuda"), torch.bfloat16, args.model
    torch.manual_seed(args.seed)
    model, vocab = build_model(name, device, dtype)
    schedulers = ["static", "continuous"] if args.scheduler == "both" else [args.scheduler]
    rows = [run_one(args, s, model, vocab, device) for s in schedulers]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
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
