"""Files written whole or not at all: the text goes to a temporary file in the same folder, which then
replaces the target with ``os.replace`` (atomic on POSIX and Windows). A reader sees the old file or the new
one, never half of one; a write that fails leaves the old file as it was and no temporary file behind.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

__all__ = ["copy_file_atomic", "write_text_atomic"]


def write_text_atomic(path: str | os.PathLike, text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating the parent folders; returns the path.

    The temporary file is ``.NAME.<random>.tmp`` beside ``path`` (same file system, so the rename is atomic),
    created with the usual permissions (the umask's). ``fsync``: flush the data to disk before the rename
    (for files a crash must not lose, e.g. the list of failed images of a long extraction).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def copy_file_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst`` atomically (the same temporary-file-then-rename as :func:`write_text_atomic`)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst
