"""sweep.py's command: load the settings, open the study, run the missing trials, report."""

import contextlib
import logging
import signal
import sys
import warnings
from pathlib import Path

import optuna
from omegaconf import DictConfig, OmegaConf

from engine.files import atomic_write_text
from sweeping.config import SweepError, check_run_config, load_config, sweep_options
from sweeping.report import report
from sweeping.study import counts, folder_lock, open_study, requeue, storage_url
from sweeping.trials import Sweep, TrialFailed, params_text

log = logging.getLogger("sweep")


class _NoTraceback(logging.Filter):
    """Optuna logs a failed trial with sweep.py's own traceback; for run.py's failures the
    error line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TrialFailed):
            record.exc_info = None
        return True


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


def main(argv: list[str], usage: str = "") -> int:
    """sweep.py's command line; `usage` is printed for -h / --help. Returns the exit status."""
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
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
    _log_start(cfg, study, continuing, sweep_dir)
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
            params_text(best.params),
            best.user_attrs.get("run_dir"),
        )
    return 0


def _log_start(cfg: DictConfig, study, continuing: bool, sweep_dir: Path) -> None:
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


def _best(study: optuna.Study):
    with contextlib.suppress(ValueError):
        return study.best_trial
    return None


def _write_config(cfg: DictConfig, path: Path) -> None:
    atomic_write_text(
        path,
        "# written by sweep.py: the settings `python sweep.py sweep.dir=<this folder>` continues with\n"
        + OmegaConf.to_yaml(cfg),
    )
