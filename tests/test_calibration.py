"""Evaluation metrics against scikit-learn, ECE by hand, TTA, logits.npz and eval_metric,
temperature scaling (task=calibrate) and what predict, export and the Python API make of it."""

import json
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    balanced_accuracy_score,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from analysis.eval_metric import eval_metric
from analysis.eval_metric import main as eval_metric_main
from engine.calibration import brier, classification_metrics, ece, softmax
from engine.evaluate import load_logits, tta_views
from engine.export import sidecar
from engine.predict import Classifier, load_trained


def test_every_metric_matches_scikit_learn():
    rng = np.random.default_rng(0)
    targets = np.arange(300) % 7
    logits = (rng.normal(size=(300, 7)) + 2 * np.eye(7)[targets]).astype(np.float32)
    metrics = classification_metrics(logits, targets, topk=(1, 2, 5))
    labels = list(range(7))
    for k in (1, 2, 5):
        expected = 100 * top_k_accuracy_score(targets, logits, k=k, labels=labels)
        assert metrics[f"eval/acc{k}"] == pytest.approx(expected, abs=1e-9)
    preds = logits.argmax(1)
    for average in ("macro", "weighted"):
        p, r, f1, _ = precision_recall_fscore_support(targets, preds, average=average)
        assert metrics[f"eval/precision_{average}"] == pytest.approx(100 * p, abs=1e-9)
        assert metrics[f"eval/recall_{average}"] == pytest.approx(100 * r, abs=1e-9)
        assert metrics[f"eval/f1_{average}"] == pytest.approx(100 * f1, abs=1e-9)
    assert metrics["eval/balanced_acc"] == pytest.approx(
        100 * balanced_accuracy_score(targets, preds), abs=1e-9
    )
    probs = softmax(logits)
    assert metrics["eval/nll"] == pytest.approx(log_loss(targets, probs, labels=labels), abs=1e-5)
    assert 60 < metrics["eval/acc1"] < 95  # a case where the metrics differ from each other


def test_ece_and_brier_of_a_case_checked_by_hand():
    # top scores 0.95 (right), 0.85 (wrong), 0.62 (right), 0.68 (wrong); 10 bins:
    # |1 - .95| + |0 - .85| + 2 * |.5 - .65| = 1.2 over 4 images: 30%
    top = np.array([0.95, 0.85, 0.62, 0.68])
    probs = np.stack([top, 1 - top], 1)
    targets = np.array([0, 1, 0, 1])
    assert ece(probs, targets, bins=10) == pytest.approx(30.0)
    # one bin (0.5, 1]: accuracy .5, mean top score .775
    assert ece(probs, targets, bins=2) == pytest.approx(27.5)
    expected = (2 * 0.05**2 + 2 * 0.85**2 + 2 * 0.38**2 + 2 * 0.68**2) / 4
    assert brier(probs, targets) == pytest.approx(expected)


def test_eval_with_tta_saves_logits_that_eval_metric_reproduces(tiny_run, run_task, tmp_path):
    run_task("task=eval", f"task.ckpt={tiny_run}", "task.tta=flip", "logger=none")
    folder = tmp_path / "run" / "eval"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["tta"] == "flip" and metrics["eval/images"] == 360
    assert {"eval/ece15", "eval/brier", "eval/nll", "eval/f1_macro"} <= set(metrics)
    assert metrics["eval_no_tta/acc1"] != metrics["eval/acc1"]  # digits are not symmetric
    data = load_logits(folder / "logits.npz")
    assert data["logits"].dtype == np.float32 and data["logits"].shape == (360, 10)
    assert list(data["classes"]) == metrics["classes"]
    recomputed = eval_metric(folder)
    assert recomputed == {k: metrics[k] for k in recomputed}  # exactly, every key
    plain = eval_metric(folder, tta=False)
    assert plain["eval/acc1"] == metrics["eval_no_tta/acc1"]
    other = eval_metric(tmp_path / "run", topk=(3,), bins=10, min_score=0.5)
    assert set(other) >= {"eval/acc3", "eval/ece10", "eval/coverage", "eval/acc1_covered"}
    assert eval_metric_main([str(tmp_path / "nowhere")]) == 1
    assert (folder / "reliability.png").stat().st_size > 0


def test_calibrate_stores_a_temperature_that_lowers_ece(tiny_run, run_task, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    before = Classifier.load(run)
    assert before.temperature == 1.0  # a checkpoint without one
    temperature = run_task("task=calibrate", f"task.ckpt={run}", "logger=none")
    summary = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert summary["temperature"] == temperature != 1.0
    assert summary["ece_after"] < summary["ece_before"]
    assert summary["nll_after"] <= summary["nll_before"]
    assert (tmp_path / "run" / "reliability_after.png").is_file()

    after = Classifier.load(run, min_score=0.99)
    assert after.temperature == pytest.approx(temperature)
    image = torch.rand(*after.trained.preprocess["input_size"])
    with torch.inference_mode():
        logits = after.model(image[None])
    expected = (logits / temperature).softmax(-1)[0]
    assert after.probabilities(image[None])[0] == pytest.approx(expected, abs=1e-6)
    (top, *_) = after(image)
    assert top["abstain"] == (top["score"] < 0.99)
    assert "abstain" not in before(image)[0]
    assert sidecar(load_trained(run))["temperature"] == pytest.approx(temperature)


def test_tta_views_keep_the_input_shape():
    images = torch.rand(2, 3, 16, 16)
    flip, crops = tta_views(images, "flip"), tta_views(images, "crops")
    assert len(flip) == 2 and torch.equal(flip[1].flip(-1), images)
    assert len(crops) == 6 and all(v.shape == images.shape for v in crops)
    assert not torch.equal(crops[1], crops[2])  # different corners
