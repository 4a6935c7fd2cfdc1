"""Optimizers: weight-decay groups, name-pattern multipliers, layer decay and LR scaling, on real
timm models (built at a small size: the grouping depends on names and shapes, not on size)."""

import itertools

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from engine.build import build_optimizer
from engine.optim import create_optimizer
from engine.schedules import constant
from tests.helpers import REPO

CONF = REPO / "conf"
OPTIMS = sorted(p.stem for p in (CONF / "optim").glob("*.yaml"))
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    small_vit = {"img_size": 32, "patch_size": 8, "depth": 4}
    return {
        "resnet18": timm.create_model("resnet18", num_classes=10),
        "vit": timm.create_model("vit_tiny_patch16_224", num_classes=10, **small_vit),
        "convnext": timm.create_model("convnext_atto", num_classes=10),
    }


def lr_by_name(model: nn.Module, optimizer) -> dict[str, float]:
    """Each parameter's LR as the optimizer runs it (the schedule applies the lr_scale keys)."""
    constant(optimizer, total_steps=10, steps_per_epoch=10)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return {n: group_of[id(p)]["lr"] for n, p in model.named_parameters()}


def names(model: nn.Module, group: dict) -> list[str]:
    ids = {id(p) for p in group["params"]}
    return [n for n, p in model.named_parameters() if id(p) in ids]


@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_no_decay_groups_contain_exactly_the_norms_and_biases(models, name):
    model = models[name]
    optimizer = create_optimizer(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    decay_of: dict[int, float] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in decay_of, "a parameter sits in two groups"
            decay_of[id(p)] = group["weight_decay"]
    params = dict(model.named_parameters())
    assert len(decay_of) == len(params), "every parameter is optimized exactly once"

    norm_params = {id(p) for m in model.modules() if isinstance(m, NORMS) for p in m.parameters()}
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    for n, p in params.items():
        no_decay = p.ndim <= 1 or n.endswith(".bias") or n in skip
        assert decay_of[id(p)] == (0.0 if no_decay else 0.05), n
        if id(p) in norm_params or n.endswith(".bias"):
            assert decay_of[id(p)] == 0.0, n
    assert norm_params and any(n.endswith(".bias") for n in params)
    if name == "vit":  # the model's own no_weight_decay() list: position embedding, class token
        assert decay_of[id(params["pos_embed"])] == decay_of[id(params["cls_token"])] == 0.0


def test_frozen_parameters_are_left_out_and_decay_filter_can_be_off():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    optimizer = create_optimizer(
        model, opt="sgd", lr=0.1, weight_decay=1e-4, filter_bias_and_bn=False
    )
    (group,) = optimizer.param_groups
    assert group["weight_decay"] == 1e-4
    assert {id(p) for p in group["params"]} == {
        id(p) for p in [*model[1].parameters(), *model[2].parameters()]
    }


def test_name_patterns_set_lr_and_decay_multipliers_first_match_wins(models):
    model = models["resnet18"]
    rules = [
        {"pattern": "fc.weight", "lr_mult": 2.0},
        {"pattern": "fc.*", "lr_mult": 10.0, "decay_mult": 0.5},
        {"pattern": "layer1.*", "lr_mult": 0.1},
    ]
    optimizer = create_optimizer(
        model, opt="sgd", lr=0.1, weight_decay=1e-4, momentum=0.9, param_groups=rules
    )
    lrs = lr_by_name(model, optimizer)
    for n, lr in lrs.items():
        expected = {"fc.weight": 0.2, "fc.bias": 1.0}.get(
            n, 0.01 if n.startswith("layer1.") else 0.1
        )
        assert lr == pytest.approx(expected), n
    decay = {n: g["weight_decay"] for g in optimizer.param_groups for n in names(model, g)}
    assert decay["fc.weight"] == pytest.approx(1e-4)  # the first rule: decay_mult 1
    assert decay["fc.bias"] == 0.0  # a bias stays at 0 whatever decay_mult says
    assert decay["layer1.0.conv1.weight"] == pytest.approx(1e-4)
    # train/lr is read from group 0: it must be a group at the base LR
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


def test_a_pattern_that_matches_nothing_fails_naming_it(models):
    with pytest.raises(ValueError, match=r"pattern 'head\.\*' matches no trainable parameter"):
        create_optimizer(
            models["resnet18"], opt="sgd", lr=0.1, param_groups=[{"pattern": "head.*"}]
        )
    with pytest.raises(ValueError, match=r"param_groups\[0\].*pattern \(required\)"):
        create_optimizer(models["resnet18"], opt="sgd", lr=0.1, param_groups=[{"pat": "fc.*"}])


@pytest.mark.parametrize("name", ["vit", "convnext"])
def test_layer_decay_gives_earlier_blocks_smaller_lrs(models, name):
    model = models[name]
    optimizer = create_optimizer(model, opt="adamw", lr=1.0, weight_decay=0.05, layer_decay=0.5)
    lrs = lr_by_name(model, optimizer)
    # named_parameters runs from the stem to the head: the LR never falls along the way
    ordered = list(lrs.values())
    assert all(a <= b for a, b in itertools.pairwise(ordered))
    assert lrs["head.fc.weight" if name == "convnext" else "head.weight"] == 1.0
    if name == "vit":  # layers: stem 0, blocks.i i + 1, head 5 -> scale 0.5 ** (5 - layer)
        assert lrs["pos_embed"] == lrs["patch_embed.proj.weight"] == 0.5**5
        for i in range(4):
            assert lrs[f"blocks.{i}.attn.qkv.weight"] == 0.5 ** (4 - i)
            assert lrs[f"blocks.{i}.norm1.bias"] == 0.5 ** (4 - i)
    else:
        stage_lrs = [lrs[f"stages.{s}.blocks.0.conv_dw.weight"] for s in range(4)]
        assert stage_lrs == sorted(set(stage_lrs))  # strictly increasing stage by stage
        assert lrs["stem.0.weight"] < stage_lrs[0]
    assert optimizer.param_groups[0]["lr"] == 1.0, "train/lr must show the base LR"


def test_lr_scales_with_the_global_batch_accumulation_and_world_size(monkeypatch):
    model = nn.Linear(4, 2)

    def effective_lr(*overrides):
        optimizer = build_optimizer(composed("optim=sgd", *overrides), model)
        return lr_by_name(model, optimizer)["weight"]

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    # sgd: lr 0.1 per 256 examples
    assert effective_lr("data.batch_size=256") == pytest.approx(0.1)
    assert effective_lr("data.batch_size=64") == pytest.approx(0.025)
    assert effective_lr("data.batch_size=64", "trainer.accum_steps=4") == pytest.approx(0.1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert effective_lr("data.batch_size=64", "trainer.accum_steps=4") == pytest.approx(0.2)
    assert effective_lr("data.batch_size=64", "optim.base_batch_size=null") == pytest.approx(0.1)


def test_unknown_optimizer_and_arguments_fail_with_the_bad_value():
    model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"optim.opt='adamww' is not a timm optimizer.*'adamw'"):
        create_optimizer(model, opt="adamww", lr=1e-3)
    with pytest.raises(ValueError, match=r"optim.betaz is not an argument of 'adamw'"):
        create_optimizer(model, opt="adamw", lr=1e-3, betaz=(0.9, 0.99))
    with pytest.raises(ValueError, match=r"optim.betas is not an argument of 'sgd'"):
        create_optimizer(model, opt="sgd", lr=1e-3, betas=(0.9, 0.99))  # timm would drop it


@pytest.mark.parametrize("option", OPTIMS)
def test_every_optim_option_builds_steps_and_saves_plain_state(option, tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    cfg = composed(f"optim={option}", "optim.param_groups=[{pattern: '2.*', lr_mult: 10.0}]")
    optimizer = instantiate(cfg.optim)(model, global_batch_size=cfg.data.batch_size)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(8, 4)).square().mean().backward()
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    # checkpoints load with weights_only=True: the optimizer state must be plain data
    torch.save(optimizer.state_dict(), tmp_path / "opt.pt")
    state = torch.load(tmp_path / "opt.pt", weights_only=True)
    optimizer.load_state_dict(state)
