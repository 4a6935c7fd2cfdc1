"""The one way this repo writes a file: atomically, under its final name only once complete.

`replacing(path)` hands out a temporary name beside `path` (same folder, so the rename cannot
cross file systems), and when the block ends without an error it flushes the data to disk,
renames the file onto `path` in one step and syncs the folder, so that after a crash `path` is
either the old file or the complete new one. On any error (a full disk, a kill signal turned
into an exception, a bug in the writer) the temporary file is removed and `path` is untouched.
A process killed outright leaves a hidden `.<name>.<hex>.tmp`, which
engine.checkpoint.remove_temporary_files clears at the next start.

The file gets 0666 less the umask, as open() gives, whatever the writer did (mkstemp's and
some libraries' 0600 would hide run files from a group sharing a results folder).
"""

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def fsync(path: Path) -> None:
    """Make `path` durable: a file's bytes, or a folder's entries (its renames and links)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make the renames and links in `folder` durable (the folder's entries live in the folder)."""
    fsync(folder)


def file_mode() -> int:
    """The permissions open() gives a new file: 0666 less the process umask."""
    try:  # Linux: read it; setting it to read it back races other threads' new files
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


def _temporary_name(path: Path, create: bool) -> Path:
    """A new hidden name beside `path`; `create`: made as an empty file (mode 0666 & ~umask)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        if not create:
            if not tmp.exists():
                return tmp
            continue
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue  # another writer's name: draw again


@contextlib.contextmanager
def replacing(path: str | Path, create: bool = True, sync_dir: bool = True) -> Iterator[Path]:
    """Yield a temporary name to write `path`'s new content to; on success it becomes `path`.

    create=False: the name is free (for os.link, or a writer that insists on making the file).
    sync_dir=False: the caller syncs the folder itself, after several renames into it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path, create)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], **kwargs) -> Path:
    """Call `write(f)` on a binary file that becomes `path` once `write` returns."""
    path = Path(path)
    with replacing(path, **kwargs) as tmp, open(tmp, "wb") as f:
        write(f)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))
