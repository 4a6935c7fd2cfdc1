"""The training loop: `train_one_epoch`, `evaluate`, and `fit` which alternates them.

Per-step values stay on the device and are read back (a host-device sync) only every
`log_every` updates and at the end of an epoch. Under torchrun the model is trained with
DistributedDataParallel (engine/distributed.py) and the metrics are sums and means over processes.
"""

import logging
import math
import time
from contextlib import nullcontext
from itertools import islice

import torch
from rich.progress import Progress
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn

from data.loaders import seed_epoch
from engine import distributed
from engine.checkpoint import CheckpointSaver
from engine.console import progress_bar
from engine.logger import RunLogger
from engine.metrics import correct_topk
from engine.rng import get_rng_state, seed_everything, set_rng_state

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
    mixup=None,
    ema=None,
) -> tuple[dict, int]:
    """One pass over `loader`; returns (epoch metrics, update count after the epoch).

    `model` may be wrapped in DistributedDataParallel. `mixup` (timm's Mixup) turns a batch's
    targets into soft targets; `ema` (timm's ModelEmaV3) follows the weights after every update.
    """
    model.train()
    task = progress.add_task("train", total=num_batches, metrics="")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    loss_sum = torch.zeros((), device=device)  # over the epoch
    window_loss, window_batches = torch.zeros((), device=device), 0  # since the last log
    correct = torch.zeros((), device=device)
    seen = 0
    optimizer.zero_grad(set_to_none=True)
    for i, (images, targets) in enumerate(islice(loader, num_batches)):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets)
        update = (i + 1) % accum_steps == 0 or i + 1 == num_batches
        # data-parallel: gradients are averaged over processes once per update, in its last backward
        with distributed.grad_sync(model, sync=update):
            with _autocast(device, amp_dtype):
                logits = model(images)
                loss = criterion(logits, targets)
            scaler.scale(loss / accum_steps).backward()
        loss = loss.detach()
        loss_sum += loss
        window_loss += loss
        window_batches += 1
        hard_targets = targets.argmax(1) if targets.ndim == 2 else targets  # soft after mixup
        correct += (logits.detach().argmax(1) == hard_targets).sum()
        seen += targets.shape[0]

        if update:
            # the base LR this update uses (read before stepping): groups may carry an lr_scale
            group = optimizer.param_groups[0]
            lr = group["lr"] / (group.get("lr_scale") or 1.0)
            if clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            scheduler.step_update(num_updates=step)
            if ema is not None:
                ema.update(distributed.unwrap(model), step=step)
            if step % log_every == 0:
                mean_loss = distributed.mean_over_ranks(window_loss / window_batches).item()
                logger.log({"train/loss": mean_loss, "train/lr": lr}, step=step)
                progress.update(task, metrics=f"loss {mean_loss:.4f}  lr {lr:.2e}")
                window_loss.zero_()
                window_batches = 0
        progress.advance(task)
    progress.remove_task(task)
    counts = torch.tensor([i + 1, seen], dtype=loss_sum.dtype, device=device)
    totals = distributed.sum_over_ranks(torch.stack([loss_sum, correct, *counts]))
    loss_sum, correct, batches, seen = totals  # over all processes' batches
    return {"loss": (loss_sum / batches).item(), "acc1": (correct / seen).item() * 100}, step


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
) -> dict:
    """Loss, top-1 and top-5 accuracy (%) of `model` over `loader`; data-parallel, over every
    process's share of the data."""
    model.eval()
    num_batches = len(loader) if num_batches is None else min(num_batches, len(loader))
    task = progress.add_task("val", total=num_batches, metrics="") if progress else None
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros(2, device=device)
    seen = 0
    for images, targets in islice(loader, num_batches):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            logits = model(images)
        loss_sum += criterion(logits.float(), targets) * targets.shape[0]
        num_classes = logits.shape[1]
        correct += correct_topk(logits, targets, (1, min(5, num_classes)))
        seen += targets.shape[0]
        if progress:
            progress.advance(task)
    if progress:
        progress.remove_task(task)
    seen = torch.tensor([seen], dtype=loss_sum.dtype, device=device)
    totals = distributed.sum_over_ranks(torch.cat([loss_sum.view(1), correct, seen]))
    loss_sum, correct, seen = totals[0], totals[1:3], totals[3]
    acc1, acc5 = (correct / seen * 100).tolist()
    return {"loss": (loss_sum / seen).item(), "acc1": acc1, "acc5": acc5}


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
    sync_bn: bool = False,
    num_classes: int | None = None,
    resume: dict | None = None,
) -> dict:
    """Train for `epochs`, evaluating and checkpointing after each; returns the final metrics.

    `ema_decay` keeps an exponential moving average of the weights (timm's ModelEmaV3), evaluated
    beside the model each epoch; "best" is the better of the two. `mixup_alpha` / `cutmix_alpha`
    > 0 mix batches (timm's Mixup, soft targets; label smoothing then happens inside it).
    `resume` is a loaded checkpoint: training continues after its epoch, with its model,
    optimizer, scheduler, grad-scaler, EMA and RNG states.

    Under torchrun the model trains in DistributedDataParallel (`sync_bn`: BatchNorm statistics
    over the global batch, CUDA only); metrics cover all processes; EMA and checkpoints hold the
    bare model, so a checkpoint loads in a single process.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision={precision!r}; choose one of {list(PRECISIONS)}")
    if accum_steps < 1:
        raise ValueError(f"trainer.accum_steps={accum_steps} must be 1 or more")
    if log_every < 1:
        raise ValueError(f"trainer.log_every={log_every} must be 1 or more")
    device = resolve_device(device)
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
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        if ema is not None:
            ema.module.load_state_dict(resume["ema"] if "ema" in resume else resume["model"])
        # each process continues its own random stream; one the checkpoint has none of keeps its seed
        rng = resume.get("rng_ranks") or [resume["rng"]]
        if distributed.rank() < len(rng):
            set_rng_state(rng[distributed.rank()])
        start_epoch, step, best = resume["epoch"], resume["step"], resume["best"]
        log.info("resumed after epoch %d (update %d)", start_epoch, step)
    scheduler.step_update(num_updates=step)
    net = distributed.data_parallel(model, device, sync_bn)
    model = distributed.unwrap(net)  # what EMA follows, evaluation runs and checkpoints hold

    metrics: dict = {}
    with progress_bar() if distributed.is_main() else Progress(disable=True) as progress:
        epoch_task = progress.add_task("epochs", total=epochs, completed=start_epoch, metrics="")
        for epoch in range(start_epoch, epochs):
            seed_epoch(train_loader, seed, epoch)
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
                mixup=mixup,
                ema=ema,
            )
            train_s = time.perf_counter() - t0
            evaluated = {"model": model, "ema": ema.module} if ema is not None else {"model": model}
            for module in evaluated.values():
                distributed.average_buffers(module)  # processes ran BatchNorm on their own batches
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
                )
                for name, m in evaluated.items()
            }
            val = vals["model"]
            metrics = {
                "epoch": epoch + 1,
                # epoch means; train/loss alone is the per-update value logged every log_every
                **{f"train/epoch_{k}": v for k, v in train.items()},
                **{f"val/{k}": v for k, v in val.items()},
                **{f"val_ema/{k}": v for k, v in vals.get("ema", {}).items()},
                "time/epoch_s": time.perf_counter() - t0,
                "time/train_s": train_s,
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
            rng = distributed.gather(get_rng_state())
            saver.save(  # rank 0 saves; the others' saver does nothing
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    **({"ema": ema.module.state_dict()} if ema is not None else {}),
                    "epoch": epoch + 1,
                    "step": step,
                    "best": best,
                    "metrics": metrics,
                    "rng": rng[0],
                    **({"rng_ranks": rng} if len(rng) > 1 else {}),
                },
                epoch=epoch + 1,
                is_best=is_best,
            )
            log.info(
                "epoch %d/%d  train loss %.4f  val loss %.4f  acc1 %.2f  acc5 %.2f  (%.1fs)",
                epoch + 1,
                epochs,
                train["loss"],
                val["loss"],
                val["acc1"],
                val["acc5"],
                metrics["time/epoch_s"],
            )
            progress.update(epoch_task, advance=1, metrics=f"val acc1 {val['acc1']:.2f}")
    logger.summary({f"best/{k}": v for k, v in best.items()})
    return {**metrics, **{f"best/{k}": v for k, v in best.items()}, "step": step}
