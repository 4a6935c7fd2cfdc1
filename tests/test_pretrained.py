"""Tasks on a model with no run behind it: an MMPretrain checkpoint as model.weights (or as
task.ckpt) predicts, exports and serves what MMPretrain itself predicts, with its class names
and its config's preprocessing; model.pretrained=true offline says how to get the weights."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import clean_env, run_py
from tests.test_openmmlab import CLASSES, FAMILIES, MIM_CONFIGS, mmpretrain_model

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from mmengine.config import Config
    from mmengine.dataset import Compose
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS

pytestmark = pytest.mark.filterwarnings("ignore:Fail to import ``MultiScaleDeformableAttention``")

CONFIG = (
    "deit/deit-tiny_4xb256_in1k.py"  # its test pipeline: ResizeEdge 256 (bicubic, PIL), crop 224
)


@pytest.fixture(scope="module")
def mm_checkpoint(tmp_path_factory):
    """An MMPretrain ResNet-18 for 7 classes as MMPretrain saves it (classes and config in its
    meta), with MMPretrain's own model and config to compare against, and 3 photos."""
    folder = tmp_path_factory.mktemp("mm")
    model = mmpretrain_model(FAMILIES["resnet18"][0])
    with torch.no_grad():  # moderate logits: probabilities that are not all 0 or 1
        model.head.fc.weight.mul_(1e-4)
    cfg = Config.fromfile(MIM_CONFIGS / CONFIG)
    meta = {"dataset_meta": {"classes": tuple(CLASSES)}, "cfg": cfg.pretty_text}
    path = folder / "garbage.pth"
    torch.save({"meta": meta, "state_dict": model.state_dict()}, path)
    photos = folder / "photos"
    photos.mkdir()
    for i in range(3):  # smooth, non-square pictures: the resize and the crop matter
        pixels = np.random.default_rng(i).integers(0, 256, (30, 42, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((420, 300), Image.BICUBIC).save(photos / f"{i}.png")
    return path, model, cfg, sorted(photos.iterdir())


def mmpretrain_probabilities(model, cfg, files) -> torch.Tensor:
    """MMPretrain's own inference: its test pipeline, data preprocessor and forward."""
    init_default_scope("mmpretrain")
    pipeline = Compose(cfg.test_pipeline)
    normalise = MODELS.build({"type": "ClsDataPreprocessor", **cfg.data_preprocessor})
    packed = [pipeline({"img_path": str(f)}) for f in files]
    batch = normalise({"inputs": [p["inputs"] for p in packed], "data_samples": None})
    with torch.no_grad():
        return model(batch["inputs"], mode="tensor").softmax(-1)


def test_predict_with_an_mmpretrain_checkpoint_gives_mmpretrains_predictions(
    mm_checkpoint, run_task, tmp_path
):
    path, model, cfg, files = mm_checkpoint
    expected = mmpretrain_probabilities(model, cfg, files)
    out = tmp_path / "p.json"
    folder = files[0].parent
    for given in ([f"model.weights={path}"], [f"task.ckpt={path}"]):  # either way in
        run_task(
            "task=predict", "model=resnet18", *given, f"task.inputs={folder}", f"task.out={out}"
        )
        rows = json.loads(out.read_text())
        assert [r["path"] for r in rows] == [str(f) for f in files]
        for row, probs in zip(rows, expected, strict=True):
            top = probs.topk(5)
            assert [p["label"] for p in row["predictions"]] == [CLASSES[i] for i in top.indices]
            scores = torch.tensor([p["score"] for p in row["predictions"]])
            assert (scores - top.values).abs().max() < 1e-5
    assert expected.max() < 0.99  # probabilities that can differ


def test_export_of_an_mmpretrain_checkpoint_keeps_names_and_preprocessing(
    mm_checkpoint, run_task, tmp_path
):
    from engine.predict import Classifier

    path, model, cfg, files = mm_checkpoint
    out = tmp_path / "export"
    run_task("task=export", "model=resnet18", f"model.weights={path}", f"task.out={out}")
    classifier = Classifier.load(out / "model.safetensors")  # the export alone, no checkpoint
    assert classifier.classes == CLASSES
    assert classifier.trained.preprocess["crop_pct"] == 224 / 256
    expected = mmpretrain_probabilities(model, cfg, files)
    got = classifier.probabilities(torch.stack([classifier.to_input(f) for f in files]))
    assert (got - expected).abs().max() < 1e-5


def test_pretrained_offline_without_a_cache_says_how_to_get_the_weights(tmp_path):
    env = clean_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    image = tmp_path / "cat.png"
    Image.new("RGB", (40, 30), "gray").save(image)
    proc = run_py(
        "task=predict",
        "model=resnet18",
        "model.pretrained=true",
        f"task.inputs={image}",
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert proc.returncode == 1
    assert "could not be fetched" in proc.stderr
    assert "fill the Hugging Face cache (HF_HOME)" in proc.stderr
    assert "model.weights=<file>" in proc.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.json"))


def test_eval_of_an_mmpretrain_checkpoint_on_a_folder_uses_its_preprocessing(
    mm_checkpoint, run_task, tmp_path
):
    """task=eval on a folder of the checkpoint's classes: the images are read with the
    checkpoint's config's preprocessing, so eval's predictions are MMPretrain's."""
    path, model, cfg, files = mm_checkpoint
    root = tmp_path / "data"
    for split in ("train", "val"):
        for i, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            Image.open(files[i % len(files)]).save(root / split / name / "a.png")
    run_task(
        "task=eval",
        "model=resnet18",
        f"model.weights={path}",
        "data=imagefolder",
        f"data.dataset.root={root}",
        "logger=none",
    )
    rows = [json.loads(line) for line in (tmp_path / "run/eval/predictions.jsonl").open()]
    assert [r["target_label"] for r in rows] == CLASSES
    expected = mmpretrain_probabilities(model, cfg, [r["path"] for r in rows])
    for row, probs in zip(rows, expected, strict=True):
        top = probs.topk(len(row["topk"]))
        assert [p["label"] for p in row["topk"]] == [CLASSES[i] for i in top.indices]
        scores = torch.tensor([p["score"] for p in row["topk"]])
        assert (scores - top.values).abs().max() < 1e-5


def test_cam_explains_an_mmpretrain_checkpoint_with_no_run(mm_checkpoint, tmp_path):
    from analysis.cam import main

    path, _, _, files = mm_checkpoint
    out = tmp_path / "cam"
    args = ["model=resnet18", f"model.weights={path}", f"images={files[0].parent}", f"out={out}"]
    assert main(args) == 0
    assert sorted(p.name for p in out.glob("*.png")) == [f"{f.stem}_gradcam.png" for f in files]
    assert main(["model=resnet18", f"model.weights={path}"]) == 1  # no run: images= needed


@pytest.fixture
def web(mm_checkpoint):
    """A loopback HTTP server of the photos' folder: the base URL."""
    import functools
    import http.server
    import threading

    folder = mm_checkpoint[3][0].parent
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_predict_takes_an_image_url(mm_checkpoint, web, run_task, tmp_path):
    from engine.predict import Classifier

    path, _, _, files = mm_checkpoint
    out = tmp_path / "p.json"
    url = f"{web}/{files[1].name}"
    run_task(
        "task=predict",
        "model=resnet18",
        f"model.weights={path}",
        f"task.inputs={url}",
        f"task.out={out}",
    )
    (row,) = json.loads(out.read_text())
    assert row["path"] == url
    # the Python API in one line: the same model on the URL and on the local file
    classifier = Classifier.from_model("resnet18", path)
    assert classifier(url) == classifier(files[1]) == row["predictions"]
    assert classifier.labels_and_scores(url, topk=2) == {
        "labels": [p["label"] for p in row["predictions"][:2]],
        "scores": [p["score"] for p in row["predictions"][:2]],
    }
    with pytest.raises(OSError, match=r"could not download 'http://127\.0\.0\.1:\d+/missing\.png'"):
        classifier(f"{web}/missing.png")
    with pytest.raises(ValueError, match="did not give an image"):
        classifier(f"{web}/")  # the folder listing, HTML


def test_a_modelscope_model_folder_works_as_a_weights_file(
    mm_checkpoint, run_task, tmp_path, monkeypatch
):
    """ModelScope's download of an MMClassification card: pytorch_model.pt (class names in
    meta.CLASSES, no config inside) beside config.py, which gives the preprocessing (parsed,
    never run)."""
    from tests.test_openmmlab import MMCLS_0X_CONFIG

    monkeypatch.chdir(tmp_path)  # where config.py's os.system('touch ran') would write
    path, model, _, files = mm_checkpoint
    folder = tmp_path / "cv_resnet18_image-classification_garbage"
    folder.mkdir()
    state = torch.load(path, weights_only=True)["state_dict"]
    torch.save(
        {"meta": {"CLASSES": CLASSES, "mmcls_version": "0.25.0"}, "state_dict": state},
        folder / "pytorch_model.pt",
    )
    (folder / "config.py").write_text(MMCLS_0X_CONFIG)  # Resize (248, -1), crop 224, bicubic
    (folder / "configuration.json").write_text('{"task": "image-classification"}')

    out = tmp_path / "p.json"
    for given in ([f"model.weights={folder}"], [f"task.ckpt={folder}"]):
        run_task(
            "task=predict", "model=resnet18", *given, f"task.inputs={files[0]}", f"task.out={out}"
        )
        (row,) = json.loads(out.read_text())
        assert {p["label"] for p in row["predictions"]} <= set(CLASSES)

    from engine.predict import Classifier

    classifier = Classifier.from_model("resnet18", folder)
    assert classifier.classes == CLASSES
    assert classifier.trained.preprocess["crop_pct"] == 224 / 248
    assert not (tmp_path / "ran").exists()
    # MMPretrain's own probabilities with that pipeline (resize the short side to 248, crop 224)
    cfg = Config.fromfile(MIM_CONFIGS / CONFIG)
    cfg.test_pipeline[1]["scale"] = 248
    expected = mmpretrain_probabilities(model, cfg, files[:1])
    got = classifier.probabilities(classifier.to_input(files[0])[None])
    assert (got - expected).abs().max() < 1e-5


@pytest.mark.slow  # a server process: ~1 min on the busy 2-core machine
def test_serve_of_an_mmpretrain_checkpoint_answers_with_its_classes(mm_checkpoint, tmp_path):
    """python run.py task=serve model=resnet18 model.weights=<MMPretrain file>: a real server
    process; a POSTed photo gets the checkpoint's class names and the Python API's scores."""
    from engine.predict import Classifier
    from tests.test_serve import assert_same, http_request, serving

    path, model, cfg, files = mm_checkpoint
    expected = Classifier.from_model("resnet18", path)(files[0])
    assert {p["label"] for p in expected} <= set(CLASSES)
    with serving("model=resnet18", f"model.weights={path}", cwd=tmp_path) as server:
        status, reply, _ = http_request(server.port, "GET", "/health")
        assert status == 200 and reply["classes"] == len(CLASSES)
        status, reply, _ = http_request(server.port, "POST", "/predict", files[0].read_bytes())
    assert status == 200
    assert_same(reply, expected)
    top = mmpretrain_probabilities(model, cfg, files[:1])[0].topk(len(reply))
    assert [p["label"] for p in reply] == [CLASSES[i] for i in top.indices]


def hub_cache(cache, name: str, model: torch.nn.Module) -> Path:
    """Hugging Face hub's cache as a download of timm's `name` leaves it: refs/main names the
    revision, snapshots/<revision>/ holds model.safetensors and config.json. The file."""
    import timm
    from safetensors.torch import save_file

    repo = timm.get_pretrained_cfg(name).hf_hub_id  # timm/<model>.<tag>
    folder = cache / f"models--{repo.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs/main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, snapshot / "model.safetensors"
    )
    config = {"architecture": name.split(".")[0], "num_classes": 1000}
    (snapshot / "config.json").write_text(json.dumps(config))
    return snapshot / "model.safetensors"


@pytest.mark.slow  # a run.py process with a ResNet-18
def test_pretrained_from_a_filled_hub_cache_predicts_with_imagenet_names(tmp_path):
    """model.pretrained=true offline reads the weights of the filled hub cache, and names the
    1000 classes as timm's ImageNet label info does."""
    import timm
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    model = timm.create_model("resnet18", pretrained=False).eval()  # random, not timm's
    weights = hub_cache(tmp_path / "hub", "resnet18.a1_in1k", model)
    image = tmp_path / "cat.png"
    pixels = np.random.default_rng(0).integers(0, 256, (30, 42, 3), dtype=np.uint8)
    Image.fromarray(pixels).resize((420, 300), Image.BICUBIC).save(image)
    out = tmp_path / "p.json"
    env = clean_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    overrides = ("model=resnet18", "model.pretrained=true", f"task.inputs={image}")
    run_py("task=predict", *overrides, f"task.out={out}", cwd=tmp_path, env=env)
    (row,) = json.loads(out.read_text())

    # the same safetensors file through timm's own loading and preprocessing
    reference = timm.create_model(
        "resnet18", pretrained=True, pretrained_cfg_overlay={"file": str(weights)}
    ).eval()
    transform = create_transform(**resolve_data_config({}, model=reference))
    with torch.no_grad():
        probs = reference(transform(Image.open(image).convert("RGB"))[None]).softmax(-1)[0]
    top = probs.topk(len(row["predictions"]))
    names = ImageNetInfo().label_descriptions()
    assert [p["label"] for p in row["predictions"]] == [names[i] for i in top.indices]
    scores = torch.tensor([p["score"] for p in row["predictions"]])
    assert (scores - top.values).abs().max() < 1e-5
