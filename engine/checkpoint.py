"""Checkpoints: atomic writes, `last` / `best` / the last N, and loading with weights_only=True.

Layout of <run folder>/checkpoints/:
    epoch_0007.pt   one file per saved epoch; the newest `keep_last` are kept
    last.pt         hard link to the newest epoch file
    best.pt         hard link to the epoch file with the best validation metric

Every file appears under its final name only once it is complete (write to a temporary name,
fsync, rename), and an old file is removed only after its successor is in place, so a crash or
a full disk during a save leaves the previous checkpoints as they were.
"""

import os
import re
import tempfile
from pathlib import Path

import torch

EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt")
FORMAT_VERSION = 1


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj, path: Path) -> None:
    """torch.save `obj` to `path` so that `path` is either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, RuntimeError) and isinstance(err.__context__, OSError):
            # torch.save turns a failed write (disk full, quota, file size limit) into an
            # opaque RuntimeError ("unexpected pos ..."); raise the OSError it swallowed
            cause = err.__context__
            raise OSError(cause.errno, cause.strerror, str(path)) from err
        raise
    _fsync_dir(path.parent)


def _atomic_link(src: Path, dst: Path) -> None:
    """Make `dst` name the same file as `src`, replacing `dst` in one rename."""
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # file systems without hard links: copy instead
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load(path: str | Path) -> dict:
    """Load a checkpoint of this repo on the CPU; never runs code from the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{str(path)!r} is not a readable checkpoint ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(
            f"{str(path)!r} is not a checkpoint of this repo (no 'model' and 'config' entries); "
            "for plain weights use model.weights=... instead of resume=..."
        )
    return ckpt


def epoch_files(folder: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of the epoch checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := EPOCH_FILE.fullmatch(p.name))]
    return sorted(found)


def find_latest(folder: Path) -> Path | None:
    """The newest checkpoint in `folder` that loads, or None when there is none."""
    candidates = [folder / "last.pt"] + [p for _, p in reversed(epoch_files(folder))]
    for path in candidates:
        if not path.is_file():
            continue
        try:
            load(path)
        except ValueError:
            continue  # a damaged file: fall back to the one before
        return path
    return None


class CheckpointSaver:
    """Saves the training state each epoch and keeps `last`, `best` and the last `keep_last`."""

    def __init__(self, folder: Path, keep_last: int = 3, metadata: dict | None = None):
        if keep_last < 0:
            raise ValueError(f"checkpoint.keep_last={keep_last} must be 0 or more")
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.metadata = metadata or {}  # config, class names, W&B run id: stored in every file

    def save(self, state: dict, epoch: int, is_best: bool) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"epoch_{epoch:04d}.pt"
        atomic_save({**state, **self.metadata, "format_version": FORMAT_VERSION}, path)
        _atomic_link(path, self.folder / "last.pt")
        if is_best:
            _atomic_link(path, self.folder / "best.pt")
        _fsync_dir(self.folder)
        # prune only now that the new file and its links are in place
        for _, old in epoch_files(self.folder)[: -self.keep_last or None]:
            if old != path or self.keep_last == 0:
                old.unlink(missing_ok=True)
        return path

    @property
    def best(self) -> Path:
        return self.folder / "best.pt"
