"""A sweep's settings: sweeps/<name>.yaml, `sweep.<key>=` overrides, the saved config of a
sweep being continued, and every check that can run before the first trial."""

import contextlib
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

REPO = Path(__file__).resolve().parent.parent
SWEEP_CONF = REPO / "sweeps"  # not in conf/: run.py would list it as one of its config groups


# short names -> optuna classes; sampler_args / pruner_args are those classes' keyword arguments
SAMPLERS = {
    "tpe": "TPESampler",
    "random": "RandomSampler",
    "gp": "GPSampler",
    "qmc": "QMCSampler",
}
PRUNERS = {
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "hyperband": "HyperbandPruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "none": "NopPruner",
}
# space entry type -> the keys it takes (the keyword arguments of trial.suggest_<type>)
SPACE_KEYS = {
    "float": ({"low", "high"}, {"log", "step"}),
    "int": ({"low", "high"}, {"log", "step"}),
    "categorical": ({"choices"}, set()),
}
# what a restart may change; the rest defines the search and stays as the sweep started
RESTART_KEYS = {"dir", "n_trials", "n_jobs", "report_only", "devices", "max_failed_trials"}


@dataclass
class SweepConfig:
    """The keys of sweeps/*.yaml and their types. Their values default to
    sweeps/default.yaml's (its space aside), which says what each one does."""

    name: str = MISSING
    metric: str = MISSING
    direction: str = MISSING
    n_trials: int = MISSING
    n_jobs: int = MISSING
    sampler: str = MISSING
    sampler_args: dict[str, Any] = MISSING
    seed: int | None = MISSING
    pruner: str = MISSING
    pruner_args: dict[str, Any] = MISSING
    space: dict[str, Any] = MISSING
    overrides: list[str] = MISSING
    storage: str | None = MISSING
    study: str | None = MISSING
    dir: str | None = MISSING
    max_retry: int | None = MISSING
    max_failed_trials: int | None = MISSING
    heartbeat_interval: int = MISSING
    grace_period: int = MISSING
    devices: list[Any] | None = MISSING
    report_only: bool = MISSING


class SweepError(ValueError):
    """A bad sweep setting; printed as one message naming the value and the fix."""


def parse_args(argv: list[str]) -> tuple[str | None, list, list[str]]:
    """(sweep file name or None, `sweep.<key>=` overrides, run.py overrides for every trial)."""
    parser = OverridesParser.create()
    name, sweep_overrides, run_overrides = None, [], []
    for arg in argv:
        if arg in ("-m", "--multirun") or arg.startswith("hydra.run.dir"):
            raise SweepError(
                f"{arg!r}: sweep.py launches the trials and places their folders itself; drop it"
            )
        if arg.startswith("sweep.overrides="):
            sweep_overrides.append(("overrides", _parse_override_list(arg, parser)))
            continue
        try:
            override = parser.parse_override(arg)
        except HydraException as err:
            raise SweepError(f"{arg!r} is not a Hydra override: {err}") from None
        key = override.key_or_group
        if key == "sweep":
            name = str(override.value())
        elif key.startswith("sweep."):
            if override.is_delete():
                raise SweepError(f"{arg!r}: sweep keys cannot be deleted; set them instead")
            sweep_overrides.append((key.removeprefix("sweep."), override.value()))
        else:
            run_overrides.append(arg)
    return name, sweep_overrides, run_overrides


def _parse_override_list(arg: str, parser: OverridesParser) -> list[str]:
    """`sweep.overrides=[trainer.epochs=5,model=resnet50]`: Hydra's grammar wants each item
    quoted, so unquoted items are split at top-level commas and checked one by one."""
    with contextlib.suppress(HydraException):
        value = parser.parse_override(arg).value()
        if isinstance(value, list):
            return [str(v) for v in value]
    text = arg.partition("=")[2].strip()
    if not (text.startswith("[") and text.endswith("]")):
        raise SweepError(
            f"{arg!r}: sweep.overrides is a list, e.g. 'sweep.overrides=[trainer.epochs=5]'"
        )
    items, depth, quote, start = [], 0, None, 1
    for i, char in enumerate(text[1:-1], start=1):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    items.append(text[start:-1].strip())
    items = [item for item in items if item]
    for item in items:
        try:
            parser.parse_override(item)
        except HydraException as err:
            raise SweepError(
                f"sweep.overrides item {item!r} is not a run.py override: {err}"
            ) from None
    return items


def sweep_options() -> list[str]:
    return sorted(p.stem for p in SWEEP_CONF.glob("*.yaml"))


def load_sweep_file(name: str) -> DictConfig:
    """sweeps/<name>.yaml, or a .yaml path, over SweepConfig's defaults."""
    path = Path(name).expanduser()
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = SWEEP_CONF / f"{name}.yaml"
    if not path.is_file():
        raise SweepError(
            f"sweep={name!r}: no sweeps/{name}.yaml and no such .yaml file; "
            f"choose one of {sweep_options()} or give a path to a sweep .yaml"
        )
    cfg = _schema()
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
    except OmegaConfBaseException as err:
        raise SweepError(f"{path}: {_first_line(err)}; the keys are {list(_schema())}") from None
    if not cfg.name:
        cfg.name = path.stem
    return cfg


def _schema() -> DictConfig:
    """SweepConfig's keys with sweeps/default.yaml's values, less its name and space."""
    base = OmegaConf.merge(
        OmegaConf.structured(SweepConfig), OmegaConf.load(SWEEP_CONF / "default.yaml")
    )
    base.name, base.space = "", {}
    return base


def apply_overrides(cfg: DictConfig, overrides: list) -> None:
    for key, value in overrides:
        if key not in cfg:
            raise SweepError(f"sweep.{key} is not a sweep setting; the keys are {list(cfg)}")
        try:
            # merge=False: a space or a list given on the command line replaces the file's
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException as err:
            raise SweepError(f"sweep.{key}={value!r}: {_first_line(err)}") from None


def load_config(argv: list[str]) -> tuple[DictConfig, bool]:
    """The sweep's config, and whether it continues an existing sweep.

    A new sweep: the file, then `sweep.<key>=` and run overrides. An existing one (sweep.dir
    holds a sweep.yaml, or sweep.storage + sweep.study name a study made by sweep.py): its saved
    config, where the command line may change only RESTART_KEYS.
    """
    name, sweep_overrides, run_overrides = parse_args(argv)
    fresh = load_sweep_file(name or "default")
    apply_overrides(fresh, sweep_overrides)
    _add_run_overrides(fresh, run_overrides)
    saved = _saved_config(fresh)
    if saved is None:
        if fresh.report_only:
            raise SweepError(
                f"sweep.report_only=true needs an existing sweep: sweep.dir={fresh.dir!r} holds no "
                "sweep.yaml; give the folder of a sweep (multirun/sweeps/<name>-<time>)"
            )
        if fresh.dir is None:
            fresh.dir = str(_new_sweep_dir(fresh.name))
        if fresh.study is None:
            fresh.study = Path(fresh.dir).name
        validate(fresh)
        return fresh, False

    cfg = saved.copy()
    apply_overrides(cfg, sweep_overrides)
    _add_run_overrides(cfg, run_overrides)
    if name is not None and name != saved.name:
        raise SweepError(
            f"sweep={name!r}, but {cfg.dir} is a {saved.name!r} sweep; leave sweep= out to "
            "continue it, or start a new sweep in a new folder"
        )
    for key in cfg:
        if key not in RESTART_KEYS and cfg[key] != saved[key]:
            new = OmegaConf.to_container(cfg)[key]
            old = OmegaConf.to_container(saved)[key]
            raise SweepError(
                f"sweep.{key}={new!r}, but this sweep runs with {old!r} ({cfg.dir}/sweep.yaml); "
                f"a sweep keeps its search: change only {sorted(RESTART_KEYS)} when continuing "
                "it, or start a new sweep"
            )
    validate(cfg)
    return cfg, True


def _add_run_overrides(cfg: DictConfig, run_overrides: list[str]) -> None:
    cfg.overrides = [*cfg.overrides, *(o for o in run_overrides if o not in cfg.overrides)]


def _saved_config(fresh: DictConfig) -> DictConfig | None:
    if fresh.dir is not None:
        path = Path(fresh.dir) / "sweep.yaml"
        if not path.is_file():
            return None
        saved = OmegaConf.merge(OmegaConf.structured(SweepConfig), OmegaConf.load(path))
        saved.dir = fresh.dir  # where the folder is now, if it moved
        return saved
    if fresh.storage is not None and fresh.study is not None:
        # a worker on another machine: the study in the shared database holds the config
        with contextlib.suppress(KeyError):
            study = optuna.load_study(study_name=fresh.study, storage=fresh.storage)
            if "sweep" in study.user_attrs:
                saved = OmegaConf.merge(
                    OmegaConf.structured(SweepConfig), study.user_attrs["sweep"]
                )
                saved.dir = str(Path("multirun") / "sweeps" / fresh.study)
                return saved
    return None


def _new_sweep_dir(name: str) -> Path:
    base = Path("multirun") / "sweeps" / f"{name}-{datetime.now():%Y-%m-%d_%H-%M-%S}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}_{i}")
    return path


def validate(cfg: DictConfig) -> None:
    """Everything that can be checked before a trial starts: names, space, numbers."""
    if cfg.direction not in ("maximize", "minimize"):
        raise SweepError(f"sweep.direction={cfg.direction!r}; choose 'maximize' or 'minimize'")
    if cfg.n_trials < 1 or cfg.n_jobs < 1:
        raise SweepError(
            f"sweep.n_trials={cfg.n_trials} and sweep.n_jobs={cfg.n_jobs} must be 1 or more"
        )
    make_sampler(cfg)
    make_pruner(cfg)
    if not cfg.space:
        raise SweepError(
            "sweep.space is empty; give each searched key a range, e.g. "
            "space: {optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}}"
        )
    for key, spec in cfg.space.items():
        distribution(key, spec)


def distribution(key: str, spec) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution of one space entry, or a SweepError naming what is wrong."""
    example = "{type: float, low: 1.0e-4, high: 1.0e-1, log: true} or {type: categorical, choices: [a, b]}"
    if not isinstance(spec, DictConfig | dict) or "type" not in spec:
        raise SweepError(f"sweep.space.{key}={spec!r} must be a mapping like {example}")
    spec = dict(OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else spec)
    kind = spec.pop("type")
    if kind not in SPACE_KEYS:
        raise SweepError(
            f"sweep.space.{key}.type={kind!r}; choose one of {list(SPACE_KEYS)}: {example}"
        )
    required, optional = SPACE_KEYS[kind]
    missing, unknown = required - set(spec), set(spec) - required - optional
    if missing or unknown:
        raise SweepError(
            f"sweep.space.{key} ({kind}) "
            + (f"lacks {sorted(missing)}" if missing else f"has unknown keys {sorted(unknown)}")
            + f"; a {kind} entry takes {sorted(required)} and optionally {sorted(optional)}"
        )
    try:
        if kind == "categorical":
            if not isinstance(spec["choices"], list) or not spec["choices"]:
                raise ValueError("choices must be a non-empty list")
            return optuna.distributions.CategoricalDistribution(spec["choices"])
        if kind == "int":
            return optuna.distributions.IntDistribution(**spec)
        return optuna.distributions.FloatDistribution(**spec)
    except (ValueError, TypeError) as err:
        raise SweepError(f"sweep.space.{key}={spec | {'type': kind}}: {err}") from None


def make_sampler(cfg: DictConfig, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler, seeded with seed + seed_offset (the trials already in the study, so that a
    restarted sweep does not draw its first trials again)."""
    kwargs = OmegaConf.to_container(cfg.sampler_args)
    given = dict(kwargs)
    if cfg.seed is not None:
        kwargs.setdefault("seed", cfg.seed + seed_offset)
    if cfg.sampler == "tpe" and cfg.n_jobs > 1:
        kwargs.setdefault("constant_liar", True)  # parallel trials avoid each other's points
    return _optuna_object("sampler", cfg.sampler, SAMPLERS, optuna.samplers, kwargs, given)


def make_pruner(cfg: DictConfig) -> optuna.pruners.BasePruner:
    kwargs = {} if cfg.pruner == "none" else OmegaConf.to_container(cfg.pruner_args)
    return _optuna_object("pruner", cfg.pruner, PRUNERS, optuna.pruners, kwargs)


def _optuna_object(kind: str, name: str, names: dict, module, kwargs: dict, given=None):
    if name not in names:
        raise SweepError(f"sweep.{kind}={name!r}; choose one of {list(names)}")
    cls = getattr(module, names[name])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return cls(**kwargs)
    except TypeError as err:
        raise SweepError(
            f"sweep.{kind}_args={kwargs if given is None else given}: {err}; give the keyword "
            f"arguments of optuna.{module.__name__.split('.')[-1]}.{cls.__name__} (sweep.{kind}="
            f"{name}), e.g. sweep.{kind}_args={{}}"
        ) from None


def check_run_config(cfg: DictConfig) -> DictConfig:
    """Compose run.py's config with the fixed overrides and each space value, as a trial will:
    an unknown key or group option stops the sweep here rather than in every trial."""
    from hydra import compose, initialize_config_dir

    from engine.checks import check_targets

    def composed(extra: list[str], what: str) -> DictConfig:
        try:
            run_cfg = compose("config", overrides=[*cfg.overrides, *extra])
            check_targets(run_cfg)  # a trial's run.py would refuse it: refuse it once, here
            return run_cfg
        except (HydraException, OmegaConfBaseException, ValueError) as err:
            raise SweepError(f"{what}: run.py cannot take it: {_first_line(err)}") from None

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        base = composed([], f"sweep.overrides={list(cfg.overrides)}")
        for key, spec in cfg.space.items():
            dist = distribution(key, spec)
            values = dist.choices if hasattr(dist, "choices") else (dist.low, dist.high)
            for value in values:
                override = f"{key}={hydra_value(value)}"
                composed([override], f"sweep.space.{key} (trial override {override!r})")
    return base


_PARSER = OverridesParser.create()


def hydra_value(value) -> str:
    """`value` as Hydra's override grammar reads it back (strings quoted where they must be)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    with contextlib.suppress(HydraException):
        if _PARSER.parse_override(f"k={text}").value() == text:
            return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
