"""Upstream Megatron-Core trains at tensor/pipeline parallel size 2 and saves its full training
state in its torch_dist layout (the test oracle for resuming such runs; tests/megatron_oracle.py
holds the model, data and tp=pp=1 training this builds on).

    python tests/megatron_parallel_oracle.py --root DIR --tp 2 --pp 1 --kind llama --optim distributed
        (tp*pp processes: Megatron-Core's GPTModel stage of each rank, its DistributedDataParallel,
        get_megatron_optimizer (torch's AdamW) and OptimizerParamScheduler train one micro-batch
        per iteration through its own pipeline schedule (get_forward_backward_func), save model,
        optimizer (the distributed optimizer as "fully_reshardable"), scheduler, RNG and args at
        --iteration as Megatron-LM's loop does, and train on to --total; DIR/losses.pt holds
        every iteration's loss)

The data is megatron_oracle.train_batch at data-parallel size 1: the same global batches as the
tp=pp=1 oracle, so a resumed run at any layout sees the same tokens."""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import megatron_oracle as oracle  # noqa: E402


def _forward_step(iteration: int):
    """Megatron's forward_step_func for iteration `iteration`: the stage's forward (first stage
    from the tokens, later stages from the received activations) and the mean-loss function."""
    batch = oracle.train_batch(iteration, 0, 1)
    toks, labels = batch[:, :-1], batch[:, 1:]
    positions = torch.arange(oracle.SEQ).unsqueeze(0).expand_as(toks)
    mask = torch.triu(torch.ones(oracle.SEQ, oracle.SEQ, dtype=torch.bool), diagonal=1)[None, None]

    def loss_func(per_token):
        loss = per_token.float().mean()
        return loss, {"loss": loss.detach().clone()}

    def step(data_iterator, model):
        del data_iterator
        return model(toks, positions, mask, labels=labels), loss_func

    return step


def _train_step(ddp, optimizer, scheduler, iteration: int):
    """One iteration through Megatron's schedule; the loss on the last stage, else None."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    with oracle.cpu_training():
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=_forward_step(iteration), data_iterator=None, model=[ddp], num_microbatches=1,
            seq_length=oracle.SEQ, micro_batch_size=oracle.TRAIN["micro_batch"])
        finalize_model_grads([ddp])
        ok, _, _ = optimizer.step()
        assert ok
        scheduler.step(increment=oracle.TRAIN["micro_batch"])
    return float(reports[0]["loss"]) if parallel_state.is_pipeline_last_stage() else None


def train_and_save(root: str, kind: str, num_layers: int, distributed: bool, iteration: int, total: int,
                   tp: int, pp: int) -> list:
    """Train, save the full training state at `iteration` with dist_checkpointing (every rank its
    shards; the RNG states as the (pp, tp) ShardedObject Megatron-LM writes), train on to `total`."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model, ddp, optimizer, scheduler = oracle._megatron_training(kind, num_layers, distributed, False)
    model.config.pipeline_dtype = torch.float32
    losses = []
    for it in range(total):
        if it == iteration:
            args = oracle.megatron_args(kind, num_layers=num_layers, tp=tp, pp=pp, iteration=iteration,
                                        use_distributed_optimizer=distributed,
                                        micro_batch_size=oracle.TRAIN["micro_batch"],
                                        global_batch_size=oracle.TRAIN["micro_batch"], data_parallel_size=1,
                                        consumed_train_samples=iteration * oracle.TRAIN["micro_batch"])
            state = oracle._training_common(args, iteration, scheduler)
            state["model"] = model.sharded_state_dict()
            with oracle.cpu_training():
                state["optimizer"] = optimizer.sharded_state_dict(
                    state["model"], metadata={"distrib_optim_sharding_type": "fully_reshardable"}
                    if distributed else None)
            state["rng_state"] = ShardedObject(
                "rng_state", [oracle.rng_state()], (pp, tp),
                (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
                replica_id=parallel_state.get_data_parallel_rank())
            oracle.save_dist(state, os.path.join(root, f"iter_{iteration:07d}"))
            if int(os.environ.get("RANK", "0")) == 0:
                oracle.write_tracker(root, iteration)
        losses.append(_train_step(ddp, optimizer, scheduler, it))
    return losses


def _main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--kind", default="gpt", choices=["gpt", "llama"])
    parser.add_argument("--optim", default="plain", choices=["plain", "distributed"])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--iteration", type=int, default=3)
    parser.add_argument("--total", type=int, default=6)
    parser.add_argument("--port", type=int, default=29650)
    opts = parser.parse_args(argv)
    oracle.init_parallel(opts.tp, opts.pp, opts.port)
    from megatron.core import parallel_state

    losses = train_and_save(opts.root, opts.kind, opts.layers, opts.optim == "distributed", opts.iteration,
                            opts.total, opts.tp, opts.pp)
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        torch.save({"losses": torch.tensor(losses, dtype=torch.float64)}, os.path.join(opts.root, "losses.pt"))
    oracle.destroy_parallel()


def run(*argv: str, processes: int, port: int, timeout: int = 300) -> None:
    """This script's training in `processes` fresh processes (one gloo group)."""
    oracle.run_oracle(*argv, processes=processes, port=port, timeout=timeout, script=os.path.abspath(__file__))


if __name__ == "__main__":
    _main()
