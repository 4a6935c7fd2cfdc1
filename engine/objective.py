"""The objective: what a training batch's targets become, the loss that trains on them, and the
loss that `val/loss` reports. Chosen by the `loss` config group (conf/loss/<name>.yaml, a
builder below each) and the `mixup` block of conf/config.yaml (timm.data.Mixup's own arguments).

How the engine uses it (cfg: the whole composed config):

    for message in upgrade_legacy_keys(cfg):  # where a config is composed or read from a file,
        log.warning(message)                  # before check_config, saving or building
    objective = build_objective(
        cfg, splits.train, num_classes=len(splits.classes), batch_size=cfg.data.batch_size
    ).to(device)
    log.info(objective.describe())            # one line: loss, mixup, class weights, val/loss
    # each training batch, on the device:
    images, targets = objective.mix(images, targets)  # timm's Mixup; the identity when off
    loss = objective.train_loss(logits, targets)      # under autocast, as before
    # evaluation, on the dataset's own (integer) targets: what val/loss reports
    loss = objective.eval_loss(logits.float(), targets)

`objective.mixup` is timm's Mixup, or None when mixup and cutmix are off. After `mix` the
targets are soft (B, C) when it is on, so top-1 on training batches reads targets.argmax(1).

Losses (every one made by timm.loss.create_classification_loss unless said otherwise):
  ce       softmax cross-entropy with loss.label_smoothing; the default, the loss of before.
           With mixup or cutmix on it becomes soft_ce by itself (describe() says so), and the
           label smoothing is applied by Mixup to the soft targets it makes.
  soft_ce  cross-entropy on soft targets (timm's SoftTargetCrossEntropy): what mixup needs.
           Without mixup, class indices become timm's smoothed one-hot targets, so it equals ce.
  bce      sigmoid binary cross-entropy per class (timm's BinaryCrossEntropy): one-hot targets
           for single-label data, multi-hot for multi-label data.
  asl      asymmetric loss (Ridnik et al., ICCV 2021; timm's AsymmetricLossMultiLabel) on one-hot
           or multi-hot targets. Used for single-label data too: timm's softmax single-label ASL
           takes neither mixup nor class weights, and one loss=asl is then the same loss on both.
  poly     Poly-1 (Leng et al., ICLR 2022, arXiv:2204.12511; timm's PolyCrossEntropy): CE +
           epsilon * (1 - p_t).

val/loss (eval_loss) is unweighted and unsmoothed: plain cross-entropy for ce, soft_ce and poly
(the numbers of before, comparable between them), and the loss's own family on one-hot targets
for bce and asl. It measures the model, not the training recipe.

Class weights, `loss.class_weight` (ce, soft_ce, bce, asl), from the TRAINING split's labels,
read without decoding an image (TensorDataset tensors, a `targets` attribute, Subset indices):
  null           none
  inv_freq       timm's compute_class_weights: proportional to 1 / count, mean 1 over classes
  effective_num  Cui et al., CVPR 2019 (arXiv:1901.05555): (1 - beta) / (1 - beta^count), mean 1;
                 beta is loss.class_weight_beta (0.999)
  auto           effective_num with beta 0.999. It equals inv_freq while a class has up to a few
                 hundred images (1 - beta^n ~ n (1 - beta)) and levels off past ~1 / (1 - beta) =
                 1,000 images, so a 100,000-image head class is not weighted 100x below a
                 1,000-image one; and on a balanced split every weight is 1, which trains as null.
  [w0, w1, ...]  one weight >= 0 per class, in class-index order, used as given.
A class without a training image counts as one (timm's rule). ce and soft_ce weight with torch's
nn.CrossEntropyLoss(weight=...) (timm's cross-entropies take no weights; torch's takes index and
soft targets); bce and asl with timm's own `weight`. poly takes none: timm's PolyCrossEntropy has
no weights. bce and asl also take `loss.pos_weight` (null, neg_pos or a list): timm's weight of
the positive term, neg_pos = negatives / positives per class.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import (
    CLASS_WEIGHT_METHOD_KINDS,
    SoftTargetCrossEntropy,
    create_classification_loss,
    resolve_class_weights,
)
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from engine.checks import check_target

CONF = Path(__file__).resolve().parent.parent / "conf"
# the keys of before (engine.loop.fit's arguments, in conf/trainer/default.yaml) -> their new home
LEGACY_KEYS = {
    "trainer.label_smoothing": "loss.label_smoothing",
    "trainer.mixup_alpha": "mixup.mixup_alpha",
    "trainer.cutmix_alpha": "mixup.cutmix_alpha",
    "trainer.mixup_prob": "mixup.prob",
    "trainer.mixup_switch_prob": "mixup.switch_prob",
}
AUTO_WEIGHTS = "effective_num"  # what class_weight=auto means; why: the module docstring
WEIGHT_KEYS = {"class_weight": "class_weight", "pos_weight": "pos_weight"}  # key -> timm's kind


@dataclass
class Criteria:
    """What a loss builder returns: the training loss, the val/loss loss, and a few words."""

    train: nn.Module
    eval: nn.Module
    about: str


@dataclass
class Objective:
    """The targets, the training loss and the val/loss loss of a run (see the module docstring)."""

    train_criterion: nn.Module
    eval_criterion: nn.Module
    mixup: Mixup | None
    summary: str

    def mix(self, images: torch.Tensor, targets: torch.Tensor):
        """(images, targets) of a training batch, mixed by timm's Mixup when it is on."""
        return (images, targets) if self.mixup is None else self.mixup(images, targets)

    def train_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss on what `mix` returned."""
        return self.train_criterion(logits, targets)

    def eval_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss val/loss reports, on the dataset's own targets (unweighted, unsmoothed)."""
        return self.eval_criterion(logits, targets)

    def to(self, device) -> "Objective":
        """Class weights live in the losses' buffers: put them where the logits are."""
        self.train_criterion.to(device)
        self.eval_criterion.to(device)
        return self

    def describe(self) -> str:
        return self.summary


def build_objective(
    cfg: DictConfig,
    train_dataset: Dataset,
    *,
    num_classes: int,
    batch_size: int,
    multi_label: bool = False,
) -> Objective:
    """The objective of the composed config `cfg` (its `loss` and `mixup` nodes).

    `train_dataset`: the training split, whose label counts class weights come from (read only
    when loss.class_weight or loss.pos_weight names a method). `batch_size`: the per-process
    batch, which mixup needs even. `multi_label`: the dataset's targets are multi-hot (B, C).
    Raises a ValueError naming the key, the value and the fix; an old key still set in
    cfg.trainer means upgrade_legacy_keys was not called.
    """
    for old, new in LEGACY_KEYS.items():
        value = legacy_value(cfg, old)
        if value is not None:
            raise ValueError(
                f"{old}={value} is an old key; engine.objective.upgrade_legacy_keys(cfg) moves "
                f"it to {new}: call it where the config is loaded"
            )
    loss = OmegaConf.to_container(cfg.loss, resolve=True)
    builder = check_target("loss._target_", loss.pop("_target_", None))
    mixup = _mixup(cfg, loss.get("label_smoothing", 0.0), num_classes, batch_size, multi_label)
    methods = [k for k in WEIGHT_KEYS if isinstance(loss.get(k), str)]
    stats = class_stats(train_dataset, num_classes, f"loss.{methods[0]}") if methods else None
    criteria = builder(
        **loss,
        num_classes=num_classes,
        class_stats=stats,
        soft_targets=mixup is not None,
        multi_label=multi_label,
    )
    mixing = "off"
    if mixup is not None:
        node = OmegaConf.to_container(cfg.mixup, resolve=True)
        node.pop("_target_", None)
        mixing = "timm Mixup(" + ", ".join(f"{k}={v}" for k, v in node.items()) + ")"
    name = builder.__name__
    summary = f"objective: loss={name}: {criteria.about}; mixup/cutmix {mixing}"
    return Objective(criteria.train, criteria.eval, mixup, summary)


def _mixup(cfg, label_smoothing: float, num_classes: int, batch_size: int, multi_label: bool):
    """timm's Mixup from the `mixup` block, or None when mixup and cutmix are both off."""
    node = cfg.get("mixup")
    if node is None:
        return None
    kwargs = OmegaConf.to_container(node, resolve=True)
    target = check_target("mixup._target_", kwargs.pop("_target_", None))
    on = [
        f"mixup.{k}={kwargs[k]}"
        for k in ("mixup_alpha", "cutmix_alpha", "cutmix_minmax")
        if (kwargs.get(k) or 0) != 0
    ]
    if not on:
        return None
    if batch_size % 2:
        raise ValueError(
            f"{on[0]} mixes a batch with its mirror and needs an even batch size; "
            f"data.batch_size={batch_size} is odd: e.g. data.batch_size={batch_size + 1}"
        )
    return target(
        **kwargs,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
        multi_label=multi_label,
    )


# ---------------------------------------------------------------------------------------------
# the losses: conf/loss/<name>.yaml's _target_s. Their keys are the config's; num_classes,
# class_stats, soft_targets (mixup or cutmix on) and multi_label come from build_objective.


def ce(
    label_smoothing: float = 0.0,
    class_weight=None,
    class_weight_beta: float = 0.999,
    *,
    num_classes: int,
    class_stats=None,
    soft_targets: bool = False,
    multi_label: bool = False,
) -> Criteria:
    """Softmax cross-entropy; soft_ce under mixup/cutmix (see the module docstring)."""
    _single_label("ce", multi_label)
    if soft_targets:
        criteria = soft_ce(
            label_smoothing,
            class_weight,
            class_weight_beta,
            num_classes=num_classes,
            class_stats=class_stats,
            soft_targets=True,
        )
        about = f"trains as soft_ce (mixup/cutmix make soft targets): {criteria.about}"
        return Criteria(criteria.train, criteria.eval, about)
    weight = _weights("class_weight", class_weight, class_weight_beta, class_stats, num_classes)
    if weight is None:
        train = create_classification_loss("ce", smoothing=label_smoothing)
    else:  # timm's cross-entropies take no class weights
        train = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    about = f"cross-entropy, label smoothing {label_smoothing}{_about(class_weight, weight)}"
    return Criteria(train, nn.CrossEntropyLoss(), about + "; val/loss: cross-entropy")


def soft_ce(
    label_smoothing: float = 0.0,
    class_weight=None,
    class_weight_beta: float = 0.999,
    *,
    num_classes: int,
    class_stats=None,
    soft_targets: bool = False,
    multi_label: bool = False,
) -> Criteria:
    """Cross-entropy on soft targets (timm's SoftTargetCrossEntropy)."""
    _single_label("soft_ce", multi_label)
    weight = _weights("class_weight", class_weight, class_weight_beta, class_stats, num_classes)
    # torch's cross-entropy takes soft targets too, and weights them
    loss = SoftTargetCrossEntropy() if weight is None else nn.CrossEntropyLoss(weight=weight)
    where = "applied by Mixup" if soft_targets else "on the one-hot targets"
    about = (
        f"soft-target cross-entropy, label smoothing {label_smoothing} {where}"
        f"{_about(class_weight, weight)}; val/loss: cross-entropy"
    )
    return Criteria(_DenseTargets(loss, label_smoothing), nn.CrossEntropyLoss(), about)


def bce(
    label_smoothing: float = 0.0,
    class_weight=None,
    pos_weight=None,
    class_weight_beta: float = 0.999,
    target_threshold: float | None = None,
    sum_classes: bool = False,
    *,
    num_classes: int,
    class_stats=None,
    soft_targets: bool = False,
    multi_label: bool = False,
) -> Criteria:
    """Binary cross-entropy per class (timm's BinaryCrossEntropy), one-hot or multi-hot targets.

    `target_threshold`: soft (mixed) targets above it become 1, the others 0.
    `sum_classes`: sum over classes before the mean over images.
    """
    weight = _weights("class_weight", class_weight, class_weight_beta, class_stats, num_classes)
    positive = _weights("pos_weight", pos_weight, class_weight_beta, class_stats, num_classes)
    train = create_classification_loss(
        "bce",
        multi_label=multi_label,
        smoothing=label_smoothing,
        soft_targets=soft_targets,
        class_weight=weight,
        pos_weight=positive,
        bce_target_thresh=target_threshold,
        bce_sum=sum_classes,
    )
    about = (
        f"binary cross-entropy per class, label smoothing {label_smoothing}"
        f"{_about(class_weight, weight)}{_about(pos_weight, positive, 'positive weights')}"
        "; val/loss: binary cross-entropy"
    )
    return Criteria(train, create_classification_loss("bce", multi_label=multi_label), about)


def asl(
    label_smoothing: float = 0.0,
    gamma_neg: float = 4.0,
    gamma_pos: float = 1.0,
    clip: float | None = 0.05,
    reduction: str = "batchmean",
    class_weight=None,
    pos_weight=None,
    class_weight_beta: float = 0.999,
    *,
    num_classes: int,
    class_stats=None,
    soft_targets: bool = False,
    multi_label: bool = False,
) -> Criteria:
    """Asymmetric loss (timm's AsymmetricLossMultiLabel) on one-hot or multi-hot targets.

    `gamma_neg` / `gamma_pos`: focusing of the negative / positive terms; `clip`: probability
    margin shifted onto the negatives; `reduction`: batchmean (sum over classes, mean over
    images), mean, or sum (the paper's, which grows with the batch).
    """
    weight = _weights("class_weight", class_weight, class_weight_beta, class_stats, num_classes)
    positive = _weights("pos_weight", pos_weight, class_weight_beta, class_stats, num_classes)
    shape = {
        "asl_gamma_neg": gamma_neg,
        "asl_gamma_pos": gamma_pos,
        "asl_clip": clip,
        "asl_reduction": reduction,
    }
    train = create_classification_loss(
        "asl",
        multi_label=True,
        smoothing=label_smoothing,
        soft_targets=soft_targets,
        class_weight=weight,
        pos_weight=positive,
        **shape,
    )
    about = (
        f"asymmetric loss (gamma_neg {gamma_neg}, gamma_pos {gamma_pos}, clip {clip}), "
        f"label smoothing {label_smoothing}{_about(class_weight, weight)}"
        f"{_about(pos_weight, positive, 'positive weights')}; val/loss: the same, unweighted"
    )
    # ASL's own smoothing moves dense targets towards 0.5: the one-hot targets stay unsmoothed
    plain = create_classification_loss("asl", multi_label=True, **shape)
    return Criteria(_DenseTargets(train), _DenseTargets(plain), about)


def poly(
    label_smoothing: float = 0.0,
    epsilon: float = 2.0,
    class_weight=None,
    *,
    num_classes: int,
    class_stats=None,
    soft_targets: bool = False,
    multi_label: bool = False,
) -> Criteria:
    """Poly-1 (Leng et al., ICLR 2022; timm's PolyCrossEntropy): CE + epsilon * (1 - p_t).

    epsilon 2 is timm's default and the paper's ImageNet setting; 0 is plain cross-entropy.
    """
    if class_weight is not None:
        raise ValueError(
            f"loss.class_weight={_plain(class_weight)!r}: loss=poly takes no class weights "
            "(timm's PolyCrossEntropy has none); use loss=ce or loss=bce with class weights, "
            "or loss.class_weight=null"
        )
    train = create_classification_loss(
        "poly",
        multi_label=multi_label,
        smoothing=label_smoothing,
        soft_targets=soft_targets,
        poly_epsilon=epsilon,
    )
    about = f"Poly-1 cross-entropy, epsilon {epsilon}, label smoothing {label_smoothing}"
    if multi_label:
        plain = create_classification_loss("bce", multi_label=True)
        return Criteria(train, plain, about + "; val/loss: binary cross-entropy")
    return Criteria(train, nn.CrossEntropyLoss(), about + "; val/loss: cross-entropy")


class _DenseTargets(nn.Module):
    """`loss` takes (B, C) targets: class indices become timm's one-hot targets first, with
    `smoothing`; targets that are already dense (mixed, multi-hot) pass as they are."""

    def __init__(self, loss: nn.Module, smoothing: float = 0.0):
        super().__init__()
        self.loss, self.smoothing = loss, smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.ndim == 1:
            targets = mixup_target(targets, logits.shape[-1], smoothing=self.smoothing)
        return self.loss(logits, targets)


def _single_label(name: str, multi_label: bool) -> None:
    if multi_label:
        raise ValueError(
            f"loss={name} is a softmax loss: one class per image. Multi-label data (multi-hot "
            "targets) trains with loss=bce, loss=asl or loss=poly"
        )


# ---------------------------------------------------------------------------------------------
# class weights


def class_stats(dataset: Dataset, num_classes: int, key: str) -> tuple[torch.Tensor, int]:
    """(images per class, images) of `dataset`, from its labels, reading no image.

    Labels are class indices (N,) or multi-hot rows (N, C); `key` names the setting that asked,
    for the error when the dataset does not list its labels.
    """
    labels = dataset_labels(dataset, key)
    if labels.ndim == 1:
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"{key}: the training labels run {int(labels.min())}..{int(labels.max())}, "
                f"outside the {num_classes} classes 0..{num_classes - 1}"
            )
        counts = torch.bincount(labels.long(), minlength=num_classes)
    else:
        counts = (labels > 0).sum(0)
    return counts.to(torch.float32), len(labels)


def dataset_labels(dataset: Dataset, key: str) -> torch.Tensor:
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets if isinstance(targets, torch.Tensor) else list(targets))
    if isinstance(dataset, Subset):
        indices = torch.as_tensor(dataset.indices, dtype=torch.long)
        return dataset_labels(dataset.dataset, key)[indices]
    raise ValueError(
        f"{key} needs the training split's labels, and {type(dataset).__name__} does not list "
        "them (a `targets` attribute) without reading every image; give one weight per class "
        f"instead ({key}=[1.0, 2.0, ...]) or {key}=null"
    )


def _weights(key, value, beta, stats, num_classes: int) -> torch.Tensor | None:
    """loss.<key> as a (C,) float tensor, or None. `key`: class_weight or pos_weight (timm's
    kinds: a method computes the weights of one kind, see CLASS_WEIGHT_METHOD_KINDS)."""
    if value is None:
        return None
    value = _plain(value)
    if isinstance(value, str):
        methods = [m for m, kind in CLASS_WEIGHT_METHOD_KINDS.items() if kind == key]
        if key == "class_weight":
            methods = ["auto", *methods]
        if value not in methods:
            raise ValueError(
                f"loss.{key}={value!r} is not one of null, {', '.join(methods)} or a list of "
                f"one weight per class; e.g. loss.{key}={methods[0]}"
            )
        method = AUTO_WEIGHTS if value == "auto" else value
        return resolve_class_weights(method, key, class_stats=stats, beta=beta)
    problem = weight_list_problem(value, num_classes)
    if problem:
        raise ValueError(f"loss.{key}={value!r} {problem}")
    return torch.tensor([float(v) for v in value], dtype=torch.float32)


def weight_list_problem(value, num_classes: int | None = None) -> str | None:
    """What is wrong with a list of class weights (None: nothing); `num_classes` None: any length."""
    numbers = isinstance(value, Sequence) and not isinstance(value, str)
    if not numbers or not all(_number(v) and math.isfinite(v) and v >= 0 for v in value):
        return "must be a list of numbers >= 0, one per class; e.g. [1.0, 2.5, 1.0]"
    if num_classes is not None and len(value) != num_classes:
        return (
            f"has {len(value)} entries but the dataset has {num_classes} classes; give one weight "
            "per class, in the order of the class indices, or auto"
        )
    if not any(v > 0 for v in value):
        return "is all zeros: nothing would be learnt; give some weight > 0, or null"
    return None


def _about(setting, weights: torch.Tensor | None, what: str = "class weights") -> str:
    if weights is None:
        return ""
    how = f"{setting} = {AUTO_WEIGHTS}" if setting == "auto" else _plain(setting)
    how = "a list" if isinstance(how, list) else how
    return f", {what} ({how}) {weights.min().item():.3g}..{weights.max().item():.3g}"


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _plain(value):
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


# ---------------------------------------------------------------------------------------------
# the keys of before


def upgrade_legacy_keys(cfg: DictConfig) -> list[str]:
    """Move the keys of before (LEGACY_KEYS: trainer.label_smoothing, trainer.mixup_alpha, ...)
    to their new places in `cfg`, in place; one message per value moved, for the log.

    A config composed from conf/ keeps the old names in conf/trainer/default.yaml as aliases of
    the new keys, so `python run.py trainer.label_smoothing=0.1` still works: the value typed
    replaces the alias and is moved here. A config saved by an older run (in a checkpoint or a
    run folder) has them as plain values, and no `loss` or `mixup` node: a training config
    without them gets the defaults it was trained with (conf/loss/ce.yaml, the mixup block of
    conf/config.yaml), then its old values. The old keys are removed either way, so
    `cfg.trainer` holds engine.loop.fit's arguments alone. Calling it again changes nothing.
    """
    messages = []
    trainer = cfg.get("trainer")
    if not isinstance(trainer, DictConfig):
        return messages
    present = [old for old in LEGACY_KEYS if old.split(".")[1] in trainer]
    with open_dict(cfg):
        for node in ("loss", "mixup"):
            if cfg.get(node) is None:  # saved before the node existed: what that run trained with
                cfg[node] = _defaults(node)
        for old in present:
            new = LEGACY_KEYS[old]
            value = legacy_value(cfg, old)
            if value is not None:
                OmegaConf.update(cfg, new, value, merge=False)
                messages.append(f"{old}={value} is now {new}; using it")
            del trainer[old.split(".")[1]]
    return messages


def legacy_value(cfg: DictConfig, old: str):
    """The value given to an old key, or None: unset, null, or the alias conf/ ships."""
    trainer = cfg.get("trainer")
    key = old.split(".")[1]
    if not isinstance(trainer, DictConfig) or key not in trainer:
        return None
    alias = "${" + LEGACY_KEYS[old] + "}"
    if OmegaConf.is_interpolation(trainer, key) and trainer._get_node(key)._value() == alias:
        return None
    return _plain(trainer[key])


def _defaults(node: str) -> DictConfig:
    if node == "loss":
        return OmegaConf.load(CONF / "loss" / "ce.yaml")
    return OmegaConf.load(CONF / "config.yaml")[node]
