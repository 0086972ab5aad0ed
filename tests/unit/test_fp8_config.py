"""FP8Config: Megatron's defaults, flag validation, device checks and the bf16 first/last layers."""

import dataclasses
import re

import pytest

from gigatron.core.fp8 import (
    FP8Config,
    check_bf16_layer_counts,
    check_fp8_device,
    check_fp8_param_gather,
    layer_uses_fp8,
)


def test_defaults_are_megatrons():
    c = FP8Config()
    assert (c.fp8, c.fp8_recipe, c.fp8_margin, c.fp8_amax_history_len, c.fp8_amax_compute_algo) == (
        None, "delayed", 0, 1, "most_recent")
    assert (c.fp8_wgrad, c.fp8_param_gather, c.first_last_layers_bf16) == (True, False, False)
    assert (c.num_layers_at_start_in_bf16, c.num_layers_at_end_in_bf16) == (1, 1)
    assert not c.enabled and FP8Config(fp8="hybrid").enabled


def test_every_field_has_help_text():
    import ast
    import inspect

    import gigatron.core.fp8.config as module

    tree = ast.parse(inspect.getsource(module.FP8Config))
    body = tree.body[0].body
    documented = {stmt.target.id for stmt, nxt in zip(body, body[1:])
                  if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                  and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)}
    assert documented == {f.name for f in dataclasses.fields(FP8Config)}


@pytest.mark.parametrize("kwargs, message", [
    (dict(fp8="e5m2"), "--fp8-format 'e5m2'"),
    (dict(fp8="hybrid", fp8_recipe="custom"), "--fp8-recipe custom"),
    (dict(fp8="hybrid", fp8_recipe="rowwise"), "--fp8-recipe 'rowwise'"),
    (dict(fp8="hybrid", fp8_amax_compute_algo="mean"), "--fp8-amax-compute-algo"),
    (dict(fp8="hybrid", fp8_margin=-1), "--fp8-margin"),
    (dict(fp8="hybrid", fp8_amax_history_len=0), "--fp8-amax-history-len"),
    (dict(fp8="hybrid", fp8_recipe="tensorwise", fp8_amax_history_len=1024), "only apply to --fp8-recipe delayed"),
    (dict(fp8="e4m3", fp8_recipe="blockwise", fp8_margin=1), "only apply to --fp8-recipe delayed"),
    (dict(fp8="e4m3", fp8_recipe="tensorwise", fp8_amax_compute_algo="max"), "only apply to --fp8-recipe delayed"),
    (dict(fp8_param_gather=True), "--fp8-param-gather needs FP8"),
    (dict(first_last_layers_bf16=True), "--first-last-layers-bf16 needs FP8"),
    (dict(fp8="hybrid", num_layers_at_end_in_bf16=-1), "--num-layers-at-end-in-bf16"),
])
def test_bad_flags_raise_naming_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        FP8Config(**kwargs)


def test_megatron_llama3_recipe_is_accepted():
    c = FP8Config(fp8="hybrid", fp8_amax_history_len=1024, fp8_amax_compute_algo="max", fp8_param_gather=True)
    check_fp8_param_gather(c, use_distributed_optimizer=True)
    with pytest.raises(ValueError, match="--use-distributed-optimizer"):
        check_fp8_param_gather(c, use_distributed_optimizer=False)


def test_device_checks_name_the_card():
    hopper = dict(device_name="NVIDIA H100 80GB HBM3", capability=(9, 0))
    check_fp8_device(FP8Config(fp8="hybrid"), **hopper)
    check_fp8_device(FP8Config(fp8="hybrid", fp8_recipe="blockwise"), **hopper)
    with pytest.raises(ValueError, match=r"mxfp8 needs a Blackwell GPU \(compute capability 10.x\); "
                                         r"this is NVIDIA H100 80GB HBM3 \(compute capability 9.0\)"):
        check_fp8_device(FP8Config(fp8="e4m3", fp8_recipe="mxfp8"), **hopper)
    with pytest.raises(ValueError, match="needs FP8 tensor cores.*NVIDIA A100-SXM4-80GB"):
        check_fp8_device(FP8Config(fp8="e4m3"), device_name="NVIDIA A100-SXM4-80GB", capability=(8, 0))
    check_fp8_device(FP8Config(fp8="e4m3"), device_name="NVIDIA L40S", capability=(8, 9))
    with pytest.raises(ValueError, match="not implemented"):
        check_fp8_device(FP8Config(fp8="e4m3", fp8_recipe="mxfp8"), device_name="NVIDIA B200", capability=(10, 0))
    # FP8 off: nothing to check, whatever the card.
    check_fp8_device(FP8Config(), device_name="Tesla V100", capability=(7, 0))


def test_cpu_runs_every_recipe_but_mxfp8():
    for recipe in ("tensorwise", "delayed", "blockwise"):
        check_fp8_device(FP8Config(fp8="hybrid", fp8_recipe=recipe), "cpu")
    with pytest.raises(ValueError, match="mxfp8 needs a Blackwell GPU.*CPU"):
        check_fp8_device(FP8Config(fp8="hybrid", fp8_recipe="mxfp8"), "cpu")


def test_layer_uses_fp8_keeps_first_and_last_layers_in_bf16():
    c = FP8Config(fp8="hybrid", first_last_layers_bf16=True)
    assert [layer_uses_fp8(c, n, 4) for n in range(4)] == [False, True, True, False]
    c = FP8Config(fp8="hybrid", first_last_layers_bf16=True, num_layers_at_start_in_bf16=2,
                  num_layers_at_end_in_bf16=0)
    assert [layer_uses_fp8(c, n, 4) for n in range(4)] == [False, False, True, True]
    # Without --first-last-layers-bf16 the counts do nothing; without FP8 no layer uses it.
    c = FP8Config(fp8="e4m3", num_layers_at_start_in_bf16=3)
    assert all(layer_uses_fp8(c, n, 4) for n in range(4))
    assert not any(layer_uses_fp8(FP8Config(), n, 4) for n in range(4))
    with pytest.raises(ValueError, match="outside 0..3"):
        layer_uses_fp8(c, 4, 4)


def test_bf16_layer_counts_must_leave_an_fp8_layer():
    c = FP8Config(fp8="hybrid", first_last_layers_bf16=True, num_layers_at_start_in_bf16=2,
                  num_layers_at_end_in_bf16=2)
    check_bf16_layer_counts(c, 5)
    with pytest.raises(ValueError, match="no layer would run in FP8"):
        check_bf16_layer_counts(c, 4)
