"""Decode throughput at batch 1 after a long prompt (16k tokens): a ~1.3B hybrid Mamba-Transformer
model against the 1.3B GPT, on one GPU, printed as one table with the card.

Models (random weights, bf16, tied embeddings, vocabulary 50257 padded to 50304):
  GPT     Megatron's classic 1.3B GPT (bench/bench_gpt_1p3b.py): 24 layers, hidden 2048, 16 heads,
          LayerNorm, GeLU, learned absolute positions (extended to prompt + new tokens, so that a
          16k prompt fits; the extra rows are only looked up).
  hybrid  the ~1.3B hybrid of bench_hybrid.py (one definition, hybrid_configs there): NVIDIA's 8B
          Mamba-2-Hybrid recipe scaled down, our allocation of --hybrid-attention-ratio 0.08
          --hybrid-mlp-ratio 0.5 over 40 layers of hidden 2048 (17 Mamba, 20 MLP, 3 attention),
          Mamba state 128, head dim 64, 8 groups (64 Mamba heads), attention 16 heads with 8 query
          groups, MLP 4 * hidden with squared ReLU, RMSNorm, no biases, no position embedding:
          1.314B parameters.
The GPT's attention reads its whole KV cache at every step (24 layers x 16k positions), the hybrid
reads 3 layers' KV cache and the constant recurrent states of its Mamba layers
(gigatron/core/inference/state_cache.py); the table shows both caches per sequence.

Decode tokens/s = N / (time(prompt + N + 1 tokens) - time(prompt + 1 token)): the prefill and the
first sampled token are subtracted, so only the cached one-token steps count (as bench_decode.py).
Greedy, no early stop. Modes: eager (the model op by op each step) and cuda_graph (each step one
CUDA graph replay; the GPT's step runs the Triton decode kernels, the hybrid's the model's own
layers with the Mamba step's two Triton kernels, gigatron/core/ops/ssd_step_triton.py);
cuda_graph-pytorch (hybrid only) runs the Mamba step as plain PyTorch ops instead, to show what the
kernels bring; `--modes compiled` adds torch.compile (slow to compile at these depths).

    python bench/bench_mamba_decode.py                 # one H100: prompt 16384, 128 new tokens
    python bench/bench_mamba_decode.py --cpu-smoke     # tiny models on the CPU: checks the whole path
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_hybrid, also when loaded by path

import bench_hybrid  # noqa: E402

from gigatron.core.inference.engine import InferenceEngine, SamplingParams  # noqa: E402
from gigatron.core.inference.state_cache import inference_context_for  # noqa: E402
from gigatron.core.models.gpt import GPTModel  # noqa: E402
from gigatron.core.models.mamba import MambaModel  # noqa: E402
from gigatron.core.parallel.groups import ParallelGroups  # noqa: E402
from gigatron.core.tokenizers import NullTokenizer  # noqa: E402
from gigatron.core.transformer.config import TransformerConfig  # noqa: E402

FULL = dict(bench_hybrid.FULL, attention_ratio=bench_hybrid.ATTENTION_RATIO, mlp_ratio=bench_hybrid.MLP_RATIO)
SMOKE = dict(hidden=64, gpt_layers=2, heads=4, hybrid_layers=8, attention_ratio=0.125, mlp_ratio=0.375,
             query_groups=2, mamba_state=16, mamba_head_dim=16, mamba_groups=2, vocab=500, padded_vocab=512)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_gpt(shape, positions, device, dtype):
    config = TransformerConfig(
        num_layers=shape["gpt_layers"], hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
        seq_length=positions, max_position_embeddings=positions, attention_dropout=0.0, hidden_dropout=0.0,
        bf16=dtype == torch.bfloat16, params_dtype=dtype, use_cpu_initialization=device.type == "cpu")
    with torch.device(device):
        model = GPTModel(config, ParallelGroups.single(), vocab_size=shape["padded_vocab"])
    return model.to(device).eval()


def build_hybrid(shape, positions, device, dtype):
    pattern = bench_hybrid.hybrid_pattern(shape["hybrid_layers"], shape["attention_ratio"], shape["mlp_ratio"])
    config, mamba = bench_hybrid.hybrid_configs(shape, positions, dtype, pattern,
                                                use_cpu_initialization=device.type == "cpu")
    with torch.device(device):
        model = MambaModel(config, mamba, ParallelGroups.single(), shape["padded_vocab"])
    return model.to(device).eval()


def _timed(fn, device, repeats):
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def decode_rate(engine, prompt, new_tokens, device, repeats):
    """(decode tokens/s, ms per step, greedy tokens of the long run) at batch 1."""
    def run(n):
        params = SamplingParams(tokens_to_generate=n, top_k=1, stop_at_eod=False)
        return engine.generate_tokens([prompt], params).tokens[0]

    run(new_tokens + 1)  # warm-up: kernels, autotuning, CUDA graphs, compilation
    short = _timed(lambda: run(1), device, repeats)
    out = {}
    long = _timed(lambda: out.setdefault("tokens", run(new_tokens + 1)), device, repeats)
    step = max(long - short, 1e-9) / new_tokens
    return 1.0 / step, 1000.0 * step, out["tokens"]


def cache_bytes(model, positions):
    """(KV-cache bytes, recurrent-state bytes) of one sequence of `positions` tokens."""
    ctx = inference_context_for(model, 1, positions, device="meta")
    kv = sum(t.numel() * t.element_size() for t in (*ctx.key_cache.values(), *ctx.value_cache.values()))
    states = getattr(ctx, "mamba_states", None)
    return kv, states.nbytes() if states is not None else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU, checks the whole path")
    parser.add_argument("--prompt-length", type=int, default=None, help="default 16384 (GPU), 48 (CPU smoke)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128 (GPU), 6 (CPU smoke)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=None,
                        choices=["eager", "cuda_graph", "cuda_graph-pytorch", "compiled"],
                        help="decode modes to time (default: eager, cuda_graph and cuda_graph-pytorch on the GPU, "
                             "eager on the CPU); -pytorch: the hybrid's Mamba step as PyTorch ops, not Triton")
    parser.add_argument("--models", nargs="+", default=["gpt", "hybrid"], choices=["gpt", "hybrid"])
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        device, dtype, shape = torch.device("cpu"), torch.float32, SMOKE
        prompt_len, new_tokens = args.prompt_length or 48, args.new_tokens or 6
        modes = args.modes or ["eager"]
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_mamba_decode.py needs a GPU; use --cpu-smoke to check it on the CPU")
        device, dtype, shape = torch.device("cuda"), torch.bfloat16, FULL
        prompt_len, new_tokens = args.prompt_length or 16384, args.new_tokens or 128
        modes = args.modes or ["eager", "cuda_graph", "cuda_graph-pytorch"]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    positions = prompt_len + new_tokens + 2
    tokenizer = NullTokenizer(shape["vocab"] - 1)  # ids 0..V-2 plus the end-of-document id V-1
    prompt = torch.randint(0, shape["vocab"] - 1, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    builders = {"gpt": build_gpt, "hybrid": build_hybrid}
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = builders[name](shape, positions, device, dtype)
        params = sum(p.numel() for p in model.parameters())
        kv, states = cache_bytes(model, positions)
        pattern = "".join(model.layer_types) if name == "hybrid" else "*-" * shape["gpt_layers"]
        tokens = None
        for mode in modes:
            decode_mode, _, variant = mode.partition("-")
            if variant and name != "hybrid":
                continue
            for layer in model.decoder.layers:
                if hasattr(layer, "mixer"):
                    layer.mixer.decode_kernel = "reference" if variant == "pytorch" else "auto"
            engine = InferenceEngine(model, tokenizer, max_batch_size=1, max_sequence_length=positions,
                                     decode_mode=decode_mode)
            rate, ms, got = decode_rate(engine, prompt, new_tokens, device, args.repeats)
            same = "" if tokens is None else ("yes" if got == tokens else "no")
            tokens = tokens if tokens is not None else got
            rows.append(dict(model=name, params=params, pattern=pattern, mode=mode, rate=rate, ms=ms, kv=kv,
                             states=states, same=same, tokens=got))
            print(f"  {name} {mode}: {rate:.1f} tokens/s ({ms:.3f} ms/token)", flush=True)
            del engine
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if args.cpu_smoke and name == "hybrid":
            # The cached decode equals the full forward on the growing sequence (fp32).
            ids = list(prompt)
            with torch.no_grad():
                for _ in range(new_tokens + 1):
                    ids.append(int(model(torch.tensor([ids]))[-1, 0, : shape["vocab"]].argmax()))
            assert rows[-1]["tokens"] == ids, "the hybrid's cached greedy tokens differ from the full forward"
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"\nDecode at batch 1 | card: {card} | {str(dtype).replace('torch.', '')} | prompt {prompt_len} tokens | "
          f"{new_tokens} new tokens (greedy)")
    header = (f"{'model':<7} {'params':>8} {'mode':<11} {'tokens/s':>9} {'ms/token':>9} {'vs GPT':>7} "
              f"{'KV cache/seq':>13} {'Mamba state/seq':>16} {'= eager':>8}")
    print(header)
    print("-" * len(header))
    gpt_rate = {r["mode"]: r["rate"] for r in rows if r["model"] == "gpt"}
    for r in rows:
        base = gpt_rate.get(r["mode"].partition("-")[0])
        ratio = f"{r['rate'] / base:.2f}x" if base else "-"
        print(f"{r['model']:<7} {r['params'] / 1e6:>7.1f}M {r['mode']:<11} {r['rate']:>9.1f} {r['ms']:>9.3f} "
              f"{ratio:>7} {r['kv'] / 2**20:>10.1f} MiB {r['states'] / 2**20:>12.2f} MiB {r['same'] or '-':>8}")
    hybrid = next((r for r in rows if r["model"] == "hybrid"), None)
    if hybrid is not None:
        print(f"hybrid pattern: {hybrid['pattern']}")
    if args.cpu_smoke:
        assert all(r["rate"] > 0 and r["ms"] > 0 for r in rows)
        print("cpu smoke: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
