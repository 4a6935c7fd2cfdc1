"""Evaluate a trained model on a dataset split: metrics, per-class scores, confusion matrix and a
predictions file that the analysis tools read.

<folder>/ (task=eval writes eval/ in its job folder)
    metrics.json        top-k accuracies, macro/weighted precision/recall/F1, balanced accuracy,
                        NLL, ECE, Brier (engine.calibration.classification_metrics), image count,
                        class names, checkpoint; with task.tta also the same without it
    logits.npz          float32 logits (after TTA), targets, paths and class names: every metric
                        recomputed offline (analysis/eval_metric.py); np.load(allow_pickle=False)
    reliability.png     reliability diagram (accuracy against top score, 15 bins)
    per_class.csv       class, precision, recall, f1, support (%, except support)
    confusion_matrix.csv  rows: true class, columns: predicted class (counts)
    predictions.jsonl   one line per image: index, path (file datasets), target, top-k
"""

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torch import nn
from torch.utils.data import Dataset, Subset

from engine import distributed
from engine.calibration import classification_metrics, reliability_diagram
from engine.runinfo import atomic_write_text


@dataclass
class Evaluation:
    classes: list[str]
    logits: torch.Tensor  # (N, classes), float32, in dataset order
    targets: torch.Tensor  # (N,)
    topk: int = 5
    topk_metrics: tuple[int, ...] = (1, 5)
    plain_logits: torch.Tensor | None = None  # without test-time augmentation (task.tta)
    tta: str = "none"

    @property
    def probs(self) -> torch.Tensor:
        return self.logits.softmax(-1)

    @property
    def preds(self) -> torch.Tensor:
        return self.logits.argmax(-1)

    @property
    def metrics(self) -> dict:
        """eval/<metric> of the logits; with TTA also eval_no_tta/<metric> of the plain ones."""
        targets, ks = self.targets.numpy(), tuple(self.topk_metrics)
        out = classification_metrics(self.logits.numpy(), targets, ks)
        out["eval/loss"] = F.cross_entropy(self.logits, self.targets).item()
        out["eval/images"] = len(self.targets)
        if self.plain_logits is not None:
            plain = self.plain_logits.numpy()
            out |= classification_metrics(plain, targets, ks, prefix="eval_no_tta/")
        return out

    def per_class(self) -> list[dict]:
        """Precision, recall and F1 (%) and support of each class."""
        labels = list(range(len(self.classes)))
        p, r, f1, support = precision_recall_fscore_support(
            self.targets.numpy(), self.preds.numpy(), labels=labels, zero_division=0
        )
        return [
            {
                "class": name,
                "precision": 100 * float(p[i]),
                "recall": 100 * float(r[i]),
                "f1": 100 * float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(self.classes)
        ]

    def confusion(self) -> np.ndarray:
        """(classes, classes) counts: row = true class, column = predicted class."""
        labels = list(range(len(self.classes)))
        return confusion_matrix(self.targets.numpy(), self.preds.numpy(), labels=labels)

    def predictions(self, paths: list[str | None]) -> list[dict]:
        """One record per image: index, path, target, predicted class, top-k labels and scores."""
        k = min(self.topk, len(self.classes))
        scores, indices = self.probs.topk(k, dim=-1)
        rows = []
        for i, (target, row_s, row_i) in enumerate(
            zip(self.targets.tolist(), scores.tolist(), indices.tolist(), strict=True)
        ):
            rows.append(
                {
                    "index": i,
                    "path": paths[i],
                    "target": target,
                    "target_label": self.classes[target],
                    "pred": row_i[0],
                    "pred_label": self.classes[row_i[0]],
                    "score": row_s[0],
                    "correct": row_i[0] == target,
                    "topk": [
                        {"label": self.classes[c], "score": s, "index": c}
                        for s, c in zip(row_s, row_i, strict=True)
                    ],
                }
            )
        return rows


TTA = ("none", "flip", "crops")
CROP_SCALE = 0.875  # crops: the four corners and the centre, each 87.5% of the side, resized back


def check_tta(tta: str, topk_metrics) -> None:
    if tta not in TTA:
        raise ValueError(f"task.tta={tta!r} is not one of {list(TTA)}")
    if not topk_metrics or any(not isinstance(k, int) or k < 1 for k in topk_metrics):
        raise ValueError(f"task.topk_metrics={list(topk_metrics)} must be positive integers")


def tta_views(images: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The batches whose logits are averaged: the images themselves first, then flip (mirror
    image) or crops (five crops of CROP_SCALE, resized to the input size)."""
    if tta == "flip":
        return [images, images.flip(-1)]
    if tta == "crops":
        from torchvision.transforms.v2 import functional as TF

        size = images.shape[-2:]
        crop = [max(1, round(CROP_SCALE * s)) for s in size]
        return [images] + [TF.resize(c, list(size)) for c in TF.five_crop(images, crop)]
    return [images]


@torch.inference_mode()
def evaluate_model(
    model: nn.Module,
    loader,
    classes: list[str],
    topk: int = 5,
    progress: bool = True,
    tta: str = "none",
    topk_metrics=(1, 5),
) -> Evaluation:
    """Run `model` (eval mode, on its own device) over `loader`; keep every image's logits
    (averaged over the TTA views, and the plain ones too when tta is not "none")."""
    from rich.progress import track

    check_tta(tta, topk_metrics)
    model.eval()
    param = next(model.parameters())
    logits, plain, targets = [], [], []
    batches = track(loader, description="eval", transient=True) if progress else loader
    for images, labels in batches:
        views = tta_views(images.to(param.device, param.dtype), tta)
        outs = [model(v).float().cpu() for v in views]
        plain.append(outs[0])
        logits.append(torch.stack(outs).mean(0))
        targets.append(torch.as_tensor(labels))
    return Evaluation(
        list(classes),
        torch.cat(logits),
        torch.cat(targets).long(),
        topk,
        tuple(topk_metrics),
        None if tta == "none" else torch.cat(plain),
        tta,
    )


def gather_shares(share: Evaluation) -> Evaluation | None:
    """Data-parallel: the whole split's Evaluation on process 0 (None on the others).

    Each process evaluated its share of the split in eval_loader's order (process r has images
    r, r + N, r + 2N, ... of N processes); they are put back in dataset order. One process:
    `share` itself.
    """
    plain = share.logits if share.plain_logits is None else share.plain_logits
    shares = distributed.gather_to_main((share.logits, share.targets, plain))
    if shares is None:
        return None
    if len(shares) == 1:
        return share
    count, classes = sum(len(t) for _, t, _ in shares), share.logits.shape[1]
    logits, targets = torch.empty(count, classes), torch.empty(count, dtype=torch.long)
    plains = torch.empty(count, classes)
    for r, (share_logits, share_targets, share_plain) in enumerate(shares):
        logits[r :: len(shares)] = share_logits
        targets[r :: len(shares)] = share_targets
        plains[r :: len(shares)] = share_plain
    plains = None if share.plain_logits is None else plains
    return Evaluation(
        share.classes, logits, targets, share.topk, share.topk_metrics, plains, share.tta
    )


def sample_paths(dataset: Dataset) -> list[str | None]:
    """The file each sample was read from, where the dataset keeps one (ImageFiles, subsets)."""
    if isinstance(dataset, Subset):
        inner = sample_paths(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        return [str(path) for path, _ in samples]
    return [None] * len(dataset)


def write_results(evaluation: Evaluation, dataset: Dataset, folder: Path, source=None) -> dict:
    """Write the files listed at the top of this module into `folder`; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: folder / name for name in FILES}
    metrics = {
        **evaluation.metrics,
        "topk_metrics": list(evaluation.topk_metrics),
        "tta": evaluation.tta,
        "classes": evaluation.classes,
        "checkpoint": None if source is None else str(source),
    }
    atomic_write_text(files["metrics.json"], json.dumps(metrics, indent=1) + "\n")
    paths = sample_paths(dataset)
    files["logits.npz"] = save_logits(evaluation, paths, folder / "logits.npz")
    probs, targets = evaluation.probs.numpy(), evaluation.targets.numpy()
    files["reliability.png"] = reliability_diagram(probs, targets, folder / "reliability.png")
    atomic_write_text(files["per_class.csv"], _csv(evaluation.per_class()))
    confusion = evaluation.confusion()
    rows = [
        {"true": name, **dict(zip(evaluation.classes, map(int, row), strict=True))}
        for name, row in zip(evaluation.classes, confusion, strict=True)
    ]
    atomic_write_text(files["confusion_matrix.csv"], _csv(rows))
    lines = [json.dumps(r) for r in evaluation.predictions(paths)]
    atomic_write_text(files["predictions.jsonl"], "\n".join(lines) + "\n")
    return files


FILES = ("metrics.json", "per_class.csv", "confusion_matrix.csv", "predictions.jsonl")


def save_logits(evaluation: Evaluation, paths: list[str | None], path: Path) -> Path:
    """logits.npz: plain arrays only (unicode strings, no objects), so np.load needs no pickle."""
    arrays = {
        "logits": evaluation.logits.numpy().astype(np.float32),
        "targets": evaluation.targets.numpy().astype(np.int64),
        "index": np.arange(len(evaluation.targets)),
        "paths": np.array(["" if p is None else p for p in paths], dtype=str),
        "classes": np.array(evaluation.classes, dtype=str),
    }
    if evaluation.plain_logits is not None:
        arrays["plain_logits"] = evaluation.plain_logits.numpy().astype(np.float32)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return path


def load_logits(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an eval's logits.npz; never unpickles (allow_pickle=False)."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _csv(rows: list[dict]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()})
    return text.getvalue()


def read_results(folder: str | Path) -> tuple[dict, list[dict], np.ndarray, list[dict]]:
    """(metrics, per-class rows, confusion matrix, predictions) of an eval folder."""
    folder = Path(folder)
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{str(folder)!r} is not an evaluation folder (missing {missing}); "
            "make one with python run.py task=eval"
        )
    metrics = json.loads((folder / "metrics.json").read_text())
    with open(folder / "per_class.csv", newline="") as f:
        per_class = list(csv.DictReader(f))
    with open(folder / "confusion_matrix.csv", newline="") as f:
        confusion = np.array(
            [[int(v) for k, v in row.items() if k != "true"] for row in csv.DictReader(f)]
        )
    predictions = [json.loads(line) for line in (folder / "predictions.jsonl").open()]
    return metrics, per_class, confusion, predictions
