"""The training loop: `fit` alternates `train_one_epoch` and `evaluate`.

The parts it is made of, each with one job: TrainingState (engine/state.py: what a checkpoint
holds), Guard (engine/guard.py: stop signals and non-finite updates), Checkpointer
(engine/checkpointing.py: when the state is saved), the Objective (engine/objective.py: the
losses and batch mixing) and the device helpers (engine/device.py). Per-step values stay on the device and are read back
(a host-device sync) once per update by the guard, every `log_every` updates and at the end of an
epoch. Under torchrun the model trains in DistributedDataParallel (engine/distributed.py) and
the metrics are sums and means over processes.
"""

import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from itertools import islice

import torch
from rich.progress import Progress
from timm.utils import ModelEmaV3
from torch import nn

from data.images import skipped_images
from data.loaders import seed_epoch, skip_batches
from data.multilabel import is_multi_label
from engine import distributed, multilabel
from engine.checkpoint import CheckpointSaver
from engine.checkpointing import Checkpointer
from engine.console import progress_bar
from engine.device import PRECISIONS, amp_dtype, autocast, memory_format, resolve_device
from engine.guard import Guard
from engine.logger import RunLogger
from engine.metrics import add_confusion, class_balanced_metrics, correct_topk
from engine.objective import Objective
from engine.rng import seed_everything
from engine.schedules import base_lr
from engine.state import EpochProgress, TrainingState, new_best

log = logging.getLogger(__name__)

__all__ = ["PRECISIONS", "evaluate", "fit", "resolve_device", "train_one_epoch"]  # old paths


@dataclass(frozen=True)
class StepSettings:
    """How every batch of the run is trained (trainer.* keys, resolved once by fit)."""

    device: torch.device
    amp_dtype: torch.dtype | None  # autocast; None: fp32
    channels_last: bool
    accum_steps: int  # batches per update
    clip_grad_norm: float | None
    log_every: int  # updates between train/loss records
    num_batches: int  # per epoch, after limit_train_batches


def plain_cross_entropy() -> Objective:
    """The objective of a fit called without one (tools, tests): cross-entropy, no mixing."""
    ce = nn.CrossEntropyLoss()
    return Objective(ce, ce, None, "objective: cross-entropy; mixup/cutmix off")


class UpdateSums:
    """Loss and top-1 hits over the batches of one update (several with accumulation), on the
    device; the epoch's sums take them only if the guard lets the update through."""

    def __init__(self, device: torch.device, params: list[nn.Parameter]):
        self.params = params  # the trained parameters: the gradient norm's
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device)
        self.batches = self.seen = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.loss += loss.detach()
        hard = targets.argmax(1) if targets.ndim == 2 else targets  # soft after mixup
        self.correct += (logits.detach().argmax(1) == hard).sum()
        self.batches += 1
        self.seen += targets.shape[0]  # a shape: known on the host, no sync

    def reset(self) -> None:
        self.loss.zero_()
        self.correct.zero_()
        self.batches = self.seen = 0


def train_one_epoch(
    net, loader, state: TrainingState, objective, guard, checkpointer, logger, progress, run
) -> dict:
    """One pass over `loader` from `state.position` (a resumed epoch's batches done, which the
    loader skips); returns the epoch's metrics over all processes.

    `net` is what trains: state.model, wrapped in DistributedDataParallel and/or compiled.
    """
    net.train()
    position = state.position
    per_batch = (loader.batch_size or 0) * distributed.world_size()  # the bar's images/s
    task = progress.add_task(
        "train", total=run.num_batches, completed=position.batches, metrics="",
        images_per_batch=per_batch,
    )  # fmt: skip
    layout = memory_format(run.channels_last)
    update = UpdateSums(run.device, [p for p in net.parameters() if p.requires_grad])
    images_read = 0  # by this call (a resumed epoch's earlier batches not included): images/s
    state.optimizer.zero_grad(set_to_none=True)
    batches = islice(loader, run.num_batches - position.batches)
    for i, (images, targets) in enumerate(batches, start=position.batches):
        images = images.to(run.device, non_blocking=True, memory_format=layout)
        images, targets = objective.mix(images, targets.to(run.device, non_blocking=True))
        last = (i + 1) % run.accum_steps == 0 or i + 1 == run.num_batches  # of an update
        # data-parallel: gradients are averaged over processes once per update, in its last backward
        with distributed.grad_sync(net, sync=last):
            with autocast(run.device, run.amp_dtype):
                logits = net(images)
                loss = objective.train_loss(logits, targets)
            state.scaler.scale(loss / run.accum_steps).backward()
        update.add(loss, logits, targets)
        images_read += targets.shape[0]
        if last:
            applied, stop, lr = update_step(state, guard, update, run)
            position.batches = i + 1
            if position.batches == run.num_batches:
                state.average_buffers()  # before a checkpoint of this point keeps rank 0's
            if applied and state.step % run.log_every == 0 and position.window_batches:
                _log_train_loss(position, lr, state.step, logger, progress, task)
            checkpointer.after_update(state, applied, stop)
        progress.advance(task)
    progress.remove_task(task)
    return _epoch_sums(position, images_read, run.device)


def update_step(state: TrainingState, guard: Guard, update: UpdateSums, run: StepSettings):
    """Apply the update the batches' gradients make, unless the guard refuses it (non-finite
    loss or gradient): optimizer, scheduler and EMA step. Returns (applied, the stop signal the
    processes agreed on or 0, the LR the update used)."""
    lr = base_lr(state.optimizer)  # read before the scheduler steps
    grad_norm = _grad_norm(state, update.params, run.clip_grad_norm, guard.enabled)
    applied, stop = guard.check(update.loss, grad_norm, state.step)  # the one host sync
    if applied:
        state.scaler.step(state.optimizer)
        state.step += 1
        state.scheduler.step_update(num_updates=state.step)
        if state.ema is not None:
            state.ema.update(state.model, step=state.step)
        state.position.add(update.loss, update.correct, update.batches, update.seen)
    else:
        state.position.skipped_updates += 1
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    update.reset()
    return applied, stop, lr


def _grad_norm(state: TrainingState, params, clip: float | None, checked: bool):
    """The global gradient norm (clipped to `clip`), for the guard; None when nothing needs it."""
    if clip is None and not checked:
        return None
    state.scaler.unscale_(state.optimizer)
    if clip is not None:
        return nn.utils.clip_grad_norm_(params, clip)
    if state.scaler.is_enabled():  # fp16: overflow is the grad scaler's business
        return None
    return nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def _log_train_loss(position: EpochProgress, lr: float, step: int, logger, progress, task) -> None:
    """train/loss (the mean since the last record, over processes: a host sync) and train/lr."""
    window = position.window_loss / position.window_batches
    mean_loss = distributed.mean_over_ranks(window).item()
    logger.log({"train/loss": mean_loss, "train/lr": lr}, step=step)
    progress.update(task, metrics=f"loss {mean_loss:.4f}  lr {lr:.2e}")
    position.window_loss.zero_()
    position.window_batches = 0


def _epoch_sums(position: EpochProgress, images_read: int, device) -> dict:
    """The epoch's loss, top-1 and counts over all processes (one host sync)."""
    counts = [position.counted, position.seen, position.skipped_updates, images_read]
    counts = torch.tensor(counts, dtype=position.loss_sum.dtype, device=device)
    totals = distributed.sum_over_ranks(torch.stack([position.loss_sum, position.correct, *counts]))
    loss_sum, correct, counted, seen, skipped, read = totals.tolist()
    return {
        "loss": loss_sum / counted if counted else math.nan,
        "acc1": correct / seen * 100 if seen else math.nan,
        "skipped_updates": int(skipped / distributed.world_size()),  # the same on every process
        "images": int(read),
    }


@torch.inference_mode()
def evaluate(
    model,
    loader,
    criterion,
    *,
    device,
    amp_dtype=None,
    channels_last=False,
    num_batches=None,
    progress=None,
    hflip=False,
    poll=None,
    multi_label=False,
) -> dict:
    """Loss, top-1 and top-5 accuracy (%) of `model` over `loader`; data-parallel, over every
    process's share of the data. `multi_label`: loss, mAP, CP ... OF1 (engine/multilabel.py).

    `hflip`: test-time augmentation, the mean of the logits of each image and its mirror image.
    `poll()` is called after every batch: fit's stop-signal check, which may save and exit.
    """
    model.eval()
    num_batches = len(loader) if num_batches is None else min(num_batches, len(loader))
    per_batch = (loader.batch_size or 0) * distributed.world_size()
    task = (
        progress.add_task("val", total=num_batches, metrics="", images_per_batch=per_batch)
        if progress
        else None
    )
    layout = memory_format(channels_last)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros(2, device=device)
    seen, kept = 0, []  # multi-label: every (logits, targets), for mAP
    confusion = None  # (C, C), summed on the device; single-label targets
    for images, targets in islice(loader, num_batches):
        images = images.to(device, non_blocking=True, memory_format=layout)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images)
            if hflip:
                logits = (logits + model(images.flip(-1))) / 2
        loss_sum += criterion(logits.float(), targets) * targets.shape[0]
        num_classes = logits.shape[1]
        if multi_label:
            kept.append((logits.float(), targets))
        else:
            correct += correct_topk(logits, targets, (1, min(5, num_classes)))
            confusion = add_confusion(confusion, logits, targets)
        seen += targets.shape[0]
        if progress:
            progress.advance(task)
        if poll is not None:
            poll()
    if progress:
        progress.remove_task(task)
    seen = torch.tensor([seen], dtype=loss_sum.dtype, device=device)
    flat = [] if confusion is None else [confusion.view(-1).to(loss_sum.dtype)]
    totals = distributed.sum_over_ranks(torch.cat([loss_sum.view(1), correct, seen, *flat]))
    loss_sum, correct, seen = totals[0], totals[1:3], totals[3]
    if multi_label:
        found = multilabel.metrics_over_ranks(kept)
        return {"loss": (loss_sum / seen).item(), **found, "images": int(seen)}
    acc1, acc5 = (correct / seen * 100).tolist()
    balanced = {} if confusion is None else class_balanced_metrics(totals[4:].view_as(confusion))
    loss = (loss_sum / seen).item()
    return {"loss": loss, "acc1": acc1, "acc5": acc5, **balanced, "images": int(seen)}


@dataclass(frozen=True)
class TrainerOptions:
    """conf/trainer's keys: how fit trains (README, "Training options"). A config's trainer keys
    are bound to these fields before anything is built (engine/checks.py)."""

    epochs: int
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 with a grad scaler)
    channels_last: bool = False
    compile: bool | str = False  # torch.compile the training model: True, or a mode
    cudnn_benchmark: bool = True
    accum_steps: int = 1  # batches per update
    clip_grad_norm: float | None = None
    log_every: int = 10  # updates between train/loss records
    limit_train_batches: int | None = None
    limit_val_batches: int | None = None
    ema_decay: float | None = None  # timm's ModelEmaV3, evaluated beside the model
    eval_hflip: bool = False
    max_bad_steps: int | None = 10  # None: no non-finite check (one host sync less per update)
    checkpoint_every_updates: int | None = None
    sync_bn: bool = False

    def __post_init__(self) -> None:
        # tools and tests call fit directly: a bad value fails before anything runs
        amp_dtype(self.precision)
        for key in ("accum_steps", "log_every", "max_bad_steps", "checkpoint_every_updates"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"trainer.{key}={value!r} must be an integer, 1 or more")

    def settings(self, loader_batches: int) -> StepSettings:
        limit = self.limit_train_batches
        return StepSettings(
            device=resolve_device(self.device),
            amp_dtype=amp_dtype(self.precision),
            channels_last=self.channels_last,
            accum_steps=self.accum_steps,
            clip_grad_norm=self.clip_grad_norm,
            log_every=self.log_every,
            num_batches=loader_batches if limit is None else min(limit, loader_batches),
        )


def fit(
    model: nn.Module,
    train_loader,
    val_loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    logger: RunLogger,
    saver: CheckpointSaver,
    *,
    seed: int = 0,
    num_classes: int | None = None,
    resume: dict | None = None,
    objective: Objective | None = None,
    **trainer,
) -> dict:
    """Train for trainer.epochs, evaluating and checkpointing after each; returns the final metrics.

    `trainer`: conf/trainer's keys (TrainerOptions). `objective` (engine/objective.py, the loss
    and mixup config): the losses and batch mixing; None: plain cross-entropy. `resume`: a loaded
    checkpoint; training goes on as if it had not stopped (exactly, on the CPU with
    num_workers=0). The saver's best_metric and best_mode choose best.pt. `num_classes` is taken
    for callers of before; the objective holds the class count now.
    """
    options = TrainerOptions(**trainer)
    run = options.settings(len(train_loader))
    # fixed input shapes: let cuDNN time its algorithms once and keep the fastest
    torch.backends.cudnn.benchmark = options.cudnn_benchmark
    objective = (objective or plain_cross_entropy()).to(run.device)
    if distributed.rank() > 0:
        # its own augmentation and mixup draws; the weights come from rank 0 (DDP broadcasts them)
        seed_everything(seed + distributed.rank())
    state = _start_state(model, optimizer, scheduler, saver, options, run, resume)
    net = _training_net(state, options, run.device)
    guard = Guard(state.model, options.max_bad_steps)
    checkpointer = Checkpointer(saver, guard, options.checkpoint_every_updates, run.num_batches)
    view = progress_bar() if distributed.is_main() else Progress(disable=True)
    with guard, view as progress:
        bar = progress.add_task("epochs", total=options.epochs, completed=state.epoch, metrics="")
        while state.epoch < options.epochs:
            seed_epoch(train_loader, seed, state.epoch)
            bad_before = skipped_images(train_loader.dataset)
            if state.start_epoch(run.device):  # a resumed epoch: its batches done are skipped
                skip_batches(train_loader, state.position.batches)
            t0 = time.perf_counter()
            args = (state, objective, guard, checkpointer, logger, progress, run)
            train = train_one_epoch(net, train_loader, *args)
            train_s = time.perf_counter() - t0
            bad_images = skipped_images(train_loader.dataset) - bad_before
            poll = partial(checkpointer.poll, state)  # a stop signal while evaluating
            val_options = (options.limit_val_batches, options.eval_hflip)
            vals, spent = validate(state, val_loader, objective, run, progress, poll, *val_options)
            metrics = _epoch_metrics(state.epoch, train, vals, bad_images, (t0, train_s, *spent))
            logger.log(metrics, step=state.step)
            is_best = state.finish_epoch(metrics, vals)
            _report(metrics, options.epochs, progress, bar)
            checkpointer.end_of_epoch(state, is_best)
    best = {f"best/{k}": v for k, v in state.best.items()}
    logger.summary(best)
    return {**state.metrics, **best, "step": state.step}


def _start_state(model, optimizer, scheduler, saver, options, run, resume) -> TrainingState:
    """The training state at the start: new, or loaded from the `resume` checkpoint."""
    layout = torch.channels_last if options.channels_last else torch.preserve_format
    model.to(run.device, memory_format=layout)
    # fp16 needs loss scaling; for fp32/bf16 the disabled scaler is a pass-through
    scaler = torch.amp.GradScaler(run.device.type, enabled=options.precision == "fp16")
    decay = options.ema_decay
    ema = ModelEmaV3(model, decay=decay) if decay is not None else None
    best = new_best(saver.best_metric, saver.best_mode)
    state = TrainingState(model, optimizer, scheduler, scaler, ema, best=best)
    if resume is not None:
        state.load_state_dict(resume)
        _log_resumed(state, run.num_batches)
    scheduler.step_update(num_updates=state.step)  # the LR of the next update
    return state


def _training_net(state: TrainingState, options: TrainerOptions, device) -> nn.Module:
    """What trains: the model in DistributedDataParallel under torchrun, compiled if asked."""
    net = distributed.data_parallel(state.model, device, options.sync_bn)
    state.model = distributed.unwrap(net)  # sync_bn: new modules around the same tensors
    if options.compile:
        net = torch.compile(net, mode=None if options.compile is True else options.compile)
    return net


def _log_resumed(state: TrainingState, num_batches: int) -> None:
    saved, within = state.resumed_position, ""
    if saved and saved["batches"] >= num_batches:
        # stopped during validation: the epoch's training is done, its validation is next
        within = f", all {saved['batches']} batches of the next done"
    elif saved:
        within = f", {saved['batches']} batches into the next"
    log.info("resumed after epoch %d (update %d)%s", state.epoch, state.step, within)


def validate(state, loader, objective, run, progress, poll, num_batches, hflip):
    """evaluate() the model and, with EMA, its average: ({"model": ..., "ema": ...}, (seconds,
    images evaluated over all processes))."""
    t0 = time.perf_counter()
    models = {"model": state.model}
    if state.ema is not None:
        models["ema"] = state.ema.module
    options = {"device": run.device, "amp_dtype": run.amp_dtype, "channels_last": run.channels_last}
    options["multi_label"] = is_multi_label(loader.dataset)
    vals = {
        name: evaluate(m, loader, objective.eval_loss, **options, num_batches=num_batches,
                       progress=progress, hflip=hflip, poll=poll)
        for name, m in models.items()
    }  # fmt: skip
    images = sum(v.pop("images") for v in vals.values())
    return vals, (time.perf_counter() - t0, images)


def _epoch_metrics(epoch: int, train: dict, vals: dict, bad_images: int, clock: tuple) -> dict:
    """The record of epoch `epoch + 1`: the keys metrics.jsonl, W&B and sweep.py read.

    `clock`: (the epoch's start, seconds training, seconds evaluating, images evaluated)."""
    t0, train_s, val_s, val_images = clock
    bad = distributed.sum_over_ranks(torch.tensor(float(bad_images)))
    return {
        "epoch": epoch + 1,
        # epoch means; train/loss alone is the per-update value logged every log_every
        **{f"train/epoch_{k}": train[k] for k in ("loss", "acc1")},
        "train/skipped_updates": train["skipped_updates"],
        # unreadable images replaced in this epoch (data.dataset.bad_images: skip)
        "train/skipped_images": int(bad.item()),
        **{f"val/{k}": v for k, v in vals["model"].items()},
        **{f"val_ema/{k}": v for k, v in vals.get("ema", {}).items()},
        "time/epoch_s": time.perf_counter() - t0,
        "time/train_s": train_s,
        "time/val_s": val_s,
        # all processes' images over the wall-clock time (see README, "Throughput")
        "time/train_images_per_s": train["images"] / train_s,
        "time/val_images_per_s": val_images / val_s,
    }


def _report(metrics: dict, epochs: int, progress, epochs_bar) -> None:
    """The epoch's log line and progress bar."""
    first, second = ("mAP", "OF1") if "val/mAP" in metrics else ("acc1", "acc5")  # multi-label
    log.info(
        "epoch %d/%d  train loss %.4f  val loss %.4f  %s %.2f  %s %.2f  "
        "(%.1fs; %.0f images/s train, %.0f images/s val)",
        metrics["epoch"],
        epochs,
        metrics["train/epoch_loss"],
        metrics["val/loss"],
        first,
        metrics.get(f"val/{first}", math.nan),
        second,
        metrics.get(f"val/{second}", math.nan),
        metrics["time/epoch_s"],
        metrics["time/train_images_per_s"],
        metrics["time/val_images_per_s"],
    )
    shown = metrics.get(f"val/{first}", math.nan)
    progress.update(epochs_bar, advance=1, metrics=f"val {first} {shown:.2f}")
