"""Checkpoints: atomic writes, checksums, `last` / `best` / the last N, weights_only loading.

Layout of <run folder>/checkpoints/:
    epoch_0007.pt               after 7 epochs; the newest `keep_last` are kept
    epoch_0007_batch_000400.pt  mid-epoch (trainer.checkpoint_every_updates, or a stop signal):
                                after 7 epochs and 400 batches of the 8th; removed once a newer
                                epoch file is complete
    last.pt                     hard link to the newest of them
    best.pt                     hard link to the epoch file with the best validation metric;
                                with best_weights_only, a file of its own without the optimizer,
                                scheduler, grad-scaler and RNG states (weights, EMA, metadata)

Every file appears under its final name only once it is complete (write to a temporary name,
fsync, rename), and an old file is removed only after its successor is in place, so a crash or
a full disk during a save leaves the previous checkpoints as they were. Temporary files left by
a killed process are removed when the next run starts. Each file carries a SHA-256 of its
content: a truncated or bit-flipped file is reported and skipped by `find_latest`.
"""

import hashlib
import logging
import os
import re
from pathlib import Path

import torch

from engine import files

log = logging.getLogger(__name__)

CHECKPOINT_FILE = re.compile(r"epoch_(\d+)(?:_batch_(\d+))?\.pt")
FORMAT_VERSION = 2  # 2: a content checksum, mid-epoch files


def atomic_save(obj, path: Path) -> None:
    """torch.save `obj` to `path` so that `path` is either the old file or the complete new one."""
    path = Path(path)
    try:
        files.atomic_write(path, lambda f: torch.save(obj, f))
    except RuntimeError as err:
        if isinstance(err.__context__, OSError):
            # torch.save turns a failed write (disk full, quota, file size limit) into an
            # opaque RuntimeError ("unexpected pos ..."); raise the OSError it swallowed
            cause = err.__context__
            raise OSError(cause.errno, cause.strerror, str(path)) from err
        raise


def _atomic_link(src: Path, dst: Path) -> None:
    """Make `dst` name the same file as `src`, replacing `dst` in one rename."""
    with files.replacing(dst, create=False, sync_dir=False) as tmp:  # the saver syncs the folder
        try:
            os.link(src, tmp)
        except OSError:  # file systems without hard links: copy instead
            import shutil

            shutil.copyfile(src, tmp)


def content_digest(obj) -> str:
    """SHA-256 of a checkpoint's content: every tensor's dtype, shape and bytes, every value.

    Computed over the loaded objects, not the file, so it checks what a load hands back; a
    flipped bit in a tensor or in the pickled values changes it.
    """
    digest = hashlib.sha256()

    def walk(value) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            digest.update(f"D{len(value)}".encode())
            for key in sorted(value, key=repr):
                digest.update(repr(key).encode())
                walk(value[key])
        elif isinstance(value, list | tuple):
            digest.update(f"L{len(value)}".encode())
            for item in value:
                walk(item)
        else:
            digest.update(f"V{value!r}".encode())

    walk(obj)
    return digest.hexdigest()


def non_finite_entries(state: dict, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in `state` that hold a NaN or an infinity."""
    found = []
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                found.append(name)
        elif isinstance(value, dict):
            found += non_finite_entries(value, f"{name}.")
    return found


def load(path: str | Path) -> dict:
    """Load a checkpoint of this repo on the CPU; never runs code from the file.

    A file whose content does not match its stored checksum raises ValueError (damaged).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        code = _pickled_code(path)
        if code:
            raise ValueError(
                f"{str(path)!r} holds pickled Python objects besides tensors ({', '.join(code)}); "
                "refused: loading it could run code. Checkpoints of this repo hold tensors and "
                "plain values only"
            ) from err
        raise ValueError(
            f"{str(path)!r} is not a readable checkpoint ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(
            f"{str(path)!r} is not a checkpoint of this repo (no 'model' and 'config' entries); "
            "for plain weights use model.weights=... instead of resume=..."
        )
    return verify(ckpt, path)


def verify(ckpt: dict, path: str | Path) -> dict:
    """`ckpt` without its checksum entry, if its content matches it; else a ValueError (damaged).

    For every reader of this repo's checkpoints (load, model.weights=<checkpoint>): one check.
    """
    stored = ckpt.pop("checksum", None)
    if stored is not None and stored != content_digest(ckpt):
        raise ValueError(
            f"{str(path)!r} is damaged: its content does not match the checksum saved with it "
            "(a bit flipped on disk or in transfer); use an earlier checkpoint of the run "
            "(resume from it) or copy the file again"
        )
    return ckpt


def set_temperature(path: str | Path, temperature: float) -> None:
    """Store task=calibrate's temperature in checkpoint `path` (rewritten atomically, checksum
    updated); readers of files without one use 1 (engine.predict.Classifier)."""
    ckpt = load(path)
    ckpt["temperature"] = float(temperature)
    atomic_save({**ckpt, "checksum": content_digest(ckpt)}, Path(path))


def checkpoint_name(epoch: int, batches: int | None = None) -> str:
    """epoch_0007.pt after 7 epochs; epoch_0007_batch_000400.pt 400 batches into the 8th."""
    return (
        f"epoch_{epoch:04d}.pt" if batches is None else f"epoch_{epoch:04d}_batch_{batches:06d}.pt"
    )


def checkpoint_files(folder: Path) -> list[tuple[tuple[int, int], Path]]:
    """((epochs done, batches into the next), path) of the checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if m := CHECKPOINT_FILE.fullmatch(path.name):
            found.append(((int(m.group(1)), int(m.group(2) or -1)), path))
    return sorted(found)


def _pickled_code(path: Path) -> list[str]:
    """The Python names (beyond tensors) a torch.save file's pickle calls, read without running it."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip checkpoint (truncated, text): no names to report
        return []


def epoch_files(folder: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of the end-of-epoch checkpoints in `folder`, oldest first."""
    return [(epoch, p) for (epoch, batches), p in checkpoint_files(folder) if batches < 0]


class NoValidCheckpoint(ValueError):
    """A folder holds checkpoints and none of them loads: each was refused (the message says why)."""


def find_latest(folder: Path) -> Path | None:
    """The newest checkpoint in `folder` that loads and matches its checksum; None if it holds none.

    A damaged file is reported (a warning naming it and why) and the one before it is tried;
    when every one is refused, NoValidCheckpoint names them all: silently starting over would
    throw the run away.
    """
    candidates = [folder / "last.pt"] + [p for _, p in reversed(checkpoint_files(folder))]
    refused = []
    for path in candidates:
        if not path.is_file():
            continue
        try:
            load(path)
        except ValueError as err:
            log.warning("skipping checkpoint %s: %s", path, err)
            refused.append(f"{path.name}: {err}")
            continue  # a damaged file: fall back to the one before
        return path
    if refused:
        raise NoValidCheckpoint(
            f"every checkpoint in {folder} was refused:\n  " + "\n  ".join(refused)
        )
    return None


def remove_temporary_files(folder: Path) -> list[Path]:
    """Delete the partial files that a process killed during a save left in `folder`."""
    if not folder.is_dir():
        return []
    leftovers = [p for p in folder.iterdir() if p.name.startswith(".") and p.suffix == ".tmp"]
    for path in leftovers:
        path.unlink(missing_ok=True)
        log.warning("removed %s, left by a save that did not finish", path)
    return leftovers


# checkpoint.best_metric: what evaluate() reports, under val/ (the model's or its EMA's, whichever
# is better); checkpoint.best_mode: whether higher (max) or lower (min) is better
# multi-label data (engine/multilabel.py) reports these instead of top-1 and top-5
MULTILABEL_METRICS = tuple(f"val/{k}" for k in ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1"))
BEST_METRICS = (
    "val/acc1",
    "val/acc5",
    "val/loss",
    "val/macro_f1",
    "val/balanced_acc",
    *MULTILABEL_METRICS,
)
BEST_MODES = ("max", "min")


def check_best(best_metric: str, best_mode: str) -> None:
    if best_metric not in BEST_METRICS:
        raise ValueError(
            f"checkpoint.best_metric={best_metric!r} must be one of {', '.join(BEST_METRICS)}"
        )
    if best_mode not in BEST_MODES:
        raise ValueError(
            f"checkpoint.best_mode={best_mode!r} must be max or min (val/loss: min, accuracy: max)"
        )


class CheckpointSaver:
    """Saves the training state and keeps `last`, `best` and the last `keep_last` epochs.

    keep_last=0: last.pt and best.pt alone. best_weights_only: best.pt holds what evaluation,
    prediction, export and serving read (weights, EMA weights, epoch, metrics and the metadata)
    but no optimizer, scheduler, grad-scaler or RNG state; resume reads last.pt, which keeps them.
    With AdamW that makes best.pt a third of last.pt's size: the optimizer's two moments per
    weight are the other two thirds.
    Creating one removes the temporary files of an interrupted save in its folder.
    """

    # the entries of a training state that only resuming needs
    TRAINING_ONLY = (
        "optimizer",
        "scheduler",
        "scaler",
        "rng",
        "rng_ranks",
        "position",
        "position_ranks",
    )

    def __init__(
        self,
        folder: Path,
        keep_last: int = 3,
        best_weights_only: bool = False,
        best_metric: str = "val/acc1",
        best_mode: str = "max",
        metadata: dict | None = None,
    ):
        if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 0:
            raise ValueError(f"checkpoint.keep_last={keep_last!r} must be an integer, 0 or more")
        if not isinstance(best_weights_only, bool):
            raise ValueError(
                f"checkpoint.best_weights_only={best_weights_only!r} must be true or false"
            )
        check_best(best_metric, best_mode)
        self.folder = Path(folder)
        self.keep_last = keep_last
        # which epoch best.pt holds: the one with the highest (max) or lowest (min) best_metric
        self.best_metric, self.best_mode = best_metric, best_mode
        self.best_weights_only = best_weights_only
        self.metadata = metadata or {}  # config, class names, W&B run id: stored in every file
        remove_temporary_files(self.folder)

    def save(self, state: dict, epoch: int, is_best: bool, batches: int | None = None) -> Path:
        """Write `state` as the checkpoint after `epoch` epochs (and `batches` more batches).

        Refuses (FloatingPointError) a state whose tensors hold NaN or infinity: a diverged
        model never replaces the last good checkpoint.
        """
        bad = non_finite_entries(state)
        if bad:
            raise FloatingPointError(
                f"not saving {checkpoint_name(epoch, batches)}: {', '.join(bad[:5])} hold NaN or "
                "infinite values; the previous checkpoints are kept"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / checkpoint_name(epoch, batches)
        self._write(state, path)
        _atomic_link(path, self.folder / "last.pt")
        if is_best and self.best_weights_only:
            weights = {k: v for k, v in state.items() if k not in self.TRAINING_ONLY}
            self._write(weights, self.best)
        elif is_best:
            _atomic_link(path, self.best)
        files.fsync_dir(self.folder)
        self._prune(path)
        return path

    def _write(self, state: dict, path: Path) -> None:
        content = {**state, **self.metadata, "format_version": FORMAT_VERSION}
        atomic_save({**content, "checksum": content_digest(content)}, path)

    def _prune(self, newest: Path) -> None:
        """Remove old files, only now that the new file and its links are in place."""
        files = checkpoint_files(self.folder)
        epochs = [p for (_, batches), p in files if batches < 0]
        latest_epoch = max((key for key, p in files if key[1] < 0), default=(-1, -1))
        mid = [p for key, p in files if key[1] >= 0]
        newer_mid = [p for key, p in files if key[1] >= 0 and key > latest_epoch]
        old = epochs[: -self.keep_last or None] if self.keep_last else epochs
        # mid-epoch files: those older than the newest epoch file, and all but the newest
        # keep_last (at least one) of the rest
        old += [p for p in mid if p not in newer_mid] + newer_mid[: -max(self.keep_last, 1)]
        if self.keep_last == 0:
            old = [p for _, p in files]  # last.pt and best.pt hold what is needed
        for path in old:
            if path != newest or self.keep_last == 0:
                path.unlink(missing_ok=True)

    @property
    def best(self) -> Path:
        return self.folder / "best.pt"


class NullSaver:
    """CheckpointSaver's calls, writing nothing: what ranks other than 0 save with (rank 0 writes
    the checkpoints), and tools (the benchmark) that keep no checkpoints."""

    def __init__(self, folder: Path, best_metric: str = "val/acc1", best_mode: str = "max"):
        check_best(best_metric, best_mode)
        self.folder = Path(folder)
        self.best_metric, self.best_mode = best_metric, best_mode  # every process chooses best

    def save(self, state: dict, epoch: int, is_best: bool, batches: int | None = None) -> Path:
        return self.folder / checkpoint_name(epoch, batches)

    @property
    def best(self) -> Path:
        return self.folder / "best.pt"
