"""The writer thread: records go into the :class:`~extract.store.FeatureWriter` off the main thread."""

from __future__ import annotations

import queue
import threading
from typing import Any

from common.diskspace import DiskFullError
from extract.outcome import Failure
from extract.store import FeatureWriter, StoreError, StoreSettingsMismatch

__all__ = ["StoreWriterThread"]

_STOP = object()


class StoreWriterThread(threading.Thread):
    """Puts records into the FeatureWriter off the main thread, through a bounded queue.

    Commits whenever the queue runs empty (the device is busy with the next batch), so committed records trail
    the device by about one batch; a record the store refuses becomes a failure.
    """

    def __init__(self, writer: FeatureWriter, max_queue: int) -> None:
        super().__init__(name="feature-store-writer", daemon=True)
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, max_queue))
        self.error: BaseException | None = None
        self.written = 0
        self.present = 0
        self.failures: list[Failure] = []

    def run(self) -> None:
        try:
            while True:
                item = self.queue.get()
                if item is _STOP:
                    break
                img_id, path, record = item
                try:
                    stored = self.writer.put(img_id, record)
                except StoreSettingsMismatch:
                    raise
                except StoreError as e:
                    self.failures.append(Failure(path, img_id, f"the store refused the record: {e}"))
                    continue
                if stored:
                    self.written += 1
                else:
                    self.present += 1
                if self.queue.empty():
                    self.writer.flush()
            self.writer.flush()
        except BaseException as e:  # reported to the main thread by submit()/finish()
            self.error = e

    def submit(self, item: Any) -> None:
        if not self.is_alive() and self.ident is None:  # started lazily: after DataLoader workers are forked
            self.start()
        while True:
            self._check()
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        if self.ident is None:  # never started: nothing was submitted
            return
        if self.is_alive():
            self.submit(_STOP)
            self.join()
        self._check()

    def _check(self) -> None:
        if isinstance(self.error, DiskFullError):
            raise self.error
        if self.error is not None:
            raise RuntimeError(f"writing to the feature store failed: {self.error}") from self.error
