"""The one thread that owns the device: questions arriving together are answered in micro batches.

Requests put :class:`Job` s on a queue; the worker takes the first, then whatever else arrives within
``max_wait_s`` up to ``max_batch`` questions, and answers them with :meth:`Answerer.answer_batch` (each image's
regions once, one model forward per batch). One thread means never two detector passes at once on the device;
the web server's event loop only waits on futures, so a slow batch never blocks ``/api/health``.
"""

from __future__ import annotations

import base64
import queue
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.answer.answerer import Answerer
from tasks.answer.drawing import draw_result
from tasks.answer.results import AnswerInputError, AnswerResult

__all__ = ["AnswerWorker", "Job", "JobResult"]


@dataclass
class Job:
    """Questions about one image (a file the server owns)."""

    image: Path
    questions: list[str]
    top_k: int = 5
    draw: bool = False
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class JobResult:
    """Per question, an :class:`AnswerResult` or the :class:`AnswerInputError` that stopped it; the picture of
    the first answered question (PNG bytes) when asked; how long the job waited and the batch it ran in."""

    results: list[AnswerResult | AnswerInputError]
    picture: bytes | None
    queued_s: float
    batch_questions: int


class AnswerWorker:
    """Answers :class:`Job` s in micro batches on one thread (see the module doc)."""

    def __init__(self, answerer: Answerer, max_batch: int = 8, max_wait_s: float = 0.01) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.answerer = answerer
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.batches: list[int] = []  # questions per forward, for the logs and the tests
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._pictures = Path(tempfile.mkdtemp(prefix="lxmert-serve-draw-"))
        self._thread = threading.Thread(target=self._run, name="lxmert-serve-device", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        """Queue ``job``; its future resolves to a :class:`JobResult` (or the exception that failed the batch)."""
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        """Finish the queued jobs, stop the thread, remove the pictures' folder."""
        self._queue.put(None)
        self._thread.join(timeout=60)
        shutil.rmtree(self._pictures, ignore_errors=True)

    @property
    def busy(self) -> int:
        """Jobs waiting."""
        return self._queue.qsize()

    # -- the device thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            count = len(job.questions)
            deadline = time.perf_counter() + self.max_wait_s
            while count < self.max_batch:
                try:
                    more = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # close after this batch
                    break
                jobs.append(more)
                count += len(more.questions)
            self._answer(jobs)

    def _answer(self, jobs: list[Job]) -> None:
        started = time.perf_counter()
        pairs = [(job.image, q) for job in jobs for q in job.questions]
        top_k = max(job.top_k for job in jobs)
        try:
            results: list[Any] = []
            for i in range(0, len(pairs), self.max_batch):
                chunk = pairs[i : i + self.max_batch]
                results += self.answerer.answer_batch(chunk, top_k=top_k)
                self.batches.append(len(chunk))
        except Exception as e:  # noqa: BLE001 - a failed batch fails its jobs, the server goes on
            for job in jobs:
                job.future.set_exception(e)
            return
        for job in jobs:
            mine, results = results[: len(job.questions)], results[len(job.questions) :]
            for r in mine:
                if isinstance(r, AnswerResult):
                    r.answers = r.answers[: job.top_k]
            picture = self._draw(mine) if job.draw else None
            job.future.set_result(JobResult(mine, picture, started - job.submitted, len(pairs)))

    def _draw(self, results: list[Any]) -> bytes | None:
        first = next((r for r in results if isinstance(r, AnswerResult)), None)
        if first is None:
            return None
        out = self._pictures / "picture.png"
        draw_result(first, out)
        return out.read_bytes()


def data_url(png: bytes) -> str:
    """``data:image/png;base64,...`` for an ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
