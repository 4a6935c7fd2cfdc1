"""A checkpoint written by the engine before issue 15's refactor still resumes, evaluates and
predicts: tests/fixtures/main_mid_epoch/ (made by make_main_checkpoint.py there) is a run killed
2 batches into its 2nd epoch. Resumed with today's engine it must end exactly as today's engine
ends the same run uninterrupted, and its weights load for evaluation and prediction.

In-process (run.py's train task, as Hydra calls it): about 3 s.
"""

import shutil
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from engine import checkpoint
from tests.fixtures.make_main_checkpoint import SETTINGS, THREADS
from tests.helpers import assert_ends_as, composed, epoch_records

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "main_mid_epoch"


def run_task(run_dir: Path, *overrides: str):
    """run.py's task for `overrides`, in-process, writing into `run_dir` (Hydra's output folder)."""
    import run

    cfg = composed(*overrides, hydra=True)
    cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    try:
        return run.TASKS[cfg.task.name](cfg)
    finally:
        HydraConfig.instance().cfg = None


@pytest.fixture
def killed_run(tmp_path) -> Path:
    """The fixture as the run folder it came from: checkpoints/ and metrics.jsonl."""
    run_dir = tmp_path / "killed"
    (run_dir / "checkpoints").mkdir(parents=True)
    for name in ("last.pt", "best.pt"):
        shutil.copyfile(FIXTURE / name, run_dir / "checkpoints" / name)
    shutil.copyfile(FIXTURE / "metrics.jsonl", run_dir / "metrics.jsonl")
    return run_dir


def test_the_fixture_is_a_mid_epoch_checkpoint_of_the_old_engine():
    state = checkpoint.load(FIXTURE / "last.pt")  # its checksum matches
    assert (state["epoch"], state["step"], state["position"]["batches"]) == (1, 6, 2)
    assert {"model", "optimizer", "scheduler", "scaler", "ema", "rng", "best"} <= state.keys()
    assert state["best"]["epoch"] == 1 and state["best"]["source"] in ("model", "ema")


@pytest.fixture
def fixture_threads():
    """The fixture's thread count. Its first epoch was computed by one CPU thread, and a sum
    over another number of threads differs in the last bit: the straight run must match it."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def test_a_checkpoint_of_the_old_engine_resumes_exactly(killed_run, tmp_path, fixture_threads):
    straight = tmp_path / "straight"
    run_task(straight, *SETTINGS, "resume=null")
    run_task(killed_run, *SETTINGS, "resume=auto")
    assert [r["epoch"] for r in epoch_records(killed_run)] == [1, 2, 3]
    assert_ends_as(straight, killed_run)  # metrics, losses and final weights, bit for bit


def test_a_checkpoint_of_the_old_engine_evaluates_and_predicts(killed_run, tmp_path):
    from engine.predict import Classifier

    score = run_task(
        tmp_path / "eval", "task=eval", f"task.ckpt={killed_run / 'checkpoints' / 'last.pt'}"
    )
    assert 0 <= score <= 100
    best = checkpoint.load(FIXTURE / "best.pt")
    classifier = Classifier.load(FIXTURE / "best.pt", use_ema=True)
    top = classifier(torch.zeros(1, 8, 8), topk=3)
    assert {t["label"] for t in top} <= set(best["class_names"]) and len(top) == 3
    assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
