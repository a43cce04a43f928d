"""Uploaded images: size and pixel limits, a real image check, and a private folder that names each image by its
content (sha256), so a second question about the same image finds its regions in the answerer's cache.

No path from a request is ever used: an upload is bytes, an example is a name looked up in a fixed table.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from extract.images import ImageError, decode_image, is_image_file

__all__ = ["ImageStore", "UploadError", "UploadLimits", "find_examples"]


class UploadError(Exception):
    """An upload the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    max_question_chars: int = 300
    max_questions: int = 16


class ImageStore:
    """Uploads saved as ``<sha256>.img`` in a private temporary folder (the newest ``keep`` kept)."""

    def __init__(self, limits: UploadLimits, keep: int = 64, root: str | os.PathLike | None = None) -> None:
        self.limits = limits
        self.keep = keep
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="lxmert-serve-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self._own = root is None
        self._saved: OrderedDict[str, Path] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, data: bytes, name: str = "upload") -> tuple[str, Path]:
        """Check ``data`` and keep it; returns ``(image_id, path)``. Raises :class:`UploadError` (413 too large,
        415 not an image)."""
        if not data:
            raise UploadError(400, f"{name}: empty file; upload an image (JPEG, PNG, ...)")
        if len(data) > self.limits.max_bytes:
            raise UploadError(
                413,
                f"{name}: {len(data) / 2**20:.1f} MB, over the {self.limits.max_bytes / 2**20:.0f} MB limit",
            )
        image_id = hashlib.sha256(data).hexdigest()
        path = self.root / f"{image_id}.img"
        with self._lock:
            if image_id in self._saved:
                self._saved.move_to_end(image_id)
                return image_id, path
        tmp = self.root / f".{image_id}.{threading.get_ident()}.tmp"
        tmp.write_bytes(data)
        try:
            decode_image(tmp, max_pixels=self.limits.max_pixels)
        except ImageError as e:
            tmp.unlink(missing_ok=True)
            status = 413 if "pixels" in e.reason else 415
            raise UploadError(status, f"{name}: {e.reason}") from None
        os.replace(tmp, path)
        with self._lock:
            self._saved[image_id] = path
            while len(self._saved) > self.keep:
                _, old = self._saved.popitem(last=False)
                old.unlink(missing_ok=True)
        return image_id, path

    def get(self, image_id: str) -> Path | None:
        """The saved upload ``image_id`` (a sha256 from :meth:`add`), or None."""
        with self._lock:
            path = self._saved.get(image_id)
        return path if path is not None and path.is_file() else None

    def close(self) -> None:
        if self._own:
            shutil.rmtree(self.root, ignore_errors=True)


def find_examples(folder: str | os.PathLike | None, limit: int = 12) -> dict[str, Path]:
    """Up to ``limit`` images of ``folder`` (sorted names) as ``{file name: path}``; ``{}`` without a folder."""
    if not folder or not Path(folder).is_dir():
        return {}
    paths = sorted(p for p in Path(folder).iterdir() if p.is_file() and is_image_file(p))
    return {p.name: p for p in paths[:limit]}
