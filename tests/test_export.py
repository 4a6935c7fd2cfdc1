"""engine/export.py: ONNX and safetensors files that reproduce the trained model elsewhere."""

import json
import logging
import os

import numpy as np
import onnxruntime
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from engine.build import build_data, build_model_for
from engine.export import export, export_onnx
from engine.predict import SIDECAR_FORMAT, Classifier, Trained, load_trained
from models.timm_models import create, preprocessing
from tests.helpers import run_py

FILES = ["model.json", "model.onnx", "model.safetensors"]


def _session(path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _onnx_logits(session, batch: torch.Tensor) -> torch.Tensor:
    (logits,) = session.run(["logits"], {"input": batch.numpy()})
    return torch.from_numpy(logits)


@pytest.fixture(scope="module")
def val_images(tiny_run) -> torch.Tensor:
    """13 validation digits of the tiny run, preprocessed as its model saw them."""
    splits, _, _ = build_data(OmegaConf.create(load_trained(tiny_run).config))
    return torch.stack([splits.val[i][0] for i in range(13)])


@pytest.fixture(scope="module")
def exported(tiny_run, val_images, tmp_path_factory):
    """The tiny run's best.pt in both formats, checked on 8 real validation digits."""
    out = tmp_path_factory.mktemp("export")
    paths = export(load_trained(tiny_run), out, check_inputs=val_images[:8])
    return out, paths


def test_onnx_gives_the_classifier_probabilities(tiny_run, exported, val_images, tmp_path):
    out, paths = exported
    assert paths == [out / "model.onnx", out / "model.safetensors", out / "model.json"]
    assert sorted(os.listdir(out)) == FILES  # hidden names included: no staging leftovers
    (tmp_path / "plain").touch()  # files to share: readable as any file made with open()
    assert {p.stat().st_mode for p in paths} == {(tmp_path / "plain").stat().st_mode}

    session = _session(out / "model.onnx")
    (input_,) = session.get_inputs()
    assert input_.name == "input" and isinstance(input_.shape[0], str)  # a named, dynamic batch
    assert input_.shape[1:] == [1, 8, 8]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    classifier = Classifier.load(tiny_run)
    unseen = val_images[8:]  # not the check inputs
    for batch in (unseen[:1], unseen):  # batch sizes 1 and 5
        probs = _onnx_logits(session, batch).softmax(-1)
        assert probs.shape == (len(batch), 10)
        torch.testing.assert_close(probs, classifier.probabilities(batch), rtol=0, atol=1e-5)

    # the file alone says what its outputs mean and what its input must be
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == classifier.classes == [str(d) for d in range(10)]
    assert json.loads(meta["preprocess"])["input_size"] == [1, 8, 8]
    assert meta["model_name"] == "resnet18" and meta["weights"] == "model"


def test_safetensors_loads_as_the_checkpoint_does(tiny_run, exported, val_images):
    out, _ = exported
    weights = out / "model.safetensors"
    meta = json.loads((out / "model.json").read_text())
    assert meta["format"] == SIDECAR_FORMAT and meta["model_name"] == "resnet18"
    assert meta["in_chans"] == 1 and meta["weights"] == "model"
    assert meta["source"] == str(tiny_run / "checkpoints" / "best.pt")
    assert meta["epoch"] == torch.load(meta["source"], weights_only=True)["epoch"]

    from_ckpt = Classifier.load(tiny_run / "checkpoints" / "best.pt", topk=3)
    from_export = Classifier.load(weights, topk=3)
    assert from_export.classes == from_ckpt.classes
    assert from_export.trained.preprocess == from_ckpt.trained.preprocess
    images = list(val_images)
    assert from_export.predict(images) == from_ckpt.predict(images)

    # model.weights=<file>: the bare weights in a freshly built model
    bare = create("resnet18", num_classes=10, in_chans=1, weights=str(weights)).eval()
    with torch.inference_mode():
        torch.testing.assert_close(bare(val_images), from_ckpt.model(val_images), rtol=0, atol=0)


def test_ema_weights_export_as_ema(tiny_run, tmp_path, val_images):
    ema = load_trained(tiny_run, use_ema=True)
    assert export(ema, tmp_path, formats=["safetensors"]) == [
        tmp_path / "model.safetensors",
        tmp_path / "model.json",
    ]
    assert json.loads((tmp_path / "model.json").read_text())["weights"] == "ema"
    again = load_trained(tmp_path / "model.safetensors", use_ema=True)
    with torch.inference_mode():
        torch.testing.assert_close(again.model(val_images), ema.model(val_images), rtol=0, atol=0)


class NoisyHead(nn.Module):
    """Inference with noise left on: PyTorch and ONNX Runtime draw different noise."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        logits = self.fc(x.flatten(1))
        return logits + torch.randn_like(logits)


def _by_hand(model: nn.Module, model_cfg: dict, preprocess: dict, tmp_path) -> Trained:
    classes = [f"class_{i}" for i in range(3)]
    config = {"model": model_cfg}
    return Trained(model.eval(), classes, preprocess, config, tmp_path / "by_hand.pt")


def test_an_onnx_file_unlike_the_model_is_not_written(tmp_path):
    preprocess = {
        "input_size": [1, 8, 8],
        "mean": [0.5],
        "std": [0.25],
        "interpolation": "bilinear",
    }
    trained = _by_hand(NoisyHead(), {"name": "noisy_head"}, preprocess, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=r"max \|ONNX - PyTorch\| = \S+ .* > atol=0\.0001"):
        export(trained, out, formats=["onnx"], check_inputs=torch.randn(6, 1, 8, 8))
    assert os.listdir(out) == []  # hidden names included: no model.onnx, no staging folder
    # the exporter falls back to the opset it has when it cannot convert: not what was asked
    with pytest.raises(ValueError, match=r"task\.opset=30: .* could not write opset 30"):
        export(trained, out, formats=["onnx"], opset=30)
    assert os.listdir(out) == []

    # values that cannot work are refused before anything is written
    with pytest.raises(
        ValueError, match=r"'tflite' is not an export format; use one or more of \['onnx', 's"
    ):
        export(trained, tmp_path / "a", formats=["onnx", "tflite"])
    with pytest.raises(ValueError, match=r"task\.atol=-1: .* must be a number >= 0"):
        export(trained, tmp_path / "a", atol=-1)
    with pytest.raises(ValueError, match=r"task\.opset=17: .* opset 18 or newer"):
        export(trained, tmp_path / "a", opset=17)
    with pytest.raises(ValueError, match=r"check_inputs of shape \(2, 3, 8, 8\)"):
        export(trained, tmp_path / "a", check_inputs=torch.zeros(2, 3, 8, 8))
    assert not (tmp_path / "a").exists()


def test_a_vision_transformer_exports(tmp_path, caplog):
    model_cfg = {
        "_target_": "models.timm_models.create",
        "name": "vit_tiny_patch16_224",
        "pretrained": False,
        "weights": None,
        "freeze": None,
        "img_size": 32,
        "drop_rate": 0.0,
        "drop_path_rate": 0.1,  # stochastic depth: off in eval mode, so off in the export
    }
    model = build_model_for(OmegaConf.create({"model": model_cfg}), num_classes=3, in_chans=3)
    preprocess = preprocessing("vit_tiny_patch16_224", img_size=32)
    trained = _by_hand(model, model_cfg, preprocess, tmp_path)
    with caplog.at_level(logging.INFO, logger="engine.export"):
        export(trained, tmp_path)
    assert "4 random normal inputs of (3, 32, 32)" in caplog.text
    assert sorted(os.listdir(tmp_path)) == FILES

    images = torch.randn(3, 3, 32, 32)
    session = _session(tmp_path / "model.onnx")
    rebuilt = load_trained(tmp_path / "model.safetensors")  # from the sidecar's config
    with torch.inference_mode():
        expected = model(images)
        torch.testing.assert_close(rebuilt.model(images), expected, rtol=0, atol=0)
    for batch, want in ((images, expected), (images[:1], expected[:1])):
        torch.testing.assert_close(_onnx_logits(session, batch), want, rtol=0, atol=1e-4)


def test_attention_with_a_position_bias_exports(tmp_path):
    """BEiT adds a relative position bias to its attention: torch's fused-attention decomposition
    fails on it (pytorch/pytorch#136543), timm's explicit attention exports."""
    from timm.models.beit import Beit

    model = Beit(
        img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2, use_rel_pos_bias=True
    )
    model.head = nn.Linear(64, 3)
    model.eval()
    fused = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert fused and all(m.fused_attn for m in fused)
    images = torch.randn(3, 3, 32, 32)
    diff = export_onnx(model, tmp_path / "beit.onnx", images)
    assert 0 <= diff <= 1e-4
    assert all(m.fused_attn for m in fused)  # the model is left as it was
    with torch.inference_mode():
        expected = model(images)
    session = _session(tmp_path / "beit.onnx")
    for batch, want in ((images, expected), (images[:1], expected[:1])):
        torch.testing.assert_close(_onnx_logits(session, batch), want, rtol=0, atol=1e-4)


def test_task_export_writes_the_files(tiny_run, tmp_path, val_images):
    out = tmp_path / "export"
    proc = run_py("task=export", f"task.ckpt={tiny_run}", f"task.out={out}", cwd=tmp_path)
    for name in ("model.onnx", "model.safetensors", "model.json"):
        assert f"wrote {out / name}" in proc.stdout
    assert sorted(os.listdir(out)) == FILES
    probs = _onnx_logits(_session(out / "model.onnx"), val_images[:3]).softmax(-1).numpy()
    expected = Classifier.load(out / "model.safetensors").probabilities(val_images[:3]).numpy()
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-5)
