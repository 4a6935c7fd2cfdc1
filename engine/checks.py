"""Config checks that run before anything is built: a bad value fails in a second, not an hour in.

    check_config(cfg)          every task's first call (run.py), and a resumed run's config
    check_targets(cfg)         every `_target_` is on ALLOWED_TARGETS (or IMGCLS_EXTRA_TARGETS);
                               engine.build.build runs it before each instantiate
    check_saved_config(d, f)   a config read from file f: allowed targets, no interpolation

Each message names the key, the bad value and what to write instead. A config from a checkpoint
or an export sidecar is data from a file: its `_target_`s pass the same list, so loading a
model never calls whatever a file names.
"""

import difflib
import importlib
import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType

from omegaconf import DictConfig, ListConfig, OmegaConf

# Every callable a config may instantiate: exactly the `_target_`s of conf/ (a test keeps the two
# equal). A list of callables, not of packages: `timm.` or `torch.` would admit
# timm.models.load_state_dict(checkpoint_path=..., weights_only=False), which unpickles, and so
# runs, any file a config names. A new builder in conf/ is added here, in the same review.
ALLOWED_TARGETS = (
    "data.annfile.annfile",
    "data.cifar.cifar10",
    "data.cifar.cifar100",
    "data.digits.digits",
    "data.digits.digits_multilabel",
    "data.digits.mnist5k",
    "data.digits.digits_longtail",
    "data.openmmlab_json.openmmlab_json",
    "data.folders.imagefolder",
    "data.folders.imagenet",
    "data.mnist.fashion_mnist",
    "data.mnist.mnist",
    "engine.objective.asl",
    "engine.objective.bce",
    "engine.objective.ce",
    "engine.objective.poly",
    "engine.objective.soft_ce",
    "engine.optim.create_optimizer",
    "engine.schedules.constant",
    "engine.schedules.cosine",
    "engine.schedules.multistep",
    "engine.schedules.poly",
    "engine.schedules.step",
    "models.speednet.speednet",
    "models.timm_models.create",
    "timm.data.Mixup",  # mixes batches in memory; reads no file
)
# Your own builders besides those, comma-separated, each either
#   a callable:  mylab.models.build_net   that one function or class, wherever it is defined
#   a module:    mylab.models             the functions and classes *defined in* mylab/models.py
#                                         (`mylab.models.<name>`, one level): not the names it
#                                         imports (its `os`, a `torch.load` it imported), not
#                                         its submodules, not _private names
# An environment variable, not a config key: a config or a checkpoint cannot widen its own list.
EXTRA_TARGETS = "IMGCLS_EXTRA_TARGETS"
EXTEND_HINT = (
    "a config instantiates only the builders this repo's conf/ uses (engine/checks.py "
    f"ALLOWED_TARGETS); to allow your own, set {EXTRA_TARGETS} in the environment to callables "
    "(mylab.models.build_net) or modules (mylab.models: the functions and classes defined in it), "
    "comma-separated"
)
HYDRA_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")
# keyword arguments engine/build.py passes at the call site: not config keys
LATE_ARGUMENTS = {
    "model": {
        "num_classes": "the dataset's class count",
        "in_chans": "the dataset's channel count",
    },
    "optim": {"model": "the built model", "global_batch_size": "the batch one update sees"},
    "sched": {
        "optimizer": "the built optimizer",
        "total_steps": "trainer.epochs x updates per epoch",
        "steps_per_epoch": "the updates per epoch",
    },
    "loss": {
        "num_classes": "the dataset's class count",
        "class_stats": "the training split's label counts",
        "soft_targets": "whether mixup or cutmix is on",
        "multi_label": "the dataset",
    },
    "mixup": {
        "label_smoothing": "loss.label_smoothing",
        "num_classes": "the dataset's class count",
        "multi_label": "the dataset",
    },
    "data.dataset": {
        "train_transform": "data.transform",
        "eval_transform": "data.transform",
    },
}
# engine.loop.fit's arguments run.py fills from elsewhere than cfg.trainer (TrainerOptions)
FIT_LATE = {"seed": "the top-level seed", "num_classes": "the dataset", "resume": "resume=..."}


def extra_targets() -> tuple[str, ...]:
    """IMGCLS_EXTRA_TARGETS's entries: callables and modules the user allows besides the list."""
    return tuple(p.strip() for p in os.environ.get(EXTRA_TARGETS, "").split(",") if p.strip())


# ---------------------------------------------------------------------------------------------
# _target_


def check_targets(cfg, root: str | None = None) -> None:
    """Raise a ValueError unless every `_target_` in `cfg` names an allowed callable.

    Walks the whole config: nested nodes, lists, `_args_`, `_partial_` nodes, every key, and the
    value an interpolation resolves to (`${oc.create:...}` makes a node from a string). Nothing is
    instantiated. The top-level `hydra` node (launcher and logging plugins, which Hydra
    instantiates itself before run.py runs) is left out of a composed config.
    """
    if root is None:
        root = cfg._get_full_key(None) if isinstance(cfg, DictConfig) else ""
    for path, target in _targets(cfg, root or "", top=True):
        check_target(path, target)


def check_target(path: str, target) -> Callable:
    """The callable `target` names, if it is allowed; `path` (e.g. model._target_) is for errors."""

    def refuse(why: str) -> ValueError:
        return ValueError(f"{path}={target!r} is not allowed: {why}; {EXTEND_HINT}")

    if not isinstance(target, str) or not target:
        raise refuse("a _target_ is a dotted name (module.function)")
    if target in ALLOWED_TARGETS:
        return _locate(target, refuse)
    extras = extra_targets()
    module = target.rpartition(".")[0]
    if target not in extras and module not in extras:
        close = difflib.get_close_matches(target, ALLOWED_TARGETS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise refuse(f"it is not one of the callables this repo's configs use{hint}")
    if any(not p.isidentifier() or p.startswith("_") for p in target.split(".")):
        raise refuse("each part must be a public Python name (no _private or __dunder__)")
    found = _locate(target, refuse)
    if isinstance(found, ModuleType) or not callable(found):
        raise refuse(f"it is a {type(found).__name__}, not a function or class")
    defined_in = getattr(found, "__module__", None)
    if target not in extras and defined_in != module:
        # `mylab.models` allows what mylab/models.py defines, not what it imported (os.system)
        raise refuse(
            f"{EXTRA_TARGETS} allows the module {module!r}, but this is "
            f"{defined_in}.{getattr(found, '__qualname__', '?')}, which it only imports"
        )
    return found


def check_saved_config(config, source) -> None:
    """A config read from a file (a checkpoint, an export sidecar): allowed `_target_`s only, and
    no interpolation. This repo saves configs resolved, so a `${...}` was put there by someone
    else: `${oc.env:AWS_SECRET_ACCESS_KEY}` would copy a secret into the run's files, and
    `${oc.create:...}` would make a node that no check has seen. Its `hydra` node is checked too:
    nothing this repo saves has one."""
    if not isinstance(config, Mapping):
        # OmegaConf.create would parse a string as YAML: a config no check has seen
        raise ValueError(
            f"{str(source)!r}: its saved config is a {type(config).__name__}, not a mapping of "
            "keys to values; the file was not written by this repo: refused"
        )
    for path, value in _strings(config, ""):
        if "${" in value:
            raise ValueError(
                f"{str(source)!r}: its saved config has {path}={value!r}, an interpolation; "
                "configs this repo saves are resolved, so the file was not written by it: refused"
            )
    try:
        for path, target in _targets(config, ""):
            check_target(path, target)
    except ValueError as err:
        raise ValueError(f"{str(source)!r}: its saved config is refused: {err}") from None


def _strings(node, path: str):
    """(key path, string) of every string in `node`, keys included."""
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, Mapping):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str):
                yield where, key
            yield from _strings(value, where)
    elif isinstance(node, Sequence) and not isinstance(node, bytes):
        for i, value in enumerate(node):
            yield from _strings(value, f"{path}[{i}]")


def _locate(target: str, refuse) -> object:
    """Hydra's lookup (import the longest module, then attributes), refusing module aliases."""
    parts = target.split(".")
    try:
        found = importlib.import_module(parts[0])
    except ImportError as err:
        raise refuse(f"{parts[0]!r} cannot be imported ({err})") from None
    for i in range(1, len(parts)):
        dotted = ".".join(parts[: i + 1])
        if hasattr(found, parts[i]):
            found = getattr(found, parts[i])
        elif isinstance(found, ModuleType):
            try:
                found = importlib.import_module(dotted)
            except ImportError:
                raise refuse(f"{dotted!r} does not exist") from None
        else:
            raise refuse(f"{dotted!r} does not exist")
        if isinstance(found, ModuleType) and found.__name__ != dotted:
            # a module imported under another name (`mylab.os` is os): not the package's own
            raise refuse(f"{dotted!r} is the module {found.__name__!r}")
    return found


MAX_DEPTH = 64  # deeper than any real config: a reference cycle (`a: {b: ${a}}`) stops here


def _targets(node, path: str, top: bool = False, depth: int = 0):
    """(key path, value) of every `_target_` under `node`, a config or plain dicts and lists.

    An interpolation is walked as what it resolves to, as instantiate will see it; one that
    cannot resolve here (a `${hydra:...}` outside Hydra, a missing key) cannot be instantiated
    either, and is left to fail there.
    """
    if depth > MAX_DEPTH:
        raise ValueError(f"{path or 'the config'} is nested over {MAX_DEPTH} deep (a cycle?)")
    if isinstance(node, DictConfig | Mapping):
        for key in list(node.keys()):
            if top and key == "hydra" and path == "":
                continue
            where = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                target = _value(node, key)
                # one that does not resolve is named as written (`${...}`), and refused
                yield where, node._get_node(key)._value() if target is _UNRESOLVED else target
            elif not (isinstance(node, DictConfig) and OmegaConf.is_missing(node, key)):
                yield from _targets(_value(node, key), where, depth=depth + 1)
    elif isinstance(node, ListConfig | Sequence) and not isinstance(node, str | bytes):
        for i in range(len(node)):
            if not (isinstance(node, ListConfig) and OmegaConf.is_missing(node, i)):
                yield from _targets(_value(node, i), f"{path}[{i}]", depth=depth + 1)


_UNRESOLVED = object()


def _value(node, key):
    """node[key], resolved; _UNRESOLVED (walked as a leaf) when it cannot resolve here."""
    try:
        return node[key]
    except Exception:  # any resolver's failure: instantiate's own resolution fails the same way
        return _UNRESOLVED


# ---------------------------------------------------------------------------------------------
# values and keys


def _whole(low: int, example, none_ok: bool = False, high: int | None = None):
    def check(v) -> bool:
        return (v is None and none_ok) or (_is_int(v) and v >= low and (high is None or v <= high))

    what = f"a whole number >= {low}" + (f" and <= {high}" if high is not None else "")
    return check, what + (" or null" if none_ok else ""), example


def _number(
    low: float,
    high: float = math.inf,
    example=None,
    open_low=False,
    none_ok=False,
    open_high=False,
):
    def check(v) -> bool:
        if v is None:
            return none_ok
        if not _is_number(v) or not math.isfinite(v):
            return False
        return (v > low if open_low else v >= low) and (v < high if open_high else v <= high)

    lo = f"> {low}" if open_low else f">= {low}"
    hi = "" if high == math.inf else f" and {'<' if open_high else '<='} {high}"
    return check, f"a number {lo}{hi}" + (" or null" if none_ok else ""), example


def _bool(example: bool):
    # `trainer.channels_last=yes` arrives as the string 'yes', which Python reads as true
    return (lambda v: isinstance(v, bool)), "true or false", str(example).lower()


def _choice(options, example, none_ok: bool = False):
    """One of `options`: a tuple, or a function that returns one (names that a module importing
    torch defines are looked up when a config is checked, not when this module is imported)."""

    def names() -> tuple:
        return options() if callable(options) else options

    def check(v) -> bool:
        return (v is None and none_ok) or (isinstance(v, str) and v in names())

    def what() -> str:
        return "one of " + ", ".join(map(str, names())) + (" or null" if none_ok else "")

    return check, what, example


def _range(low: float, high: float, example: str):
    """[min, max] with low < min <= max <= high, as data.transform.scale and ratio are."""

    def check(v) -> bool:
        return (
            isinstance(v, Sequence | ListConfig)
            and not isinstance(v, str)
            and len(v) == 2
            and all(_is_number(x) and math.isfinite(x) for x in v)
            and low < v[0] <= v[1] <= high
        )

    bound = "" if high == math.inf else f" <= {high}"
    return check, f"[min, max] with {low} < min <= max{bound}", example


def _betas(v) -> bool:
    return (
        isinstance(v, Sequence | ListConfig)
        and not isinstance(v, str)
        and len(v) == 2
        and all(_is_number(b) and 0 <= b < 1 for b in v)
    )


_CLASS_WEIGHTS = ("auto", "inv_freq", "effective_num")


def _weight_list(value) -> bool:
    from engine.objective import weight_list_problem

    return weight_list_problem(_plain_value(value)) is None


def _legacy_alias(cfg: DictConfig, key: str) -> bool:
    """`key` is one of the old names that conf/ keeps as an alias of its new key, unset."""
    from engine.objective import LEGACY_KEYS, legacy_value

    return key in LEGACY_KEYS and legacy_value(cfg, key) is None


def _precisions() -> tuple:
    from engine.device import PRECISIONS

    return tuple(PRECISIONS)


def _best(kind: str) -> tuple:
    from engine import checkpoint

    return getattr(checkpoint, f"BEST_{kind}")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PROBABILITY = {"low": 0, "high": 1}
# key -> (test, what it must be, an example value). Checked where the key exists: a task's
# composed config has trainer/optim/data keys even where only the checkpoint's are used.
VALUES = {
    "seed": _whole(0, 0),
    "data.batch_size": _whole(1, 64),
    "data.eval_batch_size": _whole(1, 128, none_ok=True),
    "data.num_workers": _whole(0, 4),
    "data.on_device": _bool(False),
    "data.fold": _whole(0, 0, none_ok=True),
    "data.num_folds": _whole(2, 5),
    "data.dataset.image_size": _whole(1, 32),
    "data.dataset.val_fraction": _number(0, 1, example=0.2, open_high=True),
    "data.dataset.download": _bool(True),
    "data.dataset.augment": _bool(True),
    "data.transform.crop_pct": _number(0, 1, example=0.875, open_low=True, none_ok=True),
    "data.transform.scale": _range(0, 1, "[0.08,1.0]"),
    "data.transform.ratio": _range(0, math.inf, "[0.75,1.3333333]"),
    "data.transform.hflip": _number(**PROBABILITY, example=0.5),
    "data.transform.vflip": _number(**PROBABILITY, example=0.0),
    "data.transform.color_jitter": _number(0, example=0.4, none_ok=True),
    "data.transform.re_prob": _number(**PROBABILITY, example=0.25),
    "data.transform.re_mode": _choice(("pixel", "const", "rand"), "pixel"),
    "data.transform.re_count": _whole(1, 1),
    "model.pretrained": _bool(False),
    "model.drop_rate": _number(0, 1, example=0.1, open_high=True),
    "model.drop_path_rate": _number(0, 1, example=0.1, open_high=True),
    "model.img_size": _whole(1, 224, none_ok=True),
    "trainer.epochs": _whole(1, 10),
    "trainer.precision": _choice(_precisions, "bf16"),
    "trainer.channels_last": _bool(True),
    "trainer.compile": (
        lambda v: isinstance(v, bool) or v in COMPILE_MODES,
        f"true, false or a torch.compile mode ({', '.join(COMPILE_MODES)})",
        "true",
    ),
    "trainer.cudnn_benchmark": _bool(True),
    "trainer.accum_steps": _whole(1, 1),
    "trainer.log_every": _whole(1, 10),
    "trainer.limit_train_batches": _whole(1, 50, none_ok=True),
    "trainer.limit_val_batches": _whole(1, 10, none_ok=True),
    "trainer.clip_grad_norm": _number(0, example=1.0, open_low=True, none_ok=True),
    "trainer.ema_decay": _number(0, 0.999999, example=0.9998, open_low=True, none_ok=True),
    # the keys of before (engine/objective.py LEGACY_KEYS): checked where given a value
    "trainer.label_smoothing": _number(0, 0.99, example=0.1, none_ok=True),
    "trainer.mixup_alpha": _number(0, example=0.8, none_ok=True),
    "trainer.cutmix_alpha": _number(0, example=1.0, none_ok=True),
    "trainer.mixup_prob": _number(**PROBABILITY, example=1.0, none_ok=True),
    "trainer.mixup_switch_prob": _number(**PROBABILITY, example=0.5, none_ok=True),
    "loss.label_smoothing": _number(0, 0.99, example=0.1),
    "loss.class_weight": (
        lambda v: v is None or v in _CLASS_WEIGHTS or _weight_list(v),
        "null, " + ", ".join(_CLASS_WEIGHTS) + " or a list of numbers >= 0, one per class",
        "auto",
    ),
    "loss.pos_weight": (
        lambda v: v is None or v == "neg_pos" or _weight_list(v),
        "null, neg_pos or a list of numbers >= 0, one per class",
        "neg_pos",
    ),
    "loss.class_weight_beta": _number(0, 1, example=0.999, open_low=True, open_high=True),
    "loss.target_threshold": _number(0, 1, example=0.2, none_ok=True),
    "loss.sum_classes": _bool(False),
    "loss.gamma_neg": _number(0, example=4.0),
    "loss.gamma_pos": _number(0, example=1.0),
    "loss.clip": _number(0, 1, example=0.05, none_ok=True, open_high=True),
    "loss.reduction": _choice(("batchmean", "mean", "sum"), "batchmean"),
    "loss.epsilon": _number(-1, example=2.0),
    "mixup.mixup_alpha": _number(0, example=0.8),
    "mixup.cutmix_alpha": _number(0, example=1.0),
    "mixup.cutmix_minmax": (
        lambda v: v is None or _range(0, 1, "")[0](v),
        "null or [min, max] with 0 < min <= max <= 1",
        "[0.2,0.8]",
    ),
    "mixup.prob": _number(**PROBABILITY, example=1.0),
    "mixup.switch_prob": _number(**PROBABILITY, example=0.5),
    "mixup.mode": _choice(("batch", "pair", "elem"), "batch"),
    "mixup.correct_lam": _bool(True),
    "trainer.eval_hflip": _bool(True),
    "trainer.max_bad_steps": _whole(1, 10, none_ok=True),
    "trainer.checkpoint_every_updates": _whole(1, 500, none_ok=True),
    "trainer.sync_bn": _bool(True),
    "optim.lr": _number(0, example=1e-3, open_low=True),
    "optim.weight_decay": _number(0, example=0.05),
    "optim.base_batch_size": _whole(1, 256, none_ok=True),
    "optim.momentum": _number(0, 1, example=0.9, open_high=True),
    "optim.betas": (_betas, "[beta1, beta2], each >= 0 and < 1", "[0.9,0.999]"),
    "optim.eps": _number(0, example=1e-8, open_low=True),
    "optim.nesterov": _bool(True),
    "optim.filter_bias_and_bn": _bool(True),
    "optim.layer_decay": _number(0, 1, example=0.75, open_low=True, none_ok=True),
    "optim.layer_decay_min_scale": _number(**PROBABILITY, example=0.0),
    "sched.warmup_epochs": _number(0, example=1.0),
    "sched.warmup_steps": _whole(0, 500),
    "sched.warmup_lr": _number(0, example=1e-6),
    "sched.min_lr": _number(0, example=1e-6),
    "sched.decay_epochs": _number(0, example=30, open_low=True),
    "sched.decay_rate": _number(0, example=0.1, open_low=True),
    "sched.power": _number(0, example=1.0),
    "checkpoint.keep_last": _whole(0, 3),
    "checkpoint.best_metric": _choice(lambda: _best("METRICS"), "val/loss"),
    "checkpoint.best_mode": _choice(lambda: _best("MODES"), "min"),
    "task.topk": _whole(1, 5),
    "task.threshold": _number(0, 1, example=0.5, open_low=True, open_high=True),
    "task.batch_size": _whole(1, 32),
    "task.port": (lambda v: _is_int(v) and 0 <= v <= 65535, "a port number 0..65535", 8000),
    "task.use_ema": _bool(False),
    "task.split": _choice(("val", "train"), "val"),
    "task.log_misclassified": _whole(0, 64),
    "task.max_bytes": _whole(1, 20000000),
    "task.atol": _number(0, example=1e-4, open_low=True),
    "task.check_images": _whole(0, 8),
    "task.tta": _choice(("none", "flip", "crops"), "flip"),
    "task.min_score": _number(**PROBABILITY, example=0.5, none_ok=True),
}
DEVICE_KEYS = ("trainer.device", "task.device")
_ABSENT = object()


def check_config(cfg: DictConfig) -> None:
    """Raise a ValueError naming every bad key, value and fix in `cfg`; build nothing.

    `_target_`s outside the allow-list (check_target), values of the wrong type or sign
    (VALUES), the device, model.name, and keys no target takes (a `+key=` typo, or a key the
    engine sets itself such as model.num_classes). trainer.precision is engine.loop.fit's own
    first check.
    """
    problems, targets = [], {}
    for path, target in _targets(cfg, "", top=True):
        try:
            targets[path] = check_target(path, target)
        except ValueError as err:
            problems.append(str(err))
    problems += [*_value_problems(cfg), *_key_problems(cfg, targets)]
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        raise ValueError(f"{len(problems)} problems in the config:\n- " + "\n- ".join(problems))


def _value_problems(cfg: DictConfig) -> list[str]:
    problems = [
        f"{key}=??? has no value; give one on the command line ({key}=...)"
        for key in OmegaConf.missing_keys(cfg)
        if key != "model.name"  # said below, with examples
    ]
    for key, (test, what, example) in VALUES.items():
        value = _get(cfg, key)
        # _ABSENT: no such key, or ???
        if value is not _ABSENT and not _legacy_alias(cfg, key) and not test(value):
            what = what() if callable(what) else what
            problems.append(f"{key}={_plain_value(value)!r} must be {what}, e.g. {key}={example}")
    for key in DEVICE_KEYS:
        value = _get(cfg, key)
        if value is not _ABSENT:
            problems += _device_problems(key, value)
    problems += _between_keys(cfg)
    if _get(cfg, "model._target_") == "models.timm_models.create":
        from models.timm_models import check_name

        name = _get(cfg, "model.name")
        name = "???" if name is _ABSENT else name  # `model=timm` without model.name=...
        if not isinstance(name, str) or name == "???":
            problems.append(f"model.name={name!r} must be a timm model name, e.g. resnet50")
        else:
            try:
                check_name(name)
            except ValueError as err:
                problems.append(str(err))
    return problems


def _between_keys(cfg: DictConfig) -> list[str]:
    """Values that are fine alone but contradict another key (each key checked by VALUES)."""
    problems = []
    fold, folds = _get(cfg, "data.fold"), _get(cfg, "data.num_folds")
    if _is_int(fold) and _is_int(folds) and fold >= folds:
        problems.append(
            f"data.fold={fold} but data.num_folds={folds}: the folds are 0..{folds - 1}"
        )
    batch = _get(cfg, "data.batch_size")
    mixing = [k for k in MIXING_KEYS if _mixes(cfg, k)]
    if mixing and _is_int(batch) and batch % 2 and _get(cfg, "task.name") == "train":
        problems.append(
            f"{mixing[0]}={_plain_value(_get(cfg, mixing[0]))} mixes a batch with its mirror "
            f"and needs an even data.batch_size, not {batch}; e.g. data.batch_size={batch + 1}"
        )
    milestones, warmup = _get(cfg, "sched.milestones"), _get(cfg, "sched.warmup_epochs")
    if milestones is not _ABSENT:
        plain = _plain_value(milestones)
        if not (
            isinstance(plain, list)
            and all(_is_number(m) and m > 0 for m in plain)
            and plain == sorted(plain)
        ):
            problems.append(
                f"sched.milestones={plain!r} must be epochs > 0 in increasing order, "
                "e.g. sched.milestones=[30,60,90]"
            )
        elif _is_number(warmup) and plain and plain[0] <= warmup:
            problems.append(
                f"sched.milestones={plain} start within the warmup (sched.warmup_epochs="
                f"{warmup}); the LR decays after it: lower the warmup or move the milestones"
            )
    return problems


# keys that turn mixup / cutmix on: the mixup block's, and the old trainer names given a value
MIXING_KEYS = (
    "trainer.mixup_alpha",
    "trainer.cutmix_alpha",
    "mixup.mixup_alpha",
    "mixup.cutmix_alpha",
    "mixup.cutmix_minmax",
)


def _mixes(cfg: DictConfig, key: str) -> bool:
    if _legacy_alias(cfg, key):
        return False
    if key.endswith("minmax"):
        return _get(cfg, key) not in (_ABSENT, None)
    return _positive(cfg, key)


def _positive(cfg: DictConfig, key: str) -> bool:
    value = _get(cfg, key)
    return _is_number(value) and value > 0


def _plain_value(value):
    """A config node as plain lists and dicts, for messages."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _device_problems(key: str, value) -> list[str]:
    import torch

    if value == "auto":
        return []
    fix = f"use {key}=auto (CUDA, else MPS, else the CPU) or {key}=cpu"
    try:
        device = torch.device(str(value))
    except RuntimeError:
        return [f"{key}={value!r} is not a device; {fix}, cuda, cuda:N or mps"]
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return [f"{key}={value!r} but CUDA is not available on this machine; {fix}"]
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return [f"{key}={value!r} but this machine has {count} GPU(s) (cuda:0..{count - 1})"]
    if device.type == "mps" and not torch.backends.mps.is_available():
        return [f"{key}={value!r} but MPS (Apple GPU) is not available here; {fix}"]
    if device.type not in ("cpu", "cuda", "mps"):
        return [f"{key}={value!r}: this repo runs on cpu, cuda or mps; {fix}"]
    return []


def _key_problems(cfg: DictConfig, targets: dict[str, Callable]) -> list[str]:
    """Keys that the callee does not take: they would fail (or be ignored) at the call site.

    `targets`: the allowed callables by the path of their `_target_` key.
    """
    problems = []
    for target_path, func in targets.items():
        path = target_path.rsplit(".", 1)[0] if "." in target_path else ""
        node = OmegaConf.select(cfg, path) if path else cfg
        if not isinstance(node, DictConfig):
            continue
        keys = [k for k in node if k not in HYDRA_KEYS]
        problems += _unbound(path, keys, func, LATE_ARGUMENTS.get(path, {}))
    trainer = OmegaConf.select(cfg, "trainer")
    if isinstance(trainer, DictConfig) and _get(cfg, "task.name") == "train":
        from engine.loop import TrainerOptions, fit
        from engine.objective import LEGACY_KEYS

        # fit(model, loaders, ..., seed=cfg.seed, num_classes=..., resume=..., **cfg.trainer),
        # whose **trainer are TrainerOptions' fields
        params = inspect.signature(fit).parameters.values()
        late = {p.name: "built by the engine" for p in params if p.kind is p.POSITIONAL_OR_KEYWORD}
        # the old names (engine/objective.py LEGACY_KEYS) are moved out before fit is called
        keys = [k for k in trainer if f"trainer.{k}" not in LEGACY_KEYS]
        problems += _unbound("trainer", keys, TrainerOptions, {**late, **FIT_LATE})
    return problems


def _unbound(path: str, keys: list, func, late: dict) -> list[str]:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check against
        return []
    named = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    name = f"{func.__module__}.{func.__qualname__}"
    problems, unknown = [], []
    for key in keys:
        if key in late:
            problems.append(
                f"{path}.{key} is set by the engine ({late[key]}), not by the config; "
                f"remove {path}.{key}"
            )
        elif key not in named and not takes_any:
            close = difflib.get_close_matches(str(key), [n for n in named if n not in late], n=1)
            if close:
                problems.append(
                    f"{path}.{key} is not an argument of {name}; did you mean {path}.{close[0]}?"
                )
            else:
                unknown.append(f"{path}.{key}")
    if unknown:
        options = ", ".join(n for n in named if n not in late)
        problems.append(
            f"{', '.join(unknown)} {'is not an argument' if len(unknown) == 1 else 'are not arguments'}"
            f" of {name}; it takes {options}"
        )
    return problems


def _get(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
