"""torchrun / DDP plumbing: one process per GPU (or per CPU worker with gloo).

    ctx = init_distributed("auto")       # RANK, WORLD_SIZE, LOCAL_RANK as torchrun sets them
    with main_process_first(ctx): ...    # rank 0 builds shared data; the others wait
    ctx.is_main                          # only rank 0 logs and writes checkpoints
    shutdown(ctx)

Backend: nccl when the device is CUDA, gloo on the CPU. Multi-node works the same way
(`torchrun --nnodes N --node-rank R --rdzv-endpoint HOST:PORT -m tcsmae.cli pretrain ...`):
each rank reads its own shard of the store; negatives are gathered across all ranks
(tcsmae.pretrain.losses.global_nt_xent).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tcsmae.device import resolve_device  # also imported from here by tcsmae.bench


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank in 0..world_size-1, its device, and whether it is rank 0."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_request: str = "auto") -> DistContext:
    """Join the torchrun process group when WORLD_SIZE > 1; otherwise a 1-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_request, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


@contextlib.contextmanager
def main_process_first(ctx: DistContext):
    """Rank 0 runs the block first (one-off work such as building the default data); the
    other ranks wait at a barrier, then run the block themselves (finding the work done)."""
    if not ctx.is_main:
        barrier(ctx)
    yield
    if ctx.is_main:
        barrier(ctx)


def all_reduce_mean(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean over ranks of a tensor (detached copy; for logging only)."""
    values = values.detach().clone()
    if ctx.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= ctx.world_size
    return values


def broadcast_object(obj, ctx: DistContext):
    """Rank 0's value of a picklable object on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
