"""What a trained model's features look like and how good they are: a t-SNE map and k-NN accuracy.

    python analysis/embeddings.py                              # the newest run, val split
    python analysis/embeddings.py outputs/<date>/<time> --k 10 --limit 2000 --out figures/

Features are the pooled, pre-classifier ones (models.features: timm's forward_features, then
forward_head(pre_logits=True)) of the run's images, preprocessed with the evaluation transform,
as Classifier.features gives them. Written into <run>/embeddings/ (or --out):
  tsne_<split>.png       a 2-D t-SNE (scikit-learn) of the split's features, coloured by class
  features_<split>.npz   the features (N, num_features) and labels, for downstream use
  embeddings.json        k-NN accuracy (%): a k-nearest-neighbour classifier (scikit-learn,
                         cosine distance, majority vote of k) whose bank is the train split's
                         features and whose queries are the val split's; how well the features
                         separate the classes with no classifier trained on them
The k-NN accuracy is printed too. --limit N takes the first N images of each split (t-SNE costs
O(N log N) and the bank is held in memory).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

DPI = 150
TSNE_SEED = 0  # t-SNE starts from a random layout: the same seed draws the same map
LEGEND_UP_TO = 20  # classes named in the legend; more are only colours


def split_features(trained, split: str = "val", limit: int | None = None, batch_size: int = 64):
    """(features (N, num_features) float32, labels (N,) int64) of `split` (val | train) of the
    run's dataset, read with the evaluation transform; the first `limit` images if given."""
    from omegaconf import OmegaConf

    from engine.build import build_eval_data
    from models.features import check_feature_api, pooled_features

    check_feature_api(trained.model)
    dataset, _ = build_eval_data(OmegaConf.create(trained.config), trained.classes, split)
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    model = trained.model.eval()
    device = next(model.parameters()).device
    features, labels = [], []
    with torch.inference_mode():
        for images, targets in loader:
            features.append(pooled_features(model, images.to(device)).float().cpu())
            labels.append(torch.as_tensor(targets))
    return torch.cat(features).numpy(), torch.cat(labels).numpy().astype(np.int64)


def knn_accuracy(bank, bank_labels, queries, query_labels, k: int = 20) -> float:
    """Top-1 accuracy (%) of a k-nearest-neighbour vote (cosine distance) over `bank`."""
    from sklearn.neighbors import KNeighborsClassifier

    if not 1 <= k <= len(bank):
        raise ValueError(f"k={k} must be between 1 and the bank's size ({len(bank)} images)")
    knn = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(bank, bank_labels)
    return float(100.0 * (knn.predict(queries) == query_labels).mean())


def tsne(features: np.ndarray, seed: int = TSNE_SEED) -> np.ndarray:
    """(N, 2) t-SNE of `features`; perplexity 30, or less for fewer than 91 points (it must
    stay below N / 3)."""
    from sklearn.manifold import TSNE

    if len(features) < 4:
        raise ValueError(f"a t-SNE map needs 4 or more images; the split has {len(features)}")
    perplexity = min(30.0, (len(features) - 1) / 3)
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


def plot_tsne(points: np.ndarray, labels: np.ndarray, classes: list[str], title: str, out: Path):
    """The 2-D map, one colour per class (named in a legend beside it up to LEGEND_UP_TO)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    fig, ax = plt.subplots(figsize=(7.5, 6), dpi=DPI)
    n = len(classes)
    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"].resampled(n)
    for c in np.unique(labels):
        shown = labels == c
        ax.scatter(*points[shown].T, s=10, color=cmap(int(c)), label=classes[c], alpha=0.8, lw=0)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_xticks([])
    ax.set_yticks([])
    if len(classes) <= LEGEND_UP_TO:
        ax.legend(
            title="class",
            loc="upper left",
            bbox_to_anchor=(1.01, 1),
            fontsize="small",
            markerscale=2,
            frameon=False,
        )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def embeddings(run=None, split="val", k=20, limit=None, use_ema=False, out=None) -> dict:
    """Features, t-SNE map and k-NN accuracy of a run (see the module docstring); returns what
    embeddings.json holds."""
    from engine.predict import load_trained

    if split not in ("val", "train"):
        raise ValueError(f"split={split!r} must be 'val' or 'train'")
    if k < 1:
        raise ValueError(f"k={k} must be between 1 and the bank's size (the train images)")
    if limit is not None and limit < 4:
        raise ValueError(f"limit={limit} must be 4 or more images")
    trained = load_trained(run, use_ema=use_ema)
    out = Path(out) if out is not None else trained.source.parent.parent / "embeddings"
    bank, bank_labels = split_features(trained, "train", limit)
    queries, query_labels = split_features(trained, "val", limit)
    accuracy = knn_accuracy(bank, bank_labels, queries, query_labels, k)
    shown, shown_labels = (queries, query_labels) if split == "val" else (bank, bank_labels)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / f"features_{split}.npz", features=shown, labels=shown_labels)
    title = (
        f"{trained.model_name}, {split} split: t-SNE of {len(shown)} images' "
        f"{shown.shape[1]}-d features\nk-NN top-1 {accuracy:.1f}% (k={k}, cosine, train bank)"
    )
    png = plot_tsne(tsne(shown), shown_labels, trained.classes, title, out / f"tsne_{split}.png")
    result = {
        "run": str(trained.source),
        "weights": trained.info.get("weights", "model"),
        "num_features": int(shown.shape[1]),
        "knn": {"k": k, "metric": "cosine", "acc1": accuracy},
        "bank": {"split": "train", "images": len(bank)},
        "queries": {"split": "val", "images": len(queries)},
        "tsne": {"split": split, "images": len(shown), "png": str(png)},
    }
    from engine.files import atomic_write_text

    atomic_write_text(out / "embeddings.json", json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", nargs="?", help="run folder, checkpoint or .safetensors (newest)")
    parser.add_argument("--split", default="val", choices=("val", "train"), help="t-SNE of")
    parser.add_argument("--k", type=int, default=20, help="neighbours that vote (20)")
    parser.add_argument("--limit", type=int, help="the first N images of each split")
    parser.add_argument("--use-ema", action="store_true", help="the checkpoint's EMA weights")
    parser.add_argument("--out", type=Path, help="folder (default: <run>/embeddings)")
    args = parser.parse_args(argv)
    try:
        result = embeddings(args.run, args.split, args.k, args.limit, args.use_ema, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"embeddings: {err}", file=sys.stderr)
        return 1
    knn = result["knn"]
    print(
        f"k-NN top-1 {knn['acc1']:.2f}% (k={knn['k']}, cosine; {result['bank']['images']} train "
        f"images as the bank, {result['queries']['images']} val queries, "
        f"{result['num_features']}-d features)"
    )
    print(f"wrote {result['tsne']['png']}")
    print(f"wrote {Path(result['tsne']['png']).parent / 'embeddings.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
