"""`run.py --help` and `--cfg job` answer without loading the heavy libraries."""

import subprocess
import sys

import pytest

from tests.helpers import REPO, RUN_PY, clean_env

HEAVY = ("torch", "timm", "wandb", "torchvision", "sklearn")


def imported(*args: str) -> set[str]:
    """Top-level packages that `python run.py <args>` imported (from -X importtime)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(RUN_PY), *args],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    assert "hydra" in names, "no import times recorded: the check below would pass vacuously"
    return names


@pytest.mark.parametrize("args", [["--help"], ["--cfg", "job"], ["--cfg", "job", "model=vit_base"]])
def test_help_and_printing_the_config_import_no_heavy_library(args):
    assert not set(HEAVY) & imported(*args)
