"""Upstream Megatron-Core's BertModel and T5Model as a test oracle (see tests/megatron_oracle.py for
why this runs in a subprocess and how Megatron-Core is made to run on the CPU).

    python tests/megatron_bert_oracle.py write-dist --kind bert --root DIR --tp 2   (tp processes)
    python tests/megatron_bert_oracle.py write-torch --kind t5 --root DIR --tp 2    (tp processes)
    python tests/megatron_bert_oracle.py write-legacy --root DIR --tp 2 --release   (BERT; one process)
    python tests/megatron_bert_oracle.py logits --kind bert --root DIR [--tp 2]     (Megatron-Core loads
                                        DIR's torch_dist strictly into its own model, then runs it)
    python tests/megatron_bert_oracle.py load-torch --kind t5 --root DIR            (a tp=1 `torch` file)
    python tests/megatron_bert_oracle.py train-save --kind t5 --root DIR --runs distributed,dp_reshardable
                                        (three Adam steps per run, the full training state saved
                                        as Megatron-LM does under DIR/RUN; see `train_and_save`;
                                        dp_reshardable: the distributed run's state saved again in
                                        that sharding)

Every command but train-save writes DIR/reference.pt: the inputs (`tokens`, `tokentypes`, `padding` for BERT;
`encoder_tokens`, `decoder_tokens` for T5) and Megatron-Core's fp32 outputs (`logits` [b, s, V],
and `binary_logits` [b, 2] for BERT).

Models: local layer specs (Megatron-Core's BERT spec and T5 encoder/decoder specs), LayerNorm, GeLU,
biases, learned absolute positions, output layer tied to the word embedding. BERT: 2 token types
and the binary head. T5: 2 encoder and 2 decoder layers (its relative position bias needs
Transformer Engine's attention, so it is not built here).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import megatron_oracle as base  # noqa: E402

warnings.filterwarnings("ignore")

VOCAB = base.VOCAB
SEQ = 16
HIDDEN, HEADS, FFN = 64, 4, 256
KINDS = ("bert", "t5")


def _config(num_layers: int):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=num_layers, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=FFN,
        normalization="LayerNorm", add_bias_linear=True, activation_func=torch.nn.functional.gelu,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, init_method_std=0.05, tensor_model_parallel_size=base._tp_size(),
        pipeline_model_parallel_size=1, layernorm_epsilon=1e-5, pipeline_dtype=torch.float32)


def build_model(kind: str, num_layers: int = 2, seed: int = 1234):
    """Megatron-Core's BertModel or T5Model with random weights (non-trivial norms and biases), fp32."""
    torch.manual_seed(seed)
    config = _config(num_layers)
    with base.cpu_only():
        if kind == "bert":
            from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
            from megatron.core.models.bert.bert_model import BertModel

            model = BertModel(config, num_tokentypes=2, transformer_layer_spec=bert_layer_local_spec,
                              vocab_size=VOCAB, max_sequence_length=SEQ * 2, share_embeddings_and_output_weights=True,
                              add_binary_head=True)
        else:
            from megatron.core.models.T5.t5_model import T5Model
            from megatron.core.models.T5.t5_spec import decoder_model_with_local_spec, encoder_model_with_local_spec

            model = T5Model(config, _config(num_layers), encoder_model_with_local_spec(),
                            decoder_model_with_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ * 2,
                            share_embeddings_and_output_weights=True, position_embedding_type="learned_absolute")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))
    return model.eval()


def inputs(kind: str) -> dict:
    g = torch.Generator().manual_seed(7)
    if kind == "bert":
        padding = torch.ones(2, SEQ, dtype=torch.long)
        padding[1, SEQ - 4:] = 0  # the second sequence ends in 4 padding tokens
        tokentypes = torch.zeros(2, SEQ, dtype=torch.long)
        tokentypes[:, SEQ // 2:] = 1
        return {"tokens": torch.randint(0, VOCAB, (2, SEQ), generator=g), "tokentypes": tokentypes,
                "padding": padding}
    return {"encoder_tokens": torch.randint(0, VOCAB, (2, SEQ), generator=g),
            "decoder_tokens": torch.randint(0, VOCAB, (2, SEQ - 4), generator=g)}


def _gather_vocab(out: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return out
    import torch.distributed as dist

    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(out) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, out.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def outputs(kind: str, model, data: dict) -> dict:
    """Megatron-Core's forward: logits [b, s, V] (gathered over tensor-parallel ranks)."""
    with base.cpu_only(), torch.no_grad():
        if kind == "bert":
            logits, binary = model(data["tokens"], data["padding"], tokentype_ids=data["tokentypes"])
            return {"logits": _gather_vocab(logits).float(), "binary_logits": binary.float()}
        enc, dec = data["encoder_tokens"], data["decoder_tokens"]
        b, se, sd = enc.shape[0], enc.shape[1], dec.shape[1]
        # bool masks, True where a query must not see a key: [b, 1, sq, sk]
        enc_mask = torch.zeros(b, 1, se, se, dtype=torch.bool)
        dec_mask = torch.triu(torch.ones(sd, sd, dtype=torch.bool), diagonal=1).expand(b, 1, sd, sd)
        cross_mask = torch.zeros(b, 1, sd, se, dtype=torch.bool)
        logits = model(enc, dec, enc_mask, dec_mask, cross_mask)
        return {"logits": _gather_vocab(logits).float()}


def megatron_args(kind: str, num_layers: int = 2, tp: int = 1, iteration: int = 0) -> argparse.Namespace:
    """The `args` Namespace Megatron-LM's pretrain_bert.py / pretrain_t5.py pickle (a GPT's, plus
    the BERT / T5 flags)."""
    args = base.megatron_args("gpt", num_layers=num_layers, tp=tp, iteration=iteration, hidden=HIDDEN, heads=HEADS,
                              ffn=FFN, tokenizer_type="NullTokenizer")
    args.untie_embeddings_and_output_weights = False
    if kind == "bert":
        args.bert_binary_head = True
        args.num_tokentypes = 2
        args.seq_length = SEQ
    else:
        args.encoder_num_layers = num_layers
        args.decoder_num_layers = num_layers
        args.encoder_seq_length = SEQ
        args.decoder_seq_length = SEQ - 4
        args.seq_length = SEQ
        args.vocab_extra_ids = 0
    return args


def _reference(root: str, data: dict, out: dict) -> None:
    torch.save({**data, **out}, os.path.join(root, "reference.pt"))


# Megatron-LM's documented pre-Megatron-Core BERT names (megatron/model/bert_model.py,
# language_model.py, transformer.py), from Megatron-Core's local-spec names of the same weights.
LEGACY_BERT_OTHER = {
    "embedding.word_embeddings.weight": ("language_model", "embedding", "word_embeddings", "weight"),
    "embedding.position_embeddings.weight": ("language_model", "embedding", "position_embeddings", "weight"),
    "embedding.tokentype_embeddings.weight": ("language_model", "embedding", "tokentype_embeddings", "weight"),
    "encoder.final_layernorm.weight": ("language_model", "encoder", "final_layernorm.weight"),
    "encoder.final_layernorm.bias": ("language_model", "encoder", "final_layernorm.bias"),
    "pooler.dense.weight": ("language_model", "pooler", "dense.weight"),
    "pooler.dense.bias": ("language_model", "pooler", "dense.bias"),
    "lm_head.dense.weight": ("lm_head", "dense.weight"),
    "lm_head.dense.bias": ("lm_head", "dense.bias"),
    "lm_head.layer_norm.weight": ("lm_head", "layernorm.weight"),
    "lm_head.layer_norm.bias": ("lm_head", "layernorm.bias"),
    "output_layer.bias": ("lm_head", "bias"),
    "binary_head.weight": ("binary_head", "weight"),
    "binary_head.bias": ("binary_head", "bias"),
}


def legacy_bert_rank_files(model, tp: int) -> list:
    """The `model` entry of each tensor-parallel rank of a legacy BERT checkpoint (checkpoint_version
    3.0: QKV rows per head [q; k; v], Megatron-Core's own layout) holding `model`'s weights."""
    ranks = [{} for _ in range(tp)]
    for name, tensor in model.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        if name.startswith("encoder.layers."):
            layer, rest = name[len("encoder.layers."):].split(".", 1)
            module, leaf = rest.rsplit(".", 1)
            path = ("language_model", "encoder", f"layers.{layer}.{base.LEGACY_LAYER[module]}.{leaf}")
            legacy = path[-1]
        else:
            path = LEGACY_BERT_OTHER[name]
            legacy = ".".join(path)
        if name in ("embedding.word_embeddings.weight", "output_layer.bias") or any(
                c in legacy for c in ("query_key_value", "dense_h_to_4h")):
            shards = list(tensor.chunk(tp, dim=0))
        elif any(legacy.endswith(r) for r in base.ROW_PARALLEL):
            shards = list(tensor.chunk(tp, dim=1))
        else:
            shards = [tensor] * tp
        for rank, shard in enumerate(shards):
            target = ranks[rank]
            for part in path[:-1]:
                target = target.setdefault(part, {})
            target[path[-1]] = shard.clone()
    return ranks


TRAIN_STEPS = 3
SHARDING_RUN = "dp_reshardable"  # a train-save run: the distributed optimizer saved in this sharding


def training_batch(kind: str, step: int) -> dict:
    """The fixed random batch of training step `step`: BERT `tokens`, `padding`, `tokentypes`; T5
    `encoder_tokens`, `decoder_tokens`; and `labels` [b, s] (s: the decoder's length for T5)."""
    g = torch.Generator().manual_seed(500 + step)
    if kind == "bert":
        batch = dict(inputs("bert"), tokens=torch.randint(0, VOCAB, (2, SEQ), generator=g))
    else:
        batch = {"encoder_tokens": torch.randint(0, VOCAB, (2, SEQ), generator=g),
                 "decoder_tokens": torch.randint(0, VOCAB, (2, SEQ - 4), generator=g)}
    length = SEQ if kind == "bert" else SEQ - 4
    batch["labels"] = torch.randint(0, VOCAB, (2, length), generator=g)
    return batch


def training_loss(logits: torch.Tensor, binary, batch: dict) -> torch.Tensor:
    """The loss of the training steps from the outputs (logits [b, s, V]): the mean negative
    log-softmax of the LM logits at the batch's `labels` over real tokens (BERT's padding
    positions left out: what a model computes there is not defined alike), plus for BERT the
    binary logits' mean square (so that the binary head gets gradients too)."""
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    real = batch["padding"].bool() if "padding" in batch else torch.ones_like(picked, dtype=torch.bool)
    return -picked[real].mean() + (0.0 if binary is None else binary.float().square().mean())


def _training_loss(kind: str, ddp, step: int) -> torch.Tensor:
    """Megatron-Core's forward of `training_batch(kind, step)` and its `training_loss`."""
    batch = training_batch(kind, step)
    if kind == "bert":
        logits, binary = ddp(batch["tokens"], batch["padding"], tokentype_ids=batch["tokentypes"])
    else:
        enc, dec = batch["encoder_tokens"], batch["decoder_tokens"]
        sd = dec.shape[1]
        logits, binary = ddp(enc, dec, torch.zeros(2, 1, SEQ, SEQ, dtype=torch.bool),
                             torch.triu(torch.ones(sd, sd, dtype=torch.bool), diagonal=1).expand(2, 1, sd, sd),
                             torch.zeros(2, 1, sd, SEQ, dtype=torch.bool)), None
    return training_loss(logits, binary, batch)


def megatron_adam_state(ddp, optimizer) -> dict:
    """Megatron-Core's own Adam state per parameter name (Megatron's names): exp_avg, exp_avg_sq and
    the fp32 main param in the parameter's shape, the step and the learning rate of its group."""
    out = {}
    for name, param in ddp.module.named_parameters():
        for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
            index = getattr(inner, "model_param_group_index_map", None)
            if index is not None:  # distributed optimizer: its main param and state (dp 1: the whole param)
                if param not in index:
                    continue
                group, order = index[param]
                main = inner.optimizer.param_groups[group]["params"][order]
            else:  # plain optimizer: bf16/fp16 parameters have an fp32 copy, fp32 ones are their own
                copies = {id(p): m for ps, ms in zip(getattr(inner, "float16_groups", []),
                                                     getattr(inner, "fp32_from_float16_groups", []))
                          for p, m in zip(ps, ms)}
                main = copies.get(id(param), param)
                groups = [g for g in inner.optimizer.param_groups if any(p is main for p in g["params"])]
                if not groups:
                    continue
                group = inner.optimizer.param_groups.index(groups[0])
            state = inner.optimizer.state[main]
            out[name] = {"exp_avg": state["exp_avg"].detach().reshape(param.shape).clone(),
                         "exp_avg_sq": state["exp_avg_sq"].detach().reshape(param.shape).clone(),
                         "main_param": main.detach().float().reshape(param.shape).clone(),
                         "step": int(state["step"]), "lr": float(inner.optimizer.param_groups[group]["lr"])}
    return out


def train_and_save(kind: str, root: str, distributed: bool, num_layers: int = 2, steps: int = TRAIN_STEPS,
                   sharding: str = "fully_reshardable", bf16: bool = False,
                   also_save: Optional[tuple] = None) -> None:
    """Megatron-Core's BertModel / T5Model takes `steps` Adam steps with its own DDP, optimizer and
    scheduler (one process), then the full training state is saved as Megatron-LM's loop saves it
    (model, optimizer.sharded_state_dict — the distributed optimizer's with `sharding` —, the
    scheduler, RNG and args in common.pt) under ROOT/iter_{steps}; ROOT/megatron_adam.pt holds
    Megatron's Adam state per parameter (megatron_adam_state), ROOT/megatron_next_weights.pt the
    weights after one more step (of `training_batch(kind, steps)`). `bf16`: bf16 parameters with
    fp32 main params. `also_save`: (sharding, root) of a second copy of the same state with the
    distributed optimizer's other sharding type (with the same two files beside it)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.distributed import finalize_model_grads

    T = base.TRAIN
    model, ddp, optimizer, scheduler = base._megatron_training(kind, num_layers, distributed, bf16,
                                                               model=build_model(kind, num_layers))

    def train_step(step):
        with base.cpu_training():
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            _training_loss(kind, ddp, step).backward()
            finalize_model_grads([ddp])
            ok, _, _ = optimizer.step()
            assert ok
            scheduler.step(increment=T["micro_batch"])

    for step in range(steps):
        train_step(step)
    args = megatron_args(kind, num_layers, 1, steps)
    extra = dict(use_distributed_optimizer=distributed, bf16=bf16,
                 params_dtype=torch.bfloat16 if bf16 else torch.float32, micro_batch_size=T["micro_batch"],
                 global_batch_size=T["micro_batch"], data_parallel_size=1,
                 consumed_train_samples=steps * T["micro_batch"],
                 lr=T["lr"], min_lr=T["min_lr"], weight_decay=T["weight_decay"], adam_beta1=T["beta1"],
                 adam_beta2=T["beta2"], adam_eps=T["eps"], clip_grad=T["clip_grad"], lr_decay_style="cosine",
                 lr_warmup_iters=T["warmup"], lr_decay_iters=T["decay_iters"], train_iters=T["decay_iters"])
    for key, value in extra.items():
        setattr(args, key, value)
    roots = [root] + ([also_save[1]] if also_save else [])
    for kind_of_sharding, where in [(sharding, root)] + ([also_save] if also_save else []):
        state = base._training_common(args, steps, scheduler)
        model_state = model.sharded_state_dict()
        state["model"] = model_state
        with base.cpu_training():
            state["optimizer"] = optimizer.sharded_state_dict(
                model_state, metadata={"distrib_optim_sharding_type": kind_of_sharding} if distributed else None)
        state["rng_state"] = ShardedObject("rng_state", [base.rng_state()], (1, 1), (0, 0), replica_id=0)
        base.save_dist(state, os.path.join(where, f"iter_{steps:07d}"))
        base.write_tracker(where, steps)
    adam = megatron_adam_state(ddp, optimizer)
    train_step(steps)  # Megatron's next step from that state: the weights it gives
    next_weights = {name: p.detach().clone() for name, p in ddp.module.named_parameters()}
    for where in roots:
        torch.save(adam, os.path.join(where, "megatron_adam.pt"))
        torch.save(next_weights, os.path.join(where, "megatron_next_weights.pt"))


def _main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["write-dist", "write-torch", "write-legacy", "logits", "load-torch",
                                            "train-save"])
    parser.add_argument("--runs", default="plain",
                        help="train-save: comma-separated runs, each plain or distributed (the optimizer; "
                             "distributed saved with --sharding) or dp_reshardable (the distributed optimizer "
                             "saved dp_reshardable: beside the distributed run of the same precision, from the "
                             "same training, where both are asked for), -bf16 appended for bf16 parameters; run "
                             "R is saved under ROOT/R")
    parser.add_argument("--sharding", default="fully_reshardable",
                        help="train-save: the distributed optimizer's distrib_optim_sharding_type")
    parser.add_argument("--kind", default="bert", choices=KINDS)
    parser.add_argument("--root", required=True)
    parser.add_argument("--iteration", type=int, default=5)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--release", action="store_true", help="write-legacy: release/ and tracker 'release'")
    parser.add_argument("--port", type=int, default=29650)
    opts = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    base.init_parallel(opts.tp if processes > 1 else 1, 1, opts.port)
    iter_dir = os.path.join(opts.root, f"iter_{opts.iteration:07d}")
    args = megatron_args(opts.kind, opts.layers, opts.tp, opts.iteration)
    data = inputs(opts.kind)
    os.makedirs(opts.root, exist_ok=True)
    if opts.command == "train-save":  # one process
        runs = opts.runs.split(",")
        for run in runs:
            optim, _, precision = run.partition("-")
            if optim not in ("plain", "distributed", SHARDING_RUN) or precision not in ("", "bf16"):
                raise SystemExit(f"--runs: {run} is not plain, distributed or {SHARDING_RUN} with an optional -bf16")
        for run in runs:
            optim, _, precision = run.partition("-")
            twin = run.replace(optim, SHARDING_RUN, 1)
            if optim == SHARDING_RUN and run.replace(optim, "distributed", 1) in runs:
                continue  # saved beside its distributed run: the same training, the other sharding
            sharding = SHARDING_RUN if optim == SHARDING_RUN else opts.sharding
            also = ((SHARDING_RUN, os.path.join(opts.root, twin))
                    if optim == "distributed" and twin in runs else None)
            train_and_save(opts.kind, os.path.join(opts.root, run), optim != "plain", opts.layers,
                           sharding=sharding, bf16=precision == "bf16", also_save=also)
    elif opts.command == "write-dist":  # tp processes; Megatron-Core loads it back at tp=1 for the reference
        from megatron.core import parallel_state
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        model = build_model(opts.kind, opts.layers, seed=1234 + rank)
        state = base._sharded_common(args, opts.iteration)
        state["model"] = model.sharded_state_dict()
        state["rng_state"] = ShardedObject("rng_state", [base.rng_state()], (1, opts.tp),
                                           (0, parallel_state.get_tensor_model_parallel_rank()),
                                           replica_id=parallel_state.get_data_parallel_rank())
        base.save_dist(state, iter_dir)
        if rank == 0:
            base.write_tracker(opts.root, opts.iteration)
    elif opts.command == "write-torch":  # tp processes, each writing its rank's file
        from megatron.core import parallel_state

        model = build_model(opts.kind, opts.layers)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        path = os.path.join(iter_dir, f"mp_rank_{tp_rank:02d}", "model_optim_rng.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(base.torch_state(model, args, opts.iteration), path)
        out = outputs(opts.kind, model, data)
        if rank == 0:
            base.write_tracker(opts.root, opts.iteration)
            _reference(opts.root, data, out)
    elif opts.command == "write-legacy":  # one process; tensor-parallel files split here
        model = build_model("bert", opts.layers)
        args = megatron_args("bert", opts.layers, opts.tp, opts.iteration)
        directory = os.path.join(opts.root, "release" if opts.release else f"iter_{opts.iteration:07d}")
        for tp_rank, state in enumerate(legacy_bert_rank_files(model, opts.tp)):
            path = os.path.join(directory, f"mp_rank_{tp_rank:02d}", "model_optim_rng.pt")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save({"args": args, "checkpoint_version": 3.0, "iteration": opts.iteration, "model": state}, path)
        base.write_tracker(opts.root, "release" if opts.release else opts.iteration)
        _reference(opts.root, data, outputs("bert", model, data))
    elif opts.command == "load-torch":  # Megatron-Core's model loads a tp=1 `torch` rank file, strictly
        model = build_model(opts.kind, opts.layers, seed=99)
        state = torch.load(os.path.join(iter_dir, "mp_rank_00", "model_optim_rng.pt"), weights_only=True)
        saved = state["args"]
        assert (saved.tensor_model_parallel_size, saved.pipeline_model_parallel_size) == (1, 1)
        assert (saved.num_layers, saved.hidden_size, saved.num_attention_heads) == (opts.layers, HIDDEN, HEADS)
        model.load_state_dict(state["model"], strict=True)
        _reference(opts.root, data, outputs(opts.kind, model, data))
    else:  # logits: Megatron-Core's dist_checkpointing.load into its model at --tp, then its forward
        from megatron.core import dist_checkpointing

        model = build_model(opts.kind, opts.layers, seed=99)
        with base.cpu_only():
            loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, iter_dir)
        model.load_state_dict(loaded["model"], strict=True)
        out = outputs(opts.kind, model, data)
        if rank == 0:
            _reference(opts.root, data, out)
    base.destroy_parallel()


def run_oracle(*argv: str, processes: int = 1, port: int = 29650, timeout: int = 300) -> None:
    """Run this file's command `argv` in `processes` fresh processes (ranks of one gloo group),
    forked from a server that has imported megatron.core once (tests/script_server.py)."""
    script_server = base._script_server()
    env = dict(os.environ, WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               PYTHONWARNINGS="ignore")
    results = script_server.run_script(__file__, [*argv, "--port", str(port)],
                                       [dict(env, RANK=str(rank)) for rank in range(processes)], timeout=timeout)
    failures = [f"rank {rank} exited {code}:\n{out[-4000:]}" for rank, (code, out) in enumerate(results) if code != 0]
    if failures:
        raise RuntimeError("Megatron-Core oracle failed: " + "\n".join(failures))


if __name__ == "__main__":
    _main()
