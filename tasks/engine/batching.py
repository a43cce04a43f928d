"""How the engine cuts the data into steps: the global batch, micro batches, each epoch's order.

Each epoch's order is a permutation seeded by ``(seed, epoch)``; global step ``s`` takes the items
``order[s*B:(s+1)*B]`` (``B = data.batch_size``, drop-last), cut into ``world_size x accumulation`` micro
batches, rank ``r`` running micro batches ``a*world_size + r`` one after the other (gradients accumulated, DDP
synchronising on the last). So the global batch, and the items in each step, do not depend on the number of
processes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from common.config import ConfigError
from tasks.config import TrainLoopConfig

__all__ = ["GlobalBatchSampler", "epoch_order", "micro_batching", "to_device"]


def micro_batching(global_batch: int, world_size: int, tc: TrainLoopConfig) -> tuple[int, int]:
    """(micro batch per process per forward, accumulation steps) with world x accumulation x micro = global."""
    where = f"data.batch_size={global_batch} over {world_size} process(es)"
    if global_batch < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {global_batch}")
    if tc.grad_accumulation < 0 or tc.micro_batch_size < 0:
        raise ConfigError("train.grad_accumulation and train.micro_batch_size must be >= 0 (0 = automatic)")
    if tc.micro_batch_size > 0:
        micro = tc.micro_batch_size
        accum, rest = divmod(global_batch, world_size * micro)
        if rest or accum == 0 or (tc.grad_accumulation and tc.grad_accumulation != accum):
            raise ConfigError(
                f"{where}: train.micro_batch_size={micro}"
                + (f" with train.grad_accumulation={tc.grad_accumulation}" if tc.grad_accumulation else "")
                + " does not divide it evenly (need processes x accumulation x micro batch = data.batch_size)"
            )
        return micro, accum
    accum = tc.grad_accumulation or 1
    micro, rest = divmod(global_batch, world_size * accum)
    if rest or micro == 0:
        raise ConfigError(
            f"{where}: not divisible by processes x train.grad_accumulation={accum}; choose a batch size that "
            "is a multiple of it, or set train.micro_batch_size"
        )
    return micro, accum


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of ``range(n)``; a function of ``(seed, epoch)`` only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class GlobalBatchSampler(Sampler[int]):
    """This rank's item indices for one epoch, from global step ``start_step`` on (see the module doc).

    Yields ``steps x accum x micro`` indices: for each global step, micro batches ``a*world + rank`` of the
    step's ``global_batch`` items, ``a = 0..accum-1``. Feed it to a DataLoader with ``batch_size=micro``.
    """

    def __init__(
        self,
        n: int,
        global_batch: int,
        micro: int,
        accum: int,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        start_step: int = 0,
    ) -> None:
        assert micro * accum * world_size == global_batch
        self.n, self.global_batch, self.micro, self.accum = n, global_batch, micro, accum
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.start_step = start_step
        self.steps = n // global_batch

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.accum * self.micro

    def __iter__(self):
        order = epoch_order(self.n, self.seed, self.epoch)
        for s in range(self.start_step, self.steps):
            base = s * self.global_batch
            for a in range(self.accum):
                first = base + (a * self.world_size + self.rank) * self.micro
                yield from order[first : first + self.micro].tolist()


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Tensors in nested dicts / lists / tuples moved to ``device``; everything else as is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    return batch
