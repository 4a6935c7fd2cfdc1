"""DataLoaders for a `Splits`, with a per-epoch seed so a resumed run sees the same batches."""

import torch
from torch.utils.data import DataLoader

from data.splits import Splits


def make_loaders(
    splits: Splits,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    eval_batch_size: int | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Train loader (shuffled, last partial batch dropped) and val loader (in order).

    The train loader shuffles with its own generator; call `seed_epoch(loader, seed, epoch)`
    before each epoch so the order depends only on (seed, epoch), not on what ran before.
    """
    if batch_size < 1:
        raise ValueError(f"data.batch_size={batch_size} must be a positive integer")
    if len(splits.train) < batch_size:
        raise ValueError(
            f"data.batch_size={batch_size} is larger than the training set "
            f"({len(splits.train)} images); lower data.batch_size"
        )
    common = _worker_kwargs(num_workers, pin_memory)
    train = DataLoader(
        splits.train,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator(),
        **common,
    )
    val = eval_loader(splits.val, batch_size, num_workers, pin_memory, eval_batch_size)
    return train, val


def eval_loader(
    dataset,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    eval_batch_size: int | None = None,
) -> DataLoader:
    """The dataset in order, in batches of eval_batch_size (default 2 x batch_size)."""
    batch = eval_batch_size or 2 * batch_size
    return DataLoader(dataset, batch_size=batch, **_worker_kwargs(num_workers, pin_memory))


def _worker_kwargs(num_workers: int, pin_memory: bool) -> dict:
    return {
        "num_workers": num_workers,
        "pin_memory": pin_memory,
        "persistent_workers": num_workers > 0,
    }


def seed_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Fix the shuffle order and worker seeds of `epoch`."""
    loader.generator.manual_seed(seed * 100_003 + epoch)
