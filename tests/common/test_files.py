"""common.files.write_text_atomic: whole files or the old one, never a half-written one."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from common.files import copy_file_atomic, write_text_atomic


def test_writes_creates_folders_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "out.json"
    assert write_text_atomic(path, "première\n") == path
    assert path.read_text(encoding="utf-8") == "première\n"
    write_text_atomic(path, "second\n", fsync=True)
    assert path.read_text(encoding="utf-8") == "second\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("old\n", encoding="utf-8")
    with pytest.raises(TypeError):
        write_text_atomic(path, 123)  # type: ignore[arg-type]  # fails inside the write
    assert path.read_text(encoding="utf-8") == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_permissions_follow_the_umask_like_a_plain_write(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = write_text_atomic(tmp_path / "atomic.txt", "x")
    assert stat.S_IMODE(atomic.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_copy_file_atomic_copies_and_leaves_no_temporary_on_failure(tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(b"\x00\x01payload")
    dst = copy_file_atomic(src, tmp_path / "sub" / "b.bin")
    assert dst.read_bytes() == b"\x00\x01payload"
    dst.write_bytes(b"old")
    with pytest.raises(FileNotFoundError):
        copy_file_atomic(tmp_path / "missing.bin", dst)
    assert dst.read_bytes() == b"old"  # the old file stays whole
    assert sorted(p.name for p in dst.parent.iterdir()) == ["b.bin"]  # no temporary left
