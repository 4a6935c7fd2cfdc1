"""`torchrun --nproc_per_node=2 run.py`: data-parallel training on the CPU (gloo), checked against
one process with the same global batch."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, SequentialSampler, TensorDataset

from data import Splits
from data.digits import digits
from data.loaders import ShardSampler, eval_loader, make_loaders, seed_epoch
from engine import checkpoint
from engine.evaluate import read_results
from engine.loop import evaluate
from engine.predict import load_trained
from tests.helpers import (
    REPO,
    RUN_PY,
    TINY,
    assert_ends_as,
    clean_env,
    descendants,
    epoch_records,
    read_jsonl,
    run_py,
    summary,
    wandb_history,
    wandb_records,
    wandb_run_id,
    wandb_runs,
)

TORCHRUN = Path(sys.executable).parent / "torchrun"
# timm's 0.4 M-parameter test ResNet (with BatchNorm) reaches ~97 % top-1 on the 16 x 16 digits
# in 4 epochs of 22 updates
BATCH = 32  # per process: 2 processes x 32 = the single process's 64
IMAGE_SIZE = 16  # not the default 56: the test compares numbers, and 16 px trains 12x faster
SETTINGS = [
    "model.name=test_resnet",
    "trainer.epochs=4",
    "trainer.log_every=5",
    "trainer.ema_decay=0.9",
    "sched.warmup_epochs=0",
    f"data.dataset.image_size={IMAGE_SIZE}",
]


def torchrun(*overrides: str, cwd: Path, nproc: int = 2, timeout: int = 600):
    """run.py under torchrun, one thread per process (2 processes on a 2-core machine)."""
    proc = subprocess.run(
        [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", str(RUN_PY), *overrides],
        cwd=cwd,
        env=clean_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun run.py {' '.join(overrides)} exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(cwd, 2-process run folder, single-process run folder) of the same global batch."""
    cwd = tmp_path_factory.mktemp("ddp")
    torchrun(*SETTINGS, f"data.batch_size={BATCH}", "logger.wandb.mode=offline", cwd=cwd)
    folders = list((cwd / "outputs").glob("*/*"))
    assert len(folders) == 1, f"both processes must write to one folder: {folders}"
    single = cwd / "single"
    one_process = [f"data.batch_size={2 * BATCH}", "logger=none", f"hydra.run.dir={single}"]
    run_py(*SETTINGS, *one_process, cwd=cwd, env=clean_env(OMP_NUM_THREADS="1"))
    return cwd, folders[0], single


@pytest.mark.slow  # a real training subprocess: keeps the default suite under 10 minutes
def test_two_processes_reach_the_accuracy_of_one_with_the_same_global_batch(runs):
    _, ddp, single = runs
    two, one = epoch_records(ddp), epoch_records(single)
    assert [r["step"] for r in two] == [r["step"] for r in one]  # 22 updates an epoch in both
    # the same images in each global batch; only BatchNorm's batch statistics differ (32 vs 64)
    assert two[-1]["val/acc1"] == pytest.approx(one[-1]["val/acc1"], abs=1.5), (two[-1], one[-1])
    assert two[-1]["val/acc1"] > 90
    assert two[-1]["val/loss"] == pytest.approx(one[-1]["val/loss"], rel=0.15)


@pytest.mark.slow  # a real training subprocess: keeps the default suite under 10 minutes
def test_rank_zero_alone_writes_one_run_folder(runs):
    cwd, ddp, _ = runs
    assert {p.name for p in (cwd / "outputs").glob("*/*")} == {ddp.name}
    assert (ddp / ".hydra" / "config.yaml").is_file() and (ddp / "config.yaml").is_file()
    records = read_jsonl(ddp)
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps, "each step is recorded once"
    assert [r["epoch"] for r in epoch_records(ddp)] == list(range(1, 5))
    assert sum("best/val/acc1" in r.get("summary", {}) for r in records) == 1
    log = (ddp / "run.log").read_text()
    assert log.count("epoch 4/4") == 1, "only rank 0 writes the log file"

    (offline_run,) = wandb_runs(ddp)
    wandb = wandb_records(offline_run)
    history = wandb_history(wandb)
    for r in epoch_records(ddp):
        assert history[r["step"]]["val/acc1"] == pytest.approx(r["val/acc1"])
    last = torch.load(ddp / "checkpoints" / "last.pt", weights_only=True)
    assert last["wandb_run_id"] == wandb_run_id(wandb)
    assert len(last["rng_ranks"]) == 2  # each process resumes its own random stream


@pytest.mark.slow  # a real training subprocess: keeps the default suite under 10 minutes
def test_checkpoint_loads_in_one_process_and_scores_what_two_processes_measured(runs):
    _, ddp, _ = runs
    last = torch.load(ddp / "checkpoints" / "last.pt", weights_only=True)
    for weights in ("model", "ema"):
        assert not [k for k in last[weights] if k.startswith("module.")], weights
    splits = digits(image_size=IMAGE_SIZE)
    loader = eval_loader(splits.val, batch_size=BATCH)
    for weights, prefix in ((False, "val"), (True, "val_ema")):
        trained = load_trained(ddp / "checkpoints" / "last.pt", use_ema=weights)
        one = evaluate(trained.model, loader, nn.CrossEntropyLoss(), device=torch.device("cpu"))
        # the 2-process numbers are sums over both halves of the validation set
        assert one["acc1"] == pytest.approx(last["metrics"][f"{prefix}/acc1"], abs=1e-4)
        assert one["acc5"] == pytest.approx(last["metrics"][f"{prefix}/acc5"], abs=1e-4)
        assert one["loss"] == pytest.approx(last["metrics"][f"{prefix}/loss"], rel=1e-4)
    assert summary(ddp)["best/val/acc1"] == max(
        max(r["val/acc1"], r["val_ema/acc1"]) for r in epoch_records(ddp)
    )


def test_shards_of_the_batches_make_up_the_single_process_batches():
    dataset = TensorDataset(torch.arange(103))
    splits = Splits(train=dataset, val=dataset, classes=["a"], in_chans=1)
    one, _ = make_loaders(splits, batch_size=8)
    shards = [make_loaders(splits, batch_size=4, num_replicas=2, rank=r)[0] for r in (0, 1)]
    for epoch in (0, 1):
        for loader in (one, *shards):
            seed_epoch(loader, seed=3, epoch=epoch)
        batches = [[set(b[0].tolist()) for b in loader] for loader in shards]
        assert [set(b[0].tolist()) for b in one] == [a | b for a, b in zip(*batches, strict=True)]
    assert len(shards[0]) == len(shards[1]) == len(one) == 103 // 8


def test_validation_shards_cover_every_image_once():
    sampler = SequentialSampler(range(11))
    shards = [list(ShardSampler(sampler, 3, r, drop_last=False)) for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(11))
    assert [len(ShardSampler(sampler, 3, r, drop_last=False)) for r in range(3)] == [4, 4, 3]
    loaders = [eval_loader(range(11), 2, num_replicas=3, rank=r) for r in range(3)]
    assert sorted(i for loader in loaders for b in loader for i in b.tolist()) == list(range(11))
    assert isinstance(loaders[0], DataLoader)


@pytest.mark.slow
def test_resume_under_torchrun_continues_the_run(runs, tmp_path):
    _, ddp, _ = runs
    copy = tmp_path / "run"
    shutil.copytree(ddp, copy)
    torchrun(f"resume={copy}", "trainer.epochs=5", cwd=tmp_path)
    assert [r["epoch"] for r in epoch_records(copy)] == list(range(1, 6))
    steps = [r["step"] for r in read_jsonl(copy) if "train/loss" in r]
    assert steps == sorted(set(steps)), "no step may be recorded twice"
    last = torch.load(copy / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 5 and len(last["rng_ranks"]) == 2
    first, resumed = wandb_runs(copy)
    assert wandb_run_id(wandb_records(resumed)) == last["wandb_run_id"]
    assert first.name.endswith(last["wandb_run_id"])


@pytest.mark.slow
def test_multirun_under_torchrun_gives_each_job_one_folder(tmp_path):
    torchrun(
        "-m",
        "optim.lr=1e-3,3e-3",
        "model.name=test_resnet",
        "trainer.epochs=1",
        "trainer.limit_train_batches=3",
        "sched.warmup_epochs=0",
        f"data.batch_size={BATCH}",
        cwd=tmp_path,
    )
    (sweep,) = (tmp_path / "multirun").glob("*/*")  # both processes agree on the sweep folder
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job in jobs:
        assert (sweep / job / "checkpoints" / "last.pt").is_file()
        assert len(wandb_runs(sweep / job)) == 1
        assert [r["epoch"] for r in epoch_records(sweep / job)] == [1]


@pytest.mark.slow  # 2 jobs x 2 processes, then a torchrun run: ~70 s on 2 CPU cores
def test_multirun_jobs_of_two_tasks_each_train_in_their_own_process_group(tmp_path):
    """hydra/launcher=slurm_local with tasks_per_node=2: each job of the sweep is a group of 2
    processes (submitit's local executor, as SLURM runs the tasks of a job), training exactly
    as torchrun's 2 processes do."""
    quick = [
        "model.name=test_resnet",
        "trainer.epochs=1",
        "trainer.limit_train_batches=4",
        "sched.warmup_epochs=0",
        f"data.batch_size={BATCH}",
    ]
    run_py(
        "-m",
        "hydra/launcher=slurm_local",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.gpus_per_node=0",
        "optim.lr=1e-3,3e-3",
        *quick,
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
    )
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    for job in ("0", "1"):
        folder = sweep / job
        assert len(wandb_runs(folder)) == 1, "process 0 alone logs to W&B"
        run_log = (folder / "run.log").read_text()
        assert run_log.count(f"x global batch {2 * BATCH}") == 1, "one group, process 0 writes"
        assert len(torch.load(folder / "checkpoints" / "last.pt")["rng_ranks"]) == 2
    # submitit's logs: two submitit jobs (one per sweep job), each with tasks 0 and 1
    task_logs = sorted(p.name.split("_", 1)[1] for p in (sweep / ".submitit").glob("*/*_log.out"))
    assert task_logs == ["0_log.out", "0_log.out", "1_log.out", "1_log.out"]
    # the same training as torchrun's: identical weights after the same updates
    torchrun(
        "optim.lr=1e-3", *quick, "logger=none", f"hydra.run.dir={tmp_path / 'ddp'}", cwd=tmp_path
    )
    ddp = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt")["model"]
    jobs = {job: torch.load(sweep / job / "checkpoints" / "last.pt")["model"] for job in "01"}
    assert all(torch.equal(ddp[k], jobs["0"][k]) for k in ddp)
    assert not all(torch.equal(ddp[k], jobs["1"][k]) for k in ddp), "job 1 trained with its lr"


# 3 epochs of 4 updates, 2 processes of 16 images each; a checkpoint after every update
STOP_SETTINGS = [
    *TINY,
    "trainer.epochs=3",
    "data.batch_size=16",
    "logger=none",
    "trainer.checkpoint_every_updates=1",
]


@pytest.fixture(scope="module")
def straight_ddp(tmp_path_factory):
    """An uninterrupted 2-process run: what every stopped and resumed one must end as."""
    cwd = tmp_path_factory.mktemp("straight_ddp")
    torchrun(*STOP_SETTINGS, f"hydra.run.dir={cwd / 'run'}", cwd=cwd)
    return cwd / "run"


@pytest.mark.slow  # three torchrun starts, ~90 s on 2 CPU cores
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_torchrun_run_stopped_mid_epoch_resumes_exactly_as_an_uninterrupted_one(
    straight_ddp, tmp_path, sig
):
    """SIGKILL to every process (a node lost), or SIGTERM to every process (what SLURM and
    `scancel` send to a job step): the same command with resume=auto ends bit for bit as an
    uninterrupted 2-process run."""
    broken = tmp_path / "broken"
    settings = [*STOP_SETTINGS, f"hydra.run.dir={broken}"]
    if sig == signal.SIGTERM:  # no mid-epoch checkpoint but the one the signal asks for
        settings.append("trainer.checkpoint_every_updates=null")
    proc = subprocess.Popen(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(RUN_PY), *settings],
        cwd=tmp_path,
        env=clean_env(OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = "epoch_0001_batch_000002.pt" if sig == signal.SIGKILL else "epoch_0001.pt"
    deadline = time.monotonic() + 300
    while not (broken / "checkpoints" / first).exists():
        assert proc.poll() is None, f"ended before {first}: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no {first} within 300 s"
        time.sleep(0.005)
    # every process: torchrun starts each worker in a session of its own
    for pid in [proc.pid, *descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not (broken / "checkpoints" / "epoch_0003.pt").exists(), "stopped too late"
    if sig == signal.SIGTERM:
        assert "received SIGTERM" in (broken / "run.log").read_text(), stderr[-3000:]
        saved = checkpoint.find_latest(broken / "checkpoints")
        assert saved.name != first, f"no checkpoint for the signal: {stderr[-3000:]}"

    torchrun(*settings, "resume=auto", cwd=tmp_path)
    log = (broken / "run.log").read_text()
    if sig == signal.SIGKILL:
        assert "batches into the next" in log.split("resumed after epoch ")[1].splitlines()[0]
    assert [r["epoch"] for r in epoch_records(broken)] == [1, 2, 3]
    assert_ends_as(straight_ddp, broken)


@pytest.mark.slow  # torchrun eval and a one-process eval of the runs fixture's model
def test_eval_under_torchrun_scores_the_whole_split_as_one_process_does(runs, tmp_path):
    _, ddp, _ = runs
    torchrun("task=eval", f"task.ckpt={ddp}", f"hydra.run.dir={tmp_path / 'two'}", cwd=tmp_path)
    run_py("task=eval", f"task.ckpt={ddp}", f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    two, one = (read_results(tmp_path / name / "eval") for name in ("two", "one"))
    assert two[0]["eval/images"] == one[0]["eval/images"] == 360  # every image once
    assert two[0]["eval/acc1"] == one[0]["eval/acc1"]
    assert (two[2] == one[2]).all(), "the same confusion matrix"
    # in dataset order, image by image (scores agree to float32 rounding across batch sizes)
    assert [p["index"] for p in two[3]] == list(range(360))
    assert [(p["target"], p["pred"]) for p in two[3]] == [(p["target"], p["pred"]) for p in one[3]]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(two[3], one[3], strict=True)) < 1e-5
    assert len(wandb_runs(tmp_path / "two")) == 1, "process 0 alone logs the evaluation"


@pytest.mark.parametrize("task", ["predict", "export", "serve", "calibrate"])
def test_one_process_tasks_refuse_to_run_under_torchrun(task, run_task, tiny_run, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets in each process it starts
    with pytest.raises(RuntimeError, match=f"task={task} runs in one process, but 2 were"):
        run_task(f"task={task}", f"task.ckpt={tiny_run}")
