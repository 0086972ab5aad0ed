"""ParallelGroups: every process group of a job, built in one place and passed explicitly.

`ParallelGroups.build(config)` is the only caller of `torch.distributed.new_group` in the library.
A `Group` with one member carries no process group (`group is None`) and every collective on it
is a no-op, so one-process code runs the same code path as parallel code.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Optional

import torch.distributed as dist

from .config import ParallelConfig
from .grid import generate_rank_groups

__all__ = ["Group", "ParallelGroups", "GROUP_KEYS", "load_nccl_communicator_config"]

# Order in which groups are created (identical on every rank, as torch.distributed requires).
GROUP_KEYS = (
    "dp", "dp_cp", "cp", "mp", "tp_pp", "tp", "pp", "embd", "pos_embd",
    "tp_dp_cp", "tp_dp", "tp_cp", "ep", "expt_tp", "tp_ep", "tp_ep_pp", "expt_dp",
)


_NCCL_OPTION_DEFAULTS = {"cga_cluster_size": 4, "max_ctas": 32, "min_ctas": 1}
_NCCL_OPTION_KEYS = tuple(_NCCL_OPTION_DEFAULTS) + ("net_name",)


def load_nccl_communicator_config(path: str) -> dict:
    """--nccl-communicator-config-path: {group name: {cga_cluster_size, max_ctas, min_ctas[, net_name]}}
    with Megatron's defaults filled in. Raises ValueError naming the file and the problem."""
    import yaml

    flag = f"--nccl-communicator-config-path {path}"
    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ValueError(f"{flag}: no such file; give the YAML file of per-group NCCL options") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{flag}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{flag}: expected a mapping of group names to options, got {type(raw).__name__}")
    config = {}
    for name, options in raw.items():
        if name not in GROUP_KEYS:
            raise ValueError(f"{flag}: unknown process group {name!r}; the groups are {', '.join(GROUP_KEYS)}")
        options = options or {}
        if not isinstance(options, dict):
            raise ValueError(f"{flag}: the options of {name!r} must be a mapping, e.g. {{max_ctas: 8}}")
        unknown = sorted(set(options) - set(_NCCL_OPTION_KEYS))
        if unknown:
            raise ValueError(f"{flag}: unknown option(s) {', '.join(map(str, unknown))} for {name!r}; "
                             f"known: {', '.join(_NCCL_OPTION_KEYS)}")
        merged = {**_NCCL_OPTION_DEFAULTS, **options}
        for key in _NCCL_OPTION_DEFAULTS:
            value = merged[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{flag}: {name}.{key} must be a positive integer, got {value!r}")
        if merged["min_ctas"] > merged["max_ctas"]:
            raise ValueError(f"{flag}: {name}.min_ctas ({merged['min_ctas']}) is larger than max_ctas "
                             f"({merged['max_ctas']})")
        if "net_name" in merged and not isinstance(merged["net_name"], str):
            raise ValueError(f"{flag}: {name}.net_name must be a string (an NCCL network name such as IB or Socket)")
        config[name] = merged
    return config


def _nccl_options(options: dict):
    """ProcessGroupNCCL.Options carrying one group's communicator options."""
    pg_options = dist.ProcessGroupNCCL.Options()
    for key, value in options.items():
        setattr(pg_options.config, key, value)
    return pg_options


@dataclass
class Group:
    """This rank's group of one kind.

    `group`: the torch.distributed process group, or None when the group has one member (or
    torch.distributed is not initialized). `ranks`: global ranks of the members, in group-rank
    order. `rank`: this process's rank inside the group. A rank that belongs to no group of a kind
    (e.g. a middle pipeline stage and the embedding group) gets `ranks == []`, `size == 0`,
    `rank == -1`.
    """

    group: Optional[object] = None
    size: int = 1
    rank: int = 0
    ranks: list = field(default_factory=lambda: [0])

    @property
    def is_member(self) -> bool:
        return self.size > 0

    @classmethod
    def single(cls, global_rank: int = 0) -> "Group":
        return cls(group=None, size=1, rank=0, ranks=[global_rank])

    @classmethod
    def absent(cls) -> "Group":
        return cls(group=None, size=0, rank=-1, ranks=[])


@dataclass
class ParallelGroups:
    """One Group per kind (see gigatron/core/parallel/grid.py for how ranks are assigned)."""

    tp: Group
    pp: Group
    dp: Group
    cp: Group
    ep: Group
    dp_cp: Group
    mp: Group
    tp_pp: Group
    tp_dp_cp: Group
    tp_dp: Group
    tp_cp: Group
    embd: Group
    pos_embd: Group
    expt_tp: Group
    expt_dp: Group
    tp_ep: Group
    tp_ep_pp: Group
    world_size: int = 1
    rank: int = 0
    vp_size: Optional[int] = None
    """Number of virtual pipeline stages per pipeline rank, or None without interleaving."""

    @classmethod
    def single(cls, vp_size: Optional[int] = None) -> "ParallelGroups":
        """All groups of size one, no process groups: a single process."""
        return cls(**{key: Group.single() for key in GROUP_KEYS}, world_size=1, rank=0, vp_size=vp_size)

    @classmethod
    def build(cls, config: ParallelConfig) -> "ParallelGroups":
        """Create every process group of the layout on every rank; keep this rank's.

        Needs torch.distributed to be initialized (world size = product of all parallel sizes and
        the data-parallel size). Without it, a layout of world size one gives `single()`."""
        if not dist.is_available() or not dist.is_initialized():
            sizes = (config.tensor_model_parallel_size, config.pipeline_model_parallel_size,
                     config.context_parallel_size, config.expert_model_parallel_size,
                     config.effective_expert_tensor_parallel_size)
            if any(s != 1 for s in sizes):
                raise ValueError(
                    "ParallelGroups.build: torch.distributed is not initialized but the parallel "
                    f"sizes (tp, pp, cp, ep, etp) = {sizes} need several processes; call "
                    "torch.distributed.init_process_group first (e.g. launch with torchrun)"
                )
            return cls.single(config.virtual_pipeline_model_parallel_size)
        world_size = dist.get_world_size()
        rank = dist.get_rank()
        if config.virtual_pipeline_model_parallel_size is not None and config.pipeline_model_parallel_size < 2:
            raise ValueError(
                "--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size > 1 "
                f"(got {config.pipeline_model_parallel_size}); drop the virtual size or add stages"
            )
        layout = generate_rank_groups(
            world_size,
            tp=config.tensor_model_parallel_size,
            pp=config.pipeline_model_parallel_size,
            cp=config.context_parallel_size,
            ep=config.expert_model_parallel_size,
            etp=config.expert_tensor_parallel_size,
            order=config.order,
        )
        timeout = datetime.timedelta(minutes=config.distributed_timeout_minutes)
        nccl_config = {}
        if config.nccl_communicator_config_path:
            nccl_config = load_nccl_communicator_config(config.nccl_communicator_config_path)
            if str(dist.get_backend()).lower() != "nccl":
                if rank == 0:
                    print(f"> --nccl-communicator-config-path: the {dist.get_backend()} backend has no NCCL "
                          "communicators; the options are ignored", flush=True)
                nccl_config = {}
        created: dict[tuple, object] = {}
        mine: dict[str, Group] = {}
        for key in GROUP_KEYS:
            mine[key] = Group.absent()
            options = nccl_config.get(key)
            for ranks in layout[key]:
                # A group with communicator options of its own does not share another kind's
                # communicator over the same ranks.
                ranks_key = (tuple(ranks), tuple(sorted(options.items())) if options else None)
                if len(ranks) > 1 and ranks_key not in created:
                    # Every rank creates every group, in the same order, member or not.
                    kwargs = {"pg_options": _nccl_options(options)} if options else {}
                    created[ranks_key] = dist.new_group(ranks=list(ranks), timeout=timeout, **kwargs)
                if rank in ranks:
                    process_group = created.get(ranks_key) if len(ranks) > 1 else None
                    mine[key] = Group(group=process_group, size=len(ranks), rank=ranks.index(rank),
                                      ranks=list(ranks))
        return cls(**mine, world_size=world_size, rank=rank,
                   vp_size=config.virtual_pipeline_model_parallel_size)

    def is_pipeline_first_stage(self, vp_stage: Optional[int] = None) -> bool:
        """This rank runs the first pipeline stage (of model chunk `vp_stage` when interleaving)."""
        if self.vp_size is not None and vp_stage is not None and vp_stage != 0:
            return False
        return self.pp.rank == 0

    def is_pipeline_last_stage(self, vp_stage: Optional[int] = None) -> bool:
        """This rank runs the last pipeline stage (of model chunk `vp_stage` when interleaving)."""
        if self.vp_size is not None and vp_stage is not None and vp_stage != self.vp_size - 1:
            return False
        return self.pp.rank == self.pp.size - 1
