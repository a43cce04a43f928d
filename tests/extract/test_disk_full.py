"""A full disk during extraction and TSV import (issue 24, case 4): one line naming the store and the free space,
the documented exit code, the records committed before kept, and the next run (after freeing space) resumes.

ENOSPC is injected where the store commits a transaction (no real full disk needed)."""

from __future__ import annotations

import errno

import lmdb
import numpy as np
import pytest
from PIL import Image

from common import diskspace
from common.diskspace import DiskFullError
from extract import cli as extract_cli
from extract import store_cli
from extract.store import FeatureStore, FeatureWriter, verify_store

FAST = ["--random-weights", "--config", "vg_tiny", "--min-size", "64", "--max-size", "112", "--no-progress"]
FAST += ["--workers", "0", "--batch-size", "1"]


def _images(root, n):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(root / f"img{i:03d}.png")


def _fill_disk_after(monkeypatch, commits: int) -> list[int]:
    """Every FeatureWriter.flush after the first ``commits`` raises ENOSPC (as a write on a full disk)."""
    calls = [0]
    real = FeatureWriter.flush

    def flush(self):
        if self._pending:
            calls[0] += 1
            if calls[0] > commits:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self)

    monkeypatch.setattr(FeatureWriter, "flush", flush)
    return calls


def test_extraction_on_a_full_disk_says_so_in_one_line_and_resumes(tmp_path, capsys, monkeypatch):
    _images(tmp_path / "imgs", 6)
    out = tmp_path / "out.lmdb"
    argv = [str(tmp_path / "imgs"), str(out), *FAST]
    _fill_disk_after(monkeypatch, commits=2)
    assert extract_cli.main(argv) == extract_cli.EXIT_FAILURES
    err = capsys.readouterr().err.strip().splitlines()
    full = [line for line in err if "disk full" in line]
    assert len(full) == 1 and not any("Traceback" in line for line in err), err
    assert f"cannot write {out}" in full[0] and "free on that file system" in full[0]
    assert "run the same command again" in full[0]
    with FeatureStore(out) as store:
        kept = len(store)
    assert 1 <= kept < 6  # what was committed before the disk filled up is kept
    monkeypatch.undo()  # space freed
    assert extract_cli.main(argv) == extract_cli.EXIT_OK
    summary = capsys.readouterr().out
    assert f"{6 - kept} done, {kept} skipped as already present, 0 failed" in summary
    assert verify_store(out).ok


def test_tsv_import_on_a_full_disk_says_so_and_resumes(coco_tsv, tmp_path, capsys, monkeypatch):
    out = tmp_path / "coco.lmdb"
    _fill_disk_after(monkeypatch, commits=0)  # the first commit of the 10 records
    argv = ["-q", "import-tsv", str(coco_tsv), str(out)]
    assert store_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and f"disk full: cannot write {out}" in err[0]
        and "run the same command again" in err[0]
    )
    monkeypatch.undo()
    assert store_cli.main(argv) == 0
    assert "now holds 10 records" in capsys.readouterr().out
    assert verify_store(out).ok


def test_lmdb_errors_of_a_full_disk_become_disk_full(tmp_path, monkeypatch):
    """LMDB says ENOSPC as DiskError, or (on some file systems) only "Input/output error"."""
    writer = FeatureWriter(tmp_path / "s.lmdb", {"source": "test"})

    def failing(error):
        def body(txn):
            raise error

        return body

    with pytest.raises(DiskFullError, match=f"disk full: cannot write {tmp_path / 's.lmdb'}"):
        writer._write_txn(failing(lmdb.DiskError("mdb_txn_commit", errno.ENOSPC)))
    with pytest.raises(lmdb.Error, match="Input/output error"):  # plenty of room: a real I/O error
        writer._write_txn(failing(lmdb.Error("mdb_txn_commit: Input/output error")))
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 0)
    with pytest.raises(DiskFullError, match=r"\(0 B free on that file system\)"):
        writer._write_txn(failing(lmdb.Error("mdb_txn_commit: Input/output error")))
    monkeypatch.undo()
    writer.close()
