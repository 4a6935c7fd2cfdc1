"""Imbalanced data: the class-distribution report, data.sampler=balanced (data-parallel shares,
mid-epoch resume), val/macro_f1 and val/balanced_acc against scikit-learn, data=digits_longtail."""

import logging

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score
from torch.utils.data import TensorDataset

from data import Splits
from data.balance import distribution
from data.loaders import make_loaders, seed_epoch, skip_batches
from engine.metrics import class_balanced_metrics, confusion_update
from tests.helpers import TINY, epoch_records, records_of, wandb_records, wandb_runs

# 3 classes of 60, 30 and 10 images: index i's label, readable as the dataset's targets
LABELS = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)


def long_tailed_splits(labels=LABELS, classes=("a", "b", "c")) -> Splits:
    images = torch.arange(len(labels), dtype=torch.float32).view(-1, 1)
    data = TensorDataset(images, labels)
    return Splits(train=data, val=data, classes=list(classes), in_chans=1)


def order(loader) -> list[int]:
    return [int(i) for images, _ in loader for i in images.flatten()]


def balanced(batch_size=10, **kwargs):
    train, _ = make_loaders(
        long_tailed_splits(), batch_size, sampler="balanced", train_labels=LABELS, **kwargs
    )
    return train


def test_balanced_sampler_draws_every_class_about_equally():
    loader = balanced()
    drawn = []
    for epoch in range(20):
        seed_epoch(loader, 0, epoch)
        drawn += order(loader)
    share = torch.bincount(LABELS[drawn], minlength=3) / len(drawn)
    # 2,000 draws: each class a third (+-0.05 is > 4 standard deviations); random gives .6/.3/.1
    assert share.tolist() == pytest.approx([1 / 3] * 3, abs=0.05)
    assert len(drawn) == 20 * len(LABELS)  # an epoch keeps the training set's size


def test_balanced_sampler_resumes_mid_epoch_and_splits_one_draw_among_processes():
    whole = balanced(batch_size=10)
    seed_epoch(whole, 3, 2)
    full = order(whole)
    assert full != sorted(full)
    resumed = balanced(batch_size=10)
    seed_epoch(resumed, 3, 2)
    skip_batches(resumed, 4)  # a resume 4 batches into epoch 2
    assert order(resumed) == full[40:]
    shares = []
    for rank in range(2):
        loader = balanced(batch_size=5, num_replicas=2, rank=rank)
        seed_epoch(loader, 3, 2)
        shares.append(order(loader))
    # each process every 2nd draw of the one order: together the single-process epoch
    assert shares[0] == full[0::2] and shares[1] == full[1::2]


def test_bad_sampler_settings_are_named():
    splits = long_tailed_splits()
    with pytest.raises(
        ValueError, match=r"data\.sampler='weighted' must be one of random, balanced"
    ):
        make_loaders(splits, 10, sampler="weighted", train_labels=LABELS)
    with pytest.raises(
        ValueError, match=r"data\.sampler=balanced needs the training split's labels"
    ):
        make_loaders(splits, 10, sampler="balanced")
    with pytest.raises(ValueError, match=r"set data\.on_device=false"):
        make_loaders(splits, 10, sampler="balanced", train_labels=LABELS, on_device=True)


def test_macro_f1_and_balanced_accuracy_match_scikit_learn():
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 5, (300,), generator=generator)
    targets[targets == 4] = 3  # class 4 never a target, but predicted: F1 0 counts, recall not
    logits = torch.randn(300, 5, generator=generator)
    logits[torch.arange(300), targets] += 1.0  # better than chance, unevenly
    confusion = confusion_update(logits[:100], targets[:100]) + confusion_update(
        logits[100:], targets[100:]
    )
    got = class_balanced_metrics(confusion)
    preds = logits.argmax(1).numpy()
    assert got["macro_f1"] == pytest.approx(100 * f1_score(targets.numpy(), preds, average="macro"))
    assert got["balanced_acc"] == pytest.approx(
        100 * balanced_accuracy_score(targets.numpy(), preds)
    )


def test_distribution_report_counts_and_names_empty_classes(caplog):
    from engine.imbalance import report_distribution

    report = distribution(LABELS, ["a", "b", "c"])
    assert report == {"counts": {"a": 60, "b": 30, "c": 10}, "imbalance_ratio": 6.0, "empty": []}
    with caplog.at_level(logging.WARNING):
        labels = report_distribution(long_tailed_splits(classes=("a", "b", "c", "zebra")))
    assert torch.equal(labels, LABELS)
    assert "1 classes have no training image: zebra" in caplog.text
    multi_hot = torch.tensor([[1, 0, 1], [1, 0, 0], [1, 1, 0]])
    assert distribution(multi_hot, ["a", "b", "c"])["counts"] == {"a": 3, "b": 1, "c": 1}


def test_digits_longtail_cuts_the_rare_classes_training_images_only():
    from data.digits import digits, digits_longtail

    full, tail = digits(image_size=8), digits_longtail(image_size=8)
    counts = torch.bincount(tail.train.tensors[1], minlength=10)
    full_counts = torch.bincount(full.train.tensors[1], minlength=10)
    assert torch.equal(counts[:5], full_counts[:5])
    assert (counts[5:] * 10 - full_counts[5:]).abs().max() <= 10  # a tenth, rounded
    assert torch.equal(tail.val.tensors[1], full.val.tensors[1])  # val stays balanced


@pytest.mark.slow
def test_a_run_reports_balanced_metrics_and_charts_the_distribution(run_task, tmp_path):
    run_task(
        *TINY,
        "data=digits_longtail",
        "data.dataset.image_size=8",
        "data.sampler=balanced",
        "checkpoint.best_metric=val/macro_f1",
        "model=speednet",
        "model.widths=[4,4,4]",
        "model.stem_width=4",
        "trainer.epochs=1",
        "logger.wandb.mode=offline",
        "logger.log_best_checkpoint=false",
    )
    run_dir = tmp_path / "run"
    record = epoch_records(run_dir)[0]
    assert 0 <= record["val/macro_f1"] <= 100 and 0 <= record["val/balanced_acc"] <= 100
    records = wandb_records(wandb_runs(run_dir)[0])
    logged = {k for h in records_of(records, "history") for k in h["item"]}
    assert any(k.startswith("data/class_counts") for k in logged), logged
