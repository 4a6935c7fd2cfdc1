"""Fixtures shared by test modules."""

from pathlib import Path

import pytest

from tests.helpers import TINY, composed, run_py


@pytest.fixture(scope="session")
def default_command(tmp_path_factory):
    """(run folder, finished process) of `python run.py` with no arguments (W&B offline), made
    once per session: the default run trains for about a minute, so it trains once.

    Read-only, as tiny_run: test_default_run.py checks it, test_analysis_cam.py explains it.
    """
    cwd = tmp_path_factory.mktemp("user")
    proc = run_py(cwd=cwd)
    (run_dir,) = (cwd / "outputs").glob("*/*")  # outputs/<date>/<time>
    return run_dir, proc


@pytest.fixture(scope="session")
def default_run(default_command) -> Path:
    """The folder of the default run (default_command)."""
    return default_command[0]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The folder of a real 2-epoch run on 8x8 digits (with EMA weights), made once per session.

    For tools that read a finished run (eval, predict, export, serve, analysis). Treat it as
    read-only: write anything else into the test's own tmp_path. Its checkpoints are the
    smallest a run can keep (last.pt, and a best.pt without optimizer state): every tool that
    reads this run shows that they work with them.
    """
    cwd = tmp_path_factory.mktemp("tiny_run")
    small = ["checkpoint.keep_last=0", "checkpoint.best_weights_only=true"]
    run_py(*TINY, "trainer.epochs=2", "trainer.ema_decay=0.9", "logger=none", *small, cwd=cwd)
    (run_dir,) = (cwd / "outputs").glob("*/*")
    return run_dir


@pytest.fixture
def run_task(tmp_path):
    """run.py's task function for `overrides`, called in-process as Hydra would call it."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import run

    def call(*overrides: str):
        cfg = composed(*overrides, hydra=True)
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return run.TASKS[cfg.task.name](cfg)

    yield call
    HydraConfig.instance().cfg = None
