"""Process-level settings for fast CPU training.

A CPU training step of LXMERT allocates and frees ~1-2 GB of tensors (activations, the bf16 weight copies of
autocast, the float32 gradients). glibc's ``malloc`` hands big blocks back to the kernel when they are
freed (``munmap`` for blocks above the mmap threshold, ``trim`` of the heap top), so the next step faults
every page in again and the kernel zeroes it: on a 2-core machine that is 0.2-1 s of system time per step,
a third of a bf16 step. :func:`tune_cpu_allocator` keeps freed memory in the process instead (the standard
advice for PyTorch on CPU, what jemalloc/tcmalloc with no decay achieve): the process does not shrink after
its peak. Best where every step allocates the same sizes (a training step, one image per forward); with
sizes that vary a lot the kept heap fragments and its peak can exceed the stock one. ``extract-features``
calls it on CPU (after forking its loader workers, so that they share no heap pages with it; its res5 head
runs one image's regions per chunk there, so that sizes repeat). Call it at the start of a CPU training
script; it affects the whole process, whatever model runs in it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch

logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_STATE: dict[str, bool] = {}

#: Set to ``0`` to leave the allocator alone.
ENV_DISABLE = "LXMERT_TUNE_MALLOC"


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (present only in glibc)
        return libc
    except (OSError, AttributeError):
        return None


def tune_cpu_allocator() -> bool:
    """Keep freed heap memory in this process (glibc only); returns whether the setting is in effect.

    Sets ``M_MMAP_MAX = 0`` (the main thread's large blocks come from the heap, not from fresh ``mmap``
    regions) and ``M_TRIM_THRESHOLD = -1`` (never give the heap top back). Threads other than the main
    one keep their own arenas and still get ``mmap`` for blocks larger than an arena. A no-op returning
    ``False`` on other C libraries (musl, macOS, Windows) or when the environment variable
    ``LXMERT_TUNE_MALLOC=0``. Idempotent.
    """
    if "done" in _STATE:
        return _STATE["done"]
    ok = False
    if os.environ.get(ENV_DISABLE, "1") != "0":
        libc = _glibc()
        if libc is not None:
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            libc.mallopt.restype = ctypes.c_int
            ok = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))
    _STATE["done"] = ok
    logger.info("CPU allocator: %s", "freed memory kept in the process" if ok else "left as is")
    return ok


@functools.cache
def cpu_autocast_is_fast(dtype: torch.dtype) -> bool:
    """Whether this CPU runs ``dtype`` (bf16 / fp16) matmuls natively, i.e. CPU autocast to it can pay off.

    torch computes CPU bf16 matmuls with oneDNN where the CPU has AVX512 (best with AVX512-BF16 or AMX) and
    fp16 ones where it has AVX512-FP16 / AMX-FP16; elsewhere (e.g. an AVX2-only CPU) it falls back to a
    reference kernel some 100x slower than float32 (measured on an AVX2 EPYC: float32 100-175 GFLOP/s, bf16
    ~1 GFLOP/s). float32 is always "fast".
    """
    if dtype == torch.float32:
        return True
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False
    return False


def cpu_autocast_warning(dtype: torch.dtype | None) -> str | None:
    """A one-line explanation when CPU autocast to ``dtype`` would be far slower than float32, else None."""
    if dtype is None or cpu_autocast_is_fast(dtype):
        return None
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    capability = torch.backends.cpu.get_cpu_capability()
    return (
        f"this CPU ({capability}) has no native {name} matrix multiply: {name} autocast runs ~100x slower "
        f"than float32 here; use float32 on this machine (or a CPU with AVX512-BF16 / AMX, or a GPU)"
    )
