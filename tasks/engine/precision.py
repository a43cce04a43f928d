"""Devices and mixed precision for the engine (training and evaluation)."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext

import torch

from common.cpu import cpu_autocast_is_fast, cpu_autocast_warning

logger = logging.getLogger(__name__)

__all__ = ["autocast", "resolve_amp", "set_tf32"]


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """``train.amp`` -> autocast dtype (None = float32). ``auto``: bf16 on CUDA, on CPU bf16 where the CPU
    has native bf16 matmuls (:func:`common.cpu.cpu_autocast_is_fast`), else float32."""
    if amp == "none":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if device.type == "cpu" and cpu_autocast_is_fast(torch.bfloat16) else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    if device.type == "cpu":
        warning = cpu_autocast_warning(dtype)
        if warning:
            logger.warning("train.amp=%s: %s", amp, warning)
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``'s type; a no-op context for float32 (``None``)."""
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def set_tf32(device: torch.device, allowed: bool) -> None:
    """``train.tf32``: whether float32 matrix multiplies and convolutions on CUDA may use TensorFloat-32
    (Ampere and later: a 10-bit mantissa for the inputs, ~3x the fp32 throughput). False: IEEE float32
    (``fp32_precision = "ieee"`` for ``torch.backends.cuda.matmul`` and ``torch.backends.cudnn``), as the
    original, which trained in float32. Set for the whole process; a no-op on other devices."""
    if device.type != "cuda":
        return
    mode = "tf32" if allowed else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.fp32_precision = mode
