"""A model with no run behind it, for eval, predict, serve, export and Grad-CAM: timm's hub
weights (`model.pretrained=true`) or a weights file (`model.weights=<file>`, or such a file as
`task.ckpt`): an MMPretrain / MMClassification checkpoint (what ModelScope's classification
cards ship), a timm file or a plain state dict.

    python run.py task=predict model=convnext_base model.weights=garbage.pth task.inputs=photos/
    python run.py task=predict model=convnext_base model.pretrained=true task.inputs=cat.jpg

Class names: the checkpoint's (`meta.dataset_meta.classes`, `meta.CLASSES`); else timm's
ImageNet label descriptions for a 1000 / 21k-class model; else the class indices. Preprocessing:
the checkpoint's config's (mean / std, resize, crop); else timm's pretrained config for the name.
"""

import logging
from pathlib import Path

from torch import nn

from engine.predict import Trained
from models import openmmlab
from models.timm_models import load_weights, preprocessing

log = logging.getLogger(__name__)


def is_run_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a checkpoint this repo wrote (or an export of one), not bare weights.

    Read with weights_only=True and mmap (tensors are not read): nothing in it runs. A file
    that cannot be read so is left to the checkpoint loader, whose message says why."""
    path = Path(path).expanduser()
    if openmmlab.is_modelscope_folder(path) and not (path / "checkpoints" / "best.pt").is_file():
        return False  # a ModelScope model folder, not a run folder
    if path.is_dir() or path.suffix == ".safetensors" or not path.is_file():
        return True  # run folders and exports; a missing path gets the loader's message
    try:
        content = openmmlab.load_lazily(path)
    except Exception:
        return True
    return isinstance(content, dict) and "config" in content and "model" in content


def load_pretrained(
    build_model, name: str, weights: str | None, img_size: int | None, config: dict
) -> Trained:
    """Model `name` with the `weights` file (None: timm's hub weights), in eval mode, with class
    names and preprocessing, as engine.predict.load_trained gives a run's model.

    build_model(num_classes, hub_weights) builds the configured architecture (with timm's hub
    weights when hub_weights): the engine's builder. config: the composed config, kept as the
    model's (an export's sidecar rebuilds the architecture from it).
    """
    path = Path(weights).expanduser() if weights else None
    read = openmmlab.read(path) if path else {}
    classes = read.get("classes")
    count = len(classes) if classes else read.get("num_classes")
    if count is None:  # hub weights, or a file without class names: timm's class count
        count = _timm_num_classes(name)
    model = build_model(count, hub_weights=path is None)
    if path is not None:
        skipped = load_weights(model, path)
        if skipped:  # a classifier left at its init would predict noise
            raise ValueError(
                f"model.weights={weights!r}: its classifier does not fit {count} classes "
                f"({', '.join(skipped)}); predictions need the file's own classifier. Its class "
                "count is timm's for model.name, so give the model.name the file was made for"
            )
    classes = classes or _class_names(model, count)
    preprocess = read.get("preprocess") or preprocessing(name, img_size)
    log.info(
        "no run: %s with %s, %d classes (%s), preprocessing %s",
        name,
        f"the weights of {weights}" if path else "timm's hub weights",
        count,
        "the checkpoint's names" if read.get("classes") else "from timm, or indices",
        "from the checkpoint's config" if read.get("preprocess") else "of timm's pretrained config",
    )
    source = path or Path(f"timm-hub/{name}")
    info = {"weights": "model", "pretrained": path is None}
    return Trained(model.eval(), list(classes), dict(preprocess), config, source, info)


def _timm_num_classes(name: str) -> int:
    import timm

    cfg = timm.get_pretrained_cfg(name)
    return int((cfg.num_classes if cfg else None) or 1000)


def _class_names(model: nn.Module, count: int) -> list[str]:
    """timm's label descriptions for an ImageNet-sized classifier, else the indices."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    if subset:
        names = ImageNetInfo(subset).label_descriptions()
        if len(names) == count:
            return list(names)
    log.warning(
        "no class names in the weights: the classes are named by their index 0..%d", count - 1
    )
    return [str(i) for i in range(count)]


def load_named(name: str, weights: str | None = None, pretrained: bool = False) -> Trained:
    """timm model `name` with a weights file or timm's hub weights, for tools that take a model
    without Hydra (analysis/cam.py model=... model.weights=...): load_pretrained with the
    repo's model builder, models.timm_models.create."""
    from models.timm_models import create

    if bool(weights) == bool(pretrained):
        raise ValueError(
            f"model={name!r}: give its weights, model.weights=<file> or model.pretrained=true "
            "(one of them)"
        )

    def build_model(num_classes: int, hub_weights: bool) -> nn.Module:
        return create(name, num_classes=num_classes, pretrained=hub_weights)

    model_cfg = {
        "_target_": "models.timm_models.create",
        "name": name,
        "pretrained": bool(pretrained),
        "weights": weights,
    }
    return load_pretrained(build_model, name, weights, None, {"model": model_cfg})
