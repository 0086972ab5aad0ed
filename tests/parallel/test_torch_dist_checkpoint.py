"""torch_dist checkpoints reshard (gloo, CPU).

A tiny GPT (GQA, SwiGLU fc1 of stride 2, tied embeddings split over two pipeline stages) is trained
2 steps at tp=2 x pp=2 x dp=2 with the distributed optimizer and saved (sync and async). The
checkpoint is loaded at tp=1 x dp=4 (distributed optimizer), tp=4 (plain optimizer) and in one
process (distributed optimizer at dp=1); each must hold exactly the saved full model and
optimizer state (reference: the saving run's shards merged by their tags, independent of the
format) and take the next step with the loss the saving run had. A dp=2 save with the plain
optimizer (one replica writes) loads in one process.
"""

import filecmp
import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader

from gigatron.core.checkpoint.dist import (
    AsyncCheckpointSaver,
    global_param_name,
    load_torch_dist,
    read_checkpoint_metadata,
    save_torch_dist,
)
from gigatron.core.distributed import DDPConfig, DistributedDataParallel, finalize_model_grads
from gigatron.core.models.gpt import GPTModel
from gigatron.core.optim import OptimizerConfig, get_optimizer
from gigatron.core.parallel import tags
from gigatron.core.parallel.config import ParallelConfig
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.pipeline import get_forward_backward_func
from gigatron.core.transformer.config import TransformerConfig
from tests.parallel.harness import run_distributed

VOCAB, SEQ, GLOBAL_BATCH, MICRO_BATCH = 64, 8, 8, 2
TRAIN_STEPS = 2


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _batches(steps):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g) for _ in range(steps)]


def _build(tp, pp, dist_opt, seed=1234):
    if dist.is_initialized():
        groups = ParallelGroups.build(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    else:  # one process (the test process itself)
        assert tp == pp == 1
        groups = ParallelGroups.single()
    config = TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=8, group_query_attention=True,
                               num_query_groups=4, swiglu=True, ffn_hidden_size=48, seq_length=SEQ,
                               attention_dropout=0.0, hidden_dropout=0.0, tensor_model_parallel_size=tp,
                               pipeline_model_parallel_size=pp)
    model = GPTModel(config, groups, VOCAB, pre_process=groups.pp.rank == 0,
                     post_process=groups.pp.rank == pp - 1, seed=seed)
    ddp = DistributedDataParallel(DDPConfig(use_distributed_optimizer=dist_opt, bucket_size=500), model, groups)
    opt = get_optimizer(OptimizerConfig(lr=1e-2, weight_decay=0.1, use_distributed_optimizer=dist_opt), [ddp],
                        groups)
    return groups, config, ddp, opt


def _forward_step(data_iterator, model):
    tokens = next(data_iterator)
    output = model(tokens[:, :-1], None, None, labels=tokens[:, 1:])  # [b, s]

    def loss_func(out):
        loss = out.float().mean()
        return loss, {"lm loss": torch.stack([out.float().sum().detach(), torch.tensor(float(out.numel()))])}

    return output, loss_func


def _train_step(groups, config, ddp, opt, batch, update=True):
    """One step on the global `batch`; returns the global mean loss (before the update)."""
    per_rank = GLOBAL_BATCH // groups.dp.size
    rows = batch[groups.dp.rank * per_rank:(groups.dp.rank + 1) * per_rank]
    micro = list(rows.split(MICRO_BATCH))
    ddp.zero_grad_buffer()
    opt.zero_grad()
    schedule = get_forward_backward_func(groups.pp.size, None)
    losses = schedule(forward_step_func=_forward_step, data_iterator=iter(micro), model=[ddp],
                      num_microbatches=len(micro), seq_length=SEQ, micro_batch_size=MICRO_BATCH, groups=groups,
                      config=config,
                      finalize_model_grads_func=lambda chunks, num_tokens=None: finalize_model_grads(
                          chunks, groups, config, num_tokens))
    total = torch.zeros(2, dtype=torch.float64)
    if groups.pp.rank == groups.pp.size - 1 and groups.tp.rank == 0:
        for record in losses:
            total += record["lm loss"].double()
    if dist.is_initialized():
        dist.all_reduce(total)
    if update:
        ok, _, _ = opt.step()
        assert ok
        ddp.finish_param_sync()
    return (total[0] / total[1]).item()


def _local_state(ddp, opt):
    """{global name: (model shard, {state name: optimizer shard}, (dim, stride, tp rank, tp size))}."""
    module = ddp.module
    full_opt = opt.state_dict_for_save()["params"]  # dp-independent, by local name
    out = {}
    for name, param in module.named_parameters():
        if name == "output_layer.weight" and tags.is_shared_embedding(param):
            continue
        layout = (tags.partition_dim(param), tags.partition_stride(param), *tags.partition_shard(param)) \
            if tags.is_tensor_parallel(param) else (-1, 1, 0, 1)
        out[global_param_name(module, name)] = (param.detach().clone(), full_opt[name], layout)
    return out


def _merge(shards):
    """Full logical tensor from {tp rank: shard} and (dim, stride)."""
    (dim, stride), parts = shards
    ranks = sorted(parts)
    if dim < 0:
        return parts[ranks[0]]
    blocks = [torch.chunk(parts[r], stride, dim=dim) for r in ranks]
    return torch.cat([blocks[r][b] for b in range(stride) for r in range(len(ranks))], dim=dim)


def _full_states(per_rank_states):
    """Merge every rank's `_local_state` into {global name: {"model": t, "param": t, "exp_avg": t, ...}}."""
    collected = {}
    for state in per_rank_states:
        for name, (model_t, opt_rec, (dim, stride, rank, _)) in state.items():
            entry = collected.setdefault(name, {})
            for what, t in [("model", model_t)] + list(opt_rec.items()):
                parts = entry.setdefault(what, ((dim, stride), {}))[1]
                if rank in parts:
                    assert torch.equal(parts[rank], t), f"replicas of {name}.{what} differ"
                parts[rank] = t
    return {name: {what: _merge(v) for what, v in entry.items()} for name, entry in collected.items()}


def _assert_same_full_state(got, expected):
    assert sorted(got) == sorted(expected)
    for name in expected:
        for what in expected[name]:
            assert torch.equal(got[name][what], expected[name][what]), f"{name} {what} differs"


# ---------------------------------------------------------------------------------------------- workers


def _save_worker(rank, world_size, root, tp, pp, dist_opt):
    groups, config, ddp, opt = _build(tp, pp, dist_opt)
    batches = _batches(TRAIN_STEPS + 1)
    for batch in batches[:TRAIN_STEPS]:
        _train_step(groups, config, ddp, opt, batch)
    extra = {"iteration": TRAIN_STEPS, "args": {"lr": 1e-2}, "consumed_train_samples": TRAIN_STEPS * GLOBAL_BATCH}
    rng = {"torch_rng_state": torch.get_rng_state(), "rank": rank}
    finalized = []
    save_torch_dist(os.path.join(root, "sync"), [ddp], opt, extra, groups, rng_state=rng,
                    finalize_fn=lambda: finalized.append("sync"))
    saver = AsyncCheckpointSaver()
    save_torch_dist(os.path.join(root, "async"), [ddp], opt, extra, groups, async_saver=saver, rng_state=rng,
                    finalize_fn=lambda: finalized.append("async"))
    while not saver.maybe_finalize():
        pass
    saver.close()
    state = _local_state(ddp, opt)
    next_loss = _train_step(groups, config, ddp, opt, batches[TRAIN_STEPS])
    return {"state": state, "next_loss": next_loss, "finalized": finalized}


def _load_worker(rank, world_size, path, tp, pp, dist_opt):
    groups, config, ddp, opt = _build(tp, pp, dist_opt, seed=999)  # different init: the load must overwrite it
    extra = load_torch_dist(path, [ddp], opt, groups)
    state = _local_state(ddp, opt)
    next_loss = _train_step(groups, config, ddp, opt, _batches(TRAIN_STEPS + 1)[TRAIN_STEPS])
    return {"state": state, "next_loss": next_loss, "extra": extra}


# ---------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("torch_dist"))
    results = run_distributed(_save_worker, 8, root, 2, 2, True, timeout=240)
    return root, results


def test_save_layout_and_finalize(saved):
    root, results = saved
    assert all(r["finalized"] == ["sync", "async"] for r in results)
    for kind in ("sync", "async"):
        path = os.path.join(root, kind)
        record = read_checkpoint_metadata(path)
        assert record["sharded_backend"] == "torch_dist" and record["sharded_backend_version"] == 1
        names = set(os.listdir(path))
        assert {".metadata", "common.pt", "metadata.json"} <= names
        assert set(record["files"]) == names - {"metadata.json"}
        assert any(n.startswith("__7_") and n.endswith(".distcp") for n in names)


def test_async_save_writes_the_same_content_as_sync(saved):
    root, _ = saved
    sync_dir, async_dir = os.path.join(root, "sync"), os.path.join(root, "async")
    data_files = sorted(n for n in os.listdir(sync_dir) if n.endswith(".distcp"))
    assert data_files == sorted(n for n in os.listdir(async_dir) if n.endswith(".distcp"))
    for name in data_files:
        assert filecmp.cmp(os.path.join(sync_dir, name), os.path.join(async_dir, name), shallow=False), name
    common = [torch.load(os.path.join(d, "common.pt"), weights_only=True) for d in (sync_dir, async_dir)]
    assert repr(common[0]) == repr(common[1])


def _load(world, path, tp, pp, dist_opt):
    if world == 1:
        return [_load_worker(0, 1, path, tp, pp, dist_opt)]
    return run_distributed(_load_worker, world, path, tp, pp, dist_opt, timeout=180)


@pytest.mark.parametrize("tp,pp,dist_opt,world", [(1, 1, True, 4), (4, 1, False, 4), (1, 1, True, 1)],
                         ids=["tp1-dp4-distopt", "tp4", "single-distopt"])
def test_resume_at_another_layout(saved, tp, pp, dist_opt, world):
    root, results = saved
    expected = _full_states([r["state"] for r in results])
    loaded = _load(world, os.path.join(root, "async"), tp, pp, dist_opt)
    _assert_same_full_state(_full_states([r["state"] for r in loaded]), expected)
    for r in loaded:
        assert r["next_loss"] == pytest.approx(results[0]["next_loss"], abs=1e-6)
        assert r["extra"]["iteration"] == TRAIN_STEPS
        assert r["extra"]["consumed_train_samples"] == TRAIN_STEPS * GLOBAL_BATCH
        assert r["extra"]["rng_state"] is None  # another layout: per-rank RNG streams do not carry over
        assert r["extra"]["parallel_layout"]["tp"] == 2


def test_plain_optimizer_dp2_to_one_process(tmp_path):
    root = str(tmp_path)
    results = run_distributed(_save_worker, 2, root, 1, 1, False)
    expected = _full_states([r["state"] for r in results])
    loaded = _load(1, os.path.join(root, "sync"), 1, 1, False)
    _assert_same_full_state(_full_states([r["state"] for r in loaded]), expected)
    assert loaded[0]["next_loss"] == pytest.approx(results[0]["next_loss"], abs=1e-6)
    # the data-parallel replica 1 holds the same model and optimizer state: it writes no tensor
    metadata = FileSystemReader(os.path.join(root, "sync")).read_metadata()
    assert {info.relative_path[:4] for info in metadata.storage_data.values()} == {"__0_"}
