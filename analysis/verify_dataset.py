"""Decode every image file of a dataset config and list the ones that do not load.

python analysis/verify_dataset.py data=imagefolder data.dataset.root=/data/pets
python analysis/verify_dataset.py data=imagenet +workers=32 +out=imagenet_bad.txt

The files are the (path, label) samples of the train and val datasets that engine/build.py's
build_splits makes (imagefolder, imagenet, annfile: anything with `.samples`), so the list is the
one training reads. Each is read with data.images.load_image, the dataset's own reader (open,
full decode, EXIF turn, RGB), on `+workers` threads (all CPUs; Pillow decodes without the GIL,
and more threads than CPUs help on network file systems). "Unreadable" is data.images.read_error:
exactly the files that data.dataset.bad_images skips (training) or fails on. The report, `+out`
(outputs/analysis/verify_report.txt, git-ignored), has one `<path><TAB><error>` line per
unreadable file, sorted by path (empty when all load): `cut -f1 <report>` lists them. Exit status 1 when any file is
unreadable, 0 otherwise. Datasets held in memory (digits, mnist5k, CIFAR, MNIST) have no image
files; build_splits has already read them, so there is nothing left to check (exit status 0).
"""

import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from omegaconf import DictConfig
from torch.utils.data import Dataset, Subset

from analysis.cli import TOOL_OUT, no_run_folder
from data.images import read_error

BATCH = 64  # files per task: progress moves in these steps, and ImageNet makes 20,000 tasks


@dataclass
class VerifyReport:
    scanned: int  # distinct image files decoded
    bad: list[tuple[str, str]]  # (path, error), sorted by path
    path: Path  # the report file
    in_memory: list[str] = field(default_factory=list)  # datasets without files, by class name

    @property
    def ok(self) -> bool:
        return not self.bad


def image_files(datasets: Sequence[Dataset]) -> tuple[list[str], list[str]]:
    """(distinct file paths in first-seen order, class names of the datasets without files).

    A dataset has files when it, or the dataset under its Subset wrapping (k-fold), lists
    (path, label) `.samples`; a Subset's whole underlying dataset is taken.
    """
    paths: dict[str, None] = {}  # an ordered set
    in_memory = []
    for dataset in datasets:
        while isinstance(dataset, Subset):
            dataset = dataset.dataset
        samples = getattr(dataset, "samples", None)
        if samples is None:
            in_memory.append(type(dataset).__name__)
            continue
        paths.update((str(path), None) for path, _ in samples)
    return list(paths), sorted(set(in_memory))


def _check_batch(paths: list[str]) -> list[tuple[str, str]]:
    return [(p, error) for p in paths if (error := read_error(p)) is not None]


def scan(paths: Sequence[str], workers: int | None = None, progress: bool = False):
    """(path, error) of every file of `paths` that does not load, sorted by path; decoded on
    `workers` threads (None: the CPUs this process may use)."""
    from rich.progress import Progress

    workers = workers or len(os.sched_getaffinity(0))
    if workers < 1:
        raise ValueError(f"workers={workers} must be at least 1")
    batches = [list(paths[i : i + BATCH]) for i in range(0, len(paths), BATCH)]
    bad = []
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        Progress(disable=not progress, transient=True) as bar,
    ):
        task = bar.add_task(f"decoding on {workers} threads", total=len(paths))
        for batch, found in zip(batches, pool.map(_check_batch, batches), strict=True):
            bad += found
            bar.advance(task, len(batch))
    return sorted(bad)


def verify(
    cfg: DictConfig, workers: int | None = None, out=None, progress: bool = False
) -> VerifyReport:
    """Decode every image file of cfg's train and val datasets; write the report file `out`
    (one `<path><TAB><error>` line per unreadable file; None: outputs/analysis/
    verify_report.txt) and return the counts."""
    from engine.build import build_splits

    splits = build_splits(cfg)
    datasets = [d for d in (splits.train, splits.val, splits.train_eval) if d is not None]
    paths, in_memory = image_files(datasets)
    bad = scan(paths, workers, progress) if paths else []
    out = Path(out) if out is not None else TOOL_OUT / "verify_report.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    # always rewritten, so a report left from an earlier scan never passes for this one
    out.write_text("".join(f"{path}\t{error}\n" for path, error in bad))
    return VerifyReport(scanned=len(paths), bad=bad, path=out, in_memory=in_memory)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    report = verify(
        cfg,
        workers=cfg.get("workers"),
        out=cfg.get("out"),
        progress=sys.stdout.isatty(),
    )
    name = str(cfg.data.dataset._target_).rsplit(".", 1)[-1]
    if not report.scanned:
        print(
            f"{name}: the images are held in memory ({', '.join(report.in_memory)}), not "
            "read from image files; the dataset builder loaded them all, so there is nothing to verify"
        )
        sys.exit(0)
    for path, error in report.bad[:10]:
        print(f"unreadable: {path}: {error}")
    if len(report.bad) > 10:
        print(f"... and {len(report.bad) - 10} more")
    print(
        f"{name}: scanned {report.scanned:,} image files (train and val), "
        f"{len(report.bad):,} unreadable; report: {report.path}"
    )
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    no_run_folder()
    main()
