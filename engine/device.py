"""Where training runs and in which number format: the device, precision and autocast helpers."""

from contextlib import nullcontext

import torch

from engine import distributed

# trainer.precision -> the autocast dtype (None: no autocast); fp16 also needs a grad scaler
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto`: CUDA, else MPS, else the CPU. Under torchrun, `cuda` is this process's GPU."""
    if str(device) != "auto":
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"trainer.device={str(device)!r} but CUDA is not available; use auto or cpu"
            )
        return distributed.local_device(device)
    if torch.cuda.is_available():
        return distributed.local_device(torch.device("cuda"))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def amp_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of trainer.precision; a ValueError names the choices."""
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision={precision!r}; choose one of {list(PRECISIONS)}")
    return PRECISIONS[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for `dtype`, or a no-op context for fp32: one code path for all three."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def memory_format(channels_last: bool) -> torch.memory_format:
    """The memory format batches are moved in (NHWC with channels_last)."""
    return torch.channels_last if channels_last else torch.contiguous_format
