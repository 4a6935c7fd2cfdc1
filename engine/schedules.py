"""Learning-rate schedules as functions of the update step (timm's schedulers, in updates).

Each builder takes the optimizer and the run's length in updates; the engine calls
`scheduler.step_update(step)` after every optimizer update, and `analysis/lr_curve.py` calls the
same builder to draw the curve without training.
"""

from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch.optim import Optimizer


def warmup_updates(warmup_epochs: float, warmup_steps: int, steps_per_epoch: int) -> int:
    """Warmup length in updates: epochs (fractions allowed) plus plain updates."""
    if warmup_epochs < 0 or warmup_steps < 0:
        raise ValueError(
            f"sched.warmup_epochs={warmup_epochs} and sched.warmup_steps={warmup_steps} "
            "must not be negative"
        )
    return round(warmup_epochs * steps_per_epoch) + int(warmup_steps)


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
    warmup = warmup_updates(warmup_epochs, warmup_steps, steps_per_epoch)
    if warmup >= total_steps:
        raise ValueError(
            f"the warmup ({warmup} updates) is not shorter than the whole run ({total_steps} "
            "updates); lower sched.warmup_epochs / sched.warmup_steps or raise trainer.epochs"
        )
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
    """Linear warmup, then the LR times `decay_rate` every `decay_epochs` epochs."""
    del total_steps  # a step schedule does not depend on the run's length
    warmup = warmup_updates(warmup_epochs, warmup_steps, steps_per_epoch)
    decay_t = round(decay_epochs * steps_per_epoch)
    if decay_t < 1:
        raise ValueError(f"sched.decay_epochs={decay_epochs} is shorter than one update")
    return StepLRScheduler(
        optimizer,
        decay_t=decay_t,
        decay_rate=decay_rate,
        warmup_t=warmup,
        warmup_lr_init=warmup_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )
