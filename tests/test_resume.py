"""Resume: a killed run, continued, ends exactly where an uninterrupted run ends (CPU)."""

import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine import checkpoint
from tests.helpers import (
    RUN_PY,
    TINY,
    assert_ends_as,
    clean_env,
    epoch_records,
    read_jsonl,
    run_py,
    wandb_records,
    wandb_run_id,
    wandb_runs,
)

# 4 epochs of 4 updates, a checkpoint after every update (mid-epoch ones included)
SETTINGS = [*TINY, "trainer.epochs=4", "data.batch_size=32", "trainer.checkpoint_every_updates=1"]
MID_EPOCH_2 = "epoch_0001_batch_000002.pt"  # 2 batches into the 2nd epoch


def start(args: list[str], cwd) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(RUN_PY), *args],
        cwd=cwd,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path, proc) -> None:
    deadline = time.monotonic() + 300
    while not path.exists():
        assert proc.poll() is None, (
            f"the run ended before {path.name}: {proc.stderr.read()[-3000:]}"
        )
        assert time.monotonic() < deadline, f"no {path.name} within 300 s"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run: what every interrupted and resumed run must end as."""
    cwd = tmp_path_factory.mktemp("straight")
    run_py(*SETTINGS, f"hydra.run.dir={cwd / 'run'}", cwd=cwd)
    return cwd / "run"


def resumed_from(run_dir) -> str:
    """What run.log says the second start resumed from."""
    return (run_dir / "run.log").read_text().split("resumed after epoch ")[1].splitlines()[0]


@pytest.mark.slow  # three run.py processes (~1 min); test_fixture_resume.py resumes in-process
def test_run_killed_mid_epoch_resumes_and_ends_exactly_as_an_uninterrupted_run(straight, tmp_path):
    broken = tmp_path / "broken"
    proc = start([*SETTINGS, f"hydra.run.dir={broken}"], tmp_path)
    wait_for(broken / "checkpoints" / MID_EPOCH_2, proc)
    proc.send_signal(signal.SIGKILL)  # no handler, no clean-up: whatever was in flight is lost
    proc.wait()
    assert not (broken / "checkpoints" / "epoch_0004.pt").exists(), "killed too late"

    # what a requeued job does: the same command, same folder, resume=auto
    run_py(*SETTINGS, f"hydra.run.dir={broken}", "resume=auto", cwd=tmp_path)
    assert "batches into the next" in resumed_from(broken)  # a mid-epoch checkpoint
    assert_ends_as(straight, broken)
    steps = [r["step"] for r in read_jsonl(broken) if "train/loss" in r]
    assert steps == sorted(set(steps)), "no step may be recorded twice"


@pytest.mark.slow  # two run.py processes; test_faults.py sends the signals to fit in-process
def test_sigterm_saves_where_the_run_is_exits_non_zero_and_the_same_wandb_run_continues(
    straight, tmp_path
):
    broken = tmp_path / "broken"
    # no mid-epoch checkpoints but the one the signal asks for
    settings = [*SETTINGS, "trainer.checkpoint_every_updates=null"]
    proc = start([*settings, f"hydra.run.dir={broken}"], tmp_path)
    wait_for(broken / "checkpoints" / "epoch_0001.pt", proc)
    proc.send_signal(signal.SIGTERM)  # what SLURM sends at preemption or at the time limit
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "received SIGTERM" in (broken / "run.log").read_text()
    saved = checkpoint.find_latest(broken / "checkpoints")
    state = checkpoint.load(saved)
    assert state["epoch"] < 4, "signalled too late"

    run_py(*settings, f"hydra.run.dir={broken}", "resume=auto", cwd=tmp_path)
    assert_ends_as(straight, broken)

    # the resumed process continued the signalled process's W&B run, which was closed cleanly
    # (marked preempting) with its records on disk
    stopped, resumed = wandb_runs(broken)
    run_id = state["wandb_run_id"]
    assert stopped.name.endswith(run_id) and resumed.name.endswith(run_id)
    assert wandb_run_id(wandb_records(stopped)) == run_id
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


def test_resume_auto_refuses_to_start_over_when_every_checkpoint_is_refused(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    damaged = run / "checkpoints" / "epoch_0003.pt"
    damaged.write_text("half a checkpoint")  # what a broken disk or copy leaves
    proc = run_py(
        *TINY, "logger=none", "resume=auto", f"hydra.run.dir={run}", cwd=tmp_path, check=False
    )
    assert proc.returncode != 0
    message = proc.stderr + proc.stdout
    assert "epoch_0003.pt" in message and "resume=null" in message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_0003.pt"]
    assert not (run / "metrics.jsonl").exists(), "nothing may train"


# 2 epochs of 2 updates (3 batches, accumulated 2 + 1) and a validation of ~23 batches of 16:
# long enough (seconds) that a signal sent when the epoch's last update is logged lands in it
DURING_VALIDATION = [
    "model.name=test_resnet",
    "data.dataset.image_size=8",
    "sched.warmup_epochs=0",
    "trainer.epochs=2",
    "data.batch_size=32",
    "trainer.accum_steps=2",
    "trainer.limit_train_batches=3",
    "trainer.log_every=1",
    "+data.eval_batch_size=16",
    "logger=none",
]


@pytest.mark.slow  # three run.py processes with a slow validation
def test_sigterm_during_validation_resumes_into_that_validation_and_loses_no_epoch(tmp_path):
    """The signal lands after the epoch's last update, while validation runs (sent once
    metrics.jsonl holds that update's record; the test fails if it landed elsewhere). The
    resumed run validates epoch 1 and trains all of epoch 2, as the uninterrupted run."""
    straight = tmp_path / "straight"
    run_py(*DURING_VALIDATION, f"hydra.run.dir={straight}", cwd=tmp_path)

    broken = tmp_path / "broken"
    proc = start([*DURING_VALIDATION, f"hydra.run.dir={broken}"], tmp_path)
    metrics = broken / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while '"step": 2,' not in (metrics.read_text() if metrics.exists() else ""):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no record of update 2 within 300 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    saved = checkpoint.find_latest(broken / "checkpoints")
    assert saved.samefile(broken / "checkpoints" / "epoch_0000_batch_000003.pt"), (
        f"the signal missed validation: {sorted(p.name for p in saved.parent.iterdir())}"
    )

    run_py(*DURING_VALIDATION, f"hydra.run.dir={broken}", "resume=auto", cwd=tmp_path)
    assert "all 3 batches of the next done" in resumed_from(broken)
    assert_ends_as(straight, broken)
    assert all(math.isfinite(r["train/epoch_loss"]) for r in epoch_records(broken))
