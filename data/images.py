"""Image files as RGB pictures the right way up, and a dataset of (path, label) samples.

An image file that does not decode (missing, a dangling link, empty, truncated, not an image at
all) raises `UnreadableImage`. A dataset of files (`ImageFiles`) then follows its `bad_images`
policy: 'fail' stops with the file's path; 'skip' reads the next readable image in its place,
names the file once in a warning and counts it (`skipped_images`).
"""

import logging
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import ConcatDataset, Dataset, get_worker_info

from data.splits import Splits

log = logging.getLogger(__name__)

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

# what a damaged or missing file makes Pillow raise (fuzzing truncated and bit-flipped files of
# every format gives OSError, its UnidentifiedImageError, and ValueError from some plugins); the
# rest of the list are documented Pillow failures. Anything else (MemoryError, a bug) propagates.
DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)

# data.dataset.bad_images: what an unreadable image does in each split. Training skips it (one
# bad download should not end a week-long run); evaluation fails, so that val metrics are always
# over the whole validation set and predictions line up with their files.
BAD_IMAGE_POLICIES = ("skip", "fail")
BAD_IMAGES = MappingProxyType({"train": "skip", "val": "fail"})
# 'skip': the most unreadable files in a row one replacement looks through before giving up; so
# many are an unmounted or half-copied folder more often than a few bad downloads
MAX_BAD_IN_A_ROW = 100
# skip counts: one slot for the main process and one per DataLoader worker (ids 0..1023), so no
# two processes ever add to the same number
COUNT_SLOTS = 1 + 1024


class UnreadableImage(OSError):
    """An image file that does not decode: missing, a dangling link, a folder, empty, truncated,
    or not an image. An OSError, so code that catches those keeps working."""


def is_image_file(path: str | Path) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def load_image(path: str | Path) -> Image.Image:
    """The image at `path` as 8-bit RGB, turned as its EXIF orientation says.

    Grayscale, bilevel, palette, CMYK and 16-bit images are converted; alpha (RGBA, LA, palette
    transparency) is composited onto white. A file that does not decode raises UnreadableImage
    naming it.
    """
    try:
        with Image.open(path) as image:
            # a phone photo is stored sideways with an orientation tag; show it as it was taken
            # (a copy, decoded in full: a truncated file fails here, not in a DataLoader later)
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except DECODE_ERRORS as err:
        raise UnreadableImage(
            f"cannot read image {str(path)!r} ({type(err).__name__}: {err}); the file is missing, "
            "empty, truncated or not an image: replace it or leave it out"
        ) from err


def read_error(path: str | Path) -> str | None:
    """None when `path` loads with `load_image`, else why not, on one line.

    The one test of "unreadable": the files that data.dataset.bad_images skips or fails on are
    the ones analysis/verify_dataset.py lists.
    """
    try:
        load_image(path)
    except UnreadableImage as err:
        cause = err.__cause__ or err
        return f"{type(cause).__name__}: {cause}".replace("\n", " ")
    return None


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
    """(image, label) pairs from (path, label) samples, each read with `load_image`.

    `bad_images` says what a file that does not decode does:
      'fail': raise UnreadableImage naming the file, and `key` (the config key to change).
      'skip': the sample becomes the next readable one of the dataset (image and label), so a
        batch keeps its size; a warning names the file once (in any process), and `skipped`
        counts the sample. DataLoader workers, forked or spawned, count into shared memory that
        the main process reads.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Callable | None = None,
        bad_images: str = "fail",
        key: str = "data.dataset.bad_images",
    ):
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(_bad_policy(key, bad_images))
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]  # for stratified splits and k-fold
        self.transform = transform
        self.bad_images, self.key = bad_images, key
        if bad_images == "skip":
            # made shared before a DataLoader forks or pickles its workers: what a worker writes
            # here, the main process reads. Per sample: the file was found unreadable (warned).
            self._known_bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()
            self._skips = torch.zeros(COUNT_SLOTS, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = load_image(path)
        except UnreadableImage as err:
            if self.bad_images == "fail":
                raise UnreadableImage(
                    f"{err}. Find every such file with `python analysis/verify_dataset.py` and "
                    f"the same data options, or set {self.key}=skip to read the next readable "
                    "image in its place"
                ) from err.__cause__
            worker = get_worker_info()
            self._skips[0 if worker is None else 1 + worker.id % (COUNT_SLOTS - 1)] += 1
            self._warn_once(index, err)
            image, label = self._next_readable(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    @property
    def skipped(self) -> int:
        """Samples replaced so far, by every process ('fail': always 0)."""
        return int(self._skips.sum()) if self.bad_images == "skip" else 0

    def _warn_once(self, index: int, err: UnreadableImage) -> None:
        # only for the sample asked for: an epoch asks for each index once, so one process at a
        # time looks at its flag (a file met while looking for a replacement is left alone)
        if not self._known_bad[index]:
            self._known_bad[index] = True
            log.warning(
                "skipping unreadable image %s (%s: %s): the next readable image takes its "
                "place and the skip is counted (train/skipped_images in training); %s=fail "
                "stops instead",
                self.samples[index][0],
                type(err.__cause__).__name__,
                err.__cause__,
                self.key,
            )

    def _next_readable(self, index: int) -> tuple[Image.Image, int]:
        """The next sample after `index` that loads (wrapping round), past known-bad files."""
        fresh = 0  # unreadable files found by this search, not yet known
        for step in range(1, len(self.samples)):
            j = (index + step) % len(self.samples)
            if self._known_bad[j]:
                continue
            path, label = self.samples[j]
            try:
                return load_image(path), label
            except UnreadableImage as err:
                fresh += 1
                if fresh >= MAX_BAD_IN_A_ROW:
                    raise UnreadableImage(
                        f"{fresh} image files in a row after {self.samples[index][0]!r} cannot "
                        f"be read (the last: {path!r}, {err.__cause__}). Is the data folder "
                        "still mounted and complete? `python analysis/verify_dataset.py` lists "
                        "every unreadable file: remove them, or fix the folder"
                    ) from err.__cause__
        raise UnreadableImage(
            f"none of the {len(self.samples)} image files of this dataset can be read (the first: "
            f"{self.samples[index][0]!r}); check data.dataset.root"
        )


def skipped_images(dataset: Dataset) -> int:
    """Samples of `dataset` replaced so far under bad_images: skip, by every DataLoader worker.

    Counts since the dataset was built, over all epochs: an epoch's count is the difference
    across it. Looks through Subset / LabelledSubset, ConcatDataset and any wrapper that keeps
    its dataset in `.dataset`; 0 for datasets that cannot skip (tensors in memory, 'fail'). A
    Subset reports its whole underlying dataset, which only it reads in a k-fold training split.
    In data-parallel runs each process counts its own share.
    """
    if isinstance(dataset, ImageFiles):
        return dataset.skipped
    if isinstance(dataset, ConcatDataset):
        return sum(skipped_images(d) for d in dataset.datasets)
    inner = getattr(dataset, "dataset", None)
    return skipped_images(inner) if isinstance(inner, Dataset) else 0


def bad_image_policies(bad_images: str | Mapping[str, str]) -> dict[str, str]:
    """{'train': policy, 'val': policy} of data.dataset.bad_images: one policy for both splits
    ('skip' | 'fail') or one per split ({train: skip, val: fail}; a split left out keeps its
    default, BAD_IMAGES)."""
    key = "data.dataset.bad_images"
    if isinstance(bad_images, str):
        chosen = {split: bad_images for split in BAD_IMAGES}
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(_bad_policy(key, bad_images))
    elif isinstance(bad_images, Mapping):
        unknown = sorted(str(k) for k in bad_images if k not in BAD_IMAGES)
        if unknown:
            raise ValueError(
                f"{key} has keys {unknown}; it takes 'train' and 'val' ({key}.train=skip), or "
                f"one policy for both ({key}=skip)"
            )
        chosen = {**BAD_IMAGES, **bad_images}
    else:
        raise ValueError(
            f"{key}={bad_images!r} is neither a policy nor a mapping; give 'skip' or 'fail', "
            "or {train: skip, val: fail}"
        )
    for split, policy in chosen.items():
        if policy not in BAD_IMAGE_POLICIES:
            raise ValueError(_bad_policy(f"{key}.{split}", policy))
    return chosen


def _bad_policy(key: str, value) -> str:
    return (
        f"{key}={value!r} is not a policy for unreadable images; use 'skip' (read the next "
        "readable image instead, warn and count) or 'fail' (stop, naming the file)"
    )


def image_file_splits(
    train: Sequence[tuple[str, int]],
    val: Sequence[tuple[str, int]],
    classes: list[str],
    train_transform: Callable | None,
    eval_transform: Callable | None,
    bad_images: str | Mapping[str, str] = BAD_IMAGES,
) -> Splits:
    """Splits of (path, label) samples; train_eval reads the training images for evaluation.

    `bad_images` (see `bad_image_policies`): the train policy is the training split's; the val
    policy is the validation split's and train_eval's (task=eval on either split, k-fold's
    validation fold), since evaluation is what must see every image.
    """
    policy = bad_image_policies(bad_images)
    key = "data.dataset.bad_images"
    return Splits(
        train=ImageFiles(train, train_transform, policy["train"], f"{key}.train"),
        val=ImageFiles(val, eval_transform, policy["val"], f"{key}.val"),
        classes=classes,
        in_chans=3,
        train_eval=ImageFiles(train, eval_transform, policy["val"], f"{key}.val"),
    )
