import torch


def correct_topk(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    """Number of samples whose target is among the top-k logits, for each k (a tensor, no sync)."""
    top = logits.topk(max(ks), dim=1).indices  # (N, max k)
    hits = top == targets.unsqueeze(1)
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks])


def confusion_update(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(C, C) counts of this batch, rows the true class, columns the top-1 prediction (no sync)."""
    num_classes = logits.shape[1]
    pairs = targets.long() * num_classes + logits.argmax(1)
    return torch.bincount(pairs, minlength=num_classes**2).view(num_classes, num_classes)


def add_confusion(confusion, logits: torch.Tensor, targets: torch.Tensor):
    """`confusion` (None before the first batch) plus this batch's; unchanged for multi-hot
    targets (B, C), which have no single true class."""
    if targets.ndim != 1:
        return confusion
    batch = confusion_update(logits, targets)
    return batch if confusion is None else confusion + batch


def class_balanced_metrics(confusion: torch.Tensor) -> dict:
    """macro_f1 and balanced_acc (%) of a confusion matrix, as scikit-learn's f1_score(
    average="macro") and balanced_accuracy_score compute them: F1 over the classes that are true
    or predicted somewhere, recall over the classes present among the targets."""
    confusion = confusion.double()
    hits, support, predicted = confusion.diagonal(), confusion.sum(1), confusion.sum(0)
    f1 = 2 * hits / (support + predicted).clamp(min=1)
    seen = (support + predicted) > 0
    recall = hits[support > 0] / support[support > 0]
    return {
        "macro_f1": (f1[seen].mean() * 100).item() if seen.any() else float("nan"),
        "balanced_acc": (recall.mean() * 100).item() if len(recall) else float("nan"),
    }
