"""The training split's class distribution: reported once at data setup, charted in W&B."""

import logging

import torch
from rich.table import Table

from data import Splits
from data.balance import distribution
from engine import distributed
from engine.console import console
from engine.objective import dataset_labels

log = logging.getLogger(__name__)


def training_labels(splits: Splits) -> torch.Tensor | None:
    """The training split's labels, read without decoding an image; None when it lists none."""
    try:
        return dataset_labels(splits.train, "data.sampler")
    except ValueError:
        return None


def report_distribution(splits: Splits) -> torch.Tensor | None:
    """Print images per class and the imbalance ratio (max / min) of the training split, warn
    naming each class with no training image; the labels (None: the dataset lists none)."""
    labels = training_labels(splits)
    if labels is None or distributed.rank() != 0:
        return labels
    report = distribution(labels, splits.classes)
    table = Table(title=f"training images per class ({len(labels)} images)")
    table.add_column("class")
    table.add_column("images", justify="right")
    for name, count in report["counts"].items():
        table.add_row(name, str(count))
    console.print(table)
    if report["imbalance_ratio"] is not None:
        log.info("class imbalance ratio (most / fewest images): %.1f", report["imbalance_ratio"])
    if report["empty"]:
        log.warning(
            "%d classes have no training image: %s; the model cannot learn them. Add images "
            "or drop the classes from the class list",
            len(report["empty"]),
            ", ".join(report["empty"]),
        )
    return labels


def log_distribution_chart(logger, splits: Splits) -> None:
    """A W&B bar chart (data/class_counts) of the training images per class, with the
    imbalance ratio in the run's summary; nothing where the dataset lists no labels."""
    labels = training_labels(splits)
    if labels is None or getattr(logger, "wandb_run", None) is None:
        return  # (a resumed run charted it when it started)
    import wandb

    report = distribution(labels, splits.classes)
    rows = [[name, count] for name, count in report["counts"].items()]
    table = wandb.Table(columns=["class", "images"], data=rows)
    chart = wandb.plot.bar(table, "class", "images", title="training images per class")
    logger.wandb_run.log({"data/class_counts": chart}, step=0)
    logger.summary({"data/imbalance_ratio": report["imbalance_ratio"]})
