"""Breaking things on purpose: NaN updates, stop signals, damaged and half-written checkpoints.

In-process runs of `fit` on a small conv net (with BatchNorm) and random images; the real
run.py processes killed with SIGKILL and SIGTERM are in tests/test_resume.py.
"""

import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from data import Splits
from data.loaders import make_loaders, seed_epoch, skip_batches
from engine import checkpoint, distributed
from engine.checkpoint import CheckpointSaver
from engine.logger import RunLogger, read_metrics
from engine.loop import fit
from engine.schedules import cosine
from tests.helpers import REPO, clean_env, read_jsonl

TORCHRUN = Path(sys.executable).parent / "torchrun"

BATCHES = 6  # per epoch


class Tripwire(nn.Module):
    """A model that misbehaves on chosen training forward passes (counted from 1).

    `nan_at`: the input becomes NaN (so the loss, the gradient and BatchNorm's running
    statistics would all be poisoned). `signal_at`: the process sends itself `signum`, as a
    cluster does before preemption. `eval_signal_at`: the same on evaluation forward passes
    (counted from 1 over the run), so the signal lands while validation runs.
    """

    def __init__(self, nan_at=(), signal_at=(), signum=signal.SIGUSR1, eval_signal_at=()):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 3),
        )
        self.nan_at, self.signal_at, self.signum = set(nan_at), set(signal_at), signum
        self.eval_signal_at = set(eval_signal_at)
        self.calls = self.eval_calls = 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls in self.nan_at:
                x = torch.full_like(x, float("nan"))
            if self.calls in self.signal_at:
                os.kill(os.getpid(), self.signum)
        else:
            self.eval_calls += 1
            if self.eval_calls in self.eval_signal_at:
                os.kill(os.getpid(), self.signum)
        return self.net(x)


def train(folder, model, *, epochs=2, batches=BATCHES, resume=None, saver=None, **trainer):
    """`fit` as run.py calls it, on 96 random 8x8 images; returns (records, result)."""
    generator = torch.Generator().manual_seed(1)
    data = Splits(
        train=TensorDataset(torch.randn(96, 3, 8, 8, generator=generator), torch.arange(96) % 3),
        val=TensorDataset(torch.randn(24, 3, 8, 8, generator=generator), torch.arange(24) % 3),
        classes=["a", "b", "c"],
        in_chans=3,
    )
    torch.manual_seed(0)
    # under torchrun (the stop matrix), 2 processes of 8 make the same 6 updates of 16 images
    world, main = distributed.world_size(), distributed.is_main()
    train_loader, val_loader = make_loaders(
        data, batch_size=16 // world, num_replicas=world, rank=distributed.rank()
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # the schedule of full epochs, whatever `batches` cuts them to
    scheduler = cosine(optimizer, total_steps=epochs * BATCHES, steps_per_epoch=BATCHES)
    saver = (saver or CheckpointSaver) if main else distributed.NullSaver
    saver = saver(folder / "checkpoints", **({"metadata": {"config": {}}} if main else {}))
    resume_step = resume["step"] if resume else None
    logger = RunLogger(folder, {}, resume_step=resume_step) if main else distributed.NullLogger()
    with logger:
        result = fit(
            model,
            train_loader,
            val_loader,
            optimizer,
            scheduler,
            logger,
            saver,
            epochs=epochs,
            device="cpu",
            log_every=1,
            limit_train_batches=batches,
            resume=resume,
            **trainer,
        )
    return (read_jsonl(folder) if main else []), result


def epochs_of(records):
    return [r for r in records if "epoch" in r]


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_nonfinite_updates_are_skipped_and_leave_the_model_as_it_was(tmp_path):
    # updates 3..6 of the only epoch see NaN inputs: skipped, the model stays as after update 2
    poisoned = Tripwire(nan_at=range(3, BATCHES + 1))
    records, result = train(tmp_path / "poisoned", poisoned, epochs=1)
    reference = Tripwire()
    train(tmp_path / "reference", reference, epochs=1, batches=2)

    assert_same_state(poisoned, reference)  # weights and BatchNorm statistics, bit for bit
    (epoch,) = epochs_of(records)
    assert epoch["train/skipped_updates"] == BATCHES - 2
    assert epoch["step"] == 2 and result["step"] == 2  # the scheduler saw 2 updates
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in records if "train/loss" in r)
    saved = checkpoint.load(tmp_path / "poisoned" / "checkpoints" / "last.pt")
    assert not checkpoint.non_finite_entries(saved)


def test_skipped_updates_write_no_mid_epoch_checkpoint(tmp_path):
    # a checkpoint every 2 updates; updates 3..6 are skipped, so the step stays at 2: its file is
    # written once, not again after every skipped batch
    class CountingSaver(CheckpointSaver):
        def save(self, state, epoch, is_best, batches=None):
            written.append(checkpoint.checkpoint_name(epoch, batches))
            return super().save(state, epoch, is_best, batches)

    written = []
    train(
        tmp_path,
        Tripwire(nan_at=range(3, BATCHES + 1)),
        epochs=1,
        checkpoint_every_updates=2,
        saver=CountingSaver,
    )
    assert written == ["epoch_0000_batch_000002.pt", "epoch_0001.pt"]


def test_bad_updates_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    # epoch 1 is clean; from the 3rd batch of epoch 2 on every input is NaN
    model = Tripwire(nan_at=range(BATCHES + 3, 10 * BATCHES))
    with pytest.raises(FloatingPointError) as info:
        train(tmp_path, model, epochs=3, max_bad_steps=3)
    message = str(info.value)
    assert "3 updates in a row" in message and "trainer.max_bad_steps=3" in message
    assert "optim.lr" in message  # and what to do about it

    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "epoch_0001.pt", "last.pt"]
    last = checkpoint.load(folder / "last.pt")
    assert last["epoch"] == 1 and not checkpoint.non_finite_entries(last)


def test_best_never_picks_a_nan_metric(tmp_path):
    # max_bad_steps=None: nothing is checked, the NaN goes through and wrecks the weights
    model = Tripwire(nan_at=[BATCHES + 1])
    with pytest.raises(FloatingPointError, match="hold NaN or infinite values"):
        train(tmp_path, model, epochs=2, max_bad_steps=None)
    records = epochs_of(read_jsonl(tmp_path))
    assert [r["epoch"] for r in records] == [1, 2]  # epoch 2 ran, was logged, was not saved
    best = checkpoint.load(tmp_path / "checkpoints" / "best.pt")
    assert best["epoch"] == 1 and best["best"]["epoch"] == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_saves_mid_epoch_and_the_resumed_run_ends_as_an_uninterrupted_one(
    tmp_path, signum
):
    straight = Tripwire()
    expected, _ = train(tmp_path / "straight", straight, epochs=2, ema_decay=0.9)

    # the signal arrives during the 4th batch of epoch 2: the update finishes, is saved, and
    # the process leaves with status 128 + signal
    stopped = Tripwire(signal_at=[BATCHES + 4], signum=signum)
    with pytest.raises(SystemExit) as info:
        train(tmp_path / "broken", stopped, epochs=2, ema_decay=0.9)
    assert info.value.code == 128 + signum
    folder = tmp_path / "broken" / "checkpoints"
    mid = folder / "epoch_0001_batch_000004.pt"
    assert os.path.samefile(folder / "last.pt", mid)
    assert signal.getsignal(signum) == signal.SIG_DFL  # the handler is gone with the run

    state = checkpoint.load(checkpoint.find_latest(folder))
    assert state["position"]["batches"] == 4 and state["step"] == BATCHES + 4
    resumed = Tripwire()
    got, _ = train(tmp_path / "broken", resumed, epochs=2, ema_decay=0.9, resume=state)

    assert_same_state(resumed, straight)
    for a, b in zip(epochs_of(expected), epochs_of(got), strict=True):
        for key in ("step", "train/epoch_loss", "train/epoch_acc1", "val/loss", "val_ema/loss"):
            assert a[key] == b[key], (key, a, b)
    losses = [(r["step"], r["train/loss"]) for r in expected if "train/loss" in r]
    assert [(r["step"], r["train/loss"]) for r in got if "train/loss" in r] == losses


def test_metrics_jsonl_is_strict_json_and_every_reader_takes_its_nan_and_older_bare_nan(tmp_path):
    from analysis.curves import read_jsonl_run
    from sweeping.trials import _JsonlTail

    new, old = tmp_path / "new", tmp_path / "old"
    with RunLogger(new, config={}) as logger:
        logger.log({"epoch": 1, "train/epoch_loss": float("nan"), "val/acc1": 50.0}, step=4)
        logger.summary({"best/val/acc1": float("-inf")})
    read_jsonl(new)  # fails on a bare NaN or Infinity: not JSON
    lines = (new / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["train/epoch_loss"] is None
    assert json.loads(lines[0])["non_finite"] == {"train/epoch_loss": "NaN"}
    old.mkdir()  # as runs before this format wrote it
    (old / "metrics.jsonl").write_text(
        '{"step": 4, "epoch": 1, "train/epoch_loss": NaN, "val/acc1": 50.0}\n'
        '{"summary": {"best/val/acc1": -Infinity}}\n'
    )
    for folder in (new, old):
        records = read_metrics(folder / "metrics.jsonl")
        assert math.isnan(records[0]["train/epoch_loss"]) and records[0]["val/acc1"] == 50.0
        assert "non_finite" not in records[0]
        assert records[1]["summary"]["best/val/acc1"] == float("-inf")
        assert math.isnan(read_jsonl_run(folder).rows[4]["train/epoch_loss"])
        (epoch,) = _JsonlTail(folder / "metrics.jsonl").epoch_records()
        assert math.isnan(epoch["train/epoch_loss"]) and epoch["val/acc1"] == 50.0


def signalling_saver(name: str, after: bool):
    """The real CheckpointSaver, sending the process SIGTERM as it starts writing `name`
    (`after`: once the file is complete): a signal that lands during a save, or right after."""

    class Saver(CheckpointSaver):
        def save(self, state, epoch, is_best, batches=None):
            hit = checkpoint.checkpoint_name(epoch, batches) == name
            if hit and not after:
                os.kill(os.getpid(), signal.SIGTERM)
            path = super().save(state, epoch, is_best, batches)
            if hit and after:
                os.kill(os.getpid(), signal.SIGTERM)
            return path

    return Saver


# where a SIGTERM lands (2 epochs of 6 batches, or of 5 with limit_train_batches=5; one
# validation batch): the run options, the Tripwire's, the saver's, and the checkpoint it leaves
STOPS = {
    # during the 3rd batch of epoch 2, the first of an accumulated update: saved after the 4th
    "mid-update": ({"accum_steps": 2}, {"signal_at": [BATCHES + 3]}, None, (1, 4)),
    "at-an-update": ({}, {"signal_at": [BATCHES + 2]}, None, (1, 2)),
    # the last update of epoch 1 (a limited epoch, its last update one batch): all batches done
    "last-update-limited": (
        {"accum_steps": 2, "batches": 5},
        {"signal_at": [5]},
        None,
        (0, 5),
    ),
    "during-validation": ({}, {"eval_signal_at": [1]}, None, (0, BATCHES)),
    "during-validation-limited": (
        {"accum_steps": 2, "batches": 5},
        {"eval_signal_at": [1]},
        None,
        (0, 5),
    ),
    "during-epoch-save": ({}, {}, signalling_saver("epoch_0001.pt", after=False), (1, None)),
    "after-epoch-save": ({}, {}, signalling_saver("epoch_0001.pt", after=True), (1, None)),
    # the periodic save after update 2 of epoch 2: the next update saves and stops
    "during-mid-epoch-save": (
        {"checkpoint_every_updates": 2},
        {},
        signalling_saver("epoch_0001_batch_000002.pt", after=False),
        (1, 3),
    ),
}


# Under torchrun validation is not interrupted (the processes would have to agree after every
# batch): a signal that lands there is taken after the epoch's checkpoint.
DDP_SAVES = {"during-validation": (1, None), "during-validation-limited": (1, None)}


def stop_and_resume(folder, case: str) -> None:
    """Run case `case` of STOPS: an uninterrupted run, a run stopped there, its resumption, and
    the resumed run must end as the uninterrupted one, bit for bit. In one process or under
    torchrun (every process checks its own model; process 0 the files)."""
    options, tripwire, saver, saved = STOPS[case]
    if distributed.world_size() > 1:
        saved = DDP_SAVES.get(case, saved)
    straight = Tripwire()
    expected, _ = train(folder / "straight", straight, **options)

    with pytest.raises(SystemExit) as info:
        train(
            folder / "broken", Tripwire(signum=signal.SIGTERM, **tripwire), saver=saver, **options
        )
    assert info.value.code == 128 + signal.SIGTERM
    checkpoints = folder / "broken" / "checkpoints"
    latest = checkpoint.find_latest(checkpoints)
    assert os.path.samefile(latest, checkpoints / checkpoint.checkpoint_name(*saved)), latest

    resumed = Tripwire()
    got, _ = train(folder / "broken", resumed, resume=checkpoint.load(latest), **options)
    assert_same_state(resumed, straight)
    if not distributed.is_main():
        return
    assert [r["epoch"] for r in epochs_of(got)] == [1, 2]
    for a, b in zip(epochs_of(expected), epochs_of(got), strict=True):
        for key in ("step", "train/epoch_loss", "train/epoch_acc1", "val/loss", "val/acc1"):
            assert a[key] == b[key], (key, a, b)
    losses = [(r["step"], r["train/loss"]) for r in expected if "train/loss" in r]
    assert [(r["step"], r["train/loss"]) for r in got if "train/loss" in r] == losses


@pytest.mark.slow  # 24 short in-process trainings
@pytest.mark.parametrize("case", list(STOPS))
def test_a_stop_at_any_moment_resumes_to_the_uninterrupted_run_bit_for_bit(tmp_path, case):
    stop_and_resume(tmp_path, case)


@pytest.fixture(scope="module")
def stops_under_torchrun(tmp_path_factory) -> dict:
    """Every case of STOPS in one torchrun start of this file (2 processes, gloo)."""
    folder = tmp_path_factory.mktemp("stops_ddp")
    proc = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", __file__, str(folder)],
        env=clean_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((folder / "results.json").read_text())


@pytest.mark.slow  # one torchrun start, 24 short trainings in each of 2 processes
@pytest.mark.parametrize("case", list(STOPS))
def test_a_stop_at_any_moment_under_torchrun_resumes_bit_for_bit(stops_under_torchrun, case):
    assert stops_under_torchrun[case] == "ok"


def test_a_skip_that_no_pass_used_never_reaches_the_next_epoch():
    """A resume after all of an epoch's batches (a stop during validation) skips them all; the
    next epoch's pass still starts at its first batch."""
    data = Splits(
        train=TensorDataset(torch.randn(96, 3, 8, 8), torch.arange(96) % 3),
        val=TensorDataset(torch.randn(8, 3, 8, 8), torch.arange(8) % 3),
        classes=["a", "b", "c"],
        in_chans=3,
    )
    loader, _ = make_loaders(data, batch_size=16)
    seed_epoch(loader, 0, 1)
    expected = [targets.tolist() for _, targets in loader]
    seed_epoch(loader, 0, 0)
    skip_batches(loader, len(loader))  # epoch 0: all done, no pass of it runs
    seed_epoch(loader, 0, 1)
    assert [targets.tolist() for _, targets in loader] == expected


def test_resuming_with_more_epochs_follows_the_longer_schedule(tmp_path, caplog):
    # trainer.epochs=1, then resumed with trainer.epochs=2: epoch 2 runs on the 2-epoch cosine,
    # not at the end (LR 0) of the 1-epoch one it was saved with
    train(tmp_path / "short", Tripwire(), epochs=1)
    state = checkpoint.load(tmp_path / "short" / "checkpoints" / "last.pt")
    with caplog.at_level(logging.INFO, logger="engine.schedules"):
        got, _ = train(tmp_path / "short", Tripwire(), epochs=2, resume=state)
    expected, _ = train(tmp_path / "long", Tripwire(), epochs=2)

    def lrs(records):
        return [
            (r["step"], r["train/lr"]) for r in records if "train/lr" in r and r["step"] > BATCHES
        ]

    assert lrs(got) == lrs(expected) and min(lr for _, lr in lrs(got)) > 0
    assert "follows this run's config" in caplog.text and "t_initial 6 -> 12" in caplog.text


def test_periodic_mid_epoch_checkpoints_are_pruned_after_the_epoch(tmp_path):
    train(tmp_path, Tripwire(), epochs=2, checkpoint_every_updates=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # the mid-epoch files of both epochs were removed once their epoch's file was complete
    assert names == ["best.pt", "epoch_0001.pt", "epoch_0002.pt", "last.pt"]


def _saved(folder, epochs, keep_last=3):
    saver = CheckpointSaver(folder, keep_last=keep_last, metadata={"config": {}})
    for epoch in range(1, epochs + 1):
        weight = torch.full((256,), float(epoch))
        saver.save({"model": {"w": weight}, "epoch": epoch}, epoch=epoch, is_best=True)
    return saver


def test_bit_flipped_checkpoint_is_reported_and_resume_falls_back(tmp_path, caplog):
    _saved(tmp_path, epochs=3)
    newest = tmp_path / "epoch_0003.pt"
    data = bytearray(newest.read_bytes())
    at = data.find(torch.full((1,), 3.0).numpy().tobytes())  # the first weight's bytes
    data[at + 2] ^= 0x01  # in place: last.pt, a hard link, is damaged with it
    with open(newest, "r+b") as f:
        f.write(data)
    assert torch.load(newest, weights_only=True)["epoch"] == 3, "torch alone notices nothing"

    with pytest.raises(ValueError, match="is damaged"):
        checkpoint.load(newest)
    assert checkpoint.find_latest(tmp_path) == tmp_path / "epoch_0002.pt"
    assert "is damaged" in caplog.text and str(newest) in caplog.text


def test_saver_refuses_a_state_with_nan_and_keeps_the_last_good_file(tmp_path):
    saver = _saved(tmp_path, epochs=1)
    bad = {"model": {"w": torch.tensor([1.0, float("nan")])}, "epoch": 2}
    with pytest.raises(FloatingPointError, match=r"model\.w"):
        saver.save(bad, epoch=2, is_best=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "epoch_0001.pt", "last.pt"]
    assert checkpoint.load(tmp_path / "last.pt")["epoch"] == 1


SAVE_FOREVER = """
import sys
import torch
from engine.checkpoint import CheckpointSaver

saver = CheckpointSaver(sys.argv[1], keep_last=2, metadata={"config": {}})
for epoch in range(1, 100_000):
    # ~8 MB a file: a kill lands inside a write as often as between two
    state = {"model": {"w": torch.full((2_000_000,), float(epoch))}, "epoch": epoch}
    saver.save(state, epoch=epoch, is_best=epoch % 3 == 1)
    print(epoch, flush=True)
"""


def test_a_kill_during_saves_never_leaves_a_partial_file_under_a_valid_name(tmp_path):
    rng = random.Random(0)
    for attempt in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVE_FOREVER, str(tmp_path)],
            env=clean_env(PYTHONPATH=str(REPO)),
            stdout=subprocess.PIPE,
            text=True,
        )
        proc.stdout.readline()  # one save done: the next ones are in flight
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()

        named = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
        for path in named:  # every file under a checkpoint name is complete and intact
            state = checkpoint.load(path)
            assert torch.equal(state["model"]["w"][:1], torch.tensor([float(state["epoch"])]))
        assert checkpoint.find_latest(tmp_path) is not None, f"attempt {attempt}"
    # what the kills left half-written goes when the next run starts
    CheckpointSaver(tmp_path)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_temporary_files_left_by_a_killed_save_are_removed_on_start(tmp_path, caplog):
    _saved(tmp_path, epochs=1)
    leftover = tmp_path / ".epoch_0002.pt.k3j2h1.tmp"
    leftover.write_bytes(b"half a checkpoint")
    link = tmp_path / ".last.pt.link.tmp"
    link.write_bytes(b"")
    CheckpointSaver(tmp_path)
    assert not leftover.exists() and not link.exists()
    assert str(leftover) in caplog.text
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == json.dumps(
        ["best.pt", "epoch_0001.pt", "last.pt"]
    )


if __name__ == "__main__":  # a process of stops_under_torchrun: `torchrun ... test_faults.py DIR`
    import torch.distributed as dist

    dist.init_process_group("gloo")
    out = Path(sys.argv[1])
    results = {}
    for case in STOPS:
        try:
            stop_and_resume(out / case, case)
            results[case] = "ok"
        except AssertionError as err:
            results[case] = f"process {distributed.rank()}: {err!r}"[:3000]
    merged = {case: "ok" for case in STOPS}
    for ranks in distributed.gather(results):
        merged.update({case: result for case, result in ranks.items() if result != "ok"})
    if distributed.is_main():
        (out / "results.json").write_text(json.dumps(merged, indent=1))
    dist.destroy_process_group()
