"""The training state: everything a checkpoint holds, and the one place its schema is written.

`TrainingState.state_dict()` is what engine/checkpoint.py saves; `load_state_dict()` reads it
back, from this engine's checkpoints and from those of earlier ones (tests/fixtures/).
"""

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from engine import distributed
from engine.rng import get_rng_state, set_rng_state
from engine.schedules import follow_config_on_resume

log = logging.getLogger(__name__)

# checkpoint.best_mode -> the value a best record starts from (anything finite beats it)
BEST_MODES = {"max": -math.inf, "min": math.inf}


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

    SUMS = ("loss_sum", "correct", "window_loss")

    @classmethod
    def start(cls, device: torch.device, saved: dict | None = None) -> "EpochProgress":
        saved = dict(saved or {})
        sums = {k: torch.tensor(saved.pop(k, 0.0), device=device) for k in cls.SUMS}
        return cls(**sums, **saved)

    def add(self, loss: torch.Tensor, correct: torch.Tensor, batches: int, seen: int) -> None:
        """An applied update's sums (over its batches); still on the device."""
        self.loss_sum += loss
        self.window_loss += loss
        self.correct += correct
        self.counted += batches
        self.window_batches += batches
        self.seen += seen

    def state(self) -> dict:
        """Plain numbers (a host sync): a checkpoint loads them with weights_only=True."""
        return {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}


def new_best(metric: str = "val/acc1", mode: str = "max") -> dict:
    """The best record before any epoch: the metric that chooses it, its direction, no epoch."""
    return {metric: BEST_MODES[mode], "epoch": None, "metric": metric, "mode": mode}


@dataclass
class TrainingState:
    """Model, optimizer, scheduler, grad scaler, EMA, epochs done, update step, best record,
    position in the current epoch, and the last epoch's metrics.

    `model` is the bare model (not the DistributedDataParallel or compiled wrapper): what EMA
    follows, evaluation runs and checkpoints hold, so a checkpoint loads in one process.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    ema: nn.Module | None = None  # timm's ModelEmaV3
    epoch: int = 0  # epochs done
    step: int = 0  # updates applied
    best: dict = field(default_factory=new_best)
    metrics: dict = field(default_factory=dict)  # the last epoch's
    position: EpochProgress | None = None  # set while an epoch runs
    resumed_position: dict | None = None  # a mid-epoch checkpoint's, until its epoch starts

    def state_dict(self) -> dict:
        """The checkpoint's training entries (rank 0 saves them; every process must call this:
        the RNG states and positions of all processes are gathered)."""
        rng = distributed.gather(get_rng_state())
        where = distributed.gather(self.position.state()) if self.position is not None else []
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            **({"ema": self.ema.module.state_dict()} if self.ema is not None else {}),
            "epoch": self.epoch,
            "step": self.step,
            "best": self.best,
            "metrics": self.metrics,
            "rng": rng[0],
            **({"rng_ranks": rng} if len(rng) > 1 else {}),
            **({"position": where[0]} if where else {}),
            **({"position_ranks": where} if len(where) > 1 else {}),
        }

    def load_state_dict(self, saved: dict) -> None:
        """Continue from a checkpoint (of this engine or an earlier one): training goes on where
        it was saved. The LR schedule follows this run's config (engine/schedules.py)."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        follow_config_on_resume(self.scheduler, saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        if self.ema is not None:  # a run that turns EMA on when resumed starts it from the weights
            self.ema.module.load_state_dict(saved.get("ema", saved["model"]))
        # each process continues its own random stream; one the checkpoint has none of keeps its seed
        rng = saved.get("rng_ranks") or [saved["rng"]]
        if distributed.rank() < len(rng):
            set_rng_state(rng[distributed.rank()])
        self.epoch, self.step, self.metrics = (
            saved["epoch"],
            saved["step"],
            saved.get("metrics", {}),
        )
        self.best = self._saved_best(saved["best"])
        positions = saved.get("position_ranks") or [saved.get("position")]
        self.resumed_position = positions[min(distributed.rank(), len(positions) - 1)]

    def _saved_best(self, saved: dict) -> dict:
        """The saved best record under this run's metric and direction. Checkpoints before
        checkpoint.best_metric have none named: theirs is val/acc1, max."""
        saved = {"metric": "val/acc1", "mode": "max", **saved}
        metric, mode = self.best["metric"], self.best["mode"]
        if (saved["metric"], saved["mode"]) == (metric, mode):
            return saved
        log.warning(
            "resume: best was chosen by %s (%s); this run chooses it by %s (%s), from the next "
            "epoch on",
            saved["metric"],
            saved["mode"],
            metric,
            mode,
        )
        return {**saved, **new_best(metric, mode), "epoch": saved["epoch"]}

    def start_epoch(self, device: torch.device) -> int:
        """Begin the next epoch, or continue a saved one: the batches already done in it."""
        self.position = EpochProgress.start(device, self.resumed_position)
        self.resumed_position = None
        return self.position.batches

    def finish_epoch(self, metrics: dict, vals: dict[str, dict]) -> bool:
        """One more epoch done, with these metrics; whether it is the best so far.

        `vals`: evaluate()'s results by source (model, ema); the best record takes the better
        source by the best metric. A NaN never wins.
        """
        self.epoch, self.metrics, self.position = self.epoch + 1, metrics, None
        metric, mode = self.best["metric"], self.best["mode"]
        key = metric.split("/", 1)[1]  # val/acc1 -> evaluate()'s acc1
        pick = max if mode == "max" else min
        finite = {name: v for name, v in vals.items() if math.isfinite(v[key])}
        if not finite:
            return False
        source, top = pick(finite.items(), key=lambda kv: kv[1][key])
        value, before = top[key], self.best[metric]
        if not (value > before if mode == "max" else value < before):
            return False
        self.best = {
            **{f"val/{k}": v for k, v in top.items()},  # acc1, acc5, loss, macro_f1, ...
            "epoch": self.epoch,
            "source": source,
            "metric": metric,
            "mode": mode,
        }
        return True

    def average_buffers(self) -> None:
        """Data-parallel, after an epoch's last update: each process ran BatchNorm on its own
        batches; average the statistics before a checkpoint of this point keeps rank 0's alone."""
        distributed.average_buffers(self.model)
        if self.ema is not None:
            distributed.average_buffers(self.ema.module)
