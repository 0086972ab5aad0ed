"""Estimated against measured peak memory per rank, and the throughput cost of each recompute mode.

The model is the 1.3B GPT of bench/bench_gpt_1p3b.py (24 layers, hidden 2048, 16 heads, sequence
2048, vocabulary 50304, LayerNorm, GeLU, tied embeddings, no dropout, bf16 with fp32 gradients and
master weights, Adam), trained eagerly (no torch.compile, whose fusions change what is saved) with
the product's DDP, optimizer and schedules on random tokens. For each configuration every rank
runs one step (so the optimizer states exist), resets the CUDA peak counters, runs --iters timed
steps, and reports torch.cuda.max_memory_allocated / max_memory_reserved next to
gigatron.core.memory's estimate of peak allocated bytes for that rank (pipeline stage and
data-parallel shard). Configurations needing more ranks than launched are skipped.

    python bench/bench_memory.py                                  # one GPU: the single-rank rows
    torchrun --nproc-per-node 2 bench/bench_memory.py             # + tp=2 sequence parallel, pp=2 1F1B
    python bench/bench_memory.py --cpu-smoke                      # tiny model on the CPU (self-check)

With --cpu-smoke the model is tiny and "measured" is what the CPU run holds: parameters, gradient
buffers, main parameters and optimizer states counted tensor by tensor plus the high-water mark of
activations kept for backward (saved-tensor hooks), compared with the estimate without temporaries.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gigatron.core import memory  # noqa: E402
from gigatron.core.distributed import DDPConfig, DistributedDataParallel, finalize_model_grads  # noqa: E402
from gigatron.core.models.gpt import GPTModel  # noqa: E402
from gigatron.core.optim import OptimizerConfig, get_optimizer  # noqa: E402
from gigatron.core.parallel.config import ParallelConfig  # noqa: E402
from gigatron.core.parallel.groups import ParallelGroups  # noqa: E402
from gigatron.core.parallel.random import model_parallel_seed  # noqa: E402
from gigatron.core.pipeline import get_forward_backward_func  # noqa: E402
from gigatron.core.transformer.config import TransformerConfig  # noqa: E402

FULL = dict(num_layers=24, hidden_size=2048, num_attention_heads=16, seq_length=2048, vocab=50304)
LARGE = dict(num_layers=32, hidden_size=2560, num_attention_heads=32, seq_length=4096, vocab=50304)
SMOKE = dict(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=64, vocab=256)


@dataclass
class Case:
    name: str
    micro_batch_size: int
    num_microbatches: int = 2
    tp: int = 1
    pp: int = 1
    distributed_optimizer: bool = False
    model: dict = field(default_factory=dict)
    throughput: bool = False
    """Part of the recompute throughput comparison."""


def cases(mbs: int) -> list:
    full_uniform = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return [
        Case("no recompute", mbs, throughput=True),
        Case("selective core_attn", mbs, model=dict(recompute_granularity="selective"), throughput=True),
        Case("selective mlp+layernorm", mbs, model=dict(recompute_granularity="selective",
                                                       recompute_modules=["mlp", "layernorm"]), throughput=True),
        Case("full uniform 1", mbs, model=full_uniform, throughput=True),
        Case("full block half", mbs, model=dict(recompute_granularity="full", recompute_method="block",
                                                recompute_num_layers=-1), throughput=True),
        Case("fused loss", mbs, model=dict(cross_entropy_loss_fusion=True)),
        Case("distributed optimizer", mbs, distributed_optimizer=True),
        Case("tp2 sequence parallel", mbs, tp=2, model=dict(sequence_parallel=True)),
        Case("tp2 full distributed", mbs, tp=2, model=dict(full_uniform, distribute_saved_activations=True)),
        Case("pp2 1F1B", mbs, pp=2, num_microbatches=4),
        Case("pp2 1F1B dist-opt full", mbs, pp=2, num_microbatches=4, distributed_optimizer=True, model=full_uniform),
    ]


def _config(case: Case, shape: dict, bf16: bool) -> TransformerConfig:
    extra = dict(case.model)
    if extra.get("recompute_num_layers") == -1:
        extra["recompute_num_layers"] = shape["num_layers"] // case.pp // 2
    return TransformerConfig(
        num_layers=shape["num_layers"], hidden_size=shape["hidden_size"],
        num_attention_heads=shape["num_attention_heads"], seq_length=shape["seq_length"],
        attention_dropout=0.0, hidden_dropout=0.0, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        tensor_model_parallel_size=case.tp, pipeline_model_parallel_size=case.pp, **extra)


class _LiveSaved:
    """High-water mark of the distinct storages kept for backward (CPU measurement)."""

    def __init__(self, params):
        self.params, self.refs, self.live, self.peak = params, {}, 0, 0

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.params:
            return t
        return _Held(self, ptr, t)

    @staticmethod
    def unpack(packed):
        return packed if isinstance(packed, torch.Tensor) else packed.tensor


class _Held:
    def __init__(self, tracker, ptr, tensor):
        self.tracker, self.ptr, self.tensor = tracker, ptr, tensor
        count, nbytes = tracker.refs.get(ptr, (0, tensor.untyped_storage().nbytes()))
        if count == 0:
            tracker.live += nbytes
            tracker.peak = max(tracker.peak, tracker.live)
        tracker.refs[ptr] = (count + 1, nbytes)

    def __del__(self):
        count, nbytes = self.tracker.refs[self.ptr]
        if count == 1:
            self.tracker.live -= nbytes
            del self.tracker.refs[self.ptr]
        else:
            self.tracker.refs[self.ptr] = (count - 1, nbytes)


def _configs(case: Case, shape: dict, device: torch.device):
    """(TransformerConfig, DDPConfig, OptimizerConfig) of a configuration."""
    config = _config(case, shape, bf16=device.type != "cpu")
    ddp_config = DDPConfig(use_distributed_optimizer=case.distributed_optimizer)
    opt_config = OptimizerConfig(lr=1e-4, bf16=config.bf16, params_dtype=config.params_dtype,
                                 use_distributed_optimizer=case.distributed_optimizer)
    return config, ddp_config, opt_config


def _estimate(case: Case, shape: dict, device: torch.device, configs, data_parallel_size: int,
              pp_rank: int = 0, dp_rank: int = 0):
    """gigatron.core.memory's estimate for one rank of a configuration."""
    return memory.estimate_rank_memory(
        *configs, vocab_size=shape["vocab"], micro_batch_size=case.micro_batch_size,
        seq_length=shape["seq_length"], num_microbatches=case.num_microbatches,
        data_parallel_size=data_parallel_size, pp_rank=pp_rank, dp_rank=dp_rank, device_type=device.type)


def _estimate_first_rank(case: Case, shape: dict, device: torch.device, world: int) -> int:
    """The estimate of rank 0's peak (for a configuration that ran out of memory)."""
    return _estimate(case, shape, device, _configs(case, shape, device), world // (case.tp * case.pp)).allocated


def run_case(case: Case, shape: dict, args, device: torch.device, world: int, rank: int):
    cpu = device.type == "cpu"
    # Bytes still allocated from earlier configurations (none once they are collected); they
    # are left out of this configuration's measured peak and reported.
    leftover = torch.cuda.memory_allocated(device) if not cpu else 0
    config, ddp_config, opt_config = _configs(case, shape, device)
    groups = ParallelGroups.build(ParallelConfig(tensor_model_parallel_size=case.tp,
                                                 pipeline_model_parallel_size=case.pp,
                                                 sequence_parallel=config.sequence_parallel))
    model_parallel_seed(1234 + 100 * groups.pp.rank, groups)
    dp = groups.dp.size
    vocab = shape["vocab"]
    with torch.device(device):
        model = GPTModel(config, groups, vocab, pre_process=groups.is_pipeline_first_stage(),
                         post_process=groups.is_pipeline_last_stage())
    ddp = DistributedDataParallel(ddp_config, model, groups)
    optimizer = get_optimizer(opt_config, [ddp], groups)
    s, b, m = shape["seq_length"], case.micro_batch_size, case.num_microbatches
    gen = torch.Generator(device=device).manual_seed(rank)
    batches = [torch.randint(0, vocab, (b, s + 1), device=device, generator=gen) for _ in range(m)]
    positions = torch.arange(s, device=device)[None].expand(b, s).contiguous()
    schedule = get_forward_backward_func(case.pp)

    def forward_step(data_iterator, chunk):
        text = next(data_iterator)
        per_token = chunk(text[:, :-1].contiguous(), positions, None, labels=text[:, 1:].contiguous())

        def loss_func(output):
            return output.mean(), {"lm loss": output.detach().mean()}

        return per_token, loss_func

    def step():
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        schedule(forward_step_func=forward_step, data_iterator=iter(batches), model=ddp, num_microbatches=m,
                 seq_length=s, micro_batch_size=b, groups=groups, config=config,
                 finalize_model_grads_func=lambda chunks: finalize_model_grads(chunks, groups, config))
        optimizer.step()

    step()  # the optimizer states exist from here on
    tracker = _LiveSaved({p.untyped_storage().data_ptr() for p in model.parameters()})
    if cpu:
        with _count_inside_layernorm_recompute(tracker), \
                torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
            step()
        start = time.perf_counter()
        elapsed_ms = 0.0
    else:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(args.iters):
            step()
        end.record()
        torch.cuda.synchronize(device)
        elapsed_ms = begin.elapsed_time(end) / args.iters
        start = None
    estimate = _estimate(case, shape, device, (config, ddp_config, opt_config), dp,
                         pp_rank=groups.pp.rank, dp_rank=groups.dp.rank)
    if cpu:
        measured = _counted_state(ddp, optimizer) + tracker.peak
        estimated = estimate.state + _cpu_activation_peak(config, estimate, b, s)
        reserved = None
        del start
    else:
        measured = torch.cuda.max_memory_allocated(device) - leftover
        reserved = torch.cuda.max_memory_reserved(device)
        if leftover > 2**20:
            print(f"{case.name}: {leftover / 2**30:.3f} GiB of earlier configurations still allocated "
                  "(left out of the measured peak)", flush=True)
        estimated = estimate.allocated
    tokens_per_s = (world // (case.tp * case.pp)) * m * b * s / (elapsed_ms / 1000.0) if elapsed_ms else None
    row = dict(case=case.name, rank=rank, tp_rank=groups.tp.rank, pp_rank=groups.pp.rank, dp=dp,
               estimated=estimated, measured=measured, reserved=reserved, ms=elapsed_ms, tokens_per_s=tokens_per_s,
               estimate_activations=estimate.activations, estimate_state=estimate.state,
               estimate_temporary=estimate.temporary)
    del model, ddp, optimizer, batches
    if not cpu:
        torch.cuda.empty_cache()
    return row


class _count_inside_layernorm_recompute:
    """The layernorm-recompute hooks sit inside the tracker's hooks (the innermost hooks win): let
    the tensors they keep go through the tracker too."""

    def __init__(self, tracker):
        from gigatron.core.transformer import layer as layer_module

        self.cls, self.tracker = layer_module._DiscardNormOutput, tracker

    def __enter__(self):
        cls, tracker = self.cls, self.tracker
        self.pack, self.unpack = cls.pack, cls.unpack
        pack, unpack = cls.pack, cls.unpack

        def counted_pack(discard, t):
            packed = pack(discard, t)
            return tracker.pack(packed) if isinstance(packed, torch.Tensor) else packed

        def counted_unpack(discard, packed):
            return unpack(discard, packed.tensor if isinstance(packed, _Held) else packed)

        cls.pack, cls.unpack = counted_pack, counted_unpack
        return self

    def __exit__(self, *exc):
        self.cls.pack, self.cls.unpack = self.pack, self.unpack
        return False


def _cpu_activation_peak(config, estimate, b: int, s: int) -> int:
    """CPU smoke only: the kept activations, or -- when a recomputed part of the last layers runs
    its backward -- what is still kept then (the loss and final norm are freed) plus the
    recomputed activations of one checkpointed chunk (full) or one layer's MLP (selective mlp)."""
    import dataclasses

    kept = estimate.activations
    terms = estimate.activation_terms
    plain = dataclasses.replace(config, recompute_granularity=None, recompute_method=None,
                                recompute_num_layers=None, recompute_modules=None, distribute_saved_activations=False)
    per_layer = memory.layer_activation_bytes(plain, b, s, device_type="cpu")
    tokens = s // config.tensor_model_parallel_size if config.sequence_parallel else s
    layer_input = tokens * b * config.hidden_size * memory.dtype_bytes(config.params_dtype)
    if config.recompute_granularity == "full":
        chunk = config.recompute_num_layers if config.recompute_method == "uniform" else 1
        working = chunk * sum(per_layer.values()) - layer_input
        if config.distribute_saved_activations and config.tensor_model_parallel_size > 1:
            working += layer_input - layer_input // config.tensor_model_parallel_size
        during = terms.get("embedding", 0) + terms.get("recompute checkpoints", 0) + working
        return max(kept, during)
    if config.recompute_granularity == "selective" and "mlp" in config.recompute_modules:
        working = sum(v for k, v in per_layer.items() if k.startswith("mlp "))
        during = kept - terms.get("output layer and loss", 0) - terms.get("final norm", 0) + working
        return max(kept, during)
    return kept


def _counted_state(ddp, optimizer) -> int:
    if hasattr(optimizer, "memory_bytes"):
        return sum(optimizer.memory_bytes().values())
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.grad_buffers)
    params = sum(p.numel() * p.element_size() for p in ddp.module.parameters())
    mains = sum(e.main_param.numel() * e.main_param.element_size() for e in optimizer.entries
                if e.main_param.data_ptr() != e.model_param.data_ptr())
    states = sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
                 if torch.is_tensor(v) and v.dim() > 0)
    return params + grads + mains + states


_UNIT = [memory.GIB, "GiB"]


def _gib(x) -> str:
    return "-" if x is None else f"{x / _UNIT[0]:.{2 if _UNIT[1] == 'GiB' else 3}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--iters", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--cases", nargs="+", default=None, help="names of configurations to run (default: all)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU, gloo (self-check)")
    parser.add_argument("--model", choices=["1.3b", "2.7b"], default="1.3b",
                        help="1.3b: 24 x 2048, seq 2048; 2.7b: 32 x 2560, 32 heads, seq 4096 (one that needs "
                             "recompute on one GPU at a large micro batch)")
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.cpu_smoke:
        device, backend, shape = torch.device("cpu"), "gloo", SMOKE
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_memory.py measures CUDA memory: run it on a GPU (or use --cpu-smoke)")
        device, backend, shape = torch.device("cuda", local_rank), "nccl", (LARGE if args.model == "2.7b" else FULL)
        torch.cuda.set_device(device)
    if world > 1:
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=rank, world_size=world, **kwargs)
    else:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group(backend, rank=0, world_size=1)

    rows, skipped = [], []
    for case in cases(args.micro_batch_size):
        if args.cases and case.name not in args.cases:
            continue
        if world % (case.tp * case.pp):
            skipped.append(case.name)
            continue
        try:
            row = run_case(case, shape, args, device, world, rank)
        except torch.OutOfMemoryError:
            row = dict(case=case.name, rank=rank, oom=True, estimated=_estimate_first_rank(case, shape, device, world))
        # The model, DDP hooks and optimizer of a case form reference cycles: collect them before
        # the next case, whose peak would otherwise include them.
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        gathered = [None] * world
        dist.all_gather_object(gathered, row)
        rows.extend(gathered)

    if rank == 0:
        _print(rows, skipped, device, shape, args, world)
    dist.destroy_process_group()
    return 0


def _print(rows, skipped, device, shape, args, world) -> None:
    if device.type == "cpu":
        _UNIT[:] = [1024 ** 2, "MiB"]
    name = "CPU" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"device: {name}, {world} rank(s), torch {torch.__version__}; model {shape}, micro batch "
          f"{args.micro_batch_size}")
    what = ("state + kept activations (CPU)" if device.type == "cpu"
            else "peak allocated (torch.cuda.max_memory_allocated)")
    print(f"measured = {what}\n")
    u = _UNIT[1]
    print(f"| configuration | rank (tp, pp) | dp | estimated {u} | measured {u} | error | reserved {u} | "
          f"est. activations {u} | est. temporary {u} | ms/iter |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("oom"):
            capacity = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
            print(f"| {r['case']} | {r['rank']} | | {_gib(r.get('estimated'))} | out of memory"
                  f"{f' (device {_gib(capacity)})' if capacity else ''} | | | | | |")
            continue
        error = 100.0 * (r["estimated"] - r["measured"]) / r["measured"]
        print(f"| {r['case']} | {r['rank']} ({r['tp_rank']}, {r['pp_rank']}) | {r['dp']} | {_gib(r['estimated'])} | "
              f"{_gib(r['measured'])} | {error:+.1f}% | {_gib(r['reserved'])} | {_gib(r['estimate_activations'])} | "
              f"{_gib(r['estimate_temporary'])} | {r['ms']:.1f} |")
    if skipped:
        print(f"\nskipped (need more ranks): {', '.join(skipped)}")
    base = next((r for r in rows if r["case"] == "no recompute" and r["rank"] == 0 and not r.get("oom")), None)
    if base and base["tokens_per_s"]:
        print(f"\nrecompute throughput at seq {shape['seq_length']} (rank 0):")
        print("| recompute | ms/iter | tokens/s | vs none |")
        print("|---|---|---|---|")
        for r in rows:
            if r["rank"] == 0 and not r.get("oom") and r["case"] in {c.name for c in cases(1) if c.throughput}:
                print(f"| {r['case']} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} | "
                      f"{100.0 * (r['tokens_per_s'] / base['tokens_per_s'] - 1):+.1f}% |")


if __name__ == "__main__":
    sys.exit(main())
