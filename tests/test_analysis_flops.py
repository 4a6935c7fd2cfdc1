"""analysis/flops.py counts exactly on known layers and matches the published model figures."""

import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from analysis.flops import count_modules, flops, model_complexity
from tests.helpers import REPO, clean_env


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_known_layers_are_exact():
    assert model_complexity(nn.Linear(10, 20), (10,)) == {"params": 220, "macs": 200, "flops": 400}
    # 8 output channels x 3 x 3 kernel x 3 input channels per output pixel, 16 x 16 pixels
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False)
    macs = 8 * 3 * 3 * 3 * 16 * 16
    assert model_complexity(conv, (3, 16, 16)) == {"params": 216, "macs": macs, "flops": 2 * macs}


def test_per_module_rows_and_training_flag_kept():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Sequential(nn.Linear(8, 2)))
    model.train()
    running_mean = model[1].running_mean.clone()
    rows = count_modules(model, (4,), depth=2)
    assert list(rows) == ["", "0", "1", "2", "2.0"]
    assert rows["0"]["macs"] == 32 and rows["2"]["macs"] == rows["2.0"]["macs"] == 16
    assert rows[""]["macs"] == 48 and rows["1"]["macs"] == 0
    assert model.training and torch.equal(model[1].running_mean, running_mean)


@pytest.mark.parametrize(
    ("model", "gmacs", "params_m"), [("resnet50", 4.1, 25.6), ("vit_base", 17.6, 86.6)]
)
def test_published_figures(model, gmacs, params_m):
    rows, shape = flops(composed(f"model={model}"))
    assert shape == (3, 224, 224)
    assert rows[""]["macs"] / 1e9 == pytest.approx(gmacs, rel=0.02)
    assert rows[""]["params"] / 1e6 == pytest.approx(params_m, rel=0.02)
    assert rows[""]["flops"] == 2 * rows[""]["macs"]


def test_shape_and_classes_are_options():
    rows, shape = flops(composed(), shape=[1, 32, 32], num_classes=10, depth=1)
    assert shape == (1, 32, 32)
    assert rows["conv1"]["params"] == 64 * 1 * 7 * 7
    assert rows["fc"]["params"] == 512 * 10 + 10


@pytest.mark.slow  # a real training subprocess: keeps the default suite under 10 minutes
def test_cli_with_defaults_prints_a_table_and_leaves_nothing(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "analysis" / "flops.py")],
        cwd=tmp_path,
        env=clean_env(COLUMNS="120"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resnet18 on [3, 224, 224]" in proc.stdout and "11.69 M params" in proc.stdout
    assert "layer4" in proc.stdout and "GMACs" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_attention_counts_the_same_on_the_cpu_as_on_the_meta_device():
    # torch runs attention on the CPU as aten::_scaled_dot_product_flash_attention_for_cpu, which
    # its counter left at 0 (ViT-B: 16.85 instead of 17.56 GMACs)
    import timm

    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4}
    cpu_model = timm.create_model("vit_tiny_patch16_224", num_classes=10, **kwargs)
    with torch.device("meta"):
        meta_model = timm.create_model("vit_tiny_patch16_224", num_classes=10, **kwargs)
    on_cpu = model_complexity(cpu_model, (3, 32, 32))
    assert on_cpu == model_complexity(meta_model, (3, 32, 32))
    # Per block: Q @ K^T and scores @ V, each tokens x tokens x width MACs (heads split the width);
    # 16 patches + the class token. The rest: patch embedding, qkv/proj/MLP linears, head.
    tokens, width, depth = 17, 64, 2
    attention = depth * 2 * tokens * tokens * width
    patch_embed = 16 * (3 * 8 * 8) * width
    linears = depth * tokens * (3 * width * width + width * width + 2 * width * 4 * width)
    assert on_cpu["macs"] == attention + patch_embed + linears + width * 10
