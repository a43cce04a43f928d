"""LMDB feature store: record codec, reader, writer (resume, overwrite, map growth, processes), verify, merge."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
from concurrent.futures import ThreadPoolExecutor

import h5py
import lmdb
import numpy as np
import pytest
import torch

from extract.store import (
    FIELDS,
    SCHEMA,
    SCHEMA_VERSION,
    FeatureStore,
    FeatureWriter,
    Record,
    StoreError,
    StoreSettingsMismatch,
    check_compatible,
    decode_record,
    encode_record,
    export_h5,
    merge_stores,
    normalize_boxes,
    open_metadata,
    verify_store,
)
from extract.store import env as store_env

EXTRACTOR = {
    "weights": "x.pkl",
    "weights_sha256": "ab" * 32,
    "selection": "caffe",
    "min_boxes": 36,
    "max_boxes": 36,
}


def make_record(seed: int, n: int = 36, dim: int = 64, img_h: int = 480, img_w: int = 640) -> dict:
    rng = np.random.default_rng(seed)
    x1 = rng.uniform(0, img_w / 2, n)
    y1 = rng.uniform(0, img_h / 2, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(1, img_w / 2, n), y1 + rng.uniform(1, img_h / 2, n)], 1)
    return {
        "features": rng.standard_normal((n, dim)).astype(np.float32),
        "boxes": boxes.astype(np.float32),
        "obj_ids": rng.integers(0, 1600, n),
        "obj_conf": rng.uniform(0, 1, n).astype(np.float32),
        "attr_ids": rng.integers(0, 400, n),
        "attr_conf": rng.uniform(0, 1, n).astype(np.float32),
        "img_h": img_h,
        "img_w": img_w,
    }


def assert_same(got: dict, want: dict) -> None:
    for name in FIELDS:
        np.testing.assert_array_equal(got[name], np.asarray(want[name]), err_msg=name)
    assert (got["img_h"], got["img_w"], got["num_boxes"]) == (
        want["img_h"],
        want["img_w"],
        len(want["boxes"]),
    )


def write_store(path, ids, seed_offset: int = 0, **kwargs) -> None:
    with FeatureWriter(path, EXTRACTOR, **kwargs) as writer:
        for i, img_id in enumerate(ids):
            assert writer.put(img_id, make_record(i + seed_offset))


# ---------------------------------------------------------------------------------------------- codec


@pytest.mark.parametrize("n", [36, 10, 0])
def test_record_round_trip_exact(n):
    rec = make_record(1, n=n)
    out = decode_record(encode_record(rec), "img")
    assert_same(out, rec)
    assert out["features"].dtype == np.float32 and out["boxes"].dtype == np.float32
    assert out["obj_ids"].dtype == np.int64 and out["attr_conf"].dtype == np.float32


def test_store_returns_the_declared_schema(tmp_path):
    """What a dataset gets from ``store[img_id]`` is exactly :class:`Record`, with SCHEMA's dtypes and shapes."""
    write_store(tmp_path / "s", ["a"])
    with FeatureStore(tmp_path / "s") as store:
        rec = store["a"]
    assert set(rec) == set(Record.__annotations__) == {*FIELDS, "img_h", "img_w", "num_boxes"}
    n, dim = rec["num_boxes"], store.metadata["feature_dim"]
    for spec in SCHEMA:
        assert rec[spec.name].shape == spec.expected_shape(n, dim), spec.name
        assert rec[spec.name].dtype == np.dtype(spec.dtype or store.metadata["features_dtype"]), spec.name
    assert [spec.name for spec in SCHEMA] == list(FIELDS) == list(store.metadata["fields"])


def test_normalized_boxes_in_unit_square(tmp_path):
    write_store(tmp_path / "s", ["a"])
    with FeatureStore(tmp_path / "s", normalize_boxes=True) as store:
        boxes = store["a"]["boxes"]
    want = make_record(0)["boxes"] / np.array([640, 480, 640, 480], np.float32)
    np.testing.assert_allclose(boxes, np.clip(want, 0, 1), rtol=1e-6)
    np.testing.assert_array_equal(
        normalize_boxes(np.array([[-5, 0, 700, 240]], np.float32), 480, 640), [[0, 0, 1, 0.5]]
    )


def test_record_float16_and_casts():
    rec = make_record(2)
    rec["obj_ids"] = rec["obj_ids"].astype(np.int32)  # ints are widened, floats cast
    rec["boxes"] = torch.from_numpy(rec["boxes"].astype(np.float64))  # CPU torch tensors accepted
    out = decode_record(encode_record(rec, "float16"))
    assert out["features"].dtype == np.float16
    np.testing.assert_array_equal(out["features"], make_record(2)["features"].astype(np.float16))
    assert out["obj_ids"].dtype == np.int64 and out["boxes"].dtype == np.float32
    np.testing.assert_array_equal(out["boxes"], make_record(2)["boxes"])


def test_record_has_no_pickle_and_is_self_describing():
    blob = encode_record(make_record(3, n=4, dim=8))
    header = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])
    assert header["__metadata__"]["img_h"] == "480" and header["__metadata__"]["img_w"] == "640"
    assert header["features"] == {
        "dtype": "F32",
        "shape": [4, 8],
        "data_offsets": header["features"]["data_offsets"],
    }
    assert b"pickle" not in blob and not blob.startswith(b"\x80")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"features": np.zeros(5, np.float32)}, "features must have shape (n, D)"),
        ({"features": np.zeros((36, 8), np.int64)}, "features must be floating point"),
        ({"boxes": np.zeros((35, 4), np.float32)}, "boxes must have shape (36, 4)"),
        ({"obj_ids": np.zeros(36, np.float32)}, "obj_ids must be integer"),
        ({"attr_conf": np.zeros((36, 1), np.float32)}, "attr_conf must have shape (36,)"),
        ({"img_w": 0}, "img_w=0 must be a positive integer"),
        ({"img_h": None}, "img_h=None is not an integer"),
    ],
)
def test_encode_rejects_bad_records(change, message):
    rec = {**make_record(0), **change}
    with pytest.raises(StoreError) as err:
        encode_record(rec, img_id="COCO_1")
    assert message in str(err.value) and "COCO_1" in str(err.value)


def test_encode_rejects_missing_field():
    rec = make_record(0)
    del rec["attr_ids"]
    with pytest.raises(StoreError, match="missing field 'attr_ids'"):
        encode_record(rec)


def test_decode_corrupt_blob_names_image():
    blob = bytearray(encode_record(make_record(0, n=2, dim=4)))
    with pytest.raises(StoreError, match="'COCO_9'.*corrupt"):
        decode_record(bytes(blob[:40]), "COCO_9")
    blob[10:20] = b"#" * 10  # garble the JSON header
    with pytest.raises(StoreError, match="COCO_9"):
        decode_record(bytes(blob), "COCO_9")


# ---------------------------------------------------------------------------------------------- store


def test_write_read_round_trip(tmp_path):
    ids = [f"COCO_{i:03d}" for i in range(20)]
    write_store(tmp_path / "s", ids, commit_every=7)
    with FeatureStore(tmp_path / "s") as store:
        assert len(store) == 20
        assert list(store) == sorted(ids)
        assert "COCO_005" in store and "nope" not in store and 5 not in store
        for i, img_id in enumerate(ids):
            assert_same(store[img_id], make_record(i))
        meta = store.metadata
    assert meta["schema_version"] == SCHEMA_VERSION and meta["count"] == 20
    assert meta["features_dtype"] == "float32" and meta["feature_dim"] == 64
    assert meta["extractor"] == EXTRACTOR and meta["created"] and meta["updated"]
    assert open_metadata(tmp_path / "s") == meta


def test_missing_id_and_bad_paths(tmp_path):
    write_store(tmp_path / "s", ["a"])
    store = FeatureStore(tmp_path / "s")
    with pytest.raises(KeyError) as err:
        store["COCO_404"]
    assert "COCO_404" in str(err.value) and str(tmp_path / "s") in str(err.value)
    assert store.get("COCO_404", "dflt") == "dflt"
    store.close()
    with pytest.raises(StoreError, match="no feature store here"):
        FeatureStore(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        FeatureWriter(tmp_path / "file")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "other.txt").write_text("x")
    with pytest.raises(StoreError, match="not an LMDB feature store"):
        FeatureWriter(tmp_path / "dir")
    with pytest.raises(StoreError, match="not an LMDB feature store"):
        FeatureStore(tmp_path / "dir")


def test_normalized_boxes(tmp_path):
    rec = make_record(0, n=3, dim=4, img_h=100, img_w=200)
    rec["boxes"] = np.array([[0, 0, 200, 100], [50, 25, 100, 50], [-2, 0, 210, 100]], np.float32)
    with FeatureWriter(tmp_path / "s") as writer:
        writer.put("x", rec)
    with FeatureStore(tmp_path / "s", normalize_boxes=True) as store:
        boxes = store["x"]["boxes"]
    np.testing.assert_allclose(boxes, [[0, 0, 1, 1], [0.25, 0.25, 0.5, 0.5], [0, 0, 1, 1]])


def test_resume_skips_and_overwrite_replaces(tmp_path):
    path = tmp_path / "s"
    write_store(path, ["a", "b", "c"])
    with FeatureWriter(path, EXTRACTOR) as writer:
        assert "b" in writer and "d" not in writer
        assert writer.existing_ids() == {"a", "b", "c"}
        assert writer.put("b", make_record(50)) is False  # resume: present -> skipped
        assert writer.put("d", make_record(51)) is True
        assert "d" in writer  # pending counts as present
        assert writer.put("d", make_record(52)) is False
    with FeatureStore(path) as store:
        assert_same(store["b"], make_record(1))
        assert_same(store["d"], make_record(51))
        assert len(store) == 4 and store.metadata["count"] == 4
    with FeatureWriter(path, EXTRACTOR, overwrite=True) as writer:
        assert writer.put("b", make_record(60)) is True
    with FeatureStore(path) as store:
        assert_same(store["b"], make_record(60))
        assert_same(store["a"], make_record(0))  # not re-put: stays
        assert store.metadata["count"] == 4


def test_settings_mismatch_dtype_and_dim(tmp_path):
    path = tmp_path / "s"
    write_store(path, ["a"])
    with pytest.raises(StoreSettingsMismatch) as err:
        FeatureWriter(path, {**EXTRACTOR, "selection": "maxnms", "min_size": 800})
    assert "min_size" in str(err.value) and "selection" in str(err.value) and "weights" not in str(err.value)
    with pytest.raises(StoreSettingsMismatch, match="float32 features"):
        FeatureWriter(path, EXTRACTOR, features_dtype="float16")
    with FeatureWriter(path) as writer:  # no settings given: no check
        with pytest.raises(StoreError, match="'b' has feature dim 32, the store holds 64"):
            writer.put("b", make_record(1, dim=32))
        with pytest.raises(StoreError, match="invalid image id"):
            writer.put("__lxmert_feature_store__", make_record(1))
    assert len(FeatureStore(path)) == 1


def test_one_settings_check_names_every_difference():
    meta = {"features_dtype": "float32", "extractor": {**EXTRACTOR, "weights_layout": "detectron2"}}
    ok = dict(where="s.lmdb", fix="do X")
    check_compatible(meta, extractor={**EXTRACTOR, "weights_layout": "hf"}, features_dtype="float32", **ok)
    check_compatible(meta, extractor={"weights": "x.pkl"}, features_dtype=None, ignore=set(EXTRACTOR), **ok)
    check_compatible(
        {"features_dtype": "float32", "extractor": None}, extractor=EXTRACTOR, features_dtype=None, **ok
    )
    with pytest.raises(StoreSettingsMismatch) as err:
        check_compatible(
            meta, extractor={**EXTRACTOR, "max_boxes": 100, "new": 1}, features_dtype="float32", **ok
        )
    assert str(err.value) == (
        "s.lmdb: extractor settings differ in ['max_boxes', 'new'] (max_boxes: stored 36, now 100, "
        "new: stored '<absent>', now 1); do X"
    )
    with pytest.raises(
        StoreSettingsMismatch, match="s.lmdb: float32 features stored, float16 features asked for; do X"
    ):
        check_compatible(meta, extractor=None, features_dtype="float16", **ok)


def test_float16_store(tmp_path):
    write_store(tmp_path / "s", ["a"], features_dtype="float16")
    with FeatureStore(tmp_path / "s") as store:
        assert store.metadata["features_dtype"] == "float16"
        assert store["a"]["features"].dtype == np.float16
        np.testing.assert_array_equal(store["a"]["features"], make_record(0)["features"].astype(np.float16))


def test_reader_and_writer_in_one_process(tmp_path):
    path = tmp_path / "s"
    write_store(path, ["a"])
    store = FeatureStore(path)
    assert len(store) == 1
    with FeatureWriter(path, EXTRACTOR) as writer:  # same files open twice: shared handle
        writer.put("b", make_record(1))
        writer.flush()
        assert "b" in store and len(store) == 2
    assert_same(store["b"], make_record(1))
    store.close()


def test_reader_remaps_without_changing_results(tmp_path, monkeypatch):
    ids = [f"img{i}" for i in range(12)]
    write_store(tmp_path / "s", ids)
    opened = []
    real_open = store_env._open_env
    monkeypatch.setattr(store_env, "_open_env", lambda *a: opened.append(a) or real_open(*a))
    store = FeatureStore(tmp_path / "s", remap_every_bytes=3 * 36 * 64 * 4)  # every 3 records
    for _ in range(2):
        for i, img_id in enumerate(ids):
            assert_same(store[img_id], make_record(i))
    assert len(opened) == 1 + 24 // 3  # the first open, then one re-open per 3 records
    assert list(store) == sorted(ids) and len(store) == 12
    store.close()
    assert os.path.realpath(tmp_path / "s") not in store_env.ENVS


def test_threads_read_while_remapping(tmp_path):
    ids = [f"img{i}" for i in range(8)]
    write_store(tmp_path / "s", ids, features_dtype="float16")
    store = FeatureStore(tmp_path / "s", remap_every_bytes=1)  # re-map after every read
    want = {img_id: make_record(i)["features"].astype(np.float16) for i, img_id in enumerate(ids)}

    def read(k: int) -> bool:
        img_id = ids[k % len(ids)]
        return np.array_equal(store[img_id]["features"], want[img_id]) and img_id in store

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(read, range(200)))
    store.close()


def _rss_file_mib() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssFile:")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_listing_ids_does_not_page_in_records(tmp_path):
    ids = [f"img{i:03d}" for i in range(60)]
    with FeatureWriter(tmp_path / "s", EXTRACTOR) as writer:
        big = make_record(0, dim=2048)  # 60 x 295 KB = 17 MiB of records
        for img_id in ids:
            writer.put(img_id, big)
    store = FeatureStore(tmp_path / "s")
    before = _rss_file_mib()
    assert list(store) == ids and len(store) == 60 and all(i in store for i in ids) and "x" not in store
    assert _rss_file_mib() - before < 4  # only the small index pages were touched
    store.close()


def test_store_without_ids_index_still_works_and_gets_one(tmp_path):
    """A store whose ids index is missing (older layout): read by scanning, indexed by the next writer."""
    path = tmp_path / "old"
    write_store(path, ["b", "a", "c"])
    raw = {}
    with FeatureStore(path) as store:
        for img_id in store:
            raw[img_id] = store.get_raw(img_id)
        meta = store.metadata
    del meta["ids_index"]
    env = lmdb.open(str(tmp_path / "plain"), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for img_id, blob in raw.items():
            txn.put(img_id.encode(), blob)
        txn.put(b"__lxmert_feature_store__", json.dumps(meta).encode())
    env.close()
    with FeatureStore(tmp_path / "plain") as store:
        assert list(store) == ["a", "b", "c"] and len(store) == 3 and "b" in store
        assert_same(store["c"], make_record(2))
    bad = dict(verify_store(tmp_path / "plain").bad)
    assert "no ids index" in bad["<metadata>"]
    with FeatureWriter(tmp_path / "plain", EXTRACTOR) as writer:
        assert writer.put("a", make_record(0)) is False
        assert writer.put("d", make_record(3)) is True
    assert verify_store(tmp_path / "plain").ok
    with FeatureStore(tmp_path / "plain") as store:
        assert list(store) == ["a", "b", "c", "d"] and store.metadata["count"] == 4


def test_map_grows_from_tiny_size(tmp_path):
    path = tmp_path / "s"
    with FeatureWriter(path, EXTRACTOR, map_size=1 << 16, commit_every=5) as writer:
        for i in range(30):
            writer.put(f"img{i}", make_record(i, dim=512))  # 30 x ~75 KB >> 64 KiB
        grows = writer.map_grows
    assert grows >= 3
    with FeatureStore(path) as store:
        assert len(store) == 30
        assert_same(store["img29"], make_record(29, dim=512))


def _writer_proc(path: str, start: int, count: int, map_size: int) -> None:
    with FeatureWriter(path, EXTRACTOR, map_size=map_size, commit_every=3) as writer:
        for i in range(start, start + count):
            writer.put(f"img{i:04d}", make_record(i, dim=256))
            if i % 4 == 0:  # overlapping ids between the processes must be skipped, not duplicated
                writer.put("shared", make_record(9999, dim=256))


def test_two_processes_write_concurrently(tmp_path):
    path = str(tmp_path / "s")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer_proc, args=(path, k * 40, 40, 1 << 16)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    with FeatureStore(path) as store:
        assert len(store) == 81 and store.metadata["count"] == 81
        for i in range(80):
            assert_same(store[f"img{i:04d}"], make_record(i, dim=256))
        assert_same(store["shared"], make_record(9999, dim=256))
    assert verify_store(path).ok


def _crash_proc(path: str) -> None:
    writer = FeatureWriter(path, EXTRACTOR, commit_every=4)
    for i in range(6):
        writer.put(f"img{i}", make_record(i))
    os._exit(0)  # killed: the 2 pending records were never committed


def test_crash_leaves_only_complete_records(tmp_path):
    path = str(tmp_path / "s")
    proc = mp.get_context("fork").Process(target=_crash_proc, args=(path,))
    proc.start()
    proc.join(timeout=60)
    with FeatureStore(path) as store:
        assert sorted(store) == ["img0", "img1", "img2", "img3"]
        for i in range(4):
            assert_same(store[f"img{i}"], make_record(i))
    with FeatureWriter(path, EXTRACTOR) as writer:  # resume completes the store
        assert [writer.put(f"img{i}", make_record(i)) for i in range(6)] == [False] * 4 + [True] * 2
    assert len(FeatureStore(path)) == 6


class _StoreDataset(torch.utils.data.Dataset):
    def __init__(self, store: FeatureStore, ids: list[str]):
        self.store, self.ids = store, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        rec = self.store[self.ids[i]]
        return {
            "features": torch.from_numpy(rec["features"]),
            "boxes": torch.from_numpy(rec["boxes"]),
            "i": i,
        }


def test_dataloader_two_workers(tmp_path):
    ids = [f"img{i:02d}" for i in range(24)]
    write_store(tmp_path / "s", ids)
    store = FeatureStore(tmp_path / "s", normalize_boxes=True)
    assert len(store) == 24  # the parent has the store open before the workers fork
    loader = torch.utils.data.DataLoader(
        _StoreDataset(store, ids), batch_size=5, num_workers=2, multiprocessing_context="fork"
    )
    seen = []
    for batch in loader:
        for j, i in enumerate(batch["i"].tolist()):
            want = make_record(i)
            np.testing.assert_array_equal(batch["features"][j].numpy(), want["features"])
            scale = np.array([640, 480, 640, 480], np.float32)
            np.testing.assert_allclose(batch["boxes"][j].numpy(), np.clip(want["boxes"] / scale, 0, 1))
            seen.append(i)
    assert sorted(seen) == list(range(24))
    clone = pickle.loads(pickle.dumps(store))  # spawn-style workers get a picklable store
    assert_same(clone["img03"], {**make_record(3), "boxes": store["img03"]["boxes"]})
    store.close()


# ---------------------------------------------------------------------------------------------- verify


def _corrupt_on_disk(path, needle: bytes, replacement: bytes) -> None:
    """Overwrite every copy of ``needle`` in data.mdb (LMDB's copy-on-write may leave stale copies of a page
    in free pages, so the live one is not necessarily the only one)."""
    assert len(needle) == len(replacement)
    data_file = os.path.join(path, "data.mdb")
    with open(data_file, "r+b") as fh:
        data = fh.read()
        positions = []
        pos = data.find(needle)
        while pos >= 0:
            positions.append(pos)
            pos = data.find(needle, pos + 1)
        assert positions, f"{needle[:16]!r}... not found in {data_file}"
        for pos in positions:
            fh.seek(pos)
            fh.write(replacement)


def test_verify_detects_corrupt_bytes_on_disk(tmp_path):
    path = tmp_path / "s"
    write_store(path, ["good0", "flip", "header", "good1"])
    assert verify_store(path).ok and verify_store(path).checked == 4
    # 1) flip feature bytes of one record: still decodes, caught by the CRC
    feats = make_record(1)["features"]
    _corrupt_on_disk(path, feats[3].tobytes(), (feats[3] + 1).astype(np.float32).tobytes())
    # 2) garble the safetensors JSON header of another record (its CRC entry is unique to it)
    header = encode_record(make_record(2))
    crc = json.loads(header[8 : 8 + int.from_bytes(header[:8], "little")])["__metadata__"]["crc32"]
    needle = f'"crc32":"{crc}"'.encode()
    _corrupt_on_disk(path, needle, b"\x00" + needle[1:])
    report = verify_store(path)
    assert report.checked == 4
    bad = dict(report.bad)
    assert set(bad) == {"flip", "header"}
    assert "CRC32" in bad["flip"] and "corrupt" in bad["header"]
    with pytest.raises(StoreError, match="'header'"):
        FeatureStore(path)["header"]


def test_verify_flags_boxes_outside_and_nonfinite(tmp_path):
    path = tmp_path / "s"
    rec_out = make_record(0, n=2, dim=4, img_h=100, img_w=100)
    rec_out["boxes"] = np.array([[0, 0, 50, 50], [10, 10, 150, 60]], np.float32)
    rec_nan = make_record(1, n=2, dim=4)
    rec_nan["features"][1, 2] = np.nan
    with FeatureWriter(path) as writer:
        writer.put("outside", rec_out)
        writer.put("nan", rec_nan)
        writer.put("ok", make_record(2, n=2, dim=4))
        writer.put("empty", make_record(3, n=0, dim=4))
    bad = dict(verify_store(path).bad)
    assert set(bad) == {"outside", "nan"}
    assert "outside the 100x100 image" in bad["outside"] and "non-finite values in features" in bad["nan"]


# ---------------------------------------------------------------------------------------------- merge, export


def test_merge_round_trip_and_settings(tmp_path):
    write_store(tmp_path / "a", ["x0", "x1", "both"])
    write_store(tmp_path / "b", ["y0", "both"], seed_offset=10)
    assert merge_stores(tmp_path / "m", [tmp_path / "a", tmp_path / "b"]) == 4
    with FeatureStore(tmp_path / "m") as store:
        assert list(store) == ["both", "x0", "x1", "y0"]
        assert_same(store["both"], make_record(2))  # first input wins
        assert_same(store["y0"], make_record(10))
        meta = store.metadata
    assert meta["extractor"] == EXTRACTOR and meta["count"] == 4
    assert [m["path"] for m in meta["merged_from"]] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert merge_stores(tmp_path / "m", [tmp_path / "b"], overwrite=True) == 2
    assert_same(FeatureStore(tmp_path / "m")["both"], make_record(11))

    with FeatureWriter(
        tmp_path / "other", {**EXTRACTOR, "selection": "maxnms"}, features_dtype="float16"
    ) as w:
        w.put("z", make_record(20))
    with pytest.raises(StoreSettingsMismatch, match="selection"):
        merge_stores(tmp_path / "m2", [tmp_path / "a", tmp_path / "other"])
    assert merge_stores(tmp_path / "m2", [tmp_path / "a", tmp_path / "other"], force=True) == 4
    with FeatureStore(tmp_path / "m2") as store:  # float16 input re-encoded to the first store's float32
        assert store["z"]["features"].dtype == np.float32
        np.testing.assert_array_equal(store["z"]["features"], make_record(20)["features"].astype(np.float16))
    with FeatureWriter(tmp_path / "dim", EXTRACTOR) as w:
        w.put("q", make_record(0, dim=8))
    with pytest.raises(StoreError, match="different feature dims"):
        merge_stores(tmp_path / "m3", [tmp_path / "a", tmp_path / "dim"], force=True)


def test_export_h5(tmp_path):
    ids = ["COCO_a", "COCO_b", "odd/id"]
    write_store(tmp_path / "s", ids)
    assert export_h5(tmp_path / "s", tmp_path / "out.h5") == 3
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        assert json.loads(h5.attrs["metadata"])["count"] == 3
        assert sorted(h5.keys()) == ["COCO_a", "COCO_b", "odd%2Fid"]
        for i, img_id in enumerate(ids):
            group = h5[img_id.replace("/", "%2F")]
            got = {name: group[name][()] for name in FIELDS}
            got.update(img_h=int(group.attrs["img_h"]), img_w=int(group.attrs["img_w"]))
            got["num_boxes"] = int(group.attrs["num_boxes"])
            assert group.attrs["img_id"] == img_id
            assert_same(got, make_record(i))
