"""Damaged stores (issue 24, cases 6 and 8): damaged LMDB pages, flipped bits in a record and a lost metadata
record are reported as damage with the ``lxmert-features verify`` advice; ``verify`` lists them (exit 1) and never
calls a damaged store "not a feature store"; a reader with ``check=True`` names a bad record."""

from __future__ import annotations

import numpy as np
import pytest

from extract import store_cli
from extract.store import FeatureStore, FeatureWriter, StoreDamaged, open_metadata, verify_store


def _store(path, n=24, nan_in=None):
    rng = np.random.default_rng(0)
    with FeatureWriter(path, extractor={"source": "test"}) as writer:
        for i in range(n):
            features = rng.normal(0, 1, (6, 16)).astype(np.float32)
            if f"img{i:03d}" == nan_in:
                features[2, 3] = np.nan
            x1 = rng.uniform(0, 50, 6)
            writer.put(
                f"img{i:03d}",
                {
                    "features": features,
                    "boxes": np.stack([x1, x1, x1 + 40, x1 + 30], 1).astype(np.float32),
                    "obj_ids": np.zeros(6, np.int64),
                    "obj_conf": np.ones(6, np.float32),
                    "attr_ids": np.zeros(6, np.int64),
                    "attr_conf": np.ones(6, np.float32),
                    "img_h": 100,
                    "img_w": 120,
                },
            )
    return path


def test_damaged_page_is_named_by_readers_and_listed_by_verify(tmp_path, store_damage, capsys):
    path = _store(tmp_path / "s.lmdb")
    store_damage.break_page_of(path, "img005")
    with FeatureStore(path) as store:
        assert "img005" in store  # the ids index is intact
        with pytest.raises(StoreDamaged) as info:
            store["img005"]
    msg = str(info.value)
    assert "damaged LMDB pages reading image 'img005'" in msg and f"lxmert-features verify {path}" in msg
    report = verify_store(path)
    assert not report.ok and report.checked == 24
    assert (
        "img005",
        "damaged LMDB pages reading image 'img005' (mdb_get: MDB_CORRUPTED: Located page was wrong type)",
    ) in report.bad
    assert store_cli.main(["-q", "verify", str(path)]) == 1
    out = capsys.readouterr()
    assert "BAD img005: damaged LMDB pages" in out.out and "FAILED" in out.out and not out.err


def test_lost_metadata_record_is_damage_not_another_file(tmp_path, store_damage, capsys):
    path = _store(tmp_path / "s.lmdb")
    store_damage.garble_metadata_key(path)
    with pytest.raises(StoreDamaged, match="metadata record is missing although its ids index is there"):
        open_metadata(path)
    report = verify_store(path)
    assert (
        report.checked == 24 and report.bad[0][0] == "<metadata>" and "damaged LMDB pages" in report.bad[0][1]
    )
    assert store_cli.main(["-q", "verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "not a feature store" not in out and "damaged LMDB pages" in out
    assert store_cli.main(["info", str(path)]) == 2
    assert "lxmert-features verify" in capsys.readouterr().err


def test_checked_reads_name_flipped_bits_and_nan(tmp_path, store_damage):
    path = _store(tmp_path / "s.lmdb")
    store_damage.flip_feature_bit(path, "img007")
    with FeatureStore(path) as plain:
        assert np.isfinite(plain["img007"]["features"]).all()  # decodes fine: only the CRC tells
    with FeatureStore(path, check=True) as checked:
        checked["img006"]
        with pytest.raises(StoreDamaged, match=r"record 'img007': CRC32 mismatch.*lxmert-features verify"):
            checked["img007"]
    nan = _store(tmp_path / "nan.lmdb", nan_in="img003")
    with FeatureStore(nan, check=True) as checked:
        with pytest.raises(StoreDamaged, match=r"record 'img003' holds NaN or infinite values in features"):
            checked["img003"]
    assert ("img003", "non-finite values in features") in verify_store(nan).bad
