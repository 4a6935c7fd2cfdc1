"""conf/hydra/launcher/: jobs in parallel on one machine, and the SLURM path through submitit.

`slurm_local` is the `slurm` launcher's path (submission, preemption signal, requeue) on
submitit's local executor: each job runs in its own process under a submitit controller.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tests.helpers import (
    REPO,
    RUN_PY,
    TINY,
    child_pids,
    clean_env,
    descendants,
    epoch_records,
    read_jsonl,
    records_of,
    run_py,
    wandb_records,
    wandb_run_id,
    wandb_runs,
)

LAUNCHERS = sorted(p.stem for p in (REPO / "conf" / "hydra" / "launcher").glob("*.yaml"))


def composed_with_hydra(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_every_launcher_option_composes_and_builds(launcher, tmp_path):
    cfg = composed_with_hydra(f"hydra/launcher={launcher}", f"hydra.sweep.dir={tmp_path}")
    built = instantiate(cfg.hydra.launcher)  # the plugin's class takes every key of the file
    assert type(built).__module__.startswith("hydra_plugins.")


@pytest.mark.slow  # a real training subprocess: keeps the default suite under 10 minutes
def test_local_launcher_runs_the_jobs_side_by_side(tmp_path):
    sweep = tmp_path / "sweep"
    run_py(
        "-m",
        "hydra/launcher=local",
        "hydra.launcher.n_jobs=2",
        "optim.lr=1e-3,1e-4",
        f"hydra.sweep.dir={sweep}",
        "trainer.epochs=1",
        *TINY,
        cwd=tmp_path,
    )

    jobs = [sweep / "0", sweep / "1"]
    ids, groups = set(), set()
    for job in jobs:
        assert [r["epoch"] for r in epoch_records(job)] == [1]
        assert (job / "checkpoints" / "last.pt").is_file()
        records = wandb_records(wandb_runs(job)[0])
        assert records_of(records, "exit")[0]["exit_code"] == 0
        ids.add(wandb_run_id(records))
        groups.add(records_of(records, "run")[0]["run_group"])
    assert len(ids) == 2 and len(groups) == 1
    # side by side: each job started (wrote its .hydra/) before the other saved its checkpoint
    started = [(job / ".hydra" / "config.yaml").stat().st_mtime for job in jobs]
    finished = [(job / "checkpoints" / "last.pt").stat().st_mtime for job in jobs]
    assert max(started) < min(finished)


def test_slurm_launcher_asks_sbatch_for_what_its_file_says(tmp_path, monkeypatch):
    cfg = composed_with_hydra(
        "hydra/launcher=slurm", "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path}"
    )
    # no SLURM here: Hydra's launcher builds submitit's executor as on a cluster, and the job
    # array it would send to sbatch is caught instead
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    sent = {}

    class NotSubmitted:
        def results(self):
            return [None]

    def map_array(executor, fn, *job_args):
        sent.update(executor=executor._executor, jobs=len(job_args[0]))
        return [NotSubmitted() for _ in job_args[0]]

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    launcher.launch([["optim.lr=0.001"], ["optim.lr=0.0001"]], initial_job_idx=0)

    assert sent["jobs"] == 2
    assert sent["executor"].max_num_timeout == cfg.hydra.launcher.max_num_timeout
    sbatch = sent["executor"]._make_submission_file_text("python -m submitit.core._submit", "0")
    for line in (
        "--partition=gpu",
        "--gpus-per-node=1",
        "--ntasks-per-node=1",
        "--cpus-per-task=10",
        "--mem=64GB",
        "--time=1440",
        "--signal=USR2@120",  # the requeue signal, 2 min before the time limit
    ):
        assert f"#SBATCH {line}\n" in sbatch, (line, sbatch)
    assert str(tmp_path / ".submitit") in sbatch  # logs beside the jobs


def wait_for_children(pid: int, count: int, proc: subprocess.Popen, timeout: float = 60):
    """The `count` child processes of `pid` (a submitit controller starts a job's tasks)."""
    deadline = time.monotonic() + timeout
    while len(found := child_pids(pid)) < count:
        assert proc.poll() is None, f"run.py -m exited ({proc.returncode}) before the tasks ran"
        assert time.monotonic() < deadline, f"{found} of {count} tasks within {timeout} s"
        time.sleep(0.02)
    return found


def wait_for(paths, proc: subprocess.Popen, what: str, timeout: float = 300) -> Path:
    deadline = time.monotonic() + timeout
    while not (found := list(paths())):
        assert proc.poll() is None, f"run.py -m exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)
    (path,) = found
    return path


@pytest.mark.slow  # two starts of a training job, ~40 s on 2 CPU cores
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the job through /proc")
@pytest.mark.parametrize("tasks", [1, 2], ids=["one-task", "data-parallel-two-tasks"])
def test_slurm_local_job_preempted_is_requeued_and_resumes_its_run(tmp_path, tasks):
    epochs = 4
    # submitit starts the job as `python -m submitit.core._submit` in the launching folder: the
    # repo's packages come from there, or (as here, launching from tmp_path) from PYTHONPATH
    proc = subprocess.Popen(
        [
            sys.executable,
            str(RUN_PY),
            "-m",
            "hydra/launcher=slurm_local",
            f"hydra.launcher.tasks_per_node={tasks}",
            "hydra.launcher.gpus_per_node=0",
            *TINY,
            f"trainer.epochs={epochs}",
            f"data.batch_size={32 // tasks}",
        ],
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # no hydra.sweep.dir: the requeued job must find its timestamped folder by itself
        first = wait_for(
            lambda: tmp_path.glob("multirun/*/*/0/checkpoints/epoch_0001.pt"), proc, "checkpoint"
        )
        job = first.parent.parent
        # the submitit job id is the pid of the local controller, which runs the job's process
        controller = wait_for(lambda: job.parent.glob(".submitit/[0-9]*"), proc, "submitit job")
        started = wait_for_children(int(controller.name), tasks, proc)
        # what SLURM sends every task before the time limit or on preemption, and what
        # submitit's local controller sends at timeout_min - signal_delay_s (submitit's USR_SIG)
        for task in started:
            os.kill(task, signal.SIGUSR2)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:  # a failed check above: end the sweep, the job and its helpers
            started = descendants(proc.pid)
            proc.kill()
            proc.wait()
            for pid in started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-4000:]

    (submitit_log,) = controller.glob("*_0_log.out")
    log = submitit_log.read_text()
    assert "this job is preempted" in log and "Requeued job" in log, log[-4000:]
    assert len(list(tmp_path.glob("multirun/*/*"))) == 1, "the requeued job ran in a new sweep"

    # the second run of the job continued from a checkpoint in the same folder...
    run_log = (job / "run.log").read_text()
    resumed_after = int(run_log.split("resumed after epoch ")[1].split()[0])
    assert 1 <= resumed_after < epochs, "the job was interrupted too late to test resuming"
    assert [r["epoch"] for r in epoch_records(job)] == list(range(1, epochs + 1))
    steps = [r["step"] for r in read_jsonl(job) if "train/loss" in r]
    assert steps == sorted(set(steps)), "no step may be recorded twice"
    assert (job / "checkpoints" / f"epoch_{epochs:04d}.pt").is_file()
    # data-parallel: the job's tasks formed one group (a global batch of 32), process 0 wrote
    last = torch.load(job / "checkpoints" / "last.pt", weights_only=True)
    assert len(last.get("rng_ranks", [None])) == tasks
    assert run_log.count("per 64 examples x global batch 32") == 2, "one line per start"
    # ...and the same W&B run: the interrupted attempt closed as failed, the requeued one done
    interrupted, requeued = (wandb_records(run) for run in wandb_runs(job))
    assert wandb_run_id(interrupted) == wandb_run_id(requeued)
    assert records_of(interrupted, "exit")[0]["exit_code"] == 1
    assert records_of(requeued, "exit")[0]["exit_code"] == 0
