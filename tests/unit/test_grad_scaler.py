"""Dynamic / constant loss scaler: skip, backoff, hysteresis, growth, min scale, state."""

import pytest
import torch

from gigatron.core.optim import ConstantGradScaler, DynamicGradScaler


def _scale(s):
    return float(s.scale.item())


def test_hysteresis_then_backoff():
    s = DynamicGradScaler(initial_scale=2.0**16, min_scale=1.0, growth_interval=1000, hysteresis=2)
    s.update(found_inf=True)
    assert _scale(s) == 2.0**16  # first overflow absorbed by hysteresis
    s.update(found_inf=True)
    assert _scale(s) == 2.0**15
    s.update(found_inf=True)  # hysteresis is not re-armed without growth: halve every time now
    assert _scale(s) == 2.0**14


def test_growth_after_window_rearms_hysteresis():
    s = DynamicGradScaler(initial_scale=8.0, min_scale=1.0, growth_interval=3, hysteresis=2)
    for _ in range(2):
        s.update(False)
    assert _scale(s) == 8.0
    s.update(False)
    assert _scale(s) == 16.0
    s.update(True)  # hysteresis re-armed by the growth: absorbed
    assert _scale(s) == 16.0
    s.update(False)
    s.update(False)
    s.update(True)  # an overflow resets the growth tracker
    assert _scale(s) == 8.0
    for _ in range(2):
        s.update(False)
    assert _scale(s) == 8.0
    s.update(False)
    assert _scale(s) == 16.0


def test_min_scale_floor_and_state_roundtrip():
    s = DynamicGradScaler(initial_scale=4.0, min_scale=2.0, growth_interval=10, hysteresis=1)
    for _ in range(5):
        s.update(True)
    assert _scale(s) == 2.0
    s.update(False)
    t = DynamicGradScaler(initial_scale=1024.0, min_scale=1.0, growth_interval=10, hysteresis=1)
    t.load_state_dict(s.state_dict())
    assert _scale(t) == 2.0
    assert t.state_dict()["growth_tracker"] == 1
    assert t.state_dict()["hysteresis_tracker"] == s.state_dict()["hysteresis_tracker"]
    assert torch.equal(t.inv_scale, torch.tensor([0.5]))


def test_constant_scaler_never_changes():
    s = ConstantGradScaler(128.0)
    for flag in (True, False, True):
        s.update(flag)
    assert _scale(s) == 128.0


def test_bad_arguments():
    with pytest.raises(ValueError):
        DynamicGradScaler(initial_scale=1.0, min_scale=2.0)
    with pytest.raises(ValueError):
        ConstantGradScaler(0.0)
