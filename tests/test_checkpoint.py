"""engine/checkpoint.py: which files a run keeps, and that no failure costs the last good one."""

import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from engine import checkpoint
from engine.checkpoint import CheckpointSaver
from tests.helpers import REPO, clean_env

METADATA = {"config": {"model": {"name": "tiny"}}, "class_names": ["cat", "dog"]}
# val/acc1 per epoch: the best epoch (2) is old enough to be pruned by keep_last=2
ACC1 = {1: 10.0, 2: 40.0, 3: 20.0, 4: 30.0, 5: 35.0}


def _state(epoch: int) -> dict:
    """A training state whose every tensor says which epoch wrote it."""
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.fill_(epoch)
        layer.bias.fill_(-epoch)
    return {
        "model": layer.state_dict(),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": epoch,
        "metrics": {"val/acc1": ACC1[epoch]},
    }


def _save_epochs(folder, epochs, keep_last: int) -> CheckpointSaver:
    saver = CheckpointSaver(folder, keep_last=keep_last, metadata=METADATA)
    best = -1.0
    for epoch in epochs:
        is_best = ACC1[epoch] > best  # as engine.loop.fit decides it
        best = max(best, ACC1[epoch])
        saver.save(_state(epoch), epoch=epoch, is_best=is_best)
    return saver


def test_keeps_last_best_and_the_newest_epochs(tmp_path):
    saver = _save_epochs(tmp_path, range(1, 6), keep_last=2)

    # hidden names included: a leftover .tmp would show here
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "epoch_0004.pt", "epoch_0005.pt", "last.pt"]
    for path in tmp_path.iterdir():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["config"] == METADATA["config"]
        assert ckpt["class_names"] == METADATA["class_names"]
        assert ckpt["format_version"] == checkpoint.FORMAT_VERSION
        # the checksum is checked on load and not handed back
        assert checkpoint.load(path).keys() == ckpt.keys() - {"checksum"}

    last = checkpoint.load(tmp_path / "last.pt")
    assert last["epoch"] == 5
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "epoch_0005.pt")
    # epoch_0002.pt is gone, but best.pt still holds its bytes
    best = checkpoint.load(saver.best)
    assert best["epoch"] == 2 and best["metrics"]["val/acc1"] == max(ACC1.values())
    torch.testing.assert_close(best["model"]["weight"], torch.full((2, 3), 2.0))


FAILED_SAVE = """
import json, resource, signal, sys
import torch
from engine.checkpoint import CheckpointSaver

saver = CheckpointSaver(sys.argv[1], keep_last=2, metadata={"config": {}})
saver.save({"model": {"w": torch.ones(16)}, "epoch": 1}, epoch=1, is_best=True)

# Ignored, SIGXFSZ no longer kills the process: the write fails with EFBIG, as a full disk
# fails it with ENOSPC. 64 KB lets the first file (~1 KB) through but not the next (~400 KB).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
try:
    saver.save({"model": {"w": torch.zeros(100_000)}, "epoch": 2}, epoch=2, is_best=True)
except OSError as err:
    print(json.dumps({"errno": err.errno, "message": str(err)}))
else:
    sys.exit("saving past RLIMIT_FSIZE succeeded; the test no longer exercises a failed write")
"""


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    # RLIMIT_FSIZE binds the whole process, so the failing save runs in a process of its own
    proc = subprocess.run(
        [sys.executable, "-c", FAILED_SAVE, str(tmp_path)],
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    error = json.loads(proc.stdout.strip().splitlines()[-1])
    assert error["errno"] == errno.EFBIG
    assert str(tmp_path / "epoch_0002.pt") in error["message"]  # which save failed

    assert sorted(os.listdir(tmp_path)) == ["best.pt", "epoch_0001.pt", "last.pt"]
    for name in ("last.pt", "best.pt"):
        ckpt = checkpoint.load(tmp_path / name)
        assert ckpt["epoch"] == 1
        assert torch.equal(ckpt["model"]["w"], torch.ones(16))


def test_find_latest_skips_a_truncated_last_checkpoint(tmp_path):
    _save_epochs(tmp_path, range(1, 4), keep_last=3)
    last, newest = tmp_path / "last.pt", tmp_path / "epoch_0003.pt"
    good = last.read_bytes()

    # a fresh truncated file under the name last.pt: epoch_0003.pt keeps its own bytes
    last.unlink()
    last.write_bytes(good[: len(good) // 2])
    assert checkpoint.find_latest(tmp_path) == newest

    # damaged in place instead: last.pt is a hard link, so the newest epoch file is damaged too
    last.unlink()
    os.link(newest, last)
    with open(last, "r+b") as f:
        f.truncate(len(good) // 2)
    assert checkpoint.find_latest(tmp_path) == tmp_path / "epoch_0002.pt"


def test_find_latest_of_an_empty_or_missing_folder_is_none(tmp_path):
    assert checkpoint.find_latest(tmp_path) is None
    assert checkpoint.find_latest(tmp_path / "missing") is None


def test_find_latest_names_every_refused_file_when_none_loads(tmp_path):
    _save_epochs(tmp_path, range(1, 3), keep_last=3)
    for path in tmp_path.glob("epoch_*.pt"):  # last.pt and best.pt are links to them
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(checkpoint.NoValidCheckpoint) as info:
        checkpoint.find_latest(tmp_path)
    for name in ("last.pt", "epoch_0002.pt", "epoch_0001.pt"):
        assert f"{name}: " in str(info.value)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_checkpoints_get_the_mode_the_umask_gives_every_other_file(tmp_path, umask):
    previous = os.umask(umask)
    try:
        _save_epochs(tmp_path, range(1, 3), keep_last=3)
        (tmp_path / "other").write_text("")  # what open() makes under this umask
    finally:
        os.umask(previous)
    expected = (tmp_path / "other").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    for name in ("epoch_0001.pt", "epoch_0002.pt", "last.pt", "best.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda p: torch.save(torch.zeros(3), p), id="plain-tensor"),
        pytest.param(lambda p: torch.save({"weight": torch.zeros(3)}, p), id="bare-state-dict"),
        pytest.param(lambda p: p.write_text("not a checkpoint\n"), id="text"),
        pytest.param(lambda p: p.write_bytes(b""), id="empty"),
    ],
)
def test_load_rejects_what_is_not_a_checkpoint_naming_the_file(tmp_path, write):
    path = tmp_path / "model.pt"
    write(path)
    with pytest.raises(ValueError) as info:
        checkpoint.load(path)
    assert str(path) in str(info.value)


def test_load_of_a_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        checkpoint.load(tmp_path / "nothing.pt")
    assert str(tmp_path / "nothing.pt") in str(info.value)


# ---------------------------------------------------------------------------------------------
# Disk use: checkpoint.keep_last=0 and checkpoint.best_weights_only (issue 17)


def _adam_state(epoch: int) -> dict:
    """_state with an AdamW state the size real ones have: two moments per weight."""
    state = _state(epoch)
    params = list(nn.Linear(300, 200).parameters())
    optimizer = torch.optim.AdamW(params)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    state["optimizer"] = optimizer.state_dict()
    state["model"] = {f"p{i}": torch.full_like(p, epoch) for i, p in enumerate(params)}
    state["rng"] = {"torch": torch.get_rng_state()}
    return state


def test_weights_only_best_beside_a_full_last_and_nothing_else(tmp_path):
    saver = CheckpointSaver(tmp_path, keep_last=0, best_weights_only=True, metadata=METADATA)
    best = -1.0
    for epoch in range(1, 6):
        is_best = ACC1[epoch] > best
        best = max(best, ACC1[epoch])
        state = _adam_state(epoch)
        state["metrics"] = {"val/acc1": ACC1[epoch]}
        saver.save(state, epoch=epoch, is_best=is_best)

    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]
    last, best_ckpt = checkpoint.load(tmp_path / "last.pt"), checkpoint.load(saver.best)
    assert last["epoch"] == 5 and {"optimizer", "rng"} <= last.keys()
    # what eval / predict / export / serve read is there; what only resuming needs is not
    assert best_ckpt["epoch"] == 2 and best_ckpt["metrics"]["val/acc1"] == 40.0
    assert best_ckpt["class_names"] == METADATA["class_names"]
    assert not {"optimizer", "scheduler", "scaler", "rng"} & best_ckpt.keys()
    assert torch.equal(best_ckpt["model"]["p0"], torch.full((200, 300), 2.0))
    # AdamW's two moments per weight: the weights-only file is about a third of the full one
    ratio = (tmp_path / "best.pt").stat().st_size / (tmp_path / "last.pt").stat().st_size
    assert 0.25 < ratio < 0.45, ratio
    assert checkpoint.find_latest(tmp_path) == tmp_path / "last.pt"  # what resume=auto takes


def test_checkpoint_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"checkpoint\.best_weights_only='yes' must be true or"):
        CheckpointSaver(tmp_path, best_weights_only="yes")
    with pytest.raises(ValueError, match=r"checkpoint\.keep_last=-1 must be an integer, 0 or"):
        CheckpointSaver(tmp_path, keep_last=-1)
