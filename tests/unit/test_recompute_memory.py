"""Activation recompute: what each mode saves, and that it keeps the numerics under pipelining.

- Per layer, the bytes kept for backward drop by what each mode's theory says, written out here
  independently of gigatron/core/memory.py: selective core_attn drops only the log-sum-exp (the
  SDPA kernels keep no s x s scores), mlp drops the fc1 and GeLU outputs (8 T h values),
  layernorm drops the norm statistics and the two norm outputs, full keeps one [s, b, h] input per
  checkpointed chunk.
- Under the 1F1B and interleaved schedules on two gloo ranks with dropout, full and selective
  recompute give the same losses and gradients as no recompute (the RNG states are replayed per
  micro-batch), and the high-water mark of kept activations on each rank is the estimator's
  micro-batches in flight x one micro-batch's bytes.
"""

from __future__ import annotations

import pytest
import torch

from gigatron.core import memory
from gigatron.core.models.gpt import GPTModel
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.parallel.random import model_parallel_seed
from gigatron.core.transformer.config import TransformerConfig
from tests.parallel.harness import run_distributed

VOCAB, SEQ, MBS, HIDDEN, HEADS = 96, 32, 2, 64, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(**kw):
    base = dict(num_layers=3, hidden_size=HIDDEN, num_attention_heads=HEADS, seq_length=SEQ, attention_dropout=0.0,
                hidden_dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (MBS, SEQ), generator=g)
    return ids, torch.arange(SEQ)[None].expand(MBS, SEQ).contiguous()


def _saved_bytes(cfg) -> int:
    """Distinct non-parameter storages one forward keeps for backward (hooks inside the layernorm
    recompute included)."""
    from gigatron.core.transformer import layer as layer_module

    model_parallel_seed(1, ParallelGroups.single())
    model = GPTModel(cfg, ParallelGroups.single(), VOCAB)
    model.train()
    ids, pos = _batch()
    model(ids, pos, labels=ids).sum().backward()  # the attention probe runs once, outside the count
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept, seen = [], {}

    def pack(t):
        kept.append(t)
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    original = layer_module._DiscardNormOutput.pack

    def discard_pack(self, t):
        packed = original(self, t)
        if isinstance(packed, torch.Tensor):
            pack(packed)
        return packed

    layer_module._DiscardNormOutput.pack = discard_pack
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, pos, labels=ids)
    finally:
        layer_module._DiscardNormOutput.pack = original
    return sum(seen.values())


def _per_layer(**kw) -> int:
    return _saved_bytes(tiny(num_layers=3, **kw)) - _saved_bytes(tiny(num_layers=2, **kw))


def test_each_recompute_mode_drops_what_its_theory_says():
    T, h, n = SEQ * MBS, HIDDEN, HEADS
    unit = T * h * 4  # one fp32 [s, b, h] activation
    lse = MBS * n * SEQ * 4
    stats = 2 * 2 * T * 4  # mean and rstd of two LayerNorms
    none = _per_layer()
    assert none == 16 * unit + stats + lse  # x, qkv in, mid, fc1 in, qkv out (3), attn out, fc1 out (4), GeLU out (4)
    assert _per_layer(recompute_granularity="selective") == none - lse
    assert _per_layer(recompute_granularity="selective", recompute_modules=["mlp"]) == none - 8 * unit
    assert _per_layer(recompute_granularity="selective", recompute_modules=["layernorm"]) == none - stats - 2 * unit
    assert _per_layer(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) == unit
    # block: the first 2 layers of 3 are checkpointed (one input each), the third keeps everything.
    block = _saved_bytes(tiny(recompute_granularity="full", recompute_method="block", recompute_num_layers=2))
    plain = _saved_bytes(tiny())
    assert plain - block == 2 * (none - unit)


# ----------------------------------------------------------------------- pipelines


RECOMPUTE = {
    "none": {},
    "full uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    "selective all": dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp", "layernorm"]),
}
NUM_MICROBATCHES = 4


class _LiveSaved:
    """Bytes of the distinct storages currently kept for backward, and their high-water mark."""

    def __init__(self, params):
        self.params = params
        self.refs: dict = {}
        self.live = self.peak = 0

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.params:
            return t
        tracker = self

        class Holder:
            def __init__(self, tensor):
                self.tensor = tensor
                count, nbytes = tracker.refs.get(ptr, (0, tensor.untyped_storage().nbytes()))
                if count == 0:
                    tracker.live += nbytes
                    tracker.peak = max(tracker.peak, tracker.live)
                tracker.refs[ptr] = (count + 1, nbytes)

            def __del__(self):
                count, nbytes = tracker.refs[ptr]
                if count == 1:
                    tracker.live -= nbytes
                    del tracker.refs[ptr]
                else:
                    tracker.refs[ptr] = (count - 1, nbytes)

        return Holder(t)

    @staticmethod
    def unpack(packed):
        return packed.tensor if not isinstance(packed, torch.Tensor) else packed


def _forward_step(data_iterator, model):
    ids, labels, pos = next(data_iterator)
    output = model(ids, pos, labels=labels)

    def loss_func(per_token):
        return per_token.mean(), {"lm loss": per_token.detach().mean()}

    return output, loss_func


def _batches():
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (NUM_MICROBATCHES, MBS, SEQ + 1), generator=g)
    # Separate tensors per micro-batch, as a data loader hands them out.
    return [(tokens[i, :, :-1].clone(), tokens[i, :, 1:].clone(), torch.arange(SEQ)[None].repeat(MBS, 1))
            for i in range(NUM_MICROBATCHES)]


def _pipeline_run(world_size, vp, recompute):
    from gigatron.core.parallel.config import ParallelConfig
    from gigatron.core.pipeline import get_forward_backward_func

    vp_size = vp if vp > 1 else None
    groups = ParallelGroups.build(ParallelConfig(pipeline_model_parallel_size=world_size,
                                                 virtual_pipeline_model_parallel_size=vp_size))
    config = tiny(num_layers=4, hidden_dropout=0.2, pipeline_model_parallel_size=world_size,
                  virtual_pipeline_model_parallel_size=vp_size, **RECOMPUTE[recompute])
    model_parallel_seed(77 + 100 * groups.pp.rank, groups)
    chunks = []
    for chunk in range(vp):
        stage = vp if vp_size else None
        chunks.append(GPTModel(config, groups, VOCAB, seed=3,
                               pre_process=groups.is_pipeline_first_stage(chunk if stage else None),
                               post_process=groups.is_pipeline_last_stage(chunk if stage else None),
                               vp_stage=chunk if stage else None))
    for chunk in chunks:
        chunk.train()
    tracker = _LiveSaved({p.untyped_storage().data_ptr() for c in chunks for p in c.parameters()})
    batches = _batches()
    schedule = get_forward_backward_func(world_size, vp_size)
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        logs = schedule(forward_step_func=_forward_step,
                        data_iterator=[iter(batches) for _ in chunks] if vp_size else iter(batches),
                        model=chunks if vp_size else chunks[0], num_microbatches=NUM_MICROBATCHES,
                        seq_length=SEQ, micro_batch_size=MBS, groups=groups, config=config)
    grads = {f"{i}.{n}": p.grad.clone() for i, c in enumerate(chunks) for n, p in c.named_parameters()}
    return {"losses": [entry["lm loss"] for entry in logs], "grads": grads, "peak": tracker.peak}


def _pipeline_worker(rank, world_size):
    return {(vp, name): _pipeline_run(world_size, vp, name) for vp in (1, 2) for name in RECOMPUTE}


@pytest.fixture(scope="module")
def pipeline_results():
    return run_distributed(_pipeline_worker, 2, timeout=300)


@pytest.mark.parametrize("vp", [1, 2], ids=["1f1b", "interleaved"])
@pytest.mark.parametrize("name", [n for n in RECOMPUTE if n != "none"])
def test_pipeline_recompute_keeps_losses_and_gradients(pipeline_results, vp, name):
    for rank_results in pipeline_results:
        reference, run = rank_results[(vp, "none")], rank_results[(vp, name)]
        assert len(run["losses"]) == len(reference["losses"])
        for a, b in zip(run["losses"], reference["losses"]):
            assert torch.equal(a, b)
        for key, grad in reference["grads"].items():
            torch.testing.assert_close(run["grads"][key], grad, rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("vp", [1, 2], ids=["1f1b", "interleaved"])
def test_pipeline_activation_high_water_mark_is_in_flight_times_one_microbatch(pipeline_results, vp):
    vp_size = vp if vp > 1 else None
    for rank, rank_results in enumerate(pipeline_results):
        config = tiny(num_layers=4, hidden_dropout=0.2, pipeline_model_parallel_size=2,
                      virtual_pipeline_model_parallel_size=vp_size)
        in_flight = memory.microbatches_in_flight(rank, 2, NUM_MICROBATCHES, vp_size)
        per_chunk = [sum(memory.stage_activation_bytes(config, MBS, SEQ, VOCAB, pp_rank=rank, vp_stage=v,
                                                       device_type="cpu").values())
                     for v in (range(vp) if vp_size else [None])]
        peak = rank_results[(vp, "none")]["peak"]
        if vp_size is None:
            assert peak == in_flight * per_chunk[0]
        else:
            # The interleaved peak holds a mix of chunks; the estimator walks the plan.
            assert peak == memory.interleaved_activation_peak(rank, 2, vp, NUM_MICROBATCHES, per_chunk)
            assert in_flight * min(per_chunk) <= peak <= in_flight * max(per_chunk)
        # Full recompute: the kept checkpoints of every micro-batch in flight, plus at most one
        # recomputed layer's activations while its backward runs.
        full = tiny(num_layers=4, hidden_dropout=0.2, pipeline_model_parallel_size=2,
                    virtual_pipeline_model_parallel_size=vp_size, **RECOMPUTE["full uniform"])
        kept = max(sum(memory.stage_activation_bytes(full, MBS, SEQ, VOCAB, pp_rank=rank, vp_stage=v,
                                                     device_type="cpu").values())
                   for v in (range(vp) if vp_size else [None]))
        layer = sum(memory.layer_activation_bytes(config, MBS, SEQ, device_type="cpu").values())
        assert rank_results[(vp, "full uniform")]["peak"] <= in_flight * kept + layer
        assert rank_results[(vp, "full uniform")]["peak"] < peak


# ----------------------------------------------------------------------- tensor + sequence parallel


TP_RECOMPUTE = {
    "selective all": RECOMPUTE["selective all"],
    "full block": RECOMPUTE["full block"],
}


def _tp_run(world_size, recompute):
    from gigatron.core.parallel.config import ParallelConfig

    config = tiny(tensor_model_parallel_size=world_size, sequence_parallel=True, hidden_dropout=0.2,
                  attention_dropout=0.2, **recompute)
    groups = ParallelGroups.build(ParallelConfig(tensor_model_parallel_size=world_size, sequence_parallel=True))
    model_parallel_seed(21, groups)
    model = GPTModel(config, groups, VOCAB, seed=4)
    model.train()
    ids, pos = _batch()
    loss = model(ids, pos, labels=ids).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _tp_worker(rank, world_size):
    return {name: _tp_run(world_size, kwargs) for name, kwargs in {"none": {}, **TP_RECOMPUTE}.items()}


def test_sequence_parallel_recompute_with_dropout_keeps_losses_and_gradients():
    """tp = 2 with sequence parallelism and dropout drawn from the per-rank stream: recompute
    replays the tracker's states, so every rank's loss and gradients equal those without recompute."""
    for rank_results in run_distributed(_tp_worker, 2, timeout=180):
        ref_loss, ref_grads = rank_results["none"]
        for name in TP_RECOMPUTE:
            loss, grads = rank_results[name]
            assert torch.equal(loss, ref_loss), name
            for key, grad in ref_grads.items():
                torch.testing.assert_close(grads[key], grad, rtol=1e-6, atol=1e-7, msg=f"{name}: {key}")
