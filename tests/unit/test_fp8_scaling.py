"""FP8 casting and scaling math against float32 references: saturation, scales and margins, 1x128 and
128x128 block scales (also for shapes that are not multiples of 128), delayed-scaling amax history."""

import math

import pytest
import torch

from gigatron.core.fp8 import (
    E4M3,
    E5M2,
    FP8_MAX,
    FP8LinearState,
    FP8Config,
    dequantize,
    format_dtypes,
    quantize_128x128,
    quantize_1x128,
    saturating_cast,
    scale_from_amax,
    update_fp8_states,
)
from gigatron.core.fp8.state import GRAD_OUTPUT, INPUT, WEIGHT, record_amax

pytestmark = pytest.mark.usefixtures("one_thread")


def test_format_dtypes():
    assert format_dtypes("e4m3") == (E4M3, E4M3)
    assert format_dtypes("hybrid") == (E4M3, E5M2)
    assert FP8_MAX[E4M3] == float(torch.finfo(E4M3).max) == 448.0
    assert FP8_MAX[E5M2] == float(torch.finfo(E5M2).max) == 57344.0


@pytest.mark.parametrize("dtype, limit", [(E4M3, 448.0), (E5M2, 57344.0)])
def test_saturating_cast_clamps_to_the_format_max(dtype, limit):
    x = torch.tensor([0.0, 1.0, -3.5, limit, -limit, 2 * limit, -10 * limit, float("inf"), float("-inf")])
    q = saturating_cast(x, torch.tensor(1.0), dtype).float()
    assert q.tolist() == [0.0, 1.0, -3.5, limit, -limit, limit, -limit, limit, -limit]
    assert torch.isfinite(q).all()
    # In range, the cast is the plain rounding cast of x * scale.
    y = torch.randn(1000) * 10
    scale = torch.tensor(3.0)
    assert torch.equal(saturating_cast(y, scale, dtype), (y * scale).to(dtype))


def test_scale_from_amax_against_float32_formula():
    amaxes = torch.tensor([1.0, 3.7, 448.0, 1e-3, 2.5e4])
    for margin in (0, 1, 3):
        got = scale_from_amax(amaxes, 448.0, margin)
        want = torch.tensor([448.0 / a / 2 ** margin for a in amaxes.tolist()], dtype=torch.float32)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    # amax 0, inf or nan keep the fallback (1, or the previous scale).
    bad = torch.tensor([0.0, float("inf"), float("nan")])
    assert scale_from_amax(bad, 448.0).tolist() == [1.0, 1.0, 1.0]
    assert scale_from_amax(bad, 448.0, fallback=torch.tensor([2.0, 3.0, 4.0])).tolist() == [2.0, 3.0, 4.0]
    # A denormal amax gives a finite scale.
    assert torch.isfinite(scale_from_amax(torch.tensor([1e-45]), 57344.0)).all()
    # Power-of-two scales: the largest power of two not above fp8_max / amax.
    p2 = scale_from_amax(amaxes, 448.0, power_of_two=True)
    assert p2.tolist() == [2.0 ** math.floor(math.log2(448.0 / a)) for a in amaxes.tolist()]


def _reference_tile_quantize(x, rows, cols, dtype):
    """Per-tile loop in float32: power-of-two scale, saturating cast, read back."""
    out = torch.empty_like(x)
    r, k = x.shape
    scales = []
    for i in range(0, r, rows):
        row = []
        for j in range(0, k, cols):
            tile = x[i:i + rows, j:j + cols]
            a = tile.abs().max().item()
            s = 2.0 ** math.floor(math.log2(FP8_MAX[dtype] / a)) if a > 0 else 1.0
            q = (tile * s).clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype).float()
            out[i:i + rows, j:j + cols] = q / s
            row.append(1.0 / s)
        scales.append(row)
    return out, torch.tensor(scales)


@pytest.mark.parametrize("shape", [(3, 300), (5, 128), (2, 40)])
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_1x128_tiles_match_reference(shape, dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen) * torch.logspace(-3, 3, shape[1])  # tiles of very different ranges
    x[0, :7] = 0.0  # a partly zero tile
    q = quantize_1x128(x, dtype)
    ref, ref_scale_inv = _reference_tile_quantize(x, 1, 128, dtype)
    assert q.data.dtype == dtype and q.data.shape == x.shape
    assert q.scale_inv.shape == (shape[0], math.ceil(shape[1] / 128))
    assert torch.equal(q.scale_inv, ref_scale_inv)
    assert torch.equal(dequantize(q), ref)


@pytest.mark.parametrize("shape", [(130, 200), (128, 256), (40, 129)])
def test_128x128_blocks_match_reference(shape):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=gen)
    x[:128, :128] *= 1000.0  # one block with a much larger range
    q = quantize_128x128(x, E4M3)
    ref, ref_scale_inv = _reference_tile_quantize(x, 128, 128, E4M3)
    assert q.scale_inv.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    assert torch.equal(q.scale_inv, ref_scale_inv)
    assert torch.equal(dequantize(q), ref)
    # The transpose reads back as the transposed matrix; a 1x128 tiling has no such transpose.
    assert torch.equal(dequantize(q.t()), ref.t())
    with pytest.raises(ValueError, match="quantize x.t"):
        quantize_1x128(x, E4M3).t()


def test_power_of_two_block_scales_read_back_exactly_in_bf16():
    x = torch.randn(64, 384)
    q = quantize_1x128(x, E4M3)
    assert torch.equal(dequantize(q, torch.bfloat16).float(), dequantize(q))


def test_amax_history_rolls_like_transformer_engine():
    state = FP8LinearState(3, E4M3, E5M2)
    seen = []
    for step, value in enumerate([2.0, 8.0, 4.0, 1.0]):
        record_amax(state.amax_history, INPUT, torch.tensor([value, -value / 2]))
        record_amax(state.amax_history, INPUT, torch.tensor([value / 4]))  # a second use: max kept
        assert state.amax_history[0, INPUT].item() == value
        state.update_scales()
        seen.append(value)
        # Row 0 is cleared for the next step; row L-1 holds the latest step, row L-2 the one before.
        assert state.amax_history[0].tolist() == [0.0, 0.0, 0.0]
        expected = {2: seen[-1], 1: seen[-2] if len(seen) > 1 else 0.0}
        assert state.amax_history[2, INPUT].item() == expected[2]
        assert state.amax_history[1, INPUT].item() == expected[1]


@pytest.mark.parametrize("algo, history_len, expected_amax", [
    ("most_recent", 1, 1.0), ("most_recent", 4, 1.0), ("max", 4, 16.0), ("max", 2, 4.0)])
def test_max_and_most_recent(algo, history_len, expected_amax):
    state = FP8LinearState(history_len, E4M3, E5M2, amax_compute_algo=algo, margin=1)
    for value in (16.0, 4.0, 1.0):
        record_amax(state.amax_history, INPUT, torch.tensor([value]))
        record_amax(state.amax_history, WEIGHT, torch.tensor([value]))
        record_amax(state.amax_history, GRAD_OUTPUT, torch.tensor([value]))
        state.update_scales()
    want = [448.0 / expected_amax / 2, 448.0 / expected_amax / 2, 57344.0 / expected_amax / 2]
    torch.testing.assert_close(state.scale, torch.tensor(want), rtol=1e-6, atol=0)


def test_a_step_without_amax_keeps_the_previous_scale():
    state = FP8LinearState(1, E4M3, E4M3)
    record_amax(state.amax_history, INPUT, torch.tensor([7.0]))
    state.update_scales()
    assert state.scale[INPUT].item() == pytest.approx(64.0)
    assert state.scale[WEIGHT].item() == 1.0  # never recorded: initial scale
    state.update_scales()  # nothing recorded this step
    assert state.scale[INPUT].item() == pytest.approx(64.0)


def test_update_fp8_states_updates_every_state():
    states = [FP8LinearState.from_config(FP8Config(fp8="hybrid", fp8_amax_history_len=2)) for _ in range(3)]
    for i, s in enumerate(states):
        record_amax(s.amax_history, INPUT, torch.tensor([float(i + 1)]))
    update_fp8_states(states, group=None)
    assert [s.scale[INPUT].item() for s in states] == pytest.approx([448.0, 224.0, 448.0 / 3])


def test_state_dict_round_trip_and_history_length_change():
    state = FP8LinearState(4, E4M3, E5M2, amax_compute_algo="max")
    for value in (3.0, 5.0, 2.0):
        for kind in (INPUT, WEIGHT, GRAD_OUTPUT):
            record_amax(state.amax_history, kind, torch.tensor([value * (kind + 1)]))
        state.update_scales()
    record_amax(state.amax_history, INPUT, torch.tensor([9.0]))  # a step in progress
    saved = state.state_dict()
    assert set(saved) == {"amax_history", "scale"}
    same = FP8LinearState(4, E4M3, E5M2, amax_compute_algo="max")
    same.load_state_dict(saved)
    assert torch.equal(same.amax_history, state.amax_history) and torch.equal(same.scale, state.scale)
    # The saved tensors are copies: later steps do not change them.
    state.update_scales()
    assert saved["amax_history"][0, INPUT].item() == 9.0

    # ages 0 (row 0), 1 (row L-1), 2 (row L-2) ...: a shorter history keeps the newest ages.
    shorter = FP8LinearState(2, E4M3, E5M2)
    shorter.load_state_dict(saved)
    assert shorter.amax_history[0, INPUT].item() == 9.0  # age 0
    assert shorter.amax_history[1, INPUT].item() == 2.0  # age 1: the last finished step
    longer = FP8LinearState(6, E4M3, E5M2)
    longer.load_state_dict(saved)
    assert longer.amax_history[:, INPUT].tolist() == [9.0, 0.0, 0.0, 3.0, 5.0, 2.0]
    assert torch.equal(longer.scale, saved["scale"])


def test_load_state_dict_rejects_bad_state():
    state = FP8LinearState(2, E4M3, E5M2)
    with pytest.raises(ValueError, match="missing"):
        state.load_state_dict({"scale": torch.ones(3)})
    with pytest.raises(ValueError, match="expected"):
        state.load_state_dict({"amax_history": torch.zeros(2, 4), "scale": torch.ones(3)})


def test_batched_update_equals_one_state_at_a_time():
    gen = torch.Generator().manual_seed(3)
    configs = [dict(history_len=4, amax_compute_algo="max", margin=0),
               dict(history_len=4, amax_compute_algo="most_recent", margin=2),
               dict(history_len=1, amax_compute_algo="most_recent", margin=0)] * 2
    batched = [FP8LinearState(fwd_dtype=E4M3, bwd_dtype=E5M2, **c) for c in configs]
    single = [FP8LinearState(fwd_dtype=E4M3, bwd_dtype=E5M2, **c) for c in configs]
    for step in range(5):
        for a, b in zip(batched, single):
            values = torch.rand(3, generator=gen) * 10 ** step
            if step == 2:
                values[1] = 0.0  # a kind not seen this step: its scale stays
            for kind in range(3):
                record_amax(a.amax_history, kind, values[kind:kind + 1])
                record_amax(b.amax_history, kind, values[kind:kind + 1])
        update_fp8_states(batched)
        for b in single:
            b.update_scales()
        for a, b in zip(batched, single):
            assert torch.equal(a.amax_history, b.amax_history)
            assert torch.equal(a.scale, b.scale)
