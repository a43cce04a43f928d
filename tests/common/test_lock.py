"""common.lock: one holder of a folder at a time, named in the refusal; a lock left by a killed process is
detected as stale and taken over (issue 24, case 3)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from common.lock import FolderLock, FolderLocked

ROOT = Path(__file__).resolve().parents[2]


def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    first = FolderLock(tmp_path / "run", "lxmert-train")
    assert first.acquire() is None  # nothing stale
    holder = json.loads(first.path.read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["started"]
    with pytest.raises(FolderLocked) as info:
        FolderLock(tmp_path / "run", "lxmert-train").acquire()
    msg = str(info.value)
    assert f"pid {os.getpid()} on {socket.gethostname()}" in msg and holder["started"] in msg
    assert str(tmp_path / "run") in msg and "lxmert-train" in msg
    first.release()
    again = FolderLock(tmp_path / "run", "lxmert-train")
    assert again.acquire() is None  # released: free again, nothing stale
    again.release()
    assert not first.path.exists()


def test_context_manager_releases_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with FolderLock(tmp_path, "x"):
            raise RuntimeError("boom")
    with FolderLock(tmp_path, "x") as lock:
        assert lock.path.exists()


def test_lock_of_a_killed_process_is_stale_and_taken_over(tmp_path: Path) -> None:
    # a real process takes the lock and is killed with SIGKILL (no chance to release it)
    code = (
        "import sys, time; from common.lock import FolderLock; "
        "FolderLock(sys.argv[1], 'holder').acquire(); print('held', flush=True); time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(FolderLocked, match=f"pid {proc.pid} on"):
            FolderLock(tmp_path, "taker").acquire()  # alive: refused
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    lock = FolderLock(tmp_path, "taker")
    stale = lock.acquire()
    assert stale is not None and stale["pid"] == proc.pid
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()
