"""models/timm_models.py with real timm models on the CPU: every `model` option trains a few
steps, weights load from files with the head reset and the stem adapted, stages freeze."""

import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import save_file

from engine import build
from engine.checkpoint import CheckpointSaver
from models.timm_models import create, preprocessing
from tests.helpers import REPO, TINY, run_py

CONF = REPO / "conf"
OPTIONS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
# the options built by timm (models/timm_models.py); SpeedNet (models/speednet.py) is our own
TIMM_OPTIONS = [
    o for o in OPTIONS if "models.timm_models.create" in (CONF / "model" / f"{o}.yaml").read_text()
]
SLOW = {"beitv2_large": "304 M parameters: ~25 s to build and step on 2 CPU cores"}
SMALL = 32  # input side for the tiny runs; models built for one size are built for this one
ANY_NAME = "regnety_002"  # for `model=timm`, whose name is mandatory
FIVE_KEYS = {"input_size", "mean", "std", "interpolation", "crop_pct"}

# Architectures for the weight and freezing tests: ResNet-18 and timm's own narrow test
# variants of EfficientNet (BatchNormAct), ConvNeXt (LayerNorm stages, nested head) and ViT
# (position embedding, blocks as stages): the real model classes, built in milliseconds.
ARCHS = {
    "resnet18": {},
    "test_efficientnet": {},
    "test_convnext": {},
    "test_vit": {"img_size": SMALL},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread beats two, and by 10x or more on a busy machine, where
    a second OpenMP thread waits for a core at every op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def splits(num_classes: int = 3, in_chans: int = 3):
    """What build_model reads from a dataset's Splits."""
    return SimpleNamespace(classes=[str(c) for c in range(num_classes)], in_chans=in_chans)


def train_steps(model, steps: int = 2, in_chans: int = 3, size: int = SMALL, all_params=False):
    """A few SGD steps on random images; returns the last logits."""
    torch.manual_seed(0)
    images, targets = torch.randn(4, in_chans, size, size), torch.tensor([0, 1, 2, 0])
    params = (
        model.parameters() if all_params else (p for p in model.parameters() if p.requires_grad)
    )
    # weight decay and momentum would move a frozen tensor if it ever got a gradient
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        logits = model(images)
        loss = F.cross_entropy(logits, targets)
        assert torch.isfinite(loss), loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return logits


def small(name: str, num_classes: int, **kwargs):
    return create(name, num_classes=num_classes, **ARCHS[name], **kwargs)


def is_head(model, key: str) -> bool:
    head = model.pretrained_cfg["classifier"]
    return key.startswith(f"{head}.")


def same(a: dict, b: dict, keys) -> list[str]:
    """The keys among `keys` whose tensors differ between state dicts `a` and `b`."""
    return [k for k in keys if not torch.equal(a[k], b[k])]


# --- every option -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option",
    [pytest.param(o, marks=pytest.mark.slow) if o in SLOW else o for o in OPTIONS],
)
def test_option_builds_through_the_engine_and_trains_a_few_steps(option):
    overrides = [f"model={option}"]
    cfg = composed(*overrides)
    if OmegaConf.is_missing(cfg.model, "name"):  # the generic option: any timm name
        overrides.append(f"model.name={ANY_NAME}")
    elif "img_size" in cfg.model:
        overrides.append(f"model.img_size={SMALL}")
    cfg = composed(*overrides)

    model = build.build_model(cfg, splits(num_classes=3))
    head = dict(model.get_classifier().named_parameters())["weight"].detach().clone()
    logits = train_steps(model)

    assert logits.shape == (4, 3)
    assert not torch.equal(head, dict(model.get_classifier().named_parameters())["weight"])


@pytest.mark.parametrize("option", TIMM_OPTIONS)
def test_preprocessing_comes_from_the_pretrained_config_without_building(option, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("preprocessing() must not build a model")

    monkeypatch.setattr("timm.create_model", no_build)
    model = composed(f"model={option}").model
    name = ANY_NAME if OmegaConf.is_missing(model, "name") else model.name
    pre = preprocessing(name)
    assert pre.keys() == FIVE_KEYS
    assert pre["input_size"] == (3, 224, 224)
    assert len(pre["mean"]) == len(pre["std"]) == 3
    assert pre["interpolation"] in {"bicubic", "bilinear"} and 0.5 < pre["crop_pct"] <= 1.0


def test_preprocessing_values_follow_the_model_tag_size_and_channels():
    vit = preprocessing("vit_base_patch16_224")
    assert vit["mean"] == vit["std"] == (0.5, 0.5, 0.5)
    assert vit["crop_pct"] == 0.9 and vit["interpolation"] == "bicubic"
    assert preprocessing("convnext_base")["crop_pct"] == 0.875
    assert preprocessing("resnet50.tv_in1k")["interpolation"] == "bilinear"
    assert preprocessing("vit_base_patch16_224", img_size=384)["input_size"] == (3, 384, 384)
    gray = preprocessing("resnet18", in_chans=1)
    assert gray["input_size"] == (1, 224, 224)
    assert gray["mean"] == pytest.approx(((0.485 + 0.456 + 0.406) / 3,))


def test_unknown_name_or_tag_fails_with_close_matches():
    with pytest.raises(ValueError, match=r"model.name='convnet_base' is not .*'convnext_base'"):
        create("convnet_base", num_classes=3)
    with pytest.raises(ValueError, match=r"model.name='convnet_base' is not .*'convnext_base'"):
        preprocessing("convnet_base")
    # through the engine: the message as written, not Hydra's repr of it
    with pytest.raises(ValueError, match=r"^model.name='convnet_base' is not .*'convnext_base'"):
        build.build_model(composed("model.name=convnet_base"), splits())
    with pytest.raises(ValueError, match=r"no weights tagged 'fb_in23k'.*'convnext_base.fb_in22k'"):
        preprocessing("convnext_base.fb_in23k")


# --- weights ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHS)
def test_checkpoint_with_10_classes_loads_into_3_classes_with_the_head_reset(
    name, tmp_path, caplog
):
    source = small(name, num_classes=10)
    train_steps(source, steps=1)  # BatchNorm statistics away from their init values too
    saver = CheckpointSaver(tmp_path, metadata={"config": {}, "class_names": list("abcdefghij")})
    path = saver.save({"model": source.state_dict(), "epoch": 1}, epoch=1, is_best=True)

    caplog.set_level(logging.INFO, logger="models.timm_models")
    model = small(name, num_classes=3, weights=str(path))

    want, got = source.state_dict(), model.state_dict()
    head = [k for k in got if is_head(model, k)]
    backbone = [k for k in got if not is_head(model, k)]
    assert head and len(backbone) == len(want) - len(head)
    assert same(want, got, backbone) == []
    assert all(got[k].shape[0] == 3 for k in head)
    assert f"skipped {', '.join(head)}" in caplog.text


def test_safetensors_weights_load_every_tensor(tmp_path, caplog):
    source = small("resnet18", num_classes=10)
    train_steps(source, steps=1)
    save_file(source.state_dict(), tmp_path / "resnet18.safetensors")

    caplog.set_level(logging.INFO, logger="models.timm_models")
    model = small("resnet18", num_classes=10, weights=str(tmp_path / "resnet18.safetensors"))
    assert same(source.state_dict(), model.state_dict(), source.state_dict()) == []
    assert "re-initialised" not in caplog.text


@pytest.mark.parametrize("name", ["resnet18", "test_vit"])
def test_grayscale_model_sums_the_rgb_stem_of_3_channel_weights(name, tmp_path):
    source = small(name, num_classes=3)
    torch.save(source.state_dict(), tmp_path / "rgb.pth")
    model = small(name, num_classes=3, in_chans=1, weights=str(tmp_path / "rgb.pth"))

    stem = f"{model.pretrained_cfg['first_conv']}.weight"
    want, got = source.state_dict(), model.state_dict()
    assert got[stem].shape[1] == 1
    torch.testing.assert_close(got[stem], want[stem].sum(dim=1, keepdim=True))
    assert same(want, got, [k for k in got if k != stem]) == []
    assert train_steps(model, steps=1, in_chans=1).shape == (4, 3)


def test_weights_for_another_architecture_fail_naming_the_keys(tmp_path):
    torch.save(small("resnet18", num_classes=3).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"does not fit 'resnet34' \(\d+ missing: layer1.2"):
        create("resnet34", num_classes=3, weights=str(tmp_path / "r18.pth"))
    with pytest.raises(FileNotFoundError, match=r"model.weights='.*nothing.pt' does not exist"):
        create("resnet18", num_classes=3, weights=str(tmp_path / "nothing.pt"))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"junk.pt' is not a readable weights file"):
        create("resnet18", num_classes=3, weights=str(tmp_path / "junk.pt"))


def test_pretrained_offline_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # the variable as a user sets it; huggingface_hub read it at import, so set its copy too
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # empty cache
    with pytest.raises(
        RuntimeError,
        match=r"model.pretrained=true but the weights of 'resnet18' \(timm/resnet18\..*\) could "
        r"not be fetched .*HF_HUB_OFFLINE.*model.weights=<file>",
    ):
        create("resnet18", num_classes=3, pretrained=True)
    with pytest.raises(ValueError, match=r"model.pretrained=true and model.weights="):
        create("resnet18", num_classes=3, pretrained=True, weights="w.pth")


# --- freezing, drop path ------------------------------------------------------------------

# freeze value -> the prefixes of the state-dict keys it freezes
FROZEN = {
    ("resnet18", 2): ("conv1.", "bn1.", "layer1.", "layer2."),
    ("test_efficientnet", 3): ("conv_stem.", "bn1.", "blocks.0.", "blocks.1.", "blocks.2."),
    ("test_convnext", 0): ("stem.",),
    ("test_vit", 4): (
        *("cls_token", "pos_embed", "patch_embed."),
        *(f"blocks.{i}." for i in range(4)),
    ),
    ("resnet18", "backbone"): ("conv", "bn1.", "layer"),
    ("test_convnext", "backbone"): ("stem.", "stages.", "head.norm."),
}


@pytest.mark.parametrize(("name", "freeze"), FROZEN, ids=[f"{n}-{f}" for n, f in FROZEN])
def test_frozen_tensors_stay_unchanged_after_training_steps(name, freeze):
    model = small(name, num_classes=3, freeze=freeze)
    prefixes = FROZEN[name, freeze]
    for key, param in model.named_parameters():
        assert param.requires_grad == (not key.startswith(prefixes)), key
    before = {k: v.clone() for k, v in model.state_dict().items()}

    train_steps(model, all_params=True)  # even an optimizer holding every parameter

    after = model.state_dict()
    frozen = [k for k in after if k.startswith(prefixes)]
    trained = [k for k in after if not k.startswith(prefixes) and after[k].is_floating_point()]
    assert frozen and same(before, after, frozen) == [], "BatchNorm statistics included"
    assert set(same(before, after, trained)) >= {k for k in trained if is_head(model, k)}


def test_bad_freeze_values_name_the_choices():
    with pytest.raises(ValueError, match=r"model.freeze=5: 'resnet18' has 4 stages .* 0..4"):
        create("resnet18", num_classes=3, freeze=5)
    for bad in ("head_only", True, -1):
        with pytest.raises(
            ValueError, match=rf"model.freeze={bad!r} is not understood.*'backbone'"
        ):
            create("resnet18", num_classes=3, freeze=bad)


def test_drop_path_rate_reaches_the_deepest_block_and_unsupported_keys_fail():
    model = small("test_convnext", num_classes=3, drop_path_rate=0.3)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert max(rates) == pytest.approx(0.3)
    with pytest.raises(ValueError, match=r"model.drop_path_rate=0.1: 'vgg11' does not take"):
        create("vgg11", num_classes=3, drop_path_rate=0.1)
    with pytest.raises(ValueError, match=r"model.img_size=64: 'resnet18' does not take img_size"):
        create("resnet18", num_classes=3, img_size=64)


@pytest.mark.slow
def test_a_run_fine_tunes_from_another_runs_checkpoint_as_a_linear_probe(tmp_path):
    tiny = [*TINY, "trainer.epochs=1", "logger=none"]
    run_py(*tiny, "model.freeze=2", "hydra.run.dir=outputs/a", cwd=tmp_path)
    run_py(
        *tiny,
        "model=timm",
        "model.name=resnet18",
        "model.weights=outputs/a/checkpoints/best.pt",
        "model.freeze=backbone",
        "hydra.run.dir=outputs/b",
        cwd=tmp_path,
    )
    a, b = (
        torch.load(tmp_path / f"outputs/{run}/checkpoints/best.pt", weights_only=True)["model"]
        for run in "ab"
    )
    # a's frozen BatchNorm saved no num_batches_tracked; everything else came from a's file
    assert same(a, b, b) == ["fc.weight", "fc.bias"]
