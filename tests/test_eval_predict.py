"""task=eval and task=predict, and the Python API, on real runs made by the tests."""

import csv
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from engine.build import build_eval_data
from engine.evaluate import evaluate_model, read_results
from engine.predict import Classifier, load_trained
from tests.helpers import epoch_records, records_of, run_py, summary, wandb_records, wandb_runs

SEVEN = ["apple", "bus", "cloud", "daisy", "eagle", "fern", "grape"]


def test_eval_reproduces_the_logged_validation_accuracy(tiny_run, tmp_path):
    proc = run_py("task=eval", f"task.ckpt={tiny_run}", "task.log_misclassified=8", cwd=tmp_path)
    (eval_dir,) = (tmp_path / "outputs").glob("*/*")
    metrics, per_class, confusion, predictions = read_results(eval_dir / "eval")

    logged = summary(tiny_run)["best/val/acc1"]
    assert metrics["eval/acc1"] == pytest.approx(logged, abs=1e-4)
    assert metrics["eval/images"] == 360 == len(predictions) == confusion.sum()
    assert np.trace(confusion) / confusion.sum() * 100 == pytest.approx(logged, abs=1e-4)
    assert [row["class"] for row in per_class] == [str(d) for d in range(10)]
    assert sum(int(row["support"]) for row in per_class) == 360
    first = predictions[0]
    assert len(first["topk"]) == 5 and first["pred"] == first["topk"][0]["index"]
    assert first["correct"] == (first["pred"] == first["target"])
    assert "eval/acc1" in proc.stdout

    # an evaluation run in W&B: job type, summary and the three tables
    (offline,) = wandb_runs(eval_dir)
    records = wandb_records(offline)
    assert records_of(records, "run")[0]["job_type"] == "eval"
    final = {}
    for update in records_of(records, "summary"):
        final.update(update["update"])
    assert final["eval/acc1"] == pytest.approx(logged, abs=1e-4)
    tables = {p.name.rsplit("_", 2)[0] for p in offline.rglob("*.table.json")}
    assert {"per_class", "misclassified", "confusion_matrix_table"} <= tables
    (wrong,) = offline.rglob("misclassified_*.table.json")
    assert len(json.loads(wrong.read_text())["data"]) == min(8, 360 - np.trace(confusion))


def test_eval_of_ema_weights_and_of_the_training_split(tiny_run):
    best = torch.load(tiny_run / "checkpoints" / "best.pt", weights_only=True)
    trained = load_trained(tiny_run, use_ema=True)
    cfg = OmegaConf.create(trained.config)
    dataset, loader = build_eval_data(cfg, trained.classes, "val")
    result = evaluate_model(trained.model, loader, trained.classes, progress=False)
    assert result.metrics["eval/acc1"] == pytest.approx(best["metrics"]["val_ema/acc1"], abs=1e-4)

    dataset, loader = build_eval_data(cfg, trained.classes, "train")
    assert len(dataset) == 1797 - 360
    assert len(evaluate_model(trained.model, loader, trained.classes, progress=False).targets) == (
        1797 - 360
    )


def test_eval_refuses_other_classes_and_splits(tiny_run):
    trained = load_trained(tiny_run)
    cfg = OmegaConf.create(trained.config)
    with pytest.raises(ValueError, match="trained on 7 classes"):
        build_eval_data(cfg, SEVEN, "val")
    with pytest.raises(ValueError, match=r"task\.split=.test. must be .val. or .train."):
        build_eval_data(cfg, trained.classes, "test")
    with pytest.raises(FileNotFoundError, match=r"no checkpoints/best\.pt"):
        load_trained(tiny_run / "checkpoints")
    (tiny_run / "checkpoints" / "best.pt").stat()  # untouched


def _seven_class_folder(root):
    """7 classes told apart by colour, 6 images each, as real PNG files."""
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, size=(len(SEVEN), 3))
    for name, colour in zip(SEVEN, colours, strict=True):
        (root / name).mkdir(parents=True)
        for i in range(6):
            noise = rng.integers(-20, 20, size=(40, 48, 3))
            pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


@pytest.mark.slow  # a real training subprocess: keeps the default suite under 10 minutes
def test_predict_uses_the_checkpoint_alone(tmp_path):
    data = tmp_path / "seven"
    _seven_class_folder(data)
    run_py(
        "data=imagefolder",
        f"data.dataset.root={data}",
        "data.dataset.val_fraction=0.34",
        "data.transform.input_size=32",
        "data.batch_size=8",
        "data.num_workers=0",
        "trainer.epochs=1",
        "sched.warmup_epochs=0",
        "logger=none",
        cwd=tmp_path,
    )
    (run_dir,) = (tmp_path / "outputs").glob("*/*")
    assert epoch_records(run_dir)
    # the dataset goes away: predict needs the checkpoint and the images, nothing else
    photos = tmp_path / "photos"
    data.rename(photos)
    proc = run_py(
        "task=predict",
        f"task.ckpt={run_dir}",
        f"task.inputs={photos}",
        "task.topk=3",
        f"task.out={tmp_path / 'p.csv'}",
        cwd=tmp_path,
    )
    assert "predictions" in proc.stdout
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    files = sorted(photos.rglob("*.png"))
    assert len(rows) == 3 * len(files) == 3 * 42
    assert {row["label"] for row in rows} <= set(SEVEN)

    classifier = Classifier.load(run_dir / "checkpoints" / "best.pt", topk=3)
    assert classifier.classes == SEVEN  # never ImageNet's 1,000
    api = classifier.predict(files)
    for i, path in enumerate(files):
        ranked = [r for r in rows if r["path"] == str(path)]
        assert [r["label"] for r in ranked] == [p["label"] for p in api[i]]
        scores = [float(r["score"]) for r in ranked]
        assert scores == pytest.approx([p["score"] for p in api[i]], abs=1e-5)
    # a path, a PIL image and a preprocessed tensor give the same answer
    image = Image.open(files[0])
    by_path = classifier(files[0])
    assert classifier(image) == by_path
    tensor = classifier.transform(image)
    assert [p["label"] for p in classifier(tensor)] == [p["label"] for p in by_path]
    assert len(by_path) == 3 and sum(p["score"] for p in classifier(image, topk=7)) == (
        pytest.approx(1.0, abs=1e-5)
    )


def test_predict_writes_json_and_refuses_bad_outputs(tiny_run, tmp_path):
    from sklearn.datasets import load_digits

    from engine.predict import write_predictions

    digits = load_digits()
    files = []
    for i in range(4):
        path = tmp_path / f"digit_{digits.target[i]}.png"
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(path)
        files.append(path)
    classifier = Classifier.load(tiny_run)
    results = classifier.predict(files, topk=2)
    out = write_predictions(files, results, tmp_path / "p.json")
    written = json.loads(out.read_text())
    assert [r["path"] for r in written] == [str(f) for f in files]
    assert written[0]["predictions"] == results[0] and len(results[0]) == 2
    with pytest.raises(ValueError, match=r"a \.json or \.csv file"):
        write_predictions(files, results, tmp_path / "p.txt")
    with pytest.raises(TypeError, match="cannot classify a int"):
        classifier(3)


# ---------------------------------------------------------------------------------------------
# Which run a task uses when none is named, and what it was trained on (issue 17)


def test_no_checkpoint_given_names_the_newest_run_and_what_it_was_trained_on(
    tiny_run, run_task, tmp_path, monkeypatch, caplog
):
    from sklearn.datasets import load_digits

    outputs = tmp_path / "cwd" / "outputs"
    (outputs / "2026-01-01").mkdir(parents=True)
    (outputs / "2026-01-01" / "10-00-00-000000").symlink_to(tiny_run)
    # newer folders without a best checkpoint: an eval job, and a run that failed before training
    (outputs / "2026-01-02" / "09-00-00-000000").mkdir(parents=True)
    (outputs / "2026-01-02" / "09-00-00-000000" / "metrics.jsonl").write_text('{"summary": {}}\n')
    (outputs / "2026-01-02" / "10-00-00-000000" / "checkpoints").mkdir(parents=True)
    image = tmp_path / "seven.png"
    Image.fromarray((load_digits().images[7] * 255 / 16).astype(np.uint8)).save(image)
    monkeypatch.chdir(tmp_path / "cwd")
    caplog.set_level("INFO")
    run_task("task=predict", f"task.inputs={image}", f"task.out={tmp_path / 'p.json'}")

    assert json.loads((tmp_path / "p.json").read_text())[0]["path"] == str(image)
    chosen = [r.getMessage() for r in caplog.records if "no checkpoint given" in r.getMessage()]
    assert len(chosen) == 1, caplog.text
    assert "outputs/2026-01-01/10-00-00-000000," in chosen[0]  # whole, copyable
    assert "the newest run under outputs/ with checkpoints/best.pt" in chosen[0]
    assert "resnet18 on digits, 2/2 epochs, best val/acc1 " in chosen[0]
    assert "task.ckpt=<run folder>" in chosen[0]


def _messages(caplog, level: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == level]


@pytest.mark.parametrize(
    ("overrides", "level", "expected"),
    [
        # the composed default (data=digits) is nobody's choice: the model's own data is used
        ([], "INFO", "data: cifar10, the data config saved with the model, not data=digits"),
        (["data=digits"], "WARNING", "data=digits: using digits, not cifar10 that the model"),
        (["data=cifar10"], None, None),  # what it was trained on: nothing to say
    ],
)
def test_eval_says_which_data_it_uses_when_it_is_not_the_models(
    tiny_run, overrides, level, expected, caplog
):
    from hydra.core.hydra_config import HydraConfig

    from engine.build import config_for_trained
    from tests.helpers import composed

    saved = load_trained(tiny_run).config
    saved["data"] = dict(composed("data=cifar10").data, dataset={"_target_": "data.cifar.cifar10"})
    cfg = composed("task=eval", *overrides, hydra=True)
    cfg.hydra.runtime.output_dir = "unused"
    HydraConfig.instance().set_config(cfg)
    caplog.set_level("INFO")
    try:
        run_cfg, _ = config_for_trained(cfg, saved)
    finally:
        HydraConfig.instance().cfg = None

    said = _messages(caplog, "INFO") + _messages(caplog, "WARNING")
    if expected is None:
        assert not [m for m in said if m.startswith("data")], said
    else:
        assert [m for m in _messages(caplog, level) if expected in m], said
    chosen = "digits" if overrides == ["data=digits"] else "cifar10"
    assert run_cfg.data.dataset._target_.endswith(chosen)


def test_smallest_checkpoints_and_throughput_records(tiny_run):
    # conftest's tiny_run keeps last.pt and a weights-only best.pt; the tools above read its best
    folder = tiny_run / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "last.pt"]
    last = torch.load(folder / "last.pt", weights_only=True, map_location="cpu")
    best = torch.load(folder / "best.pt", weights_only=True, map_location="cpu")
    assert "optimizer" in last and "optimizer" not in best and "ema" in best
    # weights and EMA weights; last.pt adds AdamW's two moments per weight: about half
    assert (folder / "best.pt").stat().st_size < 0.55 * (folder / "last.pt").stat().st_size

    # images/s of training (4 batches of 64) and of evaluation (360 images, model and EMA)
    for record in epoch_records(tiny_run):
        train, val = record["time/train_images_per_s"], record["time/val_images_per_s"]
        assert train == pytest.approx(4 * 64 / record["time/train_s"])
        assert val == pytest.approx(2 * 360 / record["time/val_s"])
        assert record["time/val_s"] + record["time/train_s"] <= record["time/epoch_s"]
