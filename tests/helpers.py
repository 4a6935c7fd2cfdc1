"""Running run.py as a user does, and reading what it left behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN_PY = REPO / "run.py"
WANDB = Path(sys.executable).parent / "wandb"

# A few updates on 8x8 digits: enough to exercise every part of the engine in seconds.
TINY = [
    "data.dataset.image_size=8",
    "trainer.limit_train_batches=4",
    "trainer.log_every=2",
    "sched.warmup_epochs=0",
]


def clean_env(**extra: str) -> dict:
    """The environment of a fresh shell: no W&B settings leaking in from the developer's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["PYTHONUNBUFFERED"] = "1"
    # a subprocess imports this checkout's packages even where the venv's editable install
    # points at another checkout (several worktrees sharing one venv);
    # tests/test_environment.py checks the install itself without it
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def run_py(*overrides: str, cwd: Path, env: dict | None = None, check: bool = True, timeout=600):
    proc = subprocess.run(
        [sys.executable, str(RUN_PY), *overrides],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"run.py {' '.join(overrides)} exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
        )
    return proc


def read_jsonl(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records, every line strict JSON (NaN and infinities as null, named in
    `non_finite`), those values read back as floats."""
    from engine.logger import read_jsonl_line

    text = (run_dir / "metrics.jsonl").read_text()
    for line in text.splitlines():
        json.loads(line, parse_constant=_not_json)  # what jq or a browser would accept
    return [read_jsonl_line(line) for line in text.splitlines()]


def _not_json(name: str):
    raise AssertionError(f"metrics.jsonl holds a bare {name}, which is not JSON")


def epoch_records(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir) if "epoch" in r]


def summary(run_dir: Path) -> dict:
    return next(r["summary"] for r in reversed(read_jsonl(run_dir)) if "summary" in r)


def wandb_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def wandb_records(offline_run: Path) -> list[dict]:
    """The records of an offline W&B run, as `wandb leet inspect --json` prints them."""
    out = subprocess.run(
        [str(WANDB), "leet", "inspect", "--json", str(offline_run)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def records_of(records: list[dict], kind: str) -> list[dict]:
    return [r[kind] for r in records if r.get("type") == kind]


def wandb_history(records: list[dict]) -> dict[int, dict]:
    """History rows by step (W&B merges every log call made at one step into one row)."""
    rows: dict[int, dict] = {}
    for h in records_of(records, "history"):
        item = h["item"]
        rows.setdefault(int(item["_step"]), {}).update(item)
    return rows


def wandb_config(records: list[dict]) -> dict:
    config: dict = {}
    for run in records_of(records, "run"):
        config.update(run.get("config", {}).get("update", {}))
    return config


def wandb_run_id(records: list[dict]) -> str:
    return records_of(records, "run")[0]["run_id"]


def composed(*overrides: str, hydra: bool = False):
    """The real conf/ composed with `overrides` (and Hydra's own node, with `hydra`)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # pid (comm) state ppid ...; comm may hold spaces and parentheses
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def descendants(pid: int) -> list[int]:
    found = child_pids(pid)
    return found + [d for child in found for d in descendants(child)]


def assert_ends_as(straight: Path, broken: Path) -> None:
    """A stopped and resumed run ends as the uninterrupted one: the same metrics at every epoch,
    the same loss records and the same final weights, bit for bit."""
    import torch

    expected, got = epoch_records(straight), epoch_records(broken)
    assert [r["epoch"] for r in got] == [r["epoch"] for r in expected]
    for a, b in zip(expected, got, strict=True):
        for key in ("step", "train/epoch_loss", "val/loss", "val/acc1", "val/acc5"):
            assert a[key] == b[key], (key, a, b)
    losses = [(r["step"], r["train/loss"]) for r in read_jsonl(straight) if "train/loss" in r]
    assert [(r["step"], r["train/loss"]) for r in read_jsonl(broken) if "train/loss" in r] == losses

    final_a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    final_b = torch.load(broken / "checkpoints" / "last.pt", weights_only=True)
    for name, tensor in final_a["model"].items():
        assert torch.equal(tensor, final_b["model"][name]), name
