"""Distributed optimizer: fp32 main params and optimizer states sharded over data-parallel ranks.

Each bucket of each DDP buffer (n elements, n divisible by dp) is split into dp equal contiguous
shards; rank r owns [r * n / dp, (r + 1) * n / dp). For every parameter overlapping the local
shard the rank keeps one ParamEntry: the overlapping flat range of the parameter and an fp32 main
param for exactly that range (a view of the parameter buffer when the params are fp32, a separate
fp32 copy for bf16/fp16). Gradients arrive reduce-scattered in the local shard of the grad buffer;
after the step the updated shard is written into the parameter buffer and all-gathered
(DistributedDataParallel.start_param_sync, overlapped with the next forward when asked).

Bytes per parameter (d = data-parallel size; padding aside): bf16 params + fp32 grads: 2 + 4 +
(4 main + 8 Adam) / d = 6 + 12/d; fp32 params + fp32 grads: 4 + 4 + 8/d.

With --fp8-param-gather the FP8 linears' weights sit in buffers of FP8 storage: the updated
shards are cast to FP8 with each weight's global amax (one MAX all-reduce per buffer) and the
all-gather moves one byte per element (gigatron.core.fp8.param_gather); those weights cost one
byte per element more (2 + 1 + 4 + 12/d).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from gigatron.core.fp8.param_gather import cast_main_shards
from gigatron.core.parallel.tags import is_expert_parallel

from .config import OptimizerConfig
from .grad_scaler import MegatronGradScaler
from .optimizer import (
    FULL_STATE_FORMAT,
    MegatronOptimizer,
    OptimizerStateMismatch,
    ParamEntry,
    _make_torch_optimizer,
)

__all__ = ["DistributedOptimizer"]


class DistributedOptimizer(MegatronOptimizer):
    """ZeRO-1 style sharded optimizer over DistributedDataParallel chunks built with
    use_distributed_optimizer=True."""

    def __init__(self, config: OptimizerConfig, model_chunks, groups, param_groups: list[dict],
                 grad_scaler: Optional[MegatronGradScaler]) -> None:
        super().__init__(config, model_chunks, groups, grad_scaler=grad_scaler)
        group_of = {}
        names = {}
        for gi, g in enumerate(param_groups):
            for param, name in zip(g["params"], g["names"]):
                group_of[param] = gi
                names[param] = name
        self._entry_buffer_range: list[tuple] = []  # (buffer, lo, hi) per entry
        mains_per_group: list[list] = [[] for _ in param_groups]
        for chunk in self.model_chunks:
            for buf in chunk.grad_buffers:
                for bucket in buf.buckets:
                    shard_lo, shard_hi = bucket.shard_range(buf.dp_rank)
                    for param in bucket.params:
                        p_lo, p_hi, _ = buf.param_index_map[param]
                        lo, hi = max(p_lo, shard_lo), min(p_hi, shard_hi)
                        if lo >= hi:
                            continue
                        if param not in group_of:
                            raise ValueError("a DDP parameter is missing from the optimizer param groups")
                        if buf.fp8_params:  # FP8 storage: the shard's values come from the parameter
                            main = param.detach().reshape(-1)[lo - p_lo:hi - p_lo].float()
                        elif buf.param_dtype == torch.float32:
                            main = buf.param_data[lo:hi]  # the fp32 model weights themselves
                        else:
                            main = buf.param_data[lo:hi].detach().float()  # fp32 copy of the shard
                        gi = group_of[param]
                        self.entries.append(ParamEntry(param, names[param], lo - p_lo, hi - p_lo, main, gi))
                        self._entry_buffer_range.append((buf, lo, hi))
                        mains_per_group[gi].append(main)
        main_groups = [{**g, "params": mains} for g, mains in zip(param_groups, mains_per_group)]
        self.optimizer = _make_torch_optimizer(config, main_groups, self.device)
        # Buffers of FP8-gathered weights, each with its local shards: (index of the weight in the
        # buffer, fp32 main shard, the uint8 storage slice it is cast into).
        self._fp8_buffers = []
        for chunk in self.model_chunks:
            for buf in chunk.grad_buffers:
                if buf.fp8_params:
                    index = {param: i for i, param in enumerate(buf.params)}
                    pieces = [(index[entry.model_param], entry.main_param, b.param_data[lo:hi])
                              for entry, (b, lo, hi) in zip(self.entries, self._entry_buffer_range) if b is buf]
                    self._fp8_buffers.append((buf, pieces))

    # ------------------------------------------------------------ step pieces
    def _before_step(self) -> None:
        for chunk in self.model_chunks:
            chunk.finish_param_sync()

    def _after_step(self) -> None:
        for chunk in self.model_chunks:
            chunk.start_param_sync()

    def _after_load(self) -> None:
        for chunk in self.model_chunks:
            chunk.start_param_sync(force_sync=True)

    def _copy_model_grads_to_main_grads(self) -> None:
        for entry, (buf, lo, hi) in zip(self.entries, self._entry_buffer_range):
            grad = buf.grad_data[lo:hi]
            entry.main_param.grad = grad if grad.dtype == torch.float32 else grad.float()

    def _copy_main_params_to_model_params(self) -> None:
        for entry, (buf, lo, hi) in zip(self.entries, self._entry_buffer_range):
            if buf.fp8_params:
                continue
            shard = buf.param_data[lo:hi]
            if entry.main_param.data_ptr() != shard.data_ptr():
                shard.copy_(entry.main_param)
        for buf, pieces in self._fp8_buffers:
            cast_main_shards(buf.params, pieces, buf.dp_group)

    def reload_model_params(self) -> None:
        super().reload_model_params()
        if self._fp8_buffers:
            # The FP8 copies the linears read must follow the loaded weights before the next forward.
            self._copy_main_params_to_model_params()
            self._after_load()

    def _grad_stats_groups(self) -> list:
        # Each element's gradient lives on exactly one data-parallel rank: add over both.
        return [self.groups.mp.group, self.groups.dp_cp.group]

    def _full_state_group(self):
        return self.groups.dp_cp.group

    def _expert_grad_stats_groups(self) -> list:
        # Expert shards live on one expert-data-parallel rank each: add over expt_dp too.
        return [self.groups.tp_ep_pp.group, self.groups.expt_dp.group]

    def _param_state_group(self, param):
        return self.groups.expt_dp.group if is_expert_parallel(param) else self.groups.dp_cp.group

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The full, data-parallel-size independent state (see state_dict_for_save); collective
        over the data-parallel group."""
        return self.state_dict_for_save()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != FULL_STATE_FORMAT:
            raise OptimizerStateMismatch(
                "the distributed optimizer loads the full optimizer state written by "
                "state_dict()/state_dict_for_save(); this checkpoint holds another layout"
            )
        self.load_state_dict_from_full(state_dict)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds: model params/grads in the DDP buffers, fp32 main params that are
        not views of the model params, and optimizer states."""
        param_bytes = sum(b.param_data.numel() * b.param_data.element_size()
                          + (sum(p.numel() * p.element_size() for p in b.params) if b.fp8_params else 0)
                          for c in self.model_chunks for b in c.grad_buffers)
        grad_bytes = sum(b.grad_data.numel() * b.grad_data.element_size()
                         for c in self.model_chunks for b in c.grad_buffers)
        main_bytes = 0
        for entry, (buf, lo, hi) in zip(self.entries, self._entry_buffer_range):
            if entry.main_param.data_ptr() != buf.param_data[lo:hi].data_ptr():
                main_bytes += entry.main_param.numel() * entry.main_param.element_size()
        state_bytes = 0
        for st in self.optimizer.state.values():
            for value in st.values():
                if torch.is_tensor(value) and value.dim() > 0:
                    state_bytes += value.numel() * value.element_size()
        return {"params": param_bytes, "grads": grad_bytes, "main_params": main_bytes,
                "optimizer_states": state_bytes}
