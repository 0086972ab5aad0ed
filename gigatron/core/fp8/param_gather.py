"""--fp8-param-gather: the distributed optimizer casts the FP8 linears' weights to FP8 once per step
and all-gathers the FP8 bytes (half of bf16's) instead of the bf16 weights.

Per step, for every weight W of a linear that runs in FP8 (tensorwise or delayed recipe):

    1. each data-parallel rank takes the amax of its fp32 main-param shard of W; one MAX
       all-reduce over the buffer's data-parallel group makes amax(W) known to every rank
       (one collective for all the weights of a buffer);
    2. scale = fp8_max / amax(W) (E4M3; 1 for an all-zero weight); each rank writes
       saturate(shard * scale) into its shard of the buffer's FP8 parameter storage (one byte
       per element) and sets W.fp8_scale_inv = 1 / scale;
    3. the bucket all-gather moves those bytes (overlapped with the next forward with
       --overlap-param-gather, like the bf16 gather it replaces);
    4. once a bucket's gather is complete its weights read back into the bf16 parameters
       (W = fp8 * scale_inv rounded to bf16), so checkpoints, evaluation and anything else that
       reads W see exactly the weights the FP8 GEMMs use.

The FP8 linear then takes `W.fp8_data` / `W.fp8_scale_inv` as its weight operand
(gigatron.core.fp8.linear.quantize_weight) instead of casting W in every micro-batch. The weight's
scale comes from its current amax under both recipes (the weight is cast once, with its exact
amax, as Transformer Engine does for FP8 parameters); the delayed recipe's amax history keeps
scaling the activations and gradients. Blockwise scaling is refused: its 128x128 weight blocks
do not line up with the optimizer's flat shards.

Memory: one byte per weight element more on every rank (the gathered FP8 copy), beside the bf16
parameters the model keeps; communication: the parameter all-gather of these weights is halved.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.distributed as dist

from .casting import E4M3, FP8_MAX, amax, saturating_cast, scale_from_amax

__all__ = ["PARAM_DTYPE", "mark_fp8_param_gather", "is_fp8_gathered", "attach_fp8_storage",
           "cast_main_shards", "read_back_weights"]

# The FP8 format of gathered weights: forward operands are E4M3 under both --fp8-format values.
PARAM_DTYPE = E4M3


def mark_fp8_param_gather(module: torch.nn.Module) -> int:
    """Mark the weight of every linear of `module` that runs in FP8 (after enable_fp8) for the FP8
    all-gather; return how many. Call before wrapping the module in DistributedDataParallel."""
    count = 0
    for sub in module.modules():
        recipe = getattr(sub, "fp8_recipe", None)
        if recipe is None or not isinstance(getattr(sub, "weight", None), torch.nn.Parameter):
            continue
        if recipe.kind == "blockwise":
            raise ValueError("--fp8-param-gather casts each weight with one scale inside the distributed "
                             "optimizer; --fp8-recipe blockwise scales 128x128 weight blocks, which do not "
                             "line up with the optimizer's shards: use --fp8-recipe tensorwise or delayed, or "
                             "drop --fp8-param-gather")
        sub.weight.fp8_param_gather = True
        count += 1
    return count


def is_fp8_gathered(param: torch.Tensor) -> bool:
    """Whether `param` is a weight marked by mark_fp8_param_gather."""
    return bool(getattr(param, "fp8_param_gather", False))


@torch.no_grad()
def attach_fp8_storage(params: Sequence[torch.Tensor], storage: torch.Tensor, index_map: dict) -> None:
    """Give each parameter its FP8 copy: `param.fp8_data`, a [N, K] FP8 view of its slice of the
    buffer's uint8 `storage` (which the all-gather fills), and `param.fp8_scale_inv` (0-dim fp32).
    Both are fixed tensors updated in place, so compiled code sees the same objects every step.
    The copy is filled from the parameter's current values (one cast per weight, its own amax)."""
    for param in params:
        start, end, _ = index_map[param]
        data = storage[start:end].view(PARAM_DTYPE).view(param.shape)
        scale = scale_from_amax(amax(param.detach()), FP8_MAX[PARAM_DTYPE])
        data.copy_(saturating_cast(param.detach(), scale, PARAM_DTYPE))
        param.fp8_data = data
        param.fp8_scale_inv = scale.reciprocal()


@torch.no_grad()
def cast_main_shards(params: Sequence[torch.Tensor], pieces: Sequence[tuple[int, torch.Tensor, torch.Tensor]],
                     group) -> None:
    """Steps 1-2 above for one buffer. `params`: the buffer's FP8-gathered weights (the same list,
    in the same order, on every rank of `group`); `pieces`: (index into `params`, fp32 main shard,
    uint8 slice of the storage it is cast into) for the shards this rank owns. Collective over
    `group` (None: one rank)."""
    if not params:
        return
    amaxes = torch.zeros(len(params), dtype=torch.float32, device=params[0].fp8_scale_inv.device)
    for i, main, _ in pieces:
        amaxes[i] = torch.maximum(amaxes[i], amax(main))
    if group is not None:
        dist.all_reduce(amaxes, op=dist.ReduceOp.MAX, group=group)
    scales = scale_from_amax(amaxes, FP8_MAX[PARAM_DTYPE])
    torch._foreach_copy_([p.fp8_scale_inv for p in params], list(scales.reciprocal().unbind(0)))
    for i, main, target in pieces:
        target.view(PARAM_DTYPE).copy_(saturating_cast(main, scales[i], PARAM_DTYPE))


@torch.no_grad()
def read_back_weights(params: Iterable[torch.Tensor]) -> None:
    """Step 4: each parameter takes the value of its gathered FP8 copy (fp8 * scale_inv, rounded
    to the parameter's dtype)."""
    for param in params:
        param.data.copy_((param.fp8_data.float() * param.fp8_scale_inv).to(param.dtype))
