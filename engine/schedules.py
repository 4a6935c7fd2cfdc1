"""Learning-rate schedules as functions of the update step (timm's schedulers, in updates).

Each builder takes the optimizer and the run's length in updates; the engine calls
`scheduler.step_update(step)` after every optimizer update, and `analysis/lr_curve.py` calls the
same builder to draw the curve without training.
"""

import logging
from collections.abc import Sequence

from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PolyLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch.optim import Optimizer

log = logging.getLogger(__name__)


def warmup_updates(warmup_epochs: float, warmup_steps: int, steps_per_epoch: int) -> int:
    """Warmup length in updates: epochs (fractions allowed) plus plain updates."""
    if warmup_epochs < 0 or warmup_steps < 0:
        raise ValueError(
            f"sched.warmup_epochs={warmup_epochs} and sched.warmup_steps={warmup_steps} "
            "must not be negative"
        )
    return round(warmup_epochs * steps_per_epoch) + int(warmup_steps)


def _warmup_within_run(
    warmup_epochs: float, warmup_steps: int, steps_per_epoch: int, total_steps: int
) -> int:
    """The warmup in updates. One that fills the whole run (`trainer.epochs=1` with the default
    1-epoch warmup, a quick check) is cut to half the run, so the LR still reaches its peak and
    the schedule still runs; the log says so. A shorter warmup is kept as configured."""
    warmup = warmup_updates(warmup_epochs, warmup_steps, steps_per_epoch)
    if warmup >= total_steps:
        fitted = total_steps // 2
        log.warning(
            "the warmup (%d updates) does not fit in the whole run (%d updates): cut to %d, "
            "half the run (sched.warmup_epochs=%g and sched.warmup_steps=%d set it)",
            warmup,
            total_steps,
            fitted,
            warmup_epochs,
            warmup_steps,
        )
        warmup = fitted
    return warmup


def cosine(
    optimizer: Optimizer,
    *,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    warmup_steps: int = 0,
    warmup_lr: float = 1e-6,
    min_lr: float = 0.0,
) -> Scheduler:
    """Linear warmup from `warmup_lr`, then half a cosine from the optimizer's LR to `min_lr`,
    reached at update `total_steps`."""
    warmup = _warmup_within_run(warmup_epochs, warmup_steps, steps_per_epoch, total_steps)
    return CosineLRScheduler(
        optimizer,
        t_initial=total_steps - warmup,
        lr_min=min_lr,
        warmup_t=warmup,
        warmup_lr_init=warmup_lr,
        warmup_prefix=True,  # the cosine starts after the warmup, so it ends at total_steps
        t_in_epochs=False,
    )


def step(
    optimizer: Optimizer,
    *,
    total_steps: int,
    steps_per_epoch: int,
    decay_epochs: float = 30.0,
    decay_rate: float = 0.1,
    warmup_epochs: float = 0.0,
    warmup_steps: int = 0,
    warmup_lr: float = 1e-6,
) -> Scheduler:
    """Linear warmup, then the LR times `decay_rate` every `decay_epochs` epochs (counted from
    the end of the warmup)."""
    warmup = _warmup_within_run(warmup_epochs, warmup_steps, steps_per_epoch, total_steps)
    decay_t = round(decay_epochs * steps_per_epoch)
    if decay_t < 1:
        raise ValueError(f"sched.decay_epochs={decay_epochs} is shorter than one update")
    if warmup + decay_t >= total_steps:
        log.warning(
            "sched.decay_epochs=%s: the LR never decays within this run (%d updates)",
            decay_epochs,
            total_steps,
        )
    return StepLRScheduler(
        optimizer,
        decay_t=decay_t,
        decay_rate=decay_rate,
        warmup_t=warmup,
        warmup_lr_init=warmup_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def multistep(
    optimizer: Optimizer,
    *,
    total_steps: int,
    steps_per_epoch: int,
    milestones: Sequence[float] = (30.0, 60.0, 90.0),
    decay_rate: float = 0.1,
    warmup_epochs: float = 0.0,
    warmup_steps: int = 0,
    warmup_lr: float = 1e-6,
) -> Scheduler:
    """Linear warmup, then the LR times `decay_rate` at each milestone: epochs since the start of
    training (warmup included), as papers state them ("divided by 10 at epochs 30 and 60")."""
    warmup = _warmup_within_run(warmup_epochs, warmup_steps, steps_per_epoch, total_steps)
    decay_t = [round(m * steps_per_epoch) for m in milestones]
    if decay_t != sorted(decay_t) or any(t <= warmup for t in decay_t):
        raise ValueError(
            f"sched.milestones={list(milestones)} must increase and come after the warmup "
            f"({warmup} updates = {warmup / steps_per_epoch:g} epochs)"
        )
    if any(t >= total_steps for t in decay_t):
        log.warning(
            "sched.milestones=%s: some fall after the last update (%d epochs)",
            list(milestones),
            total_steps // steps_per_epoch,
        )
    return MultiStepLRScheduler(
        optimizer,
        # timm applies milestone m from update m - 1 on; +1 makes the decayed LR start with the
        # first update of the milestone epoch, as torch.optim.lr_scheduler.MultiStepLR does
        decay_t=[t + 1 for t in decay_t],
        decay_rate=decay_rate,
        warmup_t=warmup,
        warmup_lr_init=warmup_lr,
        warmup_prefix=False,  # milestones count from the start of training
        t_in_epochs=False,
    )


def poly(
    optimizer: Optimizer,
    *,
    total_steps: int,
    steps_per_epoch: int,
    power: float = 1.0,
    min_lr: float = 0.0,
    warmup_epochs: float = 0.0,
    warmup_steps: int = 0,
    warmup_lr: float = 1e-6,
) -> Scheduler:
    """Linear warmup, then lr = min_lr + (LR - min_lr) * (1 - t / T) ** power over the T updates
    after the warmup, reaching `min_lr` at update `total_steps`; power 1 is the linear decay."""
    warmup = _warmup_within_run(warmup_epochs, warmup_steps, steps_per_epoch, total_steps)
    return PolyLRScheduler(
        optimizer,
        t_initial=total_steps - warmup,
        power=power,
        lr_min=min_lr,
        warmup_t=warmup,
        warmup_lr_init=warmup_lr,
        warmup_prefix=True,  # the decay starts after the warmup, so it ends at total_steps
        t_in_epochs=False,
    )


def constant(
    optimizer: Optimizer,
    *,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    warmup_steps: int = 0,
    warmup_lr: float = 1e-6,
) -> Scheduler:
    """Linear warmup, then the optimizer's LR unchanged (group multipliers still apply)."""
    warmup = _warmup_within_run(warmup_epochs, warmup_steps, steps_per_epoch, total_steps)
    # timm's own "constant": a step schedule that never decays
    return StepLRScheduler(
        optimizer,
        decay_t=1,
        decay_rate=1.0,
        warmup_t=warmup,
        warmup_lr_init=warmup_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def follow_config_on_resume(scheduler: Scheduler, saved: dict) -> None:
    """Keep the schedule this run's config built, not the one in the checkpoint; log how they differ.

    A resumed run with a larger trainer.epochs (or another sched.* value) follows the new
    schedule from the update it stopped at, as timm's and MMPretrain's resume do: loading the
    saved one would keep the old length and run the added epochs at the final LR. Nothing is
    lost by not loading it: timm's schedulers are functions of the update step, their state is
    their settings.
    """
    now = scheduler.state_dict()
    changed = sorted(k for k in now.keys() & saved.keys() if now[k] != saved[k])
    if changed:
        log.info(
            "resume: the LR schedule follows this run's config (trainer.epochs, sched.*), not "
            "the checkpoint's: %s",
            ", ".join(f"{k} {saved[k]} -> {now[k]}" for k in changed),
        )


def base_lr(optimizer: Optimizer) -> float:
    """The schedule's LR as the optimizer holds it: group 0's lr without its lr_scale.

    What the loop logs as train/lr (read before the update's scheduler step) and what
    analysis/lr_curve.py draws: one read-back for both.
    """
    group = optimizer.param_groups[0]
    return group["lr"] / (group.get("lr_scale") or 1.0)
