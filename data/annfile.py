"""Images listed in annotation files, as MMClassification's CustomDataset reads them.

An annotation file holds one `relative/path.jpg label` line per image: the path relative to the
data root, the label an integer index into the class list. Blank lines and lines starting with
`#` are skipped; a path may contain spaces (the label is the last field).

A listed path must stay inside the data root: an absolute path, a `..` that climbs out of it,
or a symbolic link (the file or a folder on its way) that resolves outside it is an error naming
the annotation file and line. A dataset assembled from links into a shared store is refused for
that reason: point `root` at the store, or list the files relative to it.
"""

import os
import stat
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from data.images import BAD_IMAGES, image_file_splits
from data.splits import Splits, stratified_split


def annfile(
    root: str,
    train_ann: str = "train.txt",
    val_ann: str | None = "val.txt",
    classes: str | Sequence[str] = "classes.txt",
    val_fraction: float = 0.2,
    split_seed: int = 0,
    bad_images: str | Mapping[str, str] = BAD_IMAGES,
    *,
    train_transform: Callable,
    eval_transform: Callable,
) -> Splits:
    """Images under `root` listed in `train_ann` and `val_ann` (paths relative to `root`).

    `classes`: a file with one class name per line (relative to `root`), or the names
    themselves. `val_ann=None`: a stratified `val_fraction` of `train_ann`, fixed by
    `split_seed`, is held out for validation. `bad_images`: what an unreadable file does, per
    split (data.images.bad_image_policies).
    """
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise FileNotFoundError(
            f"data.dataset.root={root!r} does not exist; point it at the folder that the paths "
            "in the annotation files are relative to"
        )
    names = _class_names(root_path, classes)
    train = read_annotations(_file(root_path, train_ann, "train_ann"), root_path, names)
    if val_ann is None:
        train_idx, val_idx = stratified_split(
            [label for _, label in train], val_fraction, split_seed, names
        )
        train, val = [train[i] for i in train_idx], [train[i] for i in val_idx]
    else:
        val = read_annotations(_file(root_path, val_ann, "val_ann"), root_path, names)
    return image_file_splits(train, val, names, train_transform, eval_transform, bad_images)


def read_annotations(path: Path, root: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(image path, label) of every line of annotation file `path`; errors name file and line.

    Every path must lead to a file inside `root`, through symbolic links too (see the module).
    """
    entries = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}, line {number} ({line!r})"
        entries.append((where, *_parse_line(line, where, len(classes))))
    if not entries:
        raise ValueError(f"{path} lists no images; expected '<relative/path.jpg> <label>' lines")
    return confined_samples(entries, path, root)


def confined_samples(entries, path: Path, root: Path) -> list[tuple[str, object]]:
    """(image path under `root`, label) of (where, relative path, label) entries read from
    annotation file `path`: a path that leaves `root` (see the module) is an error naming its
    `where`, missing files one error listing them."""
    real_root = os.path.realpath(root)
    inside = os.path.join(real_root, "")  # what a path inside starts with (trailing separator)
    real_folders: dict[str, str] = {}  # one realpath per folder, not per file: ImageNet has 1.3M
    samples, missing = [], []
    for where, relative, label in entries:
        normal = os.path.normpath(relative)
        if os.path.isabs(relative) or normal == ".." or normal.startswith(".." + os.sep):
            raise ValueError(
                f"{where}: {relative!r} leaves the data root {root}; paths must be relative "
                "to data.dataset.root and stay inside it (no leading '/' or '../'). Move the "
                "image under the root, or point data.dataset.root at a folder that holds it"
            )
        image = os.path.join(root, normal)
        real, is_file = _resolve(image, real_folders)
        if not (real + os.sep).startswith(inside):
            raise ValueError(
                f"{where}: {relative!r} is a symbolic link, or lies under one, that leads to "
                f"{real}, outside the data root {real_root}; images must stay inside "
                "data.dataset.root. Copy the image into the root in place of the link, or "
                "point data.dataset.root at a folder that holds the images themselves"
            )
        if not is_file:
            missing.append(image)
        samples.append((image, label))
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise FileNotFoundError(
            f"{path} lists {len(missing)} images that do not exist: {shown}. Check "
            "data.dataset.root, which the paths are relative to"
        )
    return samples


def _parse_line(line: str, where: str, num_classes: int) -> tuple[str, int]:
    """(relative path, label) of one `<relative/path.jpg> <label>` line; errors say `where`."""
    fields = line.rsplit(maxsplit=1)
    if len(fields) != 2:
        raise ValueError(f"{where}: expected '<relative/path.jpg> <label>'")
    relative, label_text = fields
    try:
        label = int(label_text)
    except ValueError:
        raise ValueError(
            f"{where}: label {label_text!r} is not an integer; labels are indices into "
            f"the class list (0..{num_classes - 1})"
        ) from None
    if not 0 <= label < num_classes:
        raise ValueError(
            f"{where}: unknown label {label}; the class list has {num_classes} classes, "
            f"so labels run 0..{num_classes - 1}. Fix the label or add the class to the "
            "class list (data.dataset.classes)"
        )
    return relative, label


def _resolve(path: str, real_folders: dict[str, str]) -> tuple[str, bool]:
    """(os.path.realpath(path), whether it is a file), in one lstat where `path` is no link:
    each folder is resolved once (cached in `real_folders`)."""
    folder, name = os.path.split(path)
    if folder not in real_folders:
        real_folders[folder] = os.path.realpath(folder)
    real = os.path.join(real_folders[folder], name)
    try:
        mode = os.lstat(real).st_mode
    except OSError:  # missing: listed as such by the caller
        return real, False
    if stat.S_ISLNK(mode):
        real = os.path.realpath(real)
        return real, os.path.isfile(real)
    return real, stat.S_ISREG(mode)


def _class_names(root: Path, classes: str | Sequence[str]) -> list[str]:
    if isinstance(classes, str):
        path = _file(root, classes, "classes")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [str(name) for name in classes]
    if not names:
        raise ValueError("data.dataset.classes is empty; list one class name per line")
    duplicates = sorted(name for name, n in Counter(names).items() if n > 1)
    if duplicates:
        raise ValueError(f"data.dataset.classes names {duplicates} more than once")
    return names


def _file(root: Path, name: str, key: str) -> Path:
    path = root / Path(name).expanduser()  # an absolute `name` stays as it is
    if not path.is_file():
        raise FileNotFoundError(
            f"data.dataset.{key}={name!r}: {path} does not exist; give a file relative to "
            f"data.dataset.root ({root}) or an absolute path"
        )
    return path
