"""analysis/results.py on real evaluations: an in-memory dataset and a folder of image files."""

import subprocess
import sys

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from analysis.results import main, most_confident, results
from engine.build import build_eval_data, build_model_for
from engine.evaluate import evaluate_model, read_results, write_results
from engine.predict import load_trained
from tests.helpers import REPO


def _evaluate(cfg, model, classes, job):
    """What task=eval leaves in its job folder: config.yaml and eval/."""
    job.mkdir(parents=True)
    OmegaConf.save(cfg, job / "config.yaml")
    dataset, loader = build_eval_data(cfg, classes, cfg.task.split)
    evaluation = evaluate_model(model, loader, classes, progress=False)
    write_results(evaluation, dataset, job / "eval")
    return evaluation


def _picture(path):
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"))
    return image.size, pixels


def test_figures_of_an_in_memory_dataset(tiny_run, tmp_path):
    trained = load_trained(tiny_run)
    cfg = OmegaConf.create({**trained.config, "task": {"split": "val"}})
    evaluation = _evaluate(cfg, trained.model, trained.classes, tmp_path / "job")

    written = results(tmp_path / "job", normalize=True, n=4)
    size, pixels = _picture(written["confusion matrix"])
    assert size[0] >= 800 and size[1] >= 800 and pixels.std() > 10
    size, pixels = _picture(written["most confident"])
    assert size[0] >= 4 * 1.9 * 200 * 0.95 and pixels.std() > 10  # 4 panels of 1.9 in at 200 dpi

    _, _, confusion, predictions = read_results(tmp_path / "job" / "eval")
    assert (confusion == evaluation.confusion()).all()
    correct, wrong = most_confident(predictions, 4)
    assert all(p["correct"] for p in correct) and not any(p["correct"] for p in wrong)
    scores = [p["score"] for p in correct]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == max(p["score"] for p in predictions if p["correct"])


def test_figures_of_image_files_and_the_command_line(tmp_path):
    root = tmp_path / "shapes"
    rng = np.random.default_rng(0)
    for c, name in enumerate(["circle", "square", "star"]):
        (root / name).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 80, size=(24, 30, 3)) + 60 * c
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    overrides = [
        "data=imagefolder",
        f"data.dataset.root={root}",
        "data.dataset.val_fraction=0.4",
        "data.transform.input_size=32",
        "data.num_workers=0",
        "task=eval",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    classes = ["circle", "square", "star"]
    model = build_model_for(cfg, num_classes=3, in_chans=3).eval()
    _evaluate(cfg, model, classes, tmp_path / "job")
    _, _, _, predictions = read_results(tmp_path / "job" / "eval")
    assert all(str(root) in p["path"] for p in predictions)

    proc = subprocess.run(
        [sys.executable, str(REPO / "analysis" / "results.py"), str(tmp_path / "job"), "--n", "3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "precision" in proc.stdout and "confident.png" in proc.stdout
    _, pixels = _picture(tmp_path / "job" / "eval" / "confident.png")
    assert pixels.std() > 10


def test_no_evaluation_to_draw(tmp_path, monkeypatch, capsys):
    with pytest.raises(FileNotFoundError, match="not an evaluation folder"):
        results(tmp_path)
    monkeypatch.chdir(tmp_path)  # no outputs/ here
    assert main([]) == 1
    assert "run python run.py task=eval first" in capsys.readouterr().err
