"""The bookkeeping between decode steps (gigatron/core/inference/advance.py): the plain-PyTorch
reference against a row-by-row loop on CPU, the Triton kernel against the reference on the GPU."""

import pytest
import torch

from gigatron.core.inference.advance import StopTokens, advance, reference_advance

PAD = 7
NEWLINE = 3
STOPS = [StopTokens(), StopTokens((PAD,)), StopTokens((PAD, 11, NEWLINE)), StopTokens((PAD, 11), pair=NEWLINE)]


def _inputs(b: int, width: int, seed: int, device="cpu"):
    """Random state: tokens drawn from a small vocabulary (so stops and newline pairs occur)."""
    gen = torch.Generator().manual_seed(seed)
    new = torch.randint(0, 13, (b,), generator=gen)
    active = torch.rand(b, generator=gen) < 0.7
    cur = torch.randint(1, width, (b,), generator=gen)
    last = torch.randint(0, 13, (b,), generator=gen)
    last[::3] = NEWLINE
    new[::2] = NEWLINE
    tokens = torch.randint(0, 13, (b, width), generator=gen)
    state = dict(new=new, active=active, cur=cur, last=last, tokens=tokens,
                 next_tokens=torch.full((b, 1), -5), next_positions=torch.full((b, 1), -5))
    return {k: v.to(device) for k, v in state.items()}


def _row_by_row(state, stops: StopTokens):
    """What one step does to each row, written out per row."""
    out = {k: v.clone() for k, v in state.items()}
    for r in range(state["new"].shape[0]):
        active = bool(state["active"][r])
        tok = int(state["new"][r]) if active else PAD
        cur = int(state["cur"][r])
        out["tokens"][r, cur] = tok
        stop = tok in stops.singles or (stops.pair is not None and tok == stops.pair == int(state["last"][r]))
        out["cur"][r] = cur + active
        out["active"][r] = active and not stop
        out["last"][r] = tok
        out["next_tokens"][r, 0] = tok
        out["next_positions"][r, 0] = cur + active - 1
    return out


@pytest.mark.parametrize("stops", STOPS, ids=str)
def test_reference_advance_equals_row_by_row(stops):
    for seed, b in enumerate((1, 5, 64)):
        state = _inputs(b, 9, seed)
        want = _row_by_row(state, stops)
        flag = torch.zeros((), dtype=torch.bool)
        reference_advance(**state, stops=stops, pad=PAD, flag=flag)
        for name in state:
            assert torch.equal(state[name], want[name]), name
        assert bool(flag) == bool(want["active"].any())


def test_reference_advance_flag_when_every_row_stops():
    state = _inputs(4, 6, 0)
    state["new"].fill_(PAD)
    flag = torch.ones((), dtype=torch.bool)
    reference_advance(**state, stops=StopTokens((PAD,)), pad=PAD, flag=flag)
    assert not bool(flag) and not state["active"].any()


def test_more_than_three_single_stops_are_refused():
    state = _inputs(2, 4, 0)
    with pytest.raises(ValueError, match="at most 3 single stop tokens"):
        advance(**state, stops=StopTokens((1, 2, 4, 5)), pad=PAD)


@pytest.mark.gpu
@pytest.mark.parametrize("stops", STOPS, ids=str)
@pytest.mark.parametrize("b", [1, 7, 64, 300])
@pytest.mark.parametrize("flag_on", ["pinned", "cuda", None])
def test_triton_advance_matches_reference(stops, b, flag_on):
    import gigatron.core.inference.advance as advance_module

    calls = []
    original = advance_module._kernel
    state = _inputs(b, 40, seed=b)
    want = {k: v.clone() for k, v in state.items()}
    want_flag = torch.zeros((), dtype=torch.bool)
    reference_advance(**want, stops=stops, pad=PAD, flag=want_flag)
    got = {k: v.cuda() for k, v in state.items()}
    flag = {"pinned": torch.zeros((), dtype=torch.bool).pin_memory(),
            "cuda": torch.zeros((), dtype=torch.bool, device="cuda"), None: None}[flag_on]
    try:
        advance_module._kernel = lambda: calls.append(1) or original()
        advance(**got, stops=stops, pad=PAD, flag=flag)
    finally:
        advance_module._kernel = original
    torch.cuda.synchronize()
    assert calls, "the Triton kernel did not run"
    for name in state:
        assert torch.equal(got[name].cpu(), want[name]), name
    if flag is not None:
        assert bool(flag.cpu()) == bool(want_flag)
