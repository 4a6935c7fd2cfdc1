"""The LR (and momentum) of every update of a config, without training.

python analysis/lr_curve.py                              # outputs/analysis/lr_curve.png + .csv
python analysis/lr_curve.py optim=sgd sched=step trainer.epochs=90 +out=plots/sgd_step
python analysis/lr_curve.py data=imagenet model=vit_base +train_size=1281167
WORLD_SIZE=8 python analysis/lr_curve.py ...             # the LR scaling of 8 processes

Model, optimizer and schedule come from engine/build.py's own builders, and the schedule is
stepped as engine/loop.py steps it, so the curve is the `train/lr` a run logs, update for update.
Updates per epoch come from the train loader that build_data makes, or, with `+train_size=N`
(training images; no dataset is loaded), from N // (data.batch_size x world size) batches: what
a sampler that shards the data over WORLD_SIZE processes and drops the last batch gives. Either
way trainer.limit_train_batches and trainer.accum_steps apply.
"""

import csv
from pathlib import Path

import hydra
from omegaconf import DictConfig

from analysis.cli import TOOL_OUT, no_run_folder

FIGSIZE, DPI = (8.0, 4.5), 100  # inches, pixels per inch: an 800 x 450 PNG


def lr_curve(cfg: DictConfig, train_size: int | None = None) -> dict:
    """LR and momentum of every update of the run `cfg` describes.

    Returns {step, lr, momentum: lists (step s is update s, 1-based, the step at which the
    engine logs the LR that update used), updates_per_epoch, warmup (updates), title}.
    lr is engine.schedules.base_lr, read before the scheduler steps, as engine/loop.py logs it;
    momentum is engine.schedules.momentum (group 0's `momentum`, or Adam's `betas[0]`).
    """
    import os

    from engine import build, schedules

    if train_size is None:
        splits, train_loader, _ = build.build_data(cfg)
        model = build.build_model(cfg, splits)
    else:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        batches = train_size // (cfg.data.batch_size * world_size)
        if batches < 1:
            raise ValueError(
                f"train_size={train_size} makes no batch of data.batch_size={cfg.data.batch_size}"
                f" on {world_size} process(es); give the number of training images"
            )
        train_loader = range(batches)  # updates_per_epoch needs only its len()
        # parameter groups do not depend on the class or channel count
        model = build.build_model_for(cfg, num_classes=1000, in_chans=3, load_weights=False)
    optimizer = build.build_optimizer(cfg, model)
    per_epoch = build.updates_per_epoch(cfg, train_loader)
    scheduler = build.build_scheduler(cfg, optimizer, per_epoch)
    total = per_epoch * cfg.trainer.epochs

    steps, lrs, momenta = [], [], []
    scheduler.step_update(num_updates=0)  # as fit() does before the first epoch
    for step in range(1, total + 1):
        # engine/loop.py: read before the update, logged at the step count after it
        steps.append(step)
        lrs.append(schedules.base_lr(optimizer))
        momenta.append(schedules.momentum(optimizer))
        scheduler.step_update(num_updates=step)

    warmup = int(getattr(scheduler, "warmup_t", 0) or 0)
    sched_name = str(cfg.sched._target_).rsplit(".", 1)[-1]
    epochs = f"{cfg.trainer.epochs} epochs x {per_epoch} updates"
    title = f"{cfg.optim.opt} + {sched_name}: {total} updates ({epochs}), warmup {warmup}"
    return {
        "step": steps,
        "lr": lrs,
        "momentum": momenta,
        "updates_per_epoch": per_epoch,
        "warmup": warmup,
        "title": title,
    }


def write(curve: dict, out: str | Path) -> tuple[Path, Path]:
    """`<out>.png` (LR per update, momentum on a second axis where there is one) and
    `<out>.csv` (step, lr, momentum); returns their paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png, csv_path = out.with_name(out.name + ".png"), out.with_name(out.name + ".csv")

    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "lr", "momentum"])
        for row in zip(curve["step"], curve["lr"], curve["momentum"], strict=True):
            writer.writerow(["" if v is None else repr(v) for v in row])

    fig = figure(curve)
    import matplotlib.pyplot as plt  # after figure() chose the Agg backend

    fig.savefig(png, dpi=DPI)  # no bbox_inches="tight": the PNG keeps FIGSIZE x DPI pixels
    plt.close(fig)
    return png, csv_path


def figure(curve: dict):
    """LR per update (momentum on a second axis where there is one), the end of the warmup
    marked, a legend naming each line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    ax.plot(curve["step"], curve["lr"], color="tab:blue", label="lr")
    if curve["warmup"]:
        ax.axvline(curve["warmup"], color="grey", linestyle=":", label="end of warmup")
    ax.set_xlabel("update")
    ax.set_ylabel("lr", color="tab:blue")
    ax.set_title(curve["title"], fontsize=10)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if any(m is not None for m in curve["momentum"]):
        ax2 = ax.twinx()
        ax2.plot(curve["step"], curve["momentum"], color="tab:orange", linestyle="--")
        ax2.set_ylabel("momentum (Adam-type: beta1)", color="tab:orange")
        handles += ax2.lines
        labels.append("momentum")
    # on the twin axes, drawn last: the momentum line does not cover it
    (ax2 if len(fig.axes) > 1 else ax).legend(handles, labels, loc="best", fontsize="small")
    fig.tight_layout()
    return fig


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    curve = lr_curve(cfg, train_size=cfg.get("train_size"))
    # not the current folder: in a clone that is the repo, and untracked files there make
    # every later run record the checkout "dirty"; outputs/ is git-ignored
    png, csv_path = write(curve, cfg.get("out", TOOL_OUT / "lr_curve"))
    peak = max(curve["lr"])
    print(f"{curve['title']}; peak lr {peak:.4g}, last {curve['lr'][-1]:.4g}")
    print(f"wrote {png}")
    print(f"wrote {csv_path}")


if __name__ == "__main__":
    no_run_folder()
    main()
