"""Training curves of one or more runs on one figure, and their training-time statistics.

Runs whose configs differ only in `seed` are drawn as one line (the mean) with a band (min-max
or +-std). A run is read from its run folder's metrics.jsonl, from a W&B offline run folder
(`<run>/wandb/offline-run-*`, through `wandb leet inspect --json`) or, online, from a W&B run
path `entity/project/run_id`.

    python analysis/curves.py                                  # newest training run in outputs/
    python analysis/curves.py multirun/2026-11-22/10-00-00-000000 --label optim.lr
    python analysis/curves.py RUN_A RUN_B --keys train/loss val/acc1 val/loss --out fig.png
"""

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from engine.logger import read_metrics

DEFAULT_KEYS = ("train/loss", "val/acc1")
# config keys that differ between runs without making them different experiments
IGNORED_CONFIG_KEYS = ("seed", "hydra", "resume")
PANEL_SIZE_IN = (4.5, 3.4)  # width, height of one subplot, inches
DPI = 200
LEGEND_CHAR_PT = 5.0  # mean width of a character of the legend's "small" font, points
LEGEND_MAX_SHARE = 0.3  # the legend may take this much of the figure's height, else it grows
AXIS_LABELS = {
    "train/loss": "train loss",
    "train/lr": "learning rate",
    "val/loss": "validation loss",
    "val/acc1": "validation top-1 (%)",
    "val/acc5": "validation top-5 (%)",
    "time/epoch_s": "epoch time (s)",
    "time/train_s": "training time per epoch (s)",
}
WANDB_RUN_PATH = re.compile(r"^[\w.-]+/[\w.-]+/\w+$")


@dataclass
class Run:
    name: str
    source: str  # where it was read from: a metrics.jsonl, an offline W&B folder or a W&B path
    config: dict
    rows: dict[int, dict] = field(default_factory=dict)  # step -> metrics logged at that step

    def series(self, key: str) -> tuple[list[int], list[float]]:
        steps = [s for s in sorted(self.rows) if key in self.rows[s]]
        return steps, [float(self.rows[s][key]) for s in steps]

    def epoch_rows(self) -> list[dict]:
        return [{"step": s, **r} for s, r in sorted(self.rows.items()) if "epoch" in r]


# ---------------------------------------------------------------- reading runs


def _merge(rows: dict[int, dict], step: int, metrics: dict) -> None:
    # one row per step, the last value of a key winning: what W&B does with its history
    rows.setdefault(int(step), {}).update(metrics)


def read_jsonl_run(run_dir: Path) -> Run:
    rows: dict[int, dict] = {}
    for record in read_metrics(run_dir / "metrics.jsonl"):
        if "summary" not in record:
            step = record.pop("step")
            _merge(rows, step, record)
    config_file = run_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    return Run(_run_name(run_dir), str(run_dir / "metrics.jsonl"), config or {}, rows)


def _wandb_exe() -> str:
    beside = Path(sys.executable).parent / "wandb"
    exe = str(beside) if beside.is_file() else shutil.which("wandb")
    if exe is None:
        raise FileNotFoundError("the `wandb` command is not installed; pip install wandb")
    return exe


def read_wandb_offline_run(offline_dir: Path) -> Run:
    """An offline W&B run folder, through `wandb leet inspect --json` (one record per line)."""
    out = subprocess.run(
        [_wandb_exe(), "leet", "inspect", "--json", str(offline_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if out.returncode != 0:
        raise ValueError(f"wandb leet inspect {offline_dir} failed:\n{out.stderr[-2000:]}")
    rows: dict[int, dict] = {}
    config: dict = {}
    for line in out.stdout.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if record.get("type") == "history":
            item = record["history"]["item"]
            _merge(rows, item["_step"], {k: v for k, v in item.items() if not k.startswith("_")})
        elif record.get("type") == "run":
            config.update(record["run"].get("config", {}).get("update", {}))
    config.pop("_wandb", None)
    # <run>/wandb/offline-run-*: name it after the run folder
    name = _run_name(offline_dir.parent.parent) if offline_dir.parent.name == "wandb" else None
    return Run(name or offline_dir.name, str(offline_dir), config, rows)


def read_wandb_online_run(path: str) -> Run:
    """`entity/project/run_id` through the W&B API (needs network and a login)."""
    import wandb

    try:
        api_run = wandb.Api(timeout=30).run(path)
        history = list(api_run.scan_history())
    except Exception as e:  # network, auth and not-found errors all come as different types
        raise ValueError(
            f"cannot read W&B run {path!r} ({type(e).__name__}: {e}). Offline? Pass the run "
            "folder or its wandb/offline-run-* folder instead."
        ) from e
    rows: dict[int, dict] = {}
    for item in history:
        _merge(rows, item["_step"], {k: v for k, v in item.items() if not k.startswith("_")})
    config = {k: v for k, v in api_run.config.items() if not k.startswith("_")}
    return Run(api_run.name or path, path, config, rows)


def _run_name(run_dir: Path) -> str:
    # multirun jobs are folders 0, 1, ...: name them with their sweep folder
    return f"{run_dir.parent.name}/{run_dir.name}" if run_dir.name.isdigit() else run_dir.name


def _job_dirs(folder: Path) -> list[Path]:
    jobs = [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted((j for j in jobs if (j / "metrics.jsonl").is_file()), key=lambda p: int(p.name))


def has_training_records(metrics_file: Path) -> bool:
    """Whether a metrics.jsonl holds a record logged at a step. An eval job's (or a run that
    stopped before its first log) holds only summaries: nothing to draw."""
    with open(metrics_file) as f:
        for line in f:
            try:
                if line.strip() and "summary" not in json.loads(line):
                    return True
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: the next may still be a record
    return False


def latest_run(root: Path = Path("outputs")) -> tuple[Path, list[Path]]:
    """(the newest run folder under root whose metrics.jsonl holds training records, the newer
    folders passed over because theirs holds none)."""
    found = list(root.rglob("metrics.jsonl")) if root.is_dir() else []
    skipped = []
    for metrics in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        if has_training_records(metrics):
            return metrics.parent, skipped
        skipped.append(metrics.parent)
    raise FileNotFoundError(
        f"no run given and no training run (a folder whose metrics.jsonl holds records logged "
        f"at a step) under {root.resolve()}/"
        + (f"; {len(skipped)} folder(s) there hold only summaries (eval jobs)" if skipped else "")
        + "; train one with `python run.py` or pass run folders"
    )


def _chosen(run: Path, skipped: list[Path]) -> str:
    """The line that says which run a bare `curves.py` draws, and why that one."""
    why = "the newest run under outputs/ with training records"
    if skipped:
        newer = ", ".join(str(p) for p in skipped[:3]) + (" ..." if len(skipped) > 3 else "")
        why += f"; passed over {len(skipped)} newer folder(s) without any (eval jobs): {newer}"
    return f"no run given: drawing {run} ({why})"


def load_runs(sources: list[str | Path]) -> list[Run]:
    """Runs from run folders, multirun folders (their numbered jobs), offline W&B run folders
    and W&B run paths `entity/project/run_id`."""
    runs = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            if (path / "metrics.jsonl").is_file():
                runs.append(read_jsonl_run(path))
            elif list(path.glob("*.wandb")):
                runs.append(read_wandb_offline_run(path))
            elif jobs := _job_dirs(path):
                runs.extend(read_jsonl_run(j) for j in jobs)
            else:
                raise FileNotFoundError(
                    f"{path} is neither a run folder (metrics.jsonl), a multirun folder "
                    "(numbered job folders) nor a W&B offline run folder (*.wandb)"
                )
        elif not path.exists() and WANDB_RUN_PATH.match(str(source)):
            runs.append(read_wandb_online_run(str(source)))
        else:
            raise FileNotFoundError(f"no run folder at {path}")
    return runs


# ---------------------------------------------------------------- grouping and statistics


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def config_value(config: dict, dotted: str):
    value = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"--label {dotted!r}: no such key in the run's config")
        value = value[part]
    return value


def group_runs(runs: list[Run]) -> list[list[Run]]:
    """Runs whose configs are equal once `seed` (and per-run keys) are removed, in first-seen
    order; a run without a config is a group of its own."""
    groups: dict[str, list[Run]] = {}
    for i, run in enumerate(runs):
        if run.config:
            kept = {k: v for k, v in run.config.items() if k not in IGNORED_CONFIG_KEYS}
            key = json.dumps(kept, sort_keys=True, default=str)
        else:
            key = f"#{i}"
        groups.setdefault(key, []).append(run)
    return list(groups.values())


def label_of(run: Run, label_key: str) -> str:
    """`key=value` of one run's config, the --label of its line and table row."""
    return f"{label_key}={config_value(run.config, label_key)}"


def group_labels(groups: list[list[Run]], label_key: str | None = None) -> list[str]:
    if label_key:
        return [label_of(g[0], label_key) for g in groups]
    # otherwise the config values that tell the groups apart, if few; else the run names
    flats = [_flatten({k: v for k, v in g[0].config.items() if k != "seed"}) for g in groups]
    keys = sorted({k for f in flats for k in f})
    differing = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flats}) > 1]
    if len(groups) > 1 and all(flats) and 0 < len(differing) <= 3:
        return [", ".join(f"{k}={f.get(k)}" for k in differing) for f in flats]
    return [_names(g) for g in groups]


def _names(group: list[Run]) -> str:
    # the seeds of one config: its first and last run, not every name (the legend stays short)
    names = [r.name for r in group]
    return ", ".join(names) if len(names) <= 2 else f"{names[0]} ... {names[-1]}"


def band(runs: list[Run], key: str, kind: str = "minmax"):
    """(steps, mean, low, high) over the steps all runs logged `key` at."""
    import numpy as np

    per_run = [dict(zip(*r.series(key), strict=True)) for r in runs]
    steps = sorted(set.intersection(*(set(s) for s in per_run)))
    values = np.array([[s[step] for step in steps] for s in per_run], dtype=float)
    mean = values.mean(0) if steps else np.array([])
    if kind == "std":
        std = values.std(0) if steps else np.array([])
        return steps, mean, mean - std, mean + std
    if kind != "minmax":
        raise ValueError(f"band={kind!r}; choose minmax or std")
    return steps, mean, values.min(0) if steps else mean, values.max(0) if steps else mean


def time_stats(run: Run) -> dict:
    """Slowest and fastest epoch (time/epoch_s) and the mean seconds per update of one run.

    Updates in an epoch are the step difference to the previous epoch's record (to 0 for
    epoch 1); time/train_s / updates is that epoch's time per update.
    """
    epochs = [r for r in run.epoch_rows() if "time/epoch_s" in r]
    if not epochs:
        return {"run": run.name, "epochs": 0}
    slowest = max(epochs, key=lambda r: r["time/epoch_s"])
    fastest = min(epochs, key=lambda r: r["time/epoch_s"])
    per_update = []
    previous = {int(r["epoch"]): r["step"] for r in epochs}
    for r in epochs:
        before = 0 if r["epoch"] == 1 else previous.get(int(r["epoch"]) - 1)
        if before is not None and r["step"] > before and "time/train_s" in r:
            per_update.append(r["time/train_s"] / (r["step"] - before))
    return {
        "run": run.name,
        "epochs": len(epochs),
        "slowest_epoch": int(slowest["epoch"]),
        "slowest_s": slowest["time/epoch_s"],
        "fastest_epoch": int(fastest["epoch"]),
        "fastest_s": fastest["time/epoch_s"],
        "s_per_update": sum(per_update) / len(per_update) if per_update else math.nan,
    }


def time_table(runs: list[Run], label: str | None = None):
    """The training-time table, a row per run; label: a config key naming each row as the
    figure's legend does (`optim.lr=0.001 (sweep/0)`), the run's name after it."""
    from rich.table import Table

    table = Table(title="training time")
    for column in ("run", "epochs", "slowest epoch", "fastest epoch", "mean per update"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for run in runs:
        stats = time_stats(run)
        name = f"{label_of(run, label)} ({run.name})" if label else run.name
        if not stats["epochs"]:
            table.add_row(name, "0", "-", "-", "-")
            continue
        table.add_row(
            name,
            str(stats["epochs"]),
            f"#{stats['slowest_epoch']}  {stats['slowest_s']:.2f} s",
            f"#{stats['fastest_epoch']}  {stats['fastest_s']:.2f} s",
            f"{stats['s_per_update'] * 1000:.1f} ms",
        )
    return table


# ---------------------------------------------------------------- the figure


def plot_curves(
    runs: list[Run],
    keys: tuple[str, ...] | list[str] = DEFAULT_KEYS,
    out: Path | str = "curves.png",
    label: str | None = None,
    band_kind: str = "minmax",
) -> Path:
    """One subplot per metric key, one line per group of runs (mean and band over seeds);
    writes a PNG of len(keys) x PANEL_SIZE_IN inches at DPI and returns its path."""
    import matplotlib.pyplot as plt

    fig = figure(runs, keys, label, band_kind)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def figure(runs: list[Run], keys=DEFAULT_KEYS, label: str | None = None, band_kind="minmax"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        raise ValueError("no runs to plot")
    groups = group_runs(runs)
    labels = group_labels(groups, label)
    band_name = "min-max" if band_kind == "minmax" else "±1 std"
    width, height = PANEL_SIZE_IN
    fig, axes = plt.subplots(1, len(keys), figsize=(width * len(keys), height), dpi=DPI)
    axes = [axes] if len(keys) == 1 else list(axes)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes, keys, strict=True):
        for i, (group, name) in enumerate(zip(groups, labels, strict=True)):
            color = colors[i % len(colors)]
            marker = "o" if key != "train/loss" else None  # per-epoch values: mark each point
            if len(group) == 1:
                steps, values = group[0].series(key)
                ax.plot(steps, values, color=color, marker=marker, ms=3, lw=1.5, label=name)
            else:
                steps, mean, low, high = band(group, key, band_kind)
                ax.plot(
                    steps,
                    mean,
                    color=color,
                    marker=marker,
                    ms=3,
                    lw=1.5,
                    label=f"{name} (mean of {len(group)} seeds, {band_name})",
                )
                ax.fill_between(steps, low, high, color=color, alpha=0.2, lw=0)
        ax.set_xlabel("update step")
        ax.set_ylabel(AXIS_LABELS.get(key, key))
        ax.grid(alpha=0.3)
        if not ax.has_data():
            ax.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(_title(runs, groups, keys), fontsize="medium")
    _legend_below(fig, axes[0])
    return fig


def _title(runs: list[Run], groups: list[list[Run]], keys) -> str:
    what = ", ".join(AXIS_LABELS.get(k, k) for k in keys)
    if len(runs) == 1:
        return f"{what}: {runs[0].name}"
    return f"{what}: {len(runs)} runs, {len(groups)} line(s)"


def _legend_below(fig, ax) -> None:
    """The first axes' legend under all panels, across the figure's width, its labels wrapped
    to fit: a legend inside a panel covered the curves, and a long label (a seed group's run
    names) ran over the axis labels. The panels shrink to make room; when the legend would
    take more than LEGEND_MAX_SHARE of the height the figure grows instead."""
    import textwrap

    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        fig.tight_layout()
        return
    width_chars = int(fig.get_figwidth() * 72 / LEGEND_CHAR_PT)  # characters across the figure
    columns = max(1, min(len(labels), width_chars // (max(map(len, labels)) + 8)))
    wrapped = [textwrap.fill(t, width_chars // columns - 8) for t in labels]
    legend = ax.legend(
        handles,
        wrapped,
        loc="lower center",
        bbox_to_anchor=(0.5, 0.0),
        bbox_transform=fig.transFigure,
        ncol=columns,
        fontsize="small",
        frameon=False,
    )
    legend.set_in_layout(False)  # placed by hand below the panels, not part of the first one
    renderer = fig.canvas.get_renderer()
    share = legend.get_window_extent(renderer).height / fig.bbox.height
    if share > LEGEND_MAX_SHARE:
        height = fig.get_figheight()
        fig.set_figheight(height * (1 - LEGEND_MAX_SHARE + share))  # the panels keep their share
        share = legend.get_window_extent(renderer).height / fig.bbox.height
    fig.tight_layout(rect=(0, share, 1, 1))


def _default_out(runs: list[Run], sources: list[str]) -> Path:
    first = Path(sources[0])
    if first.is_dir() and not (first / "metrics.jsonl").is_file() and _job_dirs(first):
        return first / "curves.png"  # a multirun folder: beside its jobs
    source = Path(runs[0].source)
    folder = source.parent if source.name == "metrics.jsonl" else source
    if folder.exists():
        return folder / "curves.png"
    from analysis.cli import TOOL_OUT  # an online W&B run: no folder of its own here

    name = re.sub(r"[^\w.-]+", "_", runs[0].name)
    return TOOL_OUT / f"curves_{name}.png"


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "runs",
        nargs="*",
        help="run folders, multirun folders, wandb/offline-run-* folders or entity/project/id "
        "(default: the newest run under outputs/)",
    )
    parser.add_argument("--keys", nargs="+", default=list(DEFAULT_KEYS), help="metric keys")
    parser.add_argument(
        "--out",
        type=Path,
        help="PNG to write (default: <first run>/curves.png; an online W&B run: "
        "outputs/analysis/curves_<name>.png)",
    )
    parser.add_argument("--label", help="config key naming each line, e.g. optim.lr")
    parser.add_argument("--band", choices=("minmax", "std"), default="minmax")
    args = parser.parse_args(argv)

    console = Console()
    try:
        if args.runs:
            sources = args.runs
        else:
            newest, skipped = latest_run()
            # soft_wrap: paths are never cut; markup off: a [ in a path is no style tag
            console.print(_chosen(newest, skipped), soft_wrap=True, markup=False)
            sources = [str(newest)]
        runs = load_runs(sources)
        out = plot_curves(
            runs, args.keys, args.out or _default_out(runs, sources), args.label, args.band
        )
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"curves: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    console.print(time_table(runs, args.label))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
