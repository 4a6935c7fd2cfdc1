"""Hyper-parameter search on top of run.py: random or Bayesian (Optuna TPE), pruned, resumable.

python sweep.py                                        # sweeps/default.yaml
python sweep.py sweep=default sweep.n_trials=40 sweep.n_jobs=2 trainer.epochs=10
python sweep.py sweep.dir=multirun/sweeps/<name>-<time>     # continue a killed sweep
python sweep.py sweep.dir=multirun/sweeps/<name>-<time> sweep.report_only=true
python sweep.py sweep.storage=postgresql://host/db sweep.study=<name>  # one more worker

`sweep=<name>` picks sweeps/<name>.yaml (or a .yaml path); `sweep.<key>=<value>` sets one of
its keys (SweepConfig below); anything else is a run.py override for every trial. Each trial is
a real `python run.py ...` in <sweep folder>/trial_NNNN: its own run folder and W&B run, in a W&B
group named after the study, tagged trial-N. The study lives in a database (<sweep
folder>/study.db unless sweep.storage names one), so a killed sweep continues where it stopped:
the trials it was running are run again, and only the trials still missing are started.
"""

import contextlib
import csv
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
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from engine.logger import read_jsonl_line

REPO = Path(__file__).resolve().parent
SWEEP_CONF = REPO / "sweeps"  # not in conf/: run.py would list it as one of its config groups
RUN_PY = REPO / "run.py"
log = logging.getLogger("sweep")

# short names -> optuna classes; sampler_args / pruner_args are those classes' keyword arguments
SAMPLERS = {
    "tpe": "TPESampler",
    "random": "RandomSampler",
    "gp": "GPSampler",
    "qmc": "QMCSampler",
}
PRUNERS = {
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "hyperband": "HyperbandPruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "none": "NopPruner",
}
# space entry type -> the keys it takes (the keyword arguments of trial.suggest_<type>)
SPACE_KEYS = {
    "float": ({"low", "high"}, {"log", "step"}),
    "int": ({"low", "high"}, {"log", "step"}),
    "categorical": ({"choices"}, set()),
}
# what a restart may change; the rest defines the search and stays as the sweep started
RESTART_KEYS = {"dir", "n_trials", "n_jobs", "report_only", "devices", "max_failed_trials"}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
POLL_S = 0.5  # how often a running trial's metrics.jsonl is read
STOP_GRACE_S = 30  # after SIGINT, a trial gets this long to close its W&B run before SIGKILL


@dataclass
class SweepConfig:
    """The keys of sweeps/*.yaml and their types. Their values default to
    sweeps/default.yaml's (its space aside), which says what each one does."""

    name: str = MISSING
    metric: str = MISSING
    direction: str = MISSING
    n_trials: int = MISSING
    n_jobs: int = MISSING
    sampler: str = MISSING
    sampler_args: dict[str, Any] = MISSING
    seed: int | None = MISSING
    pruner: str = MISSING
    pruner_args: dict[str, Any] = MISSING
    space: dict[str, Any] = MISSING
    overrides: list[str] = MISSING
    storage: str | None = MISSING
    study: str | None = MISSING
    dir: str | None = MISSING
    max_retry: int | None = MISSING
    max_failed_trials: int | None = MISSING
    heartbeat_interval: int = MISSING
    grace_period: int = MISSING
    devices: list[Any] | None = MISSING
    report_only: bool = MISSING


class SweepError(ValueError):
    """A bad sweep setting; printed as one message naming the value and the fix."""


class TrialFailed(Exception):
    """run.py failed: the trial is marked FAIL and the sweep goes on."""


class SweepStopped(Exception):
    """The sweep is stopping (Ctrl-C, SIGTERM, another trial's error): this trial is run again."""


# ---------------------------------------------------------------------------------------------
# configuration


def parse_args(argv: list[str]) -> tuple[str | None, list, list[str]]:
    """(sweep file name or None, `sweep.<key>=` overrides, run.py overrides for every trial)."""
    parser = OverridesParser.create()
    name, sweep_overrides, run_overrides = None, [], []
    for arg in argv:
        if arg in ("-m", "--multirun") or arg.startswith("hydra.run.dir"):
            raise SweepError(
                f"{arg!r}: sweep.py launches the trials and places their folders itself; drop it"
            )
        if arg.startswith("sweep.overrides="):
            sweep_overrides.append(("overrides", _parse_override_list(arg, parser)))
            continue
        try:
            override = parser.parse_override(arg)
        except HydraException as err:
            raise SweepError(f"{arg!r} is not a Hydra override: {err}") from None
        key = override.key_or_group
        if key == "sweep":
            name = str(override.value())
        elif key.startswith("sweep."):
            if override.is_delete():
                raise SweepError(f"{arg!r}: sweep keys cannot be deleted; set them instead")
            sweep_overrides.append((key.removeprefix("sweep."), override.value()))
        else:
            run_overrides.append(arg)
    return name, sweep_overrides, run_overrides


def _parse_override_list(arg: str, parser: OverridesParser) -> list[str]:
    """`sweep.overrides=[trainer.epochs=5,model=resnet50]`: Hydra's grammar wants each item
    quoted, so unquoted items are split at top-level commas and checked one by one."""
    with contextlib.suppress(HydraException):
        value = parser.parse_override(arg).value()
        if isinstance(value, list):
            return [str(v) for v in value]
    text = arg.partition("=")[2].strip()
    if not (text.startswith("[") and text.endswith("]")):
        raise SweepError(
            f"{arg!r}: sweep.overrides is a list, e.g. 'sweep.overrides=[trainer.epochs=5]'"
        )
    items, depth, quote, start = [], 0, None, 1
    for i, char in enumerate(text[1:-1], start=1):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    items.append(text[start:-1].strip())
    items = [item for item in items if item]
    for item in items:
        try:
            parser.parse_override(item)
        except HydraException as err:
            raise SweepError(
                f"sweep.overrides item {item!r} is not a run.py override: {err}"
            ) from None
    return items


def sweep_options() -> list[str]:
    return sorted(p.stem for p in SWEEP_CONF.glob("*.yaml"))


def load_sweep_file(name: str) -> DictConfig:
    """sweeps/<name>.yaml, or a .yaml path, over SweepConfig's defaults."""
    path = Path(name).expanduser()
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = SWEEP_CONF / f"{name}.yaml"
    if not path.is_file():
        raise SweepError(
            f"sweep={name!r}: no sweeps/{name}.yaml and no such .yaml file; "
            f"choose one of {sweep_options()} or give a path to a sweep .yaml"
        )
    cfg = _schema()
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
    except OmegaConfBaseException as err:
        raise SweepError(f"{path}: {_first_line(err)}; the keys are {list(_schema())}") from None
    if not cfg.name:
        cfg.name = path.stem
    return cfg


def _schema() -> DictConfig:
    """SweepConfig's keys with sweeps/default.yaml's values, less its name and space."""
    base = OmegaConf.merge(
        OmegaConf.structured(SweepConfig), OmegaConf.load(SWEEP_CONF / "default.yaml")
    )
    base.name, base.space = "", {}
    return base


def apply_overrides(cfg: DictConfig, overrides: list) -> None:
    for key, value in overrides:
        if key not in cfg:
            raise SweepError(f"sweep.{key} is not a sweep setting; the keys are {list(cfg)}")
        try:
            # merge=False: a space or a list given on the command line replaces the file's
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException as err:
            raise SweepError(f"sweep.{key}={value!r}: {_first_line(err)}") from None


def load_config(argv: list[str]) -> tuple[DictConfig, bool]:
    """The sweep's config, and whether it continues an existing sweep.

    A new sweep: the file, then `sweep.<key>=` and run overrides. An existing one (sweep.dir
    holds a sweep.yaml, or sweep.storage + sweep.study name a study made by sweep.py): its saved
    config, where the command line may change only RESTART_KEYS.
    """
    name, sweep_overrides, run_overrides = parse_args(argv)
    fresh = load_sweep_file(name or "default")
    apply_overrides(fresh, sweep_overrides)
    _add_run_overrides(fresh, run_overrides)
    saved = _saved_config(fresh)
    if saved is None:
        if fresh.report_only:
            raise SweepError(
                f"sweep.report_only=true needs an existing sweep: sweep.dir={fresh.dir!r} holds no "
                "sweep.yaml; give the folder of a sweep (multirun/sweeps/<name>-<time>)"
            )
        if fresh.dir is None:
            fresh.dir = str(_new_sweep_dir(fresh.name))
        if fresh.study is None:
            fresh.study = Path(fresh.dir).name
        validate(fresh)
        return fresh, False

    cfg = saved.copy()
    apply_overrides(cfg, sweep_overrides)
    _add_run_overrides(cfg, run_overrides)
    if name is not None and name != saved.name:
        raise SweepError(
            f"sweep={name!r}, but {cfg.dir} is a {saved.name!r} sweep; leave sweep= out to "
            "continue it, or start a new sweep in a new folder"
        )
    for key in cfg:
        if key not in RESTART_KEYS and cfg[key] != saved[key]:
            new = OmegaConf.to_container(cfg)[key]
            old = OmegaConf.to_container(saved)[key]
            raise SweepError(
                f"sweep.{key}={new!r}, but this sweep runs with {old!r} ({cfg.dir}/sweep.yaml); "
                f"a sweep keeps its search: change only {sorted(RESTART_KEYS)} when continuing "
                "it, or start a new sweep"
            )
    validate(cfg)
    return cfg, True


def _add_run_overrides(cfg: DictConfig, run_overrides: list[str]) -> None:
    cfg.overrides = [*cfg.overrides, *(o for o in run_overrides if o not in cfg.overrides)]


def _saved_config(fresh: DictConfig) -> DictConfig | None:
    if fresh.dir is not None:
        path = Path(fresh.dir) / "sweep.yaml"
        if not path.is_file():
            return None
        saved = OmegaConf.merge(OmegaConf.structured(SweepConfig), OmegaConf.load(path))
        saved.dir = fresh.dir  # where the folder is now, if it moved
        return saved
    if fresh.storage is not None and fresh.study is not None:
        # a worker on another machine: the study in the shared database holds the config
        with contextlib.suppress(KeyError):
            study = optuna.load_study(study_name=fresh.study, storage=fresh.storage)
            if "sweep" in study.user_attrs:
                saved = OmegaConf.merge(
                    OmegaConf.structured(SweepConfig), study.user_attrs["sweep"]
                )
                saved.dir = str(Path("multirun") / "sweeps" / fresh.study)
                return saved
    return None


def _new_sweep_dir(name: str) -> Path:
    base = Path("multirun") / "sweeps" / f"{name}-{datetime.now():%Y-%m-%d_%H-%M-%S}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}_{i}")
    return path


def validate(cfg: DictConfig) -> None:
    """Everything that can be checked before a trial starts: names, space, numbers."""
    if cfg.direction not in ("maximize", "minimize"):
        raise SweepError(f"sweep.direction={cfg.direction!r}; choose 'maximize' or 'minimize'")
    if cfg.n_trials < 1 or cfg.n_jobs < 1:
        raise SweepError(
            f"sweep.n_trials={cfg.n_trials} and sweep.n_jobs={cfg.n_jobs} must be 1 or more"
        )
    make_sampler(cfg)
    make_pruner(cfg)
    if not cfg.space:
        raise SweepError(
            "sweep.space is empty; give each searched key a range, e.g. "
            "space: {optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}}"
        )
    for key, spec in cfg.space.items():
        distribution(key, spec)


def distribution(key: str, spec) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution of one space entry, or a SweepError naming what is wrong."""
    example = "{type: float, low: 1.0e-4, high: 1.0e-1, log: true} or {type: categorical, choices: [a, b]}"
    if not isinstance(spec, DictConfig | dict) or "type" not in spec:
        raise SweepError(f"sweep.space.{key}={spec!r} must be a mapping like {example}")
    spec = dict(OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else spec)
    kind = spec.pop("type")
    if kind not in SPACE_KEYS:
        raise SweepError(
            f"sweep.space.{key}.type={kind!r}; choose one of {list(SPACE_KEYS)}: {example}"
        )
    required, optional = SPACE_KEYS[kind]
    missing, unknown = required - set(spec), set(spec) - required - optional
    if missing or unknown:
        raise SweepError(
            f"sweep.space.{key} ({kind}) "
            + (f"lacks {sorted(missing)}" if missing else f"has unknown keys {sorted(unknown)}")
            + f"; a {kind} entry takes {sorted(required)} and optionally {sorted(optional)}"
        )
    try:
        if kind == "categorical":
            if not isinstance(spec["choices"], list) or not spec["choices"]:
                raise ValueError("choices must be a non-empty list")
            return optuna.distributions.CategoricalDistribution(spec["choices"])
        if kind == "int":
            return optuna.distributions.IntDistribution(**spec)
        return optuna.distributions.FloatDistribution(**spec)
    except (ValueError, TypeError) as err:
        raise SweepError(f"sweep.space.{key}={spec | {'type': kind}}: {err}") from None


def make_sampler(cfg: DictConfig, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler, seeded with seed + seed_offset (the trials already in the study, so that a
    restarted sweep does not draw its first trials again)."""
    kwargs = OmegaConf.to_container(cfg.sampler_args)
    given = dict(kwargs)
    if cfg.seed is not None:
        kwargs.setdefault("seed", cfg.seed + seed_offset)
    if cfg.sampler == "tpe" and cfg.n_jobs > 1:
        kwargs.setdefault("constant_liar", True)  # parallel trials avoid each other's points
    return _optuna_object("sampler", cfg.sampler, SAMPLERS, optuna.samplers, kwargs, given)


def make_pruner(cfg: DictConfig) -> optuna.pruners.BasePruner:
    kwargs = {} if cfg.pruner == "none" else OmegaConf.to_container(cfg.pruner_args)
    return _optuna_object("pruner", cfg.pruner, PRUNERS, optuna.pruners, kwargs)


def _optuna_object(kind: str, name: str, names: dict, module, kwargs: dict, given=None):
    if name not in names:
        raise SweepError(f"sweep.{kind}={name!r}; choose one of {list(names)}")
    cls = getattr(module, names[name])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return cls(**kwargs)
    except TypeError as err:
        raise SweepError(
            f"sweep.{kind}_args={kwargs if given is None else given}: {err}; give the keyword "
            f"arguments of optuna.{module.__name__.split('.')[-1]}.{cls.__name__} (sweep.{kind}="
            f"{name}), e.g. sweep.{kind}_args={{}}"
        ) from None


def check_run_config(cfg: DictConfig) -> DictConfig:
    """Compose run.py's config with the fixed overrides and each space value, as a trial will:
    an unknown key or group option stops the sweep here rather than in every trial."""
    from hydra import compose, initialize_config_dir

    from engine.checks import check_targets

    def composed(extra: list[str], what: str) -> DictConfig:
        try:
            run_cfg = compose("config", overrides=[*cfg.overrides, *extra])
            check_targets(run_cfg)  # a trial's run.py would refuse it: refuse it once, here
            return run_cfg
        except (HydraException, OmegaConfBaseException, ValueError) as err:
            raise SweepError(f"{what}: run.py cannot take it: {_first_line(err)}") from None

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        base = composed([], f"sweep.overrides={list(cfg.overrides)}")
        for key, spec in cfg.space.items():
            dist = distribution(key, spec)
            values = dist.choices if hasattr(dist, "choices") else (dist.low, dist.high)
            for value in values:
                override = f"{key}={hydra_value(value)}"
                composed([override], f"sweep.space.{key} (trial override {override!r})")
    return base


_PARSER = OverridesParser.create()


def hydra_value(value) -> str:
    """`value` as Hydra's override grammar reads it back (strings quoted where they must be)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    with contextlib.suppress(HydraException):
        if _PARSER.parse_override(f"k={text}").value() == text:
            return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


# ---------------------------------------------------------------------------------------------
# the study


def storage_url(cfg: DictConfig) -> str:
    return cfg.storage or f"sqlite:///{Path(cfg.dir).resolve() / 'study.db'}"


def open_study(cfg: DictConfig, create: bool = True) -> optuna.Study:
    url = storage_url(cfg)
    retry = RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry)
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


# ---------------------------------------------------------------------------------------------
# the trials

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
        log.info("trial %d: %s -> %s", trial.number, _params_text(params), run_dir)
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


class _NoTraceback(logging.Filter):
    """Optuna logs a failed trial with sweep.py's own traceback; for run.py's failures the
    error line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TrialFailed):
            record.exc_info = None
        return True


def _params_text(params: dict) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------
# the report


def leaderboard(study: optuna.Study, cfg: DictConfig) -> list[dict]:
    """One row per trial: finished ones best first (completed, then pruned), then the rest."""
    trials = study.get_trials(deepcopy=False)
    rerun_as = {}
    for t in trials:
        history = RetryHeartbeatStaleTrialCallback.retry_history(t)
        if history:
            rerun_as[history[-1]] = t.number
    sign = -1 if cfg.direction == "maximize" else 1
    order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.RUNNING: 2}

    def key(t):
        value = t.value if t.value is not None and math.isfinite(t.value) else math.inf * sign
        return order.get(t.state, 3), sign * value if t.state in FINISHED else t.number

    rows = []
    for rank, t in enumerate(sorted(trials, key=key), start=1):
        if t.state == TrialState.PRUNED:
            note = f"pruned at epoch {t.last_step}"
        elif t.state == TrialState.FAIL and t.number in rerun_as:
            note = f"interrupted; re-run as trial {rerun_as[t.number]}"
        elif t.state == TrialState.FAIL:
            note = t.user_attrs.get("error", "failed")
        else:
            note = ""
        retried = RetryHeartbeatStaleTrialCallback.retry_history(t)
        if retried:
            note = f"re-run of trial {retried[-1]}" + (f"; {note}" if note else "")
        end = t.datetime_complete or (datetime.now() if t.state == TrialState.RUNNING else None)
        rows.append(
            {
                "rank": rank if t.state == TrialState.COMPLETE else None,
                "trial": t.number,
                "state": t.state.name,
                "value": t.value,
                **{key: t.params.get(key) for key in cfg.space},
                "epochs": len(t.intermediate_values),
                "duration_s": round((end - t.datetime_start).total_seconds(), 1)
                if end and t.datetime_start
                else None,
                "note": note,
                # a queued re-run carries its original's attributes until it starts
                "run_dir": None if t.state == TrialState.WAITING else t.user_attrs.get("run_dir"),
            }
        )
    return rows


def report(study: optuna.Study, cfg: DictConfig, out_dir: Path) -> dict[str, Path]:
    """Print the leaderboard; write leaderboard.csv and the figures into out_dir."""
    rows = leaderboard(study, cfg)
    files = {"leaderboard": write_csv(rows, out_dir / "leaderboard.csv")}
    files.update(write_figures(study, cfg, out_dir))
    print_leaderboard(rows, study, cfg)
    for path in files.values():
        print(f"wrote {path}")
    return files


def write_csv(rows: list[dict], path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def write_figures(study: optuna.Study, cfg: DictConfig, out_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varying = {k for k in cfg.space if len({str(t.params.get(k)) for t in complete}) > 1}
    named = {"target_name": cfg.metric}
    figures = {
        "optimization_history": (plots.plot_optimization_history, named, None),
        "intermediate_values": (plots.plot_intermediate_values, {}, None),
        "param_importances": (
            plots.plot_param_importances,
            named,
            None
            if len(complete) >= 2 and varying
            else f"parameter importance needs 2 or more completed trials with a parameter that "
            f"varies ({len(complete)} completed so far)",
        ),
    }
    files = {}
    for name, (plot, kwargs, missing) in figures.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental API, empty legends
            if missing is None:
                ax = plot(study, **kwargs)
            else:
                _, ax = plt.subplots(figsize=(6, 2))
                ax.axis("off")
                ax.text(0.5, 0.5, missing, ha="center", va="center", wrap=True)
        path = out_dir / f"{name}.png"
        ax.figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(ax.figure)
        files[name] = path
    return files


def print_leaderboard(rows: list[dict], study: optuna.Study, cfg: DictConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    n = counts(study)
    title = (
        f"{cfg.study}: {cfg.metric} ({cfg.direction}); {n['complete'] + n['pruned']}/"
        f"{cfg.n_trials} finished ({n['complete']} complete, {n['pruned']} pruned), "
        f"{n['running']} running, {n['fail']} failed"
    )
    table = Table(title=title, title_justify="left")
    for column in rows[0] if rows else ["trial"]:
        table.add_column(column)
    here = Path.cwd()
    for row in rows:
        cells = []
        for key, value in row.items():
            if key == "run_dir" and value:
                with contextlib.suppress(ValueError):
                    value = Path(value).relative_to(here)
            cells.append("" if value is None else _fmt(value))
        table.add_row(*cells)
    console = Console()
    # a log file or a pipe gets the whole table rather than 80 columns of wrapped cells
    (console if console.is_terminal else Console(width=240)).print(table)


# ---------------------------------------------------------------------------------------------


def _setup_logging(sweep_dir: Path | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if sweep_dir is not None:
        handlers.append(logging.FileHandler(sweep_dir / "sweep.log"))
    logging.basicConfig(
        level=logging.INFO,
        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s",
        handlers=handlers,
        force=True,
    )
    for handler in handlers:
        handler.addFilter(_NoTraceback())
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()  # Optuna's trial lines go to the same console and file
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print(f"sweep files in sweeps/: {', '.join(sweep_options())}")
        return 0
    try:
        cfg, continuing = load_config(argv)
        sweep_dir = Path(cfg.dir)
        if cfg.report_only:
            _setup_logging(None)
            study = open_study(cfg, create=False)
            sweep_dir.mkdir(parents=True, exist_ok=True)
            report(study, cfg, sweep_dir)
            return 0
        wandb = check_run_config(cfg).logger.wandb
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            if cfg.storage is None:
                stack.enter_context(folder_lock(sweep_dir))
            _setup_logging(sweep_dir)
            return _run(cfg, continuing, sweep_dir, wandb)
    except SweepError as err:
        print(f"sweep.py: error: {err}", file=sys.stderr)
        return 2


def _run(cfg: DictConfig, continuing: bool, sweep_dir: Path, wandb) -> int:
    study = open_study(cfg)
    _write_config(cfg, sweep_dir / "sweep.yaml")
    if cfg.storage is None:
        stale = requeue(study, None, cfg.max_retry)
        if stale:
            log.info("trials %s were running when the sweep stopped: queued to run again", stale)
    n = counts(study)
    log.info(
        "%s sweep %s (study %r in %s): %d of %d trials finished, %d to run, %d at a time",
        "continuing" if continuing else "starting",
        sweep_dir,
        cfg.study,
        storage_url(cfg),
        n["complete"] + n["pruned"],
        cfg.n_trials,
        max(0, cfg.n_trials - n["complete"] - n["pruned"]),
        cfg.n_jobs,
    )
    log.info("continue it: python sweep.py sweep.dir=%s", sweep_dir)
    log.info(
        "leaderboard at any time: python sweep.py sweep.dir=%s sweep.report_only=true", sweep_dir
    )

    tags = None if wandb is None else [str(t) for t in (wandb.tags or [])]
    sweep = Sweep(cfg, study, tags)
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    interrupted = False
    try:
        sweep.run()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        if sweep.interrupted:
            requeue(study, sweep.interrupted, cfg.max_retry)
            log.info("trials %s stopped with the sweep: queued to run again", sweep.interrupted)
    if sweep.error is not None:
        raise sweep.error
    report(study, cfg, sweep_dir)
    if interrupted:
        log.warning("interrupted; continue with: python sweep.py sweep.dir=%s", sweep_dir)
        return 130
    if sweep.too_many_failures():
        log.error(
            "stopped after %d failed trials (sweep.max_failed_trials); see their output.log",
            sweep.failures,
        )
        return 1
    best = _best(study)
    if best is not None:
        log.info(
            "best: trial %d, %s=%.4g (%s), %s",
            best.number,
            cfg.metric,
            best.value,
            _params_text(best.params),
            best.user_attrs.get("run_dir"),
        )
    return 0


def _best(study: optuna.Study):
    with contextlib.suppress(ValueError):
        return study.best_trial
    return None


def _write_config(cfg: DictConfig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(
        "# written by sweep.py: the settings `python sweep.py sweep.dir=<this folder>` continues with\n"
        + OmegaConf.to_yaml(cfg)
    )
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
