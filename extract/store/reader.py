"""Reading a store: :class:`FeatureStore` (``store[img_id] -> Record``) and :func:`open_metadata`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from extract.records import (
    Record,
    StoreDamaged,
    StoreError,
    decode_record,
    normalize_boxes,
)
from extract.store.env import (
    ENVS,
    META_KEY_B,
    RESERVED_KEYS,
    SharedEnv,
    acquire_env,
    count_ids,
    has_id,
    iter_keys,
    key_of,
    read_txn,
    release_env,
    remap_reader_env,
)
from extract.store.meta import parse_metadata

__all__ = ["FeatureStore", "damage_named", "open_metadata"]


@contextlib.contextmanager
def damage_named(path: Path, what: str) -> Iterator[None]:
    """LMDB's errors about its own pages while reading ``what`` (MDB_CORRUPTED, MDB_PAGE_NOTFOUND, ...) as
    :class:`StoreDamaged` naming the store, ``what`` and the ``verify`` advice."""
    try:
        yield
    except lmdb.Error as exc:
        raise StoreDamaged.at(path, f"damaged LMDB pages reading {what} ({exc})") from exc


def _metadata(entry: SharedEnv, path: Path) -> dict:
    """The metadata; its record missing from a store that has the ids index is damage, not another kind of file."""
    with damage_named(path, "the store metadata"), read_txn(entry) as txn:
        raw = txn.get(META_KEY_B)
    if raw is None and entry.ids_db is not None:
        raise StoreDamaged.at(
            path,
            "the store's metadata record is missing although its ids index is there (damaged LMDB pages)",
        )
    return parse_metadata(raw, path)


def open_metadata(path: str | os.PathLike) -> dict:
    """Read a store's metadata (schema_version, features_dtype, feature_dim, count, extractor, ...)."""
    path = Path(path)
    entry = acquire_env(path, writable=False, register=True)
    try:
        return _metadata(entry, path)
    finally:
        release_env(path)


#: Arrays whose values must be finite in a record read with ``check=True``.
_FINITE = ("features", "boxes", "obj_conf", "attr_conf")


class FeatureStore:
    """Read-only access to a store: ``store[img_id] -> Record`` (see :mod:`extract.records`).

    The LMDB environment is opened lazily and re-opened in every new process (the pid is checked on each
    access), so a store created before ``fork`` or pickled into DataLoader workers is safe. It is opened
    read-only, without the lock file (the store must not be written while it is read) and without
    readahead; each access copies one record out of the memory map, so the process's private memory does
    not grow with the number of records read. File pages touched through the map count in RSS (shared,
    reclaimable page cache; the kernel may map ~1 MiB around each random read); to keep RSS flat too, the
    map is re-opened every ``remap_every_bytes`` read (default 8 MiB, ~0.1 ms each; 0 disables; never
    while a writer of this process shares the handle). Ids are listed and tested through a small index
    sub-database, so ``len``, ``in`` and iteration never page in the records.

    Records are dicts of numpy arrays (:class:`~extract.records.Record`); with ``normalize_boxes=True`` the boxes are
    divided by ``[img_w, img_h, img_w, img_h]`` and clipped to [0, 1]. With ``check=True`` every record read is
    checked: its CRC32 (flipped bits in the arrays) and finite features, boxes and confidences (about 0.1 ms for
    a 36 x 2048 record); a bad one raises :class:`~extract.records.StoreDamaged` naming the image and the store.
    Damaged LMDB pages raise it too, whatever the access.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        normalize_boxes: bool = False,
        *,
        remap_every_bytes: int = 8 << 20,
        check: bool = False,
    ):
        self.path = Path(path)
        self.normalize_boxes = normalize_boxes
        self.check = check
        self.remap_every_bytes = remap_every_bytes
        self._key = os.path.realpath(self.path)
        self._registered_pid: int | None = None
        self._metadata: dict | None = None
        self._bytes_since_map = 0
        self._entry()  # fail fast on a bad path; re-opened lazily in other processes

    # -- process-local environment ------------------------------------------------------------------
    def _entry(self) -> SharedEnv:
        pid = os.getpid()
        entry = ENVS.get(self._key)
        if entry is not None and entry.pid == pid and self._registered_pid == pid:
            return entry  # fast path: no registry lock, no syscalls beyond getpid
        entry = acquire_env(self.path, writable=False, register=self._registered_pid != pid, key=self._key)
        self._registered_pid = pid
        return entry

    def _begin(self) -> contextlib.AbstractContextManager[lmdb.Transaction]:
        return read_txn(self._entry())

    def _count_read(self, nbytes: int) -> None:
        """Re-map every ``remap_every_bytes`` read so touched file pages do not pile up in this process's RSS."""
        self._bytes_since_map += nbytes
        if self.remap_every_bytes and self._bytes_since_map >= self.remap_every_bytes:
            self._bytes_since_map = 0
            remap_reader_env(self._entry(), self.path)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_registered_pid"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    # -- mapping API -------------------------------------------------------------------------------
    @property
    def metadata(self) -> dict:
        """The store metadata (schema_version, features_dtype, feature_dim, count, extractor, ...)."""
        if self._metadata is None:
            self._metadata = _metadata(self._entry(), self.path)
        return dict(self._metadata)

    def _raw(self, img_id: str) -> bytes | None:
        key = key_of(img_id)
        if key in RESERVED_KEYS:
            return None
        with damage_named(self.path, f"image {img_id!r}"), self._begin() as txn:
            blob = txn.get(key)
        if blob is not None:
            self._count_read(len(blob))
        return blob

    def __getitem__(self, img_id: str) -> Record:
        blob = self._raw(img_id)
        if blob is None:
            if img_id in self:  # listed, yet no record: its page lost the key
                raise StoreDamaged.at(
                    self.path,
                    f"image {img_id!r} is listed in the ids index but its record is missing (damaged LMDB pages)",
                )
            raise KeyError(f"image id {img_id!r} is not in the feature store {self.path}")
        try:
            record = decode_record(blob, img_id, check_crc=self.check)
        except StoreDamaged:
            raise
        except StoreError as exc:
            raise StoreDamaged.at(self.path, str(exc)) from None
        if self.check:
            bad = [name for name in _FINITE if not np.isfinite(record[name]).all()]
            if bad:
                raise StoreDamaged.at(
                    self.path,
                    f"record {img_id!r} holds NaN or infinite values in {', '.join(bad)} (written so by its "
                    "extractor, or damaged)",
                )
        if self.normalize_boxes:
            record["boxes"] = normalize_boxes(record["boxes"], record["img_h"], record["img_w"])
        return record

    def get(self, img_id: str, default: Any = None) -> Any:
        try:
            return self[img_id]
        except KeyError:
            return default

    def get_raw(self, img_id: str) -> bytes | None:
        """The stored blob of ``img_id`` (None when absent), undecoded."""
        return self._raw(img_id)

    def __contains__(self, img_id: object) -> bool:
        if not isinstance(img_id, str) or key_of(img_id) in RESERVED_KEYS:
            return False
        entry = self._entry()
        with damage_named(self.path, "the ids index"), read_txn(entry) as txn:
            return has_id(txn, entry.ids_db, key_of(img_id))

    def __len__(self) -> int:
        entry = self._entry()
        with damage_named(self.path, "the ids index"), read_txn(entry) as txn:
            return count_ids(txn, entry.ids_db)

    def __iter__(self) -> Iterator[str]:
        """Image ids in sorted (UTF-8 byte) order, read in chunks so no transaction stays open."""
        with damage_named(self.path, "the ids index"):
            yield from iter_keys(self._begin, lambda: self._entry().ids_db)

    def ids(self) -> list[str]:
        return list(self)

    def close(self) -> None:
        if self._registered_pid == os.getpid():
            release_env(self.path, self._key)
        self._registered_pid = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, normalize_boxes={self.normalize_boxes})"
