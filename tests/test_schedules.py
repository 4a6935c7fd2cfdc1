"""Schedules: warmup by epochs and by updates, closed-form values, one step per update."""

import logging
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from analysis.lr_curve import lr_curve
from engine import schedules
from engine.checks import check_config
from tests.helpers import REPO

CONF = REPO / "conf"
SCHEDS = sorted(p.stem for p in (CONF / "sched").glob("*.yaml"))
LR, WARMUP_LR, SPE = 0.1, 1e-3, 10  # base LR, LR at update 0, updates per epoch
BUILDERS = {
    "cosine": schedules.cosine,
    "step": schedules.step,
    "multistep": schedules.multistep,
    "poly": schedules.poly,
    "constant": schedules.constant,
}


def optimizer(lr_scale: float | None = None) -> torch.optim.Optimizer:
    groups = [{"params": [torch.zeros(1, requires_grad=True)]}]
    if lr_scale is not None:
        groups.append({"params": [torch.zeros(1, requires_grad=True)], "lr_scale": lr_scale})
    return torch.optim.SGD(groups, lr=LR)


def curve(scheduler, updates: int, group: int = 0) -> list[float]:
    """The LR each update uses, driven as the loop drives it: step_update(n) after update n."""
    lrs = []
    for n in range(updates):
        scheduler.step_update(num_updates=n)
        lrs.append(scheduler.optimizer.param_groups[group]["lr"])
    return lrs


def warnings(caplog) -> list:
    return [r for r in caplog.records if r.name == "engine.schedules"]


def build(name, total_steps=100, **kwargs):
    opt = optimizer()
    return BUILDERS[name](
        opt, total_steps=total_steps, steps_per_epoch=SPE, warmup_lr=WARMUP_LR, **kwargs
    )


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize(
    ("warmup", "updates"),
    [
        ({"warmup_epochs": 0.5}, 5),
        ({"warmup_steps": 3}, 3),
        ({"warmup_epochs": 1, "warmup_steps": 2}, 12),
    ],
    ids=["epochs", "steps", "both"],
)
def test_warmup_by_epochs_or_updates_ends_at_the_right_update(name, warmup, updates):
    lrs = curve(build(name, **warmup), updates + 2)
    for t in range(updates):  # linear from warmup_lr at update 0 towards the base LR
        assert lrs[t] == pytest.approx(WARMUP_LR + t * (LR - WARMUP_LR) / updates)
    assert lrs[updates] == pytest.approx(LR)  # the first update after the warmup: the base LR
    assert lrs[updates - 1] < LR


@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_warmup_as_long_as_the_run_is_cut_to_half_the_run_with_one_warning(name, caplog):
    caplog.set_level(logging.WARNING)
    kwargs = {"multistep": {"milestones": [1.5]}, "step": {"decay_epochs": 0.5}}.get(name, {})
    lrs = curve(build(name, total_steps=20, warmup_epochs=2, **kwargs), 20)
    assert lrs[0] == pytest.approx(WARMUP_LR)
    assert lrs[9] < LR and lrs[10] == pytest.approx(LR)  # 10 updates of warmup, not 20
    (record,) = warnings(caplog)
    assert "warmup (20 updates) does not fit in the whole run (20 updates)" in record.message
    assert "cut to 10, half the run" in record.message


def test_a_warmup_shorter_than_the_run_is_kept_and_not_mentioned(caplog):
    caplog.set_level(logging.WARNING)
    lrs = curve(build("cosine", total_steps=20, warmup_steps=19), 20)
    assert lrs[18] < LR and lrs[19] == pytest.approx(LR)
    assert not warnings(caplog)


def test_one_epoch_of_the_default_config_trains_and_draws_with_half_an_epoch_of_warmup(caplog):
    # `python run.py trainer.epochs=1`, the first quick check people run: the default cosine
    # schedule's 1-epoch warmup is the whole run; analysis/lr_curve.py uses the same builder
    caplog.set_level(logging.WARNING)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["trainer.epochs=1", "data.dataset.image_size=8"])
    check_config(cfg)
    curve = lr_curve(cfg)
    per_epoch = curve["updates_per_epoch"]
    assert curve["warmup"] == per_epoch // 2 and len(curve["lr"]) == per_epoch
    assert max(curve["lr"]) == pytest.approx(cfg.optim.lr)  # the peak is reached, then decays
    assert curve["lr"][-1] < curve["lr"][per_epoch // 2]
    (record,) = warnings(caplog)
    assert "cut to" in record.message


def test_cosine_matches_its_closed_form():
    w, total, min_lr = 5, 100, 1e-4
    lrs = curve(build("cosine", total, warmup_steps=w, min_lr=min_lr), total + 1)
    for t in [5, 20, 52, 99, 100]:
        expected = min_lr + 0.5 * (LR - min_lr) * (1 + math.cos(math.pi * (t - w) / (total - w)))
        assert lrs[t] == pytest.approx(expected), t
    assert lrs[total] == pytest.approx(min_lr)


def test_step_decays_every_decay_epochs_after_the_warmup():
    lrs = curve(build("step", 100, warmup_steps=4, decay_epochs=3, decay_rate=0.5), 100)
    for t in [4, 33, 34, 63, 64, 99]:
        assert lrs[t] == pytest.approx(LR * 0.5 ** ((t - 4) // 30)), t


def test_multistep_decays_at_the_first_update_of_each_milestone_epoch():
    sched = build("multistep", 100, warmup_steps=4, milestones=[2, 5.5], decay_rate=0.1)
    lrs = curve(sched, 100)
    assert lrs[19] == pytest.approx(LR)  # the last update of epoch 1 (0-based) at the base LR
    assert lrs[20] == pytest.approx(LR * 0.1)  # epoch 2 starts decayed
    assert lrs[54] == pytest.approx(LR * 0.1)
    assert lrs[55] == pytest.approx(LR * 0.01)  # milestones may fall mid-epoch
    assert lrs[99] == pytest.approx(LR * 0.01)


def test_multistep_refuses_milestones_out_of_order_or_inside_the_warmup():
    with pytest.raises(ValueError, match=r"sched.milestones=\[5, 2\] must increase"):
        build("multistep", milestones=[5, 2])
    with pytest.raises(ValueError, match="come after the warmup"):
        build("multistep", milestones=[1], warmup_epochs=1)


@pytest.mark.parametrize("power", [1.0, 2.0, 0.9])
def test_poly_matches_its_closed_form(power):
    w, total, min_lr = 10, 60, 1e-4
    lrs = curve(build("poly", total, warmup_epochs=1, power=power, min_lr=min_lr), total + 1)
    for t in [10, 11, 35, 59, 60]:
        expected = min_lr + (LR - min_lr) * (1 - (t - w) / (total - w)) ** power
        assert lrs[t] == pytest.approx(expected), t


def test_constant_holds_the_lr_after_the_warmup():
    lrs = curve(build("constant", 50, warmup_steps=5), 50)
    assert lrs[5:] == pytest.approx([LR] * 45)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_stepped_per_update_not_per_epoch_and_group_multipliers_follow(name):
    opt = optimizer(lr_scale=0.5)
    kwargs = {"decay_epochs": 0.5} if name == "step" else {}
    if name == "multistep":
        kwargs = {"milestones": [0.5]}
    sched = BUILDERS[name](
        opt, total_steps=20, steps_per_epoch=SPE, warmup_steps=3, warmup_lr=WARMUP_LR, **kwargs
    )
    lrs = curve(sched, 8)
    assert lrs[1] != lrs[2], "the LR changes within an epoch"
    before = [g["lr"] for g in opt.param_groups]
    sched.step(epoch=1)  # an epoch-level call must not move a per-update schedule
    assert [g["lr"] for g in opt.param_groups] == before
    scaled = curve(sched, 8, group=1)
    assert scaled == pytest.approx([0.5 * lr for lr in lrs])


@pytest.mark.parametrize("option", SCHEDS)
def test_every_sched_option_runs_from_the_warmup_lr_to_the_end(option):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"sched={option}"])
    opt = optimizer()
    sched = instantiate(cfg.sched)(opt, total_steps=6 * SPE, steps_per_epoch=SPE)
    lrs = curve(sched, 6 * SPE)
    warmup = schedules.warmup_updates(cfg.sched.warmup_epochs, cfg.sched.warmup_steps, SPE)
    assert lrs[0] == pytest.approx(cfg.sched.warmup_lr if warmup else LR)
    assert lrs[warmup] == pytest.approx(LR)
    assert all(0 <= lr <= LR for lr in lrs)


def test_base_lr_reads_the_scheduled_lr_whatever_group_0_is_scaled_by():
    """The loop's `train/lr` and lr_curve's curve: the schedule's LR, not a group's scaled one."""
    param = torch.zeros(1, requires_grad=True)
    for opt in (
        torch.optim.SGD([{"params": [param], "lr_scale": 0.25}], lr=LR, momentum=0.9),
        torch.optim.AdamW([{"params": [param], "lr_scale": 4.0}], lr=LR, betas=(0.8, 0.99)),
        torch.optim.SGD([param], lr=LR),  # no lr_scale key: scale 1
    ):
        sched = schedules.cosine(opt, total_steps=20, steps_per_epoch=SPE, warmup_steps=0)
        for n in (0, 7, 19):
            sched.step_update(num_updates=n)
            expected = LR * 0.5 * (1 + math.cos(math.pi * n / 20))
            assert schedules.base_lr(opt) == pytest.approx(expected)
    assert schedules.momentum(opt) == 0.0  # SGD's momentum key, even when 0
    assert schedules.momentum(torch.optim.AdamW([param], betas=(0.8, 0.99))) == 0.8
    assert schedules.momentum(torch.optim.Adagrad([param])) is None
