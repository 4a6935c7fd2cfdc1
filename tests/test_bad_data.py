"""Bad data on disk: image files that do not decode follow data.dataset.bad_images (fail: stop
naming the file; skip: the next readable image instead, warned once, counted across DataLoader
workers), and annotation files cannot list images outside the data root."""

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Subset, TensorDataset
from torchvision import transforms as T

from analysis.verify_dataset import verify
from data import images
from data.annfile import annfile
from data.folders import imagefolder
from data.images import (
    ImageFiles,
    UnreadableImage,
    bad_image_policies,
    load_image,
    read_error,
    skipped_images,
)
from data.kfold import kfold
from data.loaders import make_loaders, seed_epoch
from data.splits import LabelledSubset
from engine import build
from engine.predict import Classifier, Trained
from tests.helpers import REPO, epoch_records, run_py

CLASSES = ("ant", "bee", "cat")
GOOD_PER_CLASS = 4
# 8 x 8 uint8 tensors: cheap to make, picklable for spawned workers
SMALL = T.Compose([T.Resize((8, 8)), T.PILToTensor()])


def picture(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A real PNG or JPEG (by suffix) of `size` (width, height): noise that survives JPEG."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))
    return path


def truncated(path: Path) -> Path:
    """A JPEG cut off half way, as an interrupted download leaves it."""
    picture(path, (64, 48), seed=99)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def empty(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def text(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("these are my notes, not a picture\n")
    return path


def dangling(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(path.parent / "moved away" / path.name, path)
    return path


def folder(path: Path) -> Path:
    (path / "inside.png").parent.mkdir(parents=True)
    return path


BAD_KINDS = {
    "truncated": ("cut.jpg", truncated),
    "zero bytes": ("empty.png", empty),
    "text named .jpg": ("notes.jpg", text),
    "dangling symlink": ("moved.png", dangling),
    "folder named .jpg": ("album.jpg", folder),
}


def bad_split_folders(root: Path) -> list[str]:
    """root/{train,val}/<class>/: good images in every class, and in train/ one unreadable
    file of each kind a folder scan lists (a folder named x.jpg is walked into, not listed).
    Returns the bad paths: 12 good + 4 bad training images, 6 good validation images."""
    for split, count in (("train", GOOD_PER_CLASS), ("val", 2)):
        for k, name in enumerate(CLASSES):
            for i in range(count):
                suffix = ".jpg" if i % 2 else ".png"
                picture(root / split / name / f"{i}{suffix}", (20 + i, 16 + k), seed=10 * k + i)
    bad = [
        truncated(root / "train" / "ant" / "cut.jpg"),
        dangling(root / "train" / "ant" / "moved.png"),  # right after cut.jpg: skips a skip
        empty(root / "train" / "bee" / "empty.png"),
        text(root / "train" / "cat" / "notes.jpg"),
    ]
    return sorted(str(path) for path in bad)


def build_folder(root: Path, bad_images="skip", transform=SMALL):
    return imagefolder(
        str(root), bad_images=bad_images, train_transform=transform, eval_transform=transform
    )


# ---------------------------------------------------------------- what "unreadable" is


@pytest.mark.parametrize("kind", list(BAD_KINDS))
def test_each_kind_of_bad_file_is_unreadable_and_named(tmp_path, kind):
    name, make = BAD_KINDS[kind]
    path = make(tmp_path / name)
    with pytest.raises(UnreadableImage, match=rf"cannot read image '{path}'.*leave it out"):
        load_image(path)
    assert read_error(path)  # the verifier's test is the same one
    good = picture(tmp_path / "good.png", (10, 10), seed=0)
    assert read_error(good) is None


def test_predict_names_an_unreadable_input(tmp_path):
    # task=predict reads files with load_image, one by one: the first bad one stops it, named
    trained = Trained(
        model=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2)).eval(),
        classes=["a", "b"],
        preprocess={"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.25,) * 3},
        config={},
        source=tmp_path / "model.pt",
    )
    classifier = Classifier(trained, topk=1)
    good, bad = picture(tmp_path / "ok.png", (12, 9), 1), text(tmp_path / "bad.jpg")
    assert classifier(good)[0]["label"] in ("a", "b")
    with pytest.raises(OSError, match=rf"cannot read image '{bad}'"):
        classifier.predict([good, bad])


# ---------------------------------------------------------------- fail


def test_fail_names_the_file_and_what_to_do(tmp_path):
    bad = bad_split_folders(tmp_path)
    splits = build_folder(tmp_path, bad_images="fail")
    index = [path for path, _ in splits.train.samples].index(bad[0])
    with pytest.raises(UnreadableImage) as info:
        splits.train[index]
    message = str(info.value)
    assert bad[0] in message and "verify_dataset.py" in message
    assert "data.dataset.bad_images.train=skip" in message
    # from a DataLoader worker too: the main process gets the message
    loader = DataLoader(splits.train, batch_size=4, num_workers=2)
    with pytest.raises(Exception, match=r"cannot read image '.*/train/"):
        list(loader)


def test_validation_fails_by_default_and_one_value_sets_both_splits(tmp_path):
    bad_split_folders(tmp_path)
    bad = str(text(tmp_path / "val" / "bee" / "zz.jpg"))
    splits = imagefolder(str(tmp_path), train_transform=SMALL, eval_transform=SMALL)
    assert (splits.train.bad_images, splits.val.bad_images) == ("skip", "fail")
    assert splits.train_eval.bad_images == "fail"  # task=eval task.split=train evaluates
    with pytest.raises(UnreadableImage, match=rf"{bad}.*data.dataset.bad_images.val=skip"):
        list(DataLoader(splits.val, batch_size=3))
    assert bad_image_policies("fail") == {"train": "fail", "val": "fail"}
    assert bad_image_policies({"val": "skip"}) == {"train": "skip", "val": "skip"}


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("ignore", r"data.dataset.bad_images='ignore' is not a policy.*'skip'.*'fail'"),
        ({"train": "drop"}, r"data.dataset.bad_images.train='drop' is not a policy"),
        ({"test": "skip"}, r"data.dataset.bad_images has keys \['test'\]; it takes 'train'"),
        (True, r"data.dataset.bad_images=True is neither a policy nor a mapping"),
    ],
)
def test_bad_policy_values_are_named(tmp_path, value, error):
    bad_split_folders(tmp_path)
    with pytest.raises(ValueError, match=error):
        build_folder(tmp_path, bad_images=value)


@pytest.mark.parametrize("option", ["imagefolder", "annfile", "imagenet"])
def test_file_datasets_default_to_skip_in_training_and_fail_in_evaluation(option):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"data={option}", "data.dataset.bad_images=fail"])
        assert cfg.data.dataset.bad_images == "fail"  # one value for both, from the command line
        cfg = compose("config", overrides=[f"data={option}"])
    assert dict(cfg.data.dataset.bad_images) == dict(images.BAD_IMAGES)
    assert dict(images.BAD_IMAGES) == {"train": "skip", "val": "fail"}


# ---------------------------------------------------------------- skip


def test_skip_reads_the_next_readable_image_and_warns_once(tmp_path, caplog):
    a = picture(tmp_path / "a.png", (11, 7), 1)
    bad = text(tmp_path / "b.jpg")
    c = picture(tmp_path / "c.png", (13, 9), 2)
    gone = folder(tmp_path / "d.jpg")
    dataset = ImageFiles([(str(a), 0), (str(bad), 1), (str(c), 2), (str(gone), 3)], None, "skip")
    with caplog.at_level(logging.WARNING, logger="data.images"):
        image, label = dataset[1]
        assert (image.size, label) == ((13, 9), 2)  # c's image with c's label
        image, label = dataset[3]  # the last one wraps round to the first
        assert (image.size, label) == ((11, 7), 0)
        dataset[1]
    assert dataset.skipped == skipped_images(dataset) == 3  # every replaced sample
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2  # once per file
    assert f"skipping unreadable image {bad}" in warned[0] and "train/skipped_images" in warned[0]
    assert str(gone) in warned[1]


def test_skip_gives_up_on_a_folder_that_reads_nothing(tmp_path, monkeypatch):
    files = [(str(text(tmp_path / f"{i}.jpg")), 0) for i in range(5)]
    with pytest.raises(UnreadableImage, match=r"none of the 5 image files"):
        ImageFiles(files, None, "skip")[2]
    monkeypatch.setattr(images, "MAX_BAD_IN_A_ROW", 3)
    files.append((str(picture(tmp_path / "ok.png", (8, 8), 0)), 1))
    with pytest.raises(UnreadableImage, match=r"3 image files in a row .*still mounted"):
        ImageFiles(files, None, "skip")[0]
    assert ImageFiles(files, None, "skip")[3][1] == 1  # 4 and 5 bad, then ok.png


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_counts_each_bad_sample_of_an_epoch_across_workers(tmp_path, num_workers):
    bad = bad_split_folders(tmp_path)
    splits = build_folder(tmp_path)
    assert len(splits.train) == len(CLASSES) * GOOD_PER_CLASS + len(bad) == 16
    # the training loader as the engine makes it: shuffled, last partial batch dropped,
    # persistent workers
    train, val = make_loaders(splits, batch_size=4, num_workers=num_workers)
    for epoch in range(2):
        seed_epoch(train, seed=0, epoch=epoch)
        shapes = {tuple(images.shape) for images, _ in train}
        assert shapes == {(4, 3, 8, 8)}  # every batch full: mixup's even batches stay even
        # read in the main process, written by whichever worker met the file
        assert skipped_images(train.dataset) == len(bad) * (epoch + 1)
    assert sum(len(labels) for _, labels in val) == 6
    assert skipped_images(val.dataset) == skipped_images(splits.train_eval) == 0


@pytest.mark.slow  # spawned workers import torch afresh: ~10 s on 2 CPUs
def test_skip_counts_with_spawned_workers(tmp_path):
    bad = bad_split_folders(tmp_path)
    splits = build_folder(tmp_path)
    loader = DataLoader(
        splits.train, batch_size=4, num_workers=2, multiprocessing_context="spawn", shuffle=True
    )
    assert sum(len(labels) for _, labels in loader) == 16
    assert skipped_images(splits.train) == len(bad)


def test_skipped_images_looks_through_wrappers(tmp_path):
    bad_split_folders(tmp_path)
    splits = build_folder(tmp_path)
    bad_indices = [i for i, (path, _) in enumerate(splits.train.samples) if read_error(path)]
    subset = LabelledSubset(splits.train, bad_indices[:2])
    for i in range(len(subset)):
        subset[i]
    assert skipped_images(subset) == skipped_images(Subset(subset, [0])) == 2
    assert skipped_images(ConcatDataset([subset, splits.val])) == 2
    assert skipped_images(TensorDataset(torch.zeros(2, 1), torch.zeros(2))) == 0
    assert skipped_images(splits.val) == 0  # 'fail' never skips

    folds = kfold(splits, fold=0, num_folds=2)
    for i in range(len(folds.train)):
        folds.train[i]
    assert skipped_images(folds.train) == 2 + sum(i in bad_indices for i in folds.train.indices)


def test_verify_dataset_lists_the_files_that_training_skips(tmp_path):
    bad = bad_split_folders(tmp_path)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "data=imagefolder",
                f"data.dataset.root={tmp_path}",
                "data.transform.input_size=32",
            ],
        )
    report = verify(cfg, workers=2, out=tmp_path / "report.txt")
    assert [path for path, _ in report.bad] == bad
    splits = build.build_splits(cfg)
    for i in range(len(splits.train)):
        splits.train[i]
    assert skipped_images(splits.train) == len(report.bad)


# a real run.py, 2 epochs on the folder with 2 workers: a subprocess, ~15 s on 2 CPU cores
@pytest.mark.slow
def test_training_run_completes_its_epochs_and_logs_the_skips(tmp_path):
    bad = bad_split_folders(tmp_path / "data")
    run_dir = tmp_path / "run"
    run_py(
        "data=imagefolder",
        f"data.dataset.root={tmp_path / 'data'}",
        "data.transform.input_size=32",
        "data.batch_size=4",  # 16 training images: 4 full batches, none dropped
        "data.num_workers=2",
        "trainer.epochs=2",
        "sched.warmup_epochs=0",
        "logger=none",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    log_text = (run_dir / "run.log").read_text()
    for path in bad:  # once per file in the whole run, whichever worker met it
        assert log_text.count(f"skipping unreadable image {path} ") == 1, path
    records = epoch_records(run_dir)
    assert [r["epoch"] for r in records] == [1, 2]
    # each epoch's own count: engine/loop.py logs the change of skipped_images(train dataset)
    # across the epoch; every epoch meets every bad file once
    assert [r["train/skipped_images"] for r in records] == [len(bad), len(bad)]


# ---------------------------------------------------------------- annotation files


def annotated_root(tmp_path: Path) -> Path:
    """tmp_path/data/images/{0,1}.png listed by data/classes.txt, with links inside and out,
    and tmp_path/elsewhere/ outside the data root."""
    root = tmp_path / "data"
    for i in range(2):
        picture(root / "images" / f"{i}.png", (10 + i, 10), seed=i)
    (root / "classes.txt").write_text("ant\nbee\n")
    outside = picture(tmp_path / "elsewhere" / "stray.png", (9, 9), seed=5)
    os.symlink(outside, root / "images" / "link_out.png")
    os.symlink(outside.parent, root / "linked_out")
    os.symlink(tmp_path / "elsewhere" / "gone.png", root / "images" / "dangling_out.png")
    os.symlink(root / "images" / "0.png", root / "images" / "link_in.png")
    os.symlink("images", root / "linked_in")  # a relative link, as `ln -s images linked_in`
    return root


ESCAPES = {
    "dot-dot": ("../elsewhere/stray.png", r"leaves the data root"),
    "dot-dot inside a path": ("images/../../elsewhere/stray.png", r"leaves the data root"),
    "absolute": ("{tmp}/elsewhere/stray.png", r"leaves the data root.*no leading '/'"),
    "file link out": ("images/link_out.png", r"symbolic link.*elsewhere/stray.png, outside"),
    "folder link out": ("linked_out/stray.png", r"symbolic link.*outside the data root"),
    "dangling link out": ("images/dangling_out.png", r"symbolic link.*elsewhere/gone.png"),
}
INSIDE = {
    "plain": "images/1.png",
    "dot-dot that stays inside": "images/../images/1.png",
    "file link inside": "images/link_in.png",
    "folder link inside": "linked_in/1.png",
}


@pytest.mark.parametrize("case", list(ESCAPES))
def test_annfile_rejects_paths_that_leave_the_root(tmp_path, case):
    root = annotated_root(tmp_path)
    listed, error = ESCAPES[case]
    listed = listed.format(tmp=tmp_path)
    (root / "train.txt").write_text(f"# path label\nimages/0.png 0\n{listed} 1\nimages/1.png 1\n")
    with pytest.raises(ValueError, match=error) as info:
        annfile(str(root), "train.txt", None, train_transform=SMALL, eval_transform=SMALL)
    message = str(info.value)
    assert f"{root / 'train.txt'}, line 3" in message and repr(listed) in message
    assert "point data.dataset.root at a folder" in message  # and what to do


@pytest.mark.parametrize("root_is_a_link", [False, True])
def test_annfile_keeps_paths_inside_the_root(tmp_path, root_is_a_link):
    root = annotated_root(tmp_path)
    lines = [f"{path} {k % 2}" for k, path in enumerate(INSIDE.values())]
    (root / "train.txt").write_text("\n".join(["images/0.png 0", *lines]) + "\n")
    (root / "val.txt").write_text("images/0.png 0\nimages/1.png 1\n")
    if root_is_a_link:  # /data -> /mnt/disk/data: the root's own link is no escape
        os.symlink(root, tmp_path / "data_link")
        root = tmp_path / "data_link"
    splits = annfile(str(root), train_transform=SMALL, eval_transform=SMALL)
    assert len(splits.train) == 1 + len(INSIDE)
    assert [tuple(image.shape) for image, _ in splits.train] == [(3, 8, 8)] * (1 + len(INSIDE))
