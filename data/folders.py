"""Folders of images: one sub-folder per class (`imagefolder`), and ImageNet's layout (`imagenet`)."""

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from data.images import BAD_IMAGES, IMAGE_EXTENSIONS, image_file_splits, is_image_file
from data.splits import Splits, stratified_split

LAYOUT = "<root>/<class>/<image> (split by val_fraction) or <root>/{train,val}/<class>/<image>"


def imagefolder(
    root: str,
    train_dir: str = "train",
    val_dir: str = "val",
    val_fraction: float = 0.2,
    split_seed: int = 0,
    bad_images: str | Mapping[str, str] = BAD_IMAGES,
    *,
    train_transform: Callable,
    eval_transform: Callable,
) -> Splits:
    """Images in one sub-folder per class; the sub-folder names, sorted, are the class names.

    Split folders: when `root`/`train_dir` exists, training images are read from
    `root`/`train_dir`/<class>/ and validation images from `root`/`val_dir`/<class>/.
    Otherwise `root`/<class>/ holds all images and a stratified `val_fraction` of each class,
    fixed by `split_seed`, is held out for validation. Images in nested folders count too.
    `bad_images`: what an unreadable file does, per split (data.images.bad_image_policies).
    """
    root_path = _existing_folder(root, "data.dataset.root", LAYOUT)
    if (root_path / train_dir).is_dir():
        return _split_folders(
            root_path, train_dir, val_dir, train_transform, eval_transform, bad_images
        )
    classes, samples = scan_class_folders(root_path, "data.dataset.root")
    train_idx, val_idx = stratified_split(
        [label for _, label in samples], val_fraction, split_seed, classes
    )
    train, val = [samples[i] for i in train_idx], [samples[i] for i in val_idx]
    return image_file_splits(train, val, classes, train_transform, eval_transform, bad_images)


def imagenet(
    root: str,
    train_dir: str = "train",
    val_dir: str = "val",
    bad_images: str | Mapping[str, str] = BAD_IMAGES,
    *,
    train_transform: Callable,
    eval_transform: Callable,
) -> Splits:
    """ImageNet in its standard layout: `root`/train/<wnid>/*.JPEG and `root`/val/<wnid>/*.JPEG.

    Class names are the synsets' descriptions ('tabby, tabby cat') for WordNet ids that timm
    knows (ImageNet-1k), the folder name otherwise; a subset of the classes works as well.
    `bad_images`: what an unreadable file does, per split (data.images.bad_image_policies).
    """
    root_path = _existing_folder(
        root, "data.dataset.root", "<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG"
    )
    val = root_path / val_dir
    if val.is_dir() and any(is_image_file(entry) for entry in os.listdir(val)):
        raise ValueError(
            f"{val} holds images directly; ImageNet's validation images must sit in one "
            "folder per class, val/<wnid>/ as in train/ (the layout torchvision's ImageNet "
            "and timm read). Sort them with the ground-truth labels of the ILSVRC2012 devkit"
        )
    splits = _split_folders(
        root_path, train_dir, val_dir, train_transform, eval_transform, bad_images
    )
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    known = set(info.label_names())
    splits.classes = [
        info.label_name_to_description(name) if name in known else name for name in splits.classes
    ]
    return splits


def _split_folders(root, train_dir, val_dir, train_transform, eval_transform, bad_images) -> Splits:
    train_root, val_root = root / train_dir, root / val_dir
    if not val_root.is_dir():
        raise FileNotFoundError(
            f"{train_root} exists but {val_root} does not: split folders need both. Add "
            f"{val_dir}/<class>/<image> beside {train_dir}/, or set data.dataset.val_dir to the "
            "validation folder's name"
        )
    classes, train_samples = scan_class_folders(train_root, "data.dataset.train_dir")
    _, val_samples = scan_class_folders(val_root, "data.dataset.val_dir", classes=classes)
    return image_file_splits(
        train_samples, val_samples, classes, train_transform, eval_transform, bad_images
    )


def scan_class_folders(
    folder: Path, key: str, classes: list[str] | None = None
) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, (path, label) samples) of `folder`/<class>/**/<image>.

    `classes` given (a validation folder): each sub-folder must be one of them; classes without
    a sub-folder are allowed. Not given: the sorted sub-folder names.
    """
    found = sorted(
        entry.name for entry in os.scandir(folder) if entry.is_dir() and entry.name[0] != "."
    )
    if not found:
        raise ValueError(
            f"{key}: {folder} has no class sub-folders; expected {folder}/<class name>/<image>"
        )
    if classes is None:
        classes = found
    unknown = [name for name in found if name not in classes]
    if unknown:
        raise ValueError(
            f"{key}: {folder} has class folders {unknown} that the training folder lacks "
            f"(its classes: {_short(classes)}); rename or remove them, or add them to training"
        )
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for name in found:
        files = _images_under(folder / name)
        if not files:
            raise ValueError(
                f"{key}: class folder {folder / name} holds no images (looked for "
                f"{', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
            )
        samples += [(path, index[name]) for path in files]
    return classes, samples


def _images_under(folder: Path) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .ipynb_checkpoints & co
        files += [os.path.join(dirpath, f) for f in filenames if is_image_file(f)]
    return sorted(files)


def _existing_folder(path: str | Path, key: str, layout: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(
            f"{key}={str(path)!r} {what}; point {key} at a folder laid out as {layout}"
        )
    return folder


def _short(names: list[str], n: int = 10) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")
