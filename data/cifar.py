"""CIFAR-10 / CIFAR-100 in torchvision's format, downloaded when the machine is online."""

import hashlib
import io
import pickle
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from torchvision import datasets

from data.splits import Splits
from data.torchvision_files import read_pair, with_transform
from data.transforms import small_image_preprocess, small_image_tensors, small_image_transforms

# per-channel statistics of the training images (0..1 scale)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def cifar10(
    root: str,
    download: bool = True,
    image_size: int = 32,
    augment: bool = True,
    train_transform: Callable | None = None,
    eval_transform: Callable | None = None,
) -> Splits:
    """CIFAR-10: 50,000 train / 10,000 test images of 10 classes, read from `root`.

    Without transforms: the 32-px pipeline of `small_image_transforms` (`image_size`, `augment`,
    CIFAR-10's mean and std). With them (the model's pipeline from data.transform), those instead.
    """
    given = (train_transform, eval_transform)
    return _cifar(
        datasets.CIFAR10, CIFAR10_MEAN, CIFAR10_STD, root, download, image_size, augment, *given
    )


def cifar100(
    root: str,
    download: bool = True,
    image_size: int = 32,
    augment: bool = True,
    train_transform: Callable | None = None,
    eval_transform: Callable | None = None,
) -> Splits:
    """CIFAR-100: 50,000 train / 10,000 test images of 100 classes, read from `root`.

    Transforms as for `cifar10`, with CIFAR-100's mean and std.
    """
    given = (train_transform, eval_transform)
    return _cifar(
        datasets.CIFAR100, CIFAR100_MEAN, CIFAR100_STD, root, download, image_size, augment, *given
    )


def _cifar(
    cls, mean, std, root, download, image_size, augment, train_transform, eval_transform
) -> Splits:
    root = Path(root).expanduser()
    if (train_transform is None) != (eval_transform is None):
        raise ValueError("give both train_transform and eval_transform, or neither")
    preprocess = None  # the model's pipeline: engine.build.build_data records its keys
    if train_transform is None:
        train_transform = small_image_transforms(image_size, mean, std, train=True, augment=augment)
        eval_transform = small_image_transforms(image_size, mean, std, train=False, augment=False)
        preprocess = small_image_preprocess(image_size, mean, std)
    train, val = _read_checked(cls, root, download, train_transform, eval_transform)
    tensors = None  # the model's pipeline cannot run on whole tensors
    if preprocess is not None:
        tensors = partial(small_image_tensors, train, val, image_size, mean, std, augment)
    return Splits(
        train=train,
        val=val,
        classes=list(train.classes),
        in_chans=3,
        train_eval=with_transform(train, eval_transform),
        preprocess=preprocess,
        tensors=tensors,
    )


def _read_checked(cls, root: Path, download: bool, train_transform, eval_transform):
    """torchvision's train and test sets of `cls`; a damaged or malformed file is a ValueError
    that names it (torchvision says "not found or corrupted" alike)."""
    where = root / cls.base_folder
    try:
        return read_pair(
            cls,
            root,
            download,
            train_transform,
            eval_transform,
            where=where,
            source=cls.url,
            expected=(
                f"torchvision's extracted {cls.filename} (the folder {cls.base_folder}/ with its "
                "batch files)"
            ),
        )
    except FileNotFoundError as err:
        # torchvision says "not found or corrupted" alike: tell a damaged file from a missing one
        damaged = damaged_files(cls, where)
        if damaged:
            fetched = "data.dataset.download=false: no new copy was fetched"
            if download:
                fetched = f"the download of a new copy failed: {err.__cause__}"
            raise ValueError(
                f"{cls.__name__} files in {where} fail torchvision's MD5 check: "
                f"{'; '.join(damaged)} ({fetched}). A copy cut short or another release of the "
                f"data: delete them (and {root / cls.filename} if it is there) and run again "
                "with data.dataset.download=true on a machine that is online, or put "
                f"torchvision's extracted {cls.filename} there again"
            ) from err
        raise
    except (KeyError, IndexError, ValueError, TypeError, EOFError, pickle.UnpicklingError) as err:
        # the MD5 sums matched (sums changed by hand, or a mirror with other files) but the
        # content is not a CIFAR batch: torchvision's own error is a bare KeyError('data')
        raise ValueError(
            f"{cls.__name__} files in {where} pass the MD5 check but cannot be read: "
            f"{'; '.join(malformed_files(cls, where)) or repr(err)}. Put torchvision's "
            f"extracted {cls.filename} there again"
        ) from err


def _expected_files(cls) -> list[tuple[str, str]]:
    """(file name, MD5) of every file torchvision's `cls` reads: batches and the meta file."""
    return [*map(tuple, cls.train_list + cls.test_list), (cls.meta["filename"], cls.meta["md5"])]


def damaged_files(cls, folder: Path) -> list[str]:
    """What is wrong with each of `cls`'s files in `folder` that fails its MD5 check (and which
    are missing beside them); empty when none of the files is there (the data is not here)."""
    present, problems = 0, []
    for name, md5 in _expected_files(cls):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        present += 1
        digest = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
        if digest != md5:
            problems.append(f"{name} ({path.stat().st_size:,} bytes) has MD5 {digest}, not {md5}")
    return problems if present else []


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numpy arrays, and refuses any other class or function:
    looking at a file that failed to load never runs code from it."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it pickles {module}.{name}, not only arrays")
        return super().find_class(module, name)


def malformed_files(cls, folder: Path) -> list[str]:
    """What is wrong with each of `cls`'s files in `folder` that torchvision cannot read."""
    problems = []
    for name, _ in _expected_files(cls):
        try:
            entry = _ArraysOnly(io.BytesIO((folder / name).read_bytes()), encoding="latin1").load()
        except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
            problems.append(f"{name} is not a pickled batch ({err})")
            continue
        problem = _batch_problem(entry, cls.meta["key"] if name == cls.meta["filename"] else None)
        if problem:
            problems.append(f"{name} {problem}")
    return problems


def _batch_problem(entry, meta_key: str | None) -> str | None:
    """What keeps `entry` from being a CIFAR batch (or, with `meta_key`, the meta file)."""
    if not isinstance(entry, dict):
        return f"holds a {type(entry).__name__}, not a dict"
    keys = sorted(map(str, entry))
    if meta_key is not None:
        return None if meta_key in entry else f"has no {meta_key!r} entry (its keys: {keys})"
    labels = "labels" if "labels" in entry else "fine_labels"
    if "data" not in entry or labels not in entry:
        return f"has no 'data' and 'labels' (or 'fine_labels') entries (its keys: {keys})"
    data = entry["data"]
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", type(data).__name__)
        return f"has 'data' of shape {shape}, not (images, 3072): 32 x 32 pixels x 3 channels"
    if len(entry[labels]) != len(data):
        return f"has {len(data)} images but {len(entry[labels])} {labels}"
    return None
