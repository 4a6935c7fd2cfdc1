"""CIFAR-10 / CIFAR-100 in torchvision's format, downloaded when the machine is online."""

from collections.abc import Callable
from functools import partial
from pathlib import Path

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
    train, val = read_pair(
        cls,
        root,
        download,
        train_transform,
        eval_transform,
        where=root / cls.base_folder,
        source=cls.url,
        expected=(
            f"torchvision's extracted {cls.filename} (the folder {cls.base_folder}/ with its "
            "batch files)"
        ),
    )
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
