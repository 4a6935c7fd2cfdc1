"""Pooled features of a trained model: Classifier.features, the feature-extractor export and
analysis/embeddings.py (t-SNE map, k-NN accuracy), on the tiny run of real digits."""

import json

import numpy as np
import onnxruntime
import pytest
import timm
import torch
from omegaconf import OmegaConf
from PIL import Image

from analysis import embeddings
from engine.build import build_eval_data
from engine.export import export
from engine.predict import Classifier, load_trained
from models.features import pooled_features


@pytest.fixture(scope="module")
def val_images(tiny_run) -> torch.Tensor:
    """12 validation digits of the tiny run, preprocessed as its model saw them."""
    trained = load_trained(tiny_run)
    dataset, _ = build_eval_data(OmegaConf.create(trained.config), trained.classes, "val")
    return torch.stack([dataset[i][0] for i in range(12)])


def test_features_are_what_the_classifier_reads(tiny_run, val_images, tmp_path):
    classifier = Classifier.load(tiny_run)
    features = classifier.features(val_images)
    fc = classifier.model.get_classifier()
    assert features.shape == (12, fc.in_features) and features.dtype == torch.float32
    # the classifier's last layer on these features gives its logits
    with torch.inference_mode():
        logits = classifier.model(val_images)
        torch.testing.assert_close(fc(features), logits, rtol=0, atol=1e-5)
    assert classifier.features(val_images[0]).shape == (1, fc.in_features)  # one image

    # image files go through the predictions' own preprocessing
    files = []
    for i, image in enumerate(val_images[:4]):
        path = tmp_path / f"{i}.png"
        pixels = (image[0] - image.min()) / (image.max() - image.min()) * 255
        Image.fromarray(pixels.round().byte().numpy(), mode="L").save(path)
        files.append(path)
    predicted = [top[0]["index"] for top in classifier.predict(files)]
    with torch.inference_mode():
        assert fc(classifier.features(files)).argmax(-1).tolist() == predicted


@pytest.mark.slow  # an ONNX export and its check: ~10 s
def test_export_a_feature_extractor(tiny_run, val_images, tmp_path):
    trained = load_trained(tiny_run)
    with pytest.raises(ValueError, match=r"task\.output='embedding'"):
        export(trained, tmp_path / "no", output="embedding")
    assert not (tmp_path / "no").exists()  # refused before anything was written

    out = tmp_path / "export"
    paths = export(trained, out, check_inputs=val_images[:4], output="features")
    assert paths == [out / "features.onnx", out / "features.safetensors", out / "features.json"]
    expected = Classifier(trained).features(val_images[4:])
    session = onnxruntime.InferenceSession(str(out / "features.onnx"))
    assert [o.name for o in session.get_outputs()] == ["features"]
    (got,) = session.run(["features"], {"input": val_images[4:].numpy()})
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-5)
    assert session.get_modelmeta().custom_metadata_map["output"] == "features"

    # the weights load into timm's model without a classifier, and give the same features
    from safetensors.torch import load_file

    sidecar = json.loads((out / "features.json").read_text())
    assert sidecar["output"] == "features" and sidecar["num_features"] == expected.shape[1]
    backbone = timm.create_model(sidecar["model_name"], num_classes=0, in_chans=1)
    backbone.load_state_dict(load_file(out / "features.safetensors"))  # strict: no fc.*
    with torch.inference_mode():
        torch.testing.assert_close(backbone.eval()(val_images[4:]), expected, rtol=0, atol=1e-5)
        assert torch.equal(pooled_features(trained.model, val_images[4:]), expected)


def test_knn_accuracy_votes_by_cosine_neighbours():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(40, 8))
    labels = rng.integers(0, 4, 40)
    assert embeddings.knn_accuracy(points, labels, points, labels, k=1) == 100.0  # itself
    # cosine: a query scaled by 1000 keeps its neighbours
    assert embeddings.knn_accuracy(points, labels, 1000 * points, labels, k=1) == 100.0
    # k=3 by hand, two classes (a vote of 3 has no tie): the majority of the 3 most similar
    two = labels % 2
    unit = points / np.linalg.norm(points, axis=1, keepdims=True)
    queries = rng.normal(size=(30, 8))
    query_labels = rng.integers(0, 2, 30)
    similar = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T
    by_hand = two[np.argsort(-similar, axis=1)[:, :3]].sum(1) >= 2
    expected = 100 * np.mean(by_hand == query_labels)
    assert embeddings.knn_accuracy(points, two, queries, query_labels, k=3) == expected
    with pytest.raises(ValueError, match="k=41"):
        embeddings.knn_accuracy(points, labels, queries, query_labels, k=41)


def test_cli_writes_the_map_the_features_and_the_knn_accuracy(tiny_run, tmp_path, capsys):
    out = tmp_path / "emb"
    assert embeddings.main([str(tiny_run), "--k", "5", "--limit", "120", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "embeddings.json").read_text())
    acc = result["knn"]["acc1"]
    assert f"k-NN top-1 {acc:.2f}% (k=5, cosine; 120 train images" in printed
    assert result["bank"] == {"split": "train", "images": 120}
    assert result["queries"] == {"split": "val", "images": 120}
    assert acc > 30  # ten digits: chance is 10%

    saved = np.load(out / "features_val.npz")
    assert saved["features"].shape == (120, result["num_features"])
    trained = load_trained(tiny_run)
    bank, bank_labels = embeddings.split_features(trained, "train", limit=120)
    knn = embeddings.knn_accuracy(bank, bank_labels, saved["features"], saved["labels"], k=5)
    assert knn == acc  # the number is the features' k-NN accuracy, recomputable from the file
    with Image.open(out / "tsne_val.png") as image:
        assert image.size == (7.5 * embeddings.DPI, 6 * embeddings.DPI)

    assert embeddings.main([str(tiny_run), "--k", "0", "--out", str(out)]) == 1
    assert "k=0 must be between 1" in capsys.readouterr().err
