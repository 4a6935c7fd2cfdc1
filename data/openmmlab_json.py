"""Images listed in MMPretrain / OpenMMLab 2.0 annotation files (JSON).

    {"metainfo": {"classes": ["cat", "dog", ...]},
     "data_list": [{"img_path": "train/1.jpg", "gt_label": 0},
                   {"img_path": "train/2.jpg", "gt_label": [0, 2]}, ...]}

`gt_label` an integer in every entry: a single-label dataset (integer targets, as data=annfile).
A list in any entry (an integer there counts as a one-label list): multi-label; the dataset's
`targets` is an (N, C) multi-hot tensor, `multi_label` is True, and an item is (image, float32
multi-hot (C,)). `img_path` is relative to the data root (OpenMMLab's `data_prefix`) and must
stay inside it, as in data/annfile.py; errors name the file and the entry.
"""

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from data.annfile import _class_names, _file, confined_samples
from data.images import BAD_IMAGES, ImageFiles, bad_image_policies, image_file_splits
from data.splits import Splits


class MultiLabelImageFiles(ImageFiles):
    """ImageFiles whose labels are tuples of class indices, given as float32 multi-hot (C,)."""

    multi_label = True

    def __init__(self, samples, num_classes: int, *args, **kwargs):
        super().__init__(samples, *args, **kwargs)
        self.targets = torch.zeros(len(self.samples), num_classes)
        for i, (_, labels) in enumerate(self.samples):
            self.targets[i, list(labels)] = 1.0

    def __getitem__(self, index: int):
        image, labels = super().__getitem__(index)
        target = torch.zeros(self.targets.shape[1])
        target[list(labels)] = 1.0
        return image, target


def openmmlab_json(
    root: str,
    train_ann: str = "train.json",
    val_ann: str = "val.json",
    classes: str | Sequence[str] | None = None,
    bad_images: str | Mapping[str, str] = BAD_IMAGES,
    *,
    train_transform: Callable,
    eval_transform: Callable,
) -> Splits:
    """Images under `root` listed in the `data_list` of `train_ann` and `val_ann`.

    `classes`: None takes the train file's `metainfo.classes`; else a class file (relative to
    `root`) or the names themselves, overriding it.
    """
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise FileNotFoundError(
            f"data.dataset.root={root!r} does not exist; point it at the folder that the "
            "img_path entries of the annotation files are relative to"
        )
    train_file = _file(root_path, train_ann, "train_ann")
    names = _class_names(root_path, _load(train_file)[0] if classes is None else classes)
    train = read_json_annotations(train_file, root_path, names)
    val = read_json_annotations(_file(root_path, val_ann, "val_ann"), root_path, names)
    if not any(isinstance(label, tuple) for _, label in train + val):
        return image_file_splits(train, val, names, train_transform, eval_transform, bad_images)
    as_lists = [[(p, (x,) if isinstance(x, int) else x) for p, x in s] for s in (train, val)]
    policy, key = bad_image_policies(bad_images), "data.dataset.bad_images"

    def files(samples, transform, split):
        return MultiLabelImageFiles(samples, len(names), transform, policy[split], f"{key}.{split}")

    return Splits(
        train=files(as_lists[0], train_transform, "train"),
        val=files(as_lists[1], eval_transform, "val"),
        classes=names,
        in_chans=3,
        train_eval=files(as_lists[0], eval_transform, "val"),
    )


def _load(path: Path) -> tuple[list[str], list]:
    """(metainfo.classes, data_list) of annotation file `path`."""
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); expected OpenMMLab 2.0 format"
        ) from None
    if not isinstance(content, dict) or not isinstance(content.get("data_list"), list):
        raise ValueError(
            f"{path}: expected an object with a `data_list` list of {{img_path, gt_label}} "
            "entries (OpenMMLab 2.0 annotation format)"
        )
    classes = (content.get("metainfo") or {}).get("classes")
    return (list(classes) if isinstance(classes, list) else []), content["data_list"]


def read_json_annotations(path: Path, root: Path, classes: list[str]) -> list[tuple[str, object]]:
    """(image path, label) of every `data_list` entry: label an int, or a tuple of ints."""
    entries = []
    for number, entry in enumerate(_load(path)[1]):
        where = f"{path}, data_list[{number}] ({json.dumps(entry)[:200]})"
        if not isinstance(entry, dict) or not isinstance(entry.get("img_path"), str):
            raise ValueError(f'{where}: expected {{"img_path": <relative path>, "gt_label": ...}}')
        entries.append((where, entry["img_path"], _label(entry.get("gt_label"), where, classes)))
    if not entries:
        raise ValueError(f"{path}: data_list is empty; list one {{img_path, gt_label}} per image")
    return confined_samples(entries, path, root)


def _label(value, where: str, classes: list[str]):
    """An int class index, or a tuple of them (a multi-label entry), checked against classes."""
    many = isinstance(value, list)
    labels = value if many else [value]
    for label in labels:
        if isinstance(label, bool) or not isinstance(label, int):
            raise ValueError(
                f"{where}: gt_label {label!r} is not an integer; labels are indices into "
                f"metainfo.classes (0..{len(classes) - 1}), a list of them for multi-label"
            )
        if not 0 <= label < len(classes):
            raise ValueError(
                f"{where}: unknown label {label}; the class list has {len(classes)} classes, "
                f"so labels run 0..{len(classes) - 1}. Fix the label or the class list"
            )
    return tuple(sorted(set(labels))) if many else value
