"""Common configuration mistakes fail before training, naming the key, the bad value and the fix.

The table runs run.py's own task functions in-process on the real conf/ (a second each); one
real `python run.py` proves the command line ends the same way and leaves no checkpoint behind.
"""

import logging
from pathlib import Path

import pytest
import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.splits import labels_of
from engine import build
from engine.checks import check_config
from engine.errors import discard_unused_folder, is_user_error
from models.timm_models import create
from tests.helpers import REPO, clean_env, composed, run_py

CONF = REPO / "conf"
# a missing check would train for a few seconds, not a minute (no image size: imagefolder has none)
BASE = ["logger=none", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")

# (overrides, fragments the error message must hold). {tmp}: the test's own folder, which holds
# notes.txt (a text file) and empty/ (a folder without checkpoints)
CASES = [
    (["model.name=resnet5"], ["model.name='resnet5'", "did you mean", "'resnet50'"]),
    (["+trainer.epoch=3"], ["trainer.epoch is not an argument", "did you mean trainer.epochs?"]),
    (["+trainer.seed=3"], ["trainer.seed is set by the engine", "remove trainer.seed"]),
    (["+model.num_classes=5"], ["model.num_classes is set by the engine", "class count"]),
    (["+model.drop_ratio=0.1"], ["model.drop_ratio is not an argument", "model.drop_rate?"]),
    (
        ["data=imagefolder", "data.dataset.root=/nope"],
        ["data.dataset.root='/nope' does not exist", "<root>/<class>/<image>"],
    ),
    (["data.batch_size=0"], ["data.batch_size=0 must be a whole number >= 1", "batch_size=64"]),
    (["data.batch_size=abc"], ["data.batch_size='abc' must be a whole number >= 1"]),
    (["trainer.epochs=-1"], ["trainer.epochs=-1 must be a whole number >= 1", "epochs=10"]),
    (["trainer.epochs=2.5"], ["trainer.epochs=2.5 must be a whole number >= 1"]),
    (["optim.lr=-0.1"], ["optim.lr=-0.1 must be a number > 0", "optim.lr=0.001"]),
    (["optim.lr=fast"], ["optim.lr='fast' must be a number > 0"]),
    (
        ["trainer.epochs=0", "optim.lr=0"],  # every problem at once, not one per attempt
        ["2 problems", "trainer.epochs=0 must be", "optim.lr=0 must be"],
    ),
    (["trainer.precision=fp64"], ["trainer.precision='fp64' must be one of fp32, bf16, fp16"]),
    (["trainer.channels_last=yes"], ["trainer.channels_last='yes' must be true or false"]),
    (
        ["optim=sgd", "optim.momentum=1.2", "model.drop_path_rate=1"],
        ["optim.momentum=1.2 must be a number >= 0 and < 1", "model.drop_path_rate=1 must be"],
    ),
    (
        ["sched=multistep", "sched.milestones=[1,2]", "sched.warmup_epochs=1"],
        ["sched.milestones=[1, 2] start within the warmup (sched.warmup_epochs=1)"],
    ),
    (
        ["trainer.mixup_alpha=0.2", "data.batch_size=33"],
        ["needs an even data.batch_size, not 33", "data.batch_size=34"],
    ),
    (["task=predict"], ["task.inputs=??? has no value", "task.inputs=..."]),
    pytest.param(
        ["trainer.device=cuda"],
        ["trainer.device='cuda'", "CUDA is not available", "trainer.device=auto"],
        marks=NO_CUDA,
    ),
    (["trainer.device=gpu"], ["trainer.device='gpu' is not a device", "cuda:N"]),
    (["model.weights=/nope.pt"], ["model.weights='/nope.pt' does not exist", ".safetensors"]),
    (["resume={tmp}/notes.txt"], ["resume: ", "notes.txt", "checkpoints/last.pt"]),
    (["resume={tmp}/empty"], ["resume=", "no valid checkpoint", "checkpoints/last.pt"]),
    (["resume={tmp}/nope"], ["resume=", "does not exist"]),
    (
        ["task=predict", "task.inputs=cat.jpg", "task.topk=0"],
        ["task.topk=0 must be a whole number >= 1"],
    ),
    (
        ["model._target_=os.system"],
        ["model._target_='os.system' is not allowed", "IMGCLS_EXTRA_TARGETS"],
    ),
]


def _case_id(case) -> str:
    overrides = case.values[0] if hasattr(case, "values") else case[0]
    return " ".join(overrides).replace("{tmp}/", "")


@pytest.mark.parametrize(("overrides", "fragments"), CASES, ids=map(_case_id, CASES))
def test_bad_config_fails_before_training_with_key_value_and_fix(
    run_task, tmp_path, overrides, fragments
):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "empty").mkdir()
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    with pytest.raises((ValueError, FileNotFoundError, TypeError)) as err:
        run_task(*BASE, *overrides)
    for fragment in fragments:
        assert fragment in str(err.value), f"{fragment!r} not in: {err.value}"
    assert not list(tmp_path.rglob("*.pt")), "no checkpoint may be written"


# Hydra's own messages, for mistakes in group choices and keys: they name the option or key,
# the options there are, and (for a key) how to add one
HYDRA_CASES = [
    (["model=resnet5"], ["'model/resnet5'", "Available options in 'model'", "resnet50"]),
    (["data=cifar11"], ["'data/cifar11'", "Available options in 'data'", "cifar10"]),
    # ... and `+trainer.epoch=3`, as Hydra suggests, then fails on ours: "did you mean epochs?"
    (["trainer.epoch=3"], ["Could not override 'trainer.epoch'", "+trainer.epoch=3"]),
]


@pytest.mark.parametrize(("overrides", "fragments"), HYDRA_CASES, ids=map(_case_id, HYDRA_CASES))
def test_hydra_names_unknown_options_and_keys(overrides, fragments):
    with pytest.raises((HydraException, OmegaConfBaseException)) as err:
        composed(*overrides)
    for fragment in fragments:
        assert fragment in str(err.value), f"{fragment!r} not in: {err.value}"


@pytest.mark.parametrize("task", ["train", "eval", "predict", "export", "serve"])
def test_every_task_default_config_passes_the_checks(task):
    check_config(composed(f"task={task}", "task.inputs=x.jpg" if task == "predict" else "seed=0"))


def test_weights_with_another_class_count_reinitialise_the_head_and_say_so(tmp_path, caplog):
    # a file with a 5-class head loaded for a 10-class dataset: fine-tuning, as designed (the
    # head is replaced), and the log says both counts
    weights = tmp_path / "five.pt"
    torch.save(create("resnet18", num_classes=5, in_chans=1).state_dict(), weights)
    cfg = composed(f"model.weights={weights}")
    caplog.set_level(logging.INFO, logger="models.timm_models")
    model = build.build_model_for(cfg, num_classes=10, in_chans=1)
    assert model.num_classes == 10
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warned and "fc.weight (5, 512)" in warned[0].message
    assert "10 classes" in warned[0].message


def test_command_line_lists_every_problem_and_writes_no_checkpoint(tmp_path):
    marker = tmp_path / "PWNED"  # what the nested target would create if it were instantiated
    proc = run_py(
        *BASE[1:],  # the default logger: W&B (offline), which must not start
        "trainer.epochs=2.5",
        "data.batch_size=0",
        "+model.extra._target_=os.makedirs",
        f"+model.extra._args_=[{marker}]",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert "4 problems in the config" in proc.stderr  # and model.extra is no argument of create
    assert "model.extra._target_='os.makedirs' is not allowed" in proc.stderr
    assert "trainer.epochs=2.5 must be a whole number >= 1" in proc.stderr
    assert "data.batch_size=0 must be a whole number >= 1" in proc.stderr
    assert not marker.exists()
    assert not list(tmp_path.rglob("*.pt"))
    assert not list(tmp_path.rglob("metrics.jsonl")), "it failed before the run started"
    # the message alone, no traceback; and no run folder (Hydra's own files removed), no W&B
    assert proc.returncode == 1
    assert "ValueError: 4 problems in the config:" in proc.stderr
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    assert not list((tmp_path / "outputs").rglob("*")), "a run that never started leaves nothing"
    assert "config" not in proc.stdout.split(), "the config tree is printed once the run starts"


@pytest.mark.parametrize(
    ("overrides", "full_error", "message"),
    [
        (
            ["data=imagefolder", "data.dataset.root=/nope"],
            None,
            "FileNotFoundError: data.dataset.root='/nope' does not exist; point data.dataset.root",
        ),
        (["task=eval", "task.ckpt=/nope.pt"], "1", "/nope.pt"),
    ],
    ids=["missing dataset", "HYDRA_FULL_ERROR=1"],
)
def test_a_user_error_prints_its_message_without_traceback_and_leaves_no_folder(
    tmp_path, overrides, full_error, message
):
    env = clean_env(HYDRA_FULL_ERROR=full_error) if full_error else clean_env()
    proc = run_py(*overrides, cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 1
    assert message in proc.stderr
    if full_error:  # asked for: the whole traceback, down to the line that raised it
        assert "Traceback (most recent call last)" in proc.stderr
    else:
        assert proc.stderr.strip().startswith("FileNotFoundError: ")
        assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
        assert "starting fresh" not in proc.stdout  # resume=auto in a new folder: nothing to say
    assert not list((tmp_path / "outputs").rglob("*"))


def test_only_messages_this_repo_raises_on_purpose_count_as_user_errors(tmp_path):
    def caught(call) -> BaseException:
        try:
            call()
        except Exception as err:
            return err
        raise AssertionError("no exception")

    assert is_user_error(caught(lambda: check_config(composed("optim.lr=-1"))))
    missing = composed("data=imagefolder", "data.dataset.root=/nope")
    assert is_user_error(caught(lambda: build.build_splits(missing)))  # through instantiate
    # a library's own error, and an exception of a bug's kind in our code: shown with the
    # traceback that a bug report needs
    assert not is_user_error(caught(lambda: torch.zeros(2) @ torch.zeros(3)))
    assert not is_user_error(caught(lambda: labels_of(object())))


def test_a_failed_run_folder_is_removed_only_when_it_holds_nothing_but_hydra_files(
    tmp_path, monkeypatch
):
    def folder(name: str, *extra: str) -> Path:
        run_dir = tmp_path / "outputs" / name
        for file in (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", *extra):
            (run_dir / file).parent.mkdir(parents=True, exist_ok=True)
            (run_dir / file).write_text("x")
        return run_dir

    started = folder("a/started", "run.log", "config.yaml", "metrics.jsonl")
    assert not discard_unused_folder(started, "run") and started.is_dir()
    unused = folder("a/unused", "run.log")
    assert discard_unused_folder(unused, "run") and not unused.exists()
    assert started.parent.is_dir(), "the date folder still holds a run"
    alone = folder("b/alone", "run.log")
    assert discard_unused_folder(alone, "run") and not alone.parent.exists()
    here = folder("c/here", "run.log")  # hydra.run.dir=. in a folder of its own
    monkeypatch.chdir(here)
    assert not discard_unused_folder(here, "run") and here.is_dir(), "never the current folder"


def test_config_saved_in_a_checkpoint_is_checked_on_resume(run_task, tmp_path):
    # resume=<file> trains with the checkpoint's config: the same checks apply to it
    config = OmegaConf.to_container(composed(*BASE), resolve=True)
    config["trainer"]["epochs"] = -3
    ckpt = tmp_path / "old.pt"
    torch.save({"model": {}, "optimizer": {}, "config": config, "epoch": 1, "step": 1}, ckpt)
    with pytest.raises(ValueError, match=r"trainer.epochs=-3 must be a whole number"):
        run_task(f"resume={ckpt}")  # a resumed run keeps its group choices: no logger=none
