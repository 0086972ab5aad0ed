"""Optimizers over DistributedDataParallel model chunks.

- `FP32Optimizer`: fp32 parameters; the torch optimizer updates them directly from main_grad.
- `MixedPrecisionOptimizer`: bf16/fp16 parameters; fp32 main copies are what the torch optimizer
  updates; gradients come from the fp32 main_grad buffers; fp16 uses a loss scaler (unscale,
  Inf/NaN check agreed over the model-parallel group, skipped step on overflow); after the step the
  main weights are copied back into the model.
- `DistributedOptimizer` (distrib_optimizer.py): the same, sharded over data-parallel ranks.

`get_optimizer` (factory.py, re-exported by gigatron.core.optim) picks one of them; this module
imports none of its subclasses.

Each keeps a list of entries (model param, flat element range [start, end) of it that this rank
updates, main param tensor). Non-distributed optimizers own the whole parameter; the distributed
optimizer owns one contiguous piece. The global grad norm is the L2 norm over every element of the
model counted once across the job (tensor-parallel duplicates on tp rank 0 only; the tied
embedding on the first pipeline stage only).

step() returns (update_successful, grad_norm, num_zeros_in_grad).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from gigatron.core.parallel.tags import is_expert_parallel, is_shared_embedding, is_tensor_parallel

from .clip_grads import clip_grads_by_total_norm_fp32, count_zeros_fp32_tensor, grad_norm_fp32_tensor
from .config import OptimizerConfig
from .grad_scaler import MegatronGradScaler

__all__ = [
    "MegatronOptimizer",
    "FP32Optimizer",
    "MixedPrecisionOptimizer",
    "get_param_groups",
    "OptimizerStateMismatch",
    "FULL_STATE_FORMAT",
]

FULL_STATE_FORMAT = "gigatron-full-optimizer-state/1"
_STATE_KEYS = {"adam": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}


class OptimizerStateMismatch(ValueError):
    """A saved optimizer state does not fit this model / optimizer."""


@dataclass
class ParamEntry:
    """The part of one model parameter this rank's optimizer updates."""

    model_param: torch.nn.Parameter
    name: str
    start: int
    """First flat element of the parameter covered."""
    end: int
    """One past the last flat element covered."""
    main_param: torch.Tensor
    """fp32 tensor the torch optimizer updates (may be the model parameter itself, or a view)."""
    group_index: int


def _model_param_names(model_chunks) -> dict:
    """param -> name; names get a `model{i}.` prefix when there are several chunks."""
    names = {}
    for i, chunk in enumerate(model_chunks):
        prefix = f"model{i}." if len(model_chunks) > 1 else ""
        for name, param in _unwrap(chunk).named_parameters():
            names.setdefault(param, prefix + name)
    return names


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def get_param_groups(
    model_chunks,
    no_weight_decay_cond: Optional[Callable[[str, torch.Tensor], bool]] = None,
    scale_lr_cond: Optional[Callable[[str, torch.Tensor], bool]] = None,
    lr_mult: float = 1.0,
    decoupled_lr: Optional[float] = None,
    decoupled_min_lr: Optional[float] = None,
) -> list[dict]:
    """Split trainable parameters into groups keyed by (wd_mult, lr_mult, decoupled).

    Default: no weight decay on biases and on 1-D parameters (norm weights). `scale_lr_cond`
    selects parameters whose lr is multiplied by `lr_mult`. With `decoupled_lr` (--decoupled-lr)
    the input embedding and output layer weights form groups of their own whose 'max_lr' /
    'min_lr' are decoupled_lr / decoupled_min_lr (the scheduler reads them). Each group dict has
    'params' (model params), 'wd_mult', 'lr_mult' and 'names'."""
    names = _model_param_names(model_chunks)
    groups: dict[tuple, dict] = {}
    seen: set = set()
    for chunk in model_chunks:
        for param in _unwrap(chunk).parameters():
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            name = names[param]
            if no_weight_decay_cond is not None:
                no_wd = bool(no_weight_decay_cond(name, param))
            else:
                no_wd = name.endswith(".bias") or param.dim() == 1
            scaled = bool(scale_lr_cond(name, param)) if scale_lr_cond is not None else False
            decoupled = decoupled_lr is not None and is_embedding_or_output_parameter(name)
            key = (0.0 if no_wd else 1.0, lr_mult if scaled else 1.0, decoupled)
            group = groups.setdefault(key, {"params": [], "names": [], "wd_mult": key[0], "lr_mult": key[1]})
            if decoupled:
                group["max_lr"] = float(decoupled_lr)
                if decoupled_min_lr is not None:
                    group["min_lr"] = float(decoupled_min_lr)
            group["params"].append(param)
            group["names"].append(name)
    return list(groups.values())


def is_embedding_or_output_parameter(name: str) -> bool:
    """The input word embedding and the output layer weight (Megatron's embedding-or-output
    parameters, which --decoupled-lr trains at their own learning rate)."""
    return name.endswith("embedding.word_embeddings.weight") or name.endswith("output_layer.weight")


def _make_torch_optimizer(config: OptimizerConfig, groups: list[dict], device: torch.device):
    """torch AdamW (fused on CUDA, foreach otherwise) or SGD over `groups` of main params."""
    torch_groups = [
        {
            "params": g["params"],
            "wd_mult": g["wd_mult"],
            "lr_mult": g["lr_mult"],
            "lr": g.get("max_lr", config.lr) * g["lr_mult"],
            "weight_decay": config.weight_decay * g["wd_mult"],
            **{k: g[k] for k in ("max_lr", "min_lr") if k in g},
        }
        for g in groups
    ]
    if config.optimizer == "adam":
        kwargs: dict[str, Any] = dict(lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                      eps=config.adam_eps, weight_decay=config.weight_decay)
        if device.type == "cuda":
            kwargs["fused"] = True
        else:
            kwargs["foreach"] = True
        return torch.optim.AdamW(torch_groups, **kwargs)
    return torch.optim.SGD(torch_groups, lr=config.lr, weight_decay=config.weight_decay,
                           momentum=config.sgd_momentum, foreach=True)


class MegatronOptimizer(ABC):
    """Common machinery; subclasses build `self.entries` and the torch optimizer."""

    def __init__(self, config: OptimizerConfig, model_chunks, groups,
                 grad_scaler: Optional[MegatronGradScaler] = None) -> None:
        if config.lr is None:
            raise ValueError("OptimizerConfig.lr (--lr) is required")
        for chunk in model_chunks:
            if not hasattr(chunk, "grad_buffers") or not hasattr(chunk, "zero_grad_buffer"):
                raise ValueError(
                    "get_optimizer needs model chunks wrapped in "
                    "gigatron.core.distributed.DistributedDataParallel (they provide main_grad)"
                )
        self.config = config
        self.model_chunks = list(model_chunks)
        self.groups = groups
        self.grad_scaler = grad_scaler
        self.device = next(iter(_unwrap(self.model_chunks[0]).parameters())).device
        self.entries: list[ParamEntry] = []
        self.optimizer = None  # set by subclasses
        self._one = torch.ones(1, dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------ public API
    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def get_loss_scale(self) -> torch.Tensor:
        return self.grad_scaler.scale if self.grad_scaler is not None else self._one

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.get_loss_scale()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        for entry in self.entries:
            entry.main_param.grad = None

    @torch.no_grad()
    def step(self, host_sync: bool = True) -> tuple[bool, Any, Any]:
        """Unscale / check, clip, update, copy back. Returns (update_successful, grad_norm,
        num_zeros_in_grad); (False, None, None) when the loss scaler found Inf/NaN.

        host_sync=False: grad_norm (and num_zeros_in_grad) come back as one-element device tensors
        and nothing waits for the device (except the loss scaler's Inf/NaN check with fp16, which
        decides whether the step is taken); the training loop reads them at its log interval."""
        try:
            update_successful, grad_norm, num_zeros = self._step()
        finally:
            # Drop the .grad aliases of main_grad, so that a later backward cannot accumulate
            # into the buffer through them.
            for entry in self.entries:
                entry.main_param.grad = None
        if host_sync and grad_norm is not None:
            grad_norm = float(grad_norm.item())
            num_zeros = int(num_zeros.item()) if num_zeros is not None else None
        return update_successful, grad_norm, num_zeros

    def _step(self) -> tuple[bool, Optional[torch.Tensor], Optional[torch.Tensor]]:
        self._before_step()
        self._copy_model_grads_to_main_grads()
        if self.grad_scaler is not None:
            found_inf = self._unscale_main_grads_and_check_for_nan()
            self.grad_scaler.update(found_inf)
            if found_inf:
                return False, None, None
        grads_for_norm = self._main_grads_for_norm()
        grad_norm = grad_norm_fp32_tensor(grads_for_norm, self._grad_stats_groups(), device=self.device)
        if self._has_expert_params():
            # Each expert counted once globally: summed over the expert model-parallel ranks
            # (expert tp x ep x pp; with the distributed optimizer also its expert-dp shards).
            expert_grads = self._main_grads_for_norm(expert=True)
            expert_norm = grad_norm_fp32_tensor(expert_grads, self._expert_grad_stats_groups(), device=self.device)
            grad_norm = torch.sqrt(grad_norm.double() ** 2 + expert_norm.double() ** 2)  # float64, as in Python
        if self.config.clip_grad > 0.0:
            clip_grads_by_total_norm_fp32(self._main_grads(), self.config.clip_grad, grad_norm)
        num_zeros = None
        if self.config.log_num_zeros_in_grad:
            num_zeros = count_zeros_fp32_tensor(grads_for_norm, self._grad_stats_groups(), device=self.device)
            if self._has_expert_params():
                num_zeros += count_zeros_fp32_tensor(self._main_grads_for_norm(expert=True),
                                                     self._expert_grad_stats_groups(), device=self.device)
        self.optimizer.step()
        self._copy_main_params_to_model_params()
        self._after_step()
        return True, grad_norm, num_zeros

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Copy the model's parameters into the fp32 main params. Call after loading model weights
        into an existing optimizer without its state (e.g. --no-load-optim, --finetune); otherwise
        the next step would write the stale main params back over the loaded weights."""
        for entry in self.entries:
            self._main_param_from_model(entry)

    def stores_main_copy(self, param) -> bool:
        """Whether the fp32 main param of model parameter `param` is a tensor of its own (bf16/fp16
        parameters). An fp32 parameter is its own main param (or, sharded, a view of the model's
        buffer): the model weights already hold it, so checkpoints store it once, with the model."""
        return param.dtype != torch.float32

    @torch.no_grad()
    def _main_param_from_model(self, entry: ParamEntry) -> None:
        """Set the main param of `entry` from the model's (loaded) weights."""
        if entry.main_param is entry.model_param:
            return
        source = entry.model_param.detach().reshape(-1)[entry.start:entry.end]
        if source.data_ptr() != entry.main_param.data_ptr():
            entry.main_param.copy_(source.view_as(entry.main_param))

    # ------------------------------------------------------------ hooks for subclasses
    def _before_step(self) -> None:
        pass

    def _after_step(self) -> None:
        pass

    def _copy_model_grads_to_main_grads(self) -> None:
        for entry in self.entries:
            grad = entry.model_param.main_grad
            entry.main_param.grad = grad if grad.dtype == entry.main_param.dtype else grad.to(entry.main_param.dtype)

    def _copy_main_params_to_model_params(self) -> None:
        for entry in self.entries:
            if entry.main_param is not entry.model_param:
                entry.model_param.data.copy_(entry.main_param)

    def _grad_stats_groups(self) -> list:
        """Process groups over which grad norm / inf checks are combined."""
        return [self.groups.mp.group]

    def _expert_grad_stats_groups(self) -> list:
        """Process groups over which the expert parameters' grad norm is combined."""
        return [self.groups.tp_ep_pp.group]

    def _has_expert_params(self) -> bool:
        """Whether the model has expert-parallel parameters, agreed once over the expert
        model-parallel group (the group of the expert-norm collectives), so that pipeline stages
        without MoE layers join them too; its expert-data-parallel replicas hold the same layers."""
        if getattr(self, "_expert_params_anywhere", None) is None:
            local = any(is_expert_parallel(p) for c in self.model_chunks for p in _unwrap(c).parameters())
            flag = torch.tensor([float(local)], dtype=torch.float32, device=self.device)
            if self.groups.tp_ep_pp.group is not None:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.groups.tp_ep_pp.group)
            self._expert_params_anywhere = bool(flag.item() > 0)
        return self._expert_params_anywhere

    def _counts_for_norm(self, param) -> bool:
        if is_expert_parallel(param):
            # Expert weights are split over the expert tensor-parallel group, not over tp.
            return is_tensor_parallel(param) or self.groups.expt_tp.rank <= 0
        if not (is_tensor_parallel(param) or self.groups.tp.rank <= 0):
            return False
        if is_shared_embedding(param) and self.groups.pp.rank > 0:
            return False
        return True

    def _main_grads(self) -> list:
        return [e.main_param.grad for e in self.entries if e.main_param.grad is not None]

    def _main_grads_for_norm(self, expert: bool = False) -> list:
        """The gradients counted in the norm on this rank: dense ones, or with `expert` the
        expert-parallel ones."""
        return [e.main_param.grad for e in self.entries
                if e.main_param.grad is not None and is_expert_parallel(e.model_param) == expert
                and self._counts_for_norm(e.model_param)]

    def _unscale_main_grads_and_check_for_nan(self) -> bool:
        """Divide main grads by the loss scale; True if any rank of the stats groups found Inf/NaN."""
        grads = self._main_grads()
        found_inf = torch.zeros(1, dtype=torch.float32, device=self.device)
        inv_scale = self.grad_scaler.inv_scale.to(self.device)
        if grads:  # one fused kernel on CUDA and CPU (torch >= 2.3)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        stats_groups = list(self._grad_stats_groups())
        if self._has_expert_params():
            stats_groups += self._expert_grad_stats_groups()
        for group in stats_groups:
            if group is not None:
                dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=group)
        return bool(found_inf.item() > 0)

    # ------------------------------------------------------------ full (layout-free) state
    def _optimizer_kind(self) -> str:
        return "adam" if isinstance(self.optimizer, torch.optim.AdamW) else "sgd"

    def _full_state_group(self):
        """Group over which pieces of one parameter are spread (None: the rank owns it whole)."""
        return None

    def _param_state_group(self, param):
        """The group over which pieces of `param` are spread (expert parameters may differ)."""
        return self._full_state_group()

    def state_dict_for_save(self) -> dict[str, Any]:
        """Optimizer state keyed by parameter name with whole fp32 tensors (main param and the
        optimizer's per-element states), independent of data-parallel sharding. Collective over
        the data-parallel group for the distributed optimizer (call it on every rank).

        The main param ("param") is stored only where it is a copy (stores_main_copy): an fp32
        parameter's main param is the model weight, which the checkpoint holds already."""
        kind = self._optimizer_kind()
        state_keys = _STATE_KEYS[kind]
        by_param: dict = {}
        for entry in self.entries:
            by_param.setdefault(entry.model_param, []).append(entry)
        group = self._full_state_group()
        step, initialized = 0, 0
        for st in self.optimizer.state.values():
            initialized = max(initialized, int(bool(st)))
            if "step" in st:
                step = max(step, int(float(st["step"])))
        # [step, whether any state exists yet], agreed over the ranks sharing the parameters
        step_t = torch.tensor([float(step), float(initialized)], dtype=torch.float64, device=self.device)
        if group is not None:
            dist.all_reduce(step_t, op=dist.ReduceOp.MAX, group=group)
        params: dict[str, dict] = {}
        for name, param in self._named_model_params():
            n = param.numel()
            rows = (["param"] if self.stores_main_copy(param) else []) + list(state_keys)
            flat = torch.zeros(len(rows) * n, dtype=torch.float32, device=self.device)
            pieces = flat.view(len(rows), n)  # [main param (a copy only); states...] x elements
            for entry in by_param.get(param, []):
                st = self.optimizer.state.get(entry.main_param, {})
                for row, key in enumerate(rows):
                    value = entry.main_param if key == "param" else st.get(key)
                    if value is not None:
                        pieces[row, entry.start:entry.end].copy_(value.reshape(-1))
            param_group = self._param_state_group(param)
            if param_group is not None:
                dist.all_reduce(flat, group=param_group)
            params[name] = {key: pieces[row].view(param.shape).cpu().clone() for row, key in enumerate(rows)}
        return {
            "format": FULL_STATE_FORMAT,
            "optimizer": kind,
            "step": int(step_t[0].item()),
            "initialized": bool(step_t[1].item()),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups],
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "params": params,
        }

    def _named_model_params(self) -> list:
        names = _model_param_names(self.model_chunks)
        seen, out = set(), []
        for chunk in self.model_chunks:
            for param in _unwrap(chunk).parameters():
                if param.requires_grad and param not in seen:
                    seen.add(param)
                    out.append((names[param], param))
        return out

    @torch.no_grad()
    def load_state_dict_from_full(self, full: dict[str, Any]) -> None:
        """Load a state_dict_for_save() result, taking this rank's pieces (any dp size). Call it
        after the model weights are loaded: a parameter whose record holds no main param (an fp32
        one) takes it from the model."""
        if full.get("format") != FULL_STATE_FORMAT:
            raise OptimizerStateMismatch(f"not a full optimizer state (format {full.get('format')!r})")
        kind = self._optimizer_kind()
        if full["optimizer"] != kind:
            raise OptimizerStateMismatch(
                f"checkpoint holds {full['optimizer']} optimizer state but --optimizer is {kind}; "
                "use the same optimizer or skip loading it (--no-load-optim)"
            )
        saved = full["params"]
        missing = [name for name, _ in self._named_model_params() if name not in saved]
        if missing:
            raise OptimizerStateMismatch(
                f"checkpoint has no optimizer state for {len(missing)} parameters, e.g. {missing[:3]}; "
                "is it from a different model? (--no-load-optim skips the optimizer state)"
            )
        self._load_param_group_hparams(full["param_groups"])
        step = int(full["step"])
        initialized = bool(full.get("initialized", step > 0))
        state_keys = _STATE_KEYS[kind]
        for entry in self.entries:
            record = saved[entry.name]
            shape = tuple(next(iter(record.values())).shape)
            if shape != tuple(entry.model_param.shape):
                raise OptimizerStateMismatch(
                    f"optimizer state of {entry.name} has shape {shape}, the model's is "
                    f"{tuple(entry.model_param.shape)}"
                )
            if "param" in record:
                piece = record["param"].reshape(-1)[entry.start:entry.end]
                entry.main_param.copy_(piece.view_as(entry.main_param))
            else:  # saved from fp32 weights: the main param is the (already loaded) model weight
                self._main_param_from_model(entry)
            self.optimizer.state.pop(entry.main_param, None)
            if initialized:
                group = self.optimizer.param_groups[entry.group_index]
                st: dict[str, Any] = {}
                on_device = group.get("fused") or group.get("capturable")
                if kind == "adam":
                    st["step"] = torch.tensor(float(step), dtype=torch.float32,
                                              device=self.device if on_device else "cpu")
                for key in state_keys:
                    st[key] = record[key].reshape(-1)[entry.start:entry.end].to(
                        self.device, torch.float32).view_as(entry.main_param).clone()
                self.optimizer.state[entry.main_param] = st
        if self.grad_scaler is not None and full.get("grad_scaler"):
            self.grad_scaler.load_state_dict(full["grad_scaler"])
        self._copy_main_params_to_model_params()
        self._after_load()

    def _after_load(self) -> None:
        pass

    def _load_param_group_hparams(self, saved_groups: list[dict]) -> None:
        groups = self.optimizer.param_groups
        if len(saved_groups) != len(groups):
            raise OptimizerStateMismatch(
                f"checkpoint has {len(saved_groups)} optimizer param groups, this model has {len(groups)}"
            )
        for group, saved in zip(groups, saved_groups):
            for key, value in saved.items():
                if key in ("params", "names"):
                    continue
                group[key] = value

    # ------------------------------------------------------------ Megatron-layout state
    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """This rank's optimizer state in Megatron's layout (each subclass defines it)."""

    @abstractmethod
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what state_dict() returned."""


class FP32Optimizer(MegatronOptimizer):
    """fp32 parameters: the torch optimizer updates the model parameters in place."""

    def __init__(self, config: OptimizerConfig, model_chunks, groups, param_groups: list[dict]) -> None:
        super().__init__(config, model_chunks, groups, grad_scaler=None)
        main_groups = []
        for gi, g in enumerate(param_groups):
            for param, name in zip(g["params"], g["names"]):
                self.entries.append(ParamEntry(param, name, 0, param.numel(), param, gi))
            main_groups.append({**g, "params": list(g["params"])})
        self.optimizer = _make_torch_optimizer(config, main_groups, self.device)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") == FULL_STATE_FORMAT:
            self.load_state_dict_from_full(state_dict)
        else:
            self.optimizer.load_state_dict(state_dict)


class MixedPrecisionOptimizer(MegatronOptimizer):
    """bf16/fp16 parameters with fp32 main copies (fp32 parameters among them are used directly)."""

    def __init__(self, config: OptimizerConfig, model_chunks, groups, param_groups: list[dict],
                 grad_scaler: Optional[MegatronGradScaler]) -> None:
        super().__init__(config, model_chunks, groups, grad_scaler=grad_scaler)
        main_groups = []
        for gi, g in enumerate(param_groups):
            mains = []
            for param, name in zip(g["params"], g["names"]):
                if param.dtype == torch.float32:
                    main = param
                else:
                    main = param.detach().clone().float()
                self.entries.append(ParamEntry(param, name, 0, param.numel(), main, gi))
                mains.append(main)
            main_groups.append({**g, "params": mains})
        self.optimizer = _make_torch_optimizer(config, main_groups, self.device)

    def state_dict(self) -> dict[str, Any]:
        """Megatron's layout: inner optimizer state, fp32 main params per group, grad scaler."""
        sd: dict[str, Any] = {"optimizer": self.optimizer.state_dict()}
        if self.grad_scaler is not None:
            sd["grad_scaler"] = self.grad_scaler.state_dict()
        sd["fp32_from_fp16_params"] = [list(g["params"]) for g in self.optimizer.param_groups]
        return sd

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") == FULL_STATE_FORMAT:
            self.load_state_dict_from_full(state_dict)
            return
        self.optimizer.load_state_dict(state_dict["optimizer"])
        if self.grad_scaler is not None and state_dict.get("grad_scaler"):
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        saved_groups = state_dict["fp32_from_fp16_params"]
        if len(saved_groups) != len(self.optimizer.param_groups):
            raise OptimizerStateMismatch("number of main-parameter groups differs from the checkpoint")
        for group, saved in zip(self.optimizer.param_groups, saved_groups):
            if len(group["params"]) != len(saved):
                raise OptimizerStateMismatch("number of main parameters differs from the checkpoint")
            for main, value in zip(group["params"], saved):
                main.copy_(value)
        self._copy_main_params_to_model_params()
