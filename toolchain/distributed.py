"""Multi-GPU / multi-node training under torchrun (PyTorch DDP).

torchrun starts one process per GPU and tells each who it is through the environment:
RANK (0..WORLD_SIZE-1 over all nodes), WORLD_SIZE, LOCAL_RANK (the GPU index on its
node), and MASTER_ADDR / MASTER_PORT for the rendezvous. `setup()` reads them, picks the
process's device and joins the process group (nccl on CUDA, gloo on CPU).

Without torchrun, `setup()` returns a single-process context and every helper here is a
no-op, so the training code has one path for 1 and N processes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from .device import resolve_device
from .errors import UserError


@dataclass(frozen=True)
class DistContext:
    """Who this process is. The default is a single process on the CPU."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes artifacts and logs."""
        return self.rank == 0


def torchrun_env(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables; (0, 1, 0) without them."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return 0, 1, 0
    try:
        world_size = int(environ["WORLD_SIZE"])
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (launch with torchrun)") from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise UserError(f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world_size} "
                        f"LOCAL_RANK={local_rank}")
    if world_size > 1 and not (environ.get("MASTER_ADDR") and environ.get("MASTER_PORT")):
        raise UserError(f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set; launch with torchrun")
    return rank, world_size, local_rank


def setup(device_setting: str = "auto", environ: Mapping[str, str] | None = None) -> DistContext:
    """This process's context; joins the process group when started by torchrun."""
    rank, world_size, local_rank = torchrun_env(environ)
    if world_size == 1:
        return DistContext(device=resolve_device(device_setting))
    device = resolve_device(device_setting, local_rank)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # nccl and broadcast_object_list use the current device
            dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device)
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank, device)


def teardown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def broadcast_object(ctx: DistContext, obj, src: int = 0):
    """`obj` from rank `src` on every rank (pickled: metadata, small states)."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensor(ctx: DistContext, tensor: torch.Tensor | None, src: int = 0) -> torch.Tensor:
    """Rank `src`'s tensor on every rank (others pass None), on the device type it has on
    `src` (a CPU tensor stays a CPU tensor; nccl carries it through this rank's GPU)."""
    if not ctx.enabled:
        return tensor
    meta = (tuple(tensor.shape), tensor.dtype, tensor.device.type) if ctx.rank == src else None
    shape, dtype, device_type = broadcast_object(ctx, meta, src)
    wire = ctx.device  # nccl moves CUDA tensors only; gloo moves CPU tensors
    buffer = tensor.to(wire) if ctx.rank == src else torch.empty(shape, dtype=dtype, device=wire)
    dist.broadcast(buffer, src=src)
    if ctx.rank == src:
        return tensor
    return buffer.cpu() if device_type == "cpu" else buffer


def all_reduce_sum(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` (on ctx.device) over all ranks, in place; returned for chaining."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sync_buffers(ctx: DistContext, module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP syncs gradients, not buffers after the last step of an epoch: without this each
    rank would evaluate (and rank 0 checkpoint) slightly different running statistics.
    """
    if ctx.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def compute_once(ctx: DistContext, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Rank 0 runs `compute()` (teacher features, say); every rank gets its result.

    Broadcast rather than a shared cache file, so it works on nodes without a shared
    filesystem, and the other ranks never load the teacher or race on the cache.
    """
    return broadcast_tensor(ctx, compute() if ctx.is_main else None)


@contextlib.contextmanager
def main_process_first(ctx: DistContext) -> Iterator[None]:
    """Rank 0 runs the body first, the others after it (e.g. rank 0 fills a cache on a
    shared filesystem, then the others read it instead of recomputing)."""
    if not ctx.is_main:
        barrier(ctx)
    try:
        yield
    finally:
        if ctx.is_main:
            barrier(ctx)
