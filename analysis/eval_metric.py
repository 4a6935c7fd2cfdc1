"""Any metric of an evaluation recomputed from its saved logits, without the model (the role of
MMPretrain's tools/analysis_tools/eval_metric.py).

    python analysis/eval_metric.py                                 # the newest eval folder
    python analysis/eval_metric.py outputs/<date>/<time> --topk 1 3 10 --bins 10
    python analysis/eval_metric.py <eval folder> --min-score 0.8 --temperature 1.7 --no-tta

Reads <eval>/logits.npz (written by python run.py task=eval; loaded with allow_pickle=False)
and prints the metrics of engine.calibration.classification_metrics as task=eval computes them
(same keys, so the defaults reproduce its metrics.json), plus with --min-score the share of
images whose top score reaches the threshold (coverage) and the top-1 accuracy on those.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from analysis.results import eval_folder
from engine.calibration import ECE_BINS, classification_metrics, softmax
from engine.evaluate import load_logits


def eval_metric(
    folder: str | Path | None = None,
    topk: tuple[int, ...] = (1, 5),
    bins: int = ECE_BINS,
    temperature: float = 1.0,
    min_score: float | None = None,
    tta: bool = True,
) -> dict:
    """The metrics of an eval folder's logits.npz (tta=False: its logits without TTA)."""
    path = eval_folder(folder) / "logits.npz"
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist; make it with python run.py task=eval"
        )
    if temperature <= 0:
        raise ValueError(f"--temperature {temperature} must be > 0")
    if min_score is not None and not 0 <= min_score <= 1:
        raise ValueError(f"--min-score {min_score} must be in [0, 1]")
    data = load_logits(path)
    key = "logits" if tta or "plain_logits" not in data else "plain_logits"
    if not tta and key == "logits":
        raise ValueError(f"{str(path)!r} was evaluated without TTA; leave out --no-tta")
    logits, targets = data[key] / np.float32(temperature), data["targets"]
    metrics = classification_metrics(logits, targets, tuple(topk), bins)
    if min_score is not None:
        probs = softmax(logits)
        kept = probs.max(-1) >= min_score
        metrics["eval/coverage"] = 100 * float(kept.mean())
        hits = probs.argmax(-1)[kept] == targets[kept]
        metrics["eval/acc1_covered"] = 100 * float(hits.mean()) if kept.any() else float("nan")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", nargs="?", help="eval folder or task=eval job folder")
    parser.add_argument("--topk", type=int, nargs="+", default=[1, 5], help="k of acc<k>")
    parser.add_argument("--bins", type=int, default=ECE_BINS, help="equal-width ECE bins")
    parser.add_argument("--temperature", type=float, default=1.0, help="divide logits by T")
    parser.add_argument("--min-score", type=float, help="coverage and accuracy above it")
    parser.add_argument("--no-tta", action="store_true", help="the logits without TTA")
    parser.add_argument("--json", help="also write the metrics to this JSON file")
    args = parser.parse_args(argv)
    try:
        metrics = eval_metric(
            args.folder, args.topk, args.bins, args.temperature, args.min_score, not args.no_tta
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for name, value in metrics.items():
        print(f"{name:28s} {value:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
