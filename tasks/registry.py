"""The tasks ``lxmert-train`` knows: name -> how to build it. The one task registry of the project."""

from __future__ import annotations

from collections.abc import Callable

from tasks.config import TrainConfig
from tasks.engine.task import Task
from tasks.finetune import gqa, nlvr2, vqa
from tasks.pretrain import task as pretrain

__all__ = ["FINETUNE_TASKS", "TASKS", "build_task"]

#: Task name -> ``build(config, load) -> Task`` (``load``: the starting model folder / checkpoint, or None).
TASKS: dict[str, Callable[[TrainConfig, str | None], Task]] = {
    "pretrain": pretrain.build,
    "vqa": vqa.build,
    "gqa": gqa.build,
    "nlvr2": nlvr2.build,
}
#: The fine-tuning tasks: they predict and score splits (``lxmert-train TASK --eval-only``).
FINETUNE_TASKS = ("vqa", "gqa", "nlvr2")


def build_task(config: TrainConfig, load: str | None = None) -> Task:
    """The task ``config.task``, knowing its starting model ``load`` from the start (its answer table and
    feature record are read from there when the config leaves them empty)."""
    return TASKS[config.task](config, load)
