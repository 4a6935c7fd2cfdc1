"""DataLoaders for a `Splits`, with a per-epoch seed so a resumed run sees the same batches."""

import random
from collections.abc import Mapping
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler, SequentialSampler

from data.balance import SAMPLERS, balanced_sampler
from data.device_loader import DeviceLoader, device_loaders
from data.splits import Splits


def make_loaders(
    splits: Splits,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    eval_batch_size: int | None = None,
    num_replicas: int = 1,
    rank: int = 0,
    on_device: bool = False,
    device_augment: Mapping | None = None,
    device: str | torch.device = "cpu",
    sampler: str = "random",
    train_labels: torch.Tensor | None = None,
) -> tuple[DataLoader | DeviceLoader, DataLoader | DeviceLoader]:
    """Train loader (shuffled, last partial batch dropped) and val loader (in order).

    The train loader shuffles with its own generator; call `seed_epoch(loader, seed, epoch)`
    before each epoch so the order depends only on (seed, epoch), not on what ran before.

    Data-parallel (`num_replicas` processes, this one `rank`): batch_size is per process. Each
    process takes every num_replicas-th image of the one shuffled order, so the processes'
    batches together are the batch one process would draw with num_replicas x batch_size; the
    val images are split among the processes, each exactly once.

    on_device: the small datasets (digits, MNIST, CIFAR, ...) held whole on `device` (the
    training device), batches cut, augmented and normalised there (data/device_loader.py);
    num_workers and pin_memory do not apply. device_augment: its training augmentation,
    {pad, flip}; None or a key left out: the dataset's own.

    sampler: `random` (each image once per epoch) or `balanced` (class-balanced draws with
    replacement, data/balance.py; needs `train_labels`, the training split's labels). The
    processes share one draw and resume mid-epoch as with `random`.
    """
    if batch_size < 1:
        raise ValueError(f"data.batch_size={batch_size} must be a positive integer")
    if len(splits.train) < batch_size * num_replicas:
        raise ValueError(
            f"data.batch_size={batch_size} x {num_replicas} processes is larger than the "
            f"training set ({len(splits.train)} images); lower data.batch_size"
        )
    _check_sampler(sampler, train_labels, on_device)
    if on_device:
        shard = {"num_replicas": num_replicas, "rank": rank}
        return device_loaders(splits, batch_size, device, device_augment, eval_batch_size, **shard)
    if device_augment is not None:
        raise ValueError(
            f"data.device_augment={dict(device_augment)} is the augmentation of "
            "data.on_device=true; turn that on, or set data.device_augment=null"
        )
    draw = (sampler, train_labels, len(splits.classes))
    train = _train_loader(
        splits.train, batch_size, num_workers, pin_memory, num_replicas, rank, draw
    )
    val = eval_loader(
        splits.val, batch_size, num_workers, pin_memory, eval_batch_size, num_replicas, rank
    )
    return train, val


def _check_sampler(sampler: str, train_labels, on_device: bool) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"data.sampler={sampler!r} must be one of {', '.join(SAMPLERS)}")
    if sampler == "balanced" and on_device:
        raise ValueError(
            "data.sampler=balanced draws through the regular loader; set data.on_device=false "
            "or data.sampler=random"
        )
    if sampler == "balanced" and train_labels is None:
        raise ValueError(
            "data.sampler=balanced needs the training split's labels (a dataset with a "
            "`targets` attribute); use data.sampler=random or loss.class_weight instead"
        )


def _train_loader(
    dataset,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    num_replicas: int,
    rank: int,
    draw: tuple = ("random", None, 0),
) -> DataLoader:
    """Shuffled by its own generator (`seed_epoch`), last partial batch dropped, this rank's
    share of the one order when data-parallel. `draw`: (data.sampler, train labels, classes)."""
    common = _worker_kwargs(num_workers, pin_memory)
    generator = torch.Generator()
    kind, labels, num_classes = draw
    if kind == "balanced":
        sampler = balanced_sampler(labels, num_classes, generator)
    else:
        sampler = RandomSampler(dataset, generator=generator)
    if num_replicas > 1:
        sampler = ShardSampler(sampler, num_replicas, rank, drop_last=True)
        if rank > 0:
            # workers are seeded from the shared generator: give this process's workers their own
            # random augmentations
            common["worker_init_fn"] = partial(_seed_worker, rank)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=SkipSampler(sampler),  # a mid-epoch resume starts its first pass further on
        drop_last=True,
        generator=generator,
        **common,
    )


def eval_loader(
    dataset,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    eval_batch_size: int | None = None,
    num_replicas: int = 1,
    rank: int = 0,
) -> DataLoader:
    """The dataset in order, in batches of eval_batch_size (default 2 x batch_size); with
    `num_replicas` processes, this `rank`'s share of it."""
    batch = eval_batch_size or 2 * batch_size
    sampler = SequentialSampler(dataset)
    if num_replicas > 1:
        sampler = ShardSampler(sampler, num_replicas, rank, drop_last=False)
    return DataLoader(
        dataset, batch_size=batch, sampler=sampler, **_worker_kwargs(num_workers, pin_memory)
    )


class ShardSampler(Sampler[int]):
    """Process `rank`'s share of `sampler`'s order: every `num_replicas`-th index from `rank` on.

    drop_last: the order is cut to a multiple of num_replicas first, so every process gets as
    many indices (and makes as many updates); else every index is in exactly one share.
    Unlike torch's DistributedSampler it pads nothing (exact validation metrics) and shuffles
    with the wrapped sampler's generator (the per-epoch seeding of `seed_epoch`).
    """

    def __init__(self, sampler: Sampler, num_replicas: int, rank: int, drop_last: bool):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must be in [0, num_replicas={num_replicas})")
        self.sampler, self.num_replicas, self.rank = sampler, num_replicas, rank
        self.drop_last = drop_last

    def __iter__(self):
        indices = list(self.sampler)
        if self.drop_last:
            indices = indices[: len(indices) - len(indices) % self.num_replicas]
        return iter(indices[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        total = len(self.sampler)
        if self.drop_last:
            return total // self.num_replicas
        return len(range(self.rank, total, self.num_replicas))


class SkipSampler(Sampler[int]):
    """`sampler`'s order, its next pass starting `skip` indices in (then back to 0).

    The order is drawn in full (the generator advances as in a pass from the start), so the
    rest is exactly what a whole pass would have given from there.
    """

    def __init__(self, sampler: Sampler):
        self.sampler, self.skip = sampler, 0

    def __iter__(self):
        start, self.skip = self.skip, 0
        return iter(list(self.sampler)[start:])

    def __len__(self) -> int:
        return len(self.sampler)


def skip_batches(loader, count: int) -> None:
    """Make `loader`'s next pass start at batch `count` of its epoch (a mid-epoch resume).

    Call after `seed_epoch`, which disarms a skip that no pass used: a skip belongs to one
    epoch and never reaches the next one's pass. The skipped batches are not read. Exact for
    num_workers=0 and data.on_device: with workers, each batch's augmentation draws depend on
    which worker reads it, and the workers' shares start over.
    """
    if isinstance(loader, DeviceLoader):
        loader.skip_batches = count
    elif isinstance(getattr(loader, "sampler", None), SkipSampler):
        loader.sampler.skip = count * loader.batch_size
    elif count:
        raise ValueError(
            f"{type(loader).__name__} cannot start mid-epoch; resume from an end-of-epoch "
            "checkpoint (epoch_NNNN.pt)"
        )


def _seed_worker(rank: int, worker_id: int) -> None:
    # torch seeds worker i with base + i, the base drawn from the loader's generator
    seed = torch.initial_seed() + rank * 1_000_003
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _worker_kwargs(num_workers: int, pin_memory: bool) -> dict:
    return {
        "num_workers": num_workers,
        "pin_memory": pin_memory,
        "persistent_workers": num_workers > 0,
    }


def seed_epoch(loader: DataLoader | DeviceLoader, seed: int, epoch: int) -> None:
    """Fix the shuffle order and worker seeds (a DeviceLoader: crops and flips) of `epoch`, its
    pass starting at the first batch.

    A resume into an epoch whose batches were all done (a stop during validation) skips them
    all and never starts that pass: the skip must not carry over to this one.
    """
    loader.generator.manual_seed(seed * 100_003 + epoch)
    skip_batches(loader, 0)
