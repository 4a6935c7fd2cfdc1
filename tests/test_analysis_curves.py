"""analysis/curves.py on real runs: seeds grouped into a band, lrs apart, W&B = metrics.jsonl."""

import os
import shutil
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from analysis import curves
from tests.helpers import REPO, TINY, clean_env, epoch_records, run_py, wandb_runs

CURVES_PY = REPO / "analysis" / "curves.py"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Four jobs in one process: seeds 0, 1 x lrs 1e-3, 1e-4, two epochs of two updates."""
    tmp = tmp_path_factory.mktemp("curves")
    run_py(
        "-m",
        "seed=0,1",
        "optim.lr=1e-3,1e-4",
        f"hydra.sweep.dir={tmp / 'sweep'}",
        "model.name=test_resnet",  # timm's tiny test net: the runs take seconds
        "trainer.epochs=2",
        *TINY,
        "trainer.limit_train_batches=2",
        "trainer.log_every=1",
        "trainer.limit_val_batches=1",
        cwd=tmp,
    )
    return tmp / "sweep"


def jobs_with_lr(sweep, lr):
    jobs = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    return [j for j in jobs if yaml.safe_load((j / "config.yaml").read_text())["optim"]["lr"] == lr]


@pytest.mark.slow  # a real training subprocess: keeps the default suite under 10 minutes
def test_seeds_of_one_config_are_one_group_drawn_as_mean_and_band(sweep):
    runs = curves.load_runs([str(j) for j in jobs_with_lr(sweep, 1e-3)])
    assert sorted(r.config["seed"] for r in runs) == [0, 1]
    assert [len(g) for g in curves.group_runs(runs)] == [2]

    fig = curves.figure(runs)
    for ax in fig.axes:
        assert len(ax.lines) == 1 and len(ax.collections) == 1  # the mean, the band
    (legend,) = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "mean of 2 seeds" in legend and "min-max" in legend


@pytest.mark.slow  # a real training subprocess: keeps the default suite under 10 minutes
def test_a_multirun_folder_expands_to_its_jobs_and_each_lr_is_a_line(sweep):
    runs = curves.load_runs([sweep])
    assert len(runs) == 4
    groups = curves.group_runs(runs)
    assert sorted(len(g) for g in groups) == [2, 2]
    labels = curves.group_labels(groups, "optim.lr")
    assert sorted(labels) == ["optim.lr=0.0001", "optim.lr=0.001"]
    assert sorted(curves.group_labels(groups)) == sorted(labels)  # the key that differs

    # one run of each lr, no seed partner: two plain lines
    one_each = curves.load_runs([jobs_with_lr(sweep, 1e-3)[0], jobs_with_lr(sweep, 1e-4)[0]])
    fig = curves.figure(one_each, keys=["val/loss"], label="optim.lr")
    (ax,) = fig.axes
    assert len(ax.lines) == 2 and not ax.collections
    assert ax.get_xlabel() == "update step"


@pytest.mark.slow  # a real training subprocess: keeps the default suite under 10 minutes
def test_the_command_line_writes_a_png_of_the_expected_size(sweep, tmp_path):
    out = tmp_path / "fig.png"
    proc = subprocess.run(
        [sys.executable, str(CURVES_PY), str(sweep), "--label", "optim.lr", "--out", str(out)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and "slowest epoch" in proc.stdout
    width, height = curves.PANEL_SIZE_IN
    with Image.open(out) as image:
        assert image.size == (round(2 * width * curves.DPI), round(height * curves.DPI))
        darkest, lightest = image.convert("L").getextrema()
        assert darkest < 100 and lightest == 255  # lines and text on a white page


@pytest.mark.slow  # a real training subprocess: keeps the default suite under 10 minutes
def test_the_offline_wandb_run_gives_the_same_series_as_metrics_jsonl(sweep):
    job = jobs_with_lr(sweep, 1e-3)[0]
    (from_jsonl,) = curves.load_runs([job])
    (from_wandb,) = curves.load_runs(wandb_runs(job))
    assert from_wandb.name == from_jsonl.name
    assert from_wandb.config["optim"]["lr"] == 1e-3
    for key in ("train/loss", "train/lr", "val/acc1", "val/loss", "time/epoch_s"):
        steps, values = from_jsonl.series(key)
        assert steps
        assert from_wandb.series(key) == (steps, pytest.approx(values))


@pytest.mark.slow  # a real training subprocess: keeps the default suite under 10 minutes
def test_time_statistics_name_the_slowest_and_fastest_epoch(sweep):
    job = jobs_with_lr(sweep, 1e-4)[0]
    records = epoch_records(job)
    stats = curves.time_stats(curves.load_runs([job])[0])
    slowest = max(records, key=lambda r: r["time/epoch_s"])
    fastest = min(records, key=lambda r: r["time/epoch_s"])
    assert (stats["slowest_epoch"], stats["slowest_s"]) == (
        slowest["epoch"],
        slowest["time/epoch_s"],
    )
    assert (stats["fastest_epoch"], stats["fastest_s"]) == (
        fastest["epoch"],
        fastest["time/epoch_s"],
    )
    # two updates per epoch (limit_train_batches=2)
    per_update = [r["time/train_s"] / 2 for r in records]
    assert stats["s_per_update"] == pytest.approx(sum(per_update) / len(per_update))


def test_no_run_says_so_and_exits_non_zero(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(CURVES_PY)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
    )
    assert proc.returncode != 0
    assert "no run given" in proc.stderr and "outputs" in proc.stderr


def test_no_argument_passes_over_an_eval_job_and_says_which_run(
    tiny_run, tmp_path, monkeypatch, capsys
):
    outputs = tmp_path / "outputs" / "2024-01-01"
    train, evaluation = outputs / "10-00-00-000000", outputs / "11-00-00-000000"
    for folder in (train, evaluation):
        folder.mkdir(parents=True)
    shutil.copy(tiny_run / "metrics.jsonl", train)
    shutil.copy(tiny_run / "config.yaml", train)
    # a task=eval job's metrics.jsonl: summary records only (engine.logger's summary)
    lines = (tiny_run / "metrics.jsonl").read_text().splitlines()
    (evaluation / "metrics.jsonl").write_text("\n".join(x for x in lines if '"summary"' in x))
    newer = (train / "metrics.jsonl").stat().st_mtime + 60
    os.utime(evaluation / "metrics.jsonl", (newer, newer))
    monkeypatch.chdir(tmp_path)
    assert curves.main([]) == 0
    out = capsys.readouterr().out
    assert "no run given: drawing outputs/2024-01-01/10-00-00-000000 (the newest run" in out
    assert "passed over 1 newer folder(s) without any (eval jobs): " in out
    assert "outputs/2024-01-01/11-00-00-000000" in out
    assert (train / "curves.png").is_file() and not (evaluation / "curves.png").exists()

    shutil.rmtree(train)  # only the eval job left: nothing to draw, and the error says why
    assert curves.main([]) == 1
    assert "1 folder(s) there hold only summaries (eval jobs)" in capsys.readouterr().err


def test_label_names_the_rows_of_the_time_table(tiny_run):
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(curves.time_table(curves.load_runs([tiny_run]), "optim.lr"))
    lr = yaml.safe_load((tiny_run / "config.yaml").read_text())["optim"]["lr"]
    assert f"optim.lr={lr} ({tiny_run.name})" in console.export_text()


def _seed_run(name: str, seed: int, lr: float) -> curves.Run:
    """A run as load_runs returns it, with a falling loss and a rising accuracy."""
    rows = {step: {"train/loss": 2.0 / step + seed / 100} for step in range(1, 21)}
    for epoch, step in enumerate((10, 20), 1):
        rows[step].update({"epoch": epoch, "val/acc1": 30.0 * epoch + seed})
    return curves.Run(name, "metrics.jsonl", {"seed": seed, "optim": {"lr": lr}}, rows)


@pytest.mark.parametrize("keys", [["val/acc1"], ["train/loss", "val/acc1"]])
@pytest.mark.parametrize("lrs", [1, 6])
def test_the_legend_fits_the_figure_and_covers_no_axis_label(keys, lrs):
    # a seed group with no config key telling it apart is named after its runs; with timestamped
    # run folders that label ran past the figure and over the axis label
    runs = [
        _seed_run(f"multirun/2026-12-03/10-0{lr}-00-123456/{seed}", seed, 10.0**-lr)
        for lr in range(lrs)
        for seed in range(5)
    ]
    fig = curves.figure(runs, keys=keys)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = fig.axes[0].get_legend().get_window_extent(renderer)
    assert fig.bbox.x0 <= legend.x0 and legend.x1 <= fig.bbox.x1
    assert fig.bbox.y0 <= legend.y0 and legend.y1 <= fig.bbox.y1
    for ax in fig.axes:  # the panel, and each axis with its label and the tick labels drawn
        for box in (
            ax.patch.get_window_extent(renderer),
            *(a.get_tightbbox(renderer) for a in (ax.xaxis, ax.yaxis)),
        ):
            assert not legend.overlaps(box)
    assert fig._suptitle is not None and "validation top-1" in fig._suptitle.get_text()
    assert f"{len(runs)} runs, {lrs} line(s)" in fig._suptitle.get_text()
