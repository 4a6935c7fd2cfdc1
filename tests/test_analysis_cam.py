"""analysis/cam.py: CAMs point at what decides the class, and the tool works on real runs."""

import json
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import TensorDataset

from analysis.cam import (
    DPI,
    METHODS,
    PANEL_IN,
    TITLE_IN,
    cam_run,
    compute_cam,
    layer_table,
    main,
    overlay,
    target_layer,
    validation_samples,
    validation_split,
)
from data.splits import Splits
from data.transforms import small_image_preprocess
from engine.checkpoint import atomic_save
from engine.predict import load_trained
from models.timm_models import create
from tests.helpers import REPO, clean_env

SIZE, SQUARE = 32, 8  # px
CLASSES = ["noise", "square"]
MEAN, STD = 0.5, 0.25  # of the 0..1 pixels; the run's preprocessing normalises with these


def square_pixels(n: int, seed: int, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels (n, 1, size, size) in 0..1, labels): dim noise; class 1 adds a bright square
    anywhere, so the model must find it to tell the classes apart."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    pixels = (0.25 + 0.1 * torch.randn(n, 1, size, size, generator=g)).clamp(0, 1)
    corners = torch.randint(1, size - SQUARE, (n, 2), generator=g)
    for i in (labels == 1).nonzero().flatten().tolist():
        top, left = corners[i].tolist()
        pixels[i, :, top : top + SQUARE, left : left + SQUARE] = 0.9
    return pixels, labels


@pytest.fixture(autouse=True)
def allow_this_module(monkeypatch):
    """The square run's dataset builder lives here: a module the user allows."""
    monkeypatch.setenv("IMGCLS_EXTRA_TARGETS", __name__)


def squares(image_size: int = SIZE, val_fraction: float = 0.25, split_seed: int = 0) -> Splits:
    """A dataset builder with data.digits.digits' signature, for the test run's config."""
    n = 512
    pixels, labels = square_pixels(n, split_seed, image_size)
    images = (pixels - MEAN) / STD
    cut = int(n * (1 - val_fraction))
    return Splits(
        train=TensorDataset(images[:cut], labels[:cut]),
        val=TensorDataset(images[cut:], labels[cut:]),
        classes=CLASSES,
        in_chans=1,
        preprocess=small_image_preprocess(image_size, (MEAN,), (STD,), "bilinear"),
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Torch on one thread in this module: on a busy 2-core machine two OpenMP threads per
    process are up to 10x slower than one (the training below: 2 s instead of 20)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def square_run(tmp_path_factory):
    """A run folder whose checkpoints/best.pt holds a timm test_resnet that tells squares from
    noise, trained here in a few seconds, with the entries engine.predict.load_trained reads."""
    model_cfg = OmegaConf.load(REPO / "conf" / "model" / "resnet18.yaml")
    model_cfg.name = "test_resnet"  # timm's 0.4 M-parameter ResNet
    config = {
        "model": OmegaConf.to_container(model_cfg),
        "data": {
            "dataset": {"_target_": f"{__name__}.squares", "image_size": SIZE},
            "batch_size": 32,
            "num_workers": 0,
        },
    }
    splits = squares()
    torch.manual_seed(0)
    model = create("test_resnet", num_classes=2, in_chans=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    images, labels = splits.train.tensors
    order = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(40):  # updates of 32 images; validation accuracy reaches 1.0 after ~25
        batch = torch.randint(0, len(images), (32,), generator=order)
        loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    run = tmp_path_factory.mktemp("cam") / "outputs" / "2024-01-01" / "12-00-00-000000"
    state = {
        "model": model.state_dict(),
        "config": config,
        "class_names": CLASSES,
        "in_chans": 1,
        # lists, as engine.build stores it: a checkpoint loads with weights_only=True
        "preprocess": {
            k: list(v) if isinstance(v, tuple) else v for k, v in splits.preprocess.items()
        },
    }
    atomic_save(state, run / "checkpoints" / "best.pt")
    return run


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def expected_size(panels: int) -> tuple[int, int]:
    return round(PANEL_IN * panels * DPI), round((PANEL_IN + TITLE_IN) * DPI)


def test_cam_of_the_square_class_is_on_the_square(square_run):
    trained = load_trained(square_run)
    images, labels, _, _ = validation_samples(validation_split(trained), range(32))
    with torch.no_grad():
        assert (trained.model(images).argmax(-1) == torch.tensor(labels)).all()
    squares_only = images[torch.tensor(labels) == 1]
    inside = (squares_only[:, 0] * STD + MEAN > 0.8).numpy()  # the square's pixels (0.9)
    assert inside.sum(axis=(1, 2)).min() == SQUARE * SQUARE
    # EigenCAM and EigenGradCAM are left out: a principal component's sign is arbitrary, so
    # their map can light up everything but the square
    variants = [(m, {}) for m in ("gradcam", "gradcam++", "xgradcam", "layercam")]
    variants += [("gradcam", {"aug_smooth": True}), ("gradcam", {"eigen_smooth": True})]
    for method, smoothing in variants:
        # layer2: a 4 x 4 map at 32 px (layer3 is 2 x 2, layer4 1 x 1)
        cams, probs = compute_cam(trained.model, squares_only, method, "layer2", **smoothing)
        assert cams.shape == (len(squares_only), SIZE, SIZE)
        assert (probs.argmax(-1) == 1).all()
        ratios = np.array(
            [cam[m].mean() / cam[~m].mean() for cam, m in zip(cams, inside, strict=True)]
        )
        print(method, smoothing, "inside / outside mean CAM:", np.round(ratios, 1))
        # eigen_smooth projects on a principal component too: an image may come out inverted
        most = 0.75 if "eigen_smooth" in smoothing else 0.9
        assert (ratios > 2).mean() >= most and np.median(ratios) > 3, (method, smoothing, ratios)


def stroke_mass(cams: np.ndarray, strokes: np.ndarray) -> np.ndarray:
    """(images, images): [i, j] is the share of map i's mass on the stroke pixels of image j."""
    flat = cams.reshape(len(cams), -1).astype(np.float64)
    flat /= np.maximum(flat.sum(1, keepdims=True), 1e-12)
    return flat @ strokes.reshape(len(strokes), -1).T.astype(np.float64)


@pytest.mark.slow  # the default run (~2 min on 2 cores), which CI's slow stage trains once
def test_default_demo_maps_lie_on_the_strokes(default_run, tmp_path, monkeypatch, capsys):
    """`python analysis/cam.py` after `make run`: ResNet-18's layer2 on the 56 px digits, a
    7 x 7 map whose mass lies on the digit's strokes, drawn with the digit visible under it."""
    monkeypatch.chdir(default_run.parent.parent.parent)  # where run.py ran
    assert main([f"out={tmp_path}"]) == 0
    assert len(list(tmp_path.glob("val_*_gradcam.png"))) == 8
    assert f"wrote 8 CAM figure(s) to {tmp_path}" in capsys.readouterr().out

    trained = load_trained(default_run)
    images, _, _, pictures = validation_samples(validation_split(trained), range(96))
    assert target_layer(trained.model, None, images.shape[-2:])[0] == "layer2"
    (mean,), (std,) = trained.preprocess["mean"], trained.preprocess["std"]
    strokes = (images[:, 0] * std + mean).numpy() > 0.4  # the ink of the 0..1 digits
    area = strokes.mean(axis=(1, 2))  # ~36% of the pixels
    # a flat map, or the old 2 x 2 one at 16 px, puts the strokes' share of area on them (1.0x)
    for method in ("gradcam", "gradcam++", "xgradcam", "layercam"):
        cams, _ = compute_cam(trained.model, images, method)
        own = np.diag(stroke_mass(cams, strokes))
        print(method, "stroke mass / stroke area:", round(own.mean() / area.mean(), 2))
        assert own.mean() > 1.2 * area.mean() and (own > area).mean() > 0.7, method
    # EigenCAM (the activations' principal component) follows this digit's own strokes: more of
    # its mass on them than on another digit's, which a map centred on every image would not do
    # (EigenGradCAM is left out: a component's sign is arbitrary)
    mass = stroke_mass(compute_cam(trained.model, images, "eigencam")[0], strokes)
    other = (mass.sum(1) - np.diag(mass)) / (len(mass) - 1)
    assert (np.diag(mass) > other).mean() > 0.9 and np.diag(mass).mean() > 0.6

    # the overlay keeps the digit readable: under the hottest map the strokes stay brighter
    # than the background by 40% of their contrast, under a cold map the picture is untouched
    shown = pictures[0].astype(np.float32) / 255
    assert np.array_equal(overlay(shown, np.zeros(shown.shape[:2])), shown)
    hot = overlay(shown, np.ones(shown.shape[:2])).mean(-1)
    contrast = shown.mean(-1)[strokes[0]].mean() - shown.mean(-1)[~strokes[0]].mean()
    assert hot[strokes[0]].mean() - hot[~strokes[0]].mean() >= 0.39 * contrast


def test_cli_writes_one_png_per_validation_image(tiny_run, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "analysis" / "cam.py"), f"run={tiny_run}", "n=3", "out=cam"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = sorted((tmp_path / "cam").glob("*.png"))
    assert [p.name for p in pngs] == [f"val_0000{i}_gradcam.png" for i in range(3)]
    assert all(str(p.relative_to(tmp_path)) in proc.stdout for p in pngs)
    for path in pngs:
        picture = png(path)
        assert picture.shape[1::-1] == expected_size(2)
        assert picture.std() > 20 and (picture < 128).mean() > 0.05  # not a blank figure
    assert not (tiny_run / "cam").exists()


def test_no_arguments_newest_run_eight_validation_images(
    tiny_run, square_run, tmp_path, monkeypatch, capsys
):
    # ./outputs/<date>/<time> as run.py leaves them; the newer run is the digits one
    for run, when in (
        (square_run, "2024-01-01/09-00-00-000000"),
        (tiny_run, "2024-03-01/08-00-00-000000"),
    ):
        folder = tmp_path / "outputs" / when / "checkpoints"
        folder.mkdir(parents=True)
        (folder / "best.pt").symlink_to(run / "checkpoints" / "best.pt")
    older, newest = sorted((tmp_path / "outputs").glob("*/*"))
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    pngs = sorted((newest / "cam").glob("*.png"))
    assert [p.name for p in pngs] == [f"val_{i:05d}_gradcam.png" for i in range(8)]
    out = capsys.readouterr().out
    assert f"wrote 8 CAM figure(s) to outputs/{newest.parent.name}/{newest.name}/cam" in out
    assert all(str(p.relative_to(tmp_path)) in out for p in pngs)
    assert not (older / "cam").exists()


def test_no_run_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([]) == 1
    assert "no run with checkpoints/best.pt under 'outputs'" in capsys.readouterr().err


def test_grid_shows_all_methods_of_one_image(square_run, tmp_path):
    (path,) = cam_run(square_run, grid=True, index=2, out=tmp_path)
    assert path == tmp_path / "val_00002_grid.png"
    assert png(path).shape[1::-1] == expected_size(1 + len(METHODS))


def test_image_files_target_by_name_and_ema_refused(square_run, tmp_path, monkeypatch):
    pixels, labels = square_pixels(4, seed=7)
    folder = tmp_path / "photos"
    for i, (x, y) in enumerate(zip(pixels, labels, strict=True)):
        (folder / CLASSES[y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[0].numpy() * 255).round().astype(np.uint8)).save(
            folder / CLASSES[y] / f"{i}.png"
        )
    # an RGB photo of another size: resized and center-cropped like the model's input
    big = np.full((48, 64, 3), 64, np.uint8)
    big[16:32, 24:40] = 230
    Image.fromarray(big).save(folder / "square" / "big.jpg")

    monkeypatch.setattr("analysis.cam.BATCH", 2)  # 5 files in 3 passes
    written = cam_run(square_run / "checkpoints" / "best.pt", images=folder, target="square")
    names = ["noise_0", "noise_2", "square_1", "square_3", "square_big"]
    assert [p.name for p in written] == [f"{n}_gradcam.png" for n in names]
    assert written[0].parent == square_run / "cam"
    for path in written:
        assert png(path).shape[1::-1] == expected_size(2)
    (one,) = cam_run(
        square_run, images=folder / "square" / "big.jpg", method="GradCAM++", out=tmp_path
    )
    assert one.name == "big_gradcampp.png"
    with pytest.raises(ValueError, match="holds no EMA weights"):
        cam_run(square_run, use_ema=True)


def test_ema_weights_and_an_exported_safetensors(tiny_run, square_run, tmp_path):
    from safetensors.torch import save_file

    from engine.predict import SIDECAR_FORMAT

    (path,) = cam_run(tiny_run, n=1, use_ema=True, out=tmp_path)
    assert path == tmp_path / "val_00000_gradcam.png"

    ckpt = torch.load(square_run / "checkpoints" / "best.pt", weights_only=True)
    export = tmp_path / "run" / "export" / "model.safetensors"
    export.parent.mkdir(parents=True)
    save_file(ckpt["model"], export)
    sidecar = {"format": SIDECAR_FORMAT, "weights": "model"}
    sidecar |= {k: ckpt[k] for k in ("config", "class_names", "preprocess", "in_chans")}
    export.with_suffix(".json").write_text(json.dumps(sidecar))
    written = cam_run(export, n=2, index=1, method="eigencam")
    assert [p.name for p in written] == ["val_00001_eigencam.png", "val_00002_eigencam.png"]
    assert written[0].parent == tmp_path / "run" / "cam"  # next to the run, as for checkpoints


def test_errors_name_the_bad_value_and_close_names(square_run, capsys):
    assert main([f"run={square_run}", "layer=layer5"]) == 1
    err = capsys.readouterr().err
    assert "layer='layer5' is not a module of ResNet" in err and "'layer4'" in err
    assert main([f"run={square_run}", "target=squares"]) == 1
    assert "target='squares'" in capsys.readouterr().err
    assert main([f"run={square_run}", "method=gradcamm"]) == 1
    assert "did you mean 'gradcam'" in capsys.readouterr().err
    assert main(["metod=gradcam"]) == 1
    assert "did you mean method=" in capsys.readouterr().err
    assert main([f"run={square_run}", "layer=fc"]) == 1
    assert "layer='fc' outputs (8, 2), not a feature map" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "list_layers=true" in capsys.readouterr().out
    assert main([f"run={square_run}", "aug_smooth=maybe"]) == 1
    assert "aug_smooth is true or false" in capsys.readouterr().err


def test_command_line_smoothing_and_target_index(square_run, tmp_path, capsys):
    args = ["n=2", "target=1", "aug_smooth=true", "eigen_smooth=yes", f"out={tmp_path}"]
    assert main([f"run={square_run}", "method=layercam", *args]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1:] == [str(tmp_path / f"val_0000{i}_layercam.png") for i in (0, 1)]


def test_list_layers_marks_the_default(square_run, capsys):
    assert main([f"run={square_run}", "list_layers=true"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (default,) = [line for line in lines if "<- default" in line]
    # at 32 px layer2 is 4 x 4: the default is the deepest stage of at least 7 x 7 cells
    assert default.split()[:2] == ["layer1", "Sequential"] and "(32, 8, 8)" in default
    assert any(
        line.split()[:2] == ["layer2", "Sequential"] and "(48, 4, 4)" in line for line in lines
    )


@pytest.mark.parametrize(
    "side, layer",
    [(224, "layer4"), (56, "layer2"), (32, "layer1"), (8, "layer1"), (4, "act1")],
)
def test_default_layer_is_the_deepest_with_7_by_7_cells(side, layer):
    # ResNet stages at strides 2 (act1), 4, 8, 16, 32. At 8 px no stage reaches 7 x 7: the
    # deepest of 2 x 2 or more (layer1); at 4 px only the stem's 2 x 2
    model = timm.create_model("resnet18", num_classes=3)
    assert target_layer(model, None, (side, side))[0] == layer


@pytest.mark.parametrize(
    "name, kwargs, layer",
    [
        ("vit_tiny_patch16_224", {}, "blocks.11.norm1"),
        ("vit_tiny_patch16_224", {"reg_tokens": 4}, "blocks.11.norm1"),  # register tokens
        ("deit_tiny_distilled_patch16_224", {}, "blocks.11.norm1"),  # class + distillation
        (
            "beitv2_base_patch16_224",
            {"depth": 2, "embed_dim": 64, "num_heads": 2},
            "blocks.1.norm1",
        ),
        ("swin_tiny_patch4_window7_224", {}, "layers.0"),  # NHWC stages; layers.1 is 4 x 4
    ],
)
def test_transformers_give_maps_of_the_input_size(name, kwargs, layer):
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=32, num_classes=3, **kwargs).eval()
    images = torch.randn(2, 3, 32, 32)
    assert target_layer(model, None, (32, 32))[0] == layer
    for method in ("gradcam", "eigencam"):
        cams, probs = compute_cam(model, images, method)
        assert cams.shape == (2, 32, 32) and probs.shape == (2, 3)
        assert np.isfinite(cams).all() and cams.max() > 0.5  # normalised, not flat
    assert next(row for row in layer_table(model, (3, 32, 32)) if row[3])[0] == layer


def test_vit_tokens_become_the_patch_grid():
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, reg_tokens=2, num_classes=3)
    _, _, reshape = target_layer(model)
    prefix, (h, w) = model.num_prefix_tokens, model.patch_embed.grid_size
    assert (prefix, h, w) == (3, 4, 4)
    tokens = torch.cat([torch.full((1, prefix), -1.0), torch.arange(h * w).float()[None]], 1)
    grid = reshape(tokens[..., None].expand(-1, -1, 5))
    assert grid.shape == (1, 5, h, w)
    assert torch.equal(grid[0, 0], torch.arange(h * w).float().view(h, w))  # row-major patches


def test_an_all_zero_map_says_so_on_the_figure_and_in_the_log(tmp_path, caplog):
    from analysis import cam

    picture = np.full((16, 16, 3), 128, dtype=np.uint8)
    ramp = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (16, 1))
    maps = {"gradcam": np.zeros((16, 16), np.float32), "eigencam": ramp}
    fig = cam._draw(picture, maps, "title")
    notes = [[t.get_text() for t in ax.texts] for ax in fig.axes]
    assert notes == [[], [cam.ZERO_NOTE], []]  # input, the zero gradcam, the eigencam
    assert "all-zero" in cam.ZERO_NOTE

    with caplog.at_level("WARNING", logger="analysis.cam"):
        path = cam._figure(picture, maps, "title", tmp_path / "flat.png")
    assert path.is_file()
    (record,) = caplog.records
    assert str(path) in record.getMessage() and "gradcam map is all zero" in record.getMessage()
