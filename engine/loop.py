"""The training loop: `train_one_epoch`, `evaluate`, and `fit` which alternates them.

Per-step values stay on the device and are read back (a host-device sync) only every
`log_every` updates and at the end of an epoch. Under torchrun the model is trained with
DistributedDataParallel (engine/distributed.py) and the metrics are sums and means over processes.
"""

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice

import torch
from rich.progress import Progress
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn

from data.images import skipped_images
from data.loaders import seed_epoch, skip_batches
from engine import distributed
from engine.checkpoint import CheckpointSaver
from engine.console import progress_bar
from engine.logger import RunLogger
from engine.metrics import correct_topk
from engine.rng import get_rng_state, seed_everything, set_rng_state
from engine.schedules import follow_config_on_resume
from engine.stop import StopSignals

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto`: CUDA, else MPS, else the CPU. Under torchrun, `cuda` is this process's GPU."""
    if str(device) != "auto":
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"trainer.device={str(device)!r} but CUDA is not available; use auto or cpu"
            )
        return distributed.local_device(device)
    if torch.cuda.is_available():
        return distributed.local_device(torch.device("cuda"))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _finite_or(value: float, default: float) -> float:
    return value if math.isfinite(value) else default


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


class Interrupted(Exception):
    """A stop signal arrived during evaluation (see engine/stop.py)."""


@dataclass
class EpochProgress:
    """Where training is inside an epoch: what a mid-epoch checkpoint stores to resume there.

    Sums stay on the device during the epoch (no host sync); `state()` reads them back.
    """

    loss_sum: torch.Tensor  # of batch-mean losses, over the batches of applied updates
    correct: torch.Tensor  # top-1 hits on the training batches (hard targets)
    window_loss: torch.Tensor  # loss sum since the last train/loss record
    batches: int = 0  # batches of this epoch consumed (skipped updates included)
    counted: int = 0  # batches in loss_sum
    seen: int = 0  # images in `correct`
    window_batches: int = 0
    skipped_updates: int = 0  # updates skipped for a non-finite loss or gradient

    @classmethod
    def start(cls, device: torch.device, saved: dict | None = None) -> "EpochProgress":
        saved = dict(saved or {})
        sums = {k: torch.tensor(saved.pop(k, 0.0), device=device) for k in cls.SUMS}
        return cls(**sums, **saved)

    SUMS = ("loss_sum", "correct", "window_loss")

    def state(self) -> dict:
        """Plain numbers (a host sync): a checkpoint loads them with weights_only=True."""
        return {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}


class UpdateCheck:
    """Whether an update may be applied: its loss and gradient are finite.

    A non-finite update is skipped: no optimizer, scheduler or EMA step, and the BatchNorm
    statistics its forward passes changed are put back, so the model is as it was. After
    `max_bad_steps` skipped updates in a row the run stops. One host sync per update, which
    also carries the stop-signal flag; `max_bad_steps=None` checks nothing and syncs nothing
    (in a single process). Data-parallel: the processes agree on both (one all-reduce).
    """

    def __init__(self, model: nn.Module, max_bad_steps: int | None, stop: StopSignals):
        self.enabled = max_bad_steps is not None
        self.max_bad_steps = max_bad_steps
        self.stop = stop
        self.in_a_row = 0
        self.buffers = list(model.buffers()) if self.enabled else []
        self.snapshot = [b.detach().clone() for b in self.buffers]

    def before_update(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.snapshot, self.buffers)

    def verdict(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, step: int):
        """(apply the update, stop signal number or 0), agreed by all processes."""
        stop = self.stop.requested or 0
        if not self.enabled and distributed.world_size() == 1:
            return True, stop
        bad = torch.zeros((), device=loss.device)
        if self.enabled:
            finite = torch.isfinite(loss)
            if grad_norm is not None:
                finite &= torch.isfinite(grad_norm)
            bad = (~finite).float()
        flags = torch.stack([bad, torch.tensor(float(stop), device=loss.device)])
        bad, stop = distributed.max_over_ranks(flags).tolist()  # the host sync
        stop = int(stop)
        if not bad:
            self.in_a_row = 0
            return True, stop
        self.in_a_row += 1
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.snapshot)
        log.warning(
            "update %d skipped: non-finite loss or gradient (%d in a row)", step + 1, self.in_a_row
        )
        if self.in_a_row >= self.max_bad_steps:
            raise FloatingPointError(
                f"{self.in_a_row} updates in a row had a non-finite loss or gradient (the last "
                f"would have been update {step + 1}); stopping. The checkpoints hold the last "
                "good weights. Lower optim.lr, set trainer.clip_grad_norm (e.g. 1.0), use "
                "trainer.precision=bf16 instead of fp16, or check the data for NaN; "
                f"trainer.max_bad_steps={self.max_bad_steps} is the limit"
            )
        return False, stop


def train_one_epoch(
    model,
    loader,
    optimizer,
    scheduler,
    scaler,
    criterion,
    logger,
    progress,
    *,
    step,
    device,
    amp_dtype,
    channels_last,
    accum_steps,
    clip_grad_norm,
    log_every,
    num_batches,
    check,
    position,
    on_update=None,
    mixup=None,
    ema=None,
) -> tuple[dict, int]:
    """One pass over `loader`; returns (epoch metrics, update count after the epoch).

    `model` may be wrapped in DistributedDataParallel. `check` (UpdateCheck) skips non-finite
    updates; `position` (EpochProgress) is where the epoch stands, after the batches the loader
    was told to skip on resume; `on_update(step, position, stop)` runs after every update (the
    mid-epoch checkpoint). `mixup` (timm's Mixup) turns a batch's targets into soft targets;
    `ema` (timm's ModelEmaV3) follows the weights after every update.
    """
    model.train()
    # images per batch over all processes: the bar's images/s (engine/console.py)
    per_batch = {"images_per_batch": (loader.batch_size or 0) * distributed.world_size()}
    task = progress.add_task(
        "train", total=num_batches, completed=position.batches, metrics="", **per_batch
    )
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    params = [p for p in model.parameters() if p.requires_grad]
    update_loss = torch.zeros((), device=device)  # over the batches of one update
    update_correct = torch.zeros((), device=device)
    update_batches = update_seen = 0
    images_read = 0  # by this call (a resumed epoch's earlier batches not included): images/s
    optimizer.zero_grad(set_to_none=True)
    batches = islice(loader, num_batches - position.batches)
    for i, (images, targets) in enumerate(batches, start=position.batches):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets)
        if update_batches == 0:
            check.before_update()
        update = (i + 1) % accum_steps == 0 or i + 1 == num_batches
        # data-parallel: gradients are averaged over processes once per update, in its last backward
        with distributed.grad_sync(model, sync=update):
            with _autocast(device, amp_dtype):
                logits = model(images)
                loss = criterion(logits, targets)
            scaler.scale(loss / accum_steps).backward()
        update_loss += loss.detach()
        hard_targets = targets.argmax(1) if targets.ndim == 2 else targets  # soft after mixup
        update_correct += (logits.detach().argmax(1) == hard_targets).sum()
        update_batches += 1
        update_seen += targets.shape[0]
        images_read += targets.shape[0]  # a shape: known on the host, no sync

        if update:
            # the base LR this update uses (read before stepping): groups may carry an lr_scale
            group = optimizer.param_groups[0]
            lr = group["lr"] / (group.get("lr_scale") or 1.0)
            grad_norm = None
            if clip_grad_norm is not None or check.enabled:
                scaler.unscale_(optimizer)
                if clip_grad_norm is not None:
                    grad_norm = nn.utils.clip_grad_norm_(params, clip_grad_norm)
                elif not scaler.is_enabled():  # fp16: overflow is the grad scaler's business
                    grad_norm = nn.utils.get_total_norm(
                        [p.grad for p in params if p.grad is not None]
                    )
            apply, stop = check.verdict(update_loss, grad_norm, step)
            if apply:
                scaler.step(optimizer)
                step += 1
                scheduler.step_update(num_updates=step)
                if ema is not None:
                    ema.update(distributed.unwrap(model), step=step)
                position.loss_sum += update_loss
                position.window_loss += update_loss
                position.correct += update_correct
                position.counted += update_batches
                position.window_batches += update_batches
                position.seen += update_seen
            else:
                position.skipped_updates += 1
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            position.batches = i + 1
            update_loss.zero_()
            update_correct.zero_()
            update_batches = update_seen = 0
            if apply and step % log_every == 0 and position.window_batches:
                window = position.window_loss / position.window_batches
                mean_loss = distributed.mean_over_ranks(window).item()
                logger.log({"train/loss": mean_loss, "train/lr": lr}, step=step)
                progress.update(task, metrics=f"loss {mean_loss:.4f}  lr {lr:.2e}")
                position.window_loss.zero_()
                position.window_batches = 0
            if on_update is not None:
                on_update(step, position, stop)
        progress.advance(task)
    progress.remove_task(task)
    counts = [position.counted, position.seen, position.skipped_updates, images_read]
    counts = torch.tensor(counts, dtype=position.loss_sum.dtype, device=device)
    totals = distributed.sum_over_ranks(torch.stack([position.loss_sum, position.correct, *counts]))
    loss_sum, correct, counted, seen, skipped, read = totals.tolist()  # over all processes
    metrics = {
        "loss": loss_sum / counted if counted else math.nan,
        "acc1": correct / seen * 100 if seen else math.nan,
        "skipped_updates": int(skipped / distributed.world_size()),  # the same on every process
        "images": int(read),
    }
    return metrics, step


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
    stop=None,
) -> dict:
    """Loss, top-1 and top-5 accuracy (%) of `model` over `loader`; data-parallel, over every
    process's share of the data.

    `hflip`: test-time augmentation, the mean of the logits of each image and its mirror image.
    `stop()` is asked after every batch; when true, evaluation ends by raising Interrupted.
    """
    model.eval()
    num_batches = len(loader) if num_batches is None else min(num_batches, len(loader))
    per_batch = (loader.batch_size or 0) * distributed.world_size()
    task = (
        progress.add_task("val", total=num_batches, metrics="", images_per_batch=per_batch)
        if progress
        else None
    )
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros(2, device=device)
    seen = 0
    for images, targets in islice(loader, num_batches):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            logits = model(images)
            if hflip:
                logits = (logits + model(images.flip(-1))) / 2
        loss_sum += criterion(logits.float(), targets) * targets.shape[0]
        num_classes = logits.shape[1]
        correct += correct_topk(logits, targets, (1, min(5, num_classes)))
        seen += targets.shape[0]
        if progress:
            progress.advance(task)
        if stop is not None and stop():
            if progress:
                progress.remove_task(task)
            raise Interrupted
    if progress:
        progress.remove_task(task)
    seen = torch.tensor([seen], dtype=loss_sum.dtype, device=device)
    totals = distributed.sum_over_ranks(torch.cat([loss_sum.view(1), correct, seen]))
    loss_sum, correct, seen = totals[0], totals[1:3], totals[3]
    acc1, acc5 = (correct / seen * 100).tolist()
    return {"loss": (loss_sum / seen).item(), "acc1": acc1, "acc5": acc5, "images": int(seen)}


def fit(
    model: nn.Module,
    train_loader,
    val_loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    logger: RunLogger,
    saver: CheckpointSaver,
    *,
    epochs: int,
    seed: int = 0,
    device: str = "auto",
    precision: str = "fp32",
    channels_last: bool = False,
    compile: bool | str = False,
    cudnn_benchmark: bool = True,
    accum_steps: int = 1,
    clip_grad_norm: float | None = None,
    label_smoothing: float = 0.0,
    log_every: int = 10,
    limit_train_batches: int | None = None,
    limit_val_batches: int | None = None,
    ema_decay: float | None = None,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    mixup_prob: float = 1.0,
    mixup_switch_prob: float = 0.5,
    eval_hflip: bool = False,
    max_bad_steps: int | None = 10,
    checkpoint_every_updates: int | None = None,
    sync_bn: bool = False,
    num_classes: int | None = None,
    resume: dict | None = None,
) -> dict:
    """Train for `epochs`, evaluating and checkpointing after each; returns the final metrics.

    `ema_decay` keeps an exponential moving average of the weights (timm's ModelEmaV3), evaluated
    beside the model each epoch; "best" is the better of the two. `mixup_alpha` / `cutmix_alpha`
    > 0 mix batches (timm's Mixup, soft targets; label smoothing then happens inside it).
    `compile`: torch.compile the training model (True, or a mode such as "max-autotune").
    `max_bad_steps`: updates with a non-finite loss or gradient are skipped, and this many in a
    row stop the run (None: no check). `checkpoint_every_updates`: also save mid-epoch; a resumed
    run continues from that batch. SIGTERM / SIGUSR1 / SIGUSR2 save such a checkpoint at the
    next update and stop the run (engine/stop.py).
    `resume` is a loaded checkpoint: training continues where it was saved, with its model,
    optimizer, scheduler, grad-scaler, EMA and RNG states; on CPU with num_workers=0 (or a
    device-resident loader) exactly as if it had not stopped.

    Under torchrun the model trains in DistributedDataParallel (`sync_bn`: BatchNorm statistics
    over the global batch, CUDA only); metrics cover all processes; EMA and checkpoints hold the
    bare model, so a checkpoint loads in a single process.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision={precision!r}; choose one of {list(PRECISIONS)}")
    for key, value, least in (
        ("accum_steps", accum_steps, 1),
        ("log_every", log_every, 1),
        ("max_bad_steps", max_bad_steps, 1),
        ("checkpoint_every_updates", checkpoint_every_updates, 1),
    ):
        if value is not None and (not isinstance(value, int) or value < least):
            raise ValueError(f"trainer.{key}={value!r} must be an integer, {least} or more")
    device = resolve_device(device)
    torch.backends.cudnn.benchmark = cudnn_benchmark  # fastest conv algorithms for fixed shapes
    amp_dtype = PRECISIONS[precision]
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    # fp16 needs loss scaling; for fp32/bf16 the disabled scaler is a pass-through
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    eval_criterion = nn.CrossEntropyLoss()
    mixup = None
    if mixup_alpha > 0 or cutmix_alpha > 0:
        if num_classes is None:
            raise ValueError("mixup / cutmix need num_classes for their soft targets")
        if train_loader.batch_size % 2:
            raise ValueError(
                f"mixup / cutmix mix a batch with its mirror and need an even batch size; "
                f"data.batch_size={train_loader.batch_size}"
            )
        mixup = Mixup(
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            prob=mixup_prob,
            switch_prob=mixup_switch_prob,
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )
        criterion = SoftTargetCrossEntropy()
    ema = ModelEmaV3(model, decay=ema_decay) if ema_decay is not None else None
    train_batches = (
        len(train_loader)
        if limit_train_batches is None
        else min(limit_train_batches, len(train_loader))
    )

    if distributed.rank() > 0:
        # its own augmentation and mixup draws; the weights come from rank 0 (DDP broadcasts them)
        seed_everything(seed + distributed.rank())
    start_epoch, step, best = 0, 0, {"val/acc1": -math.inf, "epoch": None}
    saved_position = None  # where in its epoch a mid-epoch checkpoint was written
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        follow_config_on_resume(scheduler, resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        if ema is not None:
            ema.module.load_state_dict(resume["ema"] if "ema" in resume else resume["model"])
        # each process continues its own random stream; one the checkpoint has none of keeps its seed
        rng = resume.get("rng_ranks") or [resume["rng"]]
        if distributed.rank() < len(rng):
            set_rng_state(rng[distributed.rank()])
        start_epoch, step, best = resume["epoch"], resume["step"], resume["best"]
        positions = resume.get("position_ranks") or [resume.get("position")]
        saved_position = positions[min(distributed.rank(), len(positions) - 1)]
        within = ""
        if saved_position and saved_position["batches"] >= train_batches:
            # stopped during validation: the epoch's training is done, its validation is next
            within = f", all {saved_position['batches']} batches of the next done"
        elif saved_position:
            within = f", {saved_position['batches']} batches into the next"
        log.info("resumed after epoch %d (update %d)%s", start_epoch, step, within)
    scheduler.step_update(num_updates=step)
    net = distributed.data_parallel(model, device, sync_bn)
    model = distributed.unwrap(net)  # what EMA follows, evaluation runs and checkpoints hold
    if compile:
        net = torch.compile(net, mode=None if compile is True else compile)

    def save(epoch: int, is_best: bool, metrics: dict, position: EpochProgress | None = None):
        """The training state after `epoch` epochs (and `position` into the next)."""
        rng = distributed.gather(get_rng_state())
        where = distributed.gather(position.state()) if position is not None else []
        saver.save(  # rank 0 saves; the others' saver does nothing
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                **({"ema": ema.module.state_dict()} if ema is not None else {}),
                "epoch": epoch,
                "step": step,
                "best": best,
                "metrics": metrics,
                "rng": rng[0],
                **({"rng_ranks": rng} if len(rng) > 1 else {}),
                **({"position": where[0]} if where else {}),
                **({"position_ranks": where} if len(where) > 1 else {}),
            },
            epoch=epoch,
            is_best=is_best,
            batches=position.batches if position is not None else None,
        )

    def after_update(step_now: int, position: EpochProgress, stop: int) -> None:
        """Mid-epoch: a checkpoint every `checkpoint_every_updates`, and on a stop signal (its
        number, agreed by the processes; 0: none)."""
        nonlocal step
        # a skipped update (non-finite loss) leaves the step where it was: the file of this
        # step is already written, and training has not advanced since
        advanced, step = step_now > step, step_now
        every = checkpoint_every_updates
        periodic = advanced and every is not None and step % every == 0
        if position.batches == train_batches:
            # the epoch's last update: the processes ran BatchNorm on their own batches; average
            # the statistics now, before a checkpoint of this point (a stop here or during
            # validation) keeps only process 0's
            for module in evaluated.values():
                distributed.average_buffers(module)
        if stop or (periodic and position.batches < train_batches):
            save(epoch, is_best=False, metrics=metrics, position=position)
        if stop:
            stopper.after_checkpoint(stop)

    metrics: dict = {}
    epoch = start_epoch
    evaluated = {"model": model, "ema": ema.module} if ema is not None else {"model": model}
    stopper = StopSignals()
    check = UpdateCheck(model, max_bad_steps, stopper)
    progress_view = progress_bar() if distributed.is_main() else Progress(disable=True)
    with stopper, progress_view as progress:
        epoch_task = progress.add_task("epochs", total=epochs, completed=start_epoch, metrics="")
        for epoch in range(start_epoch, epochs):
            seed_epoch(train_loader, seed, epoch)
            bad_before = skipped_images(train_loader.dataset)
            position = EpochProgress.start(device, saved_position)
            if saved_position:
                skip_batches(train_loader, position.batches)
                saved_position = None
            t0 = time.perf_counter()
            train, step = train_one_epoch(
                net,
                train_loader,
                optimizer,
                scheduler,
                scaler,
                criterion,
                logger,
                progress,
                step=step,
                device=device,
                amp_dtype=amp_dtype,
                channels_last=channels_last,
                accum_steps=accum_steps,
                clip_grad_norm=clip_grad_norm,
                log_every=log_every,
                num_batches=train_batches,
                check=check,
                position=position,
                on_update=after_update,
                mixup=mixup,
                ema=ema,
            )
            train_s = time.perf_counter() - t0
            bad_images = torch.tensor(float(skipped_images(train_loader.dataset) - bad_before))
            # a stop signal during evaluation: save where training stands (the epoch's batches
            # done, not yet evaluated) and stop; one process alone can stop between batches
            asked = (
                (lambda: stopper.requested is not None) if distributed.world_size() == 1 else None
            )
            t_val = time.perf_counter()
            while True:
                try:
                    vals = {
                        name: evaluate(
                            m,
                            val_loader,
                            eval_criterion,
                            device=device,
                            amp_dtype=amp_dtype,
                            channels_last=channels_last,
                            num_batches=limit_val_batches,
                            progress=progress,
                            hflip=eval_hflip,
                            stop=asked,
                        )
                        for name, m in evaluated.items()
                    }
                    break
                except Interrupted:
                    save(epoch, is_best=False, metrics=metrics, position=position)
                    # exits, unless an earlier handler lets it go on
                    stopper.after_checkpoint(stopper.requested)
            val_s = time.perf_counter() - t_val
            # images evaluated (the model's, and the EMA's too) over all processes
            val_images = sum(v.pop("images") for v in vals.values())
            val = vals["model"]
            metrics = {
                "epoch": epoch + 1,
                # epoch means; train/loss alone is the per-update value logged every log_every
                **{f"train/epoch_{k}": train[k] for k in ("loss", "acc1")},
                "train/skipped_updates": train["skipped_updates"],
                # unreadable images replaced in this epoch (data.dataset.bad_images: skip)
                "train/skipped_images": int(distributed.sum_over_ranks(bad_images).item()),
                **{f"val/{k}": v for k, v in val.items()},
                **{f"val_ema/{k}": v for k, v in vals.get("ema", {}).items()},
                "time/epoch_s": time.perf_counter() - t0,
                "time/train_s": train_s,
                "time/val_s": val_s,
                # all processes' images over the wall-clock time (see README, "Throughput")
                "time/train_images_per_s": train["images"] / train_s,
                "time/val_images_per_s": val_images / val_s,
            }
            logger.log(metrics, step=step)
            # the better of model and EMA; a NaN accuracy never wins
            source, top = max(vals.items(), key=lambda kv: _finite_or(kv[1]["acc1"], -math.inf))
            is_best = math.isfinite(top["acc1"]) and top["acc1"] > best["val/acc1"]
            if is_best:
                best = {
                    "val/acc1": top["acc1"],
                    "val/acc5": top["acc5"],
                    "val/loss": top["loss"],
                    "epoch": epoch + 1,
                    "source": source,
                }
            save(epoch + 1, is_best=is_best, metrics=metrics)
            log.info(
                "epoch %d/%d  train loss %.4f  val loss %.4f  acc1 %.2f  acc5 %.2f  "
                "(%.1fs; %.0f images/s train, %.0f images/s val)",
                epoch + 1,
                epochs,
                train["loss"],
                val["loss"],
                val["acc1"],
                val["acc5"],
                metrics["time/epoch_s"],
                metrics["time/train_images_per_s"],
                metrics["time/val_images_per_s"],
            )
            progress.update(epoch_task, advance=1, metrics=f"val acc1 {val['acc1']:.2f}")
            # a signal that arrived after the epoch's last update: saved just now (the
            # all-reduce also waits for process 0's checkpoint)
            signum = int(distributed.max_over_ranks(torch.tensor(stopper.requested or 0)))
            if signum:
                stopper.after_checkpoint(signum)
    logger.summary({f"best/{k}": v for k, v in best.items()})
    return {**metrics, **{f"best/{k}": v for k, v in best.items()}, "step": step}
