"""Multi-label data end to end: the digit mosaics, the metrics (checked against scikit-learn),
training with bce / asl (and mixup), and eval / predict / export / serve / CAM of the model."""

import json
import urllib.request

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_fscore_support
from torch.utils.data import Subset

from data.digits import _mosaics, digits_multilabel
from data.multilabel import is_multi_label
from engine import multilabel
from engine.build import best_choice, build_splits, training
from tests.helpers import composed

# a few updates on 16 px mosaics
TINY = [
    "data=digits_multilabel",
    "data.dataset.image_size=16",
    "data.dataset.train_images=128",
    "data.dataset.val_images=64",
    "data.batch_size=32",
    "trainer.epochs=1",
    "sched.warmup_epochs=0",
    "logger=none",
]


def scored(seed: int = 0, n: int = 60, classes: int = 7):
    """Scores on a coarse grid (many ties) and multi-hot targets; the last class has no
    positive image."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, classes, generator=g).round(decimals=1)
    targets = (torch.rand(n, classes, generator=g) < 0.35).to(torch.uint8)
    targets[:, -1] = 0
    return scores, targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_metric_equals_scikit_learns_on_the_same_predictions(seed):
    scores, targets = scored(seed)
    y, s = targets.numpy(), scores.numpy()
    found = multilabel.metrics(scores, targets, threshold=0.5, topk=3)

    # AP: scikit-learn's per class (ties taken together); no positive image: AP 0, still in mAP
    ap = multilabel.average_precision(scores, targets).numpy()
    with pytest.warns(UserWarning):  # scikit-learn warns about the class without positives
        expected_ap = [average_precision_score(y[:, c], s[:, c]) for c in range(y.shape[1])]
    np.testing.assert_allclose(ap, expected_ap, atol=1e-12)
    assert ap[-1] == 0
    assert found["mAP"] == pytest.approx(100 * np.mean(expected_ap), abs=1e-9)

    top3 = np.zeros_like(y)
    np.put_along_axis(top3, np.argsort(-s, axis=1, kind="stable")[:, :3], 1, axis=1)
    chosen = multilabel.predicted(scores, topk=3).numpy()
    # among tied scores topk may pick another class; the number picked is always 3
    assert (chosen.sum(1) == 3).all()
    for suffix, preds in (("", s >= 0.5), ("_top3", chosen)):
        for kind, average in (("C", "macro"), ("O", "micro")):
            p, r, f1, _ = precision_recall_fscore_support(
                y, preds.astype(int), average=average, zero_division=0
            )
            for name, value in (("P", p), ("R", r), ("F1", f1)):
                key = f"{kind}{name}{suffix}"
                assert found[key] == pytest.approx(100 * value, abs=1e-9), key


def test_mosaic_labels_are_the_digits_its_cells_show():
    # cell i of the pool is filled with (label + 1) / 10: a mosaic's cells say which digits
    labels = torch.arange(10).repeat(3)
    cells = ((labels + 1).float() / 10).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).clone()
    images, targets = _mosaics(cells, labels, 200, 0.4, torch.Generator().manual_seed(0), 10)
    assert images.shape == (200, 1, 16, 16) and targets.dtype == torch.uint8
    for image, target in zip(images, targets, strict=True):
        quadrants = [image[0, r : r + 8, c : c + 8] for r in (0, 8) for c in (0, 8)]
        shown = {round(float(q[0, 0]) * 10) - 1 for q in quadrants if q.max() > 0}
        assert shown == set(torch.nonzero(target).flatten().tolist())
    counts = targets.sum(1)
    assert counts.min() >= 1 and counts.max() <= 4 and (counts == 1).any() and (counts >= 3).any()


def test_digits_multilabel_is_deterministic_and_follows_the_convention():
    a = digits_multilabel(image_size=16, train_images=100, val_images=40)
    b = digits_multilabel(image_size=16, train_images=100, val_images=40)
    other = digits_multilabel(image_size=16, train_images=100, val_images=40, mosaic_seed=1)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.val.targets, b.val.targets)
    assert not torch.equal(a.train.targets, other.train.targets)
    assert a.classes == [str(d) for d in range(10)] and a.in_chans == 1
    assert a.train.targets.shape == (100, 10) and a.val.targets.shape == (40, 10)
    image, target = a.train[3]
    assert image.shape == (1, 16, 16) and target.dtype == torch.float32
    assert torch.equal(target, a.train.targets[3].float())
    assert is_multi_label(a.train) and is_multi_label(Subset(Subset(a.val, [0, 1]), [0]))
    single = build_splits(composed("data.dataset.image_size=8"))
    assert not is_multi_label(single.train)
    with pytest.raises(ValueError, match=r"empty_cell=1\.0"):
        digits_multilabel(empty_cell=1.0)


@pytest.mark.parametrize("loss", ["ce", "soft_ce"])
def test_a_softmax_loss_on_multilabel_data_fails_naming_bce(loss):
    cfg = composed(*TINY, f"loss={loss}")
    with pytest.raises(ValueError, match=f"loss={loss} is a softmax loss.*loss=bce"):
        training(cfg)


def test_a_multilabel_best_metric_on_single_label_data_fails():
    cfg = composed("data.dataset.image_size=8", "checkpoint.best_metric=val/mAP")
    with pytest.raises(ValueError, match=r"val/mAP is a multi-label metric.*val/acc1"):
        best_choice(cfg, build_splits(cfg))


@pytest.mark.parametrize("mode", ["mixup_alpha", "cutmix_alpha"])
def test_mixup_and_cutmix_mix_multi_hot_targets(mode):
    cfg = composed(*TINY, "loss=bce", f"mixup.{mode}=1.0")
    run = training(cfg)
    images, targets = next(iter(run.train_loader))
    mixed_images, mixed = run.objective.mix(images.clone(), targets.clone())
    # timm mixes each image with its mirror in the batch: targets lam t + (1 - lam) t_mirror,
    # one lam for the batch; labels both have (or both lack) stay as they were
    mirror = targets.flip(0)
    differ = targets != mirror
    lam = (mixed - mirror)[differ] / (targets - mirror)[differ]
    torch.testing.assert_close(lam, lam[:1].expand_as(lam))
    assert 0 < lam[0] < 1 and torch.equal(mixed[~differ], targets[~differ])
    if mode == "mixup_alpha":  # the images are blended with the same lam
        torch.testing.assert_close(mixed_images, lam[0] * images + (1 - lam[0]) * images.flip(0))
    assert torch.isfinite(run.objective.train_loss(run.model(mixed_images), mixed))


@pytest.fixture(scope="module")
def ml_run(tmp_path_factory):
    """A real multi-label run (loss=asl, a few updates) written to a run folder, in-process."""
    run_dir = tmp_path_factory.mktemp("multilabel") / "run"
    cfg = composed(
        *TINY, "loss=asl", "trainer.limit_val_batches=1", "trainer.limit_train_batches=3"
    )
    run = training(cfg, run_dir)
    with run.logger() as logger:
        result = run.fit(logger, run.saver(logger))
    return run_dir, result


def test_validation_reports_map_and_best_follows_it(ml_run):
    run_dir, result = ml_run
    record = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    epoch = next(r for r in record if "epoch" in r)
    names = [f"val/{k}{s}" for k in ("CP", "CR", "CF1", "OP", "OR", "OF1") for s in ("", "_top3")]
    assert all(0 <= epoch[k] <= 100 for k in ["val/mAP", *names])
    assert "val/acc1" not in epoch
    assert result["best/metric"] == "val/mAP" and result["best/val/mAP"] == epoch["val/mAP"]
    saved = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert saved["multi_label"] is True and saved["best"]["metric"] == "val/mAP"


@pytest.fixture(scope="module")
def mosaics(ml_run, tmp_path_factory):
    """Three validation mosaics as PNG files, and their label sets."""
    from PIL import Image

    from data.images import to_picture

    folder = tmp_path_factory.mktemp("mosaics")
    splits = build_splits(composed(*TINY))
    files, truth = [], []
    for i in range(3):
        image, target = splits.val[i]
        files.append(folder / f"{i}.png")
        Image.fromarray(to_picture(image)[..., 0]).save(files[-1])
        truth.append(torch.nonzero(target).flatten().tolist())
    return files, truth


def test_eval_writes_multilabel_metrics_per_class_ap_and_label_sets(ml_run, run_task, tmp_path):
    run_dir, _ = ml_run
    value = run_task("task=eval", f"task.ckpt={run_dir}", "logger=none", "task.threshold=0.3")
    folder = tmp_path / "run" / "eval"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert value == metrics["eval/mAP"] and metrics["eval/threshold"] == 0.3
    rows = (folder / "per_class.csv").read_text().splitlines()
    assert rows[0] == "class,ap,precision,recall,f1,support" and len(rows) == 11
    ap = [float(r.split(",")[1]) for r in rows[1:]]
    assert np.mean(ap) == pytest.approx(metrics["eval/mAP"], abs=1e-3)  # 4 decimals in the file
    predictions = [json.loads(line) for line in (folder / "predictions.jsonl").open()]
    splits = build_splits(composed(*TINY))
    assert len(predictions) == len(splits.val) == metrics["eval/images"]
    for row, target in zip(predictions, splits.val.targets, strict=True):
        assert row["target"] == torch.nonzero(target).flatten().tolist()
        scores = {p["index"]: p["score"] for p in row["topk"]}
        assert all(s >= 0.3 for c, s in scores.items() if c in row["pred"])
        assert all(c in row["pred"] for c, s in scores.items() if s >= 0.3)
        assert row["correct"] == (sorted(row["pred"]) == row["target"])


def test_predict_export_and_serve_give_sigmoid_labels_above_the_threshold(
    ml_run, mosaics, tmp_path
):
    from engine.export import export
    from engine.predict import Classifier, load_trained
    from engine.serve import make_server

    run_dir, _ = ml_run
    files, _ = mosaics
    classifier = Classifier.load(run_dir, topk=2, threshold=0.4)
    batch = torch.stack([classifier.to_input(f) for f in files])
    with torch.no_grad():
        sigmoid = classifier.model(batch).sigmoid()
    for result, scores in zip(classifier.predict(files), sigmoid, strict=True):
        above = int((scores >= 0.4).sum())
        assert len(result) == max(2, above)  # every label above the threshold, at least top-2
        assert [p["index"] for p in result] == scores.argsort(descending=True)[
            : len(result)
        ].tolist()
        for p in result:
            assert p["score"] == pytest.approx(float(scores[p["index"]]), abs=1e-6)
            assert p["positive"] == (p["score"] >= 0.4) and p["threshold"] == 0.4
    expected = classifier(files[0])

    written = export(load_trained(run_dir), tmp_path / "export", formats=["safetensors"])
    sidecar = json.loads(next(p for p in written if p.suffix == ".json").read_text())
    assert sidecar["multi_label"] is True
    exported = Classifier.load(tmp_path / "export" / "model.safetensors", topk=2, threshold=0.4)
    assert exported(files[0]) == expected

    server = make_server(exported, port=0, topk=2)
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        health = json.loads(urllib.request.urlopen(f"{url}/health").read())
        request = urllib.request.Request(f"{url}/predict", data=files[0].read_bytes())
        reply = json.loads(urllib.request.urlopen(request).read())
    finally:
        server.shutdown()
        server.server_close()
    assert health["threshold"] == 0.4
    assert [p["index"] for p in reply] == [p["index"] for p in expected]


def test_cam_explains_a_chosen_class_of_a_multilabel_model(ml_run, tmp_path):
    from analysis.cam import cam_run, compute_cam, validation_samples, validation_split
    from engine.predict import load_trained

    run_dir, _ = ml_run
    written = cam_run(run_dir, n=1, target="7", layer="layer1", out=tmp_path / "cam")
    assert [p.name for p in written] == ["val_00000_gradcam.png"]

    trained = load_trained(run_dir)
    images, labels, _, _ = validation_samples(validation_split(trained), range(2))
    assert labels == [torch.nonzero(t).flatten().tolist() for t in trained_targets(2)]
    maps = {}
    for c in (3, 7):
        maps[c], probs = compute_cam(
            trained.model, images, "gradcam", "layer1", [c, c], multi_label=True
        )
    with torch.no_grad():
        torch.testing.assert_close(probs, trained.model(images).sigmoid())
    assert maps[3].shape == (2, 16, 16) and not np.allclose(maps[3], maps[7])


def trained_targets(count: int) -> torch.Tensor:
    return build_splits(composed(*TINY)).val.targets[:count]
