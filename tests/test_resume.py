"""Resume: a killed run, continued, ends exactly where an uninterrupted run ends (CPU)."""

import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import (
    RUN_PY,
    TINY,
    clean_env,
    epoch_records,
    read_jsonl,
    run_py,
    wandb_records,
    wandb_run_id,
    wandb_runs,
)

SETTINGS = [*TINY, "trainer.epochs=4", "data.batch_size=32"]


def kill_after_first_checkpoint(args: list[str], run_dir, cwd) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(RUN_PY), *args],
        cwd=cwd,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = run_dir / "checkpoints" / "epoch_0001.pt"
    deadline = time.monotonic() + 300
    while not first.exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "checkpoints" / "epoch_0004.pt").exists(), "killed too late"


def test_killed_run_resumed_with_auto_matches_uninterrupted_run(tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_py(*SETTINGS, f"hydra.run.dir={straight}", cwd=tmp_path)

    kill_after_first_checkpoint([*SETTINGS, f"hydra.run.dir={broken}"], broken, tmp_path)
    # what a requeued job does: the same command, same folder, resume=auto
    run_py(*SETTINGS, f"hydra.run.dir={broken}", "resume=auto", cwd=tmp_path)

    expected, got = epoch_records(straight), epoch_records(broken)
    assert [r["epoch"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(expected, got, strict=True):
        for key in ("step", "train/epoch_loss", "val/loss", "val/acc1", "val/acc5"):
            assert a[key] == b[key], (key, a, b)
    steps = [r["step"] for r in read_jsonl(broken) if "train/loss" in r]
    assert steps == sorted(set(steps)), "no step may be recorded twice"

    final_a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    final_b = torch.load(broken / "checkpoints" / "last.pt", weights_only=True)
    for name, tensor in final_a["model"].items():
        assert torch.equal(tensor, final_b["model"][name]), name

    # the resumed process continued the killed process's W&B run (a killed process's offline
    # log may hold nothing: W&B had not flushed it)
    killed, resumed = wandb_runs(broken)
    run_id = final_b["wandb_run_id"]
    assert killed.name.endswith(run_id) and resumed.name.endswith(run_id)
    assert wandb_run_id(wandb_records(resumed)) == run_id


def test_resume_from_a_run_folder_continues_there_with_its_config(tmp_path):
    first = tmp_path / "first"
    run_py(
        *TINY,
        "trainer.epochs=1",
        "logger=none",
        "optim.lr=0.003",
        f"hydra.run.dir={first}",
        cwd=tmp_path,
    )
    # a new invocation: its own Hydra folder, but the run continues in `first`
    run_py(
        f"resume={first}", "trainer.epochs=2", f"hydra.run.dir={tmp_path / 'second'}", cwd=tmp_path
    )
    assert [r["epoch"] for r in epoch_records(first)] == [1, 2]
    last = torch.load(first / "checkpoints" / "last.pt", weights_only=True)
    assert last["config"]["optim"]["lr"] == 0.003  # from the saved config, not the default
    assert last["config"]["trainer"]["epochs"] == 2  # the command-line override applies


@pytest.mark.parametrize(
    ("resume", "message"),
    [
        ("does/not/exist", "does not exist"),
        ("{empty}", "no valid checkpoint"),
    ],
)
def test_bad_resume_path_fails_with_a_clear_message(tmp_path, resume, message):
    (tmp_path / "empty").mkdir()
    proc = run_py(
        f"resume={resume.format(empty=tmp_path / 'empty')}",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
