"""scikit-learn's bundled handwritten digits: 1,797 real 8x8 images, no download needed."""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from data.splits import Splits


def digits(image_size: int = 32, val_fraction: float = 0.2, split_seed: int = 0) -> Splits:
    """Digits 0-9 as 1-channel tensors of `image_size` squared, normalised with train statistics.

    The whole set is a few MB of floats, so it is prepared once, in memory.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.dataset.val_fraction={val_fraction} must be between 0 and 1")
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # 0..16 -> 0..1
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=image_size, mode="bilinear", align_corners=False)
    train_idx, val_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=val_fraction,
        stratify=labels.numpy(),
        random_state=split_seed,
    )
    train_idx, val_idx = torch.as_tensor(train_idx), torch.as_tensor(val_idx)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return Splits(
        train=TensorDataset(images[train_idx], labels[train_idx]),
        val=TensorDataset(images[val_idx], labels[val_idx]),
        classes=[str(name) for name in bunch.target_names],
        in_chans=1,
    )
