"""Multi-label datasets: several classes per image, as multi-hot targets.

The convention every multi-label dataset of data/ follows (and `is_multi_label` recognises):
  classes       list of class names, index -> name
  targets       (N, C) multi-hot tensor (uint8 or float), read without decoding an image
  multi_label   True
  __getitem__   (image, float32 multi-hot tensor of shape (C,))
Subset wrappers (k-fold, train/val cuts) keep it: `is_multi_label` looks through them.
"""

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset


def is_multi_label(dataset) -> bool:
    """Whether `dataset` (or the dataset a Subset / ConcatDataset wraps) has multi-hot targets."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if isinstance(dataset, ConcatDataset):
        return any(is_multi_label(part) for part in dataset.datasets)
    return bool(getattr(dataset, "multi_label", False))


class MultiLabelTensors(Dataset):
    """Images and multi-hot targets held as tensors: (N, C, H, W) float and (N, classes) uint8."""

    multi_label = True

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, classes: list[str]):
        if targets.ndim != 2 or len(images) != len(targets) or targets.shape[1] != len(classes):
            raise ValueError(
                f"images {tuple(images.shape)} and targets {tuple(targets.shape)} of "
                f"{len(classes)} classes: expected N images and (N, {len(classes)}) multi-hot rows"
            )
        self.images, self.targets, self.classes = images, targets.to(torch.uint8), list(classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.targets[index].float()
