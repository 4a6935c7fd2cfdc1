"""Reading a torchvision dataset class from its on-disk format, with one clear error when absent."""

import copy
from collections.abc import Callable
from pathlib import Path
from urllib.error import URLError

from torch.utils.data import Dataset


def read_pair(
    cls,
    root: str | Path,
    download: bool,
    train_transform: Callable,
    eval_transform: Callable,
    *,
    where: Path,
    source: str,
    expected: str,
) -> tuple[Dataset, Dataset]:
    """(train, test) datasets of torchvision class `cls` under `root`, downloaded when allowed.

    `where` is the folder the files live in, `source` where a download comes from and
    `expected` what to put in `where` by hand; the three go into the error message.
    """
    try:
        train = cls(str(root), train=True, download=download, transform=train_transform)
        test = cls(str(root), train=False, download=False, transform=eval_transform)
    except (URLError, OSError, RuntimeError) as err:
        # torchvision raises URLError/OSError when the download fails and RuntimeError when
        # the files are missing, fail their MD5 check, or no mirror answered
        how = f"the download from {source} failed ({err})"
        if not download:
            how = "data.dataset.download=false"
        raise FileNotFoundError(
            f"{cls.__name__} is not in {where} and {how}. Put {expected} there, or point "
            "data.dataset.root (or the DATA_DIR variable) at the folder that holds it."
        ) from err
    return train, test


def with_transform(dataset: Dataset, transform: Callable) -> Dataset:
    """A shallow copy of a torchvision dataset that applies `transform` instead (the image
    arrays are shared, not copied)."""
    view = copy.copy(dataset)
    view.transform = transform
    return view
