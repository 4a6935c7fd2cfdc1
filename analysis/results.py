"""Figures of an evaluation (python run.py task=eval): the confusion matrix, the per-class
precision / recall / F1 table, and the most confident correct and wrong predictions.

    python analysis/results.py                          # the newest outputs/*/*/eval folder
    python analysis/results.py outputs/<date>/<time> --normalize --n 12 --out figures/

Writes confusion_matrix.png and confident.png into the evaluation folder (or --out), prints the
per-class table. Images of file datasets are read from their paths; in-memory datasets (digits,
CIFAR, MNIST) are rebuilt from the evaluation's config.yaml through the engine's builders.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from engine.evaluate import read_results

DPI = 200
ANNOTATE_UP_TO = 30  # classes; a larger matrix is drawn without numbers in its cells


def latest_eval(root: str | Path = "outputs") -> Path:
    """The newest eval folder under `root` (outputs/<date>/<time>/eval)."""
    found = sorted(p.parent for p in Path(root).glob("*/*/eval/metrics.json"))
    if not found:
        raise FileNotFoundError(
            f"no evaluation under {str(root)!r}: run python run.py task=eval first, "
            "or name an eval folder"
        )
    return found[-1]


def eval_folder(path: str | Path | None) -> Path:
    """`path` itself, its eval/ sub-folder (a task=eval job folder), or the newest eval."""
    if path is None:
        return latest_eval()
    path = Path(path)
    return path / "eval" if (path / "eval" / "metrics.json").is_file() else path


def plot_confusion(confusion: np.ndarray, classes: list[str], normalize: bool, out: Path) -> Path:
    """The confusion matrix (rows: true class) as a heat map; normalize: each row sums to 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = confusion.astype(float)
    if normalize:
        values = values / np.maximum(values.sum(1, keepdims=True), 1)
    n = len(classes)
    side = min(max(4.0, 0.45 * n + 2), 24)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = range(n)
    ax.set_xticks(ticks, classes, rotation=90 if n > 10 else 0, fontsize=8)
    ax.set_yticks(ticks, classes, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    accuracy = np.trace(confusion) / max(confusion.sum(), 1) * 100
    ax.set_title(
        f"confusion matrix{' (row-normalised)' if normalize else ''}, top-1 {accuracy:.2f}%"
    )
    if n <= ANNOTATE_UP_TO:
        threshold = values.max() / 2 if values.size else 0
        for i in range(n):
            for j in range(n):
                text = f"{values[i, j]:.2f}" if normalize else str(int(values[i, j]))
                colour = "white" if values[i, j] > threshold else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color=colour)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def most_confident(predictions: list[dict], n: int) -> tuple[list[dict], list[dict]]:
    """(the n correct, the n wrong) predictions with the highest top-1 scores."""
    ranked = sorted(predictions, key=lambda p: p["score"], reverse=True)
    return [p for p in ranked if p["correct"]][:n], [p for p in ranked if not p["correct"]][:n]


def sample_pictures(folder: Path, rows: list[dict], classes: list[str]) -> list[np.ndarray]:
    """The image of each prediction row: its file, or its sample of the rebuilt dataset."""
    from data.images import load_image, to_picture

    if all(row["path"] for row in rows):
        return [np.asarray(load_image(row["path"])) for row in rows]
    from omegaconf import OmegaConf

    from engine.build import build_eval_data
    from engine.checks import check_saved_config

    config = folder.parent / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(
            f"{str(config)!r} is missing: the evaluation's config rebuilds its in-memory dataset"
        )
    saved = OmegaConf.to_container(OmegaConf.load(config))
    check_saved_config(saved, config)  # a file's content: listed builders only, no ${...}
    cfg = OmegaConf.create(saved)
    dataset, _ = build_eval_data(cfg, classes, cfg.task.split)
    return [to_picture(dataset[row["index"]][0]) for row in rows]


def plot_confident(folder: Path, predictions: list[dict], classes, n: int, out: Path) -> Path:
    """Two rows of panels: the n most confident correct and the n most confident wrong."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    correct, wrong = most_confident(predictions, n)
    groups = [
        ("most confident correct", correct, "tab:green"),
        ("most confident wrong", wrong, "tab:red"),
    ]
    pictures = sample_pictures(folder, correct + wrong, classes) if correct or wrong else []
    cols = max(len(correct), len(wrong), 1)
    fig = plt.figure(figsize=(1.9 * cols, 5.4), layout="constrained")
    k = 0
    for subfig, (title, rows, colour) in zip(fig.subfigures(2, 1), groups, strict=True):
        subfig.suptitle(title, x=0.01, ha="left", fontsize=10, color=colour)
        axes = subfig.subplots(1, cols, squeeze=False)[0]
        for ax in axes:
            ax.axis("off")
        if not rows:
            axes[0].text(0.5, 0.5, "none", ha="center", va="center", transform=axes[0].transAxes)
        for ax, row in zip(axes, rows, strict=False):
            ax.imshow(pictures[k], cmap="gray" if pictures[k].ndim == 2 else None)
            k += 1
            label = f"true {row['target_label']}\npred {row['pred_label']} {row['score']:.2f}"
            ax.set_title(label, fontsize=7, color=colour)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def print_per_class(per_class: list[dict], metrics: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("class", "precision %", "recall %", "F1 %", "images", title="per class")
    for row in per_class:
        values = (float(row[k]) for k in ("precision", "recall", "f1"))
        table.add_row(row["class"], *(f"{v:.2f}" for v in values), row["support"])
    caption = f"top-1 {metrics['eval/acc1']:.2f}%  top-5 {metrics['eval/acc5']:.2f}%"
    table.caption = f"{caption}  loss {metrics['eval/loss']:.4f}  ({metrics['eval/images']} images)"
    Console().print(table)


def results(
    folder: str | Path | None = None,
    normalize: bool = False,
    n: int = 8,
    out: str | Path | None = None,
) -> dict[str, Path]:
    """Write the figures of eval folder `folder` (None: the newest) into `out` (the folder)."""
    folder = eval_folder(folder)
    metrics, per_class, confusion, predictions = read_results(folder)
    out = Path(out) if out is not None else folder
    out.mkdir(parents=True, exist_ok=True)
    classes = metrics["classes"]
    print_per_class(per_class, metrics)
    return {
        "confusion matrix": plot_confusion(
            confusion, classes, normalize, out / "confusion_matrix.png"
        ),
        "most confident": plot_confident(folder, predictions, classes, n, out / "confident.png"),
        "per-class table": folder / "per_class.csv",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "folder", nargs="?", help="eval folder or task=eval job folder (default: newest)"
    )
    parser.add_argument("--normalize", action="store_true", help="confusion matrix rows sum to 1")
    parser.add_argument("--n", type=int, default=8, help="images per row of confident.png")
    parser.add_argument("--out", help="folder for the figures (default: the eval folder)")
    args = parser.parse_args(argv)
    try:
        written = results(args.folder, args.normalize, args.n, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for what, path in written.items():
        print(f"{what}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
