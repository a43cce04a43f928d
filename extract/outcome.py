"""What a run produced besides records: the images that failed, and the summary over all ranks."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.files import write_text_atomic
from extract.image_list import display_path, printable

__all__ = ["ExtractSummary", "Failure", "failures_path", "write_failures"]


@dataclass(frozen=True)
class Failure:
    """An image that produced no record, and why."""

    path: str
    img_id: str
    reason: str

    def to_json(self) -> str:
        fields = {"path": self.path, "id": self.img_id, "reason": self.reason}
        return json.dumps({k: printable(v) for k, v in fields.items()}, ensure_ascii=False)


def failures_path(out: str | os.PathLike) -> Path:
    """``OUT.lmdb.failures.jsonl``: beside the store, named after it."""
    return Path(str(out).rstrip("/\\") + ".failures.jsonl")


def write_failures(path: str | os.PathLike, failures: Sequence[Failure]) -> None:
    """Write ``failures`` as JSON lines (path, id, reason), sorted by id, atomically (temp file + rename)."""
    lines = [fail.to_json() + "\n" for fail in sorted(failures, key=lambda x: (x.img_id, x.path))]
    write_text_atomic(path, "".join(lines), fsync=True)


@dataclass
class ExtractSummary:
    """Counts over all ranks. ``done``: records written; ``skipped``: already in the store.

    ``weights``, ``weights_sha256``, ``weights_layout``: the detector weights file as recorded in the store
    (None with random weights, or layout None when the detector was built by the caller).
    """

    total: int = 0
    done: int = 0
    skipped: int = 0
    failures: list[Failure] = field(default_factory=list)
    elapsed_s: float = 0.0
    world_size: int = 1
    device: str = "cpu"
    random_weights: bool = False
    interrupted: bool = False
    out: str = ""
    weights: str | None = None
    weights_sha256: str | None = None
    weights_layout: str | None = None

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def images_per_s(self) -> float:
        return (self.done + self.failed) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def format(self, bold: bool = True) -> str:
        """Human-readable summary (several lines)."""
        head = "extract-features: INTERRUPTED" if self.interrupted else "extract-features: finished"
        lines = [
            f"{head}: {self.total} images: {self.done} done, {self.skipped} skipped as already present, "
            f"{self.failed} failed",
            f"  {self.elapsed_s:.1f} s, {self.images_per_s:.2f} images/s, {self.world_size} process(es), "
            f"device {self.device}, store {self.out}",
        ]
        if self.weights:
            sha = f"sha256 {self.weights_sha256[:12]}" if self.weights_sha256 else "sha256 unknown"
            layout = f", layout {self.weights_layout}" if self.weights_layout else ""
            lines.append(f"  weights {self.weights} ({sha}{layout})")
        if self.failures:
            lines.append(f"  failures listed in {failures_path(self.out)}:")
            for fail in sorted(self.failures, key=lambda x: x.img_id)[:10]:
                lines.append(f"    {fail.img_id} ({display_path(fail.path)}): {printable(fail.reason)}")
            if self.failed > 10:
                lines.append(f"    ... and {self.failed - 10} more")
        if self.interrupted:
            lines.append("  committed records are kept; run the same command again to resume")
        if self.random_weights:
            msg = "RANDOM WEIGHTS: these features come from an untrained detector (--random-weights)"
            lines.append(f"\033[1m{msg}\033[0m" if bold else msg)
        return "\n".join(lines)
