"""Multi-label metrics (several classes per image, multi-hot targets), as MMPretrain reports them.

All in % (as top-1 is), from sigmoid scores (N, C) and multi-hot targets (N, C):
  mAP       mean over classes of average precision: AP = sum_n (R_n - R_{n-1}) P_n over the
            distinct scores, highest first (scikit-learn's average_precision_score, tied scores
            taken together). A class with no positive image has AP 0 and still counts in the
            mean, as in scikit-learn's macro average and MMPretrain's mAP.
  CP CR CF1 per-class precision, recall and F1, averaged over classes (macro: scikit-learn's
            precision_recall_fscore_support(average="macro", zero_division=0), MMPretrain's
            average="macro"). A class with no predicted (no positive) image has precision
            (recall) 0. CF1 is the mean of the per-class F1s, not the F1 of CP and CR.
  OP OR OF1 the same over all (image, class) pairs together (micro).
A label is predicted when its score is >= `threshold` (default 0.5): CP ... OF1; or when it is
among the image's `topk` highest scores (default 3): CP_top3 ... OF1_top3.
"""

import csv
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine import distributed
from engine.files import atomic_write_text

THRESHOLD = 0.5
TOPK = 3


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(C,) average precision of each class, in 0..1: scikit-learn's average_precision_score
    (see the module docstring); a class with no positive image gets 0, without a warning."""
    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import average_precision_score

    truth = (targets > 0).cpu().numpy()
    with warnings.catch_warnings():  # "no positive class": its AP is 0, as documented above
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message="No positive class found")
        ap = average_precision_score(truth, scores.double().cpu().numpy(), average=None)
    return torch.as_tensor(ap, dtype=torch.float64).nan_to_num(0.0).reshape(-1)


def predicted(scores: torch.Tensor, threshold: float | None = None, topk: int | None = None):
    """(N, C) bool: labels at or above `threshold`, or among each image's `topk` best."""
    if topk is None:
        return scores >= threshold
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    k = min(topk, scores.shape[1])
    return chosen.scatter_(1, scores.topk(k, dim=1).indices, True)


def per_class(preds: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Precision, recall, F1 (0..1) and support (positives) of each class: (C,) tensors."""
    truth = targets > 0
    hits = (preds & truth).sum(0).double()
    precision = hits / preds.sum(0).clamp(min=1)
    recall = hits / truth.sum(0).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=torch.finfo(torch.float64).eps)
    return {"precision": precision, "recall": recall, "f1": f1, "support": truth.sum(0)}


def scores_at(preds: torch.Tensor, targets: torch.Tensor, suffix: str = "") -> dict[str, float]:
    """CP, CR, CF1 (macro) and OP, OR, OF1 (micro), in %, of predictions `preds` (N, C) bool."""
    per = per_class(preds, targets)
    hits = (preds & (targets > 0)).sum().item()
    op = hits / max(preds.sum().item(), 1)
    o_r = hits / max((targets > 0).sum().item(), 1)
    of1 = 2 * op * o_r / (op + o_r) if op + o_r > 0 else 0.0
    values = {
        "CP": per["precision"].mean().item(),
        "CR": per["recall"].mean().item(),
        "CF1": per["f1"].mean().item(),
        "OP": op,
        "OR": o_r,
        "OF1": of1,
    }
    return {f"{k}{suffix}": 100 * v for k, v in values.items()}


def metrics(
    scores: torch.Tensor, targets: torch.Tensor, threshold: float = THRESHOLD, topk: int = TOPK
) -> dict[str, float]:
    """mAP, CP ... OF1 at `threshold` and CP_top<k> ... OF1_top<k> (%), of sigmoid `scores`."""
    scores, targets = scores.float(), targets > 0
    return {
        "mAP": 100 * average_precision(scores, targets).mean().item(),
        **scores_at(predicted(scores, threshold), targets),
        **scores_at(predicted(scores, topk=topk), targets, f"_top{topk}"),
    }


def metrics_over_ranks(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """`metrics` of the sigmoid of every process's (logits, targets) batches together
    (data-parallel: mAP and the per-class scores need the whole split, not a mean over
    shares); {} when no process saw an image."""
    share = [(logits.float().cpu(), targets.cpu()) for logits, targets in batches]
    shares = [pair for pairs in distributed.gather(share) for pair in pairs]
    if not shares:
        return {}
    scores = torch.cat([s for s, _ in shares]).sigmoid()
    return metrics(scores, torch.cat([t for _, t in shares]))


# ---------------------------------------------------------------------------------------------
# task=eval on multi-label data: what engine/evaluate.py writes for single-label data
#   metrics.json       eval/mAP, eval/CP ... eval/OF1_top3, eval/loss (binary cross-entropy),
#                      eval/images, the threshold, class names, checkpoint
#   per_class.csv      class, ap, precision, recall, f1 (%, at the threshold), support (positives)
#   predictions.jsonl  one line per image: index, path, target (indices), target_labels, pred
#                      (every index at or above the threshold), pred_labels, correct (the same
#                      set), topk [{label, score, index}]

EVAL_FILES = ("metrics.json", "per_class.csv", "predictions.jsonl")


@dataclass
class MultiLabelEvaluation:
    classes: list[str]
    logits: torch.Tensor  # (N, classes), float32, in dataset order
    targets: torch.Tensor  # (N, classes) multi-hot
    threshold: float = THRESHOLD
    topk: int = 5  # labels per image in predictions.jsonl

    @property
    def scores(self) -> torch.Tensor:
        return self.logits.sigmoid()

    @property
    def metrics(self) -> dict:
        found = metrics(self.scores, self.targets, self.threshold)
        loss = F.binary_cross_entropy_with_logits(self.logits, (self.targets > 0).float())
        return {
            **{f"eval/{k}": v for k, v in found.items()},
            "eval/loss": loss.item(),
            "eval/images": len(self.targets),
            "eval/threshold": self.threshold,
        }

    def per_class(self) -> list[dict]:
        """AP, precision, recall, F1 (%, at the threshold) and support (positives) of each class."""
        ap = average_precision(self.scores, self.targets)
        per = per_class(predicted(self.scores, self.threshold), self.targets > 0)
        return [
            {
                "class": name,
                "ap": 100 * float(ap[i]),
                **{k: 100 * float(per[k][i]) for k in ("precision", "recall", "f1")},
                "support": int(per["support"][i]),
            }
            for i, name in enumerate(self.classes)
        ]

    def predictions(self, paths: list[str | None]) -> list[dict]:
        scores, chosen = self.scores, predicted(self.scores, self.threshold)
        k = min(self.topk, len(self.classes))
        top_scores, top_indices = scores.topk(k, dim=-1)
        rows = []
        for i in range(len(scores)):
            truth = torch.nonzero(self.targets[i] > 0).flatten().tolist()
            pred = sorted(torch.nonzero(chosen[i]).flatten().tolist(), key=lambda c: -scores[i, c])
            pairs = zip(top_scores[i].tolist(), top_indices[i].tolist(), strict=True)
            rows.append(
                {
                    "index": i,
                    "path": paths[i],
                    "target": truth,
                    "target_labels": [self.classes[c] for c in truth],
                    "pred": pred,
                    "pred_labels": [self.classes[c] for c in pred],
                    "correct": sorted(pred) == truth,
                    "topk": [{"label": self.classes[c], "score": s, "index": c} for s, c in pairs],
                }
            )
        return rows


def gather_evaluation(logits, targets, classes, threshold: float, topk: int):
    """Data-parallel: the whole split's MultiLabelEvaluation on process 0 (None on the others),
    back in dataset order (process r scored images r, r + N, ... of N processes)."""
    shares = distributed.gather_to_main((logits.float(), targets))
    if shares is None:
        return None
    count, n = sum(len(t) for _, t in shares), len(shares)
    all_logits = torch.empty(count, logits.shape[1])
    all_targets = torch.empty(count, targets.shape[1], dtype=targets.dtype)
    for r, (share_logits, share_targets) in enumerate(shares):
        all_logits[r::n], all_targets[r::n] = share_logits, share_targets
    return MultiLabelEvaluation(list(classes), all_logits, all_targets, threshold, topk)


def write_evaluation(evaluation: MultiLabelEvaluation, paths, folder: Path, source=None) -> dict:
    """Write EVAL_FILES into `folder`; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: folder / name for name in EVAL_FILES}
    summary = {
        **evaluation.metrics,
        "classes": evaluation.classes,
        "checkpoint": None if source is None else str(source),
    }
    atomic_write_text(files["metrics.json"], json.dumps(summary, indent=1) + "\n")
    text = io.StringIO()
    rows = evaluation.per_class()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(
        {k: f"{v:.4f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows
    )
    atomic_write_text(files["per_class.csv"], text.getvalue())
    lines = [json.dumps(r) for r in evaluation.predictions(paths)]
    atomic_write_text(files["predictions.jsonl"], "\n".join(lines) + "\n")
    return files


def log_evaluation(logger, evaluation: MultiLabelEvaluation, dataset, source, wrong: int) -> None:
    """The metrics in the run's summary; in W&B also the per-class table and the first `wrong`
    images whose predicted labels are not their labels."""
    logger.summary({**evaluation.metrics, "eval/checkpoint": str(source)})
    if logger.wandb_run is None:
        return
    import wandb

    from data.images import to_picture

    rows = evaluation.per_class()
    columns = list(rows[0])
    logged = {"eval/per_class": wandb.Table(columns=columns, data=[list(r.values()) for r in rows])}
    if wrong > 0:
        table = wandb.Table(columns=["index", "image", "true", "predicted"])
        for row in [r for r in evaluation.predictions([None] * len(dataset)) if not r["correct"]][
            :wrong
        ]:
            picture = wandb.Image(to_picture(dataset[row["index"]][0]))
            true, pred = ", ".join(row["target_labels"]), ", ".join(row["pred_labels"])
            table.add_data(row["index"], picture, true, pred)
        logged["eval/misclassified"] = table
    logger.wandb_run.log(logged)
