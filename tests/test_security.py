"""Files and configs are data, never code; secrets in the environment stay out of run folders.

Loading: every checkpoint and weights file is read with torch.load(weights_only=True) or
safetensors, with no fallback. A pickle that would create a marker file when unpickled is
offered to every load path, and each must refuse it with the marker still absent.
Configs: a `_target_` outside this repo, torch, torchvision and timm fails before anything is
instantiated, wherever the config comes from: the command line, a checkpoint, an export sidecar.
"""

import copy
import functools
import json
import os
import pathlib

import pytest
import torch
from omegaconf import OmegaConf

from engine import build, checkpoint
from engine.checks import check_config, check_targets
from engine.predict import Classifier, load_trained
from models.timm_models import create, load_weights
from tests.helpers import REPO, TINY, clean_env, composed, run_py, wandb_records, wandb_runs

CONF = REPO / "conf"


class Payload:
    """Unpickling this creates `marker`: what a malicious checkpoint would do (with worse)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def checkpoint_like(**extra) -> dict:
    """What this repo's checkpoints hold, tensors and plain containers only."""
    return {**copy.deepcopy(_checkpoint()), **extra}


@functools.cache
def _checkpoint() -> dict:
    model = create("resnet18", num_classes=10, in_chans=1)
    return {
        "model": model.state_dict(),
        "optimizer": {"state": {}, "param_groups": []},
        "config": OmegaConf.to_container(composed(*TINY, "logger=none"), resolve=True),
        "class_names": [str(i) for i in range(10)],
        "in_chans": 1,
        "preprocess": {"input_size": [1, 8, 8], "mean": [0.5], "std": [0.5]},
        "epoch": 1,
        "step": 4,
    }


@pytest.fixture(scope="module")
def module_marker(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("marker") / "PWNED"


@pytest.fixture
def marker(module_marker) -> pathlib.Path:
    assert not module_marker.exists()
    yield module_marker
    assert not module_marker.exists(), "a file's content ran as code"


@pytest.fixture(scope="module")
def evil(tmp_path_factory, module_marker) -> dict[str, pathlib.Path]:
    """Pickles that run code when loaded: a bare one, and a run folder's checkpoint with one."""
    folder = tmp_path_factory.mktemp("evil")
    files = {"plain": folder / "plain.pt", "checkpoint": folder / "run" / "checkpoints" / "best.pt"}
    torch.save({"payload": Payload(module_marker)}, files["plain"])
    files["checkpoint"].parent.mkdir(parents=True)
    torch.save(checkpoint_like(payload=Payload(module_marker)), files["checkpoint"])
    os.link(files["checkpoint"], files["checkpoint"].with_name("last.pt"))
    return files


def test_the_payload_is_live(evil, marker):
    # the test's premise: a plain unpickle of these files does run the payload
    torch.load(evil["checkpoint"], weights_only=False)
    assert marker.exists()
    marker.unlink()


@pytest.mark.parametrize("kind", ["plain", "checkpoint"])
def test_checkpoint_and_weights_loaders_refuse_pickled_code(evil, marker, kind):
    with pytest.raises(ValueError, match=evil[kind].name):
        checkpoint.load(evil[kind])
    with pytest.raises(ValueError, match="pickled Python objects besides tensors"):
        load_weights(create("resnet18", num_classes=10, in_chans=1), evil[kind])
    with pytest.raises(ValueError, match=evil[kind].name):
        load_trained(evil[kind])
    with pytest.raises(ValueError, match=evil[kind].name):
        Classifier.load(evil[kind])  # task=serve's loader


def test_analysis_cam_refuses_pickled_code(evil, marker, capsys):
    from analysis import cam

    assert cam.main([f"run={evil['checkpoint']}"]) == 1
    assert "best.pt" in capsys.readouterr().err
    assert cam.main([f"run={evil['checkpoint']}", "list_layers=true"]) == 1


@pytest.mark.parametrize(
    "overrides",
    [
        ["resume={checkpoint}"],
        ["resume={run}"],  # a run folder: no checkpoint in it that loads
        ["logger=none", "model.weights={plain}"],
        ["logger=none", "model.weights={checkpoint}"],
        ["task=eval", "task.ckpt={checkpoint}"],
        ["task=eval", "task.ckpt={run}"],
        ["task=predict", "task.ckpt={checkpoint}", "task.inputs={plain}"],
        ["task=export", "task.ckpt={checkpoint}"],
        ["task=serve", "task.ckpt={checkpoint}"],
    ],
    ids=lambda o: " ".join(o).replace("{", "").replace("}", ""),
)
def test_every_task_refuses_pickled_code(run_task, tmp_path, evil, marker, overrides):
    paths = {**evil, "run": evil["checkpoint"].parent.parent}
    with pytest.raises((ValueError, FileNotFoundError), match=r"checkpoint|weights|\.pt"):
        run_task(*TINY, *(o.format(**paths) for o in overrides))
    assert not list((tmp_path / "run").rglob("*.pt"))


@pytest.mark.slow  # a second run.py subprocess; the in-process calls above cover the same tasks
def test_command_line_eval_refuses_pickled_code(tmp_path, evil, marker):
    proc = run_py("task=eval", f"task.ckpt={evil['checkpoint']}", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert str(evil["checkpoint"]) in proc.stderr


# ---------------------------------------------------------------------------------------------
# _target_

BAD_TARGETS = [
    ("model._target_", "os.system", "not one of the allowed packages"),
    ("data.dataset._target_", "subprocess.call", "not one of the allowed packages"),
    ("sched._target_", "builtins.eval", "not one of the allowed packages"),
    ("model._target_", "torch.os.system", "'torch.os' is the module 'os'"),  # an import alias
    ("model._target_", "engine.build.os.system", "is the module 'os'"),
    ("model._target_", "data.folders.Path", "defined elsewhere"),  # pathlib.Path, imported
    ("model._target_", "engine.build.instantiate", "defined elsewhere"),
    ("model._target_", "torch.hub.load", "torch.hub"),
    ("model._target_", "torch.utils.cpp_extension.load_inline", "torch.utils.cpp_extension"),
    ("model._target_", "torch.load", "torch.serialization"),
    ("model._target_", "engine.runinfo.atomic_write_text", "engine.runinfo"),
    ("model._target_", "torch.nn.Module.__subclasses__", "no _private or __dunder__"),
    ("model._target_", "models.nope.create", "does not exist"),
]


@pytest.mark.parametrize(("key", "target", "why"), BAD_TARGETS, ids=[t[1] for t in BAD_TARGETS])
def test_targets_outside_the_allow_list_fail_naming_key_value_and_prefixes(key, target, why):
    with pytest.raises(ValueError) as err:
        check_config(composed(f"{key}={target}"))
    message = str(err.value)
    assert f"{key}={target!r} is not allowed" in message
    assert why in message
    assert "allowed prefixes: models., data., engine., analysis., torch., torchvision., timm." in (
        message
    )


def test_targets_anywhere_in_the_config_are_checked():
    cfg = composed(
        "+model.extra._target_=os.makedirs", "+optim.param_groups=[{_target_: os.system}]"
    )
    with pytest.raises(ValueError, match=r"model.extra._target_='os.makedirs'"):
        check_targets(cfg)
    del cfg.model.extra
    with pytest.raises(ValueError, match=r"optim.param_groups\[0\]._target_='os.system'"):
        check_targets(cfg)


def test_every_shipped_config_passes_and_hydra_plugin_targets_are_left_alone():
    for path in sorted(CONF.glob("*/*.yaml")):
        check_targets(OmegaConf.load(path), root=path.parent.name)
    # hydra.launcher, hydra.job_logging...: Hydra's plugins, which Hydra instantiates itself
    cfg = composed("hydra/launcher=slurm", hydra=True)
    assert OmegaConf.select(cfg, "hydra.launcher._target_").startswith("hydra_plugins.")
    check_targets(cfg)


def test_build_refuses_before_instantiating_anything(marker):
    # Hydra instantiates nested nodes first: the outer target being allowed is not enough
    node = OmegaConf.create(
        {
            "_target_": "models.timm_models.create",
            "name": "resnet18",
            "num_classes": 2,
            "extra": {"_target_": "os.makedirs", "_args_": [str(marker)]},
        }
    )
    with pytest.raises(ValueError, match=r"extra._target_='os.makedirs' is not allowed"):
        build.build(node)
    with pytest.raises(ValueError, match=r"model._target_='os.makedirs' is not allowed"):
        build.build(OmegaConf.create({"model": {"_target_": "os.makedirs"}}).model, str(marker))


def _saved_with(tmp_path, marker, change) -> pathlib.Path:
    """A checkpoint of tensors only (it loads with weights_only=True) with a doctored config."""
    state = checkpoint_like()
    change(state["config"], marker)
    path = tmp_path / "doctored" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path


def _nested_target(config, marker):
    config["model"]["extra"] = {"_target_": "os.makedirs", "_args_": [str(marker)]}


def _env_interpolation(config, marker):
    config["model"]["name"] = "${oc.env:MY_SECRET_TOKEN}"


@pytest.mark.parametrize("change", [_nested_target, _env_interpolation])
def test_a_config_inside_a_checkpoint_is_refused_before_use(tmp_path, marker, change, run_task):
    path = _saved_with(tmp_path, marker, change)
    refused = r"last.pt'?: its saved config (is refused|has model.name)"
    with pytest.raises(ValueError, match=refused):
        load_trained(path)  # eval, predict, export, serve, analysis/cam
    with pytest.raises(ValueError, match=refused):
        run_task(f"resume={path}")


def test_a_config_in_an_export_sidecar_is_refused(tmp_path, marker):
    from safetensors.torch import save_file

    from engine.predict import SIDECAR_FORMAT

    state = checkpoint_like()
    weights = tmp_path / "model.safetensors"
    save_file(state["model"], weights)
    config = state["config"]
    _nested_target(config, marker)
    sidecar = {
        "format": SIDECAR_FORMAT,
        "config": config,
        "class_names": state["class_names"],
        "preprocess": state["preprocess"],
        "in_chans": 1,
        "weights": "model",
    }
    weights.with_suffix(".json").write_text(json.dumps(sidecar))
    with pytest.raises(ValueError, match=r"model.extra._target_='os.makedirs' is not allowed"):
        load_trained(weights)


@pytest.mark.slow  # tests/test_bad_config.py runs the same, with other mistakes, by default
def test_command_line_target_fails_before_anything_is_built(tmp_path, marker):
    proc = run_py(
        *TINY,
        "logger=none",
        "+model.extra._target_=os.makedirs",
        f"+model.extra._args_=[{marker}]",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert "model.extra._target_='os.makedirs' is not allowed" in proc.stderr
    assert not list(tmp_path.rglob("*.pt"))


# ---------------------------------------------------------------------------------------------
# secrets

CANARIES = {
    "WANDB_API_KEY": "canary0wandb0c0ffee1234567890abcdef12345678",
    "HF_TOKEN": "hf_canary0huggingface0c0ffee",
    "AWS_SECRET_ACCESS_KEY": "canary0aws0c0ffee0secret",
    "MY_SECRET_TOKEN": "canary0mine0c0ffee",
}


@pytest.mark.slow  # three real runs with W&B (train, eval, export): ~40 s on 2 CPUs
def test_no_secret_from_the_environment_reaches_a_file(tmp_path):
    env = clean_env(WANDB_MODE="offline", **CANARIES)
    run_py(*TINY, "trainer.epochs=1", "hydra.run.dir=outputs/train", cwd=tmp_path, env=env)
    trained = tmp_path / "outputs" / "train"
    for task in ("eval", "export"):
        run_py(
            f"task={task}",
            f"task.ckpt={trained}",
            f"hydra.run.dir=outputs/{task}",
            cwd=tmp_path,
            env=env,
        )
    assert (trained / "export" / "model.onnx").is_file()
    assert wandb_runs(tmp_path / "outputs" / "eval")

    files = [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.suffix == ".pt" for p in files)
    assert any(".hydra" in p.parts for p in files) and any(p.name == "run.log" for p in files)
    for path in files:
        data = path.read_bytes()
        for name, canary in CANARIES.items():
            assert canary.encode() not in data, f"{name} leaked into {path}"
    # the offline W&B records, decoded (in case a record were ever stored compressed)
    for run_dir in (trained, tmp_path / "outputs" / "eval"):
        for offline in wandb_runs(run_dir):
            records = json.dumps(wandb_records(offline))
            for name, canary in CANARIES.items():
                assert canary not in records, f"{name} leaked into {offline}"


def test_own_packages_are_allowed_by_the_environment_not_by_the_config(monkeypatch):
    target = "tests.test_security.checkpoint_like"
    with pytest.raises(ValueError, match="IMGCLS_EXTRA_TARGETS"):
        check_targets(OmegaConf.create({"model": {"_target_": target}}))
    monkeypatch.setenv("IMGCLS_EXTRA_TARGETS", "mylab, tests")
    check_targets(OmegaConf.create({"model": {"_target_": target}}))
