"""What runs beside the loop: validation with ``RUN_DIR/best``, and checkpoints (Detectron2's hooks, in small).

Each hook's :meth:`Hook.after_step` sees the :class:`TrainLoop` after every optimizer step; the loop calls them in
order (validation first, so a checkpoint written at the same step carries the new best score).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.distributed import DistContext
from tasks.config import TrainConfig
from tasks.engine import checkpointing as ckpt
from tasks.engine.resume import Progress
from tasks.engine.runlog import RunLog
from tasks.engine.task import Task

logger = logging.getLogger(__name__)

__all__ = ["CheckpointHook", "EvalHook", "Hook", "TrainLoop", "validate"]


@dataclass
class TrainLoop:
    """One run's parts and position: what the hooks see."""

    config: TrainConfig
    task: Task
    run_dir: Path
    model: nn.Module  # the bare model (what is saved and validated)
    net: nn.Module  # what is trained: the model, or DistributedDataParallel around it
    optimizer: torch.optim.Optimizer
    schedule: Any
    scaler: torch.amp.GradScaler
    dist: DistContext
    device: torch.device
    autocast: Any
    log: RunLog
    progress: Progress
    steps_per_epoch: int
    stop_at: int  # the step the run stops at (the last one, or --max-steps)
    load: str | None
    loader_kwargs: dict[str, Any]
    valid_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def end_of_epoch(self) -> bool:
        return self.progress.step_in_epoch == self.steps_per_epoch


class Hook:
    def after_step(self, loop: TrainLoop) -> None:
        """Called after every optimizer step (skipped ones included)."""


def validate(loop: TrainLoop, valid_set: Dataset) -> dict[str, float]:
    """``task.evaluate`` on rank 0 with the bare model in eval mode; the other ranks wait."""
    metrics: dict[str, float] = {}
    if loop.dist.is_main:
        loader = DataLoader(
            valid_set,
            batch_size=loop.config.data.eval_batch_size,
            shuffle=False,
            generator=torch.Generator().manual_seed(0),
            **loop.loader_kwargs,
        )
        loop.model.eval()
        with torch.no_grad(), loop.autocast:
            metrics = dict(loop.task.evaluate(loop.model, loader, loop.device))
    loop.dist.barrier()
    return metrics


class EvalHook(Hook):
    """Validation at each epoch end (``train.eval_every_epoch``); ``RUN_DIR/best`` when ``score`` improves."""

    def __init__(self, valid_set: Dataset | None) -> None:
        self.valid_set = valid_set

    def after_step(self, loop: TrainLoop) -> None:
        if not loop.end_of_epoch or self.valid_set is None or not loop.config.train.eval_every_epoch:
            return
        p = loop.progress
        loop.valid_metrics = validate(loop, self.valid_set)
        score = loop.valid_metrics.get("score")
        if loop.dist.is_main:
            loop.log.valid(p.step, p.epoch + 1, loop.schedule.get_last_lr()[0], loop.valid_metrics)
            if score is not None and (p.best_score is None or score > p.best_score):
                p.best_score = float(score)
                ckpt.save_model_dir(loop.run_dir / "best", loop.model, loop.task.checkpoint_extras())
                logger.info(
                    "best score %.4f at epoch %d: %s", p.best_score, p.epoch + 1, loop.run_dir / "best"
                )
        loop.net.train()


class CheckpointHook(Hook):
    """A checkpoint at each epoch end, every ``train.save_every`` steps, and at the step the run stops."""

    def after_step(self, loop: TrainLoop) -> None:
        p, every = loop.progress, loop.config.train.save_every
        if loop.end_of_epoch:
            save_checkpoint(loop, p.epoch + 1, 0)
        elif p.step == loop.stop_at or (every > 0 and p.step % every == 0):
            save_checkpoint(loop, p.epoch, p.step_in_epoch)


def save_checkpoint(loop: TrainLoop, epoch: int, step_in_epoch: int) -> None:
    """``RUN_DIR/checkpoints/step_N`` resuming at (``epoch``, ``step_in_epoch``): every rank's RNG state is
    gathered, rank 0 writes."""
    rng = loop.dist.all_gather(ckpt.get_rng_state())
    if not loop.dist.is_main:
        return
    p = loop.progress
    trainer_state = {
        "step": p.step,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "optimizer": loop.optimizer.state_dict(),
        "schedule": loop.schedule.state_dict(),
        "scaler": loop.scaler.state_dict() if loop.scaler.is_enabled() else {},
        "rng": rng,
        "best_score": p.best_score,
        "bad_steps_total": p.bad_total,
        "world_size": loop.dist.world_size,
        "load": loop.load,
    }
    extras = loop.task.checkpoint_extras()
    path = ckpt.save_checkpoint(
        loop.run_dir, p.step, loop.model, trainer_state, extras, loop.config.train.keep
    )
    logger.info("checkpoint %s", path)
