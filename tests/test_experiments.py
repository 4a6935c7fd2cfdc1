"""Every `experiment=` recipe trains for a few steps on CPU, with its model shrunk to 32 px.

The recipes ask for hub weights and hours of training; here the weights are off (no network),
the run is cut to two updates and the images are tiny, but every other key is the recipe's.
"""

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from tests.helpers import REPO, run_py
from tests.test_config import composed

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


def _text(name: str) -> str:
    return (REPO / "conf" / "experiment" / f"{name}.yaml").read_text()


# ~25 s each on 2 CPU cores (an 88 M-parameter model built, stepped and saved): they run with
# `-m slow`, to keep the default suite under 10 minutes; all of them compose and bind in
# test_config.py, and run.py's default job trains end to end in test_default_run.py
# the recipes for image folders; cifar10_speedrun (CIFAR-10 on the device) is built in
# test_device_loader.py, and its data path runs there on a CIFAR archive the test writes
FOLDER_RECIPES = [n for n in EXPERIMENTS if "override /data: cifar" not in _text(n)]
CASES = [pytest.param(n, marks=pytest.mark.slow) for n in FOLDER_RECIPES]
CLASSES = ["n01440764", "n01443537"]  # ImageNet-style folder names serve both layouts


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """<root>/train/<class>/*.png and <root>/val/<class>/*.png, two classes of plain colours."""
    root = tmp_path_factory.mktemp("images")
    for split, count in (("train", 8), ("val", 2)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                colour = (200 * c, 40 * i % 256, 255 - 200 * c)
                Image.new("RGB", (40, 36), colour).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("name", CASES)
def test_recipe_trains_a_few_steps(name, image_root, tmp_path):
    recipe = composed(f"experiment={name}")
    run_dir = tmp_path / "run"
    run_py(
        f"experiment={name}",
        f"data.dataset.root={image_root}",
        "model.pretrained=false",
        # models built for one size (ViT) take it as a key; the others follow their input
        *(["model.img_size=32"] if "img_size" in recipe.model else []),
        "data.transform.input_size=32",
        "data.batch_size=4",
        "data.num_workers=0",
        "trainer.epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "sched.warmup_epochs=0",
        "sched.warmup_steps=1",
        "logger=none",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True, mmap=True)
    assert ckpt["class_names"] and ckpt["step"] == 2
    # the recipe's own settings reached the run
    for key in ("model.name", "optim.lr", "optim.weight_decay", "loss.label_smoothing"):
        assert OmegaConf.select(OmegaConf.create(ckpt["config"]), key) == OmegaConf.select(
            recipe, key
        )
