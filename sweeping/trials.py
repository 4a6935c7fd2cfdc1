"""The trials: each a `python run.py ...` subprocess, followed, reported to Optuna, pruned."""

import contextlib
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import optuna
from omegaconf import DictConfig

from engine.logger import read_jsonl_line
from sweeping.config import SweepError, distribution, hydra_value
from sweeping.report import leaderboard
from sweeping.study import counts
from sweeping.table import fmt, write_csv

RUN_PY = Path(__file__).resolve().parent.parent / "run.py"
log = logging.getLogger("sweep")
POLL_S = 0.5  # how often a running trial's metrics.jsonl is read
STOP_GRACE_S = 30  # after SIGINT, a trial gets this long to close its W&B run before SIGKILL


class TrialFailed(Exception):
    """run.py failed: the trial is marked FAIL and the sweep goes on."""


class SweepStopped(Exception):
    """The sweep is stopping (Ctrl-C, SIGTERM, another trial's error): this trial is run again."""


# Runs run.py so that it dies with the thread that started it (Linux: PR_SET_PDEATHSIG): a
# killed sweep leaves no trial training on, unseen, beside the one that re-runs it.
_LAUNCH = """
import ctypes, os, signal, sys
if sys.platform.startswith("linux"):
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    if os.getppid() != int(os.environ.pop("SWEEP_PARENT_PID")):
        sys.exit(1)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


class Sweep:
    """Runs the missing trials of a study, n_jobs at a time, each a run.py subprocess."""

    def __init__(self, cfg: DictConfig, study: optuna.Study, wandb_tags: list[str] | None):
        self.cfg = cfg
        self.study = study
        self.dir = Path(cfg.dir).resolve()
        self.wandb_tags = wandb_tags  # None: the trials have no W&B run
        self.space = {key: distribution(key, spec) for key, spec in cfg.space.items()}
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.reserved = 0  # trials this process is starting, not yet RUNNING in the study
        self.failures = 0
        self.interrupted: list[int] = []
        self.error: BaseException | None = None
        self._local = threading.local()

    def run(self) -> None:
        threads = [
            threading.Thread(target=self._worker, args=(slot,), name=f"trial-slot-{slot}")
            for slot in range(self.cfg.n_jobs)
        ]
        for thread in threads:
            thread.start()
        try:
            while any(t.is_alive() for t in threads):
                for thread in threads:
                    thread.join(timeout=0.2)
        finally:
            # Ctrl-C / SIGTERM: the trials stop, and are queued to run again on the next start
            self.stop.set()
            for thread in threads:
                thread.join()

    def too_many_failures(self) -> bool:
        limit = self.cfg.max_failed_trials
        return limit is not None and self.failures >= limit

    def _worker(self, slot: int) -> None:
        self._local.slot = slot
        try:
            while not self.stop.is_set() and self._next_trial():
                pass
        except SweepStopped:
            pass
        except Exception as err:  # a bad setting, a database error: every trial stops
            with self.lock:
                self.error = self.error or err
            self.stop.set()

    def _next_trial(self) -> bool:
        """Run one trial if the study still lacks some; False when this worker is done."""
        with self.lock:
            n = counts(self.study)
            finished = n["complete"] + n["pruned"]
            if finished >= self.cfg.n_trials or self.too_many_failures():
                return False
            # running includes other workers' trials: one may still fail and need a re-run
            room = finished + n["running"] + self.reserved < self.cfg.n_trials
            if room:
                self.reserved += 1
                self._local.reserved = True
        if not room:
            if self.cfg.storage is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(self.study)
            self.stop.wait(2.0)
            return True
        try:
            self.study.optimize(
                self._objective, n_trials=1, catch=(TrialFailed,), callbacks=[self._finished]
            )
        finally:
            self._release()
        return True

    def _release(self) -> None:
        with self.lock:
            if getattr(self._local, "reserved", False):
                self.reserved -= 1
                self._local.reserved = False

    def _finished(self, study: optuna.Study, trial) -> None:
        with self.lock:  # the CSV stays current while the sweep runs; figures come at the end
            write_csv(leaderboard(study, self.cfg), self.dir / "leaderboard.csv")

    def _objective(self, trial: optuna.Trial) -> float:
        self._release()  # the trial is RUNNING in the study now
        params = {key: suggest(trial, key, dist) for key, dist in self.space.items()}
        run_dir = self.dir / f"trial_{trial.number:04d}"
        run_dir.mkdir(parents=True, exist_ok=True)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("epochs", 0)
        overrides = self._overrides(trial.number, params, run_dir)
        log.info("trial %d: %s -> %s", trial.number, params_text(params), run_dir)
        with open(run_dir / "output.log", "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", _LAUNCH, str(RUN_PY), *overrides],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env(),
                # its own process group: a Ctrl-C reaches sweep.py, which stops the trials itself
                process_group=0,
            )
            try:
                return self._follow(trial, proc, run_dir)
            finally:
                if proc.poll() is None:
                    _stop(proc)

    def _overrides(self, number: int, params: dict, run_dir: Path) -> list[str]:
        overrides = [
            *self.cfg.overrides,
            *(f"{key}={hydra_value(value)}" for key, value in params.items()),
            f"hydra.run.dir={hydra_value(str(run_dir))}",
        ]
        if self.wandb_tags is not None:
            tags = ",".join(hydra_value(t) for t in [*self.wandb_tags, f"trial-{number}"])
            overrides += [
                f"logger.wandb.group={hydra_value(self.cfg.study)}",
                f"logger.wandb.name=trial-{number}",
                f"logger.wandb.tags=[{tags}]",
            ]
        return overrides

    def _env(self) -> dict:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "SWEEP_PARENT_PID": str(os.getpid())}
        if self.cfg.n_jobs > 1 and "OMP_NUM_THREADS" not in env:
            # parallel trials share the cores instead of each taking all of them
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.cfg.n_jobs))
        if self.cfg.devices:
            devices = list(self.cfg.devices)
            env["CUDA_VISIBLE_DEVICES"] = str(devices[self._local.slot % len(devices)])
        return env

    def _follow(self, trial: optuna.Trial, proc: subprocess.Popen, run_dir: Path) -> float:
        """Report each epoch's metric as the run logs it; prune, or wait for the end."""
        metrics = _JsonlTail(run_dir / "metrics.jsonl")
        values: dict[int, float] = {}
        while True:
            try:
                code = proc.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                code = None
            for record in metrics.epoch_records():
                if self.cfg.metric not in record:
                    _stop(proc)
                    logged = sorted(k for k in record if "/" in k)
                    raise SweepError(
                        f"sweep.metric={self.cfg.metric!r} is not logged by run.py (trial "
                        f"{trial.number} logged {logged} at epoch {record['epoch']}); choose one "
                        "of those"
                    )
                epoch, value = int(record["epoch"]), float(record[self.cfg.metric])
                values[epoch] = value
                trial.report(value, epoch)
                trial.set_user_attr("epochs", len(values))
                if code is None and trial.should_prune():
                    _stop(proc)
                    raise optuna.TrialPruned(
                        f"{self.cfg.metric}={value:.4g} at epoch {epoch} ({self.cfg.pruner} pruner)"
                    )
            if code is not None:
                break
            if self.stop.is_set():
                _stop(proc)
                with self.lock:
                    self.interrupted.append(trial.number)
                raise SweepStopped(f"trial {trial.number} stopped with the sweep")
        if code != 0 and self.stop.is_set():
            with self.lock:
                self.interrupted.append(trial.number)
            raise SweepStopped(f"trial {trial.number} stopped with the sweep")
        if code != 0:
            with self.lock:
                self.failures += 1
            error = f"run.py exited {code}: {_error_line(run_dir / 'output.log')}"
            trial.set_user_attr("error", error)
            raise TrialFailed(f"{error} (all of it: {run_dir / 'output.log'})")
        finite = [v for v in values.values() if math.isfinite(v)]
        if not values:
            raise SweepError(
                f"trial {trial.number} finished without logging sweep.metric="
                f"{self.cfg.metric!r} for any epoch ({run_dir / 'metrics.jsonl'})"
            )
        if not finite:
            return math.nan  # Optuna marks the trial FAIL
        return max(finite) if self.cfg.direction == "maximize" else min(finite)


def suggest(trial: optuna.Trial, key: str, dist: optuna.distributions.BaseDistribution):
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, optuna.distributions.IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)


class _JsonlTail:
    """The complete lines a running process has added to a JSON-lines file since the last call."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = ""

    def epoch_records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path) as f:
            f.seek(self.offset)
            text = self.partial + f.read()
            self.offset = f.tell()
        *lines, self.partial = text.split("\n")
        records = [read_jsonl_line(line) for line in lines if line.strip()]
        return [r for r in records if "epoch" in r and "summary" not in r]


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT first, so that the run closes its W&B run; SIGKILL if it does not end."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _error_line(path: Path) -> str:
    """The exception line of a failed run's output (Hydra ends it with a hint), or its last line."""
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", line):
            return line
    return lines[-1] if lines else "no output"


def params_text(params: dict) -> str:
    return " ".join(f"{k}={fmt(v)}" for k, v in params.items())
