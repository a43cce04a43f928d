"""common.diskspace: what counts as a full disk, and the one line that says so (issue 24, case 4)."""

from __future__ import annotations

import errno
import pickle
from pathlib import Path

import lmdb
import pytest

from common import diskspace
from common.diskspace import DiskFullError, as_disk_full, free_bytes, human_bytes


def test_free_bytes_of_a_path_not_yet_created(tmp_path: Path) -> None:
    assert free_bytes(tmp_path) > 0
    assert free_bytes(tmp_path / "not" / "yet" / "there.lmdb") == free_bytes(tmp_path)


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        lmdb.DiskError("mdb_txn_commit", errno.ENOSPC),
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
    ],
    ids=["ENOSPC", "EDQUOT", "lmdb", "text"],
)
def test_full_disk_errors_are_recognised_whatever_the_free_space(tmp_path: Path, exc: Exception) -> None:
    err = as_disk_full(exc, tmp_path / "out.lmdb")
    assert isinstance(err, DiskFullError) and err.errno == errno.ENOSPC
    text = str(err)
    assert text.startswith(f"disk full: cannot write {tmp_path / 'out.lmdb'} (")
    assert "free on that file system" in text and "\n" not in text


def test_io_errors_count_as_a_full_disk_only_when_the_disk_is_nearly_full(
    tmp_path: Path, monkeypatch
) -> None:
    # LMDB on a full file system says "Input/output error"; torch.save says "unexpected pos"
    lmdb_eio = lmdb.Error("mdb_txn_commit: Input/output error")
    torch_fail = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert (
        as_disk_full(lmdb_eio, tmp_path) is None
    )  # plenty of room here: a real I/O error, not ours to rename
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 12_345)
    assert "12.1 KiB free" in str(as_disk_full(lmdb_eio, tmp_path))
    assert isinstance(as_disk_full(torch_fail, tmp_path), DiskFullError)
    assert as_disk_full(TypeError("a bug"), tmp_path) is None  # never a programming error
    assert as_disk_full(KeyboardInterrupt(), tmp_path) is None


def test_the_error_survives_pickling_and_chaining(tmp_path: Path) -> None:
    err = DiskFullError(tmp_path / "x", 1024)
    back = pickle.loads(pickle.dumps(err))  # gathered between ranks
    assert str(back) == str(err) and back.path == err.path and back.free == 1024
    wrapped = RuntimeError("writing to the feature store failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert isinstance(as_disk_full(wrapped, tmp_path), DiskFullError)
    assert as_disk_full(err, tmp_path / "y") is err


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1024, 5 << 20, 3 << 40)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "5.0 MiB",
        "3.0 TiB",
    ]
