"""``lxmert-features`` CLI: import-tsv, info, verify, export-h5, merge; exit codes and printed counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from extract.store import FeatureStore, FeatureWriter
from extract.store_cli import main


@pytest.fixture()
def coco_store(coco_tsv, tmp_path):
    assert main(["-q", "import-tsv", str(coco_tsv), str(tmp_path / "coco.lmdb")]) == 0
    return tmp_path / "coco.lmdb"


def test_import_tsv_prints_counts(coco_tsv, tmp_path, capsys):
    out = tmp_path / "c.lmdb"
    assert main(["-q", "import-tsv", str(coco_tsv), str(out)]) == 0
    assert "10 lines, imported 10, skipped 0 already present, 0 malformed" in capsys.readouterr().out
    assert main(["-q", "import-tsv", str(coco_tsv), str(out)]) == 0
    assert "imported 0, skipped 10 already present" in capsys.readouterr().out


def test_import_tsv_bad_line_and_strict(coco_tsv, tmp_path, capsys):
    lines = coco_tsv.read_text().splitlines(keepends=True)
    lines[1] = "\t".join(lines[1].split("\t")[:6]) + "\n"  # truncated: 6 of 10 fields
    bad = tmp_path / "bad.tsv"
    bad.write_text("".join(lines))
    assert main(["-q", "import-tsv", str(bad), str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    assert f"{bad}:2: skipped malformed line: expected 10 tab-separated fields, got 6" in captured.err
    assert "imported 9" in captured.out and "1 malformed" in captured.out
    assert main(["-q", "import-tsv", "--strict", str(bad), str(tmp_path / "b")]) == 2
    assert f"error: {bad}:2:" in capsys.readouterr().err


def test_info(coco_store, capsys):
    assert main(["info", str(coco_store)]) == 0
    out = capsys.readouterr().out
    assert "records:        10 (metadata count 10)" in out and "float32 x 2048" in out
    assert "source: tsv" in out and "file: train2014_obj36.tsv" in out
    assert main(["info", "--json", str(coco_store)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["records"] == 10 and info["metadata"]["feature_dim"] == 2048
    assert info["size_bytes"] >= 10 * 36 * 2048 * 4


def test_verify_exit_codes(coco_store, capsys):
    assert main(["-q", "verify", str(coco_store)]) == 0
    assert "OK" in capsys.readouterr().out
    # corrupt one record's features on disk
    with FeatureStore(coco_store) as store:
        victim = sorted(store)[4]
        row = store[victim]["features"][7].tobytes()
    data_file = os.path.join(coco_store, "data.mdb")
    with open(data_file, "r+b") as fh:
        data = fh.read()
        pos = data.find(row)
        assert pos >= 0
        fh.seek(pos + 100)
        fh.write(b"\xff" * 16)  # NaNs
    assert main(["-q", "verify", str(coco_store)]) == 1
    out = capsys.readouterr().out
    assert f"BAD {victim}:" in out and "FAILED" in out and "1 bad" in out


def test_export_h5(coco_store, tmp_path, capsys):
    out = tmp_path / "coco.h5"
    assert main(["-q", "export-h5", str(coco_store), str(out)]) == 0
    assert "exported 10 images" in capsys.readouterr().out
    with h5py.File(out, "r") as h5, FeatureStore(coco_store) as store:
        assert sorted(h5.keys()) == sorted(store)
        img_id = sorted(store)[0]
        np.testing.assert_array_equal(h5[img_id]["features"][()], store[img_id]["features"])
        assert h5[img_id].attrs["img_h"] == store[img_id]["img_h"]


def test_merge(coco_store, tmp_path, capsys):
    extra = tmp_path / "extra.lmdb"
    with FeatureStore(coco_store) as store:
        one = store[sorted(store)[0]]
        extractor = store.metadata["extractor"]
    with FeatureWriter(extra, extractor) as writer:
        writer.put("my_image", one)
    out = tmp_path / "merged.lmdb"
    assert main(["-q", "merge", str(out), str(coco_store), str(extra)]) == 0
    assert "wrote 11 records, it now holds 11" in capsys.readouterr().out
    with FeatureWriter(tmp_path / "other.lmdb", {"source": "tsv", "file": "val2014_obj36.tsv"}) as writer:
        writer.put("x", one)
    assert main(["-q", "merge", str(tmp_path / "m2"), str(coco_store), str(tmp_path / "other.lmdb")]) == 2
    err = capsys.readouterr().err
    assert "extractor settings differ" in err and "['file']" in err and "--force" in err
    inputs = [str(coco_store), str(tmp_path / "other.lmdb")]
    assert main(["-q", "merge", "--force", str(tmp_path / "m2"), *inputs]) == 0
    assert "wrote 11 records" in capsys.readouterr().out


def test_errors_exit_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nothing")]) == 2
    assert "no feature store here" in capsys.readouterr().err
    assert main(["-q", "import-tsv", str(tmp_path / "missing.tsv"), str(tmp_path / "s")]) == 2
    assert "TSV file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_runs(tmp_path):
    """The installed entry point (``python -m extract.store_cli``) returns the exit status."""
    with FeatureWriter(tmp_path / "s") as writer:
        rng = np.random.default_rng(0)
        rec = {"features": rng.random((2, 3), np.float32), "boxes": np.zeros((2, 4), np.float32),
               "obj_ids": np.zeros(2, np.int64), "obj_conf": np.ones(2, np.float32),
               "attr_ids": np.zeros(2, np.int64), "attr_conf": np.ones(2, np.float32), "img_h": 5, "img_w": 5}  # fmt: skip
        writer.put("a", rec)
    proc = subprocess.run(
        [sys.executable, "-m", "extract.store_cli", "-q", "verify", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and "checked 1 records, 0 bad" in proc.stdout
