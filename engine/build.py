"""Config -> objects. The one module besides run.py that reads the Hydra config.

Everything below hands plain keyword arguments or built objects to models/, data/ and the loop.
"""

import logging
import math
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from data import Splits
from data.kfold import kfold
from data.loaders import make_loaders
from data.transforms import image_transforms
from engine import checkpoint
from engine.checkpoint import CheckpointSaver
from engine.logger import RunLogger
from models.timm_models import preprocessing

log = logging.getLogger(__name__)


def build(node: DictConfig, *args, **kwargs):
    """hydra.utils.instantiate, raising our builders' own errors as they were written.

    models/, data/ and engine/ name the bad key and its fix; Hydra's wrapper would print that
    message as a repr with escaped quotes inside its own.
    """
    try:
        return instantiate(node, *args, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ValueError | RuntimeError | OSError):
            raise err.__cause__ from None
        raise


def plain(cfg: DictConfig) -> dict:
    """The resolved config as plain dicts and lists: for files, W&B and checkpoints."""
    return OmegaConf.to_container(cfg, resolve=True)


def resolve_run(cfg: DictConfig) -> tuple[DictConfig, Path, dict | None]:
    """Where this run writes, and what it resumes from: (config, run folder, checkpoint or None).

    resume=null: a fresh run in Hydra's output folder.
    resume=auto: the newest valid checkpoint of Hydra's output folder, if any.
    resume=<checkpoint file or run folder>: that run continues in its own folder, with the
    config stored in its checkpoint; plain `key=value` overrides on the command line apply on top.
    """
    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    resume = cfg.get("resume")
    if resume is None:
        return cfg, hydra_dir, None
    if resume == "auto":
        found = checkpoint.find_latest(hydra_dir / "checkpoints")
        if found is None:
            log.info("resume=auto: no checkpoint in %s, starting fresh", hydra_dir)
            return cfg, hydra_dir, None
        return cfg, hydra_dir, _load_for_resume(found)
    path = Path(str(resume)).expanduser()
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = checkpoint.find_latest(folder)
        if found is None:
            raise FileNotFoundError(
                f"resume={resume!r}: no valid checkpoint in {folder}; give a checkpoint file "
                "(<run folder>/checkpoints/last.pt) or a run folder that has one"
            )
        path = found
    elif not path.is_file():
        raise FileNotFoundError(
            f"resume={resume!r} does not exist; give a checkpoint file "
            "(<run folder>/checkpoints/last.pt), a run folder (outputs/<date>/<time>) or auto"
        )
    state = _load_for_resume(path)
    saved = OmegaConf.create(state["config"])
    _apply_overrides(saved, HydraConfig.get().overrides.task)
    saved.resume = str(path)
    log.info("resuming %s: the run continues in %s", path, path.parent.parent)
    return saved, path.parent.parent, state


def _load_for_resume(path: Path) -> dict:
    state = checkpoint.load(path)
    if "optimizer" not in state:
        raise ValueError(
            f"{str(path)!r} holds weights only (no training state) and cannot be resumed"
        )
    return state


def _apply_overrides(saved: DictConfig, overrides: list[str]) -> None:
    """Command-line `key=value` overrides onto a run's saved config (group choices cannot change)."""
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key == "resume" or key.startswith("hydra"):
            continue
        node = OmegaConf.select(saved, key)
        if isinstance(node, DictConfig):
            raise ValueError(
                f"{override.input_line!r}: a resumed run keeps its {key} choice; start a new run "
                f"to change it, or override single keys ({key}.<name>=...)"
            )
        OmegaConf.update(saved, key, override.value(), force_add=True)


def build_data(cfg: DictConfig) -> tuple[Splits, object, object]:
    late = {}
    if cfg.data.get("transform") is not None:
        # the model's input size, mean, std, interpolation and crop_pct where data.transform
        # leaves them null; datasets without a transform key keep their own preprocessing
        keys = OmegaConf.to_container(cfg.data.transform, resolve=True)
        model = preprocessing(cfg.model.name, img_size=cfg.model.get("img_size"))
        keys.update({k: v for k, v in model.items() if keys.get(k) is None})
        late["train_transform"], late["eval_transform"] = image_transforms(**keys)
    splits: Splits = build(cfg.data.dataset, **late)
    if cfg.data.get("fold") is not None:
        splits = kfold(
            splits, fold=cfg.data.fold, num_folds=cfg.data.num_folds, fold_seed=cfg.data.fold_seed
        )
    not_loader = ("dataset", "transform", "fold", "num_folds", "fold_seed")
    loader_kwargs = {k: v for k, v in cfg.data.items() if k not in not_loader}
    train_loader, val_loader = make_loaders(splits, **loader_kwargs)
    return splits, train_loader, val_loader


def build_model(cfg: DictConfig, splits: Splits) -> nn.Module:
    return build_model_for(cfg, num_classes=len(splits.classes), in_chans=splits.in_chans)


def build_model_for(
    cfg: DictConfig, *, num_classes: int, in_chans: int, load_weights: bool = True
) -> nn.Module:
    """cfg's model for a class and channel count given without loading the dataset (analysis).

    load_weights=False builds the architecture only (model.pretrained and model.weights off):
    for tools that look at shapes, which weights do not change, and that must work offline.
    """
    late = {} if load_weights else {"pretrained": False, "weights": None}
    return build(cfg.model, num_classes=num_classes, in_chans=in_chans, **late)


def build_optimizer(cfg: DictConfig, model: nn.Module):
    # the batch one update sees: per-process batch x accumulation x processes
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    global_batch_size = cfg.data.batch_size * cfg.trainer.accum_steps * world_size
    return build(cfg.optim)(model, global_batch_size=global_batch_size)


def updates_per_epoch(cfg: DictConfig, train_loader) -> int:
    batches = len(train_loader)
    if cfg.trainer.limit_train_batches is not None:
        batches = min(batches, cfg.trainer.limit_train_batches)
    return math.ceil(batches / cfg.trainer.accum_steps)


def build_scheduler(cfg: DictConfig, optimizer, steps_per_epoch: int):
    total = steps_per_epoch * cfg.trainer.epochs
    return build(cfg.sched)(optimizer, total_steps=total, steps_per_epoch=steps_per_epoch)


def build_logger(cfg: DictConfig, run_dir: Path, resume: dict | None) -> RunLogger:
    wandb_init = None
    if cfg.logger.wandb is not None:
        wandb_init = OmegaConf.to_container(cfg.logger.wandb, resolve=True)
        if wandb_init.get("group") is None and HydraConfig.get().mode == RunMode.MULTIRUN:
            # all jobs of one `-m` sweep form one W&B group, named after the sweep folder
            wandb_init["group"] = HydraConfig.get().sweep.dir.replace("/", "_")
    return RunLogger(
        run_dir,
        config=plain(cfg),
        wandb_init=wandb_init,
        resume_id=resume.get("wandb_run_id") if resume else None,
        resume_step=resume["step"] if resume else None,
    )


def build_saver(
    cfg: DictConfig, run_dir: Path, class_names: list[str], wandb_run_id
) -> CheckpointSaver:
    metadata = {
        "config": plain(cfg),
        "class_names": list(class_names),
        "wandb_run_id": wandb_run_id,
    }
    return CheckpointSaver(run_dir / "checkpoints", **cfg.checkpoint, metadata=metadata)
