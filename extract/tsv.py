"""Streaming reader of LXMERT's original obj36 TSV files and their import into the LMDB feature store.

TSV format (tab-separated, no header, one image per line), fields in :data:`TSV_FIELDS` order:
``img_id``, ``img_h``, ``img_w`` (decimal, original image size in pixels), then base64 of raw little-endian
buffers: ``objects_id`` int64 (n,), ``objects_conf`` float32 (n,), ``attrs_id`` int64 (n,), ``attrs_conf``
float32 (n,), ``num_boxes`` (decimal n), ``boxes`` float32 (n, 4) x1,y1,x2,y2 in original pixels,
``features`` float32 (n, D) (D = 2048 in LXMERT's files; inferred from the buffer size).

Unlike the original loader, nothing is kept in memory: lines are read and decoded one at a time.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from extract.records import FeaturesDtype
from extract.store import FeatureWriter, StoreError

__all__ = ["TSV_FIELDS", "TsvFormatError", "ImportReport", "parse_tsv_line", "iter_tsv", "import_tsv"]

log = logging.getLogger(__name__)

TSV_FIELDS = (
    "img_id",
    "img_h",
    "img_w",
    "objects_id",
    "objects_conf",
    "attrs_id",
    "attrs_conf",
    "num_boxes",
    "boxes",
    "features",
)
#: Feature dim assumed for lines with zero boxes (nothing to infer it from).
DEFAULT_FEATURE_DIM = 2048


class TsvFormatError(StoreError):
    """A malformed TSV line; the message names the file and the 1-based line number."""

    def __init__(self, path: str | os.PathLike, line_no: int, reason: str):
        self.path, self.line_no, self.reason = str(path), line_no, reason
        super().__init__(f"{path}:{line_no}: {reason}")


def _b64(value: bytes, name: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"field {name!r} is not valid base64 ({exc})") from exc


def _array(raw: bytes, name: str, dtype: str, count: int, n: int) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    if len(raw) != count * itemsize:
        raise ValueError(
            f"field {name!r} decodes to {len(raw)} bytes, expected {count * itemsize} for num_boxes={n}"
        )
    return np.frombuffer(raw, dtype=dtype)


def _int(value: bytes, name: str) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"field {name!r} is not an integer: {value[:20]!r}") from exc


def parse_tsv_line(line: bytes | str, feature_dim: int | None = DEFAULT_FEATURE_DIM) -> tuple[str, dict]:
    """Decode one TSV line into ``(img_id, record)`` (record as for :func:`extract.store.encode_record`).

    Arrays are little-endian views of the decoded buffers (bit-exact, read-only). ``feature_dim``: the
    expected feature size D (2048 in LXMERT's files; None infers it from the buffer). Raises ``ValueError``
    with the reason when the line is malformed (wrong field count, bad base64, sizes not matching
    ``num_boxes`` and D).
    """
    if isinstance(line, str):
        line = line.encode("utf-8")
    parts = line.rstrip(b"\r\n").split(b"\t")
    if len(parts) != len(TSV_FIELDS):
        raise ValueError(
            f"expected {len(TSV_FIELDS)} tab-separated fields, got {len(parts)} (truncated line?)"
        )
    f = dict(zip(TSV_FIELDS, parts))
    try:
        img_id = f["img_id"].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"img_id is not UTF-8 ({exc})") from exc
    if not img_id:
        raise ValueError("empty img_id")
    img_h, img_w, n = _int(f["img_h"], "img_h"), _int(f["img_w"], "img_w"), _int(f["num_boxes"], "num_boxes")
    if img_h <= 0 or img_w <= 0:
        raise ValueError(f"image size {img_h}x{img_w} is not positive")
    if n < 0:
        raise ValueError(f"num_boxes={n} is negative")
    record: dict = {
        "obj_ids": _array(_b64(f["objects_id"], "objects_id"), "objects_id", "<i8", n, n),
        "obj_conf": _array(_b64(f["objects_conf"], "objects_conf"), "objects_conf", "<f4", n, n),
        "attr_ids": _array(_b64(f["attrs_id"], "attrs_id"), "attrs_id", "<i8", n, n),
        "attr_conf": _array(_b64(f["attrs_conf"], "attrs_conf"), "attrs_conf", "<f4", n, n),
        "boxes": _array(_b64(f["boxes"], "boxes"), "boxes", "<f4", 4 * n, n).reshape(n, 4),
    }
    feats = _b64(f["features"], "features")
    if feature_dim is not None:
        record["features"] = _array(feats, "features", "<f4", n * feature_dim, n).reshape(n, feature_dim)
    elif n == 0:
        if feats:
            raise ValueError(f"num_boxes=0 but features hold {len(feats)} bytes")
        record["features"] = np.zeros((0, DEFAULT_FEATURE_DIM), dtype="<f4")
    else:
        if len(feats) == 0 or len(feats) % (4 * n):
            raise ValueError(
                f"field 'features' decodes to {len(feats)} bytes, not a multiple of 4 * num_boxes={n}"
            )
        record["features"] = np.frombuffer(feats, dtype="<f4").reshape(n, -1)
    record["img_h"], record["img_w"] = img_h, img_w
    return img_id, record


def iter_tsv(
    path: str | os.PathLike,
    strict: bool = False,
    on_error: Callable[[int, str], None] | None = None,
    feature_dim: int | None = DEFAULT_FEATURE_DIM,
) -> Iterator[tuple[int, str, dict]]:
    """Stream ``(line_no, img_id, record)`` from an LXMERT obj36 TSV, one line in memory at a time.

    ``line_no`` is 1-based. A malformed line raises :class:`TsvFormatError` when ``strict``; otherwise it is
    skipped and reported to ``on_error(line_no, reason)`` (or logged as a warning when no callback is given).
    Blank lines are ignored. ``feature_dim`` as in :func:`parse_tsv_line`.
    """
    return _scan(Path(path), strict, on_error, None, feature_dim)


def _scan(
    path: Path,
    strict: bool,
    on_error: Callable[[int, str], None] | None,
    on_bytes: Callable[[int], object] | None,
    feature_dim: int | None,
) -> Iterator[tuple[int, str, dict]]:
    with open(path, "rb") as fh:
        for line_no, line in enumerate(fh, start=1):
            if on_bytes is not None:
                on_bytes(len(line))
            if not line.strip():
                continue
            try:
                img_id, record = parse_tsv_line(line, feature_dim)
            except ValueError as exc:
                if strict:
                    raise TsvFormatError(path, line_no, str(exc)) from exc
                if on_error is not None:
                    on_error(line_no, str(exc))
                else:
                    log.warning("%s:%d: skipped malformed line: %s", path, line_no, exc)
                continue
            yield line_no, img_id, record


@dataclass
class ImportReport:
    """Counts of one :func:`import_tsv` run."""

    tsv_path: str
    out_path: str
    lines: int = 0  # lines read (blank lines included)
    imported: int = 0  # records written
    skipped_existing: int = 0  # ids already in the store (resume) or repeated in the TSV
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line_no, reason) of malformed lines
    total_in_store: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"{self.tsv_path}: {self.lines} lines, imported {self.imported}, "
            f"skipped {self.skipped_existing} already present, {len(self.bad)} malformed; "
            f"{self.out_path} now holds {self.total_in_store} records ({self.seconds:.1f} s)"
        )


def import_tsv(
    tsv_path: str | os.PathLike,
    out_path: str | os.PathLike,
    strict: bool = False,
    features_dtype: FeaturesDtype = "float32",
    *,
    overwrite: bool = False,
    progress: bool = False,
    on_error: Callable[[int, str], None] | None = None,
    commit_every: int = 64,
    map_size: int = 1 << 30,
    feature_dim: int | None = DEFAULT_FEATURE_DIM,
) -> ImportReport:
    """Stream an obj36 TSV into a feature store (created or resumed), in constant memory.

    The store's extractor settings are ``{"source": "tsv", "file": <TSV basename>}``. Ids already in the
    store are skipped unless ``overwrite``. Malformed lines are skipped and listed in the report (and passed
    to ``on_error``); with ``strict`` the first one raises :class:`TsvFormatError` (records before it stay).
    ``feature_dim``: expected D (2048; None infers it per line, the store then enforces one D).
    """
    tsv_path = Path(tsv_path)
    if not tsv_path.is_file():
        raise StoreError(f"{tsv_path}: TSV file not found")
    report = ImportReport(str(tsv_path), str(out_path))
    start = time.perf_counter()

    def count_bytes(nbytes: int) -> None:
        report.lines += 1
        bar.update(nbytes)

    def bad_line(line_no: int, reason: str) -> None:
        report.bad.append((line_no, reason))
        if on_error is not None:
            on_error(line_no, reason)
        else:
            log.warning("%s:%d: skipped malformed line: %s", tsv_path, line_no, reason)

    extractor = {"source": "tsv", "file": tsv_path.name}
    with (
        FeatureWriter(
            out_path,
            extractor,
            features_dtype=features_dtype,
            overwrite=overwrite,
            commit_every=commit_every,
            map_size=map_size,
        ) as writer,
        tqdm(
            total=tsv_path.stat().st_size, unit="B", unit_scale=True, desc="import-tsv", disable=not progress
        ) as bar,
    ):
        for line_no, img_id, record in _scan(tsv_path, strict, bad_line, count_bytes, feature_dim):
            try:
                writer.put(img_id, record)
            except StoreError as exc:
                if strict:
                    raise TsvFormatError(tsv_path, line_no, str(exc)) from exc
                bad_line(line_no, str(exc))
        writer.flush()
        report.imported, report.skipped_existing = writer.written, writer.skipped
        report.total_in_store = len(writer)
    report.seconds = time.perf_counter() - start
    return report
