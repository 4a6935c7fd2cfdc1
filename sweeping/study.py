"""The Optuna study a sweep lives in: its database, restarts, and the lock on a sweep folder."""

import contextlib
import os
import warnings
from pathlib import Path

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from engine import files
from sweeping.config import SweepError, make_pruner, make_sampler

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def storage_url(cfg: DictConfig) -> str:
    return cfg.storage or f"sqlite:///{Path(cfg.dir).resolve() / 'study.db'}"


def _new_sqlite_file(path: Path) -> None:
    """Make study.db's tables under a temporary name: the file appears complete, so a reader
    that opens it as it appears (sweep.report_only=true) does not race Optuna's schema set-up
    (two processes stamping the schema version: sqlite3.IntegrityError)."""
    if path.exists():
        return
    with files.replacing(path, create=False) as tmp:
        RDBStorage(f"sqlite:///{tmp}").engine.dispose()


def open_study(cfg: DictConfig, create: bool = True) -> optuna.Study:
    url = storage_url(cfg)
    retry = RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry)
    if cfg.storage is None and create:
        _new_sqlite_file(Path(cfg.dir).resolve() / "study.db")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if cfg.storage is None or not create:
            # one sweep.py per folder (a lock): its leftover RUNNING trials are stale at once
            storage = RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        else:
            # workers on several machines: a trial whose worker stopped sending heartbeats for
            # grace_period seconds is failed and queued again by the next worker that looks
            storage = RDBStorage(
                url,
                heartbeat_interval=cfg.heartbeat_interval,
                grace_period=cfg.grace_period,
                heartbeat_stale_trial_callback=retry,
            )
    if not create:
        try:
            return optuna.load_study(study_name=cfg.study, storage=storage)
        except KeyError:
            raise SweepError(f"no study {cfg.study!r} in {url}") from None
    study = optuna.create_study(
        storage=storage,
        study_name=cfg.study,
        direction=cfg.direction,
        pruner=make_pruner(cfg),
        load_if_exists=True,
    )
    if study.direction.name.lower() != cfg.direction:
        raise SweepError(
            f"study {cfg.study!r} in {url} is {study.direction.name.lower()}d, but "
            f"sweep.direction={cfg.direction!r}; use another sweep.study name"
        )
    study.sampler = make_sampler(cfg, seed_offset=len(study.get_trials(deepcopy=False)))
    study.set_user_attr("sweep", OmegaConf.to_container(cfg))
    return study


def requeue(study: optuna.Study, numbers: list[int] | None, max_retry: int | None) -> list[int]:
    """Fail these RUNNING or just-failed trials (None: every RUNNING one) and queue each again
    with its parameters (Optuna's retry callback: the new trial records which one it re-runs)."""
    retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    storage = study._storage
    requeued = []
    for trial in study.get_trials(deepcopy=False):
        if numbers is None and trial.state != TrialState.RUNNING:
            continue
        if numbers is not None and trial.number not in numbers:
            continue
        if trial.state == TrialState.RUNNING:
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        retry(study, storage.get_trial(trial._trial_id))
        requeued.append(trial.number)
    return requeued


def counts(study: optuna.Study) -> dict[str, int]:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return {s.name.lower(): states.count(s) for s in TrialState}


@contextlib.contextmanager
def folder_lock(sweep_dir: Path):
    """One sweep.py per sweep folder with the default SQLite study (released if it dies)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; do not run two sweep.py on one folder
        yield
        return
    path = sweep_dir / ".sweep.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise SweepError(
                f"another sweep.py (pid {f.read().strip() or '?'}) is running {sweep_dir}; let it "
                "finish, watch it with sweep.report_only=true, or give workers a shared "
                "sweep.storage database URL"
            ) from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield
