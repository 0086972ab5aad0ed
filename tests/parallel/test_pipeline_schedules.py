"""Pipeline schedules over gloo (CPU) equal one process with gradient accumulation.

A tiny model, split into stages (`ToyStage`), runs under 1F1B (pp 2 and 4), interleaved 1F1B
(pp 2 and 4 with 2-3 virtual stages) and forward-only; per-micro-batch losses and every
parameter's gradient must match the full model run in one process over the same micro-batches.
Also: the point-to-point primitives, variable sequence lengths, data-parallel no_sync release, the
freeing of sent outputs, and the activation high-water mark of 1F1B against all-forward-all-backward.

The toy model: input x [s, b, 3] -> Linear(3, h) -> L layers -> Linear(h, 2); even layers are
residual (h + tanh(W h)), odd layers plain (tanh(W h), whose backward keeps its own output), so
stage boundaries fall after both kinds. Loss: mean squared error against a target [s, b, 2].
Parameters carry global names (`embed.weight`, `layers.{global i}.weight`, `head.weight`, ...), so
a stage's gradients compare directly with the full model's.
"""

from __future__ import annotations

import contextlib
import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from gigatron.core.parallel.groups import Group
from gigatron.core.pipeline import P2PCommunicator, get_forward_backward_func
from tests.parallel.harness import run_distributed

HIDDEN = 8
IN_FEATURES = 3
OUT_FEATURES = 2


def build_full_layers(num_layers: int, seed: int = 1234) -> nn.ModuleDict:
    generator = torch.Generator().manual_seed(seed)

    def linear(fan_in, fan_out):
        layer = nn.Linear(fan_in, fan_out)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(fan_out, fan_in, generator=generator) / fan_in ** 0.5)
            layer.bias.copy_(torch.randn(fan_out, generator=generator) * 0.1)
        return layer

    return nn.ModuleDict({
        "embed": linear(IN_FEATURES, HIDDEN),
        "layers": nn.ModuleList([linear(HIDDEN, HIDDEN) for _ in range(num_layers)]),
        "head": linear(HIDDEN, OUT_FEATURES),
    })


class ToyStage(nn.Module):
    """Layers [first, last) of the full model; embed on the first stage, head on the last."""

    def __init__(self, full: nn.ModuleDict, first: int, last: int, pre_process: bool, post_process: bool):
        super().__init__()
        self.pre_process, self.post_process = pre_process, post_process
        self.layer_numbers = list(range(first, last))
        self.embed = _copy_linear(full["embed"]) if pre_process else None
        self.layers = nn.ModuleList([_copy_linear(full["layers"][i]) for i in self.layer_numbers])
        self.head = _copy_linear(full["head"]) if post_process else None
        self.input_tensor = None

    def set_input_tensor(self, tensor):
        self.input_tensor = tensor

    def forward(self, x):
        hidden = self.embed(x) if self.pre_process else self.input_tensor  # [s, b, h]
        for number, layer in zip(self.layer_numbers, self.layers):
            if number % 2 == 0:
                hidden = hidden + torch.tanh(layer(hidden))
            else:
                hidden = torch.tanh(layer(hidden))
        return self.head(hidden) if self.post_process else hidden

    def global_named_parameters(self):
        if self.embed is not None:
            for name, param in self.embed.named_parameters():
                yield f"embed.{name}", param
        for number, layer in zip(self.layer_numbers, self.layers):
            for name, param in layer.named_parameters():
                yield f"layers.{number}.{name}", param
        if self.head is not None:
            for name, param in self.head.named_parameters():
                yield f"head.{name}", param


def _copy_linear(layer: nn.Linear) -> nn.Linear:
    copy = nn.Linear(layer.in_features, layer.out_features)
    with torch.no_grad():
        copy.weight.copy_(layer.weight)
        copy.bias.copy_(layer.bias)
    return copy


def build_stage(num_layers: int, num_virtual_stages: int, virtual_stage: int, seed: int = 1234) -> ToyStage:
    """The chunk for virtual stage `virtual_stage` of `num_virtual_stages` (pp * vp) stages."""
    if num_layers % num_virtual_stages:
        raise ValueError("layers must divide among the stages")
    per_stage = num_layers // num_virtual_stages
    full = build_full_layers(num_layers, seed)
    first = virtual_stage * per_stage
    return ToyStage(full, first, first + per_stage, virtual_stage == 0, virtual_stage == num_virtual_stages - 1)


class ToyDataParallel(nn.Module):
    """Stand-in for the data-parallel wrapper: records, for every gradient accumulated into a
    parameter, whether gradient reduction was enabled (outside `no_sync`) at that moment."""

    def __init__(self, module: ToyStage):
        super().__init__()
        self.module = module
        self.sync_enabled = True
        self.grad_events = []  # (parameter name, sync enabled)
        for name, param in module.global_named_parameters():
            param.register_post_accumulate_grad_hook(self._hook(name))

    def _hook(self, name):
        def record(_param):
            self.grad_events.append((name, self.sync_enabled))
        return record

    @contextlib.contextmanager
    def no_sync(self):
        self.sync_enabled = False
        try:
            yield
        finally:
            self.sync_enabled = True

    def forward(self, *args):
        return self.module(*args)


def make_microbatches(num_microbatches: int, seq_lengths=(4,), batch: int = 2, seed: int = 99):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for index in range(num_microbatches):
        seq = seq_lengths[index % len(seq_lengths)]
        batches.append({
            "x": torch.randn(seq, batch, IN_FEATURES, generator=generator),          # [s, b, 3]
            "target": torch.randn(seq, batch, OUT_FEATURES, generator=generator),    # [s, b, 2]
        })
    return batches


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["x"])

    def loss_func(output_tensor):
        loss = ((output_tensor - batch["target"]) ** 2).mean()
        return loss, {"loss": loss.detach().clone()}

    return output, loss_func


def serial_reference(num_layers: int, microbatches, grad_scale: float = 1.0, seed: int = 1234):
    """Full model, gradient accumulation over the micro-batches: (losses, grads by global name)."""
    stage = build_stage(num_layers, 1, 0, seed)
    losses = []
    for batch in microbatches:
        loss = ((stage(batch["x"]) - batch["target"]) ** 2).mean()
        losses.append(loss.detach().clone())
        (loss / len(microbatches) * grad_scale).backward()
    grads = {name: param.grad.clone() for name, param in stage.global_named_parameters()}
    return losses, grads


# ====================================================================== workers (run in each rank)


def _pipeline_groups(rank: int, world_size: int):
    ranks = list(range(world_size))
    pp = Group(group=dist.new_group(ranks), size=world_size, rank=rank, ranks=ranks)
    return SimpleNamespace(pp=pp, tp=Group.single(rank), cp=Group.single(rank))


def _config(variable_seq_lengths=False, group_size=None, overlap=False):
    return SimpleNamespace(hidden_size=HIDDEN, sequence_parallel=False, params_dtype=torch.float32,
                           variable_seq_lengths=variable_seq_lengths, overlap_p2p_comm=overlap,
                           microbatch_group_size_per_vp_stage=group_size)


def _sync_released_only_for_last_backward(chunk: ToyDataParallel) -> bool:
    """True when exactly the chunk's last backward ran with gradient reduction enabled."""
    names = [name for name, _ in chunk.module.global_named_parameters()]
    events = chunk.grad_events
    tail, head = events[-len(names):], events[:-len(names)]
    return (sorted(name for name, _ in tail) == sorted(names) and all(enabled for _, enabled in tail)
            and not any(enabled for _, enabled in head))


def _run_scenario(rank, pp_size, groups, *, num_layers, num_microbatches, vp=1, forward_only=False,
                  grad_scale=1.0, seq_lengths=(4,), variable=False, group_size=None, overlap=False,
                  device="cpu"):
    chunks = [ToyDataParallel(build_stage(num_layers, pp_size * vp, chunk * pp_size + rank).to(device))
              for chunk in range(vp)]
    batches = [{key: value.to(device) for key, value in batch.items()}
               for batch in make_microbatches(num_microbatches, seq_lengths)]
    iterators = [iter(batches) for _ in chunks]
    outputs = []
    finalize_calls = []

    def recording_forward_step(data_iterator, model):
        output, loss_func = forward_step(data_iterator, model)
        outputs.append((model, output))
        return output, loss_func

    schedule = get_forward_backward_func(pp_size, vp if vp > 1 else None)
    logs = schedule(
        forward_step_func=recording_forward_step,
        data_iterator=iterators if vp > 1 else iterators[0],
        model=chunks if vp > 1 else chunks[0],
        num_microbatches=num_microbatches, seq_length=seq_lengths[0], micro_batch_size=2,
        groups=groups, config=_config(variable, group_size, overlap), forward_only=forward_only,
        grad_scale_func=(lambda loss: loss * grad_scale) if grad_scale != 1.0 else None,
        finalize_model_grads_func=finalize_calls.append,
    )
    grads = {name: param.grad.cpu() for chunk in chunks
             for name, param in chunk.module.global_named_parameters() if param.grad is not None}
    sent = [output for model, output in outputs if not model.module.post_process]
    return {
        "losses": [entry["loss"].cpu() for entry in logs],
        "grads": grads,
        "finalize_calls": [[id(model) for model in call] == [id(chunk) for chunk in chunks] for call in finalize_calls],
        "sync_ok": forward_only or all(_sync_released_only_for_last_backward(chunk) for chunk in chunks),
        "no_grad_events": all(not chunk.grad_events for chunk in chunks),
        "num_forwards": len(outputs),
        "sent_outputs_freed": all(output.numel() == 1 for output in sent),
    }


def _check_against_serial(results, scenario, atol=1e-6):
    """results: per rank, this scenario's dict."""
    num_layers, num_microbatches = scenario["num_layers"], scenario["num_microbatches"]
    batches = make_microbatches(num_microbatches, scenario.get("seq_lengths", (4,)))
    ref_losses, ref_grads = serial_reference(num_layers, batches, scenario.get("grad_scale", 1.0))
    pp_size = len(results)
    vp = scenario.get("vp", 1)
    for rank, result in enumerate(results):
        assert result["num_forwards"] == num_microbatches * vp, rank
        if rank == pp_size - 1:
            assert len(result["losses"]) == num_microbatches
            for got, want in zip(result["losses"], ref_losses):
                torch.testing.assert_close(got, want, rtol=0, atol=atol)
        else:
            assert result["losses"] == [], "logging dicts come back on the last stage only"
    if scenario.get("forward_only"):
        for rank, result in enumerate(results):
            assert result["grads"] == {} and result["no_grad_events"], rank
            assert result["finalize_calls"] == [], "finalize_model_grads_func is not called in forward-only mode"
        return
    merged = {}
    for result in results:
        assert not set(merged) & set(result["grads"])
        merged.update(result["grads"])
    assert set(merged) == set(ref_grads)
    for name, want in ref_grads.items():
        torch.testing.assert_close(merged[name], want, rtol=0, atol=atol, msg=name)
    for rank, result in enumerate(results):
        assert result["finalize_calls"] == [True], f"rank {rank}: finalize_model_grads_func called once with the chunks"
        assert result["sync_ok"], f"rank {rank}: no_sync must be released exactly for each chunk's last backward"
        assert result["sent_outputs_freed"], f"rank {rank}: sent outputs keep their storage"


# The scenarios of each pipeline size run in one set of processes (one spawn per size keeps the
# file fast); the tests below check their parts.
PP2_SCENARIOS = {
    "1f1b": [
        dict(num_layers=4, num_microbatches=1),
        dict(num_layers=6, num_microbatches=5, grad_scale=8.0),  # boundary after a residual layer
        dict(num_layers=4, num_microbatches=3, forward_only=True),
        # shapes change per micro-batch: exchanged before each tensor
        dict(num_layers=4, num_microbatches=4, seq_lengths=(3, 5, 4), variable=True),
        # messages posted without waiting, received tensors waited for just before use
        dict(num_layers=6, num_microbatches=5, overlap=True),
    ],
    "interleaved": [
        dict(num_layers=8, num_microbatches=2, vp=2),
        dict(num_layers=8, num_microbatches=6, vp=2, grad_scale=4.0),
        dict(num_layers=12, num_microbatches=4, vp=3),
        dict(num_layers=8, num_microbatches=5, vp=2, group_size=3),  # groups of 3, last group of 2
        dict(num_layers=8, num_microbatches=4, vp=2, forward_only=True),
        dict(num_layers=8, num_microbatches=6, vp=2, overlap=True),
        dict(num_layers=8, num_microbatches=4, vp=2, overlap=True, seq_lengths=(3, 5), variable=True),
    ],
}
PP4_SCENARIOS = {
    "1f1b": [
        dict(num_layers=8, num_microbatches=2),   # fewer micro-batches than stages
        dict(num_layers=8, num_microbatches=7),
        dict(num_layers=8, num_microbatches=6, forward_only=True),
    ],
    "interleaved": [
        dict(num_layers=8, num_microbatches=4, vp=2),
        dict(num_layers=8, num_microbatches=8, vp=2),
        dict(num_layers=12, num_microbatches=4, vp=3),
        dict(num_layers=8, num_microbatches=4, vp=2, forward_only=True),
        dict(num_layers=12, num_microbatches=8, vp=3, overlap=True),
    ],
}
MEMORY_MICROBATCH_COUNTS = (3, 8)


def _pp2_worker(rank, world_size):
    groups = _pipeline_groups(rank, world_size)
    results = {name: [_run_scenario(rank, world_size, groups, **scenario) for scenario in scenarios]
               for name, scenarios in PP2_SCENARIOS.items()}
    results["p2p"] = _p2p_checks(rank, groups)
    results["interleaved_error"] = _interleaved_error(rank, groups)
    return results


def _pp4_worker(rank, world_size):
    groups = _pipeline_groups(rank, world_size)
    results = {name: [_run_scenario(rank, world_size, groups, **scenario) for scenario in scenarios]
               for name, scenarios in PP4_SCENARIOS.items()}
    results["memory"] = _memory_peaks(rank, world_size, groups, MEMORY_MICROBATCH_COUNTS)
    return results


@pytest.fixture(scope="module")
def pp2_results():
    return run_distributed(_pp2_worker, 2, timeout=180)


@pytest.fixture(scope="module")
def pp4_results():
    return run_distributed(_pp4_worker, 4, timeout=180)


def _check_all(per_rank, scenarios, name):
    for index, scenario in enumerate(scenarios[name]):
        _check_against_serial([result[name][index] for result in per_rank], scenario)


# ====================================================================== schedules equal serial


def test_1f1b_pp2_matches_serial(pp2_results):
    _check_all(pp2_results, PP2_SCENARIOS, "1f1b")


def test_1f1b_pp4_matches_serial(pp4_results):
    _check_all(pp4_results, PP4_SCENARIOS, "1f1b")


def test_interleaved_pp2_matches_serial(pp2_results):
    _check_all(pp2_results, PP2_SCENARIOS, "interleaved")


def test_interleaved_pp4_matches_serial(pp4_results):
    _check_all(pp4_results, PP4_SCENARIOS, "interleaved")


def _interleaved_error(rank, groups):
    chunks = [ToyDataParallel(build_stage(8, 4, chunk * 2 + rank)) for chunk in range(2)]
    schedule = get_forward_backward_func(2, 2)
    try:
        schedule(forward_step_func=forward_step, data_iterator=[iter([]), iter([])], model=chunks,
                 num_microbatches=3, seq_length=4, micro_batch_size=2, groups=groups, config=_config())
    except ValueError as error:
        return str(error)
    return None


def test_interleaved_rejects_bad_microbatch_count_before_any_work(pp2_results):
    for result in pp2_results:
        message = result["interleaved_error"]
        assert message is not None
        assert "last group of 1" in message and "--pipeline-model-parallel-size (2)" in message


# ====================================================================== point-to-point primitives


def _p2p_checks(rank, groups, device="cpu"):
    comm = P2PCommunicator(groups.pp, _config())
    shape = (2, 1, 3)
    mine = torch.full(shape, float(rank + 1), device=device)
    seen = {}
    # plain ends: 0 -> 1 forward, 1 -> 0 backward
    if rank == 0:
        comm.send_forward(mine)
        seen["recv_backward"] = comm.recv_backward(shape)
        seen["recv_forward"] = comm.recv_forward(shape)  # first stage: None
    else:
        got = comm.recv_forward(shape)
        seen["recv_forward"] = got
        seen["requires_grad"] = got.requires_grad
        comm.send_backward(mine * 10)
        seen["recv_backward"] = comm.recv_backward(shape)  # last stage: None
    # combined, non-ring
    if rank == 0:
        seen["send_forward_recv_backward"] = comm.send_forward_recv_backward(mine * 2, shape)
    else:
        seen["send_backward_recv_forward"] = comm.send_backward_recv_forward(mine * 20, shape)
    # ring: both directions at once, all four tensors in one call
    seen["ring"] = comm.send_forward_backward_recv_forward_backward(mine * 3, mine * 30, True, True, shape)
    seen["ring_forward"] = comm.send_forward_recv_forward(mine * 4, True, shape)
    seen["ring_backward"] = comm.send_backward_recv_backward(mine * 40, True, shape)
    return {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in seen.items()}


def test_p2p_primitives_pp2(pp2_results):
    _check_p2p(*(result["p2p"] for result in pp2_results))


def _check_p2p(rank0, rank1):
    full = lambda value: torch.full((2, 1, 3), float(value))  # noqa: E731
    torch.testing.assert_close(rank1["recv_forward"], full(1))
    assert rank1["requires_grad"]
    torch.testing.assert_close(rank0["recv_backward"], full(20))
    assert rank0["recv_forward"] is None and rank1["recv_backward"] is None
    torch.testing.assert_close(rank0["send_forward_recv_backward"], full(40))
    torch.testing.assert_close(rank1["send_backward_recv_forward"], full(2))
    # ring of two: prev and next are the same peer; activation and gradient must not be swapped
    torch.testing.assert_close(rank0["ring"][0], full(6))    # from prev (rank 1) forward
    torch.testing.assert_close(rank0["ring"][1], full(60))   # from next (rank 1) backward
    torch.testing.assert_close(rank1["ring"][0], full(3))
    torch.testing.assert_close(rank1["ring"][1], full(30))
    torch.testing.assert_close(rank0["ring_forward"], full(8))
    torch.testing.assert_close(rank1["ring_backward"], full(40))


# ====================================================================== activation high-water mark


class _SavedTensor:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


class _SavedActivationMeter:
    """Counts bytes of tensors autograd keeps for backward (parameters excluded), live and peak."""

    def __init__(self, parameters):
        self.parameter_storages = {param.untyped_storage().data_ptr() for param in parameters}
        self.live = self.peak = 0

    def _pack(self, tensor):
        holder = _SavedTensor(tensor)
        if tensor.untyped_storage().data_ptr() not in self.parameter_storages:
            size = tensor.numel() * tensor.element_size()
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(holder, self._release, size)
        return holder

    def _release(self, size):
        self.live -= size

    @staticmethod
    def _unpack(holder):
        return holder.tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)


def _all_forward_all_backward(chunk, data_iterator, num_microbatches, groups):
    """The naive pipeline (GPipe): every forward, then every backward, built on the primitives."""
    comm = P2PCommunicator(groups.pp, _config())
    shape = (4, 2, HIDDEN)
    in_flight = []
    for _ in range(num_microbatches):
        input_tensor = comm.recv_forward(shape)
        if input_tensor is not None:
            chunk.module.set_input_tensor(input_tensor)
        output, loss_func = forward_step(data_iterator, chunk)
        if comm.is_last_stage:
            output = loss_func(output)[0] / num_microbatches
        else:
            comm.send_forward(output)
        in_flight.append((input_tensor, output))
    for _ in range(num_microbatches):
        input_tensor, output = in_flight.pop(0)
        output_grad = comm.recv_backward(shape)
        torch.autograd.backward(output, output_grad)
        if input_tensor is not None:
            comm.send_backward(input_tensor.grad)


def _memory_peaks(rank, world_size, groups, microbatch_counts):
    peaks = {}
    for schedule_name in ("1f1b", "all_forward_all_backward"):
        for num_microbatches in (1,) + tuple(microbatch_counts):
            chunk = ToyDataParallel(build_stage(8, world_size, rank))
            data_iterator = iter(make_microbatches(num_microbatches))
            meter = _SavedActivationMeter(chunk.parameters())
            with meter.hooks():
                if schedule_name == "1f1b":
                    get_forward_backward_func(world_size, None)(
                        forward_step_func=forward_step, data_iterator=data_iterator, model=chunk,
                        num_microbatches=num_microbatches, seq_length=4, micro_batch_size=2,
                        groups=groups, config=_config())
                else:
                    _all_forward_all_backward(chunk, data_iterator, num_microbatches, groups)
            assert meter.live == 0, "all saved activations are released after the step"
            peaks[(schedule_name, num_microbatches)] = meter.peak
    return peaks


def test_1f1b_activation_high_water_mark_pp4(pp4_results):
    """Rank r holds at most min(pp - r, M) micro-batches of activations under 1F1B, all M under
    all-forward-all-backward (measured: peak bytes of saved tensors / bytes of one micro-batch)."""
    pp_size, counts = 4, MEMORY_MICROBATCH_COUNTS
    for rank, peaks in enumerate(result["memory"] for result in pp4_results):
        for name in ("1f1b", "all_forward_all_backward"):
            one = peaks[(name, 1)]
            assert one > 0
            for count in counts:
                in_flight = peaks[(name, count)] / one
                expected = min(pp_size - rank, count) if name == "1f1b" else count
                assert in_flight == expected, (rank, name, count, in_flight)


# ====================================================================== the real stack: GPTModel + DDP


GPT_VOCAB, GPT_SEQ, GPT_MBS, GPT_SEED = 64, 8, 2, 21


def _gpt_config(**overrides):
    from gigatron.core.transformer.config import TransformerConfig

    base = dict(num_layers=4, hidden_size=16, num_attention_heads=2, seq_length=GPT_SEQ,
                attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True)
    base.update(overrides)
    return TransformerConfig(**base)


def _gpt_batches(num_microbatches):
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, GPT_VOCAB, (num_microbatches, GPT_MBS, GPT_SEQ + 1), generator=generator)
    return [(tokens[i, :, :-1], tokens[i, :, 1:]) for i in range(num_microbatches)]  # ids, labels [b, s]


def _gpt_forward_step(data_iterator, model):
    ids, labels = next(data_iterator)
    output = model(ids, labels=labels)  # last stage: per-token loss [b, s]; else hidden [s, b, h]

    def loss_func(per_token_loss):
        loss = per_token_loss.mean()
        return loss, {"lm loss": torch.stack([per_token_loss.detach().sum(),
                                              torch.tensor(float(per_token_loss.numel()))])}

    return output, loss_func


GPT_MICROBATCHES = 4


def _gpt_worker(rank, world_size):
    return {vp: _gpt_run(world_size, vp, GPT_MICROBATCHES) for vp in (1, 2)}


def _gpt_run(world_size, vp, num_microbatches):
    from gigatron.core.distributed import DDPConfig, DistributedDataParallel, finalize_model_grads
    from gigatron.core.models.gpt import GPTModel
    from gigatron.core.parallel.config import ParallelConfig
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.core.transformer.block import layer_offset

    vp_size = vp if vp > 1 else None
    groups = ParallelGroups.build(ParallelConfig(pipeline_model_parallel_size=world_size,
                                                 virtual_pipeline_model_parallel_size=vp_size))
    config = _gpt_config(pipeline_model_parallel_size=world_size, virtual_pipeline_model_parallel_size=vp_size)
    chunks, offsets = [], []
    for chunk in range(vp):
        stage = GPTModel(config, groups, GPT_VOCAB, seed=GPT_SEED,
                         pre_process=groups.is_pipeline_first_stage(chunk if vp_size else None),
                         post_process=groups.is_pipeline_last_stage(chunk if vp_size else None),
                         vp_stage=chunk if vp_size else None)
        chunks.append(DistributedDataParallel(DDPConfig(), stage, groups))
        offsets.append(layer_offset(config, groups.pp.rank, groups.pp.size, chunk if vp_size else None, vp_size))
    batches = _gpt_batches(num_microbatches)
    schedule = get_forward_backward_func(world_size, vp_size)
    logs = schedule(
        forward_step_func=_gpt_forward_step,
        data_iterator=[iter(batches) for _ in chunks] if vp_size else iter(batches),
        model=chunks if vp_size else chunks[0],
        num_microbatches=num_microbatches, seq_length=GPT_SEQ, micro_batch_size=GPT_MBS,
        groups=groups, config=config,
        finalize_model_grads_func=lambda model_chunks: finalize_model_grads(model_chunks, groups, config))
    grads = {}
    for chunk, offset in zip(chunks, offsets):
        for name, param in chunk.module.named_parameters():
            parts = name.split(".")
            if parts[:2] == ["decoder", "layers"]:
                parts[2] = str(int(parts[2]) + offset)  # local -> global layer number
            grads[".".join(parts)] = param.main_grad.clone()
    return {"losses": [entry["lm loss"] for entry in logs], "grads": grads}


def _gpt_serial(num_microbatches):
    from gigatron.core.models.gpt import GPTModel
    from gigatron.core.parallel.groups import ParallelGroups

    model = GPTModel(_gpt_config(), ParallelGroups.single(), GPT_VOCAB, seed=GPT_SEED)
    losses = []
    for ids, labels in _gpt_batches(num_microbatches):
        per_token = model(ids, labels=labels)
        losses.append(torch.stack([per_token.detach().sum(), torch.tensor(float(per_token.numel()))]))
        (per_token.mean() / num_microbatches).backward()
    return losses, {name: param.grad.clone() for name, param in model.named_parameters()}


@pytest.fixture(scope="module")
def gpt_results():
    return run_distributed(_gpt_worker, 2, timeout=180)


@pytest.mark.parametrize("vp", [1, 2], ids=["1f1b", "interleaved"])
def test_gpt_pipeline_with_ddp_matches_serial(gpt_results, vp):
    """GPTModel stages under DDP (dp = 1) and finalize_model_grads (tied-embedding all-reduce
    between the first and last stage) equal the whole model with gradient accumulation."""
    rank0, rank1 = (result[vp] for result in gpt_results)
    ref_losses, ref_grads = _gpt_serial(GPT_MICROBATCHES)
    assert rank0["losses"] == []
    for got, want in zip(rank1["losses"], ref_losses, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    tied = "embedding.word_embeddings.weight"
    assert "output_layer.weight" in rank1["grads"]
    torch.testing.assert_close(rank1["grads"]["output_layer.weight"], rank0["grads"][tied])
    merged = {**rank0["grads"], **{k: v for k, v in rank1["grads"].items() if k != "output_layer.weight"}}
    assert set(merged) == set(ref_grads)
    for name, want in ref_grads.items():
        torch.testing.assert_close(merged[name], want, rtol=1e-5, atol=1e-6, msg=name)


# ====================================================================== NCCL (GPU)


def _pp2_nccl_worker(rank, world_size):
    torch.backends.cuda.matmul.allow_tf32 = False
    groups = _pipeline_groups(rank, world_size)
    results = {name: [_run_scenario(rank, world_size, groups, device="cuda", **scenario) for scenario in scenarios]
               for name, scenarios in PP2_SCENARIOS.items()}
    results["p2p"] = _p2p_checks(rank, groups, device="cuda")
    return results


@pytest.mark.gpu
def test_schedules_over_nccl_match_serial():
    """The same pp=2 scenarios (1F1B, interleaved, forward-only, variable lengths) over NCCL on
    two GPUs; the first exchange of a fresh pipeline group must not hang."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    per_rank = run_distributed(_pp2_nccl_worker, 2, backend="nccl", timeout=180)
    _check_p2p(*(result["p2p"] for result in per_rank))
    for name, scenarios in PP2_SCENARIOS.items():
        for index, scenario in enumerate(scenarios):
            _check_against_serial([result[name][index] for result in per_rank], scenario, atol=2e-5)
