"""ParallelGroups built in real processes against the pure rank layout, and every collective of
gigatron/core/parallel/mappings.py, forward and backward, against plain tensor arithmetic."""

import datetime

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from gigatron.core.parallel import mappings
from gigatron.core.parallel.config import ParallelConfig
from gigatron.core.parallel.grid import generate_rank_groups
from gigatron.core.parallel.groups import GROUP_KEYS, Group, ParallelGroups

from .harness import run_distributed

LAYOUTS = [
    dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
    dict(tensor_model_parallel_size=2, context_parallel_size=2),
    dict(pipeline_model_parallel_size=4, virtual_pipeline_model_parallel_size=2),
    dict(tensor_model_parallel_size=2, expert_model_parallel_size=4, expert_tensor_parallel_size=1),
    dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, order="tp-pp-dp"),
]


def groups_worker(rank, world_size, layouts):
    report = []
    for sizes in layouts:
        config = ParallelConfig(distributed_backend="gloo", distributed_timeout_minutes=7, **sizes)
        groups = ParallelGroups.build(config)
        assert groups.rank == rank and groups.world_size == world_size
        assert groups.vp_size == config.virtual_pipeline_model_parallel_size
        mine = {}
        for key in GROUP_KEYS:
            group: Group = getattr(groups, key)
            if group.size > 1:
                # The process group really joins these ranks: sum of their global ranks.
                total = torch.tensor([float(rank)])
                dist.all_reduce(total, group=group.group)
                assert total.item() == sum(group.ranks), key
                assert dist.get_process_group_ranks(group.group) == group.ranks, key
                timeout = group.group._get_backend(torch.device("cpu")).options._timeout
                assert timeout == datetime.timedelta(minutes=7), key
            else:
                assert group.group is None
            mine[key] = (group.ranks, group.rank, group.size)
        mine["first"] = (groups.is_pipeline_first_stage(), groups.is_pipeline_first_stage(vp_stage=1))
        mine["last"] = (groups.is_pipeline_last_stage(), groups.is_pipeline_last_stage(vp_stage=0))
        report.append(mine)
    return report


def test_groups_match_rank_layout_in_4_processes():
    reports = run_distributed(groups_worker, 4, LAYOUTS)
    for index, sizes in enumerate(LAYOUTS):
        config = ParallelConfig(**sizes)
        layout = generate_rank_groups(
            4, config.tensor_model_parallel_size, config.pipeline_model_parallel_size,
            cp=config.context_parallel_size, ep=config.expert_model_parallel_size,
            etp=config.expert_tensor_parallel_size, order=config.order)
        for rank in range(4):
            mine = reports[rank][index]
            for key in GROUP_KEYS:
                ranks, group_rank, size = mine[key]
                containing = [g for g in layout[key] if rank in g]
                if not containing:  # e.g. a middle pipeline stage and the embedding group
                    assert (ranks, group_rank, size) == ([], -1, 0), (key, sizes)
                    continue
                assert ranks == containing[0] and size == len(ranks), (key, sizes)
                assert ranks[group_rank] == rank
            pp_rank = mine["pp"][1]
            pp_size = config.pipeline_model_parallel_size
            vp = config.virtual_pipeline_model_parallel_size
            assert mine["first"] == (pp_rank == 0, pp_rank == 0 and vp is None)
            assert mine["last"] == (pp_rank == pp_size - 1, pp_rank == pp_size - 1 and vp is None)
    # pp=4: the middle stages are in no embedding group; the ends share one.
    assert [reports[r][2]["embd"][0] for r in range(4)] == [[0, 3], [], [], [0, 3]]
    assert [reports[r][2]["pos_embd"][0] for r in range(4)] == [[0], [], [], []]


def test_single_process_groups():
    groups = ParallelGroups.single()
    for key in GROUP_KEYS:
        group = getattr(groups, key)
        assert (group.group, group.size, group.rank, group.ranks) == (None, 1, 0, [0])
    assert groups.is_pipeline_first_stage() and groups.is_pipeline_last_stage()
    assert groups.world_size == 1 and groups.rank == 0
    if not dist.is_initialized():
        assert ParallelGroups.build(ParallelConfig()).tp.size == 1
        with pytest.raises(ValueError, match="init_process_group"):
            ParallelGroups.build(ParallelConfig(tensor_model_parallel_size=2))
    x = torch.randn(4, 2, 6, requires_grad=True)
    one = Group.single()
    for fn in (mappings.copy_to_tensor_parallel_region, mappings.reduce_from_tensor_parallel_region,
               mappings.scatter_to_tensor_parallel_region, mappings.gather_from_tensor_parallel_region,
               mappings.scatter_to_sequence_parallel_region, mappings.gather_from_sequence_parallel_region,
               mappings.reduce_scatter_to_sequence_parallel_region):
        assert fn(x, one) is x
    assert mappings.all_to_all(one, x, -1, 0) is x


# ---------------------------------------------------------------------------------------------
# Mappings: rank q's input is rank_input(q); expected values are computed from all ranks' inputs.
# ---------------------------------------------------------------------------------------------

SHAPE = (4, 2, 8)  # [s, b, h]; s and h divisible by the group sizes tested


def rank_input(q, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + q))


def rank_grad(q, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(200 + q))


def run_mapping(fn, x):
    x = x.clone().requires_grad_()
    y = fn(x)
    y.backward(rank_grad(dist.get_rank(), y.shape))
    return y.detach(), x.grad


def mappings_worker(rank, world_size):
    groups = ParallelGroups.build(ParallelConfig(tensor_model_parallel_size=world_size, distributed_backend="gloo"))
    tp = groups.tp
    r, t = tp.rank, tp.size
    xs = [rank_input(q) for q in range(t)]
    x = xs[r]
    same = xs[0]  # an input that is the same on every rank

    def chunk(v, dim, i):
        return v.chunk(t, dim=dim)[i]

    # f: identity / all-reduce
    y, g = run_mapping(lambda v: mappings.copy_to_tensor_parallel_region(v, tp), same)
    assert_close(y, same)
    assert_close(g, sum(rank_grad(q, SHAPE) for q in range(t)))
    # g: all-reduce / identity
    y, g = run_mapping(lambda v: mappings.reduce_from_tensor_parallel_region(v, tp), x)
    assert_close(y, sum(xs))
    assert_close(g, rank_grad(r, SHAPE))
    # scatter (last dim) / all-gather
    y, g = run_mapping(lambda v: mappings.scatter_to_tensor_parallel_region(v, tp), same)
    assert_close(y, chunk(same, -1, r))
    local = SHAPE[:-1] + (SHAPE[-1] // t,)
    assert_close(g, torch.cat([rank_grad(q, local) for q in range(t)], dim=-1))
    # all-gather (last dim) / split
    y, g = run_mapping(lambda v: mappings.gather_from_tensor_parallel_region(v, tp), x)
    assert_close(y, torch.cat(xs, dim=-1))
    full = SHAPE[:-1] + (SHAPE[-1] * t,)
    assert_close(g, chunk(rank_grad(r, full), -1, r))
    # scatter (dim 0) / all-gather
    y, g = run_mapping(lambda v: mappings.scatter_to_sequence_parallel_region(v, tp), same)
    assert_close(y, chunk(same, 0, r))
    seq_local = (SHAPE[0] // t,) + SHAPE[1:]
    assert_close(g, torch.cat([rank_grad(q, seq_local) for q in range(t)], dim=0))
    # all-gather (dim 0) / reduce-scatter, and / split
    seq_full = (SHAPE[0] * t,) + SHAPE[1:]
    y, g = run_mapping(lambda v: mappings.gather_from_sequence_parallel_region(v, tp), x)
    assert_close(y, torch.cat(xs, dim=0))
    assert_close(g, chunk(sum(rank_grad(q, seq_full) for q in range(t)), 0, r))
    y, g = run_mapping(lambda v: mappings.gather_from_sequence_parallel_region(v, tp, False), x)
    assert_close(y, torch.cat(xs, dim=0))
    assert_close(g, chunk(rank_grad(r, seq_full), 0, r))
    # reduce-scatter (dim 0) / all-gather
    y, g = run_mapping(lambda v: mappings.reduce_scatter_to_sequence_parallel_region(v, tp), x)
    assert_close(y, chunk(sum(xs), 0, r))
    assert_close(g, torch.cat([rank_grad(q, seq_local) for q in range(t)], dim=0))
    # all-to-all: heads (last dim) scattered, sequence (dim 0) gathered; backward is the inverse.
    y, g = run_mapping(lambda v: mappings.all_to_all(tp, v, -1, 0), x)
    assert_close(y, torch.cat([chunk(xs[q], -1, r) for q in range(t)], dim=0))
    a2a_out = (SHAPE[0] * t,) + SHAPE[1:-1] + (SHAPE[-1] // t,)
    assert_close(g, torch.cat([chunk(rank_grad(q, a2a_out), 0, r) for q in range(t)], dim=-1))
    # Plain collectives along a middle dim.
    assert_close(mappings.all_gather(x, tp, dim=1), torch.cat(xs, dim=1))
    wide = torch.cat([x] * t, dim=1)  # [s, t*b, h]
    assert_close(mappings.reduce_scatter(wide, tp, dim=1), sum(xs))
    with pytest.raises(ValueError, match="not divisible by the group size"):
        mappings.split(torch.zeros(2 * t + 1, 2), tp, dim=0)
    return True


@pytest.mark.parametrize("world_size", [2, 4])
def test_mappings_forward_and_backward(world_size):
    assert run_distributed(mappings_worker, world_size) == [True] * world_size


def failing_worker(rank, world_size):
    if rank == 1:
        raise KeyError("missing on rank 1")
    dist.barrier()  # rank 0 waits in a collective that never completes; the harness stops it
    return rank


def returning_worker(rank, world_size, offset):
    return {"rank": rank + offset, "t": torch.full((2,), float(rank))}


def test_harness_returns_values_and_reraises_child_errors():
    values = run_distributed(returning_worker, 2, 10)
    assert [v["rank"] for v in values] == [10, 11]
    assert torch.equal(values[1]["t"], torch.ones(2))
    with pytest.raises(KeyError, match="missing on rank 1") as info:
        run_distributed(failing_worker, 2, timeout=60)
    assert any("failing_worker" in note for note in info.value.__notes__)


# ------------------------------------------------------------------ --nccl-communicator-config-path
def test_nccl_communicator_config_is_read_with_megatrons_defaults(tmp_path):
    from gigatron.core.parallel.groups import load_nccl_communicator_config

    path = tmp_path / "nccl.yaml"
    path.write_text("dp:\n  max_ctas: 8\ntp:\n  cga_cluster_size: 2\n  net_name: IB\nembd:\n")
    assert load_nccl_communicator_config(str(path)) == {
        "dp": {"cga_cluster_size": 4, "max_ctas": 8, "min_ctas": 1},
        "tp": {"cga_cluster_size": 2, "max_ctas": 32, "min_ctas": 1, "net_name": "IB"},
        "embd": {"cga_cluster_size": 4, "max_ctas": 32, "min_ctas": 1},
    }
    path.write_text("")
    assert load_nccl_communicator_config(str(path)) == {}
    with pytest.raises(ValueError, match="no such file"):
        load_nccl_communicator_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("text, message", [
    ("dpp: {max_ctas: 8}", "unknown process group 'dpp'"),
    ("dp: {max_cta: 8}", "unknown option"),
    ("dp: {max_ctas: 0}", "dp.max_ctas must be a positive integer"),
    ("dp: {max_ctas: eight}", "dp.max_ctas must be a positive integer"),
    ("dp: {min_ctas: 16, max_ctas: 8}", "min_ctas \\(16\\) is larger than max_ctas \\(8\\)"),
    ("dp: 8", "must be a mapping"),
    ("[dp, tp]", "expected a mapping"),
    ("dp: {max_ctas: [", "not valid YAML"),
])
def test_bad_nccl_communicator_config_names_the_problem(tmp_path, text, message):
    from gigatron.core.parallel.groups import load_nccl_communicator_config

    path = tmp_path / "nccl.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="--nccl-communicator-config-path .*" + message):
        load_nccl_communicator_config(str(path))


def nccl_config_worker(rank, world_size, path):
    config = ParallelConfig(distributed_backend="gloo", tensor_model_parallel_size=2,
                            nccl_communicator_config_path=path)
    groups = ParallelGroups.build(config)  # gloo: the options are read, checked and ignored
    total = torch.tensor([1.0])
    dist.all_reduce(total, group=groups.dp.group)
    return groups.dp.ranks, total.item()


def test_nccl_communicator_config_on_gloo_builds_the_usual_groups(tmp_path):
    path = tmp_path / "nccl.yaml"
    path.write_text("dp: {max_ctas: 8}\n")
    reports = run_distributed(nccl_config_worker, 4, str(path))
    assert reports == [([0, 2], 2.0), ([1, 3], 2.0), ([0, 2], 2.0), ([1, 3], 2.0)]


@pytest.mark.gpu
def test_nccl_options_object_carries_the_group_options():
    from gigatron.core.parallel.groups import _nccl_options

    options = _nccl_options({"cga_cluster_size": 2, "max_ctas": 8, "min_ctas": 1})
    assert (options.config.cga_cluster_size, options.config.max_ctas, options.config.min_ctas) == (2, 8, 1)
