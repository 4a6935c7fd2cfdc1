"""Data-parallel training under torchrun: the process group, this process's rank, reductions.

`torchrun --nproc_per_node=N run.py ...` starts N copies of run.py with RANK, LOCAL_RANK and
WORLD_SIZE set. run.py's __main__ calls `start()` before Hydra runs; the engine then asks this
module for the rank, wraps the model with `data_parallel`, and reduces metrics over processes.
Everything here is a pass-through in a single process, so the engine keeps one code path.
"""

import os
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# rank 0's start time as <date>/<time>, handed to every rank: hydra.run.dir and hydra.sweep.dir
# in conf/config.yaml read it, so all processes of a run write to one folder
RUN_STAMP = "IMGCLS_RUN_STAMP"

# what ranks other than 0 add to their command line: rank 0 alone writes .hydra/ and the log
# file; the others log warnings and errors to the console only
OTHER_RANKS_HYDRA_OVERRIDES = [
    "hydra.output_subdir=null",
    "hydra.job_logging.root.handlers=[console]",
    "hydra.job_logging.root.level=WARNING",
    "hydra.hydra_logging.root.level=WARNING",
]


def start() -> list[str]:
    """Join torchrun's process group and agree on the run folder; this rank's Hydra overrides.

    NCCL for CUDA tensors where there is a GPU, gloo for CPU tensors (and Python objects).
    Each process uses the GPU of its LOCAL_RANK.
    """
    if torch.cuda.is_available():
        if local_rank() < torch.cuda.device_count():
            torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend)  # env://: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
    stamp = [os.environ.get(RUN_STAMP) or datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")]
    dist.broadcast_object_list(stamp, src=0)
    os.environ[RUN_STAMP] = stamp[0]
    return [] if rank() == 0 else list(OTHER_RANKS_HYDRA_OVERRIDES)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def check_started() -> None:
    """Fail when torchrun started this process but no process group joined it."""
    launched = int(os.environ.get("WORLD_SIZE", 1))
    if launched > 1 and not dist.is_initialized():
        raise RuntimeError(
            f"WORLD_SIZE={launched} but this process is in no process group: run.py joins it "
            "in its __main__ (`torchrun --nproc_per_node=N run.py ...`); a Hydra launcher that "
            "runs jobs in other processes (hydra/launcher=local) cannot run data-parallel jobs"
        )


def local_device(device: torch.device) -> torch.device:
    """`cuda` without an index means this process's GPU (cuda:LOCAL_RANK) under torchrun."""
    if device.type == "cuda" and device.index is None and world_size() > 1:
        return torch.device("cuda", local_rank())
    return device


def data_parallel(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """`model` in DistributedDataParallel when there are several processes, else `model` itself.

    sync_bn: BatchNorm statistics over the global batch (SyncBatchNorm, CUDA only); a single
    process already sees the whole batch, so there it changes nothing.
    """
    if world_size() == 1:
        return model
    if sync_bn:
        if device.type != "cuda":
            raise ValueError(
                f"trainer.sync_bn=true needs CUDA (torch's SyncBatchNorm), but this run is on "
                f"{device}; set trainer.sync_bn=false"
            )
        # the same parameter and buffer tensors in new modules: the optimizer keeps its params
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def unwrap(net: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel: what EMA follows and checkpoints hold."""
    return net.module if isinstance(net, DistributedDataParallel) else net


def grad_sync(net: nn.Module, sync: bool):
    """Context for one forward-backward: DDP all-reduces gradients only when `sync` (the update's
    last micro-batch under gradient accumulation)."""
    if sync or not isinstance(net, DistributedDataParallel):
        return nullcontext()
    return net.no_sync()


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over processes (a new tensor; `tensor` itself in one process)."""
    if world_size() == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total


def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    return sum_over_ranks(tensor) / world_size() if world_size() > 1 else tensor


def max_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum over processes (a flag any process raised); a pass-through alone."""
    if world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every process when `flag` is true on any of them."""
    if world_size() == 1:
        return flag
    return bool(max_over_ranks(torch.tensor(float(flag))).item())  # gloo: CPU tensors


def average_buffers(module: nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over processes.

    Each process updates them from its own batches; averaged, every process evaluates the same
    model, and the checkpoint (rank 0's) holds the model that was evaluated.
    """
    if world_size() == 1:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= world_size()


def from_main(obj):
    """Rank 0's `obj` on every process (a picklable value)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list:
    """Every process's `obj`, in rank order, on every process."""
    if world_size() == 1:
        return [obj]
    found = [None] * world_size()
    dist.all_gather_object(found, obj)
    return found


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


class NullLogger:
    """What ranks other than 0 log with: RunLogger's calls, recording nothing."""

    run_id = None

    def log(self, metrics: dict, step: int) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def log_checkpoint(self, path: Path, name: str, metadata: dict) -> None:
        pass

    def log_evaluation(self, *args, **kwargs) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return False


class NullSaver:
    """What ranks other than 0 save checkpoints with: rank 0 writes them."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def save(self, state: dict, epoch: int, is_best: bool, batches: int | None = None) -> Path:
        from engine.checkpoint import checkpoint_name

        return self.folder / checkpoint_name(epoch, batches)

    @property
    def best(self) -> Path:
        return self.folder / "best.pt"
