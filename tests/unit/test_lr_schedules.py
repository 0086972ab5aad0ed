"""OptimizerParamScheduler against the schedule formulas, step by step (samples)."""

import math

import pytest
import torch

from gigatron.core.optim import OptimizerConfig, OptimizerParamScheduler, SchedulerConfig, SchedulerCheckpointMismatch

GBS = 8
MAX_LR, MIN_LR = 1e-3, 1e-5


def _optimizer(num_groups=1):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))]} for _ in range(num_groups)]
    return torch.optim.SGD(groups, lr=0.0)


def _scheduler(train_iters=100, opt=None, wd=0.01, **sched):
    opt = opt or _optimizer()
    return OptimizerParamScheduler(
        opt, SchedulerConfig(**sched), OptimizerConfig(lr=MAX_LR, min_lr=MIN_LR, weight_decay=wd),
        global_batch_size=GBS, train_iters=train_iters,
    )


def _expected_lr(n, style, warmup, decay, init=0.0, wsd=None, wsd_style="exponential"):
    if warmup > 0 and n <= warmup:
        return init + (MAX_LR - init) * n / warmup
    if style == "constant":
        return MAX_LR
    if n > decay:
        return MIN_LR
    if style == "inverse-square-root":
        return max(MIN_LR, MAX_LR * math.sqrt(max(warmup, 1)) / math.sqrt(max(n, 1)))
    r = (n - warmup) / (decay - warmup)
    if style == "linear":
        c = 1 - r
    elif style == "cosine":
        c = 0.5 * (math.cos(math.pi * r) + 1)
    else:
        start = decay - wsd
        if n <= start:
            c = 1.0
        else:
            q = (n - start) / wsd
            c = {"exponential": 2 * 0.5 ** q - 1, "linear": 1 - q, "cosine": 0.5 * (math.cos(math.pi * q) + 1)}[wsd_style]
    return MIN_LR + c * (MAX_LR - MIN_LR)


def _walk(sched, iters):
    lrs = [sched.optimizer.param_groups[0]["lr"]]
    for _ in range(iters):
        sched.step(increment=GBS)
        lrs.append(sched.optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "inverse-square-root"])
def test_decay_styles_follow_formula(style):
    sched = _scheduler(train_iters=100, lr_decay_style=style, lr_warmup_iters=10, lr_decay_iters=80)
    lrs = _walk(sched, 120)
    for it, lr in enumerate(lrs):
        expected = _expected_lr(it * GBS, style, warmup=10 * GBS, decay=80 * GBS)
        assert lr == pytest.approx(expected, rel=1e-12, abs=1e-15), (style, it)
    if style != "constant":
        assert lrs[-1] == pytest.approx(MIN_LR)  # past the decay span -> min_lr
    assert lrs[10] == pytest.approx(MAX_LR)  # end of warmup -> peak


@pytest.mark.parametrize("wsd_style", ["exponential", "linear", "cosine"])
def test_wsd_follows_formula(wsd_style):
    sched = _scheduler(train_iters=100, lr_decay_style="WSD", lr_wsd_decay_style=wsd_style,
                       lr_warmup_iters=5, lr_wsd_decay_iters=20)
    lrs = _walk(sched, 110)
    for it, lr in enumerate(lrs):
        expected = _expected_lr(it * GBS, "WSD", warmup=5 * GBS, decay=100 * GBS, wsd=20 * GBS, wsd_style=wsd_style)
        assert lr == pytest.approx(expected, rel=1e-12, abs=1e-15), (wsd_style, it)
    assert lrs[80] == pytest.approx(MAX_LR)  # stable phase lasts until the anneal
    assert lrs[100] == pytest.approx(MIN_LR)


def test_warmup_init_fraction_and_samples():
    sched = _scheduler(train_iters=50, lr_decay_style="linear", lr_warmup_fraction=0.1, lr_warmup_init=1e-4)
    assert sched.lr_warmup_steps == pytest.approx(0.1 * 50 * GBS)
    lrs = _walk(sched, 60)
    for it, lr in enumerate(lrs):
        assert lr == pytest.approx(_expected_lr(it * GBS, "linear", 0.1 * 50 * GBS, 50 * GBS, init=1e-4), rel=1e-12)
    # sample-based flags give the same schedule
    by_samples = OptimizerParamScheduler(
        _optimizer(), SchedulerConfig(lr_decay_style="cosine", lr_warmup_samples=40, lr_decay_samples=320),
        OptimizerConfig(lr=MAX_LR, min_lr=MIN_LR), global_batch_size=GBS, train_samples=400)
    by_iters = _scheduler(train_iters=50, lr_decay_style="cosine", lr_warmup_iters=5, lr_decay_iters=40)
    assert _walk(by_samples, 55) == _walk(by_iters, 55)


def test_samples_are_counted_with_uneven_increments():
    sched = _scheduler(train_iters=100, lr_decay_style="linear", lr_warmup_iters=10)
    n = 0
    for inc in [3, 8, 8, 1, 16, 40, 100, 7]:
        sched.step(increment=inc)
        n += inc
        assert sched.num_steps == n
        assert sched.get_lr() == pytest.approx(_expected_lr(n, "linear", 80, 800))


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
def test_weight_decay_increment(style):
    kw = {} if style == "constant" else dict(start_weight_decay=0.0, end_weight_decay=0.1)
    opt = _optimizer(2)
    opt.param_groups[1]["wd_mult"] = 0.0
    sched = _scheduler(train_iters=40, opt=opt, weight_decay_incr_style=style, **kw)
    for it in range(50):
        n = it * GBS
        if style == "constant":
            expected = 0.01
        elif n > 40 * GBS:
            expected = 0.1
        else:
            ratio = n / (40 * GBS)
            coeff = ratio if style == "linear" else 0.5 * (math.cos(math.pi * (1 - ratio)) + 1)
            expected = 0.1 * coeff
        assert opt.param_groups[0]["weight_decay"] == pytest.approx(expected, abs=1e-15)
        assert opt.param_groups[1]["weight_decay"] == 0.0
        sched.step(GBS)


def test_group_multipliers_and_own_lr():
    opt = _optimizer(3)
    opt.param_groups[1]["lr_mult"] = 0.5
    opt.param_groups[2]["max_lr"] = 2e-3
    opt.param_groups[2]["min_lr"] = 0.0
    sched = _scheduler(train_iters=10, opt=opt, lr_decay_style="linear")
    sched.step(3 * GBS)
    r = 3 / 10
    assert opt.param_groups[0]["lr"] == pytest.approx(MIN_LR + (1 - r) * (MAX_LR - MIN_LR))
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * opt.param_groups[0]["lr"])
    assert opt.param_groups[2]["lr"] == pytest.approx((1 - r) * 2e-3)


def test_state_dict_roundtrip_and_checks():
    sched = _scheduler(train_iters=100, lr_decay_style="cosine", lr_warmup_iters=10)
    _walk(sched, 37)
    sd = sched.state_dict()
    assert sd["num_steps"] == 37 * GBS
    resumed = _scheduler(train_iters=100, lr_decay_style="cosine", lr_warmup_iters=10)
    resumed.load_state_dict(sd)
    assert resumed.num_steps == sched.num_steps
    assert resumed.optimizer.param_groups[0]["lr"] == sched.optimizer.param_groups[0]["lr"]

    other = _scheduler(train_iters=100, lr_decay_style="linear", lr_warmup_iters=10)
    with pytest.raises(SchedulerCheckpointMismatch, match="decay style"):
        other.load_state_dict(sd)
    keep = _scheduler(train_iters=100, lr_decay_style="linear", lr_warmup_iters=10, override_opt_param_scheduler=True)
    keep.load_state_dict(sd)
    assert keep.lr_decay_style == "linear" and keep.num_steps == 37 * GBS
    take = _scheduler(train_iters=100, lr_decay_style="linear", lr_warmup_iters=10,
                      use_checkpoint_opt_param_scheduler=True)
    take.load_state_dict(sd)
    assert take.lr_decay_style == "cosine"
    assert take.get_lr() == pytest.approx(sched.get_lr())


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="WSD"):
        _scheduler(lr_decay_style="WSD")
    with pytest.raises(ValueError, match="warmup"):
        _scheduler(train_iters=10, lr_warmup_iters=10)
    with pytest.raises(ValueError, match="lr-decay-style"):
        SchedulerConfig(lr_decay_style="exp")
    with pytest.raises(ValueError, match="constant"):
        _scheduler(start_weight_decay=0.0, end_weight_decay=0.1)
    with pytest.raises(ValueError, match="mutually exclusive"):
        SchedulerConfig(override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=True)


def test_changed_train_iters_on_resume_is_named_in_samples_and_iterations():
    """Resuming with another --train-iters: one ValueError that says what differs, in samples and
    iterations (not "iterations" for a sample count), names the flags, and leaves the schedule as it
    was; --override-opt-param-scheduler accepts the new length."""
    sched = _scheduler(train_iters=100, lr_decay_style="cosine", wd=0.01)
    _walk(sched, 20)
    saved = sched.state_dict()
    longer = _scheduler(train_iters=150, lr_decay_style="cosine", wd=0.01)
    with pytest.raises(SchedulerCheckpointMismatch) as caught:
        longer.load_state_dict(saved)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert "\n" not in message
    assert "the learning-rate decay span is 1,200 samples (150 iterations of 8 samples) in this run but 800 " \
           "samples (100 iterations of 8 samples) in the checkpoint" in message
    assert "the weight-decay increment span is 1,200 samples" in message
    assert "--train-iters" in message and "--override-opt-param-scheduler" in message
    assert "total number of iterations" not in message
    assert longer.lr_decay_steps == 150 * GBS and longer.num_steps == 0  # nothing half-loaded
    accepted = _scheduler(train_iters=150, lr_decay_style="cosine", wd=0.01, override_opt_param_scheduler=True)
    accepted.load_state_dict(saved)
    assert accepted.lr_decay_steps == 150 * GBS and accepted.num_steps == 20 * GBS
