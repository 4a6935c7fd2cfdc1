"""A grid of dataset samples, each shown as loaded and as the model gets it.

python analysis/browse_dataset.py                                   # data=digits, 16 train samples
python analysis/browse_dataset.py data=imagefolder data.dataset.root=/data/pets +n=24 +out=pets.png
python analysis/browse_dataset.py data=cifar10 +split=val seed=1 +out=cifar_val.pdf

The datasets come from engine/build.py's build_splits, so the right-hand picture of each pair is
what training reads: the split's own transform (train: the augmentations, drawn afresh for
every seed; val: the evaluation transform), denormalised with the pipeline's own Normalize
(else stretched to its min-max) for display. The left-hand picture is the sample before any
transform: the decoded image file (ImageFiles: RGB, EXIF-turned, as `load_image` reads it),
torchvision's raw uint8 image (CIFAR, MNIST), or the stored tensor (digits, mnist5k: these are
preprocessed once in memory and have no per-sample transform, so the two pictures agree).
`+n` samples (16) of `+split` (train | val), drawn by `seed` (the config's own key, 0), written
to `+out` (outputs/analysis/samples_<split>.png, git-ignored; the suffix picks the format:
.png, .pdf, .svg).
"""

import logging
import math
import random
import textwrap
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision import transforms as T

from analysis.cli import TOOL_OUT, no_run_folder

log = logging.getLogger(__name__)

# inches. One sample is a cell: its class name, then two square panels side by side, each with
# a two-line caption below; cells are GAP_IN apart and the figure title sits above them all.
PANEL_IN, PAIR_GAP_IN, TITLE_IN, CAPTION_IN, GAP_IN, HEADER_IN = 1.6, 0.08, 0.3, 0.32, 0.2, 0.5
CELL_W_IN = 2 * PANEL_IN + PAIR_GAP_IN + GAP_IN
CELL_H_IN = TITLE_IN + PANEL_IN + CAPTION_IN + GAP_IN
DPI = 150  # a 16-sample grid is 2088 x 1527 px: sharp in print across a page


def unwrap(dataset: Dataset, index: int) -> tuple[Dataset, int]:
    """The dataset that holds sample `index` of `dataset`, and its index there, through any
    Subset (k-fold's LabelledSubset) wrapping."""
    while isinstance(dataset, Subset):
        dataset, index = dataset.dataset, int(dataset.indices[index])
    return dataset, index


def as_loaded(dataset: Dataset, index: int) -> Image.Image | torch.Tensor:
    """Sample `index` before its transform: a PIL image, or the stored tensor of a
    TensorDataset. Any dataset that applies `self.transform` (ImageFiles, torchvision's) is read
    through a shallow copy with no transform, so the reading itself is the dataset's own."""
    from data.torchvision_files import with_transform

    base, i = unwrap(dataset, index)
    if isinstance(base, TensorDataset):
        return base.tensors[0][i]
    if not hasattr(base, "transform"):
        raise TypeError(
            f"{type(base).__name__} has neither a `transform` attribute nor tensors; "
            "browse_dataset reads the untransformed sample of ImageFiles, torchvision datasets "
            "and TensorDatasets"
        )
    return with_transform(base, None)[i][0]


def transform_of(dataset: Dataset):
    """The per-sample transform of `dataset` (None for a TensorDataset)."""
    base, _ = unwrap(dataset, 0)
    return getattr(base, "transform", None)


def find_normalize(transform) -> T.Normalize | None:
    """The last torchvision Normalize inside `transform` (nested Compose included), or None."""
    if isinstance(transform, T.Normalize):
        return transform
    found = None
    for step in getattr(transform, "transforms", None) or []:
        found = find_normalize(step) or found
    return found


def to_display(image, normalize: T.Normalize | None = None) -> np.ndarray:
    """`image` as a float array in [0, 1], (H, W) for one channel or (H, W, 3).

    PIL images and uint8 tensors are scaled by 1/255; a float tensor is denormalised with
    `normalize` (values out of range, such as random erasing's noise, are clipped), else
    stretched from its min-max to [0, 1].
    """
    if isinstance(image, Image.Image):
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        return np.asarray(image, dtype=np.float32) / 255.0
    pixels = torch.as_tensor(image).detach().cpu()
    if pixels.ndim == 2:
        pixels = pixels.unsqueeze(0)
    if pixels.dtype == torch.uint8:
        pixels = pixels.float() / 255.0
    elif normalize is not None:
        mean = torch.as_tensor(normalize.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.as_tensor(normalize.std, dtype=torch.float32).view(-1, 1, 1)
        pixels = (pixels.float() * std + mean).clamp(0.0, 1.0)
    else:
        pixels = pixels.float()
        low, high = pixels.min(), pixels.max()
        pixels = (pixels - low) / (high - low) if high > low else torch.zeros_like(pixels)
    if pixels.shape[0] == 1:
        return pixels[0].numpy()
    return pixels[:3].permute(1, 2, 0).numpy()  # (C, H, W) -> (H, W, C)


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, columns) of sample pairs: a near-square grid, never wider than it is tall."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def figure_size(n: int) -> tuple[float, float]:
    """Width, height in inches of the grid of `n` samples; times DPI, the PNG's pixels."""
    rows, cols = grid_shape(n)
    return cols * CELL_W_IN, HEADER_IN + rows * CELL_H_IN


def samples(dataset: Dataset, n: int, seed: int) -> list[dict]:
    """`n` distinct samples of `dataset` chosen by `seed`, sorted by label then index: each
    {index, label, loaded, model_input, unreadable}. The transform's random draws are fixed by
    `seed` too and the global RNG state is restored afterwards. `unreadable`: None, or the path
    of the sample's file when it does not decode and the split's bad_images=skip put the next
    readable image in its place (a warning names it; the figure marks it)."""
    from data.images import skipped_images
    from engine.rng import get_rng_state, seed_everything, set_rng_state

    if n < 1:
        raise ValueError(f"n={n} must be at least 1 sample")
    if len(dataset) == 0:
        raise ValueError("the split holds no samples")
    chosen = sorted(random.Random(seed).sample(range(len(dataset)), min(n, len(dataset))))
    state = get_rng_state()
    seed_everything(seed)
    try:
        rows = []
        for index in chosen:
            skipped = skipped_images(dataset)
            model_input, label = dataset[index]
            loaded = as_loaded(dataset, index)
            row = {"index": index, "label": int(label), "loaded": loaded}
            row["model_input"], row["unreadable"] = model_input, None
            if skipped_images(dataset) > skipped:  # the file did not decode: a substitute
                base, i = unwrap(dataset, index)
                row["unreadable"] = str(base.samples[i][0])
                log.warning(
                    "sample %d: %s is unreadable; its cell shows the next readable image, "
                    "marked in red",
                    index,
                    row["unreadable"],
                )
            rows.append(row)
    finally:
        set_rng_state(state)
    return sorted(rows, key=lambda r: (r["label"], r["index"]))


def _size(image) -> str:
    if isinstance(image, Image.Image):
        return f"{image.width}×{image.height}"
    return "×".join(str(s) for s in torch.as_tensor(image).shape)  # (C, H, W) of a tensor


def _cell_title(row: dict, classes: list[str]) -> str:
    if row.get("unreadable"):  # the file did not decode: the pictures are the next sample's
        return f"unreadable: {Path(row['unreadable']).name}"
    return classes[row["label"]] if row["label"] < len(classes) else str(row["label"])


def draw(rows: list[dict], classes: list[str], title: str, transform_name: str, normalize, out):
    """The grid of `rows` (see `samples`) written to `out`; returns its path."""
    import matplotlib.pyplot as plt

    fig = grid(rows, classes, title, transform_name, normalize)
    out = Path(out)
    if not out.suffix:
        out = out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)  # no bbox_inches="tight": the PNG keeps figure_size x DPI pixels
    plt.close(fig)
    return out


def grid(rows: list[dict], classes: list[str], title: str, transform_name: str, normalize):
    """The figure of `rows`: per sample its class name (or, in red, the unreadable file's
    name), the picture as loaded and as the model gets it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, n_cols = grid_shape(len(rows))
    width, height = figure_size(len(rows))
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    fig.text(0.5, 1 - 0.15 / height, title, ha="center", va="top", fontsize=13)

    def box(left_in, top_in, w_in, h_in):  # inches from the top left -> figure fractions
        return [left_in / width, 1 - (top_in + h_in) / height, w_in / width, h_in / height]

    for k, row in enumerate(rows):
        r, c = divmod(k, n_cols)
        left, top = c * CELL_W_IN + GAP_IN / 2, HEADER_IN + r * CELL_H_IN
        bad = row.get("unreadable")
        fig.text(
            (left + (CELL_W_IN - GAP_IN) / 2) / width,
            1 - (top + 0.8 * TITLE_IN) / height,
            textwrap.shorten(_cell_title(row, classes), width=34, placeholder="…"),
            ha="center",
            va="bottom",
            fontsize=11,
            fontweight="bold",
            color="red" if bad else "black",
        )
        loaded_caption = "next readable image" if bad else "as loaded"
        pictures = [
            (to_display(row["loaded"]), f"{loaded_caption}\n{_size(row['loaded'])}"),
            (
                to_display(row["model_input"], normalize),
                f"{transform_name}\n{_size(row['model_input'])}",
            ),
        ]
        for j, (pixels, caption) in enumerate(pictures):
            panel = box(left + j * (PANEL_IN + PAIR_GAP_IN), top + TITLE_IN, PANEL_IN, PANEL_IN)
            ax = fig.add_axes(panel)
            gray = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0} if pixels.ndim == 2 else {}
            ax.imshow(pixels, interpolation="antialiased", **gray)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():  # a hairline frame: white pictures on white paper
                spine.set_color("red" if bad else "0.75")
                spine.set_linewidth(2.0 if bad else 0.6)
            # under the panel's box, not the picture: captions line up whatever the aspect
            below = panel[1] - 0.04 / height
            fig.text(panel[0] + panel[2] / 2, below, caption, ha="center", va="top", fontsize=8)
    return fig


def browse(cfg: DictConfig, n: int = 16, split: str = "train", out=None, seed: int = 0) -> Path:
    """Draw `n` samples of `split` (train | val) of cfg's dataset, each as loaded and after the
    split's transform, with its class name; write the grid to `out` (default
    outputs/analysis/samples_<split>.png) and return its path."""
    from engine.build import build_splits

    if split not in ("train", "val"):
        raise ValueError(f"split={split!r} must be 'train' or 'val'")
    splits = build_splits(cfg)
    dataset = getattr(splits, split)
    transform = transform_of(dataset)
    rows = samples(dataset, n, seed)
    name = str(cfg.data.dataset._target_).rsplit(".", 1)[-1]
    title = f"{name}, {split} split: {len(rows)} of {len(dataset):,} samples (seed {seed})"
    if transform is None:
        caption = "stored, no transform"
    else:
        caption = f"{'train' if split == 'train' else 'eval'} transform"
    out = out if out is not None else TOOL_OUT / f"samples_{split}.png"
    return draw(rows, splits.classes, title, caption, find_normalize(transform), out)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    path = browse(
        cfg,
        n=cfg.get("n", 16),
        split=cfg.get("split", "train"),
        out=cfg.get("out"),
        seed=cfg.seed,  # the config's own key: `seed=1`, no `+`
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    no_run_folder()
    main()
