"""FP8 linear after a sequence-parallel all-gather of FP8 bytes (tp=2, gloo, CPU): every rank's
output, input gradient and weight gradient equal the one-process fp8_linear on the gathered input
with that rank's weight shard (bitwise: the gathered FP8 tensor is the one a single process makes)."""

import pytest
import torch

from gigatron.core.fp8 import FP8Config, FP8LinearState, FP8Recipe, fp8_linear, update_fp8_states
from gigatron.core.fp8.sequence_parallel import all_gather_fp8, fp8_linear_with_sequence_parallel_gather
from gigatron.core.parallel.groups import Group

S, B, K, N = 8, 2, 256, 256  # full sequence, batch, in features, out features (N/2 per rank)


def _full_data(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(S, B, K, generator=gen)  # [s, b, K]
    w = torch.randn(N, K, generator=gen) / K ** 0.5  # [N, K]
    bias = torch.randn(N, generator=gen)
    dy = torch.randn(S, B, N, generator=gen)  # [s, b, N]
    return x, w, bias, dy


def _reference(recipe, state, x, w, bias, dy):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True)
    y = fp8_linear(x, w, bias, recipe, state, accumulate_into_main_grad=False)
    return (y,) + torch.autograd.grad(y, (x, w, bias), dy)


def _sp_worker(rank, world_size, recipe_name):
    import torch.distributed as dist

    group = Group(dist.group.WORLD, world_size, rank, list(range(world_size)))
    config = FP8Config(fp8="hybrid", fp8_recipe=recipe_name, **(
        dict(fp8_amax_history_len=2, fp8_amax_compute_algo="max") if recipe_name == "delayed" else {}))
    recipe = FP8Recipe.for_device(config, "cpu")
    n, s = N // world_size, S // world_size
    state = FP8LinearState.from_config(config) if recipe_name == "delayed" else None
    ref_states = [FP8LinearState.from_config(config) for _ in range(world_size)] if state else [None] * world_size
    results = []
    for step in range(2):
        x, w, bias, dy = _full_data(step)
        rows = slice(rank * n, (rank + 1) * n)  # this rank's output features
        x_local = x[rank * s:(rank + 1) * s].clone().requires_grad_(True)  # [s/t, b, K]
        weight = torch.nn.Parameter(w[rows].clone())
        weight.main_grad = torch.zeros_like(weight)
        b_local = bias[rows].clone().requires_grad_(True)
        y = fp8_linear_with_sequence_parallel_gather(x_local, weight, b_local, recipe, state, group)
        y.backward(dy[..., rows])
        # One process, every shard: the gathered input, each rank's weight rows.
        refs = [_reference(recipe, ref_states[r], x, w[r * n:(r + 1) * n], bias[r * n:(r + 1) * n],
                           dy[..., r * n:(r + 1) * n]) for r in range(world_size)]
        dx_ref = sum(ref[1] for ref in refs)[rank * s:(rank + 1) * s]
        results.append(dict(
            y=torch.equal(y, refs[rank][0]),
            dx=torch.equal(x_local.grad, dx_ref),
            dw=torch.equal(weight.main_grad, refs[rank][2]),
            db=torch.allclose(b_local.grad, refs[rank][3]),
        ))
        if state is not None:
            update_fp8_states([state], group)
            # One process: the shards' amaxes reduced by hand (MAX), as the group did.
            rows0 = torch.stack([st.amax_history[0] for st in ref_states]).amax(dim=0)
            for st in ref_states:
                st.amax_history[0].copy_(rows0)
                st.update_scales()
            results[-1]["state"] = torch.equal(state.scale, ref_states[rank].scale)
    gathered = all_gather_fp8(torch.full((2, 3), float(rank + 1)).to(torch.float8_e4m3fn), group)
    results.append(dict(gather=gathered.float().tolist() == [[1.0] * 3] * 2 + [[2.0] * 3] * 2))
    return results


@pytest.mark.parametrize("recipe_name", ["tensorwise", "delayed", "blockwise"])
def test_sequence_parallel_fp8_gather_equals_one_process(recipe_name):
    from tests.parallel.harness import run_distributed

    for rank_results in run_distributed(_sp_worker, 2, recipe_name, timeout=180):
        for checks in rank_results:
            assert all(checks.values()), checks


def test_group_of_one_is_fp8_linear():
    config = FP8Config(fp8="e4m3", fp8_recipe="tensorwise")
    recipe = FP8Recipe.for_device(config, "cpu")
    x, w, bias, _ = _full_data(0)
    one = Group(None, 1, 0, [0])
    assert torch.equal(fp8_linear_with_sequence_parallel_gather(x, w, bias, recipe, None, one),
                       fp8_linear(x, w, bias, recipe))
    with pytest.raises(ValueError, match="--no-fp8-wgrad"):
        fp8_linear_with_sequence_parallel_gather(
            x, w, bias, FP8Recipe.for_device(FP8Config(fp8="e4m3", fp8_wgrad=False), "cpu"), None,
            Group(None, 2, 0, [0, 1]))
