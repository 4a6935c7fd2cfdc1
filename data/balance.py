"""Class balance of a training split: its distribution report and class-balanced sampling.

`data.sampler=balanced` draws each epoch's len(train) indices with replacement, image i with
probability proportional to 1 / (images of its class): every class is drawn equally often in
expectation (class-balanced weighted sampling). Chosen over MMPretrain's repeat-factor
sampling (`repeat_thr`), which repeats rare-class images a fixed number of times and so changes
the epoch's length; here an epoch keeps its size, its schedule and its checkpoint positions.
A multi-label image weighs as its rarest positive class (as repeat-factor sampling takes the
max over an image's labels); an image with no label weighs as the most common class.
"""

import torch
from torch.utils.data import Sampler, WeightedRandomSampler

SAMPLERS = ("random", "balanced")


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Images per class: labels are class indices (N,) or multi-hot rows (N, C)."""
    if labels.ndim == 1:
        return torch.bincount(labels.long(), minlength=num_classes)
    return (labels > 0).sum(0).long()


def balanced_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-image sampling weight (N,): 1 / its class's count (multi-hot: its rarest class's)."""
    counts = class_counts(labels, num_classes).double()
    inverse = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    if labels.ndim == 1:
        return inverse[labels.long()]
    rarest = ((labels > 0).double() * inverse).max(1).values
    return torch.where(rarest > 0, rarest, inverse[counts > 0].min())


def balanced_sampler(labels: torch.Tensor, num_classes: int, generator) -> Sampler[int]:
    """len(labels) indices per pass, with replacement, class-balanced, drawn by `generator`."""
    weights = balanced_weights(labels, num_classes)
    return WeightedRandomSampler(weights, len(weights), replacement=True, generator=generator)


def distribution(labels: torch.Tensor, classes: list[str]) -> dict:
    """{counts: {class: images}, imbalance_ratio: max / min over classes with images (inf when
    None when some class has none), empty: the classes with no image}."""
    counts = class_counts(labels, len(classes)).tolist()
    empty = [name for name, n in zip(classes, counts, strict=True) if n == 0]
    present = [n for n in counts if n > 0]
    ratio = max(present) / min(present) if present and not empty else None
    return {
        "counts": dict(zip(classes, counts, strict=True)),
        "imbalance_ratio": ratio,
        "empty": empty,
    }
