"""Upstream Megatron-Core as a test oracle: build its GPTModel on the CPU, save it the way
Megatron-LM's training loop does (`torch` rank files, `torch_dist` directories), load directories
with Megatron's own loader, and compute its logits.

Tests run this file as a script in a subprocess (`run_oracle`): importing megatron.core registers
Megatron's classes as globally allowed in PyTorch's weights-only unpickler, which must not leak
into the test process (it would hide exactly the refusals the tests check). Tests skip when the
`megatron-core` package is absent (`megatron_available()`).

    python tests/megatron_oracle.py write-torch --kind gpt --root DIR --iteration 5
    python tests/megatron_oracle.py write-dist --kind llama --root DIR --tp 2 --pp 1  (tp*pp processes)
    python tests/megatron_oracle.py write-legacy --root DIR --release --version 0 --tp 2
    python tests/megatron_oracle.py load-torch --kind llama --root DIR    (Megatron loads our torch file)
    python tests/megatron_oracle.py logits --kind llama --root DIR    (Megatron loads DIR at tp=pp=1;
                                                          with --tp 2 in two processes at tp=2)
    python tests/megatron_oracle.py train --root DIR --optim distributed   (dp processes: Megatron-Core's
                            DDP + get_megatron_optimizer train, save a full torch_dist checkpoint at
                            --iteration, train on; DIR/losses.pt holds every iteration's loss)
    python tests/megatron_oracle.py resume --root DIR --iteration 4 --total 6   (the same objects load
                            DIR/iter_4 with dist_checkpointing.load, model + optimizer + scheduler, and
                            train on; DIR/resumed_losses.pt)
    python tests/megatron_oracle.py step-save --root DIR --tp 2 --pp 2 --kinds gpt,llama --sharding \
        dp_reshardable --also-save fully_reshardable DIR2   (tp*pp processes: for each kind, the
                            distributed optimizer takes two steps on fixed random gradients, no
                            forward; its state saved in both shardings, DIR/KIND and DIR2/KIND)

Every command writes DIR/reference.pt: {"tokens", "logits"} (fp32, Megatron-Core's forward).

Megatron-Core needs torch.distributed and its model-parallel state even in one process; its RoPE
moves a buffer to `torch.cuda.current_device()` and its attention forks the CUDA RNG tracker and its checkpoint writer synchronises CUDA (and a tied embedding at pipeline size > 1 is
moved to CUDA for its all-reduce), so on a CPU-only machine `cpu_only()` points that
at the CPU for the duration of a test."""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import warnings
from typing import Optional

import numpy as np
import torch

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

VOCAB = 4096  # --mock-data documents hold ids up to 4095
SEQ = 16


@contextlib.contextmanager
def cpu_only():
    """Let Megatron-Core's `torch.cuda.current_device()` calls resolve to the CPU."""
    if torch.cuda.is_available():
        yield
        return
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    original = torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.cuda
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # the tied embedding's all-reduce at pp > 1
    tracker.fork = lambda *args, **kwargs: contextlib.nullcontext()  # dropout is 0: no CUDA RNG to fork
    try:
        yield
    finally:
        torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.cuda = original
        del tracker.fork


@contextlib.contextmanager
def cpu_training():
    """`cpu_only` plus what Megatron-Core's DDP and optimizers ask of CUDA on the CPU: tensors made
    with device="cuda" are made on the CPU, and a CPU tensor reports its CUDA type name
    (`torch.cuda.FloatTensor`), which the optimizers check before accepting a parameter."""
    if torch.cuda.is_available():
        yield
        return
    factories = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "empty_like")
    originals = {name: getattr(torch, name) for name in factories}
    type_name = torch.Tensor.type

    def on_cpu(factory):
        def make(*args, **kwargs):
            device = kwargs.get("device")
            if device is not None and "cuda" in str(device):
                kwargs["device"] = "cpu"
            return factory(*args, **kwargs)
        return make

    def cuda_type(self, *args, **kwargs):
        if args or kwargs:
            return type_name(self, *args, **kwargs)
        return type_name(self).replace("torch.", "torch.cuda.", 1)

    for name, factory in originals.items():
        setattr(torch, name, on_cpu(factory))
    torch.Tensor.type = cuda_type
    try:
        with cpu_only():
            yield
    finally:
        for name, factory in originals.items():
            setattr(torch, name, factory)
        torch.Tensor.type = type_name


def init_parallel(tp: int = 1, pp: int = 1, port: Optional[int] = None, ep: int = 1) -> None:
    """torch.distributed (gloo) and Megatron-Core's parallel state for this process."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port or 29650))
        dist.init_process_group("gloo", rank=int(os.environ.get("RANK", "0")),
                                world_size=int(os.environ.get("WORLD_SIZE", "1")))
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             expert_model_parallel_size=ep)


def destroy_parallel() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# Model options: "gpt" (GPT-2 style: LayerNorm, learned positions, GELU, biases, tied output) and
# "llama" (RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases, untied output).
OPTIONS = {
    "gpt": dict(normalization="LayerNorm", position_embedding_type="learned_absolute", swiglu=False,
                add_bias_linear=True, num_query_groups=None, untie=False),
    # mixture of experts: 4 SequentialMLP experts (top-2) in every layer. Megatron-Core's MoE
    # forward needs CUDA, so its oracle is the weights (model.state_dict()), not logits.
    "moe": dict(normalization="RMSNorm", position_embedding_type="rope", swiglu=True, add_bias_linear=False,
                num_query_groups=None, untie=True, num_experts=4),
    "llama": dict(normalization="RMSNorm", position_embedding_type="rope", swiglu=True, add_bias_linear=False,
                  num_query_groups=2, untie=True),
}


def build_model(kind: str = "gpt", num_layers: int = 2, hidden: int = 64, heads: int = 4, ffn: int = 256,
                seed: int = 1234, pre_process: bool = True, post_process: bool = True):
    """A Megatron-Core GPTModel (local layer spec) with random weights, fp32, eval mode."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    opts = OPTIONS[kind]
    torch.manual_seed(seed)
    config = TransformerConfig(
        num_layers=num_layers, hidden_size=hidden, num_attention_heads=heads, ffn_hidden_size=ffn,
        num_query_groups=opts["num_query_groups"], normalization=opts["normalization"],
        gated_linear_unit=opts["swiglu"], add_bias_linear=opts["add_bias_linear"],
        activation_func=torch.nn.functional.silu if opts["swiglu"] else torch.nn.functional.gelu,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, init_method_std=0.05,
        tensor_model_parallel_size=_tp_size(), pipeline_model_parallel_size=_pp_size(), layernorm_epsilon=1e-5,
        pipeline_dtype=torch.float32, expert_model_parallel_size=_ep_size(), num_moe_experts=opts.get("num_experts"),
        moe_router_topk=2 if opts.get("num_experts") else 2, moe_ffn_hidden_size=96 if opts.get("num_experts") else None,
        moe_token_dispatcher_type="allgather", sequence_parallel=_tp_size() > 1 and bool(opts.get("num_experts")))
    spec = get_gpt_layer_local_spec(normalization=opts["normalization"], num_experts=opts.get("num_experts"),
                                    moe_grouped_gemm=False)
    with cpu_only():
        model = GPTModel(config, spec, vocab_size=VOCAB,
                         max_sequence_length=SEQ * 2, position_embedding_type=opts["position_embedding_type"],
                         share_embeddings_and_output_weights=not opts["untie"], pre_process=pre_process,
                         post_process=post_process)
    with torch.no_grad():  # non-trivial norms, so that a swapped norm weight shows in the logits
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))
    return model.eval()


def _tp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def _ep_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_expert_model_parallel_world_size()


def _pp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_world_size()


def tokens(batch: int = 2, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, SEQ), generator=g)


def logits(model, toks: torch.Tensor) -> torch.Tensor:
    """Megatron-Core's logits [batch, seq, vocab] (a tp=1, pp=1 model)."""
    positions = torch.arange(toks.shape[1]).unsqueeze(0).expand_as(toks)
    mask = torch.triu(torch.ones(toks.shape[1], toks.shape[1], dtype=torch.bool), diagonal=1)[None, None]
    with cpu_only(), torch.no_grad():
        return model(toks, positions, mask)


def megatron_args(kind: str = "gpt", num_layers: int = 2, hidden: int = 64, heads: int = 4, ffn: int = 256,
                  tp: int = 1, pp: int = 1, iteration: int = 0, **extra) -> argparse.Namespace:
    """The `args` Namespace Megatron-LM's training loop pickles into its checkpoints, with the
    object types it holds (Megatron's enums, signal.Signals, torch.dtype, pathlib paths)."""
    import pathlib

    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    opts = OPTIONS[kind]
    values = dict(
        num_layers=num_layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
        kv_channels=hidden // heads, group_query_attention=opts["num_query_groups"] is not None,
        num_query_groups=opts["num_query_groups"] or heads, max_position_embeddings=SEQ * 2, seq_length=SEQ,
        position_embedding_type=opts["position_embedding_type"], rotary_base=10000, rotary_percent=1.0,
        rotary_interleaved=False, normalization=opts["normalization"], norm_epsilon=1e-5, apply_layernorm_1p=False,
        swiglu=opts["swiglu"], add_bias_linear=opts["add_bias_linear"], add_qkv_bias=opts["add_bias_linear"],
        untie_embeddings_and_output_weights=opts["untie"], squared_relu=False, openai_gelu=False,
        qk_layernorm=False, padded_vocab_size=VOCAB, vocab_size=VOCAB - 1, make_vocab_size_divisible_by=VOCAB,
        tokenizer_type="NullTokenizer", tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None, expert_model_parallel_size=1, num_experts=opts.get("num_experts"),
        params_dtype=torch.float32, fp16=False, bf16=False, model_type=ModelType.encoder_or_decoder,
        attention_backend=AttnBackend.auto, exit_signal=signal.SIGTERM, data_path=[pathlib.PosixPath("/data/x")],
        consumed_train_samples=iteration * 8, consumed_valid_samples=iteration * 2, iteration=iteration,
        ckpt_format="torch", transformer_impl="local", micro_batch_size=2, global_batch_size=8, seed=1234,
        lr=1e-4, train_iters=100)
    if opts.get("num_experts"):
        values.update(moe_router_topk=2, moe_ffn_hidden_size=96, moe_grouped_gemm=False, moe_layer_freq=1,
                      moe_router_score_function="softmax", moe_router_load_balancing_type="aux_loss",
                      moe_token_dispatcher_type="allgather")
    values.update(extra)
    return argparse.Namespace(**values)


def rng_state() -> dict:
    """One data-parallel rank's RNG state as Megatron-LM stores it (numpy's state as an array)."""
    return {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.get_rng_state(),
            "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()}}


def torch_state(model, args: argparse.Namespace, iteration: int) -> dict:
    """What Megatron-LM's `torch` format writes into mp_rank_XX/model_optim_rng.pt."""
    return {
        "args": args, "checkpoint_version": 3.0, "iteration": iteration,
        "model": model.state_dict_for_save_checkpoint(),
        "rerun_state_machine": None, "rng_state": [rng_state()],
        "opt_param_scheduler": {"max_lr": 1e-4, "lr_warmup_steps": 0, "num_steps": iteration * 8,
                                "lr_decay_style": "cosine", "lr_decay_steps": 800, "min_lr": 1e-5,
                                "start_wd": 0.01, "end_wd": 0.01, "wd_incr_style": "constant",
                                "wd_incr_steps": 800},
        "num_floating_point_operations_so_far": 123.0,
    }


def write_tracker(root: str, value) -> None:
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as handle:
        handle.write(str(value))


def save_dist(sharded_state_dict: dict, directory: str) -> None:
    """`megatron.core.dist_checkpointing.save` (Megatron's torch_dist writer) into `directory`."""
    from megatron.core import dist_checkpointing

    os.makedirs(directory, exist_ok=True)
    with cpu_only():
        dist_checkpointing.save(sharded_state_dict, directory)


# ------------------------------------------------------------------ script side


def _sharded_common(args: argparse.Namespace, iteration: int) -> dict:
    """The non-sharded part of Megatron-LM's torch_dist checkpoint state (its common.pt)."""
    return {"args": args, "checkpoint_version": 3.0, "iteration": iteration,
            "opt_param_scheduler": {
                "max_lr": 1e-4, "lr_warmup_steps": 0, "num_steps": iteration * 8, "lr_decay_style": "cosine",
                "lr_decay_steps": 800, "min_lr": 1e-5, "start_wd": 0.01, "end_wd": 0.01,
                "wd_incr_style": "constant", "wd_incr_steps": 800},
            "num_floating_point_operations_so_far": 123.0}


# Megatron-LM's documented pre-Megatron-Core names for the layers (megatron/model/transformer.py)
# and Megatron-Core's local-spec names of the same weights; the legacy fixtures are written from these.
LEGACY_LAYER = {
    "input_layernorm": "input_layernorm", "self_attention.linear_qkv": "self_attention.query_key_value",
    "self_attention.linear_proj": "self_attention.dense", "pre_mlp_layernorm": "post_attention_layernorm",
    "mlp.linear_fc1": "mlp.dense_h_to_4h", "mlp.linear_fc2": "mlp.dense_4h_to_h",
}
# Tensor-parallel split of Megatron's column-parallel (dim 0) and row-parallel (dim 1) weights.
ROW_PARALLEL = ("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")
COLUMN_PARALLEL = ("query_key_value", "dense_h_to_4h", "word_embeddings", "output_layer")


def legacy_rank_files(model, args: argparse.Namespace, tp: int, version: float, heads: int) -> list:
    """The `model` entry of each tensor-parallel rank of a legacy (pre-Megatron-Core) GPT
    checkpoint holding the Megatron-Core model's weights, at checkpoint_version `version`."""
    ranks = [{"language_model": {"embedding": {}, "encoder": {}}} for _ in range(tp)]
    head_dim = args.hidden_size // heads
    for name, tensor in model.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        if name.startswith("decoder.layers."):
            layer, rest = name[len("decoder.layers."):].split(".", 1)
            module, leaf = rest.rsplit(".", 1)
            legacy, where = f"layers.{layer}.{LEGACY_LAYER[module]}.{leaf}", "encoder"
        elif name.startswith("decoder.final_layernorm."):
            legacy, where = "final_layernorm." + name.rsplit(".", 1)[1], "encoder"
        elif name.startswith("embedding."):
            legacy, where = name[len("embedding."):], "embedding"
        elif name == "output_layer.weight":
            legacy, where = "weight", "output_layer"
        else:
            raise KeyError(name)
        if any(c in legacy or c == where for c in COLUMN_PARALLEL) and not legacy.startswith("position"):
            shards = list(tensor.chunk(tp, dim=0))
        elif any(legacy.endswith(r) for r in ROW_PARALLEL):
            shards = list(tensor.chunk(tp, dim=1))
        else:
            shards = [tensor] * tp
        for rank, shard in enumerate(shards):
            if "query_key_value" in legacy and version < 2.0:
                rest = tuple(shard.shape[1:])
                per_head = shard.reshape(-1, 3, head_dim, *rest)  # [heads][q, k, v][head_dim]
                order = (1, 0, 2) if version < 1.0 else (0, 2, 1)  # v0: [3][heads][d]; v1: [heads][d][3]
                shard = per_head.permute(*order, *range(3, 3 + len(rest))).reshape(shard.shape)
            target = ranks[rank]["language_model"]
            if where == "embedding":
                module, leaf = legacy.rsplit(".", 1)
                target["embedding"].setdefault(module, {})[leaf] = shard.clone()
            else:
                target.setdefault(where, {})[legacy] = shard.clone()
    return ranks


# ------------------------------------------------------------------ training (model + optimizer)

TRAIN = dict(lr=2e-3, min_lr=2e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, clip_grad=1.0,
             micro_batch=2, warmup=2, decay_iters=20)


def train_batch(iteration: int, dp_rank: int, dp_size: int) -> torch.Tensor:
    """The micro-batch of data-parallel rank `dp_rank` at `iteration`: [micro_batch, SEQ + 1] token ids
    (inputs and shifted labels); the global batch is the ranks' micro-batches in rank order."""
    g = torch.Generator().manual_seed(1000 + iteration)
    batch = torch.randint(0, VOCAB, (TRAIN["micro_batch"] * dp_size, SEQ + 1), generator=g)
    return batch[dp_rank * TRAIN["micro_batch"]:(dp_rank + 1) * TRAIN["micro_batch"]]


def _megatron_training(kind: str, num_layers: int, distributed: bool, bf16: bool, ffn: int = 256,
                       bucket_size: Optional[int] = None, model=None):
    """Megatron-Core's DDP-wrapped GPTModel (or the given Megatron-Core `model`), its
    get_megatron_optimizer (torch AdamW without Apex/TE) and its OptimizerParamScheduler, as
    Megatron-LM's training loop builds them; `bucket_size`: --overlap-grad-reduce with that
    --ddp-bucket-size (several gradient buckets)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron.core import parallel_state

    if model is None:
        model = build_model(kind, num_layers=num_layers, ffn=ffn,
                            pre_process=parallel_state.is_pipeline_first_stage(),
                            post_process=parallel_state.is_pipeline_last_stage())
    model = model.train()
    if bf16:
        model = model.to(torch.bfloat16)
        model.config.bf16, model.config.params_dtype = True, torch.bfloat16
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=distributed, grad_reduce_in_fp32=True,
                                               overlap_grad_reduce=bucket_size is not None, bucket_size=bucket_size)
    with cpu_training():
        ddp = DistributedDataParallel(model.config, ddp_config, model)
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=TRAIN["lr"], min_lr=TRAIN["min_lr"],
                            weight_decay=TRAIN["weight_decay"], adam_beta1=TRAIN["beta1"],
                            adam_beta2=TRAIN["beta2"], adam_eps=TRAIN["eps"], clip_grad=TRAIN["clip_grad"],
                            use_distributed_optimizer=distributed, bf16=bf16,
                            params_dtype=torch.bfloat16 if bf16 else torch.float32),
            [ddp], use_gloo_process_groups=True)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=TRAIN["lr"], min_lr=TRAIN["min_lr"], lr_warmup_steps=TRAIN["warmup"],
        lr_decay_steps=TRAIN["decay_iters"], lr_decay_style="cosine", start_wd=TRAIN["weight_decay"],
        end_wd=TRAIN["weight_decay"], wd_incr_steps=TRAIN["decay_iters"], wd_incr_style="constant")
    return model, ddp, optimizer, scheduler


def _train_step(model, ddp, optimizer, scheduler, iteration: int) -> float:
    """One Megatron-LM style iteration (one micro-batch per data-parallel rank); the global mean loss."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads

    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    batch = train_batch(iteration, dp_rank, dp_size)
    toks, labels = batch[:, :-1], batch[:, 1:]
    positions = torch.arange(SEQ).unsqueeze(0).expand_as(toks)
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]
    with cpu_training():
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        losses = ddp(toks, positions, mask, labels=labels)
        loss = losses.float().mean()
        loss.backward()  # Megatron-Core's DDP averages the gradients over data-parallel ranks
        finalize_model_grads([ddp])
        ok, _, _ = optimizer.step()
        assert ok
        scheduler.step(increment=TRAIN["micro_batch"] * dp_size)
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total) / dp_size


def _training_common(args, iteration: int, scheduler) -> dict:
    state = _sharded_common(args, iteration)
    state["opt_param_scheduler"] = scheduler.state_dict()
    return state


def train_and_save(root: str, kind: str, num_layers: int, distributed: bool, iteration: int, total: int,
                   bf16: bool = False, sharding: str = "fully_sharded_model_space", ffn: int = 256,
                   bucket_size: Optional[int] = None, also_save: Optional[tuple] = None) -> list:
    """Train `iteration` iterations, save the full training state as Megatron-LM does (model,
    optimizer.sharded_state_dict, scheduler, RNG, args) with dist_checkpointing, train on to
    `total`. `also_save`: (sharding, root) of a second copy of the same state with the distributed
    optimizer's other sharding type. Returns every iteration's loss (the same on every rank)."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model, ddp, optimizer, scheduler = _megatron_training(kind, num_layers, distributed, bf16, ffn, bucket_size)
    dp = parallel_state.get_data_parallel_world_size()
    losses = []
    for it in range(total):
        if it == iteration:
            args = megatron_args(kind, num_layers=num_layers, iteration=iteration, bf16=bf16, ffn=ffn,
                                 ddp_bucket_size=bucket_size, overlap_grad_reduce=bucket_size is not None,
                                 params_dtype=torch.bfloat16 if bf16 else torch.float32,
                                 use_distributed_optimizer=distributed, micro_batch_size=TRAIN["micro_batch"],
                                 global_batch_size=TRAIN["micro_batch"] * dp, data_parallel_size=dp,
                                 consumed_train_samples=iteration * TRAIN["micro_batch"] * dp)
            for kind_of_sharding, where in [(sharding, root)] + ([also_save] if also_save else []):
                state = _training_common(args, iteration, scheduler)
                model_state = model.sharded_state_dict()
                state["model"] = model_state
                metadata = {"distrib_optim_sharding_type": kind_of_sharding} if distributed else None
                with cpu_training():
                    state["optimizer"] = optimizer.sharded_state_dict(model_state, metadata=metadata)
                state["rng_state"] = ShardedObject("rng_state", [rng_state()], (1, 1), (0, 0),
                                                   replica_id=parallel_state.get_data_parallel_rank())
                save_dist(state, os.path.join(where, f"iter_{iteration:07d}"))
                if int(os.environ.get("RANK", "0")) == 0:
                    write_tracker(where, iteration)
        losses.append(_train_step(model, ddp, optimizer, scheduler, it))
    return losses


def _keep_adam_step(distributed_optimizer) -> None:
    """Megatron-Core 0.16.1's fully_reshardable load copies every entry of torch AdamW's state,
    "step" included, from the loaded tensors, which leave "step" out (it comes from the parameter
    groups), so without Apex/TE the load raises KeyError('step'); give it the step it already set."""
    original = distributed_optimizer._set_main_param_and_optimizer_states

    def set_states(model_param, tensors):
        group, order = distributed_optimizer.model_param_group_index_map[model_param]
        main = distributed_optimizer.optimizer.param_groups[group]["params"][order]
        step = distributed_optimizer.optimizer.state[main].get("step")
        original(model_param, tensors if step is None or "step" in tensors else dict(tensors, step=step))

    distributed_optimizer._set_main_param_and_optimizer_states = set_states


def load_and_train(root: str, kind: str, num_layers: int, distributed: bool, iteration: int, total: int,
                   bf16: bool = False) -> list:
    """Megatron-LM's resume: its model, optimizer and scheduler load the full training state of
    ROOT/iter_{iteration} with dist_checkpointing.load (strict), then train to `total`. Returns the
    losses of iterations iteration .. total-1."""
    from megatron.core import dist_checkpointing

    model, ddp, optimizer, scheduler = _megatron_training(kind, num_layers, distributed, bf16)
    model_state = model.sharded_state_dict()
    with cpu_training():
        if distributed:  # with torch's AdamW (no Apex/TE) its state_dict() needs Adam state to exist: a
            # zero-gradient step creates it; the load below replaces the main params and the moments
            for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
                inner._init_optimizer_states_with_dummy_values()
                _keep_adam_step(inner)
        template = {"model": model_state, "optimizer": optimizer.sharded_state_dict(
            model_state, is_loading=True,
            metadata={"distrib_optim_sharding_type": "fully_reshardable"} if distributed else None)}
        loaded = dist_checkpointing.load(template, os.path.join(root, f"iter_{iteration:07d}"))
        model.load_state_dict(loaded["model"], strict=True)
        optimizer.load_state_dict(loaded["optimizer"])
    if distributed:  # without Apex/TE its load gives every parameter's AdamW state ONE shared "step"
        # tensor, which each parameter's update then increments: give each its own copy
        for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
            for st in inner.optimizer.state.values():
                st["step"] = st["step"].clone()
    scheduler.load_state_dict(loaded["opt_param_scheduler"])
    assert loaded["iteration"] == iteration
    return [_train_step(model, ddp, optimizer, scheduler, it) for it in range(iteration, total)]


def step_and_save(root: str, kind: str, num_layers: int, iteration: int, sharding: str,
                  also_save: Optional[tuple]) -> None:
    """Megatron-Core's distributed optimizer at this process's tensor/pipeline rank (dp 1) takes two
    Adam steps on fixed random gradients (no forward: no pipeline schedule is needed), then the
    model and optimizer state are saved with `sharding` under `root` (and `also_save`'s sharding
    under its root): the same optimizer state in two layouts."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model = build_model(kind, num_layers=num_layers, pre_process=parallel_state.is_pipeline_first_stage(),
                        post_process=parallel_state.is_pipeline_last_stage()).train()
    with cpu_training():
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
            use_distributed_optimizer=True, grad_reduce_in_fp32=True), model)
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=TRAIN["lr"], weight_decay=TRAIN["weight_decay"],
                            adam_beta1=TRAIN["beta1"], adam_beta2=TRAIN["beta2"], adam_eps=TRAIN["eps"],
                            clip_grad=TRAIN["clip_grad"], use_distributed_optimizer=True),
            [ddp], use_gloo_process_groups=True)
    rank = int(os.environ.get("RANK", "0"))
    for step in range(2):  # the same draws on every tensor-parallel rank: replicated weights stay equal
        generator = torch.Generator().manual_seed(100 * step + parallel_state.get_pipeline_model_parallel_rank())
        with cpu_training():
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            for param in ddp.module.parameters():
                param.main_grad.copy_(0.01 * torch.randn(param.shape, generator=generator))
            ok, _, _ = optimizer.step()
            assert ok
    args = megatron_args(kind, num_layers=num_layers, tp=_tp_size(), pp=_pp_size(), iteration=iteration,
                         use_distributed_optimizer=True, data_parallel_size=1)
    for kind_of_sharding, where in [(sharding, root)] + ([also_save] if also_save else []):
        state = _sharded_common(args, iteration)
        model_state = model.sharded_state_dict()
        state["model"] = model_state
        with cpu_training():
            state["optimizer"] = optimizer.sharded_state_dict(
                model_state, metadata={"distrib_optim_sharding_type": kind_of_sharding})
        save_dist(state, os.path.join(where, f"iter_{iteration:07d}"))
        if rank == 0:
            write_tracker(where, iteration)


def _write_reference(root: str, toks: torch.Tensor, out: torch.Tensor) -> None:
    torch.save({"tokens": toks, "logits": out.detach().float()}, os.path.join(root, "reference.pt"))


def _main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["write-torch", "write-dist", "write-legacy", "logits", "load-torch",
                                                       "train", "resume", "step-save"])
    parser.add_argument("--optim", default="plain", choices=["plain", "distributed"], help="train: optimizer")
    parser.add_argument("--sharding", default="fully_sharded_model_space",
                        help="train: the distributed optimizer's distrib_optim_sharding_type")
    parser.add_argument("--bf16", action="store_true", help="train: bf16 parameters (fp32 main params)")
    parser.add_argument("--also-save", nargs=2, metavar=("SHARDING", "ROOT"), default=None,
                        help="train: save the same state again with this distrib_optim_sharding_type under ROOT")
    parser.add_argument("--bucket-size", type=int, default=None,
                        help="train: --overlap-grad-reduce with this --ddp-bucket-size")
    parser.add_argument("--ffn", type=int, default=256, help="train: ffn_hidden_size")
    parser.add_argument("--kinds", default="gpt", help="step-save: the model kinds, comma-separated")
    parser.add_argument("--total", type=int, default=6, help="train: iterations in all")
    parser.add_argument("--version", type=float, default=3.0, help="write-legacy: checkpoint_version")
    parser.add_argument("--release", action="store_true", help="write-legacy: release/ and tracker 'release'")
    parser.add_argument("--kind", default="gpt", choices=sorted(OPTIONS))
    parser.add_argument("--root", required=True)
    parser.add_argument("--iteration", type=int, default=5)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--port", type=int, default=29650)
    parser.add_argument("--iter-dir", default=None, help="logits: the iteration directory to load")
    opts = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    init_parallel(opts.tp if processes > 1 else 1, opts.pp if processes > 1 else 1, opts.port,
                  opts.ep if processes > 1 else 1)
    from megatron.core import parallel_state

    pre = parallel_state.is_pipeline_first_stage()
    post = parallel_state.is_pipeline_last_stage()
    iter_dir = os.path.join(opts.root, f"iter_{opts.iteration:07d}")
    args = megatron_args(opts.kind, num_layers=opts.layers, tp=opts.tp, pp=opts.pp, iteration=opts.iteration,
                         expert_model_parallel_size=opts.ep)
    if opts.command == "train":  # WORLD_SIZE data-parallel processes, tp = pp = 1
        init_parallel(1, 1, opts.port)
        losses = train_and_save(opts.root, opts.kind, opts.layers, opts.optim == "distributed", opts.iteration,
                                opts.total, opts.bf16, opts.sharding, opts.ffn, opts.bucket_size,
                                tuple(opts.also_save) if opts.also_save else None)
        if rank == 0:
            for where in [opts.root] + ([opts.also_save[1]] if opts.also_save else []):
                torch.save({"losses": torch.tensor(losses, dtype=torch.float64)}, os.path.join(where, "losses.pt"))
    elif opts.command == "resume":  # WORLD_SIZE data-parallel processes, tp = pp = 1
        init_parallel(1, 1, opts.port)
        losses = load_and_train(opts.root, opts.kind, opts.layers, opts.optim == "distributed", opts.iteration,
                                opts.total, opts.bf16)
        if rank == 0:
            torch.save({"losses": torch.tensor(losses, dtype=torch.float64)},
                       os.path.join(opts.root, "resumed_losses.pt"))
    elif opts.command == "step-save":  # tp * pp processes, dp = 1; each kind under ROOT/KIND
        for kind in opts.kinds.split(","):
            also = (opts.also_save[0], os.path.join(opts.also_save[1], kind)) if opts.also_save else None
            step_and_save(os.path.join(opts.root, kind), kind, opts.layers, opts.iteration, opts.sharding, also)
    elif opts.command == "write-torch":  # one process, tp = pp = 1
        model = build_model(opts.kind, num_layers=opts.layers)
        path = os.path.join(iter_dir, "mp_rank_00", "model_optim_rng.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(torch_state(model, args, opts.iteration), path)
        write_tracker(opts.root, opts.iteration)
        toks = tokens()
        _write_reference(opts.root, toks, logits(model, toks))
    elif opts.command == "write-legacy":  # one process; tensor-parallel files split here
        model = build_model(opts.kind, num_layers=opts.layers)
        args = megatron_args(opts.kind, num_layers=opts.layers, tp=opts.tp, iteration=opts.iteration)
        directory = os.path.join(opts.root, "release" if opts.release else f"iter_{opts.iteration:07d}")
        for rank, state in enumerate(legacy_rank_files(model, args, opts.tp, opts.version, 4)):
            path = os.path.join(directory, f"mp_rank_{rank:02d}", "model_optim_rng.pt")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save({"args": args, "checkpoint_version": opts.version, "iteration": opts.iteration,
                        "model": state}, path)
        write_tracker(opts.root, "release" if opts.release else opts.iteration)
        toks = tokens()
        _write_reference(opts.root, toks, logits(model, toks))
    elif opts.command == "write-dist":
        model = build_model(opts.kind, num_layers=opts.layers, seed=1234 + rank, pre_process=pre, post_process=post)
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        state = _sharded_common(args, opts.iteration)
        state["model"] = model.sharded_state_dict()
        # Megatron-LM's training loop stores each (pp, tp) rank's RNG states as one ShardedObject.
        torch.manual_seed(1000 + rank)
        state["rng_state"] = ShardedObject(
            "rng_state", [rng_state()], (opts.pp, opts.tp),
            (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
            replica_id=parallel_state.get_data_parallel_rank())
        os.makedirs(opts.root, exist_ok=True)
        torch.save(rng_state()["torch_rng_state"], os.path.join(opts.root, f"torch_rng_rank{rank}.pt"))
        save_dist(state, iter_dir)
        if rank == 0:
            write_tracker(opts.root, opts.iteration)
        if OPTIONS[opts.kind].get("num_experts"):  # the weights are the oracle (see OPTIONS)
            torch.save({k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
                       os.path.join(opts.root, f"weights_rank{rank}.pt"))
    elif opts.command == "load-torch":  # Megatron-Core's GPTModel loads a tp=pp=1 `torch` rank file, strictly
        model = build_model(opts.kind, num_layers=opts.layers, seed=99)
        state = torch.load(os.path.join(iter_dir, "mp_rank_00", "model_optim_rng.pt"), weights_only=True)
        saved = state["args"]  # what Megatron-LM's loader reads from it
        assert (saved.tensor_model_parallel_size, saved.pipeline_model_parallel_size) == (1, 1)
        assert (saved.num_layers, saved.hidden_size, saved.num_attention_heads) == (opts.layers, 64, 4)
        model.load_state_dict(state["model"], strict=True)
        toks = tokens()
        _write_reference(opts.root, toks, logits(model, toks))
    else:  # logits: Megatron-Core loads the torch_dist checkpoint at tp (pp = 1) and runs its forward
        from megatron.core import dist_checkpointing

        model = build_model(opts.kind, num_layers=opts.layers, seed=99)
        with cpu_only():
            loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, opts.iter_dir or iter_dir)
        model.load_state_dict(loaded["model"], strict=True)
        toks = tokens()
        out = logits(model, toks)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:  # vocab-parallel logits: gather
            import torch.distributed as dist

            group = parallel_state.get_tensor_model_parallel_group()
            parts = [torch.empty_like(out) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, out.contiguous(), group=group)
            out = torch.cat(parts, dim=-1)
        if rank == 0:
            _write_reference(opts.root, toks, out)
    destroy_parallel()


def megatron_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("megatron") is not None and importlib.util.find_spec("megatron.core") is not None


def _script_server():
    """tests/script_server.py, imported by one name however this module was imported (one server)."""
    import importlib
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("script_server")


def run_oracle(*argv: str, processes: int = 1, port: int = 29650, timeout: int = 300,
               script: Optional[str] = None) -> None:
    """Run this file's command `argv` (or the script `script`'s) in `processes` fresh processes
    (ranks of one gloo group), forked from a server that has imported megatron.core once
    (tests/script_server.py)."""
    script_server = _script_server()
    env = dict(os.environ, WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               PYTHONWARNINGS="ignore")
    results = script_server.run_script(script or __file__, [*argv, "--port", str(port)],
                                       [dict(env, RANK=str(rank)) for rank in range(processes)], timeout=timeout)
    failures = [f"rank {rank} exited {code}:\n{out[-4000:]}" for rank, (code, out) in enumerate(results) if code != 0]
    if failures:
        raise RuntimeError("Megatron-Core oracle failed: " + "\n".join(failures))


if __name__ == "__main__":
    _main()
