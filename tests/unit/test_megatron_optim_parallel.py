"""Megatron-Core's full training state written at tensor or pipeline parallel size 2: megatron-core
0.16.1 trains a GPT in two gloo processes (tests/megatron_parallel_oracle.py: its DDP,
get_megatron_optimizer with torch's AdamW, its pipeline schedule), saves model, Adam state,
scheduler and RNG with dist_checkpointing at iteration 3 and trains on to 6. Gigatron resumes
that directory in one process (plain and distributed optimizer) and at the writer's own layout
(two gloo ranks); its next three losses equal Megatron's continuation within fp32 rounding.

    tp2: Llama-style (GQA, SwiGLU, untied output), the distributed optimizer saved "fully_reshardable"
    pp2: GPT-2-style (tied embedding split over the first and last stage), the plain optimizer"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import megatron_oracle as oracle  # noqa: E402
import megatron_parallel_oracle  # noqa: E402

from tests.parallel.harness import free_port, run_distributed  # noqa: E402
from tests.unit._megatron_optim_fixtures import SAVED_AT, T, TOTAL, megatron_losses, resume  # noqa: E402

pytestmark = pytest.mark.skipif(not oracle.megatron_available(), reason="megatron-core is not installed")

# (model kind, tp, pp, layers, optimizer the Megatron run used)
LAYOUTS = {"tp2": ("llama", 2, 1, 2, "distributed"), "pp2": ("gpt", 1, 2, 4, "plain")}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def megatron_run(request, tmp_path_factory):
    kind, tp, pp, layers, optim = LAYOUTS[request.param]
    root = tmp_path_factory.mktemp(f"mcore_train_{request.param}")
    megatron_parallel_oracle.run("--root", str(root), "--kind", kind, "--tp", str(tp), "--pp", str(pp), "--layers",
                                 str(layers), "--optim", optim, "--iteration", str(SAVED_AT), "--total", str(TOTAL),
                                 processes=tp * pp, port=free_port())
    return root, tp, pp


def test_saved_at_the_writers_layout(megatron_run):
    from gigatron.core.checkpoint import formats

    root, tp, pp = megatron_run
    args = formats.read_args(str(root))
    assert (args["tensor_model_parallel_size"], args["pipeline_model_parallel_size"]) == (tp, pp)
    assert len([f for f in os.listdir(root / f"iter_{SAVED_AT:07d}") if f.endswith(".distcp")]) >= tp * pp


@pytest.mark.parametrize("use_distributed_optimizer", [False, True], ids=["plain", "distopt"])
def test_resumed_in_one_process_continues_megatrons_losses(megatron_run, use_distributed_optimizer):
    root, _, _ = megatron_run
    loaded, ours = resume(root, 1, use_distributed_optimizer)
    assert (loaded.iteration, loaded.consumed_train_samples) == (SAVED_AT, SAVED_AT * T["micro_batch"])
    torch.testing.assert_close(ours, megatron_losses(root), rtol=0, atol=2e-5)


def test_without_the_optimizer_state_the_losses_differ(megatron_run):
    """The comparison above sees Adam's moments: fresh ones give other losses after one step."""
    root, tp, _ = megatron_run
    if tp == 1:
        pytest.skip("one layout is enough (the tp=2 one, with the distributed optimizer's state)")
    _, ours = resume(root, 1, False, load_optim=False)
    reference = megatron_losses(root)
    torch.testing.assert_close(ours[0], reference[0], rtol=0, atol=2e-5)  # the same weights
    assert (ours[1:] - reference[1:]).abs().max() > 1e-3


def _resume_at(rank, world_size, root, tp, pp, use_distributed_optimizer):
    from gigatron.core.parallel.config import ParallelConfig
    from gigatron.core.parallel.groups import ParallelGroups

    groups = ParallelGroups.build(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    loaded, losses = resume(root, 1, use_distributed_optimizer, groups=groups)
    return loaded.iteration, losses


def test_resumed_at_the_writers_layout_continues_megatrons_losses(megatron_run):
    root, tp, pp = megatron_run
    results = run_distributed(_resume_at, tp * pp, str(root), tp, pp, tp > 1, timeout=300)
    losses = [r[1] for r in results if r[1] is not None]
    assert losses and all(r[0] == SAVED_AT for r in results)
    for ours in losses:
        torch.testing.assert_close(ours, megatron_losses(root), rtol=0, atol=2e-5)
