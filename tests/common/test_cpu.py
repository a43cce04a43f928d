"""common.cpu: freed memory stays in the process (measured by page faults); the slow-autocast warning."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.cpu import cpu_autocast_is_fast, cpu_autocast_warning

ROOT = Path(__file__).resolve().parents[2]

# Allocates and frees a 256 MiB block (well above glibc's mmap threshold) a few times and reports the minor
# page faults of the last allocation; with the tuning the pages are reused, without it they are mapped anew.
PROBE = r"""
import ctypes, json, resource, sys
sys.path.insert(0, sys.argv[1])
from common.cpu import tune_cpu_allocator
tuned = tune_cpu_allocator() if sys.argv[2] == "1" else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)  # touch every page
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(p)
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


def _glibc() -> bool:
    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
        return True
    except (OSError, AttributeError):
        return False


def _probe(tune: bool, env: dict | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT), "1" if tune else "0"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not _glibc(), reason="the tuning applies to glibc's malloc only")
def test_tuned_allocator_reuses_freed_pages():
    pages = (256 << 20) // 4096
    plain = _probe(tune=False)
    tuned = _probe(tune=True)
    assert plain["tuned"] is False and tuned["tuned"] is True
    # Stock glibc returns the block to the kernel on free: every allocation faults all its pages in again.
    assert plain["faults"][-1] > pages // 2, plain
    # Tuned: the first allocation faults its pages in once; later ones reuse them.
    assert tuned["faults"][0] > pages // 2, tuned
    assert tuned["faults"][-1] < pages // 20, tuned


@pytest.mark.slow
@pytest.mark.skipif(not _glibc(), reason="the tuning applies to glibc's malloc only")
def test_tuning_can_be_switched_off_by_environment():
    result = _probe(tune=True, env={"LXMERT_TUNE_MALLOC": "0"})
    assert result["tuned"] is False
    assert result["faults"][-1] > (256 << 20) // 4096 // 2, result


def test_autocast_warning_exactly_where_autocast_is_slow() -> None:
    """float32 is always fast; bf16 / fp16 get a warning exactly when they are not, and it names the dtype,
    this CPU and the remedy (on a CPU without native fp16, as most are, the fp16 message is checked here)."""
    assert cpu_autocast_is_fast(torch.float32) and cpu_autocast_warning(torch.float32) is None
    assert cpu_autocast_warning(None) is None
    capability = torch.backends.cpu.get_cpu_capability()
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        message = cpu_autocast_warning(dtype)
        assert (message is None) == cpu_autocast_is_fast(dtype), name
        if message is not None:
            assert f"no native {name} matrix multiply" in message and f"({capability})" in message
            assert "use float32 on this machine" in message
