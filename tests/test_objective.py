"""The objective (engine/objective.py): the loss group conf/loss/, the mixup block, class weights
from real label counts, and the keys of before, all through the real conf/ and timm's losses."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from timm.loss import SoftTargetCrossEntropy, compute_class_weights
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from data.digits import digits
from data.kfold import kfold
from engine.checks import check_config
from engine.objective import LEGACY_KEYS, build_objective, class_stats, upgrade_legacy_keys
from tests.helpers import REPO

CONF = REPO / "conf"
LOSSES = sorted(p.stem for p in (CONF / "loss").glob("*.yaml"))


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="module")
def splits():
    return digits(image_size=8)  # 1,437 training images of 10 classes, 64 pixels each


@pytest.fixture(scope="module")
def long_tailed(splits):
    """The training split with 1 in 10 images kept of digits 5-9: a 10x imbalance."""
    images, labels = splits.train.tensors
    keep = [i for i, y in enumerate(labels.tolist()) if y < 5 or i % 10 == 0]
    return TensorDataset(images[keep], labels[keep])


def objective(dataset, *overrides: str, batch_size: int = 16):
    cfg = composed(*overrides)
    assert not upgrade_legacy_keys(cfg)
    check_config(cfg)
    return build_objective(cfg, dataset, num_classes=10, batch_size=batch_size)


def batch(splits, n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images, labels = splits.train.tensors
    index = torch.randperm(len(labels), generator=g)[:n]
    return images[index], labels[index], torch.randn(n, 10, generator=g)


def test_the_default_is_the_cross_entropy_of_before(splits):
    obj = objective(splits.train)
    images, targets, logits = batch(splits)
    assert obj.mixup is None and obj.mix(images, targets)[1] is targets
    before = nn.CrossEntropyLoss()(logits, targets)  # what engine/loop.py trained and reported
    assert torch.equal(obj.train_loss(logits, targets), before)
    assert torch.equal(obj.eval_loss(logits, targets), before)
    assert "loss=ce" in obj.describe() and "mixup/cutmix off" in obj.describe()


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_trains_a_tiny_model_to_a_lower_loss(loss, splits):
    obj = objective(splits.train, f"loss={loss}")
    images, targets = splits.train.tensors
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    with torch.no_grad():
        eval_before = obj.eval_loss(model(images), targets).item()
    losses = []
    for _ in range(10):
        loss_value = obj.train_loss(model(images), targets)
        optimizer.zero_grad()
        loss_value.backward()
        optimizer.step()
        losses.append(loss_value.item())
    with torch.no_grad():
        eval_after = obj.eval_loss(model(images), targets).item()
    assert losses[-1] < 0.8 * losses[0], losses
    assert eval_after < 0.8 * eval_before, (eval_before, eval_after)


def test_class_weights_come_from_the_training_labels(splits, long_tailed):
    counts, total = class_stats(long_tailed, 10, "loss.class_weight")
    labels = long_tailed.tensors[1]
    assert counts.tolist() == torch.bincount(labels, minlength=10).float().tolist()
    assert total == len(labels) and counts[0] > 5 * counts[9]
    # the same counts through a Subset's indices, and through a k-fold split's `targets`
    assert torch.equal(class_stats(Subset(long_tailed, range(len(labels))), 10, "x")[0], counts)
    fold = kfold(splits, fold=0).train
    fold_labels = torch.tensor([splits.train.tensors[1][i] for i in fold.indices])
    assert torch.equal(class_stats(fold, 10, "x")[0], torch.bincount(fold_labels).float())

    weights = objective(long_tailed, "loss.class_weight=inv_freq").train_criterion.weight
    assert torch.allclose(weights * counts, (weights * counts)[0].expand(10))  # w ~ 1 / count
    assert weights.mean().item() == pytest.approx(1.0)
    # auto: effective_num, beta 0.999 (timm's helper on the same counts)
    auto = objective(long_tailed, "loss.class_weight=auto").train_criterion.weight
    _, expected = compute_class_weights(counts, total, method="effective_num", beta=0.999)
    assert torch.allclose(auto, expected) and auto[9] > 5 * auto[0]


def test_a_weighted_loss_makes_a_mistake_on_a_rare_class_cost_more(splits, long_tailed):
    common, rare = 0, 9
    targets = torch.tensor([common, rare])
    # two batches of one common and one rare image: in one the rare image is called common,
    # in the other the common image is called rare; the other image is right
    rare_wrong, common_wrong = torch.zeros(2, 10), torch.zeros(2, 10)
    rare_wrong[0, common] = rare_wrong[1, common] = 5.0
    common_wrong[0, rare] = common_wrong[1, rare] = 5.0
    plain = objective(long_tailed)
    weighted = objective(long_tailed, "loss.class_weight=auto")
    assert torch.isclose(
        plain.train_loss(rare_wrong, targets), plain.train_loss(common_wrong, targets)
    )
    assert weighted.train_loss(rare_wrong, targets) > 3 * weighted.train_loss(common_wrong, targets)
    # bce weights each class's own term: missing the rare class costs more than missing a common
    bce = objective(long_tailed, "loss=bce", "loss.class_weight=auto")
    missed = torch.full((1, 10), -5.0)  # no class called present
    rare_miss = bce.train_loss(missed, torch.tensor([rare]))
    assert rare_miss > bce.train_loss(missed, torch.tensor([common]))
    # and a list is used as given
    listed = objective(long_tailed, f"loss.class_weight=[{','.join(['1'] * 9)},4]")
    assert listed.train_criterion.weight.tolist() == [1.0] * 9 + [4.0]
    # val/loss stays unweighted
    assert torch.equal(
        weighted.eval_loss(rare_wrong, targets), plain.eval_loss(rare_wrong, targets)
    )


def test_mixup_makes_soft_targets_and_ce_becomes_soft_ce(splits):
    obj = objective(splits.train, "mixup.mixup_alpha=1.0", "loss.label_smoothing=0.1")
    assert obj.mixup is not None and "trains as soft_ce" in obj.describe()
    images, targets, logits = batch(splits)
    torch.manual_seed(0)
    mixed_images, soft = obj.mix(images.clone(), targets)
    assert soft.shape == (16, 10) and torch.allclose(soft.sum(1), torch.ones(16))
    assert (soft.max(1).values < 1).all()  # smoothed, and mixed with the mirror image's class
    assert not torch.equal(mixed_images, images)
    assert torch.equal(obj.train_loss(logits, soft), SoftTargetCrossEntropy()(logits, soft))
    assert torch.equal(obj.eval_loss(logits, targets), nn.CrossEntropyLoss()(logits, targets))
    # cutmix with class weights: torch's cross-entropy weights soft targets too
    cut = objective(splits.train, "mixup.cutmix_alpha=1.0", "loss.class_weight=inv_freq")
    assert torch.isfinite(cut.train_loss(logits, cut.mix(images.clone(), targets)[1]))
    with pytest.raises(ValueError, match=r"even batch size; data\.batch_size=15"):
        objective(splits.train, "mixup.mixup_alpha=1.0", batch_size=15)


def test_old_keys_on_the_command_line_move_to_their_new_place_and_say_so(splits):
    cfg = composed("trainer.label_smoothing=0.1", "trainer.mixup_alpha=0.4")
    messages = upgrade_legacy_keys(cfg)
    assert messages == [
        "trainer.label_smoothing=0.1 is now loss.label_smoothing; using it",
        "trainer.mixup_alpha=0.4 is now mixup.mixup_alpha; using it",
    ]
    assert cfg.loss.label_smoothing == 0.1 and cfg.mixup.mixup_alpha == 0.4
    assert not {k.split(".")[1] for k in LEGACY_KEYS} & set(cfg.trainer)  # fit sees none of them
    check_config(cfg)
    obj = build_objective(cfg, splits.train, num_classes=10, batch_size=16)
    assert obj.mixup is not None and obj.mixup.label_smoothing == 0.1
    # unset, the aliases carry the new keys' values and are removed without a word
    fresh = composed("loss.label_smoothing=0.2")
    assert fresh.trainer.label_smoothing == 0.2  # what engine.loop.fit reads until it is rewired
    assert upgrade_legacy_keys(fresh) == [] and "label_smoothing" not in fresh.trainer


def test_a_config_saved_before_the_move_gets_the_defaults_and_its_own_values(splits):
    # what a checkpoint or run folder of before holds: resolved, the five trainer keys, no loss
    # or mixup node
    saved = OmegaConf.to_container(composed("trainer.label_smoothing=0.1"), resolve=True)
    del saved["loss"], saved["mixup"]
    saved["trainer"]["cutmix_alpha"] = 1.0
    cfg = OmegaConf.create(saved)
    messages = upgrade_legacy_keys(cfg)
    assert len(messages) == len(LEGACY_KEYS)
    assert "trainer.cutmix_alpha=1.0 is now mixup.cutmix_alpha; using it" in messages
    assert cfg.loss == {**OmegaConf.load(CONF / "loss" / "ce.yaml"), "label_smoothing": 0.1}
    assert cfg.mixup.cutmix_alpha == 1.0 and cfg.mixup.mode == "batch"
    assert upgrade_legacy_keys(cfg) == []  # once is enough
    check_config(cfg)
    assert (
        "trains as soft_ce"
        in build_objective(cfg, splits.train, num_classes=10, batch_size=16).describe()
    )
    # not upgraded: building refuses, naming the call that was missed
    stale = OmegaConf.create(saved)
    with pytest.raises(ValueError, match=r"trainer.label_smoothing=0.1 is an old key.*upgrade"):
        build_objective(stale, splits.train, num_classes=10, batch_size=16)


BAD = [
    (["loss.class_weight=[1,-1]"], ["loss.class_weight=[1, -1] must be", ">= 0", "auto"]),
    (["loss.class_weight=often"], ["loss.class_weight='often' must be", "inv_freq"]),
    (["loss=bce", "loss.pos_weight=auto"], ["loss.pos_weight='auto' must be", "neg_pos"]),
    (["loss.label_smoothing=1.5"], ["loss.label_smoothing=1.5 must be", "0.1"]),
    (["loss=asl", "+loss.gama_neg=2"], ["loss.gama_neg is not an argument", "loss.gamma_neg?"]),
    (["+loss.num_classes=3"], ["loss.num_classes is set by the engine"]),
    (["mixup.mode=row"], ["mixup.mode='row' must be one of batch, pair, elem"]),
    (["mixup.mixup_alpha=0.2", "data.batch_size=33"], ["mixup.mixup_alpha=0.2", "even"]),
    (["trainer.mixup_alpha=-1"], ["trainer.mixup_alpha=-1 must be a number >= 0"]),
]


@pytest.mark.parametrize(("overrides", "fragments"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_values_fail_before_building_naming_value_and_fix(overrides, fragments):
    with pytest.raises(ValueError) as err:
        check_config(composed(*overrides))
    for fragment in fragments:
        assert fragment in str(err.value)


def test_bad_values_known_only_with_the_data_fail_at_build_time(splits):
    with pytest.raises(
        ValueError, match=r"loss.class_weight=\[1, 2\] has 2 entries but the dataset has 10 classes"
    ):
        objective(splits.train, "loss.class_weight=[1,2]")
    with pytest.raises(ValueError, match=r"loss=poly takes no class weights.*loss=ce"):
        objective(splits.train, "loss=poly", "loss.class_weight=auto")

    class Unlabelled(Dataset):
        def __len__(self):
            return 4

    with pytest.raises(ValueError, match=r"Unlabelled does not list them.*loss.class_weight=\["):
        objective(Unlabelled(), "loss.class_weight=auto")
    # an unknown loss name: Hydra lists the options
    with pytest.raises(HydraException, match=r"Could not find 'loss/focal'") as err:
        composed("loss=focal")
    assert all(f"\t{name}\n" in str(err.value) for name in LOSSES)
