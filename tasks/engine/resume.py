"""Where a run starts: fresh, or from its newest intact checkpoint (``--resume``), and what it carries on with.

A run is defined by a few settings (:data:`RUN_DEFINING`): ``--resume`` with other values would not continue the
same run, so it is refused naming the key and both values; the rest (workers, log_every, ...) may change.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import ConfigError, config_to_dict, load_config
from common.distributed import DistContext
from common.lock import FolderLock, FolderLocked
from tasks.engine import checkpointing as ckpt

logger = logging.getLogger(__name__)

__all__ = [
    "RUN_DEFINING",
    "Progress",
    "ResumePoint",
    "check_same_run",
    "find_resume_point",
    "hold_run_dir",
    "seed_everything",
]

#: Settings that define a run: ``--resume`` with other values would not continue the same run.
RUN_DEFINING = (
    "task",
    "data.train",
    "data.batch_size",
    "train.seed",
    "train.epochs",
    "optim.name",
    "optim.lr",
    "optim.warmup",
)


@dataclass
class Progress:
    """Where the loop stands: optimizer steps taken, the epoch and the step within it, the best validation score,
    non-finite steps skipped (in all, and in a row)."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_score: float | None = None
    bad_total: int = 0
    bad_in_row: int = 0


@dataclass
class ResumePoint:
    """The checkpoint a run continues from: its folder and its ``trainer_state.pt``."""

    directory: Path
    state: dict[str, Any]

    @property
    def load(self) -> str | None:
        """The ``--load`` the run was started with."""
        return self.state.get("load")

    def progress(self) -> Progress:
        s = self.state
        return Progress(
            s["step"], s["epoch"], s["step_in_epoch"], s.get("best_score"), s.get("bad_steps_total", 0)
        )


def check_same_run(config: Any, saved_path: Path) -> None:
    """Refuse ``--resume`` when a run-defining setting differs from the run's saved ``config.yaml``
    (ConfigError naming the key and both values); other settings (workers, log_every, ...) may change."""
    if not saved_path.exists():
        return
    saved = config_to_dict(load_config(type(config), saved_path))
    given = config_to_dict(config)
    for key in RUN_DEFINING:
        a, b = saved, given
        for part in key.split("."):
            a, b = a[part], b[part]
        if a != b:
            raise ConfigError(
                f"{saved_path}: the run was started with {key}={a!r}; --resume with {key}={b!r} would not continue "
                "the same run (drop that override, or start a new run with another --output)"
            )


def find_resume_point(config: Any, run_dir: Path, resume: bool) -> ResumePoint | None:
    """The checkpoint to continue from with ``resume``; None for a fresh run. A fresh run in a folder that holds
    checkpoints is refused (it would overwrite them)."""
    if not resume:
        if ckpt.list_step_dirs(run_dir / "checkpoints"):
            raise ConfigError(
                f"{run_dir} already holds the checkpoints of a run: add --resume to continue it, or choose another "
                "--output (a new run would overwrite them)"
            )
        return None
    check_same_run(config, run_dir / "config.yaml")
    directory = ckpt.find_resume_checkpoint(run_dir)
    point = ResumePoint(directory, ckpt.load_trainer_state(directory))
    logger.info("resuming from %s (step %d)", directory, point.state["step"])
    return point


def hold_run_dir(run_dir: Path, what: str, dist: DistContext) -> FolderLock | None:
    """Rank 0 takes ``RUN_DIR/.lock`` (:class:`common.lock.FolderLock`; a lock left by a killed run is taken over
    with a warning); every rank raises :class:`common.lock.FolderLocked`, naming the holder, when another run
    holds it. Returns rank 0's lock (None on the other ranks): release it when the run ends."""
    lock, error = None, None
    if dist.is_main:
        lock = FolderLock(run_dir, what)
        try:
            lock.acquire()
        except FolderLocked as e:
            lock, error = None, str(e)
    errors = dist.all_gather(error)
    if errors[0] is not None:
        raise FolderLocked(errors[0])
    return lock


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
