"""MNIST and Fashion-MNIST in torchvision's format, downloaded when the machine is online."""

from collections.abc import Callable
from functools import partial
from pathlib import Path

from torchvision import datasets

from data.splits import Splits
from data.torchvision_files import read_pair, with_transform
from data.transforms import small_image_preprocess, small_image_tensors, small_image_transforms

# statistics of the training images (0..1 scale), one grayscale channel
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)


def mnist(
    root: str,
    download: bool = True,
    image_size: int = 28,
    augment: bool = True,
    train_transform: Callable | None = None,
    eval_transform: Callable | None = None,
) -> Splits:
    """MNIST: 60,000 train / 10,000 test 28x28 grayscale digits, read from `root`/MNIST/raw.

    Without transforms: one channel, `image_size` px, MNIST's mean and std, and with `augment` a
    random crop with 1/8 padding (no flip: a mirrored digit is another glyph). With them (the
    model's pipeline from data.transform): RGB, `in_chans` 3.
    """
    given = (train_transform, eval_transform)
    return _mnist(
        datasets.MNIST, MNIST_MEAN, MNIST_STD, False, root, download, image_size, augment, *given
    )


def fashion_mnist(
    root: str,
    download: bool = True,
    image_size: int = 28,
    augment: bool = True,
    train_transform: Callable | None = None,
    eval_transform: Callable | None = None,
) -> Splits:
    """Fashion-MNIST: 60,000 train / 10,000 test 28x28 grayscale clothes, 10 classes, read from
    `root`/FashionMNIST/raw. As `mnist`, with a horizontal flip among the augmentations."""
    given = (train_transform, eval_transform)
    return _mnist(
        datasets.FashionMNIST,
        FASHION_MNIST_MEAN,
        FASHION_MNIST_STD,
        True,
        root,
        download,
        image_size,
        augment,
        *given,
    )


def _mnist(
    cls, mean, std, hflip, root, download, image_size, augment, train_transform, eval_transform
) -> Splits:
    root = Path(root).expanduser()
    if (train_transform is None) != (eval_transform is None):
        raise ValueError("give both train_transform and eval_transform, or neither")
    in_chans = 3  # the model's pipeline makes RGB
    preprocess = None  # the model's pipeline: engine.build.build_data records its keys
    own = {"native_size": 28, "hflip": hflip}  # the options of the small-image pipeline
    if train_transform is None:
        in_chans = 1
        preprocess = small_image_preprocess(image_size, mean, std)
        train_transform = small_image_transforms(
            image_size, mean, std, train=True, augment=augment, **own
        )
        eval_transform = small_image_transforms(
            image_size, mean, std, train=False, augment=False, **own
        )
    files = ", ".join(Path(name).stem for name, _ in cls.resources)
    train, val = read_pair(
        cls,
        root,
        download,
        train_transform,
        eval_transform,
        where=root / cls.__name__ / "raw",  # torchvision's raw_folder
        source=cls.mirrors[0],
        expected=f"the files {files} (the .gz downloads, extracted)",
    )
    tensors = None  # the model's pipeline cannot run on whole tensors
    if preprocess is not None:
        tensors = partial(small_image_tensors, train, val, image_size, mean, std, augment, **own)
    return Splits(
        train=train,
        val=val,
        classes=list(train.classes),
        in_chans=in_chans,
        train_eval=with_transform(train, eval_transform),
        preprocess=preprocess,
        tensors=tensors,
    )
