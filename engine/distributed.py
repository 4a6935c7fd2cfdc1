"""Data-parallel training under torchrun: the process group, this process's rank, reductions.

Two ways to start the processes, one engine:
- `torchrun --nproc_per_node=N run.py ...` starts N copies of run.py with RANK, LOCAL_RANK and
  WORLD_SIZE set; run.py's __main__ calls `start()` before Hydra runs, so that all of them agree
  on the run folder.
- a submitit job of several tasks (hydra/launcher=slurm or slurm_local with
  tasks_per_node x nodes > 1): every task runs the same Hydra job, in the folder the launcher
  chose; run.py's task function calls `join_job()` first, which forms the job's own process group
  from submitit's environment. Each job of a multirun so gets its own group of processes.
The engine then asks this module for the rank, wraps the model with `data_parallel`, and reduces
metrics over processes. Everything here is a pass-through in a single process, so the engine
keeps one code path.
"""

import logging
import os
from contextlib import nullcontext
from datetime import datetime

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# what the processes other than rank 0 log and save with; they live beside the real ones
from engine.checkpoint import NullSaver  # noqa: F401
from engine.logger import NullLogger  # noqa: F401

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


def _join_group() -> None:
    """init_process_group from the environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE).

    NCCL for CUDA tensors where there is a GPU, gloo for CPU tensors (and Python objects).
    Each process uses the GPU of its LOCAL_RANK.
    """
    if torch.cuda.is_available():
        torch.cuda.set_device(gpu_index())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend)


def start() -> list[str]:
    """Join torchrun's process group and agree on the run folder; this rank's Hydra overrides."""
    _join_group()
    stamp = [os.environ.get(RUN_STAMP) or datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")]
    dist.broadcast_object_list(stamp, src=0)
    os.environ[RUN_STAMP] = stamp[0]
    return [] if rank() == 0 else list(OTHER_RANKS_HYDRA_OVERRIDES)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def join_job() -> bool:
    """In a submitit job of several tasks, join its process group; True when this call did.

    submitit sets each task's rank, the job's hosts and id (SLURM's or the local controller's);
    its TorchDistributedEnvironment turns them into torch's env:// variables, the port derived
    from the job id (MASTER_PORT, where set, wins). Hydra has already set up this task's logging:
    ranks other than 0 keep warnings and errors on the console and write no run.log, as under
    torchrun. Outside such a job (or when torchrun already started the group): nothing.
    """
    if not os.environ.get("SUBMITIT_EXECUTOR") or dist.is_initialized():
        return False
    import submitit

    if submitit.JobEnvironment().num_tasks == 1:
        return False
    submitit.helpers.TorchDistributedEnvironment().export(
        set_cuda_visible_devices=False,
        overwrite=True,  # LOCAL_RANK picks the GPU (gpu_index)
    )
    _join_group()
    if rank() != 0:
        root = logging.getLogger()
        for handler in list(root.handlers):
            if isinstance(handler, logging.FileHandler):  # run.log: rank 0's
                root.removeHandler(handler)
                handler.close()
        root.setLevel(logging.WARNING)
    return True


def require_one_process(task: str) -> None:
    """Fail when several processes were started for a task that runs in one."""
    launched = int(os.environ.get("WORLD_SIZE", 1))
    if launched > 1 or world_size() > 1:
        raise RuntimeError(
            f"task={task} runs in one process, but {max(launched, world_size())} were started "
            f"(torchrun, or a launcher's tasks_per_node): start it with `python run.py "
            f"task={task} ...`; task=train and task=eval are the ones that run data-parallel"
        )


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
            "in its __main__ (`torchrun --nproc_per_node=N run.py ...`) and the tasks of a "
            "submitit job join theirs; the joblib launcher (hydra/launcher=local) runs jobs "
            "outside any group: for data-parallel jobs side by side use hydra/launcher="
            "slurm_local hydra.launcher.tasks_per_node=N"
        )


def gpu_index() -> int:
    """This process's GPU: its LOCAL_RANK among the visible ones (a scheduler that gives each
    task only its own GPU makes that GPU 0)."""
    return local_rank() % max(torch.cuda.device_count(), 1)


def local_device(device: torch.device) -> torch.device:
    """`cuda` without an index means this process's GPU (`gpu_index`) when data-parallel."""
    if device.type == "cuda" and device.index is None and world_size() > 1:
        return torch.device("cuda", gpu_index())
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


def gather_to_main(obj) -> list | None:
    """Every process's `obj`, in rank order, on process 0; None on the others."""
    if world_size() == 1:
        return [obj]
    found = [None] * world_size() if is_main() else None
    dist.gather_object(obj, found, dst=0)
    return found


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
