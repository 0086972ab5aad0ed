"""GPT pretraining: the model, batch, loss and dataset providers that `pretrain` runs."""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.distributed as dist

from gigatron.core.pipeline.schedules import per_token_loss
from gigatron.training.logging import print_rank_0

__all__ = ["model_provider", "get_batch", "loss_func", "forward_step", "datasets_provider"]


def model_provider(ctx, pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None):
    """One pipeline stage (model chunk) of a GPT model, initialized from --seed."""
    from gigatron.core.models.gpt import GPTModel

    spec = ctx.configs.training.spec
    return GPTModel(ctx.configs.transformer, ctx.groups, vocab_size=ctx.padded_vocab_size,
                    pre_process=pre_process, post_process=post_process, vp_stage=vp_stage, seed=ctx.configs.data.seed,
                    moe_config=getattr(ctx.configs, "moe", None), layer_spec=load_layer_spec(spec) if spec else None)


def load_layer_spec(spec):
    """--spec MODULE FUNCTION: the layer-building function (MODULE: a dotted importable name or a
    path to a .py file)."""
    import importlib
    import importlib.util
    import os

    if len(spec) != 2:
        raise ValueError(f"--spec takes MODULE FUNCTION (a Python module and the function in it that builds a "
                         f"decoder layer), got {' '.join(spec)}")
    module_name, function_name = spec
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise FileNotFoundError(f"--spec: {module_name} does not exist")
            loaded = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"--spec: cannot import {module_name} ({exc}); put it on PYTHONPATH or give a .py file") \
            from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"--spec: {module_name} has no function {function_name!r} (the layer builder)")
    return function


def _stage_of(model):
    inner = getattr(model, "module", model)
    return inner


def get_batch(data_iterator, model):
    """The next micro-batch on the device of `model`, or Nones on a middle pipeline stage (which
    reads its input from the previous stage)."""
    inner = _stage_of(model)
    if not (inner.pre_process or inner.post_process):
        return None, None, None, None, None
    batch = next(data_iterator)
    device = next(inner.parameters()).device
    tokens = batch["tokens"].to(device, non_blocking=True).long()  # [b, s]
    labels = batch["labels"].to(device, non_blocking=True).long()  # [b, s]
    loss_mask = batch["loss_mask"].to(device, non_blocking=True).float()  # [b, s]
    position_ids = batch["position_ids"].to(device, non_blocking=True).long()  # [b, s]
    attention_mask = None
    if "attention_mask" in batch and inner.config is not None and _needs_mask(inner):
        attention_mask = batch["attention_mask"].to(device, non_blocking=True)  # [b, 1, s, s]
    if inner.groups.cp.size > 1:
        from gigatron.core.transformer.context_parallel import get_batch_on_this_cp_rank
        split = get_batch_on_this_cp_rank(dict(tokens=tokens, labels=labels, loss_mask=loss_mask,
                                               attention_mask=attention_mask, position_ids=position_ids),
                                          inner.groups.cp)  # [b, s/cp] each (chunks r and 2C-1-r)
        tokens, labels, loss_mask = split["tokens"], split["labels"], split["loss_mask"]
        attention_mask, position_ids = split["attention_mask"], split["position_ids"]
    return tokens, labels, loss_mask, attention_mask, position_ids


def _needs_mask(inner) -> bool:
    # A plain causal mask is what attention does without one; only documents reset at EOD
    # (--reset-attention-mask) need the explicit mask.
    return bool(getattr(inner, "reset_attention_mask", False))


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, cp=None, per_token: bool = False,
              mtp_losses: Optional[torch.Tensor] = None, mtp_loss_scaling_factor: float = 0.1):
    """Mean of the per-token losses [b, s] over the tokens of the loss mask.

    With context parallelism each rank holds s/cp tokens of every sequence: it backpropagates
    cp x (its loss sum / the micro-batch's token count over the cp group), because the gradient
    reduction averages over dp x cp. The logged [sum, count] stays this rank's share.

    Returns (loss, {"lm loss": tensor([loss_sum, num_tokens])}); with `per_token`
    (--calculate-per-token-loss) (loss_sum, num_tokens, the same dict): the schedule divides the
    step's gradients once by its token count over micro-batches and data x context ranks.

    mtp_losses [D, b, s] (--mtp-num-layers): block k's per-token losses, masked by the loss mask
    shifted left by k; the loss gains mtp_loss_scaling_factor / D times the sum over blocks of each
    block's mean (with `per_token`, of each block's sum), and the dict `mtp_k loss` entries
    ([sum, count] of block k, as Megatron logs them; not part of `lm loss`)."""
    losses = output_tensor.float().reshape(-1)  # [b * s]
    mask = loss_mask.reshape(-1)  # [b * s]
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum()
    logged = {"lm loss": torch.stack([loss_sum.detach(), num_tokens.detach()])}
    mtp_term = None
    if mtp_losses is not None:
        from gigatron.core.transformer.mtp import shift_left

        depth = mtp_losses.shape[0]
        mtp_term = loss_sum.new_zeros(())
        for k in range(1, depth + 1):
            mask_k = shift_left(loss_mask, k)  # [b, s]
            sum_k = torch.sum(mtp_losses[k - 1].float() * mask_k)
            tokens_k = mask_k.sum()
            logged[f"mtp_{k} loss"] = torch.stack([sum_k.detach(), tokens_k.detach()])
            mtp_term = mtp_term + (sum_k if per_token else sum_k / tokens_k.clamp(min=1.0))
        mtp_term = mtp_term * (mtp_loss_scaling_factor / depth)
    if per_token:
        if mtp_term is not None:
            loss_sum = loss_sum + mtp_term
        return loss_sum, num_tokens, logged
    if cp is not None and cp.size > 1:
        total_tokens = num_tokens.detach().clone()
        dist.all_reduce(total_tokens, group=cp.group)
        loss = loss_sum * cp.size / total_tokens.clamp(min=1.0)
    else:
        loss = loss_sum / num_tokens.clamp(min=1.0)
    if mtp_term is not None:
        loss = loss + mtp_term
    return loss, logged


def _fused_loss_takes_mask(stage) -> bool:
    """A GPT last stage with --cross-entropy-loss-fusion: loss_func below weights the per-token
    losses by the loss mask, so the model may make the output layer's gradients in forward."""
    from gigatron.core.models.gpt import GPTModel

    return isinstance(stage, GPTModel) and stage.post_process and stage.config.cross_entropy_loss_fusion


def forward_step(data_iterator, model):
    """The schedules' forward step: (output_tensor, loss_func bound to this micro-batch's mask and,
    with --mtp-num-layers, its multi-token prediction losses)."""
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, model)
    inner = _stage_of(model)
    kwargs = {}
    if _fused_loss_takes_mask(inner):
        kwargs["loss_mask"] = loss_mask  # the fused output layer makes its gradients in forward
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels, **kwargs)
    extra = {}
    if getattr(inner, "mtp", None) is not None:
        extra = dict(mtp_losses=inner.pop_mtp_losses(), mtp_loss_scaling_factor=inner.config.mtp_loss_scaling_factor)
    return output_tensor, partial(loss_func, loss_mask, cp=inner.groups.cp, per_token=per_token_loss([model]), **extra)


def datasets_provider(ctx, train_valid_test_num_samples):
    """GPT datasets from --data-path / per-split paths / --mock-data and the run's tokenizer."""
    from gigatron.core.data import build_gpt_datasets

    print_rank_0(f"> building GPT datasets (train, valid, test samples: {tuple(train_valid_test_num_samples)})")
    barrier = dist.barrier if dist.is_available() and dist.is_initialized() else None
    datasets = build_gpt_datasets(ctx.configs.data, ctx.tokenizer, train_valid_test_num_samples,
                                  barrier=barrier, rank=ctx.run.rank)
    for chunk in ctx.model:
        chunk.module.reset_attention_mask = bool(ctx.configs.data.reset_attention_mask)
    return datasets
