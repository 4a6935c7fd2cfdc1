"""CIFAR-10 / CIFAR-100 in torchvision's format, downloaded when the machine is online."""

from pathlib import Path
from urllib.error import URLError

from torchvision import datasets

from data.splits import Splits
from data.transforms import small_image_transforms

# per-channel statistics of the training images (0..1 scale)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def cifar10(root: str, download: bool = True, image_size: int = 32, augment: bool = True) -> Splits:
    """CIFAR-10: 50,000 train / 10,000 test images of 10 classes, read from `root`."""
    return _cifar(datasets.CIFAR10, root, download, image_size, augment, CIFAR10_MEAN, CIFAR10_STD)


def cifar100(
    root: str, download: bool = True, image_size: int = 32, augment: bool = True
) -> Splits:
    """CIFAR-100: 50,000 train / 10,000 test images of 100 classes, read from `root`."""
    return _cifar(
        datasets.CIFAR100, root, download, image_size, augment, CIFAR100_MEAN, CIFAR100_STD
    )


def _cifar(cls, root, download, image_size, augment, mean, std) -> Splits:
    root = Path(root).expanduser()
    where = root / cls.base_folder
    try:
        train = cls(
            root,
            train=True,
            download=download,
            transform=small_image_transforms(image_size, mean, std, train=True, augment=augment),
        )
        val = cls(
            root,
            train=False,
            download=False,
            transform=small_image_transforms(image_size, mean, std, train=False, augment=False),
        )
    except (URLError, OSError, RuntimeError) as err:
        # torchvision raises URLError/OSError when the download fails and RuntimeError when
        # the files are missing or fail their MD5 check
        how = (
            f"the download from {cls.url} failed ({err})"
            if download
            else "data.dataset.download=false"
        )
        raise FileNotFoundError(
            f"{cls.__name__} is not in {where} and {how}. Put torchvision's extracted "
            f"{cls.filename} there (the folder {cls.base_folder}/ with its batch files), "
            "or point data.dataset.root (or the DATA_DIR variable) at the folder that holds it."
        ) from err
    return Splits(train=train, val=val, classes=list(train.classes), in_chans=3)
