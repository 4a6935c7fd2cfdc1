"""Config -> objects. The one module besides run.py that reads the Hydra config.

Everything below hands plain keyword arguments or built objects to models/, data/ and the loop.
"""

import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from data import Splits
from data.kfold import kfold
from data.loaders import eval_loader, make_loaders
from data.multilabel import is_multi_label
from data.transforms import image_transforms, photo_preprocess
from engine import checkpoint, checks, distributed, errors
from engine.checkpoint import CheckpointSaver, NullSaver
from engine.device import resolve_device
from engine.imbalance import log_distribution_chart, report_distribution
from engine.logger import NullLogger, RunLogger
from engine.objective import Objective, build_objective, upgrade_legacy_keys
from engine.rng import seed_everything
from models.timm_models import preprocessing

log = logging.getLogger(__name__)


def build(node: DictConfig, *args, **kwargs):
    """hydra.utils.instantiate, raising our builders' own errors as they were written.

    models/, data/ and engine/ name the bad key and its fix; Hydra's wrapper would print that
    message as a repr with escaped quotes inside its own. Every `_target_` in `node` is checked
    against the allow-list first (engine/checks.py): a config read from a checkpoint or sidecar
    file cannot make this call anything else.
    """
    checks.check_targets(node)
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
        return cfg, hydra_dir, _resume_auto(hydra_dir)
    path = Path(str(resume)).expanduser()
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        try:
            found = checkpoint.find_latest(folder)
        except checkpoint.NoValidCheckpoint as err:
            raise ValueError(
                f"resume={resume!r}: {err}\nGive another checkpoint file, or start a fresh run "
                "with resume=null"
            ) from err
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
    checks.check_saved_config(state["config"], path)
    saved = OmegaConf.create(state["config"])
    upgrade_config(saved)  # a run saved before conf/loss/ and the mixup block
    _apply_overrides(saved, HydraConfig.get().overrides.task)
    upgrade_config(saved)  # trainer.label_smoothing=... given on this command line
    saved.resume = str(path)
    checks.check_config(saved)  # the checkpoint's config is a file's content: check it as well
    log.info("resuming %s: the run continues in %s", path, path.parent.parent)
    return saved, path.parent.parent, state


def upgrade_config(cfg: DictConfig) -> DictConfig:
    """Move the keys of before (trainer.label_smoothing, trainer.mixup_alpha, ...) to their new
    places (engine/objective.py), saying so in the log: for composed and saved configs alike."""
    for message in upgrade_legacy_keys(cfg):
        log.warning(message)
    return cfg


def _resume_auto(hydra_dir: Path) -> dict | None:
    """resume=auto: the newest valid checkpoint of this run's folder, loaded; None if it has none."""
    # rank 0's pick: every process of a data-parallel run loads the same checkpoint
    found = refused = None
    if distributed.is_main():
        try:
            found = checkpoint.find_latest(hydra_dir / "checkpoints")
        except checkpoint.NoValidCheckpoint as err:
            refused = str(err)
    found, refused = distributed.from_main((found, refused))
    if refused:
        raise ValueError(
            f"resume=auto: {refused}\nResume from another checkpoint "
            "(resume=<checkpoint file>), or start a fresh run with resume=null"
        )
    if found is None:
        if not errors.holds_only_hydra_files(hydra_dir, HydraConfig.get().job.name):
            # a folder used before (a requeued job, a fixed hydra.run.dir): worth a line;
            # a new run's new folder starts fresh by definition
            log.info("resume=auto: no checkpoint in %s, starting fresh", hydra_dir)
        return None
    return _load_for_resume(found)


def _load_for_resume(path: Path) -> dict:
    try:
        state = checkpoint.load(path)
    except ValueError as err:
        raise ValueError(
            f"resume: {err}. Give a checkpoint of this repo "
            "(<run folder>/checkpoints/last.pt), a run folder (outputs/<date>/<time>) or auto"
        ) from err
    if "optimizer" not in state:
        raise ValueError(
            f"{str(path)!r} holds weights only (no training state) and cannot be resumed"
        )
    # resume=<file>, <folder> and auto alike: the saved config is a file's content
    checks.check_saved_config(state["config"], path)
    return state


def _apply_overrides(saved: DictConfig, overrides: list[str], keeps: str = "a resumed run") -> None:
    """Command-line `key=value` overrides onto a run's saved config (group choices cannot change)."""
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key == "resume" or key.startswith("hydra"):
            continue
        node = OmegaConf.select(saved, key)
        if isinstance(node, DictConfig):
            raise ValueError(
                f"{override.input_line!r}: {keeps} keeps its {key} choice; start a new run "
                f"to change it, or override single keys ({key}.<name>=...)"
            )
        OmegaConf.update(saved, key, override.value(), force_add=True)


def config_for_trained(
    cfg: DictConfig, saved: dict, no_run: bool = False
) -> tuple[DictConfig, Path]:
    """(config, output folder) for using a trained model: eval, export checks.

    The model's saved config, with this job's task, logger and paths; its data config unless
    `data=<option>` is on the command line; command-line `key=value` overrides on top.
    no_run: a model with no run behind it (trained_for_task): `saved` is this job's config, and
    its model overrides are already in it.
    """
    overrides = HydraConfig.get().overrides.task
    parsed = OverridesParser.create().parse_overrides(overrides)
    chosen = {o.key_or_group for o in parsed if "." not in o.key_or_group}
    run_cfg = OmegaConf.create(saved)
    for key in ("task", "logger", "paths"):
        run_cfg[key] = cfg[key]
    if "data" in chosen:
        run_cfg.data = cfg.data
    plain_overrides = [
        o.input_line
        for o in parsed
        if o.key_or_group.split(".")[0] not in ("task", "logger", *(("model",) if no_run else ()))
        and o.key_or_group != "data"
    ]
    _apply_overrides(run_cfg, plain_overrides, keeps="a trained model")
    checks.check_targets(run_cfg)  # the saved config is a file's content: nothing built yet
    _say_which_data(saved.get("data") or {}, plain(run_cfg.data), "data" in chosen)
    return run_cfg, Path(HydraConfig.get().runtime.output_dir)


def _say_which_data(trained_on: dict, used: dict, chosen: bool) -> None:
    """Log which data a trained model is used with, and whether that is what it was trained on.

    Without data=<option> on the command line the model's own data config is used, not the
    composed default (data=digits): that default was nobody's choice, and a CIFAR model scored
    on digits tells nothing. A data=<option> that differs is the user's choice: used, and named.
    """
    from engine.predict import data_name

    default = HydraConfig.get().runtime.choices.get("data")
    if not chosen:
        other = "" if data_name(used).startswith(str(default)) else f", not data={default}"
        log.info(
            "data: %s, the data config saved with the model%s (data=<option> uses other data)",
            data_name(used),
            other,
        )
    elif data_name(used) != data_name(trained_on):
        log.warning(
            "data=%s: using %s, not %s that the model was trained on; its classes must be the "
            "model's",
            default,
            data_name(used),
            data_name(trained_on),
        )


@dataclass
class Training:
    """Everything `engine.loop.fit` needs, built from a composed config by `training(cfg)`.

    The logger and saver are made when the run starts (`logger()`, `saver(logger)`): the W&B
    run and the checkpoint folder appear only once everything else was built.
    """

    cfg: DictConfig
    run_dir: Path | None  # None: nothing is written (a null logger and saver)
    resume: dict | None  # a loaded checkpoint to continue from
    splits: Splits
    model: nn.Module
    train_loader: object
    val_loader: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    objective: Objective  # the losses and batch mixing (conf/loss/, the mixup block)

    def logger(self, job_type: str = "train"):
        """W&B and metrics.jsonl (a context manager); a null logger without a run folder."""
        if self.run_dir is None:
            return NullLogger()
        return build_logger(self.cfg, self.run_dir, self.resume, job_type)

    def saver(self, logger):
        """The checkpoint saver, which stores the logger's W&B run id for resuming."""
        if self.run_dir is None:
            return NullSaver(Path("checkpoints"), **best_choice(self.cfg, self.splits))
        return build_saver(self.cfg, self.run_dir, self.splits, logger.run_id)

    def fit(self, logger, saver, **trainer) -> dict:
        """engine.loop.fit of these objects with cfg.trainer's keys (`trainer` overrides some)."""
        from engine.loop import fit

        if self.resume is None:
            log_distribution_chart(logger, self.splits)
        return fit(
            self.model,
            self.train_loader,
            self.val_loader,
            self.optimizer,
            self.scheduler,
            logger,
            saver,
            seed=self.cfg.seed,
            num_classes=len(self.splits.classes),
            resume=self.resume,
            objective=self.objective,
            **{**self.cfg.trainer, **trainer},
        )


def training(
    cfg: DictConfig, run_dir: Path | None = None, resume: dict | None = None, data=None
) -> Training:
    """The data, model, optimizer and LR schedule of a composed (and checked) config, seeded by
    cfg.seed first, so that the initial weights and the data order follow from it.

    `run_dir`: where the logger and saver write (None: nowhere). `data`: build_data(cfg)'s
    (splits, train loader, val loader) when the caller needed them first (the benchmark sizes
    its run by the loader).
    """
    upgrade_config(cfg)  # a config not yet upgraded (tools, tests): old loss/mixup keys moved
    seed_everything(cfg.seed)
    splits, train_loader, val_loader = data or build_data(cfg)
    # before the model: a softmax loss on multi-label data fails here, naming loss=bce
    objective = build_objective(
        cfg,
        splits.train,
        num_classes=len(splits.classes),
        batch_size=cfg.data.batch_size,
        multi_label=is_multi_label(splits.train),
    )
    best_choice(cfg, splits, say=True)  # a metric this data reports, before anything is built
    model = build_model(cfg, splits).to(resolve_device(cfg.trainer.device))
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, updates_per_epoch(cfg, train_loader))
    log.info(objective.describe())
    parts = (splits, model, train_loader, val_loader, optimizer, scheduler, objective)
    return Training(cfg, run_dir, resume, *parts)


def build_data(cfg: DictConfig) -> tuple[Splits, object, object]:
    splits = build_splits(cfg)
    # data-parallel: data.batch_size images per process, this process's share of each split
    shard = {"num_replicas": distributed.world_size(), "rank": distributed.rank()}
    kwargs = _loader_kwargs(cfg, training=True)
    if kwargs.get("on_device"):
        kwargs["device"] = resolve_device(cfg.trainer.device)  # where the model trains
    kwargs["train_labels"] = report_distribution(splits)
    train_loader, val_loader = make_loaders(splits, **kwargs, **shard)
    return splits, train_loader, val_loader


def build_splits(cfg: DictConfig) -> Splits:
    """cfg.data's datasets: the model's preprocessing where data.transform asks for it, k-fold."""
    late = {}
    if cfg.data.get("transform") is not None:
        # the model's input size, mean, std, interpolation and crop_pct where data.transform
        # leaves them null; datasets without a transform key keep their own preprocessing
        keys = OmegaConf.to_container(cfg.data.transform, resolve=True)
        model = model_preprocessing(cfg.model)
        keys.update({k: v for k, v in model.items() if keys.get(k) is None})
        late["train_transform"], late["eval_transform"] = image_transforms(**keys)
    splits: Splits = build(cfg.data.dataset, **late)
    if late:
        splits = replace(splits, preprocess=photo_preprocess(**keys))
    if cfg.data.get("fold") is not None:
        splits = kfold(
            splits, fold=cfg.data.fold, num_folds=cfg.data.num_folds, fold_seed=cfg.data.fold_seed
        )
    return splits


def _loader_kwargs(cfg: DictConfig, training: bool = False) -> dict:
    """cfg.data's keys for make_loaders (training) or eval_loader (data.on_device and
    data.device_augment are for training runs: evaluation reads the regular way)."""
    not_loader = ("dataset", "transform", "fold", "num_folds", "fold_seed")
    if not training:
        not_loader += ("on_device", "device_augment", "sampler")
    return {
        k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v
        for k, v in cfg.data.items()
        if k not in not_loader
    }


def build_eval_data(cfg: DictConfig, classes: list[str], split: str = "val"):
    """(dataset, loader in order) of `split` (val | train) for evaluating a model of `classes`.

    train is read with the evaluation transform. The dataset's classes must be the model's.
    Data-parallel: the loader reads this process's share (engine.evaluate.gather_shares).
    """
    if split not in ("val", "train"):
        raise ValueError(f"task.split={split!r} must be 'val' or 'train'")
    splits = build_splits(cfg)
    if list(splits.classes) != list(classes):
        raise ValueError(
            f"the model was trained on {len(classes)} classes {_short(classes)} but "
            f"{cfg.data.dataset._target_} has {len(splits.classes)} {_short(splits.classes)}; "
            "evaluate on data with the model's classes (same names, same order)"
        )
    dataset = splits.val
    if split == "train":
        dataset = splits.train_eval if splits.train_eval is not None else splits.train
    shard = {"num_replicas": distributed.world_size(), "rank": distributed.rank()}
    return dataset, eval_loader(dataset, **_loader_kwargs(cfg), **shard)


def validation_images(cfg: DictConfig, classes: list[str], check_images: int):
    """The first `check_images` validation images as a batch, or None when the data is not here.

    For checks that want real inputs (the ONNX export) but can do without them.
    """
    try:
        dataset, _ = build_eval_data(cfg, classes, "val")
    except (OSError, ValueError) as err:
        log.warning("no validation images to check with (%s); random inputs instead", err)
        return None
    count = min(check_images, len(dataset))
    return torch.stack([dataset[i][0] for i in range(count)]) if count else None


def _short(names: list[str], n: int = 6) -> str:
    shown = ", ".join(map(str, names[:n]))
    return f"[{shown}{', ...' if len(names) > n else ''}]"


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


def build_logger(
    cfg: DictConfig, run_dir: Path, resume: dict | None, job_type: str = "train"
) -> RunLogger:
    """The run's logger: W&B and metrics.jsonl; one that records nothing on ranks other than 0."""
    if not distributed.is_main():
        return distributed.NullLogger()
    wandb_init = None
    if cfg.logger.wandb is not None:
        wandb_init = {
            "job_type": job_type,
            **OmegaConf.to_container(cfg.logger.wandb, resolve=True),
        }
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


def build_saver(cfg: DictConfig, run_dir: Path, splits: Splits, wandb_run_id) -> CheckpointSaver:
    best = best_choice(cfg, splits)
    if not distributed.is_main():  # rank 0 writes the checkpoints; every process chooses best
        return NullSaver(run_dir / "checkpoints", **best)
    # what predict, serve and export need besides the weights: nothing else is read
    metadata = {
        "config": plain(cfg),
        "class_names": list(splits.classes),
        "in_chans": splits.in_chans,
        "preprocess": _plain_preprocess(splits.preprocess),
        "wandb_run_id": wandb_run_id,
        "multi_label": is_multi_label(splits.train),  # predict / serve / export: sigmoid scores
    }
    saver = {**cfg.checkpoint, **best}
    return CheckpointSaver(run_dir / "checkpoints", **saver, metadata=metadata)


def best_choice(cfg: DictConfig, splits: Splits, say: bool = False) -> dict:
    """checkpoint.best_metric and best_mode for this data. Multi-label data reports no top-1
    or top-5 (engine/multilabel.py): there val/acc1 and val/acc5, the default, mean val/mAP (max),
    said in the log when `say`; a multi-label metric on single-label data fails, naming the fix."""
    metric = cfg.checkpoint.get("best_metric") or "val/acc1"  # older configs have none
    mode = cfg.checkpoint.get("best_mode") or "max"
    if is_multi_label(splits.train) and metric in ("val/acc1", "val/acc5"):
        if say:
            log.info("multi-label data: best.pt follows val/mAP (max), not %s", metric)
        metric, mode = "val/mAP", "max"
    elif not is_multi_label(splits.train) and metric in checkpoint.MULTILABEL_METRICS:
        raise ValueError(
            f"checkpoint.best_metric={metric} is a multi-label metric, and "
            f"{cfg.data.dataset._target_} has one label per image; choose one of "
            "val/acc1, val/acc5, val/loss"
        )
    return {"best_metric": metric, "best_mode": mode}


def _plain_preprocess(preprocess: dict | None) -> dict | None:
    """Lists instead of tuples: a checkpoint loads with weights_only=True, and JSON has no tuple."""
    if preprocess is None:
        return None
    return {k: list(v) if isinstance(v, tuple | list) else v for k, v in preprocess.items()}


def trained_for_task(cfg: DictConfig):
    """The model eval / predict / serve / export use: task.ckpt's run (the newest run when it
    is null), or a model with no run behind it (engine/pretrained.py): model.weights=<file>,
    model.pretrained=true, or a weights file that is not this repo's checkpoint as task.ckpt."""
    from engine import pretrained
    from engine.predict import load_trained

    task, model = cfg.task, cfg.model
    weights = model.get("weights")
    if task.ckpt is not None and not pretrained.is_run_checkpoint(task.ckpt):
        weights = str(task.ckpt)  # MMPretrain / timm weights given where a run is expected
    elif task.ckpt is not None or not (weights or model.get("pretrained")):
        return load_trained(task.ckpt, use_ema=task.use_ema)
    if task.use_ema:
        raise ValueError("task.use_ema=true needs a run trained with EMA weights (task.ckpt=<run>)")
    config = plain(cfg)
    config["model"].update(weights=weights, pretrained=not weights)

    def build_model(num_classes: int, hub_weights: bool) -> nn.Module:
        late = {"pretrained": hub_weights, "weights": None}  # the file is loaded by the caller
        return build(cfg.model, num_classes=num_classes, in_chans=3, **late)

    img_size = model.get("img_size")
    return pretrained.load_pretrained(build_model, model.name, weights, img_size, config)


def model_preprocessing(model: DictConfig) -> dict:
    """The input `model` expects: the preprocessing in its weights file's config (an MMPretrain /
    MMClassification checkpoint: mean, std, resize, crop) unless model.img_size asks for another
    size, else timm's pretrained config for its name."""
    from models import openmmlab

    weights = model.get("weights")
    path = Path(weights).expanduser() if weights else None
    if path is not None and path.exists() and model.get("img_size") is None:
        found = openmmlab.read(path).get("preprocess")
        if found:
            return found
    return preprocessing(model.name, img_size=model.get("img_size"))
