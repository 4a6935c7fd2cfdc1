"""Checkpoints of MMPretrain 1.x and MMClassification 0.x (the format ModelScope's classification
cards ship) onto the timm model of the same architecture.

Both save `{"meta": {...}, "state_dict": {...}}` with the backbone under `backbone.` and the
classifier under `head.`; 0.x keeps the class names in `meta.CLASSES`, 1.x in
`meta.dataset_meta.classes`. The backbones' key names are the same in both. `to_timm` renames
the keys to the layout of each family's original repository (FB ConvNeXt, DeiT, Swin, BEiT),
and `models.timm_models.load_weights` then applies timm's own `checkpoint_filter_fn` for that
architecture, as it does for hub weights: only what OpenMMLab changed is converted here.
"""

import argparse
import ast
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

OPENMMLAB_PREFIXES = ("backbone.", "head.", "neck.")


def is_openmmlab(state: dict) -> bool:
    """A state dict in OpenMMLab's layout: a `backbone.` and no key outside its modules."""
    keys = [k for k in state if isinstance(k, str)]
    return any(k.startswith("backbone.") for k in keys) and all(
        k.startswith((*OPENMMLAB_PREFIXES, "data_preprocessor.")) for k in keys
    )


def classes_of(content) -> list[str] | None:
    """The class names an MMPretrain (`meta.dataset_meta.classes`) or MMClassification
    (`meta.CLASSES`) checkpoint records, or None."""
    meta = content.get("meta") if isinstance(content, dict) else None
    if not isinstance(meta, dict):
        return None
    dataset_meta = meta.get("dataset_meta")
    found = dataset_meta.get("classes") if isinstance(dataset_meta, dict) else None
    found = found if found is not None else meta.get("CLASSES")
    if isinstance(found, list | tuple) and found and all(isinstance(c, str) for c in found):
        return list(found)
    return None


# --- key renames, OpenMMLab -> the family's original repository (what timm's filter reads) ---

VIT_BLOCKS = (
    # OpenMMLab's transformer layers: ln1 / attn / ln2 / ffn (an FFN's first Linear sits in a
    # Sequential with its activation), as the original ViT / DeiT / BEiT name them
    (r"^layers\.(\d+)\.ln1\.", r"blocks.\1.norm1."),
    (r"^layers\.(\d+)\.ln2\.", r"blocks.\1.norm2."),
    (r"^layers\.(\d+)\.ffn\.layers\.0\.0\.", r"blocks.\1.mlp.fc1."),
    (r"^layers\.(\d+)\.ffn\.layers\.1\.", r"blocks.\1.mlp.fc2."),
    (r"^layers\.(\d+)\.attn\.gamma1\.weight$", r"blocks.\1.ls1.gamma"),  # LayerScale
    (r"^layers\.(\d+)\.ffn\.gamma2\.weight$", r"blocks.\1.ls2.gamma"),
    (r"^layers\.(\d+)\.", r"blocks.\1."),  # attn.qkv, attn.proj, BEiT's gamma_1 / q_bias / ...
    (r"^patch_embed\.projection\.", "patch_embed.proj."),
    (r"^pre_norm\.", "norm_pre."),
    (r"^ln1\.", "norm."),  # final_norm
    (r"^ln2\.", "fc_norm."),  # out_type='avg_featmap': the norm after token pooling
    (r"^head\.layers\.head\.", "head."),  # VisionTransformerClsHead / DeiTClsHead
    (r"^head\.layers\.head_dist\.", "head_dist."),
    (r"^head\.fc\.", "head."),  # LinearClsHead (BEiT)
)

RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "ResNet": ((r"^head\.fc\.", "fc."),),  # torchvision / timm names in the backbone already
    "ConvNeXt": (
        (r"\.depthwise_conv\.", ".dwconv."),
        (r"\.pointwise_conv(\d)\.", r".pwconv\1."),
        (r"^norm\d\.", "norm."),  # the norm of the last out_indices stage, after pooling
        (r"^head\.fc\.", "head."),
    ),
    "Swin": (
        (r"^patch_embed\.projection\.", "patch_embed.proj."),
        (r"^stages\.", "layers."),
        (r"\.attn\.w_msa\.", ".attn."),
        (r"\.ffn\.layers\.0\.0\.", ".mlp.fc1."),
        (r"\.ffn\.layers\.1\.", ".mlp.fc2."),
        (r"^norm\d\.", "norm."),
        (r"^head\.fc\.", "head."),
    ),
    "ViT": VIT_BLOCKS,
    "BEiT": VIT_BLOCKS,
}

# the family of an OpenMMLab state dict, from keys only it has (checked in this order)
SIGNATURES = (
    ("Swin", "backbone.stages.0.blocks.0.attn.w_msa."),
    ("ConvNeXt", "backbone.downsample_layers.0."),
    ("BEiT", "backbone.layers.0.attn.q_bias"),
    ("BEiT", "backbone.layers.0.gamma_1"),
    ("ViT", "backbone.layers.0.ffn."),
    ("ResNet", "backbone.layer1.0.conv1."),
)

# the family each timm model module implements; timm names its modules after them
TIMM_MODULES = {
    "timm.models.resnet": "ResNet",
    "timm.models.convnext": "ConvNeXt",
    "timm.models.swin_transformer": "Swin",
    "timm.models.vision_transformer": "ViT",
    "timm.models.deit": "ViT",  # distilled DeiT: a ViT with a dist_token and head_dist
    "timm.models.beit": "BEiT",
}

SUPPORTED = (
    "ResNet (resnet*), ConvNeXt (convnext_*), ViT / DeiT (vit_*, deit_*), Swin "
    "(swin_*_window*), BEiT / BEiTv2 (beit_*, beitv2_*)"
)


def family_of(state: dict) -> str | None:
    """'ConvNeXt', 'Swin', ... for an OpenMMLab state dict, from its keys; None if unknown."""
    for family, marker in SIGNATURES:
        if any(k.startswith(marker) for k in state):
            return family
    return None


def to_timm(state: dict, model: nn.Module, source: str) -> dict:
    """`state` renamed for timm model `model` if it is in OpenMMLab's layout; else as it is.

    The result is what the family's original repository would hold; timm's
    `checkpoint_filter_fn` of the model's module finishes the conversion (the caller runs it).
    A family that is not supported, or one that is not `model`'s, raises a ValueError that says
    which keys and what is supported. `source` names the file in messages.
    """
    if not is_openmmlab(state):
        return state
    found = family_of(state)
    wanted = TIMM_MODULES.get(type(model).__module__)
    architecture = model.pretrained_cfg.get("architecture", type(model).__name__)
    if found is None:
        keys = sorted(k for k in state if k.startswith("backbone."))[:4]
        raise ValueError(
            f"model.weights={source!r} is an MMPretrain / MMClassification checkpoint of a "
            f"backbone this repo cannot map (keys {', '.join(keys)}, ...); supported: {SUPPORTED}"
        )
    if wanted is None or wanted != found:
        raise ValueError(
            f"model.weights={source!r} is an MMPretrain / MMClassification {found} checkpoint, "
            f"but model.name={architecture!r} is {'a ' + wanted if wanted else 'not one of'} "
            f"{'' if wanted else SUPPORTED}; give the timm name of the same architecture and "
            f"size (model.name=..., e.g. {EXAMPLES[found]})"
        )
    necks = sorted(k for k in state if k.startswith("neck."))
    if necks:
        raise ValueError(
            f"model.weights={source!r}: the checkpoint has a neck with weights "
            f"({', '.join(necks[:4])}); timm's {architecture!r} has no such layer. Supported: "
            "global average pooling necks (no weights) and the heads LinearClsHead, "
            "VisionTransformerClsHead without hidden_dim, DeiTClsHead"
        )
    renamed = {}
    for key, value in state.items():
        if key.startswith("data_preprocessor."):
            continue  # mean / std buffers; the preprocessing is read from the config instead
        key = key.removeprefix("backbone.")
        for pattern, new in RENAMES[found]:
            key = re.sub(pattern, new, key)
        renamed[key] = value
    for fix in FIXES.get(found, ()):
        renamed = fix(renamed)
    return renamed


EXAMPLES = {
    "ResNet": "resnet50",
    "ConvNeXt": "convnext_base",
    "Swin": "swin_tiny_patch4_window7_224",
    "ViT": "vit_base_patch16_224, deit_tiny_patch16_224",
    "BEiT": "beit_base_patch16_224, beitv2_large_patch16_224",
}


def _swin_merge_order(state: dict) -> dict:
    """OpenMMLab's Swin PatchMerging gathers each 2x2 neighbourhood with nn.Unfold, which puts
    the channels in (channel, row, column) order; the original (and timm) concatenates the four
    positions (row 0 col 0, row 1 col 0, row 0 col 1, row 1 col 1), each with all channels. The
    reduction's input and the norm before it are permuted from the one order to the other."""

    def reorder(t: torch.Tensor) -> torch.Tensor:
        channels = t.shape[-1] // 4
        lead = t.shape[:-1]
        # (..., C, row, col) -> (..., col, row, C)
        return t.reshape(*lead, channels, 2, 2).movedim(-3, -1).transpose(-3, -2)

    out = {}
    for key, value in state.items():
        if re.search(r"downsample\.(reduction\.weight|norm\.weight|norm\.bias)$", key):
            value = reorder(value).reshape(value.shape)
        out[key] = value
    return out


FIXES: dict[str, tuple[Callable[[dict], dict], ...]] = {"Swin": (_swin_merge_order,)}


def safe_globals() -> list:
    """What an OpenMMLab checkpoint's meta may pickle besides tensors and containers, allowed for
    torch.load with weights_only=True: numpy scalars (a best score, a seed), their dtypes and numpy
    arrays. Each only builds a value from bytes; an array's items are unpickled by the same
    restricted unpickler. Anything else in a file (an optimizer's or a message hub's classes)
    stays refused. numpy 1.x files name numpy.core, numpy 2 numpy._core: both spellings."""
    import numpy as np

    dtypes = {type(np.dtype(code)) for code in "?bhilqBHILQefdgFDGUS"}
    plain = [np.dtype, np.ndarray, *sorted(dtypes, key=lambda t: t.__name__)]
    allowed: list = [*plain, argparse.Namespace]  # timm's train.py saves its arguments so
    for name in ("scalar", "_reconstruct"):
        func = getattr(np._core.multiarray, name)
        allowed += [func, (func, f"numpy.core.multiarray.{name}")]
    return allowed


def read(path) -> dict:
    """What a checkpoint file says about its use: whether it is in OpenMMLab's layout, its class
    names (or None), its classifier's output count (or None) and its config's preprocessing (or
    None).

    Read with torch.load with weights_only=True and the numpy types of `safe_globals` only: a file
    that pickles other objects is refused (ValueError), and nothing in it runs.
    """
    folder = Path(path) if Path(path).is_dir() else None
    path = checkpoint_file(path)
    if str(path).endswith(".safetensors"):  # tensors only: no meta to read
        return {"openmmlab": False, "classes": None, "num_classes": None, "preprocess": None}
    try:
        content = load_lazily(path)
    except Exception as err:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:
            unsafe = []
        if unsafe:
            raise ValueError(
                f"{str(path)!r} holds pickled Python objects besides tensors "
                f"({', '.join(unsafe)}); refused: unpickling them could run code from the file"
            ) from None
        raise ValueError(
            f"{str(path)!r} is not a readable weights file ({type(err).__name__}: {err})"
        ) from err
    meta = content.get("meta") if isinstance(content, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    text = meta.get("cfg") or meta.get("config")  # 1.x: cfg, 0.x: config (the dumped config)
    state = content.get("state_dict", content) if isinstance(content, dict) else {}
    heads = [
        v
        for k, v in (state.items() if isinstance(state, dict) else ())
        if k in ("head.fc.weight", "head.layers.head.weight") and isinstance(v, torch.Tensor)
    ]
    return {
        "openmmlab": isinstance(state, dict) and is_openmmlab(state),
        "classes": classes_of(content),
        "num_classes": int(heads[0].shape[0]) if heads else None,  # the classifier's outputs
        "preprocess": (
            preprocess_of(text, str(path))
            if isinstance(text, str)
            else folder_preprocess(folder)
            if folder
            else None
        ),
    }


# what ModelScope's hub download of an MMClassification card leaves in the model's folder
MODELSCOPE_WEIGHTS = ("pytorch_model.pt", "checkpoints.pth")
MODELSCOPE_CONFIGS = ("config.py", "configuration.json")


def checkpoint_file(path) -> Path:
    """`path`, or for a ModelScope model folder its weights file (pytorch_model.pt, else
    checkpoints.pth, as ModelScope's ClassificationModel looks for them)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return path
    for name in MODELSCOPE_WEIGHTS:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(
        f"{str(path)!r} is a folder without {' or '.join(MODELSCOPE_WEIGHTS)}; give a weights "
        "file (.pth, .pt, .safetensors) or a ModelScope model folder as its download left it"
    )


def is_modelscope_folder(path) -> bool:
    path = Path(path).expanduser()
    return path.is_dir() and any((path / n).is_file() for n in MODELSCOPE_WEIGHTS)


def folder_preprocess(folder: Path) -> dict | None:
    """The preprocessing of a ModelScope model folder's config: config.py (an MMClassification
    config, parsed, never run) or configuration.json (its `preprocessor.val` pipeline)."""
    import json

    if (folder / "config.py").is_file():
        return preprocess_of((folder / "config.py").read_text(), str(folder / "config.py"))
    if (folder / "configuration.json").is_file():
        try:
            config = json.loads((folder / "configuration.json").read_text())
        except json.JSONDecodeError:
            return None
        pipeline = (
            (config.get("preprocessor") or {}).get("val") if isinstance(config, dict) else None
        )
        if isinstance(pipeline, list):
            values = {"data": {"test": {"pipeline": pipeline}}}
            return _preprocess_of_values(values, str(folder / "configuration.json"))
    return None


def preprocess_of(config: str, source: str = "the checkpoint") -> dict | None:
    """The evaluation preprocessing an MMPretrain / MMClassification config text describes, as
    data.transforms.file_transform's keyword arguments; None if it names no mean and std.

    The config is Python source: it is parsed (ast), never run, and only literals and dict()
    calls are read. Mean and std come from `data_preprocessor` (1.x), `model.data_preprocessor`
    or `img_norm_cfg` (0.x), in 0-255 units (divided by 255 here); resize and crop from the test
    pipeline: ResizeEdge(scale=S, edge='short') or Resize(size=(S, -1)) then
    CenterCrop(crop_size=C) gives crop_pct = C / S.
    """
    return _preprocess_of_values(_literal_assignments(config), source)


def _preprocess_of_values(values: dict, source: str) -> dict | None:
    model = values.get("model") if isinstance(values.get("model"), dict) else {}
    norm = next(
        (
            v
            for v in (values.get("data_preprocessor"), model.get("data_preprocessor"))
            if isinstance(v, dict) and "mean" in v
        ),
        None,
    )
    pipeline = _test_pipeline(values)
    norm = norm or values.get("img_norm_cfg") or _step(pipeline, "Normalize") or {}
    mean, std = norm.get("mean"), norm.get("std")
    if not (isinstance(mean, list | tuple) and isinstance(std, list | tuple)):
        return None
    if norm.get("to_rgb") is False:
        log.warning(
            "%s: its config normalises BGR images (to_rgb=False); images here are RGB, so the "
            "channel order of the mean and std may not be what the model was trained with",
            source,
        )
    resize = _step(pipeline, "ResizeEdge") or _step(pipeline, "Resize") or {}
    crop = (_step(pipeline, "CenterCrop") or {}).get("crop_size")
    short = resize.get("scale", resize.get("size"))
    short = short[0] if isinstance(short, list | tuple) else short
    crop = crop[0] if isinstance(crop, list | tuple) else crop
    if resize.get("type") == "Resize" and not isinstance(resize.get("size"), list | tuple):
        # a square resize: the image is squashed to size x size; here its short side is
        # resized and the centre cut, which is the same for square images only
        log.warning(
            "%s: its test pipeline resizes to a square (%s); here the short side is resized "
            "and the centre cropped, the same for square images only",
            source,
            resize,
        )
    size = int(crop or short or 224)
    interpolation = resize.get("interpolation", "bilinear")
    if resize.get("backend", "cv2") != "pillow":
        log.info(
            "%s: its pipeline resizes with OpenCV; here with Pillow (results differ a little)",
            source,
        )
    return {
        "input_size": [3, size, size],
        "mean": [float(m) / 255 for m in mean],
        "std": [float(s) / 255 for s in std],
        "interpolation": interpolation
        if interpolation in ("bilinear", "bicubic", "nearest")
        else "bilinear",
        "crop_pct": float(crop / short) if crop and short else 1.0,
    }


def _test_pipeline(values: dict) -> list:
    """The test (or else validation) pipeline of a 1.x or 0.x config."""
    candidates = [values.get("test_pipeline")]
    for loader in ("test_dataloader", "val_dataloader"):
        dataset = (
            (values.get(loader) or {}).get("dataset")
            if isinstance(values.get(loader), dict)
            else None
        )
        candidates.append(dataset.get("pipeline") if isinstance(dataset, dict) else None)
    data = values.get("data") if isinstance(values.get("data"), dict) else {}
    candidates += [
        (data.get(split) or {}).get("pipeline")
        for split in ("test", "val")
        if isinstance(data.get(split), dict)
    ]
    return next((c for c in candidates if isinstance(c, list) and c), [])


def _step(pipeline: list, kind: str) -> dict | None:
    return next((s for s in pipeline if isinstance(s, dict) and s.get("type") == kind), None)


def _literal_assignments(text: str) -> dict:
    """`name = <value>` at the top of a config text, for values made of literals and dict(...)
    calls; everything else (imports, expressions, other calls) is left out, never evaluated."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError):
        return {}
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                try:
                    values[target.id] = _literal(node.value)
                except (ValueError, TypeError, RecursionError):
                    continue
    return values


def _literal(node: ast.AST):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        if node.args or any(k.arg is None for k in node.keywords):
            raise ValueError("dict() with positional or ** arguments")
        return {k.arg: _literal(k.value) for k in node.keywords}
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values, strict=True)}
    if isinstance(node, ast.List | ast.Tuple):
        items = [_literal(e) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    return ast.literal_eval(node)  # constants, -1, ...; raises ValueError for anything else


def load_lazily(path) -> object:
    """torch.load with weights_only=True of `path` with the numpy types of `safe_globals`, memory-mapped
    where the file's format allows (the tensors are not read until used), so that its meta can
    be read cheaply. Nothing in the file runs; other pickled objects raise."""
    with torch.serialization.safe_globals(safe_globals()):
        for mmap in (True, False):  # files of torch < 1.6 (not zip) cannot be memory-mapped
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as err:
                if not mmap or "mmap" not in str(err):
                    raise
    raise AssertionError("unreachable")
