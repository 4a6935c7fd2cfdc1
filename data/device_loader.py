"""Small datasets held whole on the training device, cut into batches and augmented there.

For `data.on_device=true` (digits, mnist5k, MNIST, Fashion-MNIST, CIFAR-10/100): each split
lives on the device as one tensor (uint8 where the files are: CIFAR-10's training set is
150 MB), and a batch is gathered, randomly cropped and flipped, and normalised in a few batched
operations. No worker processes, no per-image Python, no host-to-device copies: the data
pipeline stops being the bottleneck of a small fast model (airbench, hlb-CIFAR10 do the same).

`DeviceLoader` is used as the engine uses a DataLoader: iterable of (images, targets), len(),
`batch_size`, `dataset`, and a `generator` that data.loaders.seed_epoch seeds.
"""

from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from data.splits import Splits, TensorData

AUGMENT_KEYS = ("pad", "flip")
ON_DEVICE_DATASETS = "digits, mnist5k, mnist, fashion_mnist, cifar10, cifar100"


def device_loaders(
    splits: Splits,
    batch_size: int,
    device: str | torch.device,
    augment: Mapping | None = None,
    eval_batch_size: int | None = None,
    num_replicas: int = 1,
    rank: int = 0,
) -> tuple["DeviceLoader", "DeviceLoader"]:
    """(train, val) loaders of `splits` held on `device`, as data.loaders.make_loaders' are.

    augment: {pad, flip}, the training augmentation; None or a key left out: the dataset's own
    (CIFAR: pad 4, flip; MNIST: pad 3; Fashion-MNIST: pad 3, flip; digits, mnist5k: none;
    data.dataset.augment=false: none).
    """
    if splits.tensors is None:
        raise ValueError(
            "data.on_device=true holds a dataset as tensors on the device, which only the small "
            f"datasets with their own pipeline can do ({ON_DEVICE_DATASETS}; data.transform=null, "
            f"data.fold=null); this one ({type(splits.train).__name__}) cannot: set "
            "data.on_device=false"
        )
    data = splits.tensors()
    pad, flip = _augmentation(augment, data)
    common = {
        "mean": data.mean,
        "std": data.std,
        "device": device,
        "num_replicas": num_replicas,
        "rank": rank,
    }
    train = DeviceLoader(
        data.train_images,
        data.train_targets,
        batch_size,
        train=True,
        pad=pad,
        flip=flip,
        dataset=splits.train,
        **common,
    )
    val = DeviceLoader(
        data.val_images,
        data.val_targets,
        eval_batch_size or 2 * batch_size,
        train=False,
        dataset=splits.val,
        **common,
    )
    return train, val


def _augmentation(augment: Mapping | None, data: TensorData) -> tuple[int, bool]:
    given = dict(augment or {})
    unknown = sorted(set(given) - set(AUGMENT_KEYS))
    if unknown:
        raise ValueError(
            f"data.device_augment has no key {', '.join(map(repr, unknown))}; its keys are pad "
            "(px of zero padding before a random crop, 0: no crop) and flip (true: random "
            "horizontal flips), e.g. data.device_augment='{pad: 4, flip: true}'"
        )
    pad = data.pad if given.get("pad") is None else given["pad"]
    flip = data.flip if given.get("flip") is None else given["flip"]
    # bool is an int to Python: `pad: true` would silently mean 1 px
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(
            f"data.device_augment.pad={pad!r} must be a whole number of pixels, 0 or more "
            "(0: no random crop)"
        )
    if not isinstance(flip, bool):
        raise ValueError(f"data.device_augment.flip={flip!r} must be true or false")
    return pad, flip


class DeviceLoader:
    """Batches of `images` and `targets` cut, augmented and normalised on `device`.

    images: (N, C, H, W), uint8 on the 0..255 scale or float on the 0..1 scale; each batch is
    scaled to 0..1 and normalised with the per-channel `mean` and `std`, the operations of
    ToTensor + Normalize, so with augmentation off the values are the regular loader's.

    train=True: shuffled, the last partial batch dropped; each image is randomly cropped back
    to H x W after `pad` px of zero padding on every side (0: no crop) and, with `flip`,
    mirrored with probability 1/2 (torchvision's RandomCrop and RandomHorizontalFlip). The
    epoch's order and every crop and flip are drawn from `generator` (on the CPU) when
    iteration starts, so they depend only on its seed (data.loaders.seed_epoch); the order is
    the regular train loader's for the same seed. `skip_batches` = k: the next pass starts at
    batch k of that epoch, with the images and augmentation a full pass has there (mid-epoch
    resume); it is reset to 0 when the pass starts.
    train=False: every image in order, no augmentation.

    Data-parallel, as data.loaders.ShardSampler: process `rank` of `num_replicas` takes every
    num_replicas-th image of the one order (in training, cut first to a multiple of
    num_replicas). Crops and flips are drawn per place in that one order, so the processes
    together see the batches of one process with num_replicas x batch_size.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        batch_size: int,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: str | torch.device = "cpu",
        train: bool = False,
        pad: int = 0,
        flip: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        dataset: Dataset | None = None,
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must be in [0, num_replicas={num_replicas})")
        if images.ndim != 4 or len(images) != len(targets):
            raise ValueError(
                f"images {tuple(images.shape)} and targets {tuple(targets.shape)}: expected "
                "(N, C, H, W) images and N targets"
            )
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(f"mean {mean} and std {std} must have one value per channel")
        device = torch.device(device)
        self.images = images.to(device).contiguous()
        self.targets = targets.to(device, torch.long)
        self.batch_size = batch_size
        self.train, self.pad, self.flip = train, pad, flip
        self.num_replicas, self.rank = num_replicas, rank
        self.dataset = dataset  # the split as the regular loader reads it (engine, analysis)
        self.generator = torch.Generator() if train else None
        self.skip_batches = 0
        self.device = device
        self._scale = 255.0 if images.dtype == torch.uint8 else None
        self._mean = torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)

    def _share(self) -> int:
        """Images this process sees in a pass."""
        total = len(self.targets)
        if self.train:
            return total // self.num_replicas
        return len(range(self.rank, total, self.num_replicas))

    def __len__(self) -> int:
        if self.train:
            return self._share() // self.batch_size
        return -(-self._share() // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start, self.skip_batches = self.skip_batches, 0
        if not self.train:
            order = torch.arange(self.rank, len(self.targets), self.num_replicas)
            return self._batches(order.to(self.device), None, None, start)
        return self._batches(*self._epoch_draws(), start)

    def _epoch_draws(self):
        """This process's order, crop offsets and flips for the epoch, on the device."""
        g, total = self.generator, len(self.targets)
        # DataLoader draws its workers' base seed before the sampler's permutation: drawing it
        # too keeps the order the regular loader's for one seed (a run can switch loaders)
        torch.empty((), dtype=torch.int64).random_(generator=g)
        order = torch.randperm(total, generator=g)
        order = order[: total - total % self.num_replicas]
        # the whole epoch's draws up front, one per place in the order: a pass that skips
        # batches gets the same draws for the batches it keeps
        shifts = torch.randint(0, 2 * self.pad + 1, (len(order), 2), generator=g)
        flips = torch.rand(len(order), generator=g) < 0.5
        mine = slice(self.rank, None, self.num_replicas)
        keep = len(self) * self.batch_size
        order, shifts, flips = (t[mine][:keep].to(self.device) for t in (order, shifts, flips))
        return order, shifts if self.pad else None, flips if self.flip else None

    def _batches(self, order, shifts, flips, start: int):
        size = self.batch_size
        for first in range(start * size, len(order), size):
            rows = slice(first, first + size)
            index = order[rows]
            # index_select: a new tensor, safe to modify in place (and faster than images[index])
            images = self.images.index_select(0, index)
            if shifts is not None or flips is not None:
                images = crop_flip(
                    images,
                    self.pad,
                    None if shifts is None else shifts[rows],
                    None if flips is None else flips[rows],
                )
            yield self._normalise(images), self.targets.index_select(0, index)

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        # ToTensor's float conversion and division, then Normalize's: the same values
        images = images.float()
        if self._scale is not None:
            images = images.div_(self._scale)
        return images.sub_(self._mean).div_(self._std)


def crop_flip(
    images: torch.Tensor, pad: int, shifts: torch.Tensor | None, flips: torch.Tensor | None
) -> torch.Tensor:
    """Per-image random crop and horizontal flip of a batch, in one gather.

    images: (B, C, H, W). shifts: (B, 2) int, each image's window (top, left) in the image
    padded by `pad` zeros on every side, each in 0..2 * pad (None: no crop). flips: (B,) bool,
    mirror the image after the crop (RandomCrop then RandomHorizontalFlip).
    """
    batch, _, height, width = images.shape
    zeros = torch.zeros(batch, dtype=torch.long, device=images.device)
    top, left = (zeros, zeros) if shifts is None else shifts.unbind(1)
    if shifts is not None and pad:
        images = F.pad(images, (pad, pad, pad, pad))
    else:
        pad = 0
    mirrored = zeros
    if flips is None:
        images = images.unsqueeze(1)
    else:
        # the window at (top, left) mirrored is the mirror image's window at (top, 2 pad - left)
        images = torch.stack([images, images.flip(-1)], 1)
        mirrored = flips.long()
        left = torch.where(flips, 2 * pad - left, left)
    # every window of every image as a view: (B, 1 or 2, C, 2 pad + 1, 2 pad + 1, H, W)
    windows = images.unfold(3, height, 1).unfold(4, width, 1)
    rows = torch.arange(batch, device=images.device)
    return windows[rows, mirrored, :, top, left]
