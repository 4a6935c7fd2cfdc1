"""Files and configs are data, never code; secrets in the environment stay out of run folders.

Loading: every checkpoint and weights file is read with torch.load(weights_only=True) or
safetensors, with no fallback. A pickle that would create a marker file when unpickled is
offered to every load path, and each must refuse it with the marker still absent.
Configs: a `_target_` off the explicit list of callables conf/ uses (engine/checks.py
ALLOWED_TARGETS, widened only by IMGCLS_EXTRA_TARGETS) fails, naming its key path, before anything
is built or written, wherever it hides (a group node, a nested value, a list, a `_partial_` node,
`_args_`, an interpolation) and wherever the config comes from: the command line, a checkpoint
with a valid checksum (eval, predict, export, serve, resume, cam), an export sidecar. The payload
is the issue's: timm.models.load_state_dict(weights_only=False) on a pickle that makes a marker.
"""

import copy
import functools
import json
import os
import pathlib
import re

import pytest
import torch
from omegaconf import OmegaConf

from engine import build, checkpoint
from engine.checks import ALLOWED_TARGETS, check_config, check_target, check_targets
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


def test_no_code_path_reads_a_file_with_a_full_unpickle():
    # the two readers of torch files (checkpoints, model.weights) pass weights_only=True; a new
    # torch.load, pickle.load or weights_only=False anywhere else fails here, to be reviewed
    readers = {"engine/checkpoint.py": 1, "models/timm_models.py": 1, "models/openmmlab.py": 1}
    for path in sorted(REPO.glob("*.py")) + sorted(REPO.glob("[a-z]*/**/*.py")):
        name = path.relative_to(REPO).as_posix()
        if name.startswith(("tests/", ".venv/")):
            continue
        code = [line for line in path.read_text().splitlines() if not line.strip().startswith("#")]
        assert not [line for line in code if "weights_only=False" in line or "pickle.load" in line]
        loads = [line for line in code if "torch.load(" in line]
        assert len(loads) == readers.get(name, 0), f"{name}: {loads}"
        assert all("weights_only=True" in line for line in loads), name


@pytest.mark.slow  # a second run.py subprocess; the in-process calls above cover the same tasks
def test_command_line_eval_refuses_pickled_code(tmp_path, evil, marker):
    proc = run_py("task=eval", f"task.ckpt={evil['checkpoint']}", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert str(evil["checkpoint"]) in proc.stderr


# ---------------------------------------------------------------------------------------------
# _target_: an explicit list of callables, checked anywhere in the tree, wherever a config comes from


def _conf_targets() -> set[str]:
    """Every `_target_` of this repo's config groups (conf/hydra: Hydra's own plugins)."""

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from [value] if key == "_target_" else walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    files = [p for p in CONF.rglob("*.yaml") if "hydra" not in p.relative_to(CONF).parts]
    return {t for p in files for t in walk(OmegaConf.to_container(OmegaConf.load(p)))}


def test_the_allowed_list_is_exactly_what_conf_uses():
    # a builder added to conf/ without review fails here, and so does an entry nothing uses
    used = _conf_targets()
    assert "models.timm_models.create" in used and "engine.optim.create_optimizer" in used
    assert used - set(ALLOWED_TARGETS) == set(), "used in conf/ but not on ALLOWED_TARGETS"
    assert set(ALLOWED_TARGETS) - used == set(), "on ALLOWED_TARGETS but used by no config"
    assert len(set(ALLOWED_TARGETS)) == len(ALLOWED_TARGETS)
    for target in ALLOWED_TARGETS:
        assert callable(check_target("x._target_", target))


BAD_TARGETS = [
    ("model._target_", "os.system", ""),
    ("data.dataset._target_", "subprocess.call", ""),
    ("sched._target_", "builtins.eval", ""),
    # inside the packages a prefix list used to admit: each reads a file with a full unpickle
    ("model._target_", "timm.models.load_state_dict", ""),
    ("model._target_", "timm.models.load_checkpoint", ""),
    ("model._target_", "torch.load", ""),
    ("model._target_", "torch.hub.load", ""),
    ("model._target_", "torch.os.system", ""),  # an import alias
    ("model._target_", "engine.build.instantiate", ""),  # Hydra's, imported into the engine
    ("model._target_", "engine.checkpoint.load", ""),  # of this repo, but no builder
    ("model._target_", "models.timm_models.creat", "did you mean models.timm_models.create?"),
]


@pytest.mark.parametrize(("key", "target", "why"), BAD_TARGETS, ids=[t[1] for t in BAD_TARGETS])
def test_targets_off_the_list_fail_naming_key_value_and_how_to_extend(key, target, why):
    with pytest.raises(ValueError) as err:
        check_config(composed(f"{key}={target}"))
    message = str(err.value)
    assert f"{key}={target!r} is not allowed" in message
    assert "not one of the callables this repo's configs use" in message and why in message
    assert "IMGCLS_EXTRA_TARGETS in the environment to callables (mylab.models.build_net)" in (
        message
    )


def test_every_shipped_config_passes_and_hydra_plugin_targets_are_left_alone():
    for path in sorted(CONF.glob("*/*.yaml")):
        check_targets(OmegaConf.load(path), root=path.parent.name)
    # hydra.launcher, hydra.job_logging...: Hydra's plugins, which Hydra instantiates itself
    cfg = composed("hydra/launcher=slurm", hydra=True)
    assert OmegaConf.select(cfg, "hydra.launcher._target_").startswith("hydra_plugins.")
    check_targets(cfg)


def _hostile(plain: pathlib.Path) -> dict:
    """The issue's config: a builder timm exports that unpickles `plain`, and so runs its code."""
    return {
        "_target_": "timm.models.load_state_dict",
        "checkpoint_path": str(plain),
        "weights_only": False,
    }


def test_the_hostile_config_is_live(evil, marker):
    # the premise: instantiated by Hydra, as a nested node of an allowed one, it runs the pickle
    from hydra.utils import instantiate

    node = {"_target_": "builtins.dict", "drop_path_rate": _hostile(evil["plain"])}
    instantiate(OmegaConf.create(node))
    assert marker.exists()
    marker.unlink()


# where a saved config hides it: (key path of the `_target_` the error names, how to put it there)
SAVED_PLACES = {
    "model._target_": lambda c, h: c.update(model=h),  # the group node itself
    "model.drop_path_rate._target_": lambda c, h: c["model"].update(drop_path_rate=h),
    "optim.lr._target_": lambda c, h: c["optim"].update(lr=h),  # a _partial_ node's value
    "optim.param_groups[0]._target_": lambda c, h: c["optim"].update(param_groups=[h]),
    "model._args_[1]._target_": lambda c, h: c["model"].update(_args_=["resnet18", h]),
    "data.dataset.classes[0].x._target_": lambda c, h: c["data"]["dataset"].update(
        classes=[{"x": h}]
    ),
    "hydra.callbacks.log._target_": lambda c, h: c.update(hydra={"callbacks": {"log": h}}),
}


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory, evil) -> dict[str, dict[str, pathlib.Path]]:
    """Per place: a run folder whose checkpoint is tensors and plain values with a valid
    checksum (it passes weights_only=True and checkpoint.load) but a hostile config, and an
    export (.safetensors + .json sidecar) with the same config."""
    from safetensors.torch import save_file

    from engine.predict import SIDECAR_FORMAT

    files = {}
    for place, put in SAVED_PLACES.items():
        folder = tmp_path_factory.mktemp("hostile")
        content = checkpoint_like(model={"fc.weight": torch.zeros(10, 4)})
        put(content["config"], _hostile(evil["plain"]))
        ckpt = folder / "run" / "checkpoints" / "last.pt"
        ckpt.parent.mkdir(parents=True)
        torch.save({**content, "checksum": checkpoint.content_digest(content)}, ckpt)
        os.link(ckpt, ckpt.with_name("best.pt"))
        weights = folder / "export" / "model.safetensors"
        weights.parent.mkdir()
        save_file(content["model"], weights)
        keys = ("config", "class_names", "preprocess", "in_chans")
        sidecar = {"format": SIDECAR_FORMAT, "weights": "model", **{k: content[k] for k in keys}}
        weights.with_suffix(".json").write_text(json.dumps(sidecar))
        files[place] = {"ckpt": ckpt, "run": ckpt.parent.parent, "safetensors": weights}
    return files


def _cam(files, run_task, capsys):
    from analysis import cam

    capsys.readouterr()
    assert cam.main([f"run={files['run']}"]) == 1
    raise ValueError(capsys.readouterr().err)


# every way a config is read from a file; each raises (cam: prints) the error
FILE_ENTRIES = {
    "load_trained": lambda f, run, _: load_trained(f["ckpt"]),
    "Classifier.load": lambda f, run, _: Classifier.load(f["run"]),
    "sidecar": lambda f, run, _: Classifier.load(f["safetensors"]),
    "task=eval": lambda f, run, _: run("task=eval", f"task.ckpt={f['ckpt']}"),
    "task=eval sidecar": lambda f, run, _: run("task=eval", f"task.ckpt={f['safetensors']}"),
    "task=predict": lambda f, run, _: run(
        "task=predict", f"task.ckpt={f['run']}", f"task.inputs={f['ckpt']}"
    ),
    "task=export": lambda f, run, _: run("task=export", f"task.ckpt={f['ckpt']}"),
    "task=serve": lambda f, run, _: run("task=serve", f"task.ckpt={f['safetensors']}"),
    "resume=file": lambda f, run, _: run(f"resume={f['ckpt']}"),
    "resume=folder": lambda f, run, _: run(f"resume={f['run']}"),
    "cam run=": _cam,
}
# the whole matrix costs ~80 compositions: every entry with two places, every place with the
# entries that differ in how they read the file (checkpoint, sidecar, resume, cam)
CASES = [(p, e) for p in SAVED_PLACES for e in ("load_trained", "sidecar", "resume=file")] + [
    (p, e)
    for p in ("model.drop_path_rate._target_", "optim.param_groups[0]._target_")
    for e in FILE_ENTRIES
    if e not in ("load_trained", "sidecar", "resume=file")
]


@pytest.mark.parametrize(("place", "entry"), CASES, ids=[f"{e}:{p}" for p, e in CASES])
def test_a_hostile_config_in_a_file_is_refused_before_anything(
    hostile_files, run_task, tmp_path, capsys, marker, place, entry
):
    files = hostile_files[place]
    before = sorted(files["run"].parent.rglob("*"))
    with pytest.raises(ValueError) as err:
        FILE_ENTRIES[entry](files, run_task, capsys)
    message = str(err.value)
    assert f"{place}='timm.models.load_state_dict' is not allowed" in message
    assert "its saved config is refused" in message and "IMGCLS_EXTRA_TARGETS" in message
    assert not (tmp_path / "run").exists(), "nothing is written: no run folder, W&B, config"
    assert sorted(files["run"].parent.rglob("*")) == before


# the same, typed on the command line: (key path the error names, overrides; PLAIN: the pickle)
HOSTILE = "{_target_: timm.models.load_state_dict, checkpoint_path: 'PLAIN', weights_only: false}"
DOUBLE_QUOTED = HOSTILE.replace("'", '"')  # inside a quoted override
TYPED = [
    (
        "model._target_",
        [
            "model._target_=timm.models.load_state_dict",
            "+model.checkpoint_path=PLAIN",
            "+model.weights_only=false",
        ],
    ),
    ("model.drop_path_rate._target_", [f"model.drop_path_rate={HOSTILE}"]),
    ("optim.lr._target_", [f"optim.lr={HOSTILE}"]),
    ("optim.param_groups[0]._target_", [f"optim.param_groups=[{HOSTILE}]"]),
    ("data.dataset.extra[1]._target_", [f"+data.dataset.extra=[1,{HOSTILE}]"]),
    # an interpolation that makes a node from a string: walked as what it resolves to
    ("model.extra._target_", ["+model.extra='${oc.create:" + DOUBLE_QUOTED + "}'"]),
]


@pytest.mark.parametrize(("place", "overrides"), TYPED, ids=[t[0] for t in TYPED])
def test_a_hostile_config_on_the_command_line_is_refused_before_anything(
    run_task, tmp_path, evil, marker, place, overrides
):
    typed = [o.replace("PLAIN", str(evil["plain"])) for o in overrides]
    expected = f"{place}='timm.models.load_state_dict' is not allowed"
    with pytest.raises(ValueError, match=re.escape(expected)):
        check_config(composed(*typed))  # run.py's first call, for every task
    for task in ("task=train", "task=eval"):
        with pytest.raises(ValueError, match=re.escape(expected)):
            run_task(task, "logger=none", *typed)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["sweep.space={model._target_: {type: categorical, choices: [os.system]}}"],
        ["model.drop_path_rate={_target_: os.system}"],  # a run override every trial gets
    ],
)
def test_a_sweep_refuses_a_hostile_target_before_its_first_trial(args, tmp_path, monkeypatch):
    from sweeping import config as sweep

    monkeypatch.chdir(tmp_path)
    cfg, _ = sweep.load_config(args)
    with pytest.raises(sweep.SweepError, match=r"_target_='os.system' is not allowed"):
        sweep.check_run_config(cfg)
    assert not list(tmp_path.iterdir()), "no sweep folder yet"


def test_overrides_on_a_resumed_or_trained_config_are_checked(hostile_files, run_task, evil):
    # resume=<file> and task=eval apply command-line overrides onto a saved config: checked too
    files = hostile_files["model.drop_path_rate._target_"]  # only its folder layout is used
    good = files["run"].parent / "good.pt"
    content = checkpoint_like(model={"fc.weight": torch.zeros(10, 4)})
    torch.save({**content, "checksum": checkpoint.content_digest(content)}, good)
    hostile = f"optim.lr={HOSTILE.replace('PLAIN', str(evil['plain']))}"
    expected = re.escape("optim.lr._target_='timm.models.load_state_dict' is not allowed")
    with pytest.raises(ValueError, match=expected):
        run_task(f"resume={good}", hostile)
    with pytest.raises(ValueError, match=expected):
        run_task("task=export", f"task.ckpt={good}", hostile)


def test_analysis_results_checks_the_evaluation_s_config(tmp_path, evil, marker):
    # results.py rebuilds an in-memory dataset from <eval folder>/config.yaml: a file's content
    from analysis.results import sample_pictures

    config = checkpoint_like()["config"]
    config["data"]["dataset"]["root"] = _hostile(evil["plain"])
    OmegaConf.save(config, tmp_path / "config.yaml")
    with pytest.raises(ValueError, match=re.escape("config.yaml': its saved config is refused")):
        sample_pictures(tmp_path / "eval", [{"path": None, "index": 0}], ["0", "1"])


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


def test_a_saved_config_holds_no_interpolation_and_is_a_mapping(tmp_path, run_task):
    content = checkpoint_like()
    content["config"]["model"]["name"] = "${oc.env:MY_SECRET_TOKEN}"
    path = tmp_path / "doctored" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    torch.save(content, path)
    refused = r"last.pt'?: its saved config has model.name='\$\{oc.env:MY_SECRET_TOKEN\}'"
    with pytest.raises(ValueError, match=refused):
        load_trained(path)
    with pytest.raises(ValueError, match=refused):
        run_task(f"resume={path}")
    # a string would be parsed as YAML by OmegaConf.create: a config no check has seen
    torch.save(checkpoint_like(config="model: {_target_: os.system}"), path)
    with pytest.raises(ValueError, match="its saved config is a str, not a mapping"):
        load_trained(path)


def test_run_py_refuses_the_issue_s_override_before_writing(tmp_path, evil, marker):
    # the one default subprocess: the command line as a user types it, W&B on (offline)
    hostile = HOSTILE.replace("PLAIN", str(evil["plain"]))
    env = clean_env(WANDB_MODE="offline")
    proc = run_py(*TINY, f"model.drop_path_rate={hostile}", cwd=tmp_path, env=env, check=False)
    assert proc.returncode != 0
    assert "model.drop_path_rate._target_='timm.models.load_state_dict' is not allowed" in (
        proc.stderr
    )
    # Hydra makes the run folder (.hydra/, run.log) before run.py starts; a run that fails before
    # training removes it: nothing is left, no config.yaml, run_info.json, W&B run or checkpoint
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == [], written


# ---------------------------------------------------------------------------------------------
# IMGCLS_EXTRA_TARGETS: the user's own builders, by callable or by module


def test_own_builders_are_allowed_by_the_environment_not_by_the_config(monkeypatch):
    target = f"{__name__}.checkpoint_like"
    config = OmegaConf.create({"model": {"_target_": target}})
    with pytest.raises(ValueError, match="IMGCLS_EXTRA_TARGETS"):
        check_targets(config)
    monkeypatch.setenv("IMGCLS_EXTRA_TARGETS", f"mylab.models.build_net, {target}")  # a callable
    check_targets(config)
    with pytest.raises(ValueError, match="not one of the callables"):
        check_targets(OmegaConf.create({"model": {"_target_": f"{__name__}.create"}}))
    monkeypatch.setenv("IMGCLS_EXTRA_TARGETS", __name__)  # a module: what it defines
    check_targets(config)
    check_targets(OmegaConf.create({"model": {"_target_": f"{__name__}.Payload"}}))
    # ...and not what it imports, nor anything below it
    for name, why in [
        ("create", "models.timm_models.create, which it only imports"),
        ("os", "is the module 'os'"),
        ("torch", "is the module 'torch'"),
        ("pathlib.Path", "not one of the callables"),
        ("_checkpoint", "no _private or __dunder__"),
        ("CONF", "not a function or class"),
    ]:
        with pytest.raises(ValueError, match=re.escape(why)):
            check_targets(OmegaConf.create({"x": {"_target_": f"{__name__}.{name}"}}))


# ---------------------------------------------------------------------------------------------
# checksums: every reader of this repo's checkpoints verifies


def test_model_weights_refuses_a_bit_flipped_checkpoint(tmp_path, run_task):
    model = create("resnet18", num_classes=10, in_chans=1)
    content = checkpoint_like()
    content["model"]["fc.bias"] = torch.full((10,), 3.0)  # bytes easy to find in the file
    path = tmp_path / "run" / "checkpoints" / "best.pt"
    path.parent.mkdir(parents=True)
    torch.save({**content, "checksum": checkpoint.content_digest(content)}, path)
    assert load_weights(model, path) == []  # intact: every tensor loads
    data = bytearray(path.read_bytes())
    at = data.find(torch.full((10,), 3.0).numpy().tobytes())
    data[at + 5] ^= 0x01
    path.write_bytes(data)
    assert torch.load(path, weights_only=True)["epoch"] == 1, "torch alone notices nothing"
    damaged = re.escape(f"model.weights={str(path)!r}: {str(path)!r} is damaged")
    with pytest.raises(ValueError, match=damaged):
        load_weights(model, path)
    with pytest.raises(ValueError, match="is damaged"):
        build.build_model_for(composed(f"model.weights={path}"), num_classes=10, in_chans=1)
    for read in (checkpoint.load, load_trained):  # eval, predict, export, serve, cam, resume
        with pytest.raises(ValueError, match="is damaged"):
            read(path)


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
