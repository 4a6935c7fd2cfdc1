"""Image files as RGB pictures the right way up, and a dataset of (path, label) samples."""

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from data.splits import Splits

# lower-case suffixes read as images; anything else in a class folder is skipped
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".ppm",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
    ".gif",
)

# transparent pixels are laid on white: product photos and icons, the usual transparent images,
# are drawn on white, and the stored colour under alpha 0 is arbitrary (often black)
BACKGROUND = (255, 255, 255)


def is_image_file(path: str | Path) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def load_image(path: str | Path) -> Image.Image:
    """The image at `path` as 8-bit RGB, turned as its EXIF orientation says.

    Grayscale, bilevel, palette, CMYK and 16-bit images are converted; alpha (RGBA, LA, palette
    transparency) is composited onto white.
    """
    try:
        with Image.open(path) as image:
            # a phone photo is stored sideways with an orientation tag; show it as it was taken
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except OSError as err:  # also PIL.UnidentifiedImageError
        raise OSError(f"cannot read image {str(path)!r}: {err}") from err


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB (see `load_image`)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def to_gray(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit grayscale ('L'), alpha composited onto white as in `to_rgb`."""
    return image if image.mode == "L" else to_rgb(image).convert("L")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit ('I;16*', 'I') and float ('F') grayscale as 8-bit 'L'.

    PIL's own convert clips such values at 255 (a 16-bit image comes out nearly white), so the
    range is scaled: 16-bit by 1/257 (65535 -> 255); floats in 0..1 by 255.
    """
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode == "F" and pixels.size and pixels.max() <= 1.0:
        pixels = pixels * 255.0
    elif image.mode.startswith("I;16") or (pixels.size and pixels.max() > 255):
        pixels = pixels / 257.0
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))  # 2-D uint8: L


def to_picture(image) -> np.ndarray:
    """A model input (C, H, W) tensor, normalised, as an (H, W, 3) uint8 picture to look at.

    Min-max stretched per image: the dataset's mean and std are not needed to show it.
    """
    x = image.detach().float().cpu()
    x = (x - x.min()) / (x.max() - x.min() + 1e-8)
    x = x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


class ImageFiles(Dataset):
    """(image, label) pairs from (path, label) samples, each read with `load_image`."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable | None = None):
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]  # for stratified splits and k-fold
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = load_image(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


def image_file_splits(
    train: Sequence[tuple[str, int]],
    val: Sequence[tuple[str, int]],
    classes: list[str],
    train_transform: Callable | None,
    eval_transform: Callable | None,
) -> Splits:
    """Splits of (path, label) samples; train_eval reads the training images for evaluation."""
    return Splits(
        train=ImageFiles(train, train_transform),
        val=ImageFiles(val, eval_transform),
        classes=classes,
        in_chans=3,
        train_eval=ImageFiles(train, eval_transform),
    )
