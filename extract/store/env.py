"""The store's LMDB plumbing: one shared environment per store and process, and the key / ids-index helpers.

LMDB (and py-lmdb's guard) forbid opening the same files twice in one process, so readers and writers of one
store in one process share one handle (:class:`SharedEnv`, counted users). A handle inherited through
``fork`` is closed in the child (that only unmaps the child's copy) and re-opened there.

The ids index is a sub-database (:data:`IDS_DB_NAME`, id -> empty value, written in the same transaction as
the record): listing or testing ids touches only its small pages. py-lmdb pages in a record's whole value
whenever a cursor lands on its key, so listing ids from the records themselves would read the entire store.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from extract.records import StoreDamaged, StoreError

__all__ = ["IDS_DB_NAME", "METADATA_KEY"]

#: Reserved LMDB key of the store metadata (JSON). Not a valid image id.
METADATA_KEY = "__lxmert_feature_store__"
META_KEY_B = METADATA_KEY.encode("utf-8")
#: Name of the LMDB sub-database indexing the image ids (key = id, empty value).
IDS_DB_NAME = "__lxmert_feature_store_ids__"
IDS_DB_B = IDS_DB_NAME.encode("utf-8")
RESERVED_KEYS = (META_KEY_B, IDS_DB_B)
DATA_FILE = "data.mdb"
LOCK_FILE = "lock.mdb"
MAX_RETRIES = 64


def key_of(img_id: str) -> bytes:
    """The LMDB key of an image id (UTF-8); TypeError for anything but a str, :class:`StoreError` for a str that
    is not valid text (a file name's undecodable bytes: see :func:`extract.image_list.printable`)."""
    if not isinstance(img_id, str):
        raise TypeError(f"image ids are str, got {type(img_id).__name__} {img_id!r}")
    try:
        return img_id.encode("utf-8")
    except UnicodeEncodeError:
        shown = img_id.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise StoreError(
            f"image id {shown!r} is not valid text (undecodable bytes of a file name); give it as text, e.g. with "
            "each such byte written as \\xNN as extract-features does"
        ) from None


def check_store_dir(path: Path, *, must_exist: bool) -> None:
    """Refuse a path that is a file, or a non-empty folder that is not an LMDB store (naming the fix)."""
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path}: is a file, not a feature store directory (an LMDB store is a directory)")
    if not path.exists():
        if must_exist:
            raise StoreError(
                f"{path}: no feature store here; create one with `extract-features` or "
                "`lxmert-features import-tsv FILE.tsv STORE`"
            )
        return
    names = set(os.listdir(path))
    if DATA_FILE not in names:
        if must_exist or names - {LOCK_FILE}:
            raise StoreError(
                f"{path}: not an LMDB feature store (no {DATA_FILE}; found {sorted(names)[:5]}); "
                "give an empty or new directory"
            )


@dataclass
class SharedEnv:
    """One process's handle on one store, shared by its readers and writers."""

    env: lmdb.Environment
    ids_db: Any  # the ids sub-database handle, None for a store written without one
    pid: int
    writable: bool
    users: int = 0
    # Held by every reader transaction and by re-map/upgrade, so a handle is never closed under a live read.
    lock: threading.RLock = field(default_factory=threading.RLock)


#: realpath of the store -> its handle in this process.
ENVS: dict[str, SharedEnv] = {}
_ENVS_LOCK = threading.RLock()


def _open_env(path: Path, writable: bool, map_size: int) -> tuple[lmdb.Environment, Any]:
    """``(environment, ids sub-database or None)``; the writer creates the sub-database."""
    try:
        if writable:
            env = lmdb.open(
                str(path), map_size=map_size, subdir=True, max_dbs=2, readahead=False, meminit=False
            )
        else:
            env = lmdb.open(
                str(path), readonly=True, lock=False, readahead=False, meminit=False, subdir=True, max_dbs=2
            )
    except lmdb.Error as exc:
        mode = "writing" if writable else "reading"
        raise StoreError(f"{path}: cannot open the LMDB store for {mode} ({exc})") from exc
    try:
        if writable:
            for _ in range(MAX_RETRIES):
                try:
                    return env, env.open_db(IDS_DB_B, create=True)
                except lmdb.MapResizedError:
                    env.set_mapsize(0)
        with env.begin() as txn:
            if txn.get(IDS_DB_B) is None:  # older layout: no index
                return env, None
        return env, env.open_db(IDS_DB_B, create=False)
    except (lmdb.CorruptedError, lmdb.PageNotFoundError) as exc:
        env.close()
        raise StoreDamaged.at(path, f"damaged LMDB pages opening the ids index ({exc})") from exc
    except lmdb.Error as exc:
        env.close()
        raise StoreError(f"{path}: cannot open the ids index of the store ({exc})") from exc


def acquire_env(
    path: Path, *, writable: bool, register: bool, map_size: int = 1 << 30, key: str | None = None
) -> SharedEnv:
    """The process's shared environment of the store at ``path`` (opened, re-opened or upgraded as needed).

    ``register=True`` counts the caller as a user (released by :func:`release_env`). ``key``: the
    resolved path when the caller has it cached.
    """
    key = key or os.path.realpath(path)
    with _ENVS_LOCK:
        entry = ENVS.get(key)
        if entry is not None and entry.pid != os.getpid():  # inherited through fork
            with contextlib.suppress(Exception):
                entry.env.close()
            del ENVS[key]
            entry = None
        if entry is not None and writable and not entry.writable:  # a reader's handle: re-open read-write
            with entry.lock:
                entry.env.close()
                try:
                    entry.env, entry.ids_db = _open_env(path, True, map_size)
                except BaseException:
                    del ENVS[key]
                    raise
                entry.writable = True
        if entry is None:
            if not writable:
                check_store_dir(path, must_exist=True)
            entry = SharedEnv(*_open_env(path, writable, map_size), os.getpid(), writable)
            ENVS[key] = entry
        if register:
            entry.users += 1
        return entry


def remap_reader_env(entry: SharedEnv, path: Path) -> bool:
    """Close and re-open a read-only environment to drop the file pages mapped into this process.

    Safe with other threads: every reader transaction holds ``entry.lock``. Returns whether it re-mapped.
    """
    with entry.lock:
        if entry.writable or entry.pid != os.getpid():
            return False
        entry.env.close()
        try:
            entry.env, entry.ids_db = _open_env(path, False, 0)
        except BaseException:
            with _ENVS_LOCK:
                ENVS.pop(os.path.realpath(path), None)
            raise
        return True


@contextlib.contextmanager
def read_txn(entry: SharedEnv) -> Iterator[lmdb.Transaction]:
    """A short read-only transaction on a shared environment, holding its lock."""
    with entry.lock:
        try:
            txn = entry.env.begin(buffers=False)
        except lmdb.MapResizedError:  # a writer grew the file since the map was made: adopt its size
            entry.env.set_mapsize(0)
            txn = entry.env.begin(buffers=False)
        try:
            yield txn
        finally:
            txn.abort()


def release_env(path: Path, key: str | None = None) -> None:
    """Count one user of the store's handle out; the last one closes it."""
    key = key or os.path.realpath(path)
    with _ENVS_LOCK:
        entry = ENVS.get(key)
        if entry is None or entry.pid != os.getpid():
            return
        entry.users -= 1
        if entry.users <= 0:
            entry.env.close()
            del ENVS[key]


# ------------------------------------------------------------------------------------------ ids index
def has_id(txn: lmdb.Transaction, ids_db: Any, key: bytes) -> bool:
    """Whether image ``key`` is stored (looked up in the ids index when the store has one)."""
    if ids_db is not None:
        return txn.get(key, db=ids_db) is not None
    return txn.cursor().set_key(key)  # no index: lands on the record (pages its value in)


def count_ids(txn: lmdb.Transaction, ids_db: Any) -> int:
    """Number of images: entries of the ids index, or records minus the reserved keys without one."""
    if ids_db is not None:
        return txn.stat(ids_db)["entries"]
    return txn.stat()["entries"] - sum(txn.get(k) is not None for k in RESERVED_KEYS)


def iter_keys(
    begin: Callable[[], contextlib.AbstractContextManager[lmdb.Transaction]],
    ids_db: Callable[[], Any],
    chunk: int = 1024,
) -> Iterator[str]:
    """Image ids in sorted order, ``chunk`` per short transaction; ``ids_db()`` gives the index (or None)."""
    last: bytes | None = None
    while True:
        keys: list[bytes] = []
        with begin() as txn:
            db = ids_db()
            cursor = txn.cursor(db) if db is not None else txn.cursor()
            ok = cursor.set_range(last) if last is not None else cursor.first()
            if ok and last is not None and cursor.key() == last:
                ok = cursor.next()
            while ok and len(keys) < chunk:
                keys.append(cursor.key())
                ok = cursor.next()
        for key in keys:
            if key not in RESERVED_KEYS:
                yield key.decode("utf-8", errors="backslashreplace")
        if len(keys) < chunk:
            return
        last = keys[-1]
