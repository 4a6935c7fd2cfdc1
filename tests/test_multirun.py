"""`python run.py -m optim.lr=1e-3,1e-4`: one folder and one W&B run per job, one W&B group.

The default launcher, jobs one after another in one process; tests/test_launchers.py has the
parallel and SLURM (submitit) launchers.
"""

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sweeping.multirun import jobs_table
from tests.helpers import (
    RUN_PY,
    TINY,
    clean_env,
    epoch_records,
    records_of,
    run_py,
    wandb_config,
    wandb_records,
    wandb_run_id,
    wandb_runs,
)


def test_multirun_gives_each_job_a_folder_and_a_wandb_run_in_one_group(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_py(
        "-m",
        "optim.lr=1e-3,1e-4",
        f"hydra.sweep.dir={sweep}",
        "trainer.epochs=1",
        *TINY,
        cwd=tmp_path,
    )

    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    lrs, ids, groups = [], [], []
    for job in jobs:
        assert (job / "checkpoints" / "last.pt").is_file()
        assert (job / "metrics.jsonl").is_file()
        lrs.append(yaml.safe_load((job / "config.yaml").read_text())["optim"]["lr"])
        (offline_run,) = wandb_runs(job)
        records = wandb_records(offline_run)
        assert wandb_config(records)["optim"]["lr"] == lrs[-1]
        ids.append(wandb_run_id(records))
        groups.append(records_of(records, "run")[0].get("run_group"))
    assert lrs == [1e-3, 1e-4]
    assert len(set(ids)) == 2
    assert groups[0] and groups[0] == groups[1]
    assert_jobs_table(sweep, proc.stdout)


def assert_jobs_table(sweep, stdout):
    """The table that ends the multirun (conf/hydra/callbacks/jobs_table.yaml): each job's
    best val/acc1 and its epoch as the job's own metrics.jsonl has them, best first."""
    rows = list(csv.DictReader((sweep / "jobs.csv").open()))
    # the overrides the jobs differ in (trainer.epochs=1 etc. are the same for both)
    assert sorted(r["overrides"] for r in rows) == ["optim.lr=0.0001", "optim.lr=0.001"]
    for row in rows:
        records = epoch_records(Path(row["run_dir"]))
        best = max(records, key=lambda r: r["val/acc1"])
        assert row["state"] == "COMPLETE", row
        assert float(row["best val/acc1"]) == pytest.approx(best["val/acc1"])
        assert int(row["epoch"]) == best["epoch"] and int(row["epochs"]) == len(records) == 1
        assert float(row["time_s"]) == pytest.approx(best["time/epoch_s"], abs=0.06)
    values = [float(r["best val/acc1"]) for r in rows]
    assert values == sorted(values, reverse=True)
    assert f"multirun {sweep}: 2 jobs (2 complete)" in stdout
    assert "optim.lr=0.0001" in stdout and "optim.lr=0.001" in stdout

    # a job stopped before its summary (killed): unfinished, with its best epoch so far
    killed = sweep / "2"
    shutil.copytree(sweep / "0", killed)
    lines = (killed / "metrics.jsonl").read_text().splitlines(keepends=True)
    (killed / "metrics.jsonl").write_text("".join(x for x in lines if '"summary"' not in x))
    (row,) = [r for r in jobs_table(sweep, "val/acc1", "max") if r["run_dir"] == str(killed)]
    assert row["state"] == "UNFINISHED" and row["epoch"] == 1
    assert row["best val/acc1"] == pytest.approx(epoch_records(killed)[0]["val/acc1"])


@pytest.mark.slow  # a real training subprocess: keeps the default suite under 10 minutes
def test_a_failed_job_is_marked_failed_and_the_other_jobs_run(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_py(
        "-m",
        # job 0 fails inside fit, after its W&B run has started: its first update makes the
        # weights huge, its second loss is not finite, and one such update stops it
        "optim.lr=1e30,1e-3",
        "trainer.max_bad_steps=1",
        f"hydra.sweep.dir={sweep}",
        "trainer.epochs=1",
        *TINY,
        cwd=tmp_path,
        check=False,
    )

    # Hydra runs every job, then reports the first failure and exits with status 1
    assert proc.returncode == 1
    assert "Error executing job with overrides: ['optim.lr=1e+30'" in proc.stderr
    assert "FloatingPointError: 1 updates in a row had a non-finite loss" in proc.stderr
    assert "Traceback" not in proc.stderr  # a message of this repo's, not a bug: no traceback
    failed, done = sweep / "0", sweep / "1"
    assert not (failed / "checkpoints").exists()
    failed_records = wandb_records(wandb_runs(failed)[0])
    assert records_of(failed_records, "exit")[0]["exit_code"] == 1

    assert [r["epoch"] for r in epoch_records(done)] == [1]
    assert (done / "checkpoints" / "last.pt").is_file()
    done_records = wandb_records(wandb_runs(done)[0])
    assert records_of(done_records, "exit")[0]["exit_code"] == 0
    groups = {records_of(r, "run")[0]["run_group"] for r in (failed_records, done_records)}
    assert len(groups) == 1

    # the jobs table is printed although Hydra skips on_multirun_end after a failed job
    assert "multirun" in proc.stdout and "2 jobs (1 complete, 1 failed)" in proc.stdout
    rows = list(csv.DictReader((sweep / "jobs.csv").open()))
    assert [(r["job"], r["state"]) for r in rows] == [("1", "COMPLETE"), ("0", "FAILED")]
    assert rows[1]["note"].startswith("FloatingPointError: 1 updates in a row had a non-finite")
    assert rows[1]["best val/acc1"] == "" and rows[1]["epochs"] == "0"


def test_two_sweeps_started_together_get_their_own_folders(tmp_path):
    # the sweep folder is made before any job runs; an unknown model in each sweep stops it
    # right there (composing job 1 fails), so this costs two Hydra start-ups and no training
    args = [sys.executable, str(RUN_PY), "-m", "model=resnet18,no_such_model"]
    procs = [
        subprocess.Popen(
            args,
            cwd=tmp_path,
            env=clean_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 1 and "no_such_model" in stderr, stderr
    sweeps = sorted((tmp_path / "multirun").glob("*/*"))
    assert len(sweeps) == 2, sweeps  # <date>/<H-M-S-microseconds>: never the same folder
    assert all((s / "multirun.yaml").is_file() for s in sweeps)
