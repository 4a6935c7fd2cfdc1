"""Per-image transforms for datasets of small PIL images (CIFAR-style)."""

from torchvision import transforms as T


def small_image_transforms(
    image_size: int, mean: tuple[float, ...], std: tuple[float, ...], train: bool, augment: bool
) -> T.Compose:
    """Resize when needed; for training with `augment`: random crop with 1/8 padding and flip."""
    steps: list = []
    if train and augment:
        steps += [T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip()]
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if image_size != 32:
        # CIFAR images are 32x32; resizing first keeps the crop padding in the target's scale
        steps.insert(0, T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC))
    return T.Compose(steps)
