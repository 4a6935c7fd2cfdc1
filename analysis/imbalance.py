"""Macro-F1 and the worst class's recall of short runs with and without the imbalance switches.

python analysis/imbalance.py                                  # data=digits_longtail, 4 runs
python analysis/imbalance.py data=digits_longtail trainer.epochs=30 model=resnet18

Trains the same config four times in-process (nothing written): plain, loss.class_weight=auto,
data.sampler=balanced, both; the overrides given apply to every run. Prints one row per run.
"""

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from rich.console import Console
from rich.table import Table

from engine import build
from engine.metrics import class_balanced_metrics, confusion_update

CONF = Path(__file__).resolve().parent.parent / "conf"
DEFAULTS = (
    "data=digits_longtail",
    "model=speednet",
    "trainer.epochs=15",
    "trainer.device=cpu",
    "sched.warmup_epochs=0",
    "logger=none",
)
SWITCHES = {
    "plain": (),
    "class_weight=auto": ("loss.class_weight=auto",),
    "sampler=balanced": ("data.sampler=balanced",),
    "both": ("loss.class_weight=auto", "data.sampler=balanced"),
}


@torch.inference_mode()
def confusion_of(model, loader) -> torch.Tensor:
    """(C, C) counts of the model's top-1 predictions over `loader`, rows the true class."""
    model.eval()
    device = next(model.parameters()).device
    total = None
    for images, targets in loader:
        batch = confusion_update(model(images.to(device)), targets.to(device))
        total = batch if total is None else total + batch
    return total


def study(overrides: list[str]) -> list[dict]:
    """One record per switch: macro_f1, balanced_acc, acc1, worst class and its recall (%)."""
    rows = []
    for name, switch in SWITCHES.items():
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=[*DEFAULTS, *overrides, *switch])
        run = build.training(cfg)
        run.fit(build.NullLogger(), run.saver(None))
        confusion = confusion_of(run.model, run.val_loader).double()
        recall = confusion.diagonal() / confusion.sum(1) * 100
        worst = int(recall.argmin())
        rows.append(
            {
                "switch": name,
                **class_balanced_metrics(confusion),
                "acc1": (confusion.diagonal().sum() / confusion.sum() * 100).item(),
                "worst_class": run.splits.classes[worst],
                "worst_recall": recall[worst].item(),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    rows = study(argv)
    table = Table(title="val split (balanced), % ")
    for column in rows[0]:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()))
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
