"""Evaluate a trained model on a dataset split: metrics, per-class scores, confusion matrix and a
predictions file that the analysis tools read.

<folder>/ (task=eval writes eval/ in its job folder)
    metrics.json        top-1, top-5, loss, image count, class names, checkpoint
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
from engine.runinfo import atomic_write_text


@dataclass
class Evaluation:
    classes: list[str]
    logits: torch.Tensor  # (N, classes), float32, in dataset order
    targets: torch.Tensor  # (N,)
    topk: int = 5

    @property
    def probs(self) -> torch.Tensor:
        return self.logits.softmax(-1)

    @property
    def preds(self) -> torch.Tensor:
        return self.logits.argmax(-1)

    @property
    def metrics(self) -> dict:
        k5 = min(5, len(self.classes))
        top5 = self.logits.topk(k5, dim=-1).indices
        return {
            "eval/acc1": (self.preds == self.targets).float().mean().item() * 100,
            "eval/acc5": (top5 == self.targets[:, None]).any(-1).float().mean().item() * 100,
            "eval/loss": F.cross_entropy(self.logits, self.targets).item(),
            "eval/images": len(self.targets),
        }

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


@torch.inference_mode()
def evaluate_model(
    model: nn.Module, loader, classes: list[str], topk: int = 5, progress: bool = True
) -> Evaluation:
    """Run `model` (eval mode, on its own device) over `loader`; keep every image's logits."""
    from rich.progress import track

    model.eval()
    param = next(model.parameters())
    logits, targets = [], []
    batches = track(loader, description="eval", transient=True) if progress else loader
    for images, labels in batches:
        out = model(images.to(param.device, param.dtype))
        logits.append(out.float().cpu())
        targets.append(torch.as_tensor(labels))
    return Evaluation(list(classes), torch.cat(logits), torch.cat(targets).long(), topk)


def gather_shares(share: Evaluation) -> Evaluation | None:
    """Data-parallel: the whole split's Evaluation on process 0 (None on the others).

    Each process evaluated its share of the split in eval_loader's order (process r has images
    r, r + N, r + 2N, ... of N processes); they are put back in dataset order. One process:
    `share` itself.
    """
    shares = distributed.gather_to_main((share.logits, share.targets))
    if shares is None:
        return None
    if len(shares) == 1:
        return share
    count, classes = sum(len(t) for _, t in shares), share.logits.shape[1]
    logits, targets = torch.empty(count, classes), torch.empty(count, dtype=torch.long)
    for r, (share_logits, share_targets) in enumerate(shares):
        logits[r :: len(shares)] = share_logits
        targets[r :: len(shares)] = share_targets
    return Evaluation(share.classes, logits, targets, share.topk)


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
        "classes": evaluation.classes,
        "checkpoint": None if source is None else str(source),
    }
    atomic_write_text(files["metrics.json"], json.dumps(metrics, indent=1) + "\n")
    atomic_write_text(files["per_class.csv"], _csv(evaluation.per_class()))
    confusion = evaluation.confusion()
    rows = [
        {"true": name, **dict(zip(evaluation.classes, map(int, row), strict=True))}
        for name, row in zip(evaluation.classes, confusion, strict=True)
    ]
    atomic_write_text(files["confusion_matrix.csv"], _csv(rows))
    lines = [json.dumps(r) for r in evaluation.predictions(sample_paths(dataset))]
    atomic_write_text(files["predictions.jsonl"], "\n".join(lines) + "\n")
    return files


FILES = ("metrics.json", "per_class.csv", "confusion_matrix.csv", "predictions.jsonl")


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
