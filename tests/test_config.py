"""The real conf/ composes, every option's keys bind to its target, and errors name the bad value."""

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import timm.optim
from hydra import compose, initialize_config_dir
from hydra.utils import get_method
from omegaconf import OmegaConf

from data.kfold import kfold
from data.loaders import make_loaders
from data.transforms import image_transforms
from engine.checkpoint import CheckpointSaver
from engine.loop import TrainerOptions
from engine.objective import LEGACY_KEYS
from tests.helpers import REPO, RUN_PY, clean_env

CONF = REPO / "conf"
GROUPS = ["model", "data", "optim", "sched", "trainer", "loss", "logger", "task"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
FOLD_KEYS = ("fold", "num_folds", "fold_seed")  # conf/config.yaml, for every dataset


def _task_functions():
    from engine import build, evaluate, export, logger, predict, serve

    common = (predict.load_trained, predict.Classifier.load)
    return {
        "train": lambda: (),
        "eval": lambda: (
            *common,
            build.build_eval_data,
            evaluate.evaluate_model,
            logger.RunLogger.log_evaluation,
        ),
        "predict": lambda: (
            *common,
            predict.image_files,
            predict.Classifier.predict,
            predict.write_predictions,
        ),
        "export": lambda: (*common, export.export, build.validation_images),
        "serve": lambda: (*common, serve.serve),
        "calibrate": lambda: (*common, build.build_eval_data),
    }


# the functions each task hands its keys to (run.py): every key must be one of their arguments
TASK_FUNCTIONS = _task_functions()


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def bind(func, keys: dict, late: tuple[str, ...] = ()) -> None:
    """Fail if `keys` (plus the arguments the engine passes late) do not fit `func`'s signature."""
    params = inspect.signature(func).parameters
    unknown = set(keys) - set(params)
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    assert takes_kwargs or not unknown, f"{func.__qualname__} takes no {sorted(unknown)}"
    for name in late:
        assert name in params or takes_kwargs, f"{func.__qualname__} takes no late argument {name}"


def target_keys(node) -> tuple[object, dict]:
    node = OmegaConf.to_container(node, resolve=True)
    target = get_method(node.pop("_target_"))
    node.pop("_partial_", None)
    return target, node


def test_every_group_has_options():
    for group in GROUPS:
        assert list((CONF / group).glob("*.yaml")), group


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_binds_to_its_target(group, option):
    cfg = composed(f"{group}={option}")
    check_group(cfg, group)
    bind(CheckpointSaver, OmegaConf.to_container(cfg.checkpoint))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_every_group_binds(name):
    cfg = composed(f"experiment={name}")
    for group in GROUPS:
        check_group(cfg, group)


def check_group(cfg, group: str) -> None:
    """Bind the keys of `cfg`'s `group` to the function(s) the engine hands them to."""
    node = cfg[group]
    if group == "model":
        target, keys = target_keys(node)
        bind(target, keys, late=("num_classes", "in_chans"))
    elif group == "data":
        target, keys = target_keys(node.dataset)
        if "transform" in node:
            # data.transform (null: the dataset's own pipeline) builds the model's pipeline,
            # which reaches the builder late; the model fills the keys left null
            bind(target, keys, late=("train_transform", "eval_transform"))
            # the five keys the model's preprocessing fills (models/timm_models.py)
            model_keys = dict.fromkeys(("input_size", "mean", "std", "interpolation", "crop_pct"))
            transform = {} if node.transform is None else OmegaConf.to_container(node.transform)
            bind(image_transforms, {**model_keys, **transform})
        else:
            bind(target, keys)
        fold_keys = {k: node[k] for k in FOLD_KEYS}
        bind(kfold, fold_keys, late=("splits",))
        loader_keys = {
            k: v for k, v in node.items() if k not in ("dataset", "transform", *FOLD_KEYS)
        }
        bind(make_loaders, loader_keys)
    elif group == "optim":
        target, keys = target_keys(node)
        bind(target, keys, late=("model", "global_batch_size"))
        # the builder passes the keys it does not name on to the optimizer class: bind those too
        named = inspect.signature(target).parameters
        opt_keys = {k: v for k, v in keys.items() if k not in named}
        bind(timm.optim.get_optimizer_class(keys["opt"], bind_defaults=False), opt_keys)
    elif group == "sched":
        target, keys = target_keys(node)
        bind(target, keys, late=("optimizer", "total_steps", "steps_per_epoch"))
    elif group == "trainer":
        # the old names of loss and mixup keys are moved out before fit sees the rest
        keys = {k: v for k, v in node.items() if f"trainer.{k}" not in LEGACY_KEYS}
        bind(TrainerOptions, keys)  # fit's **trainer
    elif group == "loss":
        target, keys = target_keys(node)
        bind(target, keys, late=("num_classes", "class_stats", "soft_targets", "multi_label"))
        # the mixup block goes with it: timm's Mixup, label smoothing from the loss
        target, keys = target_keys(cfg.mixup)
        bind(target, keys, late=("label_smoothing", "num_classes", "multi_label"))
    elif group == "task":
        keys = OmegaConf.to_container(node)
        keys.pop("name")
        for func in TASK_FUNCTIONS[node.name]():
            params = inspect.signature(func).parameters
            keys = {k: v for k, v in keys.items() if k not in params}
        assert not keys, f"task={node.name}: no function of the task takes {sorted(keys)}"
    elif group == "logger":
        import wandb

        if node.wandb is not None:
            bind(wandb.init, OmegaConf.to_container(node.wandb, resolve=True))


def test_wandb_is_offline_by_default_and_follows_wandb_mode(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert composed().logger.wandb.mode == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert composed().logger.wandb.mode == "disabled"
    assert composed("logger.wandb.mode=online").logger.wandb.mode == "online"
    assert composed("logger=none").logger.wandb is None


def test_cfg_job_prints_the_composed_config_without_training(tmp_path):
    out = subprocess.run(
        [sys.executable, str(RUN_PY), "model=resnet50", "optim=sgd", "--cfg", "job"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    cfg = OmegaConf.create(out)
    assert cfg.model.name == "resnet50" and cfg.optim.opt == "sgd"
    assert not list(Path(tmp_path).glob("outputs")), "--cfg must not start a run"


def test_help_lists_run_py_groups_and_not_sweep_py_searches(tmp_path):
    out = subprocess.run(
        [sys.executable, str(RUN_PY), "--help"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    groups = out.split("== Configuration groups ==")[1].split("== Config ==")[0]
    listed = {line.split(":")[0] for line in groups.splitlines() if ": " in line}
    assert listed == {*GROUPS, "experiment"}, listed  # sweep.py's files live in sweeps/


def test_unknown_model_name_suggests_close_matches():
    from models.timm_models import create

    with pytest.raises(ValueError, match=r"model.name='resnet_18' is not a timm model.*'resnet18'"):
        create("resnet_18", num_classes=10)
