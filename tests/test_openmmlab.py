"""MMPretrain / MMClassification checkpoints loaded by model.weights give the logits of
MMPretrain's own model (the real implementation, a test-only dependency: the `dev` extra).

Each family's model is built by MMPretrain from the settings of its config files (smaller widths
or depths where the smallest preset would cost seconds of CPU), given random weights, saved in
each checkpoint layout, loaded here into the timm model of the same architecture, and both
forward the same preprocessed batch.
"""

import warnings
from pathlib import Path

import pytest
import timm
import torch

from models import openmmlab
from models.timm_models import load_weights

with warnings.catch_warnings():  # mmcv-lite lacks compiled ops that these models do not use
    warnings.simplefilter("ignore")
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS

pytestmark = pytest.mark.filterwarnings("ignore:Fail to import ``MultiScaleDeformableAttention``")

CLASSES = [f"class {i}" for i in range(7)]
SMALL_BEIT = {"embed_dims": 192, "num_layers": 3, "num_heads": 3, "feedforward_channels": 768}
SMALL_TIMM_BEIT = {"embed_dim": 192, "depth": 3, "num_heads": 3}


def beit(drop_path_rate: float) -> dict:  # configs/beit(v2)/benchmarks/beit-base-p16_*.py
    backbone = {
        "type": "BEiTViT",
        "arch": SMALL_BEIT,
        "img_size": 224,
        "patch_size": 16,
        "drop_path_rate": drop_path_rate,
        "out_type": "avg_featmap",
        "use_abs_pos_emb": False,
        "use_rel_pos_bias": True,
        "use_shared_rel_pos_bias": False,
    }
    return {"backbone": backbone, "neck": None, "head": linear_head(192)}


def linear_head(channels: int) -> dict:
    return {"type": "LinearClsHead", "num_classes": len(CLASSES), "in_channels": channels}


GAP = {"type": "GlobalAveragePooling"}

# family: (MMPretrain ImageClassifier settings, timm name, timm keyword arguments)
FAMILIES = {
    "resnet18": (
        {
            "backbone": {"type": "ResNet", "depth": 18, "out_indices": (3,), "style": "pytorch"},
            "neck": GAP,
            "head": linear_head(512),
        },
        "resnet18",
        {},
    ),
    "convnext-tiny": (
        {"backbone": {"type": "ConvNeXt", "arch": "tiny"}, "head": linear_head(768)},
        "convnext_tiny",
        {},
    ),
    "convnext-v2-atto": (  # GRN, no layer scale
        {
            "backbone": {
                "type": "ConvNeXt",
                "arch": "atto",
                "use_grn": True,
                "layer_scale_init_value": 0.0,
            },
            "head": linear_head(320),
        },
        "convnextv2_atto",
        {},
    ),
    "deit-tiny": (
        {
            "backbone": {"type": "VisionTransformer", "arch": "deit-tiny", "img_size": 224},
            "neck": None,
            "head": {
                "type": "VisionTransformerClsHead",
                "num_classes": len(CLASSES),
                "in_channels": 192,
            },
        },
        "deit_tiny_patch16_224",
        {},
    ),
    "deit-tiny-distilled": (
        {
            "backbone": {
                "type": "DistilledVisionTransformer",
                "arch": "deit-tiny",
                "img_size": 224,
            },
            "neck": None,
            "head": {"type": "DeiTClsHead", "num_classes": len(CLASSES), "in_channels": 192},
        },
        "deit_tiny_distilled_patch16_224",
        {},
    ),
    "swin-tiny": (
        {
            "backbone": {"type": "SwinTransformer", "arch": "tiny", "img_size": 224},
            "neck": GAP,
            "head": linear_head(768),
        },
        "swin_tiny_patch4_window7_224",
        {},
    ),
    "beit (small)": (beit(0.1), "beit_base_patch16_224", {**SMALL_TIMM_BEIT, "init_values": 0.1}),
    "beitv2 (small)": (
        beit(0.2),
        "beitv2_base_patch16_224",
        {**SMALL_TIMM_BEIT, "init_values": 0.1},
    ),
}


def mmpretrain_model(settings: dict) -> torch.nn.Module:
    """MMPretrain's ImageClassifier with random weights: every tensor drawn anew, so that
    parameters initialised to zeros or ones (relative position biases, layer scales, norms)
    are tested as much as the rest."""
    init_default_scope("mmpretrain")
    model = MODELS.build({"type": "ImageClassifier", **settings}).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point() or "relative_position_index" in name:
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            else:
                noise = torch.randn(tensor.shape, generator=generator)
                tensor.add_(noise * 0.05)
    return model


def save(model: torch.nn.Module, layout: str, path: Path) -> Path:
    """`model`'s weights in the file layout MMPretrain 1.x (mmengine's CheckpointHook) or
    MMClassification 0.x (mmcv's save_checkpoint, as ModelScope's cards ship) writes."""
    import numpy as np

    state = {k: v.clone() for k, v in model.state_dict().items()}
    if layout == "mmpretrain-1.x":
        meta = {
            "epoch": 3,
            "iter": 300,
            "cfg": "model = dict(type='ImageClassifier')\n",
            "seed": 0,
            "experiment_name": "test",
            "mmengine_version": "0.10.7",
            "dataset_meta": {"classes": tuple(CLASSES)},
        }
    else:
        meta = {
            "mmcls_version": "0.25.0",
            "config": "model = dict(type='ImageClassifier')\n",
            "CLASSES": list(CLASSES),
            "epoch": 3,
            "iter": 300,
            # mmcv's EvalHook keeps the best score as the numpy value it got
            "hook_msgs": {"best_score": np.float64(91.5), "last_ckpt": "epoch_3.pth"},
        }
    torch.save({"meta": meta, "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layout", ["mmpretrain-1.x", "mmcls-0.x"])
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_gives_mmpretrain_logits(family, layout, images, tmp_path):
    settings, timm_name, kwargs = FAMILIES[family]
    reference = mmpretrain_model(settings)
    path = save(reference, layout, tmp_path / "model.pth")
    model = timm.create_model(timm_name, num_classes=len(CLASSES), **kwargs).eval()

    assert load_weights(model, path) == []  # every tensor, the classifier too, from the file
    with torch.no_grad():
        expected = reference(images, mode="tensor")
        got = model(images)
    difference = (got - expected).abs().max().item()
    print(f"{family} {layout}: max |logit difference| {difference:.2e}")
    assert expected.std() > 0.1  # logits that differ between classes: a meaningful comparison
    assert difference < 1e-4, f"{family} {layout}: logits differ by up to {difference:.2e}"


@pytest.mark.parametrize("layout", ["mmpretrain-1.x", "mmcls-0.x"])
def test_class_names_come_from_the_meta(layout, tmp_path):
    path = save(mmpretrain_model(FAMILIES["resnet18"][0]), layout, tmp_path / "model.pth")
    assert openmmlab.read(path)["classes"] == CLASSES


def test_a_checkpoint_of_another_family_names_both(tmp_path):
    path = save(mmpretrain_model(FAMILIES["convnext-v2-atto"][0]), "mmcls-0.x", tmp_path / "c.pth")
    model = timm.create_model("resnet18", num_classes=len(CLASSES))
    with pytest.raises(ValueError, match=r"ConvNeXt checkpoint.*'resnet18' is a ResNet.*convnext"):
        load_weights(model, path)


def test_an_unsupported_backbone_names_its_keys_and_what_is_supported(tmp_path):
    settings = {
        "backbone": {"type": "MobileNetV2", "widen_factor": 0.25},
        "neck": GAP,
        "head": linear_head(1280),
    }
    path = save(mmpretrain_model(settings), "mmpretrain-1.x", tmp_path / "m.pth")
    model = timm.create_model("mobilenetv2_035", num_classes=len(CLASSES))
    with pytest.raises(ValueError, match=r"cannot map \(keys backbone\.conv1.*supported: ResNet"):
        load_weights(model, path)


class Marker:
    """Unpickling it would create a file: the proof that a load ran code from the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_hostile_meta_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    model = mmpretrain_model(FAMILIES["resnet18"][0])
    path = save(model, "mmpretrain-1.x", tmp_path / "model.pth")
    content = {"meta": {"dataset_meta": {"classes": Marker(marker)}}, "state_dict": {}}
    content["state_dict"] = torch.load(path, weights_only=True)["state_dict"]
    torch.save(content, path)
    timm_model = timm.create_model("resnet18", num_classes=len(CLASSES))
    with pytest.raises(ValueError, match="refused: unpickling them could run code"):
        load_weights(timm_model, path)
    with pytest.raises(ValueError, match="refused"):
        openmmlab.read(path)
    assert not marker.exists()


def test_a_training_checkpoint_with_mmengine_objects_is_refused_by_name(tmp_path):
    from mmengine.logging import MessageHub

    hub = MessageHub.get_instance("test")
    hub.update_scalar("train/loss", 0.5)
    path = save(mmpretrain_model(FAMILIES["resnet18"][0]), "mmpretrain-1.x", tmp_path / "e.pth")
    content = torch.load(path, weights_only=True)
    torch.save({**content, "message_hub": hub.state_dict()}, path)
    model = timm.create_model("resnet18", num_classes=len(CLASSES))
    with pytest.raises(ValueError, match=r"mmengine\.logging\.history_buffer\.HistoryBuffer"):
        load_weights(model, path)


MIM_CONFIGS = Path(__import__("mmpretrain").__file__).parent / ".mim" / "configs"


@pytest.mark.parametrize(
    "config",
    [
        "convnext/convnext-tiny_32xb128_in1k.py",
        "swin_transformer/swin-tiny_16xb64_in1k.py",
        "deit/deit-tiny_4xb256_in1k.py",
        "vision_transformer/vit-base-p16_64xb64_in1k-384px.py",
        "beitv2/benchmarks/beit-base-p16_8xb64_in1k.py",
    ],
)
def test_the_configs_preprocessing_gives_mmpretrains_input(config, tmp_path):
    """The preprocessing read from a checkpoint's config makes of an image what MMPretrain's
    test pipeline and data preprocessor make of it (a non-square image: resize and crop count)."""
    import numpy as np
    from mmengine.config import Config
    from mmengine.dataset import Compose
    from PIL import Image

    from data.transforms import file_transform

    init_default_scope("mmpretrain")
    cfg = Config.fromfile(MIM_CONFIGS / config)
    pixels = np.random.default_rng(0).integers(0, 256, (30, 42, 3), dtype=np.uint8)
    Image.fromarray(pixels).resize((420, 300), Image.BICUBIC).save(tmp_path / "image.png")
    packed = Compose(cfg.test_pipeline)({"img_path": str(tmp_path / "image.png")})
    normalise = MODELS.build({"type": "ClsDataPreprocessor", **cfg.data_preprocessor})
    batch = {"inputs": [packed["inputs"]], "data_samples": [packed["data_samples"]]}
    expected = normalise(batch)["inputs"][0]

    preprocess = openmmlab.preprocess_of(cfg.pretty_text)  # the text a checkpoint's meta holds
    got = file_transform(**preprocess)(Image.open(tmp_path / "image.png"))
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-5


MMCLS_0X_CONFIG = """
model = dict(
    type='ImageClassifier',
    backbone=dict(type='SwinTransformer', arch='tiny', img_size=224, drop_path_rate=0.2),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=265, in_channels=768))
img_norm_cfg = dict(
    mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
data = dict(
    samples_per_gpu=64,
    test=dict(
        type='ImageNet',
        data_prefix='data/imagenet/val',
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='Resize', size=(248, -1), backend='pillow', interpolation='bicubic'),
            dict(type='CenterCrop', crop_size=224),
            dict(type='Normalize', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True),
            dict(type='ImageToTensor', keys=['img']),
            dict(type='Collect', keys=['img'])
        ]))
checkpoint_config = __import__('os').system('touch ran')
"""


def test_an_mmcls_0x_config_gives_its_preprocessing_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert openmmlab.preprocess_of(MMCLS_0X_CONFIG) == {
        "input_size": [3, 224, 224],
        "mean": [123.675 / 255, 116.28 / 255, 103.53 / 255],
        "std": [58.395 / 255, 57.12 / 255, 57.375 / 255],
        "interpolation": "bicubic",
        "crop_pct": 224 / 248,
    }
    assert not (tmp_path / "ran").exists()
