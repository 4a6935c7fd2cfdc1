"""Per-image transforms: timm's train/eval pipelines for photos, a light one for small images."""

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torchvision import transforms as T

from data.images import to_gray, to_rgb
from data.splits import TensorData

# timm's policy names are passed through; this one is torchvision's (timm has no TrivialAugment)
TRIVIAL_AUGMENT = "trivialaugment"


def image_transforms(
    input_size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
    crop_pct: float = 0.875,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    vflip: float = 0.0,
    auto_augment: str | None = None,
    color_jitter: float | Sequence[float] | None = 0.4,
    re_prob: float = 0.0,
    re_mode: str = "pixel",
    re_count: int = 1,
) -> tuple[Callable, Callable]:
    """(train, eval) transforms of PIL images, from timm's `create_transform` (same arguments).

    train: random-resized crop (`scale`, `ratio`) to `input_size`, flips, then `auto_augment`
    (RandAugment 'rand-m9-mstd0.5-inc1', AutoAugment 'original' / 'v0', AugMix 'augmix-m5-w4-d2',
    or 'trivialaugment') or, without one, colour jitter; normalise; random erasing (`re_prob`).
    eval: resize the short side to input_size / crop_pct, center-crop `input_size`, normalise.
    Both convert to RGB first.
    """
    size = tuple(input_size) if isinstance(input_size, Sequence) else int(input_size)
    common = {"interpolation": interpolation, "mean": tuple(mean), "std": tuple(std)}
    trivial = auto_augment is not None and auto_augment.lower() == TRIVIAL_AUGMENT
    train = create_transform(
        size,
        is_training=True,
        scale=tuple(scale),
        ratio=tuple(ratio),
        hflip=hflip,
        vflip=vflip,
        auto_augment=None if trivial else auto_augment,
        color_jitter=color_jitter,
        re_prob=re_prob,
        re_mode=re_mode,
        re_count=re_count,
        separate=trivial,
        **common,
    )
    if trivial:
        # timm's slots: crop + flips | augmentation | to-tensor, normalise, erase. TrivialAugment
        # replaces the colour jitter, as timm's own policies do.
        crop_flip, _, finish = train
        mode = "bilinear" if interpolation == "random" else interpolation
        wide = T.TrivialAugmentWide(interpolation=T.InterpolationMode(mode))
        train = T.Compose([*crop_flip.transforms, wide, *finish.transforms])
    _keep_a_posterize_bit(train)
    evaluate = file_transform(**photo_preprocess(size, mean, std, interpolation, crop_pct))
    return T.Compose([to_rgb, train]), evaluate


def _keep_a_posterize_bit(transform) -> None:
    """timm's posterize levels can keep 0 bits: 'Posterize' (v0, v0r policies) below magnitude
    2.5, and 'PosterizeIncreasing' (rand-...-inc1, v0) at magnitude 10, which the policies reach
    in a few draws per hundred images. Pillow >= 10 refuses 0 bits (ValueError mid-epoch) where
    it once made the image black; keep at least 1 (nearly so)."""
    ops = list(getattr(transform, "ops", None) or [])  # timm's RandAugment
    for sub_policy in getattr(transform, "policy", None) or []:  # timm's AutoAugment
        ops += sub_policy
    for op in ops:
        if getattr(op, "name", "") in ("Posterize", "PosterizeIncreasing"):
            level_fn = op.level_fn
            op.level_fn = lambda level, hparams, f=level_fn: (max(1, f(level, hparams)[0]),)
    for inner in getattr(transform, "transforms", []):
        _keep_a_posterize_bit(inner)


def file_transform(
    input_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
    crop_pct: float = 1.0,
) -> Callable:
    """A PIL image of any mode as the model's (C, H, W) input: the evaluation pipeline.

    RGB for C=3, grayscale for C=1; resize the short side to H / crop_pct, center-crop H x W,
    scale to 0..1, normalise. The keys are those of `Splits.preprocess` (and checkpoints'
    'preprocess'), so a checkpoint alone rebuilds what its model expects.
    """
    chans, height, width = (int(v) for v in input_size)
    if chans not in (1, 3):
        raise ValueError(f"preprocess input_size={list(input_size)}: images have 1 or 3 channels")
    evaluate = create_transform(
        (height, width),
        is_training=False,
        crop_pct=crop_pct,
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
    )
    return T.Compose([to_rgb if chans == 3 else to_gray, evaluate])


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)[-2:]


def photo_preprocess(
    input_size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
    crop_pct: float = 0.875,
    **train_only,
) -> dict:
    """`Splits.preprocess` of `image_transforms` with these keys: its evaluation half."""
    return {
        "input_size": (3, *_pair(input_size)),
        "mean": tuple(float(m) for m in mean),
        "std": tuple(float(s) for s in std),
        "interpolation": interpolation,
        "crop_pct": float(crop_pct),
    }


def small_image_preprocess(
    image_size: int, mean: Sequence[float], std: Sequence[float], interpolation: str = "bicubic"
) -> dict:
    """`Splits.preprocess` of a dataset whose images are `image_size` squares (CIFAR, MNIST)."""
    return {
        "input_size": (len(mean), image_size, image_size),
        "mean": tuple(float(m) for m in mean),
        "std": tuple(float(s) for s in std),
        "interpolation": interpolation,
        "crop_pct": 1.0,
    }


def small_image_transforms(
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    train: bool,
    augment: bool,
    native_size: int = 32,
    hflip: bool = True,
) -> T.Compose:
    """Resize when needed; for training with `augment`: random crop with 1/8 padding and, with
    `hflip`, a horizontal flip. For CIFAR (32 px) and MNIST (28 px) style images."""
    steps: list = []
    if train and augment:
        steps.append(T.RandomCrop(image_size, padding=_crop_padding(image_size)))
        if hflip:
            steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if image_size != native_size:
        # resizing first keeps the crop padding in the target's scale
        steps.insert(0, _resize(image_size))
    return T.Compose(steps)


def small_image_tensors(
    train,
    val,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augment: bool,
    native_size: int = 32,
    hflip: bool = True,
) -> TensorData:
    """`small_image_transforms` as whole tensors, for the device loader (data/device_loader.py).

    `train`, `val`: torchvision datasets whose `data` holds every image as uint8 (N, H, W) or
    (N, H, W, C). The images stay uint8, resized as the pipeline resizes them (PIL, bicubic;
    done once here, ~10 s for 50,000 images), with the pipeline's training augmentation.
    """

    def images(dataset) -> torch.Tensor:
        array = np.asarray(dataset.data)
        if image_size != native_size:
            array = np.stack([np.asarray(_resize(image_size)(Image.fromarray(a))) for a in array])
        pixels = torch.from_numpy(array)
        return pixels.unsqueeze(1) if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2)

    def targets(dataset) -> torch.Tensor:
        return torch.as_tensor(dataset.targets, dtype=torch.long)

    return TensorData(
        train_images=images(train),
        train_targets=targets(train),
        val_images=images(val),
        val_targets=targets(val),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        pad=_crop_padding(image_size) if augment else 0,
        flip=augment and hflip,
    )


def _crop_padding(image_size: int) -> int:
    return image_size // 8  # 4 px for CIFAR's 32, 3 for MNIST's 28


def _resize(image_size: int) -> T.Resize:
    return T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC)
