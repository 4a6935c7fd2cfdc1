"""analysis/lr_curve.py draws the LR a real run logs, update for update."""

import csv
import shutil
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from analysis.lr_curve import DPI, FIGSIZE, lr_curve, write
from engine.runinfo import git_state
from tests.helpers import REPO, TINY, clean_env, read_jsonl, run_py

# 4 batches per epoch, accumulated 3 at a time: 2 updates per epoch (the second of 1 batch);
# a warmup of 3 updates that crosses the epoch boundary, then the cosine
OVERRIDES = [
    *TINY,
    "trainer.log_every=1",
    "trainer.epochs=2",
    "trainer.limit_val_batches=1",
    "data.batch_size=16",
    "trainer.accum_steps=3",
    "sched.warmup_steps=3",
    "optim=sgd",
    "logger=none",
]


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_curve_is_the_lr_a_run_logs(tmp_path):
    run_dir = tmp_path / "run"
    run_py(*OVERRIDES, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    logged = {r["step"]: r["train/lr"] for r in read_jsonl(run_dir) if "train/lr" in r}

    curve = lr_curve(composed(*OVERRIDES))
    assert curve["updates_per_epoch"] == 2
    assert curve["warmup"] == 3
    assert curve["step"] == sorted(logged) == list(range(1, 5))
    for step, lr in zip(curve["step"], curve["lr"], strict=True):
        assert abs(lr - logged[step]) <= 1e-12, (step, lr, logged[step])
    assert curve["lr"][0] < curve["lr"][1] < curve["lr"][2] < curve["lr"][3]  # the warmup
    assert set(curve["momentum"]) == {0.9}  # conf/optim/sgd.yaml


def test_updates_follow_train_size_accumulation_and_world_size(monkeypatch):
    cfg = composed("trainer.epochs=2", "trainer.accum_steps=2", "data.batch_size=10")
    monkeypatch.setenv("WORLD_SIZE", "4")
    curve = lr_curve(cfg, train_size=1000)  # 1000 // (10 x 4) = 25 batches, 13 updates
    assert curve["updates_per_epoch"] == 13
    assert len(curve["lr"]) == 26
    assert curve["momentum"][0] == 0.9  # AdamW: beta1


def test_png_and_csv(tmp_path):
    curve = lr_curve(composed("data.dataset.image_size=8", "trainer.epochs=2"))
    png, csv_path = write(curve, tmp_path / "plots" / "curve")
    with Image.open(png) as image:
        assert image.size == (FIGSIZE[0] * DPI, FIGSIZE[1] * DPI)
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == len(curve["step"]) == 2 * curve["updates_per_epoch"]
    assert [float(r["lr"]) for r in rows] == curve["lr"]


@pytest.mark.slow  # a real training subprocess: keeps the default suite under 10 minutes
def test_cli_writes_where_asked_and_nothing_else(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "analysis" / "lr_curve.py"), "trainer.epochs=2", "+out=c"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote c.png" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv", "c.png"]


def clone_of_this_checkout(dest):
    """A git repository holding this checkout's files (tracked, and untracked but not ignored)
    as one commit: a fresh clone of the code under test, uncommitted edits included."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():  # a tracked file deleted in the checkout is left out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    who = ["-c", "user.name=test", "-c", "user.email=test@example.com"]
    for args in (["init", "-q"], ["add", "-A"], [*who, "commit", "-q", "-m", "clone"]):
        subprocess.run(["git", *args], cwd=dest, check=True, capture_output=True)
    return dest


@pytest.mark.slow  # a tool subprocess in a copy of the repo
def test_defaults_in_a_clone_write_under_outputs_and_leave_it_clean(tmp_path):
    clone = clone_of_this_checkout(tmp_path / "clone")
    assert git_state(clone)["dirty"] is False
    proc = subprocess.run(
        [sys.executable, "analysis/lr_curve.py", "data.dataset.image_size=8", "trainer.epochs=2"],
        cwd=clone,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = ["outputs/analysis/lr_curve.csv", "outputs/analysis/lr_curve.png"]
    assert all(f"wrote {path}" in proc.stdout for path in written)
    assert sorted(str(p.relative_to(clone)) for p in (clone / "outputs").rglob("*.*")) == written
    # what a run started now records in run_info.json; a file that matters still counts
    assert git_state(clone) == {"commit": git_state(clone)["commit"], "dirty": False, "changes": []}
    (clone / "models" / "my_net.py").write_text("")
    assert git_state(clone)["changes"] == ["?? models/my_net.py"]


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_the_legend_names_the_lr_the_end_of_warmup_and_the_momentum(optim):
    from analysis.lr_curve import figure

    curve = lr_curve(composed(*OVERRIDES, f"optim={optim}"), train_size=64)
    assert curve["warmup"] == 3
    fig = figure(curve)
    (legend,) = [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert [t.get_text() for t in legend.get_texts()] == ["lr", "end of warmup", "momentum"]
    styles = [h.get_linestyle() for h in legend.legend_handles]
    assert styles == ["-", ":", "--"]  # each entry looks like its line
