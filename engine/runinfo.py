"""What makes a run folder describe itself: resolved config, git state, package versions."""

import json
import platform
import socket
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import yaml

from engine.files import atomic_write_text

PACKAGES = ("torch", "torchvision", "timm", "hydra-core", "omegaconf", "wandb", "numpy", "pillow")


CHANGES_KEPT = 20  # paths listed in run_info.json's git.changes; the count says how many more


def git_state(repo: Path) -> dict:
    """{commit, dirty, changes}: dirty when a tracked file differs from the commit or a file
    git does not ignore is untracked (a new model or config file changes what runs); changes
    lists them as `git status --porcelain` does (up to CHANGES_KEPT), so a dirty flag says why.
    What runs and tools write (outputs/, multirun/, wandb/, ...) is git-ignored, so it never
    makes a checkout dirty."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None, "changes": None}  # not a checkout, or no git
    changes = status.splitlines()
    if len(changes) > CHANGES_KEPT:
        changes = [*changes[:CHANGES_KEPT], f"... and {len(changes) - CHANGES_KEPT} more"]
    return {"commit": commit, "dirty": bool(changes), "changes": changes}


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def write_run_info(run_dir: Path, config: dict) -> None:
    """<run folder>/config.yaml (resolved) and run_info.json (git, versions, command, host)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    info = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "host": socket.gethostname(),
        "git": git_state(Path(__file__).resolve().parent.parent),
        "versions": versions(),
    }
    atomic_write_text(run_dir / "run_info.json", json.dumps(info, indent=2) + "\n")
