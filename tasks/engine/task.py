"""What the engine needs from a task (pretrain, vqa, gqa, nlvr2): the contract between them.

The engine (:mod:`tasks.engine`) owns everything generic: processes, devices, precision, the optimizer and
schedule, the loop, checkpoints and resume, logs. A task owns its data, its model (whose forward computes the
losses) and its metric. ``train(config, task, run_dir)`` runs any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset


@dataclass
class StepOutput:
    """One forward's result: ``loss`` (scalar, what is back-propagated) and its parts (for the logs)."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. {"mlm": ..., "qa": ...}, detached ok


class Task(Protocol):
    """A training task, built from the resolved :class:`tasks.config.TrainConfig`.

    Optional: ``dropped_items`` (``{split: count}``), items left out because an image is in no store
    (``data.allow_missing_images``); the engine copies it into the run summary.
    """

    name: str

    def build_model(self, load: str | None) -> nn.Module:
        """The network for this task, from ``load`` (any checkpoint ``model.from_pretrained`` reads) or
        from scratch (``config.model``); reports what was loaded / initialised through logging."""
        ...

    def train_dataset(self) -> Dataset:
        """The training items: a map-style dataset whose random draws (masks, negatives) depend on
        ``(seed, epoch, index)`` only, with ``set_epoch(epoch)``, which the engine calls before building each
        epoch's loader (so workers copy the right epoch)."""
        ...

    def valid_dataset(self) -> Dataset | None:
        """The validation items (fixed draws: same masks / negatives every time), or None."""
        ...

    def collate(self, items: list[Any]) -> dict[str, Any]:
        """A batch: tensors (moved to the device by the engine) and any non-tensor metadata (ids)."""
        ...

    def step(self, model: nn.Module, batch: dict[str, Any], epoch: int) -> StepOutput:
        """Forward + loss on one (micro) batch, already on the device, under the engine's autocast."""
        ...

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        """Validation metrics over the whole ``loader`` (``loss``, ``loss_<part>``, the task metric); the
        key ``score`` (higher is better) selects ``RUN_DIR/best/``. Called on rank 0 only, with the bare
        (unwrapped) model in eval mode."""
        ...

    # Optional: ``check_resume(checkpoint: Path) -> None``, called before a run continues from ``checkpoint``; raises
    # ``common.config.ConfigError`` when the task's data does not fit the run (e.g. features of another extractor).

    def checkpoint_extras(self) -> dict[str, Any]:
        """JSON-serialisable files saved beside every model (e.g. ``{"label2ans.json": [...],
        "extractor.json": {...}}``)."""
        ...
