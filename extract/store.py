"""The LMDB feature store: extraction's output contract, read by every task.

Layout
------
One LMDB environment per store (a directory holding ``data.mdb`` and ``lock.mdb``). One record per image:
key = the image id (UTF-8), value = a safetensors blob (no pickle: loading a store downloaded from someone
else never runs code) holding

* ``features``  ``(n, D)`` float32 (or float16 when the store was written with ``features_dtype="float16"``);
  ``D`` is 2048 for LXMERT's detector, any ``D >= 1`` for small test detectors;
* ``boxes``     ``(n, 4)`` float32, ``x1, y1, x2, y2`` in ORIGINAL image pixels (not resized, not normalised);
* ``obj_ids``   ``(n,)`` int64 Visual Genome object class ids (0..1599), ``obj_conf`` ``(n,)`` float32;
* ``attr_ids``  ``(n,)`` int64 Visual Genome attribute ids (0..399), ``attr_conf`` ``(n,)`` float32;

and, in the safetensors header metadata, ``img_h`` and ``img_w`` (original image size in pixels) plus a CRC32
of the arrays (checked by :func:`verify_store`). ``n`` is usually 36 but may be smaller, even 0.

A sub-database named :data:`IDS_DB_NAME` indexes the ids (id -> empty value, written in the same transaction
as the record), so listing or testing ids never reads the records. A reserved key
(:data:`METADATA_KEY`, never listed as an image) holds the store metadata as JSON: schema
version, features dtype, feature dimension, record count, created/updated timestamps and the extractor's
settings (weights file name and sha256, box-selection rule, image size, ... or ``{"source": "tsv", ...}``)
so that features produced by different extractors are never mixed silently.

Readers (:class:`FeatureStore`) open the environment lazily in each process, read-only, without the lock
file and without readahead, so they are safe in DataLoader workers (fork or spawn) and their memory does not
grow with the number of records read. Writers (:class:`FeatureWriter`) batch records into transactions,
grow the map when it is full, resume an existing store, and may run in several processes at once on one
store (LMDB's own writer lock serialises the transactions).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import threading
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import safetensors.numpy as stnp

__all__ = [
    "SCHEMA_VERSION",
    "FIELDS",
    "METADATA_KEY",
    "IDS_DB_NAME",
    "StoreError",
    "StoreSettingsMismatch",
    "encode_record",
    "decode_record",
    "FeatureStore",
    "FeatureWriter",
    "VerifyReport",
    "open_metadata",
    "verify_store",
    "merge_stores",
    "export_h5",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION: int = 1
FIELDS = ("features", "boxes", "obj_ids", "obj_conf", "attr_ids", "attr_conf")
#: Reserved LMDB key of the store metadata (JSON). Not a valid image id.
METADATA_KEY = "__lxmert_feature_store__"
_META_KEY_B = METADATA_KEY.encode("utf-8")
#: Name of the LMDB sub-database indexing the image ids (key = id, empty value). Listing or testing ids in
#: it touches only small pages: py-lmdb pages in a record's whole value whenever a cursor lands on its key,
#: so listing ids from the records themselves would read the entire store.
IDS_DB_NAME = "__lxmert_feature_store_ids__"
_IDS_DB_B = IDS_DB_NAME.encode("utf-8")
_RESERVED_KEYS = (_META_KEY_B, _IDS_DB_B)
FEATURES_DTYPES = ("float32", "float16")
#: dtype of every field but ``features`` (whose dtype is the store's ``features_dtype``).
_FIELD_DTYPES = {
    "boxes": np.float32,
    "obj_ids": np.int64,
    "obj_conf": np.float32,
    "attr_ids": np.int64,
    "attr_conf": np.float32,
}
_DATA_FILE = "data.mdb"
_LOCK_FILE = "lock.mdb"
_MAX_RETRIES = 64


class StoreError(Exception):
    """A store or a record is unusable; the message names the store path and/or the image id."""


class StoreSettingsMismatch(StoreError):
    """An existing store was written with different extractor settings (or features dtype)."""


# --------------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------------


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _crc(arrays: dict[str, np.ndarray]) -> int:
    crc = 0
    for name in FIELDS:
        crc = zlib.crc32(np.ascontiguousarray(arrays[name]).tobytes(), crc)
    return crc


def _as_array(record: dict, name: str, img_id: str) -> np.ndarray:
    if name not in record:
        raise StoreError(f"record {img_id!r}: missing field {name!r} (a record needs {', '.join(FIELDS)})")
    value = record[name]
    if hasattr(value, "detach"):  # torch tensor: move to CPU numpy without importing torch here
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise StoreError(f"record {img_id!r}: field {name!r} has non-numeric dtype {arr.dtype}")
    return arr


def _check_size(record: dict, name: str, img_id: str) -> int:
    if name not in record:
        raise StoreError(f"record {img_id!r}: missing {name!r} (original image size in pixels)")
    try:
        value = int(record[name])
    except (TypeError, ValueError) as exc:
        raise StoreError(f"record {img_id!r}: {name}={record[name]!r} is not an integer") from exc
    if value <= 0 or value != float(record[name]):
        raise StoreError(f"record {img_id!r}: {name}={record[name]!r} must be a positive integer")
    return value


def _validated_arrays(
    record: dict, features_dtype: str, img_id: str
) -> tuple[dict[str, np.ndarray], int, int]:
    if features_dtype not in FEATURES_DTYPES:
        raise StoreError(f"features_dtype must be one of {FEATURES_DTYPES}, got {features_dtype!r}")
    img_h = _check_size(record, "img_h", img_id)
    img_w = _check_size(record, "img_w", img_id)
    feats = _as_array(record, "features", img_id)
    if feats.ndim != 2 or feats.shape[1] < 1:
        raise StoreError(f"record {img_id!r}: features must have shape (n, D) with D >= 1, got {feats.shape}")
    if feats.dtype.kind != "f":
        raise StoreError(f"record {img_id!r}: features must be floating point, got {feats.dtype}")
    n = feats.shape[0]
    out = {"features": np.ascontiguousarray(feats, dtype=features_dtype)}
    if features_dtype == "float16" and feats.dtype != np.float16:
        if not np.isfinite(out["features"]).all() and np.isfinite(feats).all():
            raise StoreError(
                f"record {img_id!r}: features overflow float16 (|x| > 65504); store float32 instead"
            )
    for name, dtype in _FIELD_DTYPES.items():
        arr = _as_array(record, name, img_id)
        want = (n, 4) if name == "boxes" else (n,)
        if arr.shape != want:
            raise StoreError(
                f"record {img_id!r}: {name} must have shape {want} (n={n} from features), got {arr.shape}"
            )
        if dtype is np.int64 and arr.dtype.kind not in "iub":
            raise StoreError(f"record {img_id!r}: {name} must be integer class ids, got dtype {arr.dtype}")
        if dtype is np.float32 and arr.dtype.kind not in "fiu":
            raise StoreError(f"record {img_id!r}: {name} must be floating point, got dtype {arr.dtype}")
        out[name] = np.ascontiguousarray(arr, dtype=dtype)
    return out, img_h, img_w


def encode_record(record: dict, features_dtype: str = "float32", *, img_id: str = "?") -> bytes:
    """Serialise one image's regions to a safetensors blob.

    ``record`` holds the six :data:`FIELDS` as arrays (numpy or CPU torch) plus ``img_h``/``img_w`` (ints,
    original image size in pixels): ``features`` ``(n, D)`` float, ``boxes`` ``(n, 4)`` x1,y1,x2,y2 in
    original pixels, ``obj_ids``/``attr_ids`` ``(n,)`` int, ``obj_conf``/``attr_conf`` ``(n,)`` float.
    Features are cast to ``features_dtype`` ("float32" or "float16"), boxes/confidences to float32, ids to
    int64. Raises :class:`StoreError` naming the field (and ``img_id``) when a shape or dtype is wrong.
    """
    arrays, img_h, img_w = _validated_arrays(record, features_dtype, img_id)
    meta = {
        "img_h": str(img_h),
        "img_w": str(img_w),
        "schema_version": str(SCHEMA_VERSION),
        "crc32": str(_crc(arrays)),
    }
    return stnp.save(arrays, metadata=meta)


def _read_header(blob: bytes | memoryview) -> dict:
    """The JSON header of a safetensors blob (raises ValueError when it is not one)."""
    if len(blob) < 8:
        raise ValueError(f"{len(blob)} bytes is too short for a safetensors blob")
    size = int.from_bytes(bytes(blob[:8]), "little")
    if size <= 0 or 8 + size > len(blob):
        raise ValueError(f"header length {size} does not fit in a {len(blob)}-byte blob")
    header = json.loads(bytes(blob[8 : 8 + size]))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header


def _header_info(blob: bytes | memoryview) -> tuple[int, int, str]:
    """``(n, D, features dtype name)`` from a record's header without decoding its arrays."""
    info = _read_header(blob)["features"]
    n, dim = info["shape"]
    return int(n), int(dim), {"F32": "float32", "F16": "float16"}.get(info["dtype"], info["dtype"])


def decode_record(blob: bytes, img_id: str = "?", *, check_crc: bool = False) -> dict:
    """Decode a blob written by :func:`encode_record`.

    Returns the six :data:`FIELDS` as numpy arrays (``features`` in the stored dtype, boxes in original
    pixels x1,y1,x2,y2) plus ``img_h``, ``img_w`` and ``num_boxes`` (ints). ``check_crc=True`` also checks
    the arrays' CRC32 (catches flipped bits inside the data). Raises :class:`StoreError` naming ``img_id``
    when the blob is corrupt.
    """
    try:
        header = _read_header(blob)
        arrays = stnp.load(bytes(blob))
    except Exception as exc:  # safetensors raises its own error types; all mean "corrupt"
        raise StoreError(
            f"record {img_id!r}: corrupt safetensors blob ({type(exc).__name__}: {exc}); "
            "re-extract or re-import this image"
        ) from exc
    meta = header.get("__metadata__") or {}
    try:
        img_h, img_w = int(meta["img_h"]), int(meta["img_w"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"record {img_id!r}: header metadata lacks a valid img_h/img_w ({meta!r})") from exc
    missing = [name for name in FIELDS if name not in arrays]
    if missing:
        raise StoreError(f"record {img_id!r}: missing arrays {missing}; re-extract or re-import this image")
    feats = arrays["features"]
    if feats.ndim != 2 or feats.dtype not in (np.float32, np.float16):
        raise StoreError(f"record {img_id!r}: features have shape {feats.shape} dtype {feats.dtype}")
    n = feats.shape[0]
    for name, dtype in _FIELD_DTYPES.items():
        want = (n, 4) if name == "boxes" else (n,)
        if arrays[name].shape != want or arrays[name].dtype != dtype:
            raise StoreError(
                f"record {img_id!r}: {name} has shape {arrays[name].shape} dtype {arrays[name].dtype}, "
                f"expected {want} {np.dtype(dtype)}"
            )
    if check_crc and "crc32" in meta and str(_crc(arrays)) != meta["crc32"]:
        raise StoreError(f"record {img_id!r}: CRC32 mismatch, the stored arrays are corrupt; re-extract it")
    out: dict[str, Any] = {name: arrays[name] for name in FIELDS}
    out["img_h"], out["img_w"], out["num_boxes"] = img_h, img_w, n
    return out


def normalize_boxes(boxes: np.ndarray, img_h: int, img_w: int) -> np.ndarray:
    """Pixel boxes ``(n, 4)`` x1,y1,x2,y2 -> ``[0, 1]`` (x / img_w, y / img_h), clipped, float32."""
    scale = np.array([img_w, img_h, img_w, img_h], dtype=np.float32)
    return np.clip(boxes.astype(np.float32) / scale, 0.0, 1.0)


# --------------------------------------------------------------------------------------------------------
# Helpers shared by reader and writer
# --------------------------------------------------------------------------------------------------------


def _key(img_id: str) -> bytes:
    if not isinstance(img_id, str):
        raise TypeError(f"image ids are str, got {type(img_id).__name__} {img_id!r}")
    return img_id.encode("utf-8")


def _check_store_dir(path: Path, *, must_exist: bool) -> None:
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
    if _DATA_FILE not in names:
        if must_exist or names - {_LOCK_FILE}:
            raise StoreError(
                f"{path}: not an LMDB feature store (no {_DATA_FILE}; found {sorted(names)[:5]}); "
                "give an empty or new directory"
            )


@dataclass
class _SharedEnv:
    env: lmdb.Environment
    ids_db: Any  # the ids sub-database handle, None for a store written without one
    pid: int
    writable: bool
    users: int = 0
    # Held by every reader transaction and by re-map/upgrade, so a handle is never closed under a live read.
    lock: threading.RLock = field(default_factory=threading.RLock)


# One LMDB environment per store and process: LMDB (and py-lmdb's guard) forbid opening the same files twice
# in one process, so readers and writers of one store in one process share the handle. A handle inherited
# through fork is closed in the child (that only unmaps the child's copy) and re-opened there.
_ENVS: dict[str, _SharedEnv] = {}
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
            for _ in range(_MAX_RETRIES):
                try:
                    return env, env.open_db(_IDS_DB_B, create=True)
                except lmdb.MapResizedError:
                    env.set_mapsize(0)
        with env.begin() as txn:
            if txn.get(_IDS_DB_B) is None:  # older layout: no index
                return env, None
        return env, env.open_db(_IDS_DB_B, create=False)
    except lmdb.Error as exc:
        env.close()
        raise StoreError(f"{path}: cannot open the ids index of the store ({exc})") from exc


def _acquire_env(
    path: Path, *, writable: bool, register: bool, map_size: int = 1 << 30, key: str | None = None
) -> _SharedEnv:
    """The process's shared environment of the store at ``path`` (opened, re-opened or upgraded as needed).

    ``register=True`` counts the caller as a user (released by :func:`_release_env`). ``key``: the
    resolved path when the caller has it cached.
    """
    key = key or os.path.realpath(path)
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is not None and entry.pid != os.getpid():  # inherited through fork
            with contextlib.suppress(Exception):
                entry.env.close()
            del _ENVS[key]
            entry = None
        if entry is not None and writable and not entry.writable:  # a reader's handle: re-open read-write
            with entry.lock:
                entry.env.close()
                try:
                    entry.env, entry.ids_db = _open_env(path, True, map_size)
                except BaseException:
                    del _ENVS[key]
                    raise
                entry.writable = True
        if entry is None:
            if not writable:
                _check_store_dir(path, must_exist=True)
            entry = _SharedEnv(*_open_env(path, writable, map_size), os.getpid(), writable)
            _ENVS[key] = entry
        if register:
            entry.users += 1
        return entry


def _remap_reader_env(entry: _SharedEnv, path: Path) -> bool:
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
                _ENVS.pop(os.path.realpath(path), None)
            raise
        return True


@contextlib.contextmanager
def _read_txn(entry: _SharedEnv) -> Iterator[lmdb.Transaction]:
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


def _release_env(path: Path, key: str | None = None) -> None:
    key = key or os.path.realpath(path)
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is None or entry.pid != os.getpid():
            return
        entry.users -= 1
        if entry.users <= 0:
            entry.env.close()
            del _ENVS[key]


def _parse_metadata(raw: bytes | None, path: Path) -> dict:
    if raw is None:
        raise StoreError(f"{path}: LMDB environment has no {METADATA_KEY!r} key; it is not a feature store")
    try:
        meta = json.loads(bytes(raw))
    except ValueError as exc:
        raise StoreError(f"{path}: store metadata is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise StoreError(f"{path}: store metadata is not a JSON object")
    version = meta.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: store schema version {version!r} is not supported (this code reads <= {SCHEMA_VERSION}); "
            "upgrade the package"
        )
    return meta


def _normalise_settings(settings: dict | None) -> dict | None:
    """JSON round trip so tuples/lists and int/float compare as they will once stored."""
    if settings is None:
        return None
    try:
        return json.loads(json.dumps(settings, sort_keys=True))
    except TypeError as exc:
        raise StoreError(f"extractor settings must be JSON-serialisable: {exc}") from exc


def _settings_diff(stored: dict | None, given: dict | None) -> list[str]:
    stored, given = stored or {}, given or {}
    return sorted(
        k for k in set(stored) | set(given) if stored.get(k, "<absent>") != given.get(k, "<absent>")
    )


def open_metadata(path: str | os.PathLike) -> dict:
    """Read a store's metadata (schema_version, features_dtype, feature_dim, count, extractor, ...)."""
    path = Path(path)
    entry = _acquire_env(path, writable=False, register=True)
    try:
        with _read_txn(entry) as txn:
            return _parse_metadata(txn.get(_META_KEY_B), path)
    finally:
        _release_env(path)


# --------------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------------


class FeatureStore:
    """Read-only access to a store: ``store[img_id] -> record dict``.

    The LMDB environment is opened lazily and re-opened in every new process (the pid is checked on each
    access), so a store created before ``fork`` or pickled into DataLoader workers is safe. It is opened
    read-only, without the lock file (the store must not be written while it is read) and without
    readahead; each access copies one record out of the memory map, so the process's private memory does
    not grow with the number of records read. File pages touched through the map count in RSS (shared,
    reclaimable page cache; the kernel may map ~1 MiB around each random read); to keep RSS flat too, the
    map is re-opened every ``remap_every_bytes`` read (default 8 MiB, ~0.1 ms each; 0 disables; never
    while a writer of this process shares the handle). Ids are listed and tested through a small index
    sub-database, so ``len``, ``in`` and iteration never page in the records.

    Records are dicts of numpy arrays, see :func:`decode_record`; with ``normalize_boxes=True`` the boxes are
    divided by ``[img_w, img_h, img_w, img_h]`` and clipped to [0, 1].
    """

    def __init__(
        self, path: str | os.PathLike, normalize_boxes: bool = False, *, remap_every_bytes: int = 8 << 20
    ):
        self.path = Path(path)
        self.normalize_boxes = normalize_boxes
        self.remap_every_bytes = remap_every_bytes
        self._key = os.path.realpath(self.path)
        self._registered_pid: int | None = None
        self._metadata: dict | None = None
        self._bytes_since_map = 0
        self._entry()  # fail fast on a bad path; re-opened lazily in other processes

    # -- process-local environment ------------------------------------------------------------------
    def _entry(self) -> _SharedEnv:
        pid = os.getpid()
        entry = _ENVS.get(self._key)
        if entry is not None and entry.pid == pid and self._registered_pid == pid:
            return entry  # fast path: no registry lock, no syscalls beyond getpid
        entry = _acquire_env(self.path, writable=False, register=self._registered_pid != pid, key=self._key)
        self._registered_pid = pid
        return entry

    def _begin(self) -> contextlib.AbstractContextManager[lmdb.Transaction]:
        return _read_txn(self._entry())

    def _count_read(self, nbytes: int) -> None:
        """Re-map every ``remap_every_bytes`` read so touched file pages do not pile up in this process's RSS."""
        self._bytes_since_map += nbytes
        if self.remap_every_bytes and self._bytes_since_map >= self.remap_every_bytes:
            self._bytes_since_map = 0
            _remap_reader_env(self._entry(), self.path)

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
            with self._begin() as txn:
                self._metadata = _parse_metadata(txn.get(_META_KEY_B), self.path)
        return dict(self._metadata)

    def _raw(self, img_id: str) -> bytes | None:
        key = _key(img_id)
        if key in _RESERVED_KEYS:
            return None
        with self._begin() as txn:
            blob = txn.get(key)
        if blob is not None:
            self._count_read(len(blob))
        return blob

    def __getitem__(self, img_id: str) -> dict:
        blob = self._raw(img_id)
        if blob is None:
            raise KeyError(f"image id {img_id!r} is not in the feature store {self.path}")
        record = decode_record(blob, img_id)
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
        if not isinstance(img_id, str) or _key(img_id) in _RESERVED_KEYS:
            return False
        entry = self._entry()
        with _read_txn(entry) as txn:
            return _has_id(txn, entry.ids_db, _key(img_id))

    def __len__(self) -> int:
        entry = self._entry()
        with _read_txn(entry) as txn:
            return _count_ids(txn, entry.ids_db)

    def __iter__(self) -> Iterator[str]:
        """Image ids in sorted (UTF-8 byte) order, read in chunks so no transaction stays open."""
        return _iter_keys(self._begin, lambda: self._entry().ids_db)

    def ids(self) -> list[str]:
        return list(self)

    def close(self) -> None:
        if self._registered_pid == os.getpid():
            _release_env(self.path, self._key)
        self._registered_pid = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, normalize_boxes={self.normalize_boxes})"


def _has_id(txn: lmdb.Transaction, ids_db: Any, key: bytes) -> bool:
    """Whether image ``key`` is stored (looked up in the ids index when the store has one)."""
    if ids_db is not None:
        return txn.get(key, db=ids_db) is not None
    return txn.cursor().set_key(key)  # no index: lands on the record (pages its value in)


def _count_ids(txn: lmdb.Transaction, ids_db: Any) -> int:
    if ids_db is not None:
        return txn.stat(ids_db)["entries"]
    return txn.stat()["entries"] - sum(txn.get(k) is not None for k in _RESERVED_KEYS)


def _iter_keys(begin, ids_db, chunk: int = 1024) -> Iterator[str]:
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
            if key not in _RESERVED_KEYS:
                yield key.decode("utf-8", errors="backslashreplace")
        if len(keys) < chunk:
            return
        last = keys[-1]


# --------------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------------


class FeatureWriter:
    """Create or resume a store and add records in batched transactions.

    * ``extractor``: the extractor's settings (JSON-serialisable dict). Stored on creation; when the store
      exists and holds different settings, :class:`StoreSettingsMismatch` names the differing keys.
    * ``features_dtype``: "float32" or "float16"; must match an existing store's.
    * ``overwrite``: False (resume): ids already present are skipped by :meth:`put`; True: re-put ids are
      replaced (ids not re-put stay).
    * ``commit_every``: records per transaction; ``map_size``: initial LMDB map size in bytes (grown by
      doubling whenever it is full).

    Each transaction is atomic: a record is either fully written or absent. Several processes may write
    into one store concurrently (e.g. one per torchrun rank): LMDB's writer lock serialises their
    transactions, a full map is grown and the transaction retried, and a map grown by another process is
    adopted. Use as a context manager or call :meth:`close` (flushes and updates the metadata count).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        extractor: dict | None = None,
        *,
        features_dtype: str = "float32",
        overwrite: bool = False,
        commit_every: int = 64,
        map_size: int = 1 << 30,
    ):
        if features_dtype not in FEATURES_DTYPES:
            raise StoreError(f"features_dtype must be one of {FEATURES_DTYPES}, got {features_dtype!r}")
        if commit_every < 1:
            raise StoreError(f"commit_every must be >= 1, got {commit_every}")
        self.path = Path(path)
        self.features_dtype = features_dtype
        self.overwrite = overwrite
        self.commit_every = commit_every
        self.extractor = _normalise_settings(extractor)
        self.written = 0  # records committed by this writer
        self.skipped = 0  # puts skipped because the id was already present
        self.map_grows = 0
        self._pending: dict[bytes, bytes] = {}
        self._extra_meta: dict[str, Any] = {}
        self._feature_dim: int | None = None
        self._closed = False

        _check_store_dir(self.path, must_exist=False)
        self.path.mkdir(parents=True, exist_ok=True)
        self._entry = _acquire_env(
            self.path, writable=True, register=True, map_size=max(int(map_size), 1 << 16)
        )
        self._pid = os.getpid()
        try:
            self._init_metadata()
        except BaseException:
            self._closed = True
            _release_env(self.path)
            raise

    # -- LMDB plumbing ------------------------------------------------------------------------------
    @property
    def _env(self) -> lmdb.Environment:
        return self._entry.env

    def _set_mapsize(self, size: int) -> None:
        with self._entry.lock:  # no reader transaction of this process is live while the map changes
            self._env.set_mapsize(size)

    def _begin(self, write: bool = False) -> lmdb.Transaction:
        for _ in range(_MAX_RETRIES):
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
        for _ in range(_MAX_RETRIES):
            try:
                with self._begin(write=True) as txn:
                    return body(txn)
            except lmdb.MapFullError:
                self._grow()
            except lmdb.MapResizedError:
                self._set_mapsize(0)
        raise StoreError(f"{self.path}: transaction failed {_MAX_RETRIES} times (map full / resized)")

    def _init_metadata(self) -> None:
        def body(txn: lmdb.Transaction) -> dict:
            raw = txn.get(_META_KEY_B)
            if raw is None:
                if _count_ids(txn, None) > 0:
                    raise StoreError(
                        f"{self.path}: LMDB environment holds data but no store metadata; not a feature store"
                    )
                now = _now()
                meta = {
                    "format": "lxmert-feature-store",
                    "schema_version": SCHEMA_VERSION,
                    "features_dtype": self.features_dtype,
                    "feature_dim": None,
                    "count": 0,
                    "extractor": self.extractor,
                    "fields": list(FIELDS),
                    "boxes": "x1,y1,x2,y2 in original image pixels",
                    "ids_index": IDS_DB_NAME,
                    "created": now,
                    "updated": now,
                }
                txn.put(_META_KEY_B, json.dumps(meta).encode())
                return meta
            meta = _parse_metadata(raw, self.path)
            if not meta.get("ids_index"):  # written without the ids index: build it once
                ids_db = self._entry.ids_db
                for key in txn.cursor().iternext(keys=True, values=False):
                    if key not in _RESERVED_KEYS:
                        txn.put(key, b"", db=ids_db)
                meta["ids_index"] = IDS_DB_NAME
                txn.put(_META_KEY_B, json.dumps(meta).encode())
            if meta.get("features_dtype") != self.features_dtype:
                raise StoreSettingsMismatch(
                    f"{self.path}: store holds {meta.get('features_dtype')} features, writer asked for "
                    f"{self.features_dtype}; open it with features_dtype={meta.get('features_dtype')!r} "
                    "or write a new store"
                )
            if self.extractor is not None:
                stored = meta.get("extractor")
                if stored is None:
                    meta["extractor"] = self.extractor
                    txn.put(_META_KEY_B, json.dumps(meta).encode())
                elif stored != self.extractor:
                    keys = _settings_diff(stored, self.extractor)
                    details = ", ".join(
                        f"{k}: stored {stored.get(k, '<absent>')!r} vs given {self.extractor.get(k, '<absent>')!r}"
                        for k in keys
                    )
                    raise StoreSettingsMismatch(
                        f"{self.path}: existing store was written with different extractor settings "
                        f"({details}); use a new store path or the same settings"
                    )
            return meta

        meta = self._write_txn(body)
        self._feature_dim = meta.get("feature_dim")
        if self.extractor is None:
            self.extractor = meta.get("extractor")

    # -- public API ---------------------------------------------------------------------------------
    def __contains__(self, img_id: str) -> bool:
        key = _key(img_id)
        if key in self._pending:
            return True
        with self._begin() as txn:
            return _has_id(txn, self._entry.ids_db, key)

    def _check_put(self, img_id: str) -> bytes:
        if self._closed:
            raise StoreError(f"{self.path}: writer is closed; cannot put {img_id!r}")
        key = _key(img_id)
        if not img_id or key in _RESERVED_KEYS:
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
            _, dim, dtype = _header_info(blob)
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
        reserved = {
            "schema_version",
            "features_dtype",
            "feature_dim",
            "count",
            "extractor",
            "created",
            "ids_index",
        }
        bad = reserved & set(extra)
        if bad:
            raise StoreError(f"{self.path}: metadata keys {sorted(bad)} are managed by the writer")
        self._extra_meta.update(_normalise_settings(extra) or {})

    def flush(self) -> None:
        """Commit the pending records and the updated metadata in ONE transaction."""
        if self._closed:
            return
        items = list(self._pending.items())

        def body(txn: lmdb.Transaction) -> int:
            meta = _parse_metadata(txn.get(_META_KEY_B), self.path)
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
            meta["count"] = _count_ids(txn, ids_db)
            meta["updated"] = _now()
            meta.update(self._extra_meta)
            txn.put(_META_KEY_B, json.dumps(meta).encode())
            return written

        written = self._write_txn(body)
        self.written += written
        self.skipped += len(items) - written  # written meanwhile by another process
        self._pending.clear()

    def existing_ids(self) -> set[str]:
        """All image ids already committed or pending."""
        ids = set(_iter_keys(self._begin, lambda: self._entry.ids_db))
        ids.update(k.decode("utf-8") for k in self._pending)
        return ids

    def __len__(self) -> int:
        ids_db = self._entry.ids_db
        with self._begin() as txn:
            committed = _count_ids(txn, ids_db)
            new_pending = sum(1 for k in self._pending if not _has_id(txn, ids_db, k))
        return committed + new_pending

    @property
    def metadata(self) -> dict:
        with self._begin() as txn:
            return _parse_metadata(txn.get(_META_KEY_B), self.path)

    def close(self) -> None:
        """Flush pending records, update the metadata (count, updated) and close the environment."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            if self._pid == os.getpid():
                _release_env(self.path)

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # keep the complete records written before the failure; never mask the original error
            self.close()
        except Exception as close_exc:  # noqa: BLE001
            log.error(
                "%s: could not flush pending records after %s: %s", self.path, exc_type.__name__, close_exc
            )
            if not self._closed:
                self._closed = True
                _release_env(self.path)

    def __repr__(self) -> str:
        return f"FeatureWriter({str(self.path)!r}, features_dtype={self.features_dtype!r}, overwrite={self.overwrite})"


# --------------------------------------------------------------------------------------------------------
# Whole-store operations: verify, merge, export
# --------------------------------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_store`: ``checked`` records decoded, ``bad`` = [(img_id, reason), ...]."""

    path: str = ""
    checked: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad


def _record_problems(rec: dict, meta: dict, tol: float = 0.5) -> list[str]:
    problems = []
    n, dim = rec["features"].shape
    if meta.get("feature_dim") not in (None, dim):
        problems.append(f"feature dim {dim} != store's {meta['feature_dim']}")
    if meta.get("features_dtype") and rec["features"].dtype != np.dtype(meta["features_dtype"]):
        problems.append(f"features dtype {rec['features'].dtype} != store's {meta['features_dtype']}")
    for name in ("features", "boxes", "obj_conf", "attr_conf"):
        if not np.isfinite(rec[name]).all():
            problems.append(f"non-finite values in {name}")
    boxes, w, h = rec["boxes"], rec["img_w"], rec["img_h"]
    if n and np.isfinite(boxes).all():
        x1, y1, x2, y2 = boxes.T
        if (x1 < -tol).any() or (y1 < -tol).any() or (x2 > w + tol).any() or (y2 > h + tol).any():
            problems.append(f"boxes outside the {w}x{h} image")
        if (x2 < x1).any() or (y2 < y1).any():
            problems.append("boxes with x2 < x1 or y2 < y1")
    for name in ("obj_ids", "attr_ids"):
        if n and (rec[name] < 0).any():
            problems.append(f"negative {name}")
    return problems


def verify_store(path: str | os.PathLike, progress: bool = False) -> VerifyReport:
    """Decode every record (CRC checked), check shapes, finite values, boxes inside the image.

    Store-level problems (metadata count or ids index disagreeing with the records) are reported with the
    id ``"<metadata>"``. Raises :class:`StoreError` only when the store cannot be opened at all.
    """
    store = FeatureStore(path)
    report = VerifyReport(path=str(path))
    try:
        meta = store.metadata
        total = len(store)
        entry = store._entry()
        with _read_txn(entry) as txn:
            records = _count_ids(txn, None)
        if entry.ids_db is None:
            report.bad.append(
                ("<metadata>", "no ids index; open the store once with a FeatureWriter to build it")
            )
        elif records != total:
            report.bad.append(
                ("<metadata>", f"ids index lists {total} ids but the store holds {records} records")
            )
        bar = _progress(total, progress, "verify")
        for img_id in store:
            report.checked += 1
            bar.update(1)
            blob = store.get_raw(img_id)
            if blob is None:
                report.bad.append((img_id, "listed in the ids index but has no record"))
                continue
            try:
                rec = decode_record(blob, img_id, check_crc=True)
            except StoreError as exc:
                report.bad.append((img_id, str(exc)))
                continue
            problems = _record_problems(rec, meta)
            if problems:
                report.bad.append((img_id, "; ".join(problems)))
        bar.close()
        if meta.get("count") != report.checked:
            report.bad.append(
                ("<metadata>", f"metadata count {meta.get('count')} != {report.checked} records")
            )
    finally:
        store.close()
    return report


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


def merge_stores(
    out: str | os.PathLike,
    inputs: Iterable[str | os.PathLike],
    overwrite: bool = False,
    *,
    force: bool = False,
    progress: bool = False,
    map_size: int = 1 << 30,
) -> int:
    """Copy every record of ``inputs`` into ``out`` (created or resumed); returns the records written.

    Inputs (and an existing ``out``) must share extractor settings and features dtype, else
    :class:`StoreSettingsMismatch` names them; ``force=True`` merges anyway (records of another dtype are
    re-encoded, ``out`` keeps the first store's settings and lists every input under ``merged_from``).
    Feature dims must always agree. Ids present in several inputs: the first wins unless ``overwrite``.
    """
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise StoreError("merge needs at least one input store")
    metas = [open_metadata(p) for p in inputs]
    out = Path(out)
    out_meta = open_metadata(out) if (out / _DATA_FILE).exists() else None
    ref_meta, ref_name = (out_meta, str(out)) if out_meta is not None else (metas[0], str(inputs[0]))
    dims = {m.get("feature_dim") for m in metas + ([out_meta] if out_meta else [])} - {None}
    if len(dims) > 1:
        raise StoreError(
            f"cannot merge stores with different feature dims {sorted(dims)}: {[str(p) for p in inputs]}"
        )
    for p, m in zip(inputs, metas):
        diff = _settings_diff(ref_meta.get("extractor"), m.get("extractor"))
        if diff and not force:
            raise StoreSettingsMismatch(
                f"{p}: extractor settings differ from {ref_name} in {diff}; features from different "
                "extractors should not be mixed (pass force=True / --force to merge anyway)"
            )
        if m.get("features_dtype") != ref_meta.get("features_dtype") and not force:
            raise StoreSettingsMismatch(
                f"{p}: {m.get('features_dtype')} features, {ref_name} has {ref_meta.get('features_dtype')} "
                "(pass force=True / --force to convert)"
            )
    dtype = ref_meta.get("features_dtype", "float32")
    total = sum(int(m.get("count") or 0) for m in metas)
    with FeatureWriter(
        out, ref_meta.get("extractor"), features_dtype=dtype, overwrite=overwrite, map_size=map_size
    ) as writer:
        previous = (out_meta or {}).get("merged_from", [])
        writer.set_metadata(
            merged_from=previous
            + [
                {"path": str(p), "extractor": m.get("extractor"), "count": m.get("count")}
                for p, m in zip(inputs, metas)
            ]
        )
        bar = _progress(total, progress, "merge")
        for p, m in zip(inputs, metas):
            store = FeatureStore(p)
            try:
                for img_id in store:
                    bar.update(1)
                    blob = store.get_raw(img_id)
                    if blob is None:
                        continue
                    if m.get("features_dtype") == dtype:
                        writer.put_encoded(img_id, blob)
                    else:
                        writer.put(img_id, decode_record(blob, img_id))
            finally:
                store.close()
        bar.close()
    return writer.written


def export_h5(store_path: str | os.PathLike, out_h5: str | os.PathLike, progress: bool = False) -> int:
    """Write every record to an HDF5 file: one group per image id, returns the number of images.

    Each group holds the six :data:`FIELDS` as datasets (boxes in original pixels, x1,y1,x2,y2) and the
    attributes ``img_h``, ``img_w``, ``num_boxes``, ``img_id``; ``/`` in an id is written as ``%2F`` in the
    group name. The root attribute ``metadata`` holds the store metadata as JSON.
    """
    import h5py

    store = FeatureStore(store_path)
    count = 0
    try:
        meta = store.metadata
        bar = _progress(len(store), progress, "export-h5")
        with h5py.File(out_h5, "w") as h5:
            h5.attrs["metadata"] = json.dumps(meta)
            for img_id in store:
                rec = store[img_id]
                group = h5.create_group(img_id.replace("/", "%2F"))
                for name in FIELDS:
                    group.create_dataset(name, data=rec[name])
                group.attrs["img_h"], group.attrs["img_w"] = rec["img_h"], rec["img_w"]
                group.attrs["num_boxes"], group.attrs["img_id"] = rec["num_boxes"], img_id
                count += 1
                bar.update(1)
        bar.close()
    finally:
        store.close()
    return count


def store_size_bytes(path: str | os.PathLike) -> int:
    """Bytes used on disk by the store's files (data.mdb, lock.mdb)."""
    total = 0
    for name in (_DATA_FILE, _LOCK_FILE):
        p = Path(path) / name
        if p.exists():
            st = p.stat()
            total += min(st.st_size, getattr(st, "st_blocks", st.st_size // 512 + 1) * 512)
    return total
