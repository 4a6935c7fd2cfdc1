"""Metrics of saved logits, calibration (ECE, Brier, reliability diagram) and temperature scaling.

Every number of task=eval comes from `classification_metrics(logits, targets)`, a function of the
logits alone, so `analysis/eval_metric.py` recomputes them from eval/logits.npz without the model.
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, precision_recall_fscore_support

ECE_BINS = 15  # equal-width confidence bins (Guo et al. 2017)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return torch.from_numpy(np.asarray(logits, np.float32) / temperature).softmax(-1).numpy()


def ece(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error (%): over `bins` equal-width bins of the top score, the
    image-weighted mean of |accuracy - mean top score|. A score of exactly 0 falls in bin 0."""
    confidence, correct = probs.max(-1), probs.argmax(-1) == targets
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() * abs(correct[inside].mean() - confidence[inside].mean())
    return 100 * total / len(targets)


def brier(probs: np.ndarray, targets: np.ndarray) -> float:
    """Multi-class Brier score: mean over images of sum over classes of (p - one-hot)^2."""
    onehot = np.eye(probs.shape[1])[targets]
    return float(((probs - onehot) ** 2).sum(-1).mean())


def classification_metrics(
    logits: np.ndarray,
    targets: np.ndarray,
    topk: tuple[int, ...] = (1, 5),
    bins: int = ECE_BINS,
    prefix: str = "eval/",
) -> dict:
    """Top-k accuracy for each k (%), macro and weighted precision/recall/F1 (%), balanced
    accuracy (%), NLL (nats), ECE with `bins` bins (%) and Brier score of one split's logits."""
    logits, targets = np.asarray(logits, np.float32), np.asarray(targets, np.int64)
    classes = logits.shape[1]
    order = np.argsort(-logits, axis=1, kind="stable")
    out = {}
    for k in topk:
        hit = (order[:, : min(k, classes)] == targets[:, None]).any(-1)
        out[f"acc{k}"] = 100 * float(hit.mean())
    preds, labels = order[:, 0], list(range(classes))
    for average in ("macro", "weighted"):
        p, r, f1, _ = precision_recall_fscore_support(
            targets, preds, labels=labels, average=average, zero_division=0
        )
        out |= {f"precision_{average}": 100 * p, f"recall_{average}": 100 * r}
        out[f"f1_{average}"] = 100 * f1
    out["balanced_acc"] = 100 * float(balanced_accuracy_score(targets, preds))
    t_logits, t_targets = torch.from_numpy(logits), torch.from_numpy(targets)
    out["nll"] = float(F.cross_entropy(t_logits, t_targets))
    probs = softmax(logits)
    out[f"ece{bins}"] = ece(probs, targets, bins)
    out["brier"] = brier(probs, targets)
    return {prefix + k: float(v) for k, v in out.items()}


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature T > 0 that minimises the NLL of softmax(logits / T) (LBFGS on log T)."""
    logits = torch.as_tensor(np.asarray(logits, np.float32), dtype=torch.float64)
    targets = torch.as_tensor(np.asarray(targets, np.int64))
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def reliability_diagram(
    probs: np.ndarray, targets: np.ndarray, path: Path, bins: int = ECE_BINS, title: str = ""
) -> Path:
    """PNG: accuracy against mean top score in each of `bins` bins, the diagonal of perfect
    calibration, and how many images each bin holds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confidence, correct = probs.max(-1), probs.argmax(-1) == targets
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    acc = np.bincount(which, weights=correct, minlength=bins) / np.maximum(counts, 1)
    edges = np.linspace(0, 1, bins + 1)
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.bar(edges[:-1], acc, width=1 / bins, align="edge", edgecolor="black", label="accuracy")
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_ylabel("accuracy in bin")
    top.set_ylim(0, 1)
    top.set_title(f"{title}ECE ({bins} bins) = {ece(probs, targets, bins):.2f}%", pad=24)
    # above the axes: inside, it would hide bars wherever the model's scores fall
    top.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    bottom.bar(edges[:-1], counts, width=1 / bins, align="edge", edgecolor="black")
    bottom.set_xlabel("top score (confidence)")
    bottom.set_ylabel("images")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def store_temperature(source: Path, temperature: float) -> Path:
    """Write `temperature` where the model's readers find it: into the checkpoint (.pt) or the
    export sidecar (.json beside a .safetensors file)."""
    from engine import checkpoint
    from engine.runinfo import atomic_write_text

    source = Path(source)
    if source.suffix == ".safetensors":
        sidecar = source.with_suffix(".json")
        meta = json.loads(sidecar.read_text())
        meta["temperature"] = temperature
        atomic_write_text(sidecar, json.dumps(meta, indent=2) + "\n")
        return sidecar
    if source.suffix != ".pt":
        raise ValueError(
            f"{str(source)!r} is not a checkpoint of this repo or an export; calibrate a run "
            "(task.ckpt=<run folder>) or an exported .safetensors"
        )
    checkpoint.set_temperature(source, temperature)
    return source


def calibrate(logits: torch.Tensor, targets: torch.Tensor, source: Path, folder: Path) -> dict:
    """Fit the temperature on one split's logits, store it with the model (store_temperature),
    write calibration.json and reliability_{before,after}.png into `folder`; returns the summary
    (temperature, ECE / NLL / Brier before and after)."""
    from engine.runinfo import atomic_write_text

    logits, targets = logits.numpy(), targets.numpy()
    temperature = fit_temperature(logits, targets)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"temperature": temperature, "images": len(targets), "ece_bins": ECE_BINS}
    summary["stored_in"] = str(store_temperature(source, temperature))
    for when, t in (("before", 1.0), ("after", temperature)):
        probs = softmax(logits, t)
        summary[f"ece_{when}"] = ece(probs, targets)
        summary[f"brier_{when}"] = brier(probs, targets)
        summary[f"nll_{when}"] = float(
            F.cross_entropy(torch.from_numpy(logits / t), torch.from_numpy(targets))
        )
        png = folder / f"reliability_{when}.png"
        reliability_diagram(probs, targets, png, title=f"T = {t:.3f}: ")
    atomic_write_text(folder / "calibration.json", json.dumps(summary, indent=1) + "\n")
    return summary
