"""One process at a time in a folder: :class:`FolderLock`, a lock file that names its holder.

``FOLDER/.lock`` holds the holder as JSON (``pid``, ``host``, ``started``, ``what``) and is locked with
``flock`` while the holder runs. The kernel drops an ``flock`` when its process ends, however it ends (``kill -9``
included), so a lock file whose ``flock`` can be taken again is stale: the next holder says so (naming the
process that is gone) and takes it over. A second process while the holder runs is refused with
:class:`FolderLocked`, naming the holder. Where the file system has no ``flock`` (some network file
systems), the file's content decides: a holder on this host whose process is gone is stale; any other holder
refuses (the message says which file to delete once that process is known to be gone).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: content-based locking only
    fcntl = None  # type: ignore[assignment]

__all__ = ["FolderLock", "FolderLocked", "LOCK_NAME"]

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class FolderLocked(RuntimeError):
    """Another live process holds the folder; the message names it (pid, host, start time, command)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    return (
        f"{holder.get('what') or 'a process'} (pid {holder.get('pid')} on {holder.get('host')}, started "
        f"{holder.get('started')})"
    )


class FolderLock:
    """The lock of ``folder`` (created when missing) for one process: :meth:`acquire`, :meth:`release`, or use as
    a context manager. ``what`` names the holder in the refusal others get (e.g. ``"lxmert-train vqa"``)."""

    def __init__(self, folder: str | os.PathLike, what: str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    def _read(self, fd: int) -> dict[str, Any] | None:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 65536).decode("utf-8", "replace").strip()
        if not text:
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            return {
                "pid": None,
                "host": None,
                "started": None,
                "what": f"unreadable lock file ({text[:60]!r})",
            }
        return holder if isinstance(holder, dict) else None

    def _refuse(self, holder: dict[str, Any] | None, extra: str = "") -> FolderLocked:
        who = _describe(holder) if holder else "another process"
        return FolderLocked(
            f"{self.folder} is in use by {who}: one run per folder at a time (two would overwrite each other's "
            f"checkpoints and logs); wait for it to end, or give another folder{extra}"
        )

    def acquire(self) -> dict[str, Any] | None:
        """Take the lock; returns the holder found stale and taken over (a process that is gone), else None.

        Raises:
            FolderLocked: another live process holds it (named).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                stale = self._lock(fd)
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:  # released and replaced meanwhile: again
                    os.close(fd)
                    continue
            except FileNotFoundError:  # released (unlinked) between open and stat: again
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            break
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "what": self.what,
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(holder) + "\n").encode("utf-8"))
        os.fsync(fd)
        self._fd = fd
        if stale is not None:
            log.warning(
                "%s: stale lock of %s taken over: that process is gone (killed?)", self.path, _describe(stale)
            )
        return stale

    def _lock(self, fd: int) -> dict[str, Any] | None:
        """flock ``fd`` (or judge by its content without flock); the previous holder when stale."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self._read(fd)  # whoever wrote it no longer holds it
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._refuse(self._read(fd)) from None
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
        holder = self._read(fd)  # no flock here: the content decides
        if holder is None:
            return None
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            if holder["pid"] != os.getpid() and not _pid_alive(holder["pid"]):
                return holder
        raise self._refuse(holder, f" (if that process is gone, delete {self.path})")

    def release(self) -> None:
        """Give the lock up (the file is removed); a no-op when not held."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
