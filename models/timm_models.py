"""Any timm architecture by name: build it, load weights into it, freeze part of it, and say
which preprocessing it expects.

`conf/model/*.yaml` configure `create`; the data transforms read `preprocessing`.
"""

import argparse
import difflib
import logging
import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from timm.data import resolve_data_config
from timm.models import adapt_input_conv, clean_state_dict, group_parameters
from timm.utils import freeze as freeze_modules
from torch import nn

from models import openmmlab

log = logging.getLogger(__name__)

LINEAR_PROBE = "backbone"  # model.freeze=backbone: everything but the classifier is frozen
FREEZE_HELP = (
    "use null (train everything), an integer N >= 0 (freeze the stem and the first N stages) "
    f"or {LINEAR_PROBE!r} (freeze everything but the classifier: a linear probe)"
)


def create(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    pretrained: bool = False,
    weights: str | None = None,
    freeze: int | str | None = None,
    img_size: int | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """Build timm model `name` with a `num_classes` head and an `in_chans`-channel stem.

    name: a timm architecture, optionally with a weights tag (`convnext_base.fb_in22k`).
    pretrained: load the hub weights timm knows for `name` (needs the network or a filled
        Hugging Face cache).
    weights: a local `.pth` / `.pt` / `.safetensors` file instead: a plain state dict, a dict
        holding one under 'model' or 'state_dict' (this repo's checkpoints), or timm's hub files.
    In both cases a classifier of another size is re-initialised, and a 3-channel stem is
    summed (1 channel) or repeated (more) to fit `in_chans`, as timm's `adapt_input_conv` does.
    freeze: None, N (the stem and the first N stages, as timm's `group_matcher` splits the
        model: ResNet layer1-4, ConvNeXt/Swin stages, ViT/BEiT blocks), or 'backbone'
        (only the classifier trains). BatchNorm in frozen parts keeps its running statistics.
    img_size: input size for models built for one (ViT, BEiT, Swin); None keeps the size of
        the pretrained config. Hub and file weights are resampled to it by timm.
    drop_rate: dropout before the classifier. drop_path_rate: stochastic depth, the rate of
        the deepest block (timm increases it linearly with depth).
    """
    check_name(name)
    _check_freeze(freeze)
    if pretrained and weights:
        raise ValueError(
            f"model.pretrained=true and model.weights={weights!r} both ask for weights; "
            "keep one (model.pretrained=false to load the file)"
        )
    kwargs = {"num_classes": num_classes, "in_chans": in_chans, "drop_rate": drop_rate}
    # only some architectures take these; leaving them out must work for all of them
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if img_size is not None:
        kwargs["img_size"] = img_size
    model = _timm_model(name, pretrained, kwargs)
    if pretrained:
        _say_if_head_reinitialised(model, name, num_classes)
    if weights:
        load_weights(model, weights)
    if freeze is not None:
        freeze_stages(model, freeze)
    return model


def _timm_model(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    """timm.create_model, with the model.* key to change when the architecture refuses one of
    `kwargs` or the hub weights cannot be fetched."""
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as err:
        for key, fix in (
            ("img_size", "(convolutional models take any input size); set model.img_size=null"),
            ("drop_path_rate", "(no stochastic depth); set model.drop_path_rate=0"),
        ):
            if key in kwargs and f"'{key}'" in str(err):
                raise ValueError(
                    f"model.{key}={kwargs[key]!r}: {name!r} does not take {key} {fix}"
                ) from err
        raise
    except OSError as err:  # hub download failed: offline, or no such file on the hub
        source = timm.get_pretrained_cfg(name).hf_hub_id or name
        raise RuntimeError(
            f"model.pretrained=true but the weights of {name!r} ({source}) could not be fetched "
            f"({type(err).__name__}: {err}). Connect to the network (and unset HF_HUB_OFFLINE), "
            "fill the Hugging Face cache (HF_HOME) on a machine that is online, "
            "or load a local file: model.pretrained=false model.weights=<file>."
        ) from err


def _say_if_head_reinitialised(model: nn.Module, name: str, num_classes: int) -> None:
    hub_classes = model.pretrained_cfg.get("num_classes")
    if hub_classes != num_classes:
        log.info(
            "model.pretrained: hub weights of %s loaded; classifier %s re-initialised for %d "
            "classes (the weights have %s)",
            name,
            ", ".join(_head_modules(model)),
            num_classes,
            hub_classes,
        )


def check_name(name: str) -> None:
    """Raise a ValueError with close matches unless timm knows `name` (and its tag, if any)."""
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        pattern = f"'*{close[0].split('_')[0]}*'" if close else ""
        raise ValueError(
            f"model.name={name!r} is not a timm model{hint} "
            f'(`python -c "import timm; print(timm.list_models({pattern}))"` lists names)'
        )
    if tag:
        try:
            timm.get_pretrained_cfg(name)
        except RuntimeError as err:  # timm: "Invalid pretrained tag (...)"
            tagged = timm.list_pretrained(f"{arch}.*")
            close = difflib.get_close_matches(name, tagged, n=3, cutoff=0.6) or tagged[:5]
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"model.name={name!r}: timm has no weights tagged {tag!r} for {arch!r}{hint} "
                f"(`python -c \"import timm; print(timm.list_pretrained('{arch}.*'))\"` lists them)"
            ) from err


def preprocessing(name: str, img_size: int | None = None, in_chans: int = 3) -> dict:
    """The input model `name` expects, read from timm's pretrained config.

    Builds no model and downloads nothing. Returns
        input_size     (C, H, W) the model sees
        mean, std      per channel, for images scaled to [0, 1]
        interpolation  resize filter: 'bicubic', 'bilinear', ...
        crop_pct       evaluation crop: resize the short side to H / crop_pct, center-crop H x W
    A tagged name ('convnext_base.fb_in22k') gives that tag's values; an untagged one those of
    timm's default tag, the weights that model.pretrained=true loads. `img_size` is
    model.img_size (None: the config's). `in_chans=1` averages mean and std over RGB, which
    matches a stem whose RGB weights were summed (see `create`).
    """
    check_name(name)
    cfg = timm.get_pretrained_cfg(name)
    # an architecture without a pretrained config would get timm's defaults (ImageNet, 224)
    resolved = resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg else {"num_classes": 0})
    height, width = (img_size, img_size) if img_size is not None else resolved["input_size"][1:]

    def per_channel(values: tuple) -> tuple[float, ...]:
        if in_chans == 1:
            return (sum(values) / len(values),)
        return tuple(float(values[i % len(values)]) for i in range(in_chans))

    return {
        "input_size": (in_chans, int(height), int(width)),
        "mean": per_channel(resolved["mean"]),
        "std": per_channel(resolved["std"]),
        "interpolation": resolved["interpolation"],
        "crop_pct": float(resolved["crop_pct"]),
    }


def load_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load a local weights file into timm model `model`; return the keys left at their init.

    Every tensor of the model must come from the file, except the classifier, which is skipped
    (and stays as initialised) when its shape differs: another class count. A file made for
    another architecture fails with the keys that do not fit.
    """
    path = openmmlab.checkpoint_file(path)  # a ModelScope model folder: its weights file
    state = _state_dict(_read_weights_file(path), path)
    state = openmmlab.to_timm(state, model, str(path))  # MMPretrain / MMClassification layouts
    # timm's own per-architecture conversion (original-repo layouts, resampled position
    # embeddings), the one it applies to hub weights; a convention of timm's model modules
    convert = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if convert is not None:
        state = convert(state, model)
    own = model.state_dict()
    _adapt_stem(model, state, own)
    skipped, file_head = _drop_unfitting_head(model, state, own)
    _check_fit(model, state, own, skipped, path)
    model.load_state_dict(state, strict=False)  # strict apart from the skipped classifier
    if skipped:
        # fine-tuning on another class count, as intended, or a dataset that is not the one
        # meant: say both counts
        log.warning(
            "model.weights=%s: the file's classifier (%s) does not fit the %d classes of this "
            "dataset; it is re-initialised and trains from scratch (skipped %s)",
            path,
            ", ".join(f"{k} {shape}" for k, shape in file_head.items()) or "absent",
            model.num_classes,
            ", ".join(skipped),
        )
    log.info("model.weights=%s: %d tensors loaded", path, len(state))
    return skipped


def _read_weights_file(path: Path):
    """The file's content, read without running code from it: safetensors, or
    torch's weights-only unpickler with no fallback to a full unpickle."""
    if not path.is_file():
        raise FileNotFoundError(
            f"model.weights={str(path)!r} does not exist; give a .pth, .pt or .safetensors file "
            "(this repo's checkpoints work too: <run folder>/checkpoints/best.pt)"
        )
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        # timm's train.py saves its arguments as an argparse.Namespace: data, not code;
        # OpenMMLab's meta may hold numpy scalars (openmmlab.safe_globals says which)
        with torch.serialization.safe_globals([argparse.Namespace, *openmmlab.safe_globals()]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        unsafe = _unsafe_globals(path)
        told = f"{err} {err.__cause__}"
        if unsafe or "Unsupported global" in told:  # not junk: named Python objects
            raise ValueError(
                f"model.weights={str(path)!r} holds pickled Python objects besides tensors "
                f"({', '.join(unsafe) or str(err).splitlines()[0]}); refused: unpickling them "
                "could run code from the file. Load a file of tensors only: a .safetensors file, "
                "or a state dict saved with torch.save(model.state_dict(), path) from a source "
                "you trust"
            ) from None
        raise ValueError(
            f"model.weights={str(path)!r} is not a readable weights file "
            f"({type(err).__name__}: {err}); expected a .safetensors file or a torch.save'd "
            "state dict (.pth / .pt), plain or under 'model' / 'state_dict'"
        ) from err


def _adapt_stem(model: nn.Module, state: dict, own: dict) -> None:
    """A stem saved for another channel count, summed or repeated to fit (in place)."""
    first_conv = model.pretrained_cfg.get("first_conv") or ()
    for conv in (first_conv,) if isinstance(first_conv, str) else first_conv:
        key = f"{conv}.weight"
        if key in state and key in own and state[key].ndim == 4:
            have, want = state[key].shape[1], own[key].shape[1]
            if have != want:
                state[key] = adapt_input_conv(want, state[key], base_chans=have)
                log.info("model.weights: stem %s adapted from %d to %d channels", key, have, want)


def _drop_unfitting_head(model: nn.Module, state: dict, own: dict) -> tuple[list[str], dict]:
    """Remove from `state` the classifier keys that are absent or of another shape (another
    class count); return them, and the shapes the file had for them."""
    heads = tuple(f"{m}." for m in _head_modules(model))
    in_head = [k for k in own if k.startswith(heads)]
    skipped = [k for k in in_head if k not in state or state[k].shape != own[k].shape]
    file_head = {k: tuple(state[k].shape) for k in skipped if k in state}
    for key in skipped:
        state.pop(key, None)
    return skipped, file_head


def _check_fit(model: nn.Module, state: dict, own: dict, skipped: list[str], path: Path) -> None:
    """Raise with the keys that do not fit unless `state` covers the model but its classifier."""
    # FrozenBatchNorm2d (model.freeze) saves no num_batches_tracked; a missing one is harmless
    missing = [k for k in own if k not in state and k not in skipped]
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{len(found)} {what}: {', '.join(found[:4])}{', ...' if len(found) > 4 else ''}"
            for what, found in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("of another shape", mismatched),
            )
            if found
        ]
        raise ValueError(
            f"model.weights={str(path)!r} does not fit {model.pretrained_cfg['architecture']!r} "
            f"({'; '.join(problems)}). Is it a file for another architecture, input size or "
            "channel count? Check model.name and model.img_size."
        )


def _state_dict(content, path: Path) -> dict:
    """The weights in a loaded file: unwraps {'model': ...} / {'state_dict': ...}, strips DDP and
    torch.compile prefixes. A checkpoint of this repo (it carries a checksum) is verified first,
    by the check eval and resume run: a bit-flipped file is refused, not fine-tuned from."""
    if isinstance(content, dict) and "checksum" in content:
        # engine/checkpoint.py owns the format: one verification for every reader of it
        from engine.checkpoint import verify

        try:
            content = verify(content, path)
        except ValueError as err:
            raise ValueError(f"model.weights={str(path)!r}: {err}") from None
    if isinstance(content, dict):
        key = next((k for k in ("state_dict", "model") if k in content), None)
        content = content[key] if key else content
    if not isinstance(content, dict):
        raise ValueError(
            f"model.weights={str(path)!r} holds a {type(content).__name__}, not a state dict; "
            "expected a .safetensors file or a torch.save'd state dict (.pth / .pt), plain or "
            "under 'model' / 'state_dict'"
        )
    return clean_state_dict(content)


def _unsafe_globals(path: Path) -> list[str]:
    """The Python names a pickle refers to beyond tensors, read without running it."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip checkpoint, or an older torch: the caller has the error itself
        return []


def freeze_stages(model: nn.Module, freeze: int | str) -> list[str]:
    """Freeze the stem and the first `freeze` stages, or with 'backbone' all but the classifier.

    Stages are the groups of timm's `model.group_matcher(coarse=True)` between the stem and the
    head. Frozen parameters stop requiring grad, and timm's `freeze` turns their BatchNorm
    layers into FrozenBatchNorm2d so that the running statistics stay as loaded too.
    Returns the names of the frozen parameters.
    """
    _check_freeze(freeze)
    heads = tuple(f"{m}." for m in _head_modules(model))
    if freeze == LINEAR_PROBE:
        frozen = [n for n, _ in model.named_parameters() if not n.startswith(heads)]
    else:
        groups = group_parameters(model, model.group_matcher(coarse=True))
        stem, *rest = (groups[k] for k in sorted(groups))
        # the last group(s) hold the classifier (and a final norm or conv with it): not stages
        stages = [g for g in rest if not any(n.startswith(heads) for n in g)]
        if freeze > len(stages):
            raise ValueError(
                f"model.freeze={freeze}: {model.pretrained_cfg['architecture']!r} has "
                f"{len(stages)} stages after its stem; use 0..{len(stages)}, "
                f"{LINEAR_PROBE!r} (a linear probe) or null"
            )
        frozen = [n for group in [stem, *stages[:freeze]] for n in group]

    # the outermost modules whose parameters are all frozen, for timm's freeze (BatchNorm)
    frozen_set = set(frozen)
    covered: list[str] = []
    for name, module in model.named_modules():
        params = [f"{name}.{n}" if name else n for n, _ in module.named_parameters()]
        inside = any(not c or name.startswith(f"{c}.") for c in covered)
        if params and frozen_set.issuperset(params) and not inside:
            covered.append(name)
    total = sum(p.numel() for p in model.parameters())
    freeze_modules(model, covered)
    for name, param in model.named_parameters():  # tensors held by the model itself (pos_embed)
        if name in frozen_set:
            param.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        "model.freeze=%s: %d parameter tensors frozen; %s of %s parameters train",
        freeze,
        len(frozen),
        f"{trainable:,}",
        f"{total:,}",
    )
    return frozen


def _check_freeze(freeze) -> None:
    # bool is an int to Python: `freeze: true` would silently mean "stem and 1 stage"
    if freeze is None or freeze == LINEAR_PROBE:
        return
    if isinstance(freeze, bool) or not isinstance(freeze, int) or freeze < 0:
        raise ValueError(f"model.freeze={freeze!r} is not understood; {FREEZE_HELP}")


def _head_modules(model: nn.Module) -> list[str]:
    """Names of the classifier module(s) (`model.get_classifier()`), e.g. ['fc'], ['head.fc']."""
    heads = model.get_classifier()
    ids = {id(h) for h in (heads if isinstance(heads, tuple | list) else (heads,))}
    return [name for name, module in model.named_modules() if id(module) in ids]
