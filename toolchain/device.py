"""Where training runs (`device=auto|cpu|cuda`) and in which precision (`train.precision`).

Mixed precision keeps fp32 master weights and runs the forward under autocast:

- ``bf16``: autocast to bfloat16, no loss scaling (bf16 has fp32's exponent range). Works
  on CPU too, which is how the tests exercise it.
- ``fp16``: autocast to float16 plus a GradScaler (fp16 gradients underflow without it).
  CUDA only: PyTorch's CPU autocast has no fp16 loss-scaling story worth offering.
- ``fp32``: autocast off; the scaler is a pass-through, so the loop is the same code.
"""

from __future__ import annotations

import contextlib

import torch

from .config import DEVICES, PRECISIONS
from .errors import ConfigError

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(setting: str, local_rank: int | None = None) -> torch.device:
    """The torch.device for the config's `device` value.

    auto = CUDA when a GPU is visible, else the CPU. Under torchrun each process on a node
    takes the GPU of its LOCAL_RANK (`local_rank`).
    """
    if setting not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got '{setting}'")
    has_cuda = torch.cuda.is_available()
    if setting == "cuda" and not has_cuda:
        raise ConfigError("device=cuda but no CUDA GPU is visible to PyTorch; use device=cpu or device=auto")
    if setting == "cpu" or not has_cuda:
        return torch.device("cpu")
    index = local_rank or 0
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"LOCAL_RANK={index} needs GPU {index}, but only {count} GPU(s) are visible; "
                          f"start at most {count} processes per node")
    return torch.device("cuda", index)


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.precision=fp16 needs a CUDA device (loss scaling), but training runs on "
                          f"{device.type}; use train.precision=bf16 or fp32")


def autocast(precision: str, device: torch.device):
    """The forward pass's autocast context (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler for fp16; disabled (scale/step/update pass straight through) otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def batch_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a freshly gathered CPU batch to `device` without blocking the host.

    Pinned memory makes the copy truly asynchronous (the GPU pulls it while the host
    prepares the next step); the pinned block returns to PyTorch's caching host allocator,
    which keeps it alive until the copy has finished.
    """
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
