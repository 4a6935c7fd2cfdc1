"""Config -> objects. The one module besides run.py that reads the Hydra config.

Everything below hands plain keyword arguments or built objects to models/, data/ and the loop.
"""

import logging
import math
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from data import Splits
from data.loaders import make_loaders
from engine import checkpoint
from engine.checkpoint import CheckpointSaver
from engine.logger import RunLogger

log = logging.getLogger(__name__)


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
    splits: Splits = instantiate(cfg.data.dataset)
    loader_kwargs = {k: v for k, v in cfg.data.items() if k != "dataset"}
    train_loader, val_loader = make_loaders(splits, **loader_kwargs)
    return splits, train_loader, val_loader


def build_model(cfg: DictConfig, splits: Splits) -> nn.Module:
    return instantiate(cfg.model, num_classes=len(splits.classes), in_chans=splits.in_chans)


def build_optimizer(cfg: DictConfig, model: nn.Module):
    params = [p for p in model.parameters() if p.requires_grad]
    return instantiate(cfg.optim)(params)


def updates_per_epoch(cfg: DictConfig, train_loader) -> int:
    batches = len(train_loader)
    if cfg.trainer.limit_train_batches is not None:
        batches = min(batches, cfg.trainer.limit_train_batches)
    return math.ceil(batches / cfg.trainer.accum_steps)


def build_scheduler(cfg: DictConfig, optimizer, steps_per_epoch: int):
    total = steps_per_epoch * cfg.trainer.epochs
    return instantiate(cfg.sched)(optimizer, total_steps=total, steps_per_epoch=steps_per_epoch)


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
