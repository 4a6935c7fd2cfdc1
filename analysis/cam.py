"""Class activation maps (pytorch-grad-cam) of a trained model, written as PNG overlays.

python analysis/cam.py                                   # newest run, 8 validation images, GradCAM
python analysis/cam.py run=outputs/<date>/<time> method=layercam n=16 target=3
python analysis/cam.py run=model.safetensors images=photos/ layer=layer3
python analysis/cam.py grid=true index=5                 # one image, all six methods side by side
python analysis/cam.py list_layers=true                  # module names (and shapes) for layer=...

Options (key=value, in run.py's override syntax: `layer=null`, quotes around a value with a comma):
  run          run folder, checkpoint (.pt) or exported .safetensors; default the newest
               outputs/<date>/<time> with checkpoints/best.pt. use_ema=true: its EMA weights.
  model        instead of a run, a model with no run behind it: model=<timm name> with
               model.weights=<file> (an MMPretrain / MMClassification checkpoint, a timm file)
               or model.pretrained=true (timm's hub weights); needs images=
  method       gradcam (default) | gradcam++ | xgradcam | eigencam | eigengradcam | layercam
  images       an image file or a folder of them (recursive), read with the preprocessing the
               checkpoint records; default: the run's validation split, rebuilt from its config
  n, index     how many images, from which one: default 8 validation images from 0, or every
               file of images= (sorted by path)
  layer        module name (list_layers=true prints them with their output shapes). Default: a
               ViT / DeiT / BEiT's last block's norm1, its patch tokens laid on the patch grid
               (class and register tokens dropped); otherwise the deepest of timm's feature
               stages (Swin's NHWC stages turned NCHW) whose map is at least 7 x 7 at the input
               size (ResNet-18 on the 56 px default digits: layer2), since a coarser map blown
               up to the image cannot point at a stroke; where no stage is that fine, the
               deepest one of at least 2 x 2 (a 1 x 1 map is flat); else the last Conv2d.
  target       the class each map explains, an index or a name (names are matched first);
               default the predicted class
  aug_smooth, eigen_smooth   pytorch-grad-cam's test-time-augmentation and principal-component
               smoothing (true | false)
  grid         true: one image (index), all methods side by side in one figure
  out          folder for the PNGs; default <run>/cam (next to checkpoints/ or export/)

Each PNG shows the input (an image file as the model sees it: resized and cropped, unnormalised)
and the overlay of each method (jet colours weighted by the map, so the picture shows through
where the map is cold), titled with the predicted class and its probability, the true class of a
validation image, and the class the map explains. The written paths are printed.
"""

import difflib
import logging
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)
# option value -> pytorch_grad_cam class
METHODS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "eigencam": "EigenCAM",
    "eigengradcam": "EigenGradCAM",
    "layercam": "LayerCAM",
}
N_DEFAULT = 8  # validation images when n is not given
BATCH = 16  # images per CAM pass: bounds the activations and gradients held at once
# figure geometry, inches: one square panel per picture under a two-line title
PANEL_IN, TITLE_IN, DPI = 2.4, 0.6, 100
# modules whose 4-D output is NCHW even inside an NHWC model (Swin's patch_embed.proj)
NCHW_MODULES = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
# the default layer's map has at least this many cells a side where a stage allows: a coarser
# map, blown up to the image, cannot say which stroke or part the class rests on (ResNet's layer4
# at 224 px is 7 x 7)
MIN_CELLS = 7
# colour weight of the map where it is 1, falling to 0 with the map: cold cells leave the
# picture as it is, so what the model looked at stays visible under the colour
OVERLAY_ALPHA = 0.6
ZERO_NOTE = "all-zero map:\nnothing highlighted"


def target_layer(model: nn.Module, name: str | None = None, input_hw=None):
    """(name, module, reshape_transform or None) whose activations the CAM weighs.

    name: a module name of model.named_modules(); None: the default (see the module docstring).
    input_hw: (H, W) of the input, for choosing a default stage whose map is at least 2 x 2.
    reshape_transform turns the module's output into (N, C, H, W).
    """
    modules = dict(model.named_modules())
    if name is not None:
        if name not in modules or not name:
            close = difflib.get_close_matches(name, [m for m in modules if m], n=5, cutoff=0.5)
            raise ValueError(
                f"layer={name!r} is not a module of {type(model).__name__}; close names: "
                f"{close or 'none'} (list_layers=true prints them all)"
            )
        return name, modules[name], _reshape_for(model, modules[name])
    name = _default_layer(model, modules, input_hw)
    return name, modules[name], _reshape_for(model, modules[name])


def _is_vit(model: nn.Module) -> bool:
    """timm's token models on a patch grid: VisionTransformer (ViT, DeiT), Beit, Eva."""
    return all(hasattr(model, a) for a in ("blocks", "num_prefix_tokens", "patch_embed"))


def _is_nhwc(model: nn.Module) -> bool:
    # timm's capability flag: Swin's stages pass (N, H, W, C) between them
    return str(getattr(model, "output_fmt", "")).upper().endswith("NHWC")


def _default_layer(model: nn.Module, modules: dict, input_hw) -> str:
    if _is_vit(model) and len(model.blocks):
        # the last block's output reaches the head through the class token only, so its patch
        # tokens get no gradient; its norm1 feeds the attention that the class token reads
        last = f"blocks.{len(model.blocks) - 1}"
        return f"{last}.norm1" if f"{last}.norm1" in modules else last
    stages = [
        info
        for info in getattr(model, "feature_info", None) or []
        if isinstance(info, dict) and info.get("module") in modules
    ]
    if stages:
        if input_hw is not None:
            side = min(int(s) for s in input_hw)
            fine = [s for s in stages if _cells(side, s) >= MIN_CELLS]
            # no stage that fine: the deepest one that is not flat (a 1 x 1 map explains nothing)
            coarse = [s for s in stages if _cells(side, s) >= 2]
            stages = fine or coarse or stages[:1]
        return stages[-1]["module"]
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(
            f"no default CAM layer for {type(model).__name__} (no timm feature_info, no Conv2d); "
            "give layer=<module name> (list_layers=true prints them)"
        )
    return convs[-1]


def _cells(side: int, stage: dict) -> int:
    # cells along a side of a stage's map: timm's `reduction` is the stage's total stride
    return side // int(stage.get("reduction", 1))


def _reshape_for(model: nn.Module, module: nn.Module):
    if _is_vit(model):
        return _tokens_to_grid(int(model.num_prefix_tokens), tuple(model.patch_embed.grid_size))
    if _is_nhwc(model) and not isinstance(module, NCHW_MODULES):
        return _nhwc_to_nchw
    return None


def _tokens_to_grid(prefix: int, grid: tuple[int, int]):
    """(N, tokens, C) -> (N, C, H, W) of the patch tokens; class and register tokens dropped."""

    def reshape(x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3:
            return x  # a conv inside the patch embedding: already (N, C, H, W)
        count = x.shape[1]
        patches = x[:, prefix:] if count - prefix > 0 and count != grid[0] * grid[1] else x
        h, w = grid
        if patches.shape[1] != h * w:  # another input size (dynamic_img_size): a square grid
            h = w = round(patches.shape[1] ** 0.5)
        if patches.shape[1] != h * w:
            raise ValueError(
                f"{count} tokens ({prefix} class/register tokens) do not fit a {grid[0]} x "
                f"{grid[1]} patch grid; choose another layer (list_layers=true)"
            )
        return patches.reshape(x.shape[0], h, w, x.shape[-1]).permute(0, 3, 1, 2)

    return reshape


def _nhwc_to_nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2) if x.ndim == 4 else x


def _forward_checked(model, images, name, module, reshape, multi_label=False) -> torch.Tensor:
    """Class probabilities (multi_label: each class's sigmoid), checking on the way that the
    layer gives a (N, C, H, W) map."""
    seen = {}
    handle = module.register_forward_hook(lambda m, i, out: seen.update(out=out))
    try:
        with torch.no_grad():
            logits = model(images).float()
            probs = logits.sigmoid() if multi_label else logits.softmax(-1)
    finally:
        handle.remove()
    out = seen.get("out")
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"layer={name!r} returns {type(out).__name__}, not a tensor; choose another layer "
            "(list_layers=true)"
        )
    shape = tuple((reshape(out) if reshape else out).shape)
    if len(shape) != 4:
        raise ValueError(
            f"layer={name!r} outputs {tuple(out.shape)}, not a feature map (N, C, H, W); "
            "choose a layer with a spatial output (list_layers=true prints the shapes)"
        )
    return probs


def compute_cam(
    model: nn.Module,
    images: torch.Tensor,
    method: str = "gradcam",
    layer: str | None = None,
    targets: list[int] | None = None,
    aug_smooth: bool = False,
    eigen_smooth: bool = False,
    multi_label: bool = False,
) -> tuple[np.ndarray, torch.Tensor]:
    """(CAMs (N, H, W) in 0..1 at the input's H x W, class probabilities (N, classes)).

    images: (N, C, H, W) as the model takes them. targets: the class each CAM explains,
    default the predicted one (multi_label: the best scoring). layer: a module name, default
    as `target_layer` chooses. multi_label: probabilities are each class's sigmoid (a map
    explains the logit of one class either way).
    """
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    method = _method(method)
    model.eval()
    name, module, reshape = target_layer(model, layer, images.shape[-2:])
    device = next(model.parameters()).device
    images = images.to(device)
    probs = _forward_checked(model, images, name, module, reshape, multi_label).cpu()
    if targets is None:
        targets = probs.argmax(-1).tolist()
    if len(targets) != len(images):
        raise ValueError(f"{len(targets)} targets for {len(images)} images")
    cam = getattr(pytorch_grad_cam, METHODS[method])(
        model=model, target_layers=[module], reshape_transform=reshape
    )
    try:
        # an input that requires grad: the layer's output gets a gradient even when every
        # parameter before it is frozen (model.freeze)
        maps = cam(
            input_tensor=images.detach().requires_grad_(True),
            targets=[ClassifierOutputTarget(int(t)) for t in targets],
            aug_smooth=aug_smooth,
            eigen_smooth=eigen_smooth,
        )
    finally:
        # not `with cam:` — its __exit__ prints and swallows an IndexError
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)
    return np.asarray(maps, dtype=np.float32), probs


def _method(method: str) -> str:
    key = str(method).lower()
    if key not in METHODS:
        close = difflib.get_close_matches(key, list(METHODS), n=3, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"method={method!r} is not one of {list(METHODS)}{hint}")
    return key


def class_index(target, classes: list[str]) -> int:
    """A class name (matched first) or index as an index into `classes`."""
    if str(target) in classes:
        return classes.index(str(target))
    try:
        index = int(target)
    except ValueError:
        index = -1
    if not 0 <= index < len(classes):
        close = difflib.get_close_matches(str(target), classes, n=5)
        raise ValueError(
            f"target={target!r} is neither a class name nor an index 0..{len(classes) - 1}; "
            f"close names: {close or classes[:10]}"
        )
    return index


def validation_split(trained):
    """The run's validation dataset, rebuilt from the checkpoint's config by engine.build."""
    from omegaconf import OmegaConf

    from engine.build import build_eval_data

    dataset, _ = build_eval_data(OmegaConf.create(trained.config), trained.classes, "val")
    return dataset


def validation_samples(dataset, indices):
    """(inputs (N, C, H, W), labels, names, pictures) of the samples `indices` of `dataset`;
    a picture is the input min-max stretched (data.images.to_picture)."""
    from data.images import to_picture

    samples = [dataset[i] for i in indices]
    inputs = torch.stack([s[0] for s in samples])
    names = [f"val_{i:05d}" for i in indices]
    # a label: a class index, or (multi-label data) the indices of the classes present
    labels = [s[1].nonzero().flatten().tolist() if _multi_hot(s[1]) else int(s[1]) for s in samples]
    return inputs, labels, names, [to_picture(x) for x in inputs]


def _multi_hot(label) -> bool:
    return isinstance(label, torch.Tensor) and label.ndim == 1


def file_samples(trained, files: list[Path], names: list[str]):
    """(inputs (N, C, H, W), labels (None: unknown), names, pictures) of image files under the
    checkpoint's preprocessing. A picture is the file resized and cropped as the model's input
    is, in its own colours and unnormalised."""
    from data.images import load_image
    from data.transforms import file_transform

    transform = file_transform(**trained.preprocess)
    _, height, width = (int(v) for v in trained.preprocess["input_size"])
    geometry = {**trained.preprocess, "input_size": (3, height, width)}
    show = file_transform(**{**geometry, "mean": (0.0,) * 3, "std": (1.0,) * 3})
    inputs, pictures = [], []
    for path in files:
        image = load_image(path)
        inputs.append(transform(image))
        rgb = show(image).clamp(0, 1)  # bicubic resizing overshoots a little
        pictures.append((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    return torch.stack(inputs), [None] * len(files), names, pictures


def _file_names(files: list[Path], root: Path) -> list[str]:
    """A file's path under the images= folder, as one name: cat/01.png -> cat_01."""
    if root.is_file():
        return [files[0].stem]
    return ["_".join(f.relative_to(root).with_suffix("").parts) for f in files]


def out_folder(source: Path) -> Path:
    """<run>/cam for a run's checkpoint or export; else a cam/ folder beside the file."""
    source = Path(source)
    if source.parent.name in ("checkpoints", "export"):
        return source.parent.parent / "cam"
    return source.parent / "cam"


def overlay(picture: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """picture (H, W, 3) in 0..1 under the jet colours of cam (H, W) in 0..1, each pixel's
    colour weighted by its map value (OVERLAY_ALPHA at 1); (H, W, 3) in 0..1."""
    from matplotlib import colormaps

    cam = np.clip(cam, 0.0, 1.0)
    alpha = OVERLAY_ALPHA * cam[..., None]
    mixed = (1 - alpha) * picture + alpha * colormaps["jet"](cam)[..., :3]
    return np.clip(mixed, 0.0, 1.0)  # float rounding passes 1 by 3e-8, and imshow warns of it


def _figure(picture: np.ndarray, cams: dict, title: str, path: Path) -> Path:
    """The picture, then its overlay for each method, under one title; written as PNG."""
    import matplotlib.pyplot as plt

    fig = _draw(picture, cams, title)
    for method, cam in cams.items():
        if not cam.any():
            log.warning("%s: the %s map is all zero; its panel says so", path, method)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _draw(picture: np.ndarray, cams: dict, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 + len(cams)
    fig, axes = plt.subplots(
        1, panels, figsize=(PANEL_IN * panels, PANEL_IN + TITLE_IN), squeeze=False
    )
    axes = axes[0]
    shown = picture.astype(np.float32) / 255.0
    axes[0].imshow(picture, interpolation="nearest")
    axes[0].set_title("input", fontsize=9)
    for ax, (method, cam) in zip(axes[1:], cams.items(), strict=True):
        ax.imshow(overlay(shown, cam), interpolation="nearest")
        ax.set_title(method, fontsize=9)
        if not cam.any():  # a flat map (no gradient or activation): the overlay is the input
            ax.text(
                0.5,
                0.5,
                ZERO_NOTE,
                ha="center",
                va="center",
                transform=ax.transAxes,
                fontsize=8,
                color="white",
                backgroundcolor="black",
            )
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def cam_run(
    run: str | Path | None = None,
    method: str = "gradcam",
    n: int | None = None,
    index: int = 0,
    images: str | Path | None = None,
    layer: str | None = None,
    target=None,
    aug_smooth: bool = False,
    eigen_smooth: bool = False,
    grid: bool = False,
    out: str | Path | None = None,
    use_ema: bool = False,
    model: str | None = None,
    model_weights: str | None = None,
    model_pretrained: bool = False,
) -> list[Path]:
    """Write CAM overlays of a trained model as PNG files (one per image); returns their paths.

    run: run folder, checkpoint or .safetensors (None: the newest run under ./outputs).
    The options are the command line's (see the module docstring).
    """
    from engine.predict import image_files

    methods = list(METHODS) if grid else [_method(method)]
    trained = load(run, use_ema, model, model_weights, model_pretrained)
    model, classes = trained.model, trained.classes
    multi = bool(trained.info.get("multi_label", False))  # sigmoid scores, several labels
    if images is None and "pretrained" in trained.info:
        raise ValueError(
            f"model={trained.model_name!r} has no run, so no validation split: give images=<file or folder>"
        )
    count = 1 if grid else n
    if count is not None and count < 1:
        raise ValueError(f"n={n} must be 1 or more")
    if index < 0:
        raise ValueError(f"index={index} must be 0 or more")
    if layer is not None:
        target_layer(model, layer)  # a bad name fails before any image is read
    explained = None if target is None else class_index(target, classes)
    if out is None and trained.info.get("pretrained"):  # timm's hub weights: no file to be beside
        out = Path("outputs/analysis/cam")
    out = Path(out) if out is not None else out_folder(trained.source)

    # images are read, explained and drawn BATCH at a time: a folder of any size fits in memory
    if images is None:
        dataset = validation_split(trained)
        if index >= len(dataset):
            raise ValueError(f"index={index} is past the validation split ({len(dataset)} images)")
        stop = min(index + (count or N_DEFAULT), len(dataset))
        chunks = (
            validation_samples(dataset, range(i, min(i + BATCH, stop)))
            for i in range(index, stop, BATCH)
        )
    else:
        found = image_files(images)
        if index >= len(found):
            raise ValueError(f"index={index}: images={str(images)!r} holds {len(found)} files")
        files = found[index : index + count if count else None]
        names = _file_names(files, Path(images).expanduser())
        chunks = (
            file_samples(trained, files[i : i + BATCH], names[i : i + BATCH])
            for i in range(0, len(files), BATCH)
        )

    out.mkdir(parents=True, exist_ok=True)
    suffix = "grid" if grid else methods[0].replace("+", "p")  # gradcam++ -> gradcampp
    written = []
    for inputs, labels, chunk_names, pictures in chunks:
        targets = None if explained is None else [explained] * len(inputs)
        layer_name, module, _ = target_layer(model, layer, inputs.shape[-2:])
        cams = {}
        for m in methods:
            smooth = (aug_smooth, eigen_smooth)
            cams[m], probs = compute_cam(model, inputs, m, layer, targets, *smooth, multi)
        for i, name in enumerate(chunk_names):
            pred = int(probs[i].argmax())
            shown = pred if explained is None else explained
            title = f"pred {classes[pred]} ({float(probs[i][pred]):.2f})"
            if multi:  # every label at a sigmoid score of 0.5 or more
                title = "pred " + _names(torch.nonzero(probs[i] >= 0.5).flatten().tolist(), classes)
            if isinstance(labels[i], list):
                title += f", true {_names(labels[i], classes)}"
            elif labels[i] is not None:
                title += f", true {classes[labels[i]]}"
            title += f"\nCAM of {classes[shown]} at {layer_name} ({type(module).__name__})"
            maps = {m: cams[m][i] for m in methods}
            written.append(_figure(pictures[i], maps, title, out / f"{name}_{suffix}.png"))
    return written


def _names(indices: list[int], classes: list[str]) -> str:
    return "{" + ", ".join(classes[c] for c in indices) + "}"


def layer_table(model: nn.Module, input_size) -> list[tuple[str, str, str, bool]]:
    """(name, type, output shape per image, is the default) of every module, for layer=...

    One forward pass of zeros of `input_size` (C, H, W) records the shapes.
    """
    shapes: dict[str, str] = {}
    handles = []
    for name, module in model.named_modules():

        def record(m, i, out, name=name):
            shapes[name] = str(tuple(out.shape[1:])) if isinstance(out, torch.Tensor) else "-"

        handles.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *(int(v) for v in input_size)))
    finally:
        for handle in handles:
            handle.remove()
    default, _, _ = target_layer(model, None, tuple(input_size)[-2:])
    return [
        (name or "(model)", type(module).__name__, shapes.get(name, "-"), name == default)
        for name, module in model.named_modules()
    ]


def load(run=None, use_ema=False, model=None, model_weights=None, model_pretrained=False):
    """The model to explain: run's (a run folder, checkpoint or export; None: the newest run),
    or with model=<timm name> one with no run behind it, from model.weights=<file> (an
    MMPretrain / MMClassification checkpoint, a timm file) or model.pretrained=true."""
    from engine.predict import load_trained

    if model is None:
        if model_weights or model_pretrained:
            raise ValueError(
                "model.weights / model.pretrained need model=<timm name> of the architecture "
                "(e.g. model=convnext_base model.weights=garbage.pth)"
            )
        return load_trained(run, use_ema=use_ema)
    if run is not None or use_ema:
        raise ValueError(f"model={model!r} is a model with no run: leave out run= and use_ema=")
    from engine.pretrained import load_named

    return load_named(model, model_weights, model_pretrained)


def print_layers(run=None, use_ema: bool = False, **model) -> None:
    trained = load(run, use_ema, **model)
    rows = layer_table(trained.model, trained.preprocess["input_size"])
    width = max(len(r[0]) for r in rows)
    kind = max(len(r[1]) for r in rows)
    for name, module, shape, default in rows:
        mark = "  <- default" if default else ""
        print(f"{name:<{width}}  {module:<{kind}}  {shape}{mark}")


@dataclass
class CamModel:
    """A model with no run behind it (cam_run's model, model_weights, model_pretrained)."""

    name: str | None = None  # typed as model=<timm name>, as run.py's model group
    weights: str | None = None
    pretrained: bool = False


@dataclass
class CamOptions:
    """The command line's options: cam_run's keyword arguments, plus list_layers."""

    run: str | None = None
    method: str = "gradcam"
    n: int | None = None
    index: int = 0
    images: str | None = None
    layer: str | None = None
    target: str | None = None  # a name, or an index as text: cam_run matches names first
    aug_smooth: bool = False
    eigen_smooth: bool = False
    grid: bool = False
    out: str | None = None
    use_ema: bool = False
    list_layers: bool = False
    model: CamModel = field(default_factory=CamModel)


def parse(args: list[str]) -> dict:
    """`key=value` arguments in run.py's override syntax (Hydra's grammar: quoting, null),
    composed onto CamOptions, as cam_run's keyword arguments (plus list_layers)."""
    from hydra import compose, initialize
    from hydra.core.config_store import ConfigStore
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    options = {f.name: f.type for f in fields(CamOptions) if f.name != "model"}
    options |= {f"model.{f.name}": f.type for f in fields(CamModel)}
    options["model"] = str  # model=<timm name> is model.name, as in run.py
    for arg in args:  # before Hydra, whose own message suggests `+key=` for a mistyped key
        key, sep, _ = arg.partition("=")
        if not sep or key not in options:
            close = difflib.get_close_matches(key, list(options), n=1)
            hint = f"did you mean {close[0]}=...? " if close and sep else ""
            raise ValueError(f"{arg!r}: {hint}expected key=value with key one of {list(options)}")
    overrides = ["model.name" + a[len("model") :] if a.startswith("model=") else a for a in args]
    ConfigStore.instance().store(name="cam", node=CamOptions)
    try:
        with initialize(version_base="1.3", config_path=None):
            cfg = compose("cam", overrides=overrides)
    except ConfigCompositionException as err:
        given = next((i for i, a in enumerate(overrides) if f"override {a}" in str(err)), None)
        if given is None:  # not one value's type: Hydra's own message (e.g. run=a,b is a sweep)
            raise ValueError(str(err)) from None
        arg = args[given]
        key = arg.partition("=")[0]
        kind = {bool: "true or false", int | None: "a whole number", int: "a whole number"}
        raise ValueError(f"{arg!r}: {key} is {kind.get(options[key], 'text')}") from None
    kwargs = OmegaConf.to_container(cfg)
    model = kwargs.pop("model")  # cam_run's model, model_weights, model_pretrained
    return {
        **kwargs,
        "model": model["name"],
        "model_weights": model["weights"],
        "model_pretrained": model["pretrained"],
    }


def main(args: list[str]) -> int:
    if any(a in ("-h", "--help", "help") for a in args):
        print(__doc__)
        return 0
    try:
        kwargs = parse(args)
        if kwargs.pop("list_layers", False):
            model = {k: v for k, v in kwargs.items() if k.startswith("model")}
            print_layers(kwargs.get("run"), kwargs.get("use_ema", False), **model)
            return 0
        written = cam_run(**kwargs)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} CAM figure(s) to {written[0].parent}")
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
