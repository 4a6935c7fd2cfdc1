"""engine/files.py: the one atomic writer (checkpoints, run info, metrics, exports, sweeps)."""

import errno
import json
import os
import subprocess
import sys

import pytest

from engine import files
from tests.helpers import REPO, clean_env


def test_a_writer_that_fails_halfway_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "config.yaml"
    files.atomic_write_text(path, "old: 1\n")

    def half_then_fail(f):
        f.write(b"new: ")
        f.flush()  # the half is on disk, under the temporary name
        raise KeyboardInterrupt  # what a Ctrl-C or SIGTERM handler raises mid-write

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(path, half_then_fail)
    assert path.read_text() == "old: 1\n"
    assert os.listdir(tmp_path) == ["config.yaml"]  # hidden names included


FULL_DISK = """
import json, resource, signal, sys
from pathlib import Path
from engine import files

path = Path(sys.argv[1]) / "metrics.jsonl"
files.atomic_write_text(path, "old\\n")
# Ignored, SIGXFSZ no longer kills the process: the write fails with EFBIG, as a full disk
# fails it with ENOSPC
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
try:
    files.atomic_write(path, lambda f: f.write(b"x" * 1_000_000))
except OSError as err:
    print(json.dumps({"errno": err.errno}))
else:
    sys.exit("writing past RLIMIT_FSIZE succeeded; the test no longer exercises a failed write")
"""


def test_a_write_the_disk_refuses_leaves_the_old_file_and_no_temporary(tmp_path):
    # RLIMIT_FSIZE binds the whole process, so the failing write runs in a process of its own
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path)],
        env=clean_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["errno"] == errno.EFBIG
    assert (tmp_path / "metrics.jsonl").read_text() == "old\n"
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_get_the_mode_open_gives_under_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        files.atomic_write_text(tmp_path / "written", "x")
        # a writer that makes a private file itself (as safetensors' save_file does)
        with files.replacing(tmp_path / "private", create=False) as tmp:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600))
        (tmp_path / "opened").write_text("x")
    finally:
        os.umask(previous)
    expected = (tmp_path / "opened").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    for name in ("written", "private"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


def test_replacing_swaps_in_what_a_writer_made_under_the_free_name(tmp_path):
    # create=False: for writers that make the file themselves (os.link, safetensors.save_file)
    source, target = tmp_path / "epoch_0002.pt", tmp_path / "last.pt"
    source.write_text("new")
    target.write_text("old")
    with files.replacing(target, create=False) as tmp:
        assert not tmp.exists() and tmp.parent == tmp_path and tmp.name.endswith(".tmp")
        os.link(source, tmp)
    assert os.path.samefile(source, target)
    assert sorted(os.listdir(tmp_path)) == ["epoch_0002.pt", "last.pt"]
