"""analysis/browse_dataset.py draws what the model gets; analysis/verify_dataset.py finds the
image files that do not decode. Both on real files in a tiny image folder."""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from subprocess import PIPE

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from torchvision import transforms as T

from analysis.browse_dataset import DPI, as_loaded, browse, figure_size, samples, to_display
from analysis.verify_dataset import verify
from data.images import load_image
from data.splits import LabelledSubset
from engine.build import build_data
from tests.helpers import REPO, clean_env

FOLDER = ("data=imagefolder", "data.transform.input_size=32", "data.num_workers=0")


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def imagefolder(root: Path, *overrides: str):
    return composed(*FOLDER, f"data.dataset.root={root}", "data.batch_size=2", *overrides)


def picture(width: int, height: int, seed: int) -> np.ndarray:
    """A colour gradient with noise: content that survives JPEG and shows in a thumbnail."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / width, 255 * y / height, np.full_like(x, 40 * seed % 256)], -1)
    return np.clip(rgb + rng.normal(0, 20, rgb.shape), 0, 255).astype(np.uint8)


def write_images(folder: Path, seed: int = 0) -> list[Path]:
    """Four real images of different formats, modes and sizes in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "photo.jpg": Image.fromarray(picture(48, 32, seed)),
        "plain.png": Image.fromarray(picture(40, 40, seed + 1)),
        "gray.png": Image.fromarray(picture(36, 30, seed + 2)).convert("L"),
        "alpha.png": Image.fromarray(picture(30, 44, seed + 3)).convert("RGBA"),
    }
    for name, image in files.items():
        image.save(folder / name)
    return [folder / name for name in files]


@pytest.fixture
def pets(tmp_path) -> Path:
    """<root>/<class>/<image>: two classes of four good images each."""
    root = tmp_path / "pets"
    for k, name in enumerate(("cat", "dog")):
        write_images(root / name, seed=10 * k)
    return root


def broken_folder(root: Path) -> tuple[set[str], set[str]]:
    """Split folders with one unreadable file in each class folder: (bad paths, good paths)."""
    good = set()
    for split in ("train", "val"):
        for k, name in enumerate(("cat", "dog")):
            good |= {str(p) for p in write_images(root / split / name, seed=k)}
    whole, truncated = root / "train" / "cat" / "big.jpg", root / "train" / "cat" / "cut.jpg"
    Image.fromarray(picture(256, 192, 7)).save(whole, quality=95)
    data = whole.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # a download cut off half way
    good.add(str(whole))
    empty = root / "train" / "dog" / "empty.png"
    empty.touch()
    text = root / "val" / "cat" / "notes.jpg"
    text.write_text("not an image\n")
    dangling = root / "val" / "dog" / "moved.png"
    os.symlink(root / "nowhere" / "moved.png", dangling)
    return {str(truncated), str(empty), str(text), str(dangling)}, good


def assert_picture(path: Path, n: int) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = figure_size(n)
        assert image.size == (round(width * DPI), round(height * DPI))
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 20  # pictures and text, not a blank page


# ---------------------------------------------------------------- browse


def test_browse_imagefolder_pairs_the_file_with_the_model_input(pets, tmp_path):
    cfg = imagefolder(pets)
    splits, _, _ = build_data(cfg)
    before = torch.get_rng_state()
    rows = samples(splits.train, n=5, seed=3)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random state is kept
    assert len(rows) == 5 and [r["label"] for r in rows] == sorted(r["label"] for r in rows)
    for row in rows:
        path, label = splits.train.samples[row["index"]]
        with Image.open(path) as image:
            assert row["loaded"].size == image.size  # the file itself, not a crop of it
        assert row["loaded"].mode == "RGB" and row["label"] == label
        assert row["model_input"].shape == (3, 32, 32)
    # the same seed draws the same samples and the same augmentations
    again = samples(splits.train, n=5, seed=3)
    assert all(
        torch.equal(a["model_input"], b["model_input"]) for a, b in zip(rows, again, strict=True)
    )

    out = browse(cfg, n=5, out=tmp_path / "figures" / "pets", seed=3)
    assert out == tmp_path / "figures" / "pets.png"
    assert_picture(out, 5)
    assert_picture(browse(cfg, n=2, split="val", out=tmp_path / "val.png"), 2)
    with pytest.raises(ValueError, match="split='test'"):
        browse(cfg, split="test")


def test_browse_reads_through_kfold_subsets(pets):
    splits, _, _ = build_data(imagefolder(pets, "data.fold=1", "data.num_folds=2"))
    assert isinstance(splits.val, LabelledSubset)
    for i in range(len(splits.val)):
        path = splits.val.dataset.samples[splits.val.indices[i]][0]
        assert as_loaded(splits.val, i).tobytes() == load_image(path).tobytes()


def test_digits_are_shown_as_stored():
    splits, _, _ = build_data(composed("data.dataset.image_size=8"))
    assert torch.equal(as_loaded(splits.train, 7), splits.train.tensors[0][7])
    shown = to_display(as_loaded(splits.train, 7))
    assert shown.shape == (8, 8) and shown.min() == 0.0 and shown.max() == 1.0  # stretched


def test_display_undoes_the_pipelines_normalize():
    image = torch.rand(3, 5, 7)
    normalize = T.Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    shown = to_display(normalize(image), normalize)
    assert shown.shape == (5, 7, 3)
    np.testing.assert_allclose(shown, image.permute(1, 2, 0).numpy(), atol=1e-6)


# ---------------------------------------------------------------- verify


def test_verify_lists_each_unreadable_file_once(tmp_path):
    bad, good = broken_folder(tmp_path / "data")
    report = verify(imagefolder(tmp_path / "data"), workers=3, out=tmp_path / "r" / "bad.txt")
    assert report.scanned == len(bad) + len(good)
    assert not report.ok and {path for path, _ in report.bad} == bad
    lines = (tmp_path / "r" / "bad.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == sorted(bad)
    assert all(line.split("\t")[1] for line in lines)  # each with its error

    clean = tmp_path / "clean"
    good_files = write_images(clean / "a") + write_images(clean / "b", seed=5)
    report = verify(imagefolder(clean), workers=2, out=tmp_path / "clean.txt")
    assert report.ok and report.scanned == len(good_files)
    assert (tmp_path / "clean.txt").read_text() == ""


def test_verify_has_no_files_to_check_in_memory():
    report = verify(composed("data.dataset.image_size=8"), out=os.devnull)
    assert report.ok and report.scanned == 0 and report.in_memory == ["TensorDataset"]


# ---------------------------------------------------------------- command lines


@dataclass
class Command:
    cwd: Path  # an empty folder of its own
    proc: subprocess.Popen
    files: tuple = ()  # (bad paths, good paths) of the image folder it reads

    def finish(self) -> tuple[int, str, str]:
        stdout, stderr = self.proc.communicate(timeout=180)
        return self.proc.returncode, stdout, stderr


@pytest.fixture(scope="module")
def command_lines(tmp_path_factory) -> dict[str, Command]:
    """The tools run as a user types them, started together: each spends ~10 s of CPU
    importing torch, timm and Hydra, and these overlap on two cores."""

    def start(name: str, tool: str, *overrides: str, files=()) -> Command:
        cwd = tmp_path_factory.mktemp(name)
        args = [sys.executable, str(REPO / "analysis" / tool), *overrides]
        proc = subprocess.Popen(args, cwd=cwd, env=clean_env(), stdout=PIPE, stderr=PIPE, text=True)
        return Command(cwd, proc, files)

    data = tmp_path_factory.mktemp("data")
    broken = broken_folder(data / "broken")
    folder = (*FOLDER, "data.batch_size=2", "+workers=2")
    commands = {
        "browse": start("browse", "browse_dataset.py", "+n=6", "+out=d.png"),  # data=digits
        "broken": start(
            "broken",
            "verify_dataset.py",
            *folder,
            f"data.dataset.root={data / 'broken'}",
            files=broken,
        ),
    }
    yield commands
    for command in commands.values():
        command.proc.kill()  # a no-op for those that finished
        command.proc.wait()


@pytest.mark.slow  # a real training subprocess: keeps the default suite under 10 minutes
def test_browse_cli_on_the_default_digits(command_lines):
    command = command_lines["browse"]
    status, stdout, stderr = command.finish()
    assert status == 0, stderr[-3000:]
    assert "wrote d.png" in stdout
    assert [p.name for p in command.cwd.iterdir()] == ["d.png"]  # and no run folder
    assert_picture(command.cwd / "d.png", 6)


def test_verify_cli_report_and_exit_status(command_lines):
    # (a clean folder's report and exit status 0: test_verify_lists_each_unreadable_file_once)
    command, expected_status = command_lines["broken"], 1
    bad, good = command.files
    status, stdout, stderr = command.finish()
    assert status == expected_status, stderr[-3000:]
    counts = f"scanned {len(bad) + len(good)} image files (train and val), {len(bad)} unreadable"
    assert f"{counts}; report: outputs/analysis/verify_report.txt" in stdout
    listed = (command.cwd / "outputs" / "analysis" / "verify_report.txt").read_text()
    assert sorted(line.split("\t")[0] for line in listed.splitlines()) == sorted(bad)
    # the report under the git-ignored outputs/, and no run folder
    assert [str(p.relative_to(command.cwd)) for p in command.cwd.rglob("*")] == [
        "outputs",
        "outputs/analysis",
        "outputs/analysis/verify_report.txt",
    ]


def test_browse_marks_an_unreadable_image_and_names_it(tmp_path, caplog):
    # train skips an unreadable file (the next readable image takes its place): the grid showed
    # that substitute as if it were the file
    root = tmp_path / "pets"
    for k, name in enumerate(("cat", "dog")):
        write_images(root / name, seed=10 * k)
    bad = root / "cat" / "broken.png"
    bad.write_bytes(b"not a png")
    cfg = imagefolder(root)
    splits, _, _ = build_data(cfg)
    with caplog.at_level("WARNING", logger="analysis.browse_dataset"):
        rows = samples(splits.train, n=len(splits.train), seed=0)
    marked = [r["unreadable"] for r in rows if r["unreadable"]]
    assert marked == [str(bad)]
    assert [r for r in caplog.records if str(bad) in r.getMessage()]
    assert "unreadable" in caplog.text and "next readable image" in caplog.text

    from analysis.browse_dataset import grid

    fig = grid(rows, splits.classes, "title", "train transform", None)
    red = [t.get_text() for t in fig.texts if t.get_color() == "red"]
    assert red == ["unreadable: broken.png"]
    framed = [ax for ax in fig.axes if ax.spines["top"].get_edgecolor() == (1.0, 0.0, 0.0, 1.0)]
    assert len(framed) == 2  # both pictures of its cell
    assert "next readable image" in [t.get_text().split("\n")[0] for t in fig.texts]
