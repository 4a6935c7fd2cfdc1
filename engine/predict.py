"""A trained model from what this repo writes, and top-k predictions with it.

    from engine.predict import Classifier
    classifier = Classifier.load("outputs/2026-11-22/10-00-00-000000")  # or a .pt / .safetensors
    classifier("cat.jpg")        # [{"label": "tabby", "score": 0.91, "index": 3}, ...]

A multi-label model (trained on multi-hot targets) scores each class with a sigmoid; its list
holds every label scoring at least `threshold` (0.5), then the next best up to `topk`, each with
"positive" (score >= threshold) and the "threshold" used:
    [{"label": "3", "score": 0.97, "index": 3, "positive": true, "threshold": 0.5}, ...]

A checkpoint (or an exported .safetensors file with its .json sidecar) carries the model config,
the class names and the preprocessing, so nothing else is needed: a model trained on 7 classes
predicts those 7 names.
"""

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from data.images import is_image_file, load_image
from data.transforms import file_transform
from engine import checkpoint

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "imgcls-safetensors/1"  # the "format" entry of an exported weights' .json


@dataclass
class Trained:
    """A model rebuilt from a checkpoint or an export, with what it needs to be used."""

    model: nn.Module  # in eval mode, on the CPU
    classes: list[str]
    preprocess: dict  # data.transforms.file_transform's keyword arguments
    config: dict  # the run's resolved config
    source: Path  # the file the weights came from
    info: dict = field(default_factory=dict)  # epoch, metrics, weights (model / ema), W&B run id

    @property
    def model_name(self) -> str:
        return self.config["model"]["name"]


def latest_run(root: str | Path = "outputs") -> Path:
    """The newest run folder under `root` (outputs/<date>/<time>) with checkpoints/best.pt.

    Newest by the folder's name, the time the run started. A run that failed before training
    has no best.pt (and leaves no folder), so it is never the one taken.
    """
    runs = sorted(p.parent.parent for p in Path(root).glob("*/*/checkpoints/best.pt"))
    if not runs:
        raise FileNotFoundError(
            f"no run with checkpoints/best.pt under {str(root)!r}: train one (python run.py) "
            "or name a run folder, checkpoint or .safetensors file"
        )
    return runs[-1]


def weights_file(ckpt: str | Path | None) -> Path:
    """The file to load for `ckpt`: a run folder's checkpoints/best.pt, or the file itself.

    None: the newest run under outputs/, named in a log line with what it was trained on,
    since a wrong guess would otherwise show only as wrong labels.
    """
    if ckpt is None:
        path = latest_run()
        log.info(
            "no checkpoint given: using %s, the newest run under outputs/ with "
            "checkpoints/best.pt (%s); name another with task.ckpt=<run folder> (run=... in "
            "analysis tools)",
            path,
            describe_run(path),
        )
    else:
        path = Path(ckpt).expanduser()
    if path.is_dir():
        best = path / "checkpoints" / "best.pt"
        if not best.is_file():
            raise FileNotFoundError(
                f"{str(path)!r} has no checkpoints/best.pt; give a run folder "
                "(outputs/<date>/<time>), a checkpoint file or an exported .safetensors file"
            )
        return best
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist; give a run folder (outputs/<date>/<time>), "
            "a checkpoint file (.pt) or an exported .safetensors file"
        )
    return path


def data_name(data: dict) -> str:
    """A data config in a few words: its builder's name, and the folder of a folder dataset."""
    dataset = data.get("dataset") or {}
    name = str(dataset.get("_target_", "?")).rsplit(".", 1)[-1]
    root = dataset.get("root")
    return f"{name} in {root}" if root and name in FOLDER_DATASETS else name


FOLDER_DATASETS = ("imagefolder", "imagenet", "annfile")  # where the folder says what the data is


def describe_run(run_dir: Path) -> str:
    """ "resnet18 on digits, 6/6 epochs, best val/acc1 97.50", from the run's config.yaml and
    metrics.jsonl (plain YAML and JSON: reading them runs nothing)."""
    import yaml

    words = []
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        words.append(f"{config['model']['name']} on {data_name(config['data'])}")
        epochs = config["trainer"]["epochs"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return "no readable config.yaml"
    records = _records(run_dir / "metrics.jsonl")
    done = max((r["epoch"] for r in records if "epoch" in r), default=0)
    words.append(f"{done}/{epochs} epochs")
    best = next((r["summary"] for r in reversed(records) if "summary" in r), {})
    metric = best.get("best/metric", "val/acc1")  # the run's checkpoint.best_metric
    if isinstance(best.get(f"best/{metric}"), int | float):
        words.append(f"best {metric} {best[f'best/{metric}']:.2f}")
    return ", ".join(words)


def _records(path: Path) -> list[dict]:
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if isinstance(record, dict):
                records.append(record)
    return records


def load_trained(ckpt: str | Path | None = None, use_ema: bool = False) -> Trained:
    """The model of a run folder, checkpoint or exported .safetensors file, in eval mode.

    use_ema: the checkpoint's EMA weights (trainer.ema_decay) instead of the trained ones.
    Files are read with weights_only=True or safetensors: loading never runs code.
    """
    source = weights_file(ckpt)
    if source.suffix == ".safetensors":
        return _load_safetensors(source, use_ema)
    ckpt = checkpoint.load(source)
    if use_ema and "ema" not in ckpt:
        raise ValueError(
            f"use_ema=true but {str(source)!r} holds no EMA weights (the run had "
            "trainer.ema_decay=null); leave use_ema false"
        )
    weights = "ema" if use_ema else "model"
    preprocess = ckpt.get("preprocess")
    if preprocess is None:
        raise ValueError(
            f"{str(source)!r} records no preprocessing (a checkpoint from before it was stored); "
            "evaluate it with task=eval, which rebuilds the dataset from its config"
        )
    saved = ("epoch", "step", "best", "metrics", "wandb_run_id", "temperature")
    info = {k: ckpt.get(k) for k in saved}
    info["multi_label"] = bool(ckpt.get("multi_label", False))  # sigmoid scores, not softmax
    return _build(
        ckpt["config"],
        ckpt["class_names"],
        preprocess,
        ckpt[weights],
        ckpt.get("in_chans"),
        source,
        {**info, "weights": weights},
    )


def _load_safetensors(source: Path, use_ema: bool) -> Trained:
    from safetensors.torch import load_file

    sidecar = source.with_suffix(".json")
    if not sidecar.is_file():
        raise FileNotFoundError(
            f"{str(source)!r} has no sidecar {sidecar.name} (class names, preprocessing, config); "
            "export with task=export, or load the bare weights with model.weights=<file>"
        )
    meta = json.loads(sidecar.read_text())
    found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    if found != SIDECAR_FORMAT:
        raise ValueError(
            f"{str(sidecar)!r} is not an export sidecar of this repo "
            f"(format {found!r}, expected {SIDECAR_FORMAT!r})"
        )
    if use_ema and meta.get("weights") != "ema":
        raise ValueError(
            f"use_ema=true but {str(source)!r} holds the {meta.get('weights')} weights"
        )
    return _build(
        meta["config"],
        meta["class_names"],
        meta["preprocess"],
        load_file(source),
        meta.get("in_chans"),
        source,
        {k: v for k, v in meta.items() if k not in ("config", "class_names", "preprocess")},
    )


def _build(config, classes, preprocess, state, in_chans, source, info) -> Trained:
    from engine.build import build_model_for
    from engine.checks import check_saved_config

    # before OmegaConf reads it (a checkpoint's or a sidecar's): it is a file's content
    check_saved_config(config, source)
    if in_chans is None:
        in_chans = int(preprocess["input_size"][0])
    cfg = OmegaConf.create(config)
    # the architecture only: the trained weights replace whatever model.weights pointed at
    model = build_model_for(cfg, num_classes=len(classes), in_chans=in_chans, load_weights=False)
    model.load_state_dict(state)
    return Trained(model.eval(), list(classes), dict(preprocess), config, source, info)


def image_files(inputs: str | Path) -> list[Path]:
    """`inputs` if it is an image file; the image files under it (sorted, recursive) if a folder;
    [the URL] for an http(s) URL (engine/fetch.py downloads it when it is classified)."""
    from engine.fetch import is_url

    if is_url(inputs):
        return [inputs]
    path = Path(inputs).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
        if not files:
            raise FileNotFoundError(f"{str(path)!r} holds no image files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    return [path]


class Classifier:
    """Top-k predictions of a trained model on image files, PIL images or tensors; for a
    multi-label model, every label at or above `threshold` and the top-k (module docstring)."""

    def __init__(
        self,
        trained: Trained,
        device: str | torch.device = "cpu",
        topk: int = 5,
        threshold: float = 0.5,
        min_score: float | None = None,
    ):
        if min_score is not None and not 0 <= min_score <= 1:
            raise ValueError(f"min_score={min_score} must be a probability in [0, 1] or null")
        self.trained = trained
        self.min_score = min_score
        # task=calibrate's temperature scaling (1: none, or a checkpoint from before it)
        self.temperature = float(trained.info.get("temperature") or 1.0)
        self.device = torch.device(device)
        self.model = trained.model.to(self.device).eval()
        self.classes = trained.classes
        self.transform = file_transform(**trained.preprocess)
        self.topk, self.threshold = topk, threshold
        self.multi_label = bool(trained.info.get("multi_label", False))
        if self.multi_label and not 0 < threshold < 1:
            raise ValueError(f"task.threshold={threshold!r} must be between 0 and 1, e.g. 0.5")

    @classmethod
    def load(
        cls,
        ckpt: str | Path | None = None,
        use_ema: bool = False,
        device: str | torch.device = "cpu",
        topk: int = 5,
        threshold: float = 0.5,
        min_score: float | None = None,
    ) -> "Classifier":
        """From a run folder, checkpoint or exported .safetensors (None: the newest run)."""
        trained = load_trained(ckpt, use_ema=use_ema)
        return cls(trained, device=device, topk=topk, threshold=threshold, min_score=min_score)

    @classmethod
    def from_model(
        cls,
        name: str,
        weights: str | Path | None = None,
        device: str | torch.device = "cpu",
        topk: int = 5,
    ) -> "Classifier":
        """A model with no run, in one line: timm model `name` with a `weights` file (an
        MMPretrain / MMClassification checkpoint with its class names and preprocessing, a
        timm file), or with None timm's hub weights and ImageNet names.

            Classifier.from_model("convnext_base", "garbage.pth")("https://.../bottle.jpg")
        """
        from engine.pretrained import load_named

        weights = str(weights) if weights is not None else None
        trained = load_named(name, weights, pretrained=weights is None)
        return cls(trained, device=device, topk=topk)

    def labels_and_scores(self, image, topk: int | None = None) -> dict:
        """The top-k of one image as ModelScope's classification pipelines and MMPretrain's
        inferencers give it: {"labels": [...], "scores": [...]}, best first."""
        top = self(image, topk)
        return {"labels": [p["label"] for p in top], "scores": [p["score"] for p in top]}

    def to_input(self, image) -> torch.Tensor:
        """An image file path or http(s) URL, a PIL image, or a (C, H, W) tensor already
        preprocessed."""
        if isinstance(image, torch.Tensor):
            if image.ndim != 3:
                raise ValueError(
                    f"a tensor input is one preprocessed image (C, H, W); got {tuple(image.shape)}"
                )
            return image
        from engine.fetch import fetch_image, is_url

        if is_url(image):
            image = fetch_image(image)
        elif isinstance(image, str | Path):
            image = load_image(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"cannot classify a {type(image).__name__}: give a path, PIL or tensor")
        return self.transform(image)

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Softmax over the classes (a multi-label model: the sigmoid of each class) of a
        preprocessed (N, C, H, W) batch, on the CPU, float32, of the logits divided by the
        checkpoint's temperature (task=calibrate)."""
        logits = self.model(batch.to(self.device)).float() / self.temperature
        return (logits.sigmoid() if self.multi_label else logits.softmax(-1)).cpu()

    def top(self, probs: torch.Tensor, topk: int | None = None) -> list[list[dict]]:
        """Each image's top-k; multi-label: every label >= threshold, then the top-k."""
        k = min(topk or self.topk, len(self.classes))
        rows = []
        for row in probs:
            above = int((row >= self.threshold).sum()) if self.multi_label else 0
            scores, indices = row.topk(max(k, above))
            pairs = zip(scores.tolist(), indices.tolist(), strict=True)
            rows.append([self._entry(score, index) for score, index in pairs])
        if self.min_score is not None:  # the best label is flagged: below min_score, abstain
            for top in rows:
                top[0]["abstain"] = top[0]["score"] < self.min_score
        return rows

    def _entry(self, score: float, index: int) -> dict:
        entry = {"label": self.classes[index], "score": score, "index": index}
        if self.multi_label:
            entry.update(positive=score >= self.threshold, threshold=self.threshold)
        return entry

    def predict(self, images: Sequence, topk: int | None = None, batch_size: int = 32):
        """Top-k lists of several images (paths, PIL images or tensors), in order."""
        results = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.to_input(x) for x in images[start : start + batch_size]])
            results += self.top(self.probabilities(batch), topk)
        return results

    def __call__(self, image, topk: int | None = None) -> list[dict]:
        """The top-k list of one image: [{"label", "score", "index"}, ...], best first."""
        return self.predict([image], topk)[0]

    @torch.inference_mode()
    def features(self, images, batch_size: int = 32) -> torch.Tensor:
        """(N, num_features) float32 on the CPU: the pooled features the classifier reads
        (timm's forward_features, then forward_head(pre_logits=True)) of images as `predict`
        takes them (paths, URLs, PIL images, preprocessed tensors), with the same
        preprocessing, or a preprocessed (N, C, H, W) batch. One image (not in a list) gives
        (1, num_features)."""
        from models.features import pooled_features

        if isinstance(images, str | Path | Image.Image) or (
            torch.is_tensor(images) and images.ndim == 3
        ):
            images = [images]
        out = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.to_input(x) for x in images[start : start + batch_size]])
            out.append(pooled_features(self.model, batch.to(self.device)).float().cpu())
        return torch.cat(out)


def write_predictions(files: Sequence[Path], results: list[list[dict]], out: str | Path) -> Path:
    """Predictions as JSON ([{"path", "predictions": [{"label", "score", "index"}, ...]}, ...])
    or, for a .csv `out`, one row per image and rank (path, rank, label, score, index)."""
    from engine.runinfo import atomic_write_text

    out = Path(out)
    if out.suffix.lower() not in (".json", ".csv"):
        raise ValueError(f"task.out={str(out)!r}: write predictions to a .json or .csv file")
    if out.suffix.lower() == ".json":
        rows = [{"path": str(f), "predictions": r} for f, r in zip(files, results, strict=True)]
        atomic_write_text(out, json.dumps(rows, indent=1) + "\n")
        return out
    import csv
    import io

    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["path", "rank", "label", "score", "index"])
    for path, result in zip(files, results, strict=True):
        for rank, p in enumerate(result, start=1):
            writer.writerow([str(path), rank, p["label"], f"{p['score']:.6f}", p["index"]])
    atomic_write_text(out, text.getvalue())
    return out


def print_predictions(files: Sequence[Path], results: list[list[dict]]) -> None:
    """A table: each image with its top-k labels and scores."""
    from rich.console import Console
    from rich.table import Table

    table = Table("image", "prediction", "score", title="predictions")
    for path, result in zip(files, results, strict=True):
        for rank, p in enumerate(result):
            table.add_row(str(path) if rank == 0 else "", p["label"], f"{p['score']:.3f}")
        table.add_section()
    Console().print(table)
