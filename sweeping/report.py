"""The report of a sweep: leaderboard (terminal and CSV) and Optuna's figures."""

import math
import warnings
from datetime import datetime
from pathlib import Path

import optuna
from omegaconf import DictConfig
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from sweeping.study import FINISHED, counts
from sweeping.table import print_table, write_csv


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
    n = counts(study)
    title = (
        f"{cfg.study}: {cfg.metric} ({cfg.direction}); {n['complete'] + n['pruned']}/"
        f"{cfg.n_trials} finished ({n['complete']} complete, {n['pruned']} pruned), "
        f"{n['running']} running, {n['fail']} failed"
    )
    print_table(title, rows)
