"""The region record: what the feature store holds per image, and its safetensors codec.

This is the contract between extraction and the task datasets: a dataset reads records through
:class:`extract.store.FeatureStore` and relies on the names, dtypes and shapes declared here (:data:`SCHEMA`,
:class:`Record`), nothing else.

One record per image, ``n`` regions (usually 36, possibly fewer, even 0), ``D`` features per region (2048 for
LXMERT's detector, any ``D >= 1`` for small test detectors):

=============  ==========  ========  =====================================================================
field          shape       dtype     meaning
=============  ==========  ========  =====================================================================
``features``   ``(n, D)``  float32   region features (float16 in a store written with ``features_dtype``
                                     ``"float16"``)
``boxes``      ``(n, 4)``  float32   ``x1, y1, x2, y2`` in ORIGINAL image pixels (not resized, not
                                     normalised; :func:`normalize_boxes` gives ``[0, 1]``)
``obj_ids``    ``(n,)``    int64     Visual Genome object class ids (0..1599)
``obj_conf``   ``(n,)``    float32   their confidences
``attr_ids``   ``(n,)``    int64     Visual Genome attribute ids (0..399)
``attr_conf``  ``(n,)``    float32   their confidences
=============  ==========  ========  =====================================================================

plus ``img_h`` and ``img_w`` (original image size in pixels, ints) and, when decoded, ``num_boxes`` (= n).

A blob is safetensors (no pickle: reading a store downloaded from someone else never runs code); ``img_h``,
``img_w``, the schema version and a CRC32 of the arrays live in its header metadata.
"""

from __future__ import annotations

import json
import typing
import zlib
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import numpy as np
import safetensors.numpy as stnp

__all__ = [
    "SCHEMA_VERSION",
    "SCHEMA",
    "FIELDS",
    "FEATURES_DTYPES",
    "FeaturesDtype",
    "FieldSpec",
    "Record",
    "StoreDamaged",
    "StoreError",
    "StoreSettingsMismatch",
    "check_features_dtype",
    "decode_record",
    "encode_record",
    "header_info",
    "normalize_boxes",
    "verify_advice",
]

SCHEMA_VERSION: int = 1

#: The dtypes a store may hold its features in.
FeaturesDtype = Literal["float32", "float16"]
FEATURES_DTYPES: tuple[str, ...] = typing.get_args(FeaturesDtype)


@dataclass(frozen=True)
class FieldSpec:
    """One array of a record: its name, dtype and shape (``"n"`` regions, ``"D"`` feature size)."""

    name: str
    dtype: str | None  # None: the store's features dtype (one of FEATURES_DTYPES)
    shape: tuple[str | int, ...]
    meaning: str

    def expected_shape(self, n: int, dim: int) -> tuple[int, ...]:
        """The concrete shape for ``n`` regions of ``dim`` features."""
        return tuple({"n": n, "D": dim}.get(s, s) if isinstance(s, str) else s for s in self.shape)


#: The six arrays of a record, in storage (and CRC) order.
SCHEMA: tuple[FieldSpec, ...] = (
    FieldSpec("features", None, ("n", "D"), "region features"),
    FieldSpec("boxes", "float32", ("n", 4), "x1, y1, x2, y2 in original image pixels"),
    FieldSpec("obj_ids", "int64", ("n",), "Visual Genome object class ids (0..1599)"),
    FieldSpec("obj_conf", "float32", ("n",), "object class confidences"),
    FieldSpec("attr_ids", "int64", ("n",), "Visual Genome attribute ids (0..399)"),
    FieldSpec("attr_conf", "float32", ("n",), "attribute confidences"),
)
FIELDS: tuple[str, ...] = tuple(spec.name for spec in SCHEMA)
_OTHER_FIELDS = SCHEMA[1:]  # every field but features: fixed dtypes


class Record(TypedDict):
    """What :meth:`extract.store.FeatureStore.__getitem__` (and :func:`decode_record`) returns.

    ``features`` ``(n, D)`` float32 or float16; ``boxes`` ``(n, 4)`` float32 x1,y1,x2,y2 in original pixels
    (in ``[0, 1]`` when the store was opened with ``normalize_boxes=True``); ``obj_ids`` / ``attr_ids``
    ``(n,)`` int64; ``obj_conf`` / ``attr_conf`` ``(n,)`` float32; ``img_h``, ``img_w`` original size in
    pixels; ``num_boxes`` = n.
    """

    features: np.ndarray
    boxes: np.ndarray
    obj_ids: np.ndarray
    obj_conf: np.ndarray
    attr_ids: np.ndarray
    attr_conf: np.ndarray
    img_h: int
    img_w: int
    num_boxes: int


class StoreError(Exception):
    """A store or a record is unusable; the message names the store path and/or the image id."""


def verify_advice(path: object) -> str:
    """What to do about a damaged store: list the damage, then rebuild what it names."""
    return (
        f"run `lxmert-features verify {path}` to list the damaged records, then extract (or import) them again "
        "into a new store"
    )


class StoreDamaged(StoreError):
    """A store whose LMDB pages or records are damaged (a failing disk, a bad copy). Built with
    :meth:`at`: the message names the store, what is damaged (``reason``, which names the image when known) and
    says to run ``lxmert-features verify``."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message

    @classmethod
    def at(cls, path: object, reason: str) -> StoreDamaged:
        return cls(f"{path}: {reason}; {verify_advice(path)}", reason)


class StoreSettingsMismatch(StoreError):
    """An existing store was written with different extractor settings (or features dtype)."""


def check_features_dtype(features_dtype: str) -> str:
    """``features_dtype`` when it is one of :data:`FEATURES_DTYPES`; :class:`StoreError` otherwise."""
    if features_dtype not in FEATURES_DTYPES:
        raise StoreError(f"features_dtype must be one of {FEATURES_DTYPES}, got {features_dtype!r}")
    return features_dtype


# --------------------------------------------------------------------------------------------------- encode
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
    check_features_dtype(features_dtype)
    img_h = _check_size(record, "img_h", img_id)
    img_w = _check_size(record, "img_w", img_id)
    feats = _as_array(record, "features", img_id)
    if feats.ndim != 2 or feats.shape[1] < 1:
        raise StoreError(f"record {img_id!r}: features must have shape (n, D) with D >= 1, got {feats.shape}")
    if feats.dtype.kind != "f":
        raise StoreError(f"record {img_id!r}: features must be floating point, got {feats.dtype}")
    n, dim = feats.shape
    out = {"features": np.ascontiguousarray(feats, dtype=features_dtype)}
    if features_dtype == "float16" and feats.dtype != np.float16:
        if not np.isfinite(out["features"]).all() and np.isfinite(feats).all():
            raise StoreError(
                f"record {img_id!r}: features overflow float16 (|x| > 65504); store float32 instead"
            )
    for spec in _OTHER_FIELDS:
        name = spec.name
        arr = _as_array(record, name, img_id)
        want = spec.expected_shape(n, dim)
        if arr.shape != want:
            raise StoreError(
                f"record {img_id!r}: {name} must have shape {want} (n={n} from features), got {arr.shape}"
            )
        if spec.dtype == "int64" and arr.dtype.kind not in "iub":
            raise StoreError(f"record {img_id!r}: {name} must be integer class ids, got dtype {arr.dtype}")
        if spec.dtype == "float32" and arr.dtype.kind not in "fiu":
            raise StoreError(f"record {img_id!r}: {name} must be floating point, got dtype {arr.dtype}")
        out[name] = np.ascontiguousarray(arr, dtype=spec.dtype)
    return out, img_h, img_w


def encode_record(record: dict, features_dtype: FeaturesDtype = "float32", *, img_id: str = "?") -> bytes:
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


# --------------------------------------------------------------------------------------------------- decode
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


def header_info(blob: bytes | memoryview) -> tuple[int, int, str]:
    """``(n, D, features dtype name)`` from a record's header without decoding its arrays."""
    info = _read_header(blob)["features"]
    n, dim = info["shape"]
    return int(n), int(dim), {"F32": "float32", "F16": "float16"}.get(info["dtype"], info["dtype"])


def decode_record(blob: bytes, img_id: str = "?", *, check_crc: bool = False) -> Record:
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
    n, dim = feats.shape
    for spec in _OTHER_FIELDS:
        arr, want = arrays[spec.name], spec.expected_shape(n, dim)
        if arr.shape != want or arr.dtype != np.dtype(spec.dtype):
            raise StoreError(
                f"record {img_id!r}: {spec.name} has shape {arr.shape} dtype {arr.dtype}, "
                f"expected {want} {spec.dtype}"
            )
    if check_crc and "crc32" in meta and str(_crc(arrays)) != meta["crc32"]:
        raise StoreError(f"record {img_id!r}: CRC32 mismatch, the stored arrays are corrupt; re-extract it")
    out: dict[str, Any] = {name: arrays[name] for name in FIELDS}
    out["img_h"], out["img_w"], out["num_boxes"] = img_h, img_w, n
    return typing.cast(Record, out)


def normalize_boxes(boxes: np.ndarray, img_h: int, img_w: int) -> np.ndarray:
    """Pixel boxes ``(n, 4)`` x1,y1,x2,y2 -> ``[0, 1]`` (x / img_w, y / img_h), clipped, float32."""
    scale = np.array([img_w, img_h, img_w, img_h], dtype=np.float32)
    return np.clip(boxes.astype(np.float32) / scale, 0.0, 1.0)
