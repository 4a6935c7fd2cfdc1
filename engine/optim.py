"""Optimizers from timm's factory, with parameter groups chosen by rule and the LR scaled by batch.

`conf/optim/*.yaml` point at `create_optimizer`; the engine binds the late arguments:
`instantiate(cfg.optim)(model, global_batch_size=...)`.

Per-group LR multipliers live in each group's `lr_scale` key (timm's convention): the schedules
in engine/schedules.py (timm schedulers) set `group["lr"] = scheduled LR * lr_scale` on every
update, so the optimizer must be driven by one of them.
"""

import difflib
import fnmatch
import inspect
import logging
from collections.abc import Iterable, Mapping, Sequence

import timm.optim
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
from torch import nn
from torch.optim import Optimizer

log = logging.getLogger(__name__)

RULE_KEYS = {"pattern", "lr_mult", "decay_mult"}


def create_optimizer(
    model: nn.Module,
    *,
    opt: str,
    lr: float,
    weight_decay: float = 0.0,
    base_batch_size: int | None = None,
    global_batch_size: int | None = None,
    filter_bias_and_bn: bool = True,
    layer_decay: float | None = None,
    layer_decay_min_scale: float = 0.0,
    param_groups: Iterable[Mapping] = (),
    **opt_kwargs,
) -> Optimizer:
    """timm optimizer `opt` over the trainable parameters of `model`.

    lr: the LR per `base_batch_size` examples; the optimizer runs at
        lr * global_batch_size / base_batch_size (linear scaling rule). base_batch_size=None:
        `lr` is used as given.
    filter_bias_and_bn: no weight decay on every 1-D parameter (norms, biases, layer scales)
        and on the model's own `no_weight_decay()` names (ViT: pos_embed, cls_token).
    layer_decay: layer-wise LR decay (BEiT): the head runs at the LR, each earlier layer
        group at layer_decay times the one after it, never below layer_decay_min_scale.
    param_groups: rules `{pattern, lr_mult, decay_mult}`; `pattern` is a glob on parameter
        names (`head.*`, `blocks.0.*`); a parameter takes the first rule it matches, its LR
        times lr_mult and its weight decay times decay_mult (0 stays 0).
    opt_kwargs: the optimizer class's own arguments (momentum, betas, eps, nesterov, ...).
    """
    opt_class = _optimizer_class(opt)
    _check_kwargs(opt, opt_class, opt_kwargs)
    opt_kwargs = {k: _plain(v) for k, v in opt_kwargs.items()}
    rules = _parse_rules(param_groups)

    groups = _base_groups(
        model, weight_decay, filter_bias_and_bn, layer_decay, layer_decay_min_scale
    )
    groups = _apply_rules(model, groups, rules)
    # the engine logs param_groups[0]["lr"] as train/lr: put the groups at the base LR first
    groups.sort(key=lambda g: g["lr_scale"] != 1.0)

    effective_lr = _scaled_lr(lr, base_batch_size, global_batch_size)
    optimizer = create_optimizer_v2(
        groups, opt=opt, lr=effective_lr, weight_decay=weight_decay, **opt_kwargs
    )
    _log_setup(opt, lr, effective_lr, base_batch_size, global_batch_size, groups)
    return optimizer


def _scaled_lr(lr, base_batch_size, global_batch_size) -> float:
    if base_batch_size is None:
        return lr
    if base_batch_size <= 0:
        raise ValueError(
            f"optim.base_batch_size={base_batch_size} must be positive, or null to use optim.lr "
            "as given"
        )
    if global_batch_size is None or global_batch_size <= 0:
        raise ValueError(
            f"optim.base_batch_size={base_batch_size} scales the LR by the global batch size, "
            f"but global_batch_size={global_batch_size}; pass the batch size the optimizer sees "
            "(data.batch_size x trainer.accum_steps x world size)"
        )
    return lr * global_batch_size / base_batch_size


def _optimizer_class(opt: str) -> type:
    name = opt.lower().removeprefix("lookahead_")  # timm's `lookahead_<opt>` wraps <opt>
    names = timm.optim.list_optimizers()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"optim.opt={opt!r} is not a timm optimizer{hint} "
            '(`python -c "import timm.optim; print(timm.optim.list_optimizers())"` lists names)'
        )
    return timm.optim.get_optimizer_class(name, bind_defaults=False)


def _check_kwargs(opt: str, opt_class: type, opt_kwargs: dict) -> None:
    # timm quietly drops `betas` / `eps` for optimizers without them; a typo should not pass
    params = inspect.signature(opt_class).parameters
    unknown = sorted(set(opt_kwargs) - set(params))
    if unknown:
        takes = sorted(set(params) - {"self", "params", "lr", "weight_decay"})
        raise ValueError(
            f"optim.{unknown[0]} is not an argument of {opt!r} "
            f"({opt_class.__module__}.{opt_class.__qualname__}); it takes {takes}"
        )


def _plain(value):
    # YAML lists arrive as ListConfig; optimizer state (and so checkpoints) must hold plain data
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(value)
    return value


def _parse_rules(param_groups: Iterable[Mapping]) -> list[dict]:
    rules = []
    for i, rule in enumerate(param_groups or ()):
        rule = dict(rule)
        unknown = set(rule) - RULE_KEYS
        if unknown or "pattern" not in rule:
            raise ValueError(
                f"optim.param_groups[{i}]={rule}: a rule has the keys pattern (required), "
                "lr_mult and decay_mult, e.g. {pattern: 'head.*', lr_mult: 10.0}"
            )
        rules.append({"lr_mult": 1.0, "decay_mult": 1.0, **rule})
    return rules


def _base_groups(model, weight_decay, filter_bias_and_bn, layer_decay, layer_decay_min_scale):
    """timm's groups (no-decay / decay, per layer with layer decay), each with an lr_scale."""
    no_weight_decay = getattr(model, "no_weight_decay", set)()
    if layer_decay is not None:
        groups = param_groups_layer_decay(
            model,
            weight_decay=weight_decay,
            no_weight_decay_list=no_weight_decay if filter_bias_and_bn else (),
            weight_decay_exclude_1d=filter_bias_and_bn,
            layer_decay=layer_decay,
            min_scale=layer_decay_min_scale,
        )
    else:
        groups = param_groups_weight_decay(
            model,
            weight_decay=weight_decay,
            no_weight_decay_list=no_weight_decay if filter_bias_and_bn else (),
            weight_decay_exclude_1d=filter_bias_and_bn,
        )
    return [{"lr_scale": 1.0, **g} for g in groups]


def _apply_rules(model, groups: list[dict], rules: list[dict]) -> list[dict]:
    """Split each group by the first rule its parameters match; scale LR and weight decay."""
    if not rules:
        return groups
    names = {id(p): n for n, p in model.named_parameters()}
    matched = [0] * len(rules)
    out = []
    for group in groups:
        split: dict[int | None, list] = {}
        for p in group["params"]:
            name = names[id(p)]
            hit = next(
                (i for i, r in enumerate(rules) if fnmatch.fnmatchcase(name, r["pattern"])), None
            )
            split.setdefault(hit, []).append(p)
        for hit, params in split.items():
            sub = {**group, "params": params}
            if hit is not None:
                matched[hit] += len(params)
                sub["lr_scale"] = group["lr_scale"] * rules[hit]["lr_mult"]
                sub["weight_decay"] = group["weight_decay"] * rules[hit]["decay_mult"]
                sub["rule"] = rules[hit]["pattern"]
            out.append(sub)
    for rule, count in zip(rules, matched, strict=True):
        if count == 0:
            trainable = [n for n, p in model.named_parameters() if p.requires_grad]
            raise ValueError(
                f"optim.param_groups: pattern {rule['pattern']!r} matches no trainable parameter "
                f"of {type(model).__name__} (names look like {trainable[:3]} ... "
                f"{trainable[-2:]}); patterns are globs on parameter names, e.g. 'head.*'"
            )
    return out


def _log_setup(opt, lr, effective_lr, base_batch_size, global_batch_size, groups) -> None:
    if base_batch_size is None:
        log.info("optimizer %s: lr %.4g (optim.base_batch_size null: not scaled)", opt, lr)
    else:
        log.info(
            "optimizer %s: lr %.4g = %.4g per %d examples x global batch %d",
            opt,
            effective_lr,
            lr,
            base_batch_size,
            global_batch_size,
        )
    for i, g in enumerate(groups):
        log.info(
            "  group %d: %d tensors, %d values, lr x %.4g, weight_decay %.4g%s",
            i,
            len(g["params"]),
            sum(p.numel() for p in g["params"]),
            g["lr_scale"],
            g["weight_decay"],
            f", rule {g['rule']!r}" if "rule" in g else "",
        )
    if groups and groups[0]["lr_scale"] != 1.0:
        log.info(
            "no parameter group runs at the base LR: train/lr is group 0's LR (x %.4g)",
            groups[0]["lr_scale"],
        )
