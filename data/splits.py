from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset


@dataclass
class TensorData:
    """A dataset's two splits as whole tensors: what data.device_loader keeps on the device.

    Images are (N, C, H, W) before normalisation: uint8 on the 0..255 scale, or float on the
    0..1 scale. The loader normalises each batch with `mean` and `std` (per channel, 0..1
    scale) as ToTensor + Normalize do, so it yields the regular loader's values.
    `pad` and `flip` are the dataset's own training augmentation (a random crop after `pad`
    px of zero padding, 0: none; a random horizontal flip), the default of data.device_augment.
    """

    train_images: torch.Tensor
    train_targets: torch.Tensor  # (N,) int64
    val_images: torch.Tensor
    val_targets: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int = 0
    flip: bool = False


@dataclass
class Splits:
    """What every dataset builder returns: the two splits and what the model needs to know."""

    train: Dataset
    val: Dataset
    classes: list[str]  # index -> name; travels into checkpoints, logs and predictions
    in_chans: int
    # the training images under the evaluation transform, where `train` augments: k-fold
    # validation folds are cut from it (data/kfold.py). None: `train` does not augment.
    train_eval: Dataset | None = None
    # how an image file becomes the model's input: the keyword arguments of
    # data.transforms.file_transform (input_size (C, H, W), mean, std, interpolation, crop_pct).
    # Stored in checkpoints, so predict / serve / export need nothing but the checkpoint.
    preprocess: dict | None = None
    # the splits as whole tensors, for data.on_device (data/device_loader.py); made on request,
    # since they may cost a copy. None: not a small tensor dataset (image files, the model's
    # pipeline from data.transform, a k-fold split).
    tensors: Callable[[], TensorData] | None = None


class LabelledSubset(Subset):
    """A Subset that still knows its labels without reading an image."""

    @property
    def targets(self) -> list[int]:
        labels = labels_of(self.dataset)
        return [labels[i] for i in self.indices]


def labels_of(dataset: Dataset) -> list[int]:
    """The label of every sample, read without loading images."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].tolist()
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise TypeError(
            f"{type(dataset).__name__} has no `targets`; a dataset that is split by label "
            "(stratified or k-fold) must list its labels in a `targets` attribute"
        )
    return [int(t) for t in targets]


def stratified_split(
    labels: Sequence[int], val_fraction: float, seed: int, classes: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): `val_fraction` of each class to val, fixed by `seed`."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.dataset.val_fraction={val_fraction} must be between 0 and 1")
    counts = Counter(labels)
    lonely = [label for label, n in sorted(counts.items()) if n < 2]
    if lonely:
        names = [classes[i] if classes else str(i) for i in lonely]
        raise ValueError(
            f"classes {names} have a single image; a stratified train/val split needs at least "
            "two per class. Add images, or give separate train and val data"
        )
    # imported here: scikit-learn costs ~2 s of start-up that most runs never need
    from sklearn.model_selection import train_test_split

    try:
        train_idx, val_idx = train_test_split(
            np.arange(len(labels)), test_size=val_fraction, stratify=labels, random_state=seed
        )
    except ValueError as err:  # e.g. fewer val places than classes
        raise ValueError(
            f"data.dataset.val_fraction={val_fraction} cannot split {len(labels)} images of "
            f"{len(counts)} classes with every class on both sides ({err}); raise val_fraction "
            "or add images"
        ) from err
    return train_idx, val_idx
