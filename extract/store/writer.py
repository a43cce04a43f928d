"""Writing a store: :class:`FeatureWriter` (create or resume, batched atomic transactions, several processes)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from common.diskspace import as_disk_full
from extract.records import FeaturesDtype, StoreError, check_features_dtype, encode_record, header_info
from extract.store.env import (
    IDS_DB_NAME,
    MAX_RETRIES,
    META_KEY_B,
    RESERVED_KEYS,
    acquire_env,
    check_store_dir,
    count_ids,
    has_id,
    iter_keys,
    key_of,
    release_env,
)
from extract.store.meta import (
    MANAGED_KEYS,
    check_compatible,
    new_metadata,
    normalise_settings,
    now,
    parse_metadata,
)

__all__ = ["FeatureWriter"]

log = logging.getLogger(__name__)


class FeatureWriter:
    """Create or resume a store and add records in batched transactions.

    * ``extractor``: the extractor's settings (JSON-serialisable dict). Stored on creation; when the store
      exists and holds different settings, :class:`StoreSettingsMismatch` names the differing keys.
    * ``features_dtype``: "float32" or "float16"; must match an existing store's.
    * ``overwrite``: False (resume): ids already present are skipped by :meth:`put`; True: re-put ids are
      replaced (ids not re-put stay).
    * ``commit_every``: records per transaction; ``map_size``: initial LMDB map size in bytes (grown by
      doubling whenever it is full).

    Each transaction is atomic: a record is either fully written or absent; a transaction that meets a full disk
    raises :class:`common.diskspace.DiskFullError` (naming the store and the free space) and writes nothing. Several processes may write
    into one store concurrently (e.g. one per torchrun rank): LMDB's writer lock serialises their
    transactions, a full map is grown and the transaction retried, and a map grown by another process is
    adopted. Use as a context manager or call :meth:`close` (flushes and updates the metadata count).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        extractor: dict | None = None,
        *,
        features_dtype: FeaturesDtype = "float32",
        overwrite: bool = False,
        commit_every: int = 64,
        map_size: int = 1 << 30,
    ):
        check_features_dtype(features_dtype)
        if commit_every < 1:
            raise StoreError(f"commit_every must be >= 1, got {commit_every}")
        self.path = Path(path)
        self.features_dtype = features_dtype
        self.overwrite = overwrite
        self.commit_every = commit_every
        self.extractor = normalise_settings(extractor)
        self.written = 0  # records committed by this writer
        self.skipped = 0  # puts skipped because the id was already present
        self.map_grows = 0
        self._pending: dict[bytes, bytes] = {}
        self._extra_meta: dict[str, Any] = {}
        self._feature_dim: int | None = None
        self._closed = False

        check_store_dir(self.path, must_exist=False)
        self.path.mkdir(parents=True, exist_ok=True)
        self._entry = acquire_env(
            self.path, writable=True, register=True, map_size=max(int(map_size), 1 << 16)
        )
        self._pid = os.getpid()
        try:
            self._init_metadata()
        except BaseException:
            self._closed = True
            release_env(self.path)
            raise

    # -- LMDB plumbing ------------------------------------------------------------------------------
    @property
    def _env(self) -> lmdb.Environment:
        return self._entry.env

    def _set_mapsize(self, size: int) -> None:
        with self._entry.lock:  # no reader transaction of this process is live while the map changes
            self._env.set_mapsize(size)

    def _begin(self, write: bool = False) -> lmdb.Transaction:
        for _ in range(MAX_RETRIES):
            try:
                return self._env.begin(write=write)
            except lmdb.MapResizedError:  # another process grew the map: adopt its size
                self._set_mapsize(0)
        raise StoreError(f"{self.path}: could not begin a transaction (map keeps being resized)")

    def _grow(self) -> None:
        old = self._env.info()["map_size"]
        self._set_mapsize(old * 2)
        self.map_grows += 1
        log.info("%s: LMDB map full, grown from %d to %d bytes", self.path, old, old * 2)

    def _write_txn(self, body) -> Any:
        """Run ``body(txn)`` in one write transaction, growing/adopting the map size and retrying."""
        if self._pid != os.getpid():
            raise StoreError(f"{self.path}: a FeatureWriter cannot be used across fork; open one per process")
        for _ in range(MAX_RETRIES):
            try:
                with self._begin(write=True) as txn:
                    return body(txn)
            except lmdb.MapFullError:
                self._grow()
            except lmdb.MapResizedError:
                self._set_mapsize(0)
            except (
                lmdb.Error,
                OSError,
            ) as exc:  # a full disk says so in one line (the transaction is not written)
                full = as_disk_full(exc, self.path)
                if full is None:
                    raise
                raise full from exc
        raise StoreError(f"{self.path}: transaction failed {MAX_RETRIES} times (map full / resized)")

    def _init_metadata(self) -> None:
        def body(txn: lmdb.Transaction) -> dict:
            raw = txn.get(META_KEY_B)
            if raw is None:
                if count_ids(txn, None) > 0:
                    raise StoreError(
                        f"{self.path}: LMDB environment holds data but no store metadata; not a feature store"
                    )
                meta = new_metadata(self.features_dtype, self.extractor)
                txn.put(META_KEY_B, json.dumps(meta).encode())
                return meta
            meta = parse_metadata(raw, self.path)
            if not meta.get("ids_index"):  # written without the ids index: build it once
                ids_db = self._entry.ids_db
                for key in txn.cursor().iternext(keys=True, values=False):
                    if key not in RESERVED_KEYS:
                        txn.put(key, b"", db=ids_db)
                meta["ids_index"] = IDS_DB_NAME
                txn.put(META_KEY_B, json.dumps(meta).encode())
            check_compatible(
                meta,
                extractor=self.extractor,
                features_dtype=self.features_dtype,
                where=str(self.path),
                fix="use a new store path, or the same settings (and features_dtype) as the store",
            )
            if self.extractor is not None and meta.get("extractor") is None:
                meta["extractor"] = self.extractor
                txn.put(META_KEY_B, json.dumps(meta).encode())
            return meta

        meta = self._write_txn(body)
        self._feature_dim = meta.get("feature_dim")
        if self.extractor is None:
            self.extractor = meta.get("extractor")

    # -- public API ---------------------------------------------------------------------------------
    def __contains__(self, img_id: str) -> bool:
        key = key_of(img_id)
        if key in self._pending:
            return True
        with self._begin() as txn:
            return has_id(txn, self._entry.ids_db, key)

    def _check_put(self, img_id: str) -> bytes:
        if self._closed:
            raise StoreError(f"{self.path}: writer is closed; cannot put {img_id!r}")
        key = key_of(img_id)
        if not img_id or key in RESERVED_KEYS:
            raise StoreError(f"{self.path}: invalid image id {img_id!r} (empty or reserved)")
        if len(key) > self._env.max_key_size():
            raise StoreError(
                f"{self.path}: image id {img_id[:40]!r}... is longer than {self._env.max_key_size()} bytes"
            )
        return key

    def _accept_dim(self, img_id: str, dim: int) -> None:
        if self._feature_dim is None:
            self._feature_dim = dim
        elif dim != self._feature_dim:
            raise StoreError(
                f"{self.path}: record {img_id!r} has feature dim {dim}, the store holds {self._feature_dim}-d "
                "features; write it to a different store"
            )

    def put(self, img_id: str, record: dict) -> bool:
        """Queue one image's record (see :func:`encode_record`); commits every ``commit_every`` records.

        Returns False (and writes nothing) when ``img_id`` is already present and ``overwrite`` is False.
        Raises :class:`StoreError` naming the id when the record is malformed or its feature dim differs
        from the store's.
        """
        key = self._check_put(img_id)
        if not self.overwrite and img_id in self:
            self.skipped += 1
            return False
        blob = encode_record(record, self.features_dtype, img_id=img_id)
        self._accept_dim(img_id, int(np.shape(record["features"])[1]))
        return self._queue(key, blob)

    def put_encoded(self, img_id: str, blob: bytes) -> bool:
        """Queue an already encoded blob (e.g. copied from another store). Same rules as :meth:`put`."""
        key = self._check_put(img_id)
        if not self.overwrite and img_id in self:
            self.skipped += 1
            return False
        try:
            _, dim, dtype = header_info(blob)
        except Exception as exc:
            raise StoreError(f"record {img_id!r}: not a valid encoded record ({exc})") from exc
        if dtype != self.features_dtype:
            raise StoreError(
                f"record {img_id!r}: {dtype} features, store {self.path} holds {self.features_dtype}"
            )
        self._accept_dim(img_id, dim)
        return self._queue(key, bytes(blob))

    def _queue(self, key: bytes, blob: bytes) -> bool:
        self._pending[key] = blob
        if len(self._pending) >= self.commit_every:
            self.flush()
        return True

    def set_metadata(self, **extra: Any) -> None:
        """Add JSON-serialisable keys to the store metadata (written at the next flush/close)."""
        bad = MANAGED_KEYS & set(extra)
        if bad:
            raise StoreError(f"{self.path}: metadata keys {sorted(bad)} are managed by the writer")
        self._extra_meta.update(normalise_settings(extra) or {})

    def flush(self) -> None:
        """Commit the pending records and the updated metadata in ONE transaction."""
        if self._closed:
            return
        items = list(self._pending.items())

        def body(txn: lmdb.Transaction) -> int:
            meta = parse_metadata(txn.get(META_KEY_B), self.path)
            stored_dim = meta.get("feature_dim")
            if items and stored_dim is not None and self._feature_dim not in (None, stored_dim):
                raise StoreError(
                    f"{self.path}: this writer's records are {self._feature_dim}-d but another writer stored "
                    f"{stored_dim}-d features; the pending records were not written"
                )
            written = 0
            ids_db = self._entry.ids_db
            for key, blob in items:
                if txn.put(key, blob, overwrite=self.overwrite):
                    written += 1
                    txn.put(key, b"", db=ids_db)  # record and index entry commit together
            meta["feature_dim"] = stored_dim if stored_dim is not None else self._feature_dim
            meta["count"] = count_ids(txn, ids_db)
            meta["updated"] = now()
            meta.update(self._extra_meta)
            txn.put(META_KEY_B, json.dumps(meta).encode())
            return written

        written = self._write_txn(body)
        self.written += written
        self.skipped += len(items) - written  # written meanwhile by another process
        self._pending.clear()

    def existing_ids(self) -> set[str]:
        """All image ids already committed or pending."""
        ids = set(iter_keys(self._begin, lambda: self._entry.ids_db))
        ids.update(k.decode("utf-8") for k in self._pending)
        return ids

    def __len__(self) -> int:
        ids_db = self._entry.ids_db
        with self._begin() as txn:
            committed = count_ids(txn, ids_db)
            new_pending = sum(1 for k in self._pending if not has_id(txn, ids_db, k))
        return committed + new_pending

    @property
    def metadata(self) -> dict:
        with self._begin() as txn:
            return parse_metadata(txn.get(META_KEY_B), self.path)

    def close(self) -> None:
        """Flush pending records, update the metadata (count, updated) and close the environment."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            if self._pid == os.getpid():
                release_env(self.path)

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # keep the complete records written before the failure; never mask the original error
            self.close()
        except Exception as close_exc:  # noqa: BLE001
            if as_disk_full(close_exc, self.path) is None:  # a full disk: the error being raised says so
                log.error(
                    "%s: could not flush pending records after %s: %s",
                    self.path,
                    exc_type.__name__,
                    close_exc,
                )
            if not self._closed:
                self._closed = True
                release_env(self.path)

    def __repr__(self) -> str:
        return f"FeatureWriter({str(self.path)!r}, features_dtype={self.features_dtype!r}, overwrite={self.overwrite})"
