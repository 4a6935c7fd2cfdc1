"""The loop's options do what their names say, on a model small enough to reason about."""

import math
import re

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import TensorDataset

from data import Splits
from data.loaders import make_loaders
from engine.checkpoint import CheckpointSaver
from engine.logger import RunLogger
from engine.loop import fit
from engine.objective import build_objective
from engine.schedules import cosine
from tests.helpers import TINY, read_jsonl, records_of, run_py, wandb_records, wandb_runs
from tests.test_config import composed


def train(tmp_path, *, batch_size, limit_train_batches, lr=0.5, images=False, loss=(), **trainer):
    """One epoch of a linear model (or, with `images`, a small conv net) on random data.

    `loss`: overrides of conf/'s loss and mixup keys: the objective is built as run.py builds it.
    """
    torch.manual_seed(0)
    shape = (3, 8, 8) if images else (4,)
    data = Splits(
        train=TensorDataset(torch.randn(64, *shape), torch.randint(0, 3, (64,))),
        val=TensorDataset(torch.randn(16, *shape), torch.randint(0, 3, (16,))),
        classes=["a", "b", "c"],
        in_chans=shape[0],
    )
    if images:
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 3),
        )
    else:
        model = nn.Linear(4, 3)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    train_loader, val_loader = make_loaders(data, batch_size=batch_size)
    scheduler = cosine(optimizer, total_steps=100, steps_per_epoch=1, warmup_lr=lr)
    with RunLogger(tmp_path, config={}) as logger:
        fit(
            model,
            train_loader,
            val_loader,
            optimizer,
            scheduler,
            logger,
            CheckpointSaver(tmp_path / "checkpoints", metadata={"config": {}}),
            epochs=1,
            device="cpu",
            num_classes=3,
            log_every=1,
            limit_train_batches=limit_train_batches,
            objective=build_objective(
                composed(*loss), data.train, num_classes=3, batch_size=batch_size
            ),
            **trainer,
        )
    return model, read_jsonl(tmp_path), initial


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    big, _, _ = train(tmp_path / "big", batch_size=16, limit_train_batches=1)
    accumulated, records, _ = train(
        tmp_path / "acc", batch_size=8, limit_train_batches=2, accum_steps=2
    )
    assert torch.allclose(big.weight, accumulated.weight, atol=1e-6)
    epoch = next(r for r in records if "epoch" in r)
    assert epoch["step"] == 1  # two batches, one update


def test_gradient_clipping_bounds_the_update(tmp_path):
    clipped, _, before = train(
        tmp_path, batch_size=16, limit_train_batches=1, lr=1.0, clip_grad_norm=1e-3
    )
    change = torch.cat([(clipped.state_dict()[k] - before[k]).flatten() for k in before])
    assert change.norm() <= 1e-3 * 1.0001  # SGD step = lr * clipped gradient


@pytest.mark.parametrize(
    "options",
    [
        {"precision": "bf16", "images": True},
        {"precision": "fp16", "images": True},
        {"channels_last": True, "images": True},
    ],
    ids=["bf16", "fp16", "channels_last"],
)
def test_precision_and_memory_format_options_train_on_cpu(tmp_path, options):
    _, records, _ = train(tmp_path, batch_size=16, limit_train_batches=2, **options)
    epoch = next(r for r in records if "epoch" in r)
    assert torch.isfinite(torch.tensor(epoch["train/epoch_loss"]))


def test_label_smoothing_raises_the_loss_of_confident_predictions(tmp_path):
    _, plain, _ = train(tmp_path / "plain", batch_size=16, limit_train_batches=1, lr=0.0)
    _, smooth, _ = train(
        tmp_path / "smooth",
        batch_size=16,
        limit_train_batches=1,
        lr=0.0,
        loss=["loss.label_smoothing=0.5"],
    )
    # same weights (lr 0), same batch: only the target distribution differs
    assert plain[0]["train/loss"] != smooth[0]["train/loss"]


def test_crashed_run_closes_its_wandb_run_as_failed(tmp_path):
    proc = run_py(
        *TINY,
        # the first update makes the weights huge, the second loss is not finite: a stop inside
        # fit, after the W&B run started (a bad value would fail before anything starts)
        "optim.lr=1e30",
        "trainer.max_bad_steps=1",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert "FloatingPointError: 1 updates in a row had a non-finite loss" in proc.stderr
    (offline_run,) = wandb_runs(tmp_path / "run")
    assert records_of(wandb_records(offline_run), "exit")[0]["exit_code"] == 1


def test_logger_none_and_wandb_mode_disabled_write_no_wandb_run(tmp_path, monkeypatch):
    run_py(
        *TINY, "trainer.epochs=1", "logger=none", f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path
    )
    # WANDB_MODE=disabled reaches wandb.init through the composed logger config
    monkeypatch.setenv("WANDB_MODE", "disabled")
    wandb_init = OmegaConf.to_container(composed().logger.wandb, resolve=True)
    with RunLogger(tmp_path / "b", config={}, wandb_init=wandb_init) as logger:
        logger.log({"val/acc1": 50.0}, step=1)
    for name in "ab":
        assert not wandb_runs(tmp_path / name)
        assert any("val/acc1" in r for r in read_jsonl(tmp_path / name))


def test_ema_is_evaluated_beside_the_model_and_best_takes_the_better(tmp_path):
    model, records, _ = train(tmp_path, batch_size=8, limit_train_batches=4, ema_decay=0.5)
    epoch = next(r for r in records if "epoch" in r)
    assert {"val_ema/acc1", "val_ema/acc5", "val_ema/loss"} <= epoch.keys()
    best = next(r["summary"] for r in records if "summary" in r)
    assert best["best/val/acc1"] == max(epoch["val/acc1"], epoch["val_ema/acc1"])
    assert best["best/source"] in {"model", "ema"}
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    # decay 0.5 over 4 updates: the average lags the weights
    assert not torch.equal(ckpt["ema"]["weight"], ckpt["model"]["weight"])
    assert torch.equal(ckpt["model"]["weight"], model.weight.detach())


def test_mixup_trains_on_soft_targets(tmp_path):
    _, plain, _ = train(tmp_path / "plain", batch_size=16, limit_train_batches=1, lr=0.0)
    _, mixed, _ = train(
        tmp_path / "mixed",
        batch_size=16,
        limit_train_batches=1,
        lr=0.0,
        loss=["mixup.mixup_alpha=1.0"],
    )
    # same weights (lr 0) and batch: only the mixing changes the loss
    assert plain[0]["train/loss"] != mixed[0]["train/loss"]
    with pytest.raises(ValueError, match=r"even batch size; data\.batch_size=15"):
        train(
            tmp_path / "odd", batch_size=15, limit_train_batches=1, loss=["mixup.mixup_alpha=1.0"]
        )


@pytest.mark.parametrize("metric, mode", [("val/loss", "min"), ("val/acc1", "max")])
def test_best_follows_the_configured_metric_and_direction(tmp_path, metric, mode):
    torch.manual_seed(0)
    data = Splits(
        train=TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,))),
        val=TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,))),
        classes=["a", "b", "c"],
        in_chans=4,
    )
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)  # large: val/loss goes up and down
    train_loader, val_loader = make_loaders(data, batch_size=8)
    scheduler = cosine(optimizer, total_steps=40, steps_per_epoch=8, warmup_lr=2.0)
    best = {"best_metric": metric, "best_mode": mode}
    saver = CheckpointSaver(tmp_path / "checkpoints", metadata={"config": {}}, **best)
    with RunLogger(tmp_path, config={}) as logger:
        result = fit(
            model, train_loader, val_loader, optimizer, scheduler, logger, saver,
            epochs=5, device="cpu",
        )  # fmt: skip
    epochs = [r for r in read_jsonl(tmp_path) if "epoch" in r]
    pick = min if mode == "min" else max
    chosen = pick(epochs, key=lambda r: r[metric])  # the first of equals, as fit keeps it
    assert result["best/epoch"] == chosen["epoch"] and result[f"best/{metric}"] == chosen[metric]
    assert (result["best/metric"], result["best/mode"]) == (metric, mode)
    saved = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert saved["epoch"] == chosen["epoch"] and saved["best"]["metric"] == metric


@pytest.mark.parametrize(
    "override, message",
    [
        ("checkpoint.best_mode=lowest", "checkpoint.best_mode='lowest' must be one of max, min"),
        ("checkpoint.best_metric=val/acc", "checkpoint.best_metric='val/acc' must be one of val/"),
    ],
)
def test_a_bad_best_metric_or_direction_is_refused_before_anything_is_built(override, message):
    from engine.checks import check_config

    with pytest.raises(ValueError, match=re.escape(message)):
        check_config(composed(override))
    with pytest.raises(ValueError, match=r"checkpoint\.best_mode='up' must be max or min"):
        CheckpointSaver("unused", best_mode="up")


def test_an_update_reads_the_device_back_once(tmp_path, monkeypatch):
    """The guard's verdict (non-finite check and stop signal) is the update's one host sync:
    twice the updates, exactly one more read-back each (the epoch's own syncs are the same)."""
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads.append(1)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def syncs(updates: int) -> int:
        torch.manual_seed(0)
        data = Splits(
            train=TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,))),
            val=TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,))),
            classes=["a", "b", "c"],
            in_chans=4,
        )
        model = nn.Linear(4, 3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        train_loader, val_loader = make_loaders(data, batch_size=4)
        scheduler = cosine(optimizer, total_steps=16, steps_per_epoch=16)
        folder = tmp_path / str(updates)
        saver = CheckpointSaver(folder / "checkpoints", metadata={"config": {}})
        with RunLogger(folder, config={}) as logger:
            reads.clear()
            fit(
                model, train_loader, val_loader, optimizer, scheduler, logger, saver,
                epochs=1, device="cpu", log_every=1000, limit_train_batches=updates,
            )  # fmt: skip
            return len(reads)

    assert syncs(8) - syncs(4) == 4


@pytest.mark.parametrize("loss, first_loss", [("ce", math.log(10)), ("bce", math.log(2))])
def test_build_training_trains_with_the_configured_objective(tmp_path, loss, first_loss):
    from engine import build

    tiny_model = ["model=speednet", "model.widths=[4,4,4]", "model.stem_width=4"]
    cfg = composed(*TINY, *tiny_model, f"loss={loss}", "loss.class_weight=auto", "logger=none")
    cfg.trainer.epochs = 1
    run = build.training(cfg, tmp_path)  # as run.py builds a run
    assert f"loss={loss}" in run.objective.describe()
    with run.logger() as logger:
        run.fit(logger, run.saver(logger))
    # SpeedNet's logits start near 0: ln(10) per image for 10-class cross-entropy, ln(2) per
    # class for binary cross-entropy (digits are balanced: auto weights are all 1)
    first = next(r["train/loss"] for r in read_jsonl(tmp_path) if "train/loss" in r)
    assert first == pytest.approx(first_loss, abs=0.1)
