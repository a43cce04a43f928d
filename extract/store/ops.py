"""Whole-store operations: :func:`verify_store`, :func:`merge_stores`, :func:`export_h5`, :func:`store_size_bytes`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from extract.records import FIELDS, StoreDamaged, StoreError, decode_record
from extract.store.env import DATA_FILE, LOCK_FILE, count_ids, read_txn
from extract.store.meta import check_compatible
from extract.store.reader import FeatureStore, damage_named, open_metadata
from extract.store.writer import FeatureWriter

__all__ = ["VerifyReport", "export_h5", "merge_stores", "store_size_bytes", "verify_store"]


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

    Store-level problems (metadata count or ids index disagreeing with the records) are reported with the id
    ``"<metadata>"``; damaged LMDB pages as damage (``"<metadata>"``, ``"<index>"`` or the image id), never as an
    exception. Raises :class:`StoreError` only when the path is not a feature store at all.
    """
    report = VerifyReport(path=str(path))
    try:
        store = FeatureStore(path)
    except StoreDamaged as exc:  # the ids index itself cannot be opened
        report.bad.append(("<index>", exc.reason))
        return report
    try:
        try:
            meta = store.metadata
        except StoreDamaged as exc:
            report.bad.append(("<metadata>", exc.reason))
            meta = {}
        entry = store._entry()
        try:
            total = len(store)
            with damage_named(store.path, "the records"), read_txn(entry) as txn:
                records = count_ids(txn, None)
        except StoreDamaged as exc:
            report.bad.append(("<index>", exc.reason))
            total = records = None
        if entry.ids_db is None:
            report.bad.append(
                ("<metadata>", "no ids index; open the store once with a FeatureWriter to build it")
            )
        elif records != total:
            report.bad.append(
                ("<metadata>", f"ids index lists {total} ids but the store holds {records} records")
            )
        bar = _progress(total or 0, progress, "verify")
        try:
            for img_id in store:
                report.checked += 1
                bar.update(1)
                problem = _check_one(store, img_id, meta)
                if problem is not None:
                    report.bad.append((img_id, problem))
        except StoreDamaged as exc:  # the listing itself broke off: what follows is unknown
            report.bad.append(
                ("<index>", f"{exc.reason}; ids after the {report.checked} listed were not checked")
            )
        bar.close()
        if meta and meta.get("count") != report.checked:
            report.bad.append(
                ("<metadata>", f"metadata count {meta.get('count')} != {report.checked} records")
            )
    finally:
        store.close()
    return report


def _check_one(store: FeatureStore, img_id: str, meta: dict) -> str | None:
    """What is wrong with one record (damaged page, bad blob, CRC, shapes, values), or None."""
    try:
        blob = store.get_raw(img_id)
    except StoreDamaged as exc:
        return exc.reason
    if blob is None:
        return "listed in the ids index but has no record (damaged LMDB pages?)"
    try:
        rec = decode_record(blob, img_id, check_crc=True)
    except StoreError as exc:
        return str(exc)
    problems = _record_problems(rec, meta)
    return "; ".join(problems) if problems else None


def _progress(total: int, enabled: bool, desc: str) -> tqdm:
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
    out_meta = open_metadata(out) if (out / DATA_FILE).exists() else None
    ref_meta, ref_name = (out_meta, str(out)) if out_meta is not None else (metas[0], str(inputs[0]))
    dims = {m.get("feature_dim") for m in metas + ([out_meta] if out_meta else [])} - {None}
    if len(dims) > 1:
        raise StoreError(
            f"cannot merge stores with different feature dims {sorted(dims)}: {[str(p) for p in inputs]}"
        )
    if not force:
        ref = {"extractor": ref_meta.get("extractor") or {}, "features_dtype": ref_meta.get("features_dtype")}
        for p, m in zip(inputs, metas):
            check_compatible(
                ref,
                extractor=m.get("extractor") or {},
                features_dtype=m.get("features_dtype"),
                where=f"{p} (now) vs {ref_name} (stored)",
                fix="features from different extractors should not be mixed (pass force=True / --force to "
                "merge anyway; features are converted to the stored dtype)",
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
    for name in (DATA_FILE, LOCK_FILE):
        p = Path(path) / name
        if p.exists():
            st = p.stat()
            total += min(st.st_size, getattr(st, "st_blocks", st.st_size // 512 + 1) * 512)
    return total
