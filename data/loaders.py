"""DataLoaders for a `Splits`, with a per-epoch seed so a resumed run sees the same batches."""

import random
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler, SequentialSampler

from data.splits import Splits


def make_loaders(
    splits: Splits,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    eval_batch_size: int | None = None,
    num_replicas: int = 1,
    rank: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """Train loader (shuffled, last partial batch dropped) and val loader (in order).

    The train loader shuffles with its own generator; call `seed_epoch(loader, seed, epoch)`
    before each epoch so the order depends only on (seed, epoch), not on what ran before.

    Data-parallel (`num_replicas` processes, this one `rank`): batch_size is per process. Each
    process takes every num_replicas-th image of the one shuffled order, so the processes'
    batches together are the batch one process would draw with num_replicas x batch_size; the
    val images are split among the processes, each exactly once.
    """
    if batch_size < 1:
        raise ValueError(f"data.batch_size={batch_size} must be a positive integer")
    if len(splits.train) < batch_size * num_replicas:
        raise ValueError(
            f"data.batch_size={batch_size} x {num_replicas} processes is larger than the "
            f"training set ({len(splits.train)} images); lower data.batch_size"
        )
    common = _worker_kwargs(num_workers, pin_memory)
    generator = torch.Generator()
    sampler = RandomSampler(splits.train, generator=generator)
    if num_replicas > 1:
        sampler = ShardSampler(sampler, num_replicas, rank, drop_last=True)
        if rank > 0:
            # workers are seeded from the shared generator: give this process's workers their own
            # random augmentations
            common["worker_init_fn"] = partial(_seed_worker, rank)
    train = DataLoader(
        splits.train,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        generator=generator,
        **common,
    )
    val = eval_loader(
        splits.val, batch_size, num_workers, pin_memory, eval_batch_size, num_replicas, rank
    )
    return train, val


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


def seed_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Fix the shuffle order and worker seeds of `epoch`."""
    loader.generator.manual_seed(seed * 100_003 + epoch)
