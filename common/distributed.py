"""Device and distributed context of one process (torchrun-aware), shared by extraction and training.

One process = one rank. Under ``torchrun`` the ranks meet through ``torch.distributed`` (gloo on CPU,
nccl on CUDA); without it ``DistContext()`` is a plain single process and no process group exists.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DeviceError", "DistContext", "resolve_device"]


class DeviceError(RuntimeError):
    """The requested device cannot be used on this machine."""


@dataclass
class DistContext:
    """Rank / world of this process. ``world_size == 1``: a plain single process, no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str) -> DistContext:
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; init the process group (gloo on CPU, nccl on CUDA)
        only when WORLD_SIZE > 1 and no group exists yet."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if world <= 1:
            return cls()
        owns = False
        if not dist.is_initialized():
            if device_type == "cuda":
                torch.cuda.set_device(local)
            # long timeout: ranks meet only at the start and the end, and shards can take hours apart on resume
            dist.init_process_group(
                backend="nccl" if device_type == "cuda" else "gloo", timeout=datetime.timedelta(days=7)
            )
            owns = True
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, owns_group=owns)

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (just ``[obj]`` for one process)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            self.all_gather(None)

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()
            self.owns_group = False


def resolve_device(device: str | None, dist_ctx: DistContext | None = None) -> torch.device:
    """``None`` -> CUDA when available, else CPU; under torchrun CUDA means ``cuda:LOCAL_RANK``."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda was asked for but CUDA is not available; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", dist_ctx.local_rank if dist_ctx is not None else 0)
    return dev
