"""The training engine: the loop, checkpoints and resume, the optimizer, precision, batching and the run log.
It knows no task: a task is anything that fulfils :class:`tasks.engine.task.Task`."""

from tasks.engine.batching import GlobalBatchSampler, micro_batching, to_device
from tasks.engine.precision import resolve_amp
from tasks.engine.task import StepOutput, Task
from tasks.engine.trainer import TrainingStopped, train

__all__ = [
    "GlobalBatchSampler",
    "StepOutput",
    "Task",
    "TrainingStopped",
    "micro_batching",
    "resolve_amp",
    "to_device",
    "train",
]
