"""The distributed context a worker runs in; passed in, never looked up globally."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def from_environment() -> DistContext:
    """Context of a worker whose process group is already up (Ray Train, torchrun)."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised in this worker")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, _device(local_rank))


def init_in_process() -> DistContext:
    """World size 1 in this process (debugging, GPU machines without Ray)."""
    if not dist.is_initialized():
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1"
        )
        os.environ.setdefault("LOCAL_RANK", "0")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, rank=0, world_size=1)
    return from_environment()
