"""A full disk, said in one line: :class:`DiskFullError` and :func:`as_disk_full`.

Writers meet a full file system (or a used-up quota) in several guises: ``OSError`` ENOSPC / EDQUOT, LMDB's
``DiskError`` or, on some file systems, a bare "Input/output error", safetensors' "No space left on device (os
error 28)", ``torch.save``'s "unexpected pos". :func:`as_disk_full` recognises them (an I/O-looking error counts
only when the file system written to is then nearly full) and gives the one error the command-line tools print
as one line naming the path and the free space, followed by how to resume.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

__all__ = ["LOW_SPACE_BYTES", "DiskFullError", "as_disk_full", "free_bytes", "human_bytes"]

#: Below this many free bytes, a write that failed with an I/O error is taken for a full disk.
LOW_SPACE_BYTES = 64 << 20
_CODES = frozenset(c for c in (getattr(errno, "ENOSPC", None), getattr(errno, "EDQUOT", None)) if c)
_TEXTS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"`` (binary units; whole bytes below 1 KiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes free to this user on the file system of ``path`` (of its nearest existing parent when it does not
    exist yet); None when that cannot be read."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


class DiskFullError(OSError):
    """Writing ``path`` failed because its file system is full (or the quota is used up); ``free``: the bytes
    free there afterwards (None when unknown). ``str()`` is one line; ``errno`` is ENOSPC."""

    def __init__(self, path: str | os.PathLike, free: int | None) -> None:
        self.path, self.free = str(path), free
        room = f"{human_bytes(free)} free" if free is not None else "free space unknown"
        super().__init__(errno.ENOSPC, f"disk full: cannot write {self.path} ({room} on that file system)")

    def __str__(self) -> str:
        return self.strerror or ""

    def __reduce__(self):  # noqa: ANN204 - pickled between ranks
        return (type(self), (self.path, self.free))


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return seen


def _says_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _CODES:
        return True
    if type(exc).__module__.split(".")[0] == "lmdb" and any(
        a in _CODES for a in exc.args if isinstance(a, int)
    ):
        return True
    return any(text in str(exc).lower() for text in _TEXTS)


def _looks_like_io(exc: BaseException) -> bool:
    """An error a writer may give on a full disk without saying so (I/O error, torch's stream writer, ...)."""
    module = type(exc).__module__.split(".")[0]
    return isinstance(exc, (OSError, RuntimeError)) or module in ("lmdb", "safetensors")


def as_disk_full(exc: BaseException, path: str | os.PathLike, *, guess: bool = True) -> DiskFullError | None:
    """The :class:`DiskFullError` for ``exc`` raised while writing ``path`` when it (or an error it was raised
    from) says the disk is full, or (``guess``: where ``exc`` can only come from writing) is an I/O error while
    that file system has less than :data:`LOW_SPACE_BYTES` free; else None (``exc`` is something else:
    re-raise it)."""
    if isinstance(exc, DiskFullError):
        return exc
    chain = _chain(exc)
    if not any(isinstance(e, Exception) for e in chain):
        return None
    free = free_bytes(path)
    if any(_says_full(e) for e in chain):
        return DiskFullError(path, free)
    if guess and any(_looks_like_io(e) for e in chain) and free is not None and free < LOW_SPACE_BYTES:
        return DiskFullError(path, free)
    return None
