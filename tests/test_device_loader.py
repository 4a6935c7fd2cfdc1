"""data.on_device: the splits held as tensors on the device, batches cut and augmented there.

The regular DataLoader is the reference: without augmentation the device loader must give its
images and labels for the same seed, and with it crops and flips of those images.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from torchvision.datasets import MNIST, FashionMNIST

from data.cifar import cifar10
from data.device_loader import DeviceLoader
from data.digits import digits
from data.kfold import kfold
from data.loaders import make_loaders, seed_epoch
from data.mnist import fashion_mnist, mnist
from data.splits import Splits, TensorData
from engine import build
from models.speednet import speednet
from tests import test_cifar
from tests.helpers import TINY, run_py
from tests.test_config import composed
from tests.test_data import write_mnist

# fixtures of tests/test_cifar.py: a stand-in CIFAR-10 in its real format, and torchvision handed
# its MD5 sums
fake_cifar = test_cifar.fake_cifar
cifar = test_cifar.cifar_sums


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread beats two, by far on a busy machine (see test_models)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_splits(name: str, tmp_path, augment: bool = False) -> Splits:
    """`name`'s splits, read from files in its real format written here where it needs some."""
    if name == "digits":
        return digits(image_size=16)
    if name in ("mnist", "fashion_mnist"):
        write_mnist(tmp_path, MNIST if name == "mnist" else FashionMNIST, np.random.default_rng(0))
        builder = mnist if name == "mnist" else fashion_mnist
        return builder(root=str(tmp_path), download=False, augment=augment)
    raise AssertionError(name)


def cifar_splits(data, augment: bool = False, image_size: int = 32) -> Splits:
    return cifar10(str(data.extracted), download=False, augment=augment, image_size=image_size)


def batches(loader, seed: int = 0, epoch: int = 0) -> list[tuple[torch.Tensor, ...]]:
    if loader.generator is not None:  # the train loader
        seed_epoch(loader, seed, epoch)
    return list(loader)


def assert_same_batches(regular, on_device) -> None:
    assert len(regular) == len(on_device) > 0
    for (images, labels), (ours, our_labels) in zip(regular, on_device, strict=True):
        assert ours.dtype == torch.float32 and ours.shape == images.shape
        torch.testing.assert_close(ours, images, rtol=0, atol=1e-6)
        assert torch.equal(our_labels, labels)


# --- the regular loader's images -------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits", "mnist", "fashion_mnist"])
def test_same_images_and_labels_as_the_regular_loader(name, tmp_path):
    splits = small_splits(name, tmp_path)
    regular = make_loaders(splits, batch_size=4)
    on_device = make_loaders(splits, batch_size=4, on_device=True)
    for ours, theirs in zip(on_device, regular, strict=True):
        # train: the same shuffled order for one seed; val: in order, the last batch partial
        assert_same_batches(batches(theirs, 3, 1), batches(ours, 3, 1))
    assert on_device[0].images.dtype == (torch.float32 if name == "digits" else torch.uint8)


@pytest.mark.parametrize("image_size", [32, 24])
def test_cifar_same_images_and_labels_as_the_regular_loader(cifar, image_size):
    splits = cifar_splits(cifar, image_size=image_size)  # 24: resized as PIL does
    regular = make_loaders(splits, batch_size=8)
    on_device = make_loaders(splits, batch_size=8, on_device=True)
    for ours, theirs in zip(on_device, regular, strict=True):
        assert_same_batches(batches(theirs), batches(ours))
    assert on_device[0].images.dtype == torch.uint8  # stored as the files hold it
    assert on_device[0].images.shape == (40, 3, image_size, image_size)
    # the dataset's own augmentation, turned off by hand: again the regular loader's images
    augmenting = cifar_splits(cifar, augment=True, image_size=image_size)
    off = {"pad": 0, "flip": False}
    on_device = make_loaders(augmenting, batch_size=8, on_device=True, device_augment=off)
    assert_same_batches(batches(regular[0]), batches(on_device[0]))


# --- augmentation --------------------------------------------------------------------------


def unnormalised(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised float images back to uint8 pixels."""
    mean, std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    return (images * std + mean).mul(255).round().to(torch.uint8)


def windows(image: torch.Tensor, pad: int, flip: bool) -> list[torch.Tensor]:
    """Every crop of `image` padded by `pad` zeros, and with `flip` their mirror images."""
    _, height, width = image.shape
    padded = F.pad(image, (pad, pad, pad, pad))
    crops = [
        padded[:, top : top + height, left : left + width]
        for top in range(2 * pad + 1)
        for left in range(2 * pad + 1)
    ]
    return crops + [c.flip(-1) for c in crops] if flip else crops


def test_augmentation_crops_and_flips_each_image_keeping_its_label(cifar):
    plain = cifar_splits(cifar)
    data = cifar_splits(cifar, augment=True).tensors()  # the dataset's own: pad 4, flip
    assert (data.pad, data.flip) == (4, True)
    reference, _ = make_loaders(plain, batch_size=8)  # unaugmented, in the same order
    loader, _ = make_loaders(cifar_splits(cifar, augment=True), batch_size=8, on_device=True)

    changed = 0
    for (originals, labels), (images, our_labels) in zip(
        batches(reference), batches(loader), strict=True
    ):
        assert images.shape == originals.shape and images.dtype == torch.float32
        assert torch.equal(our_labels, labels)
        pixels = unnormalised(images, data.mean, data.std)
        for original, image in zip(
            unnormalised(originals, data.mean, data.std), pixels, strict=True
        ):
            assert any(torch.equal(image, w) for w in windows(original, 4, flip=True))
            changed += not torch.equal(image, original)
    assert changed > 20  # of 40: P(a crop and flip leave an image alone) = 1/162


def test_device_augment_sets_pad_and_flip():
    images = torch.randint(0, 256, (16, 1, 6, 6), dtype=torch.uint8)
    targets = torch.arange(16)
    for pad, flip in [(2, False), (0, True), (1, True)]:
        loader = DeviceLoader(
            images, targets, 16, mean=(0.0,), std=(1 / 255,), train=True, pad=pad, flip=flip
        )
        (batch, labels), *_ = batches(loader)
        for image, label in zip(batch.round().to(torch.uint8), labels, strict=True):
            assert any(torch.equal(image, w) for w in windows(images[label], pad, flip))
        if not pad:  # mirrored or not: never shifted
            assert all(
                torch.equal(i, images[t]) or torch.equal(i, images[t].flip(-1))
                for i, t in zip(batch.round().to(torch.uint8), labels, strict=True)
            )


# --- seeds, skipping, sharding -------------------------------------------------------------


def index_coded(count: int = 30, size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images whose targets are their indices, so a batch says which images it holds."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
    return images, torch.arange(count)


def loader_of(images, targets, batch_size=4, **kwargs) -> DeviceLoader:
    stats = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.3, 0.4)}
    return DeviceLoader(
        images, targets, batch_size, train=True, pad=2, flip=True, **stats, **kwargs
    )


def assert_equal_passes(a, b) -> None:
    assert len(a) == len(b)
    for (x, y), (u, v) in zip(a, b, strict=True):
        assert torch.equal(x, u) and torch.equal(y, v)


def test_seed_epoch_fixes_the_order_and_the_augmentation_of_an_epoch():
    loader = loader_of(*index_coded())
    first = batches(loader, seed=0, epoch=2)
    batches(loader, seed=0, epoch=3)  # whatever ran in between
    assert_equal_passes(batches(loader, seed=0, epoch=2), first)
    # a new loader (a resumed run) draws the same epoch
    assert_equal_passes(batches(loader_of(*index_coded()), seed=0, epoch=2), first)
    for seed, epoch in [(0, 3), (1, 2)]:
        other = batches(loader, seed=seed, epoch=epoch)
        assert not all(
            torch.equal(y, v) for (_, y), (_, v) in zip(first, other, strict=True)
        )  # order
        # the crops and flips too: the same images, sorted, differ
        ours, theirs = (torch.cat([x[y.argsort()] for x, y in p]) for p in (first, other))
        assert not torch.equal(ours, theirs)


def test_skip_batches_gives_the_tail_of_the_unskipped_epoch():
    loader = loader_of(*index_coded())
    full = batches(loader, seed=5, epoch=1)
    assert len(full) == len(loader) == 7  # 30 images, batches of 4, the last 2 dropped

    seed_epoch(loader, 5, 1)
    loader.skip_batches = 3
    tail = iter(loader)
    assert loader.skip_batches == 0  # reset as the pass starts: the next epoch is whole
    assert_equal_passes(list(tail), full[3:])
    assert len(batches(loader, seed=5, epoch=2)) == 7


@pytest.mark.parametrize("replicas", [2, 3])
def test_sharding_splits_the_data_as_shard_sampler_does(replicas):
    images, targets = index_coded(31)
    splits = Splits(
        train=TensorDataset(images.float(), targets),
        val=TensorDataset(images.float(), targets),
        classes=[str(i) for i in range(31)],
        in_chans=3,
        tensors=lambda: TensorData(images, targets, images, targets, (0.5,) * 3, (0.2,) * 3),
    )
    seen_val = []
    for rank in range(replicas):
        shard = {"num_replicas": replicas, "rank": rank}
        regular = make_loaders(splits, batch_size=2, **shard)
        ours = make_loaders(splits, batch_size=2, on_device=True, **shard)
        for theirs, mine in zip(regular, ours, strict=True):
            want = [labels for _, labels in batches(theirs, 4, 0)]
            got = [labels for _, labels in batches(mine, 4, 0)]
            assert len(mine) == len(theirs) and len(got) == len(want)
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        seen_val += [t for _, labels in ours[1] for t in labels.tolist()]
    assert sorted(seen_val) == list(range(31))  # every val image once, none padded in


def test_processes_together_see_the_batches_of_one_with_the_global_batch():
    images, targets = index_coded(32)
    single = batches(loader_of(images, targets, batch_size=8), seed=1, epoch=0)
    ranks = [
        batches(loader_of(images, targets, num_replicas=2, rank=r), seed=1, epoch=0)
        for r in range(2)
    ]
    for step, (whole, labels) in enumerate(single):
        parts = [ranks[r][step] for r in range(2)]
        joined = torch.cat([p[0] for p in parts])
        joined_labels = torch.cat([p[1] for p in parts])
        # the same images, each with the same crop and flip
        assert torch.equal(joined[joined_labels.argsort()], whole[labels.argsort()])


# --- errors ----------------------------------------------------------------------------------


def test_bad_options_name_the_key_and_the_fix(tmp_path):
    splits = digits(image_size=8)
    for bad, message in [
        ({"crop": 4}, r"data.device_augment has no key 'crop'; its keys are pad .* and flip"),
        ({"pad": -1}, r"data.device_augment.pad=-1 must be a whole number of pixels"),
        ({"pad": True}, r"data.device_augment.pad=True must be a whole number"),
        ({"flip": "yes"}, r"data.device_augment.flip='yes' must be true or false"),
    ]:
        with pytest.raises(ValueError, match=message):
            make_loaders(splits, batch_size=4, on_device=True, device_augment=bad)
    with pytest.raises(ValueError, match=r"data.device_augment=.* data.on_device=true; turn"):
        make_loaders(splits, batch_size=4, device_augment={"pad": 2})
    # a k-fold split (or image files, or the model's pipeline) is no tensor dataset
    folded = kfold(splits, fold=0, num_folds=3)
    with pytest.raises(ValueError, match=r"data.on_device=true .*digits.*set data.on_device=false"):
        make_loaders(folded, batch_size=4, on_device=True)


# --- through the engine ----------------------------------------------------------------------


def test_build_data_puts_the_data_on_the_trainer_device_and_eval_reads_regularly():
    cfg = composed("data.on_device=true", "data.device_augment={pad: 1}", "trainer.device=cpu")
    splits, train, val = build.build_data(cfg)
    assert isinstance(train, DeviceLoader) and isinstance(val, DeviceLoader)
    assert train.device == torch.device("cpu") and (train.pad, train.flip) == (1, False)
    assert train.dataset is splits.train and val.batch_size == 2 * cfg.data.batch_size
    # evaluating a trained model (task=eval) reads the split with the regular loader
    dataset, loader = build.build_eval_data(cfg, splits.classes)
    assert not isinstance(loader, DeviceLoader) and len(dataset) == len(splits.val)


@pytest.mark.slow  # a run.py process (~15 s); build_data's device loader is tested above
def test_run_py_trains_with_the_data_on_the_device(tmp_path):
    run_dir = tmp_path / "run"
    run_py(
        *TINY,
        "data.on_device=true",
        "model=speednet",
        "model.widths=[8,16,16]",
        "model.stem_width=8",
        "trainer.epochs=1",
        "logger=none",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["config"]["data"]["on_device"] is True and ckpt["step"] == 4


# --- the speed recipe ------------------------------------------------------------------------


def test_speedrun_recipe_builds_its_model_and_optimizer():
    cfg = composed("experiment=cifar10_speedrun")
    assert cfg.data.on_device and cfg.data.batch_size == 1024 and cfg.trainer.eval_hflip
    model = build.build_model_for(cfg, num_classes=10, in_chans=3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    optimizer = build.build_optimizer(cfg, model)
    scales = sorted(g["lr_scale"] for g in optimizer.param_groups)
    assert scales == [1.0, 64.0]  # the BatchNorm biases at 64x the LR
    scheduler = build.build_scheduler(cfg, optimizer, steps_per_epoch=48)
    assert scheduler is not None


def test_speednet_loads_a_checkpoint_with_another_class_count(tmp_path):
    source = speednet(10, widths=(8, 16))
    torch.save({"model": source.state_dict()}, tmp_path / "ten.pt")
    model = speednet(3, widths=(8, 16), weights=str(tmp_path / "ten.pt"))
    got, want = model.state_dict(), source.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in got if not k.startswith("head."))
    assert got["head.weight"].shape == (3, 16)
    with pytest.raises(ValueError, match=r"model.pretrained=true: speednet has no hub weights"):
        speednet(3, pretrained=True)
