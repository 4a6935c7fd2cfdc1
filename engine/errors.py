"""How a command that fails ends: the message alone for a mistake the user can fix, a traceback
for a bug, and no run folder left behind by a run that never started.

    is_user_error(err)          the user can act on err's message alone (see below)
    JobFailed                   such an error of a multirun job, as Hydra prints it compactly
    discard_unused_folder(d)    remove a run folder that holds only Hydra's own files

A user error is one of this repo's own messages: a ValueError, OSError (FileNotFoundError, ...),
RuntimeError, ImportError or FloatingPointError raised by a `raise` statement in models/, data/,
engine/ or analysis/. House style makes each of those name the bad value and its fix (a bad
value, a missing dataset, a refused checkpoint, a port in use). Anything else is a bug, or a
library's error that our code did not expect: its traceback is what a report needs.
"""

import linecache
import shutil
from pathlib import Path

from hydra.errors import CompactHydraException

REPO = Path(__file__).resolve().parent.parent
OWN_CODE = ("models", "data", "engine", "analysis")
MESSAGE_TYPES = (ValueError, OSError, RuntimeError, ImportError, FloatingPointError)
# what Hydra writes into a run folder before the task starts: <folder>/.hydra/*.yaml, <job>.log
HYDRA_FILES = {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"}


class JobFailed(CompactHydraException):
    """A multirun job's user error: at the end of the sweep Hydra prints this message alone
    (it prints any other exception with its traceback)."""


def is_user_error(err: BaseException) -> bool:
    """Whether err is a message this repo raised on purpose for the user (module docstring)."""
    if not isinstance(err, MESSAGE_TYPES):
        return False
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:  # the innermost frame: where the exception was raised
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    if not path.is_relative_to(REPO) or path.relative_to(REPO).parts[0] not in OWN_CODE:
        return False
    # `raise ValueError(...)` on that line, not `int(text)` or `a, b = row` failing there
    line = linecache.getline(str(path), tb.tb_lineno).strip()
    return line.startswith("raise ")


def holds_only_hydra_files(folder: Path, job_name: str) -> bool:
    """Whether `folder` holds nothing but what Hydra writes before a job starts."""
    expected = {*HYDRA_FILES, f"{job_name}.log", ".hydra"}
    found = {p.relative_to(folder).as_posix() for p in folder.rglob("*")}
    return found <= expected


def discard_unused_folder(folder: Path, job_name: str) -> bool:
    """Remove `folder` (and its parent, outputs/<date>, if that is left empty) when it holds
    only Hydra's own files: a command that failed before it wrote anything leaves no folder
    for `resume=auto`, the "newest run" lookups or a person to trip over. Never the current
    folder or one above it. Returns whether it removed the folder."""
    folder = folder.resolve()
    cwd = Path.cwd().resolve()
    if not folder.is_dir() or folder == cwd or folder in cwd.parents:
        return False
    if not holds_only_hydra_files(folder, job_name):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    parent = folder.parent
    if parent != cwd and parent not in cwd.parents and not any(parent.iterdir()):
        parent.rmdir()
    return True
