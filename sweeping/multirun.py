"""The table that ends `python run.py -m ...`: one row per job, best first, failed jobs marked.

A Hydra callback (conf/hydra/callbacks/jobs_table.yaml). Each row comes from the job's own run
folder, so it is the same under every launcher (jobs in this process, in joblib workers or on
SLURM): `.hydra/overrides.yaml` (what the job was given), `metrics.jsonl` (its epochs and the
`best/...` summary a finished training writes) and `run.log` (run.py logs a failed job's error
there). The table is printed in the terminal and written to <sweep folder>/jobs.csv.
"""

import atexit
import logging
import math
import os
import re
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from engine.logger import read_metrics
from sweeping.table import print_table, write_csv

log = logging.getLogger(__name__)
FAILED_LINE = re.compile(r"job \d+ failed: (.*)")  # as run.py's failed() logs it
NOTE_CHARS = 100  # of a note in the terminal


class JobsTable(Callback):
    """Prints the jobs of a multirun at its end: overrides, state, best `metric` and its epoch,
    epochs run, time. `direction` (max | min) orders them, and picks the best epoch of a job
    that ended before its summary.

    Hydra calls on_multirun_end only when every job succeeded (the first failure is raised
    before it); after a failure the table is printed as the process exits.
    """

    def __init__(self, metric: str = "val/acc1", direction: str = "max"):
        if direction not in ("max", "min"):
            raise ValueError(f"hydra.callbacks.jobs_table.direction={direction!r}: max or min")
        self.metric, self.direction = metric, direction
        self.sweep_dir: Path | None = None
        self.failed: dict[str, bool] = {}  # job folder -> failed, for the jobs run in this process

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)
        atexit.register(self._print)

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus

        folder = str(Path(config.hydra.runtime.output_dir).resolve())
        self.failed[folder] = job_return.status == JobStatus.FAILED

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        atexit.unregister(self._print)
        self._print()

    def _print(self) -> None:
        if self.sweep_dir is None or int(os.environ.get("RANK", 0)) != 0:
            return  # under torchrun, every process runs the multirun: rank 0 alone reports
        rows = jobs_table(self.sweep_dir, self.metric, self.direction, self.failed)
        if not rows:
            return
        path = write_csv(rows, self.sweep_dir / "jobs.csv")
        # an error note is cut in the terminal; jobs.csv (and the job's run.log) hold all of it
        short = [{**row, "note": _cut(row["note"], NOTE_CHARS)} for row in rows]
        print_table(table_title(self.sweep_dir, rows), short)
        print(f"wrote {path}")


def jobs_table(
    sweep_dir: Path, metric: str, direction: str, failed: dict[str, bool] | None = None
) -> list[dict]:
    """One row per job folder under `sweep_dir`: finished jobs best first, then the others in
    job order. `failed`: what Hydra said of the jobs it ran in this process."""
    jobs = [job_record(p.parent.parent, metric, direction) for p in _overrides_files(sweep_dir)]
    jobs.sort(key=_job_order)
    for job in jobs:
        folder = str(Path(job["run_dir"]).resolve())
        if (failed or {}).get(folder) and job["state"] != "FAILED":
            job["state"], job["note"] = "FAILED", job["note"] or "failed: see run.log"
    varying = _varying(jobs)
    sign = -1 if direction == "max" else 1

    def order(job):
        value = job["best"] if _finite(job["best"]) else math.inf * -sign
        return (0, sign * value, ()) if job["state"] == "COMPLETE" else (1, 0, _job_order(job))

    return [
        {
            "job": job["job"],
            "overrides": " ".join(o for o in job["overrides"] if o in varying),
            "state": job["state"],
            f"best {metric}": job["best"],
            "epoch": job["epoch"],
            "epochs": job["epochs"],
            "time_s": job["time_s"],
            "note": job["note"],
            "run_dir": job["run_dir"],
        }
        for job in sorted(jobs, key=order)
    ]


def job_record(folder: Path, metric: str, direction: str) -> dict:
    """What one job's folder says about it (see the module's docstring)."""
    hydra_dir = folder / ".hydra"
    overrides = yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) or []
    number = _job_number(hydra_dir, folder)
    path = folder / "metrics.jsonl"
    records = read_metrics(path) if path.is_file() else []
    epochs = [r for r in records if "summary" not in r and "epoch" in r]
    summary = {k: v for r in records if "summary" in r for k, v in r["summary"].items()}
    error = _failure(folder / "run.log")
    best, epoch = summary.get(f"best/{metric}"), summary.get("best/epoch")
    if best is None and epochs:  # ended before its summary: the best epoch so far
        pick = max if direction == "max" else min
        scored = [r for r in epochs if _finite(r.get(metric))]
        top = pick(scored, key=lambda r: r[metric]) if scored else None
        best, epoch = (top[metric], top["epoch"]) if top else (None, None)
    finished = any(k.startswith("best/") for k in summary)
    state = "FAILED" if error else "COMPLETE" if finished else "UNFINISHED"
    return {
        "job": number,
        "overrides": [str(o) for o in overrides],
        "state": state,
        "best": best,
        "epoch": epoch,
        "epochs": len(epochs),
        "time_s": round(sum(r.get("time/epoch_s", 0.0) for r in epochs), 1) if epochs else None,
        "note": error or ("" if finished else "no final summary in metrics.jsonl"),
        "run_dir": str(folder),
    }


def table_title(sweep_dir: Path, rows: list[dict]) -> str:
    states = [row["state"] for row in rows]
    counted = ", ".join(f"{states.count(s)} {s.lower()}" for s in dict.fromkeys(states))
    return f"multirun {sweep_dir}: {len(rows)} jobs ({counted}); finished jobs best first"


def _job_order(job: dict) -> tuple:
    number = job["job"]  # a number, or the name of a folder Hydra did not finish writing
    return (0, number, "") if isinstance(number, int) else (1, 0, str(number))


def _overrides_files(sweep_dir: Path) -> list[Path]:
    return sorted(Path(sweep_dir).glob("**/.hydra/overrides.yaml"))


def _job_number(hydra_dir: Path, folder: Path) -> int | str:
    try:
        hydra = yaml.safe_load((hydra_dir / "hydra.yaml").read_text())
        return int(hydra["hydra"]["job"]["num"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return folder.name  # a folder Hydra did not finish writing: its name says enough


def _failure(run_log: Path) -> str:
    """The error run.py logged for a failed job, or ''."""
    if not run_log.is_file():
        return ""
    for line in run_log.read_text(errors="replace").splitlines():
        found = FAILED_LINE.search(line)
        if found:
            return found.group(1).strip()
    return ""


def _varying(jobs: list[dict]) -> set[str]:
    """The overrides not given to every job (those given to all say nothing about a row)."""
    if len(jobs) < 2:
        return {o for job in jobs for o in job["overrides"]}
    common = set.intersection(*(set(job["overrides"]) for job in jobs))
    return {o for job in jobs for o in job["overrides"]} - common


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3].rstrip() + "..."


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
