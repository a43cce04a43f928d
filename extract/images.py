"""Image decoding and Caffe-style resizing for region-feature extraction.

An image file becomes the detector's input in three steps:

1. decode with PIL and apply the EXIF orientation (``img_h``/``img_w`` stored in the feature store are the size
   AFTER this step: the image as a viewer shows it);
2. convert any mode (L, LA, P, RGBA, CMYK, I;16, ...) to 8-bit RGB, then reorder channels to BGR;
3. resize like the Caffe bottom-up-attention extractor: ``scale = min(min_size / short, max_size / long)`` and
   ``cv2.resize(float_image, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)``, which gives
   ``round(h * scale) x round(w * scale)`` pixels.

The pixel mean is NOT subtracted here: the detector subtracts ``cfg.MODEL.PIXEL_MEAN`` itself. Every problem
with a file (missing, unreadable, not an image, truncated, too large, ...) raises :class:`ImageError` naming the
file and the reason, so the runner can list it and go on.
"""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageError",
    "LoadedImage",
    "compute_scale",
    "decode_image",
    "is_image_file",
    "load_image",
    "resize_bgr",
    "resized_shape",
]

#: File extensions taken when walking a folder (compared case-insensitively).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})

# PIL modes holding more than 8 bits per sample; mapped to 0..255 by dividing by 257 (65535 -> 255).
_WIDE_INT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


class ImageError(Exception):
    """An image that cannot be used; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class LoadedImage:
    """A decoded, resized image ready for the detector.

    Attributes:
        image: ``(3, H, W)`` float32 tensor, BGR channel order, values 0..255 (mean NOT subtracted), resized.
        orig_size: ``(h, w)`` of the original image in pixels, after EXIF orientation.
        scale: the resize factor (resized pixels per original pixel).
        path: the file it came from.
    """

    image: torch.Tensor
    orig_size: tuple[int, int]
    scale: float
    path: str = ""

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of the resized image."""
        return int(self.image.shape[1]), int(self.image.shape[2])


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name ends with one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def compute_scale(h: int, w: int, min_size: int = 600, max_size: int = 1000) -> float:
    """Caffe's resize factor: the shortest side to ``min_size`` unless the longest would exceed ``max_size``."""
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got h={h}, w={w}")
    if min_size <= 0 or max_size <= 0:
        raise ValueError(f"min_size and max_size must be positive, got {min_size}, {max_size}")
    return min(float(min_size) / min(h, w), float(max_size) / max(h, w))


def resized_shape(h: int, w: int, min_size: int = 600, max_size: int = 1000) -> tuple[int, int]:
    """``(H, W)`` after :func:`resize_bgr`: ``round(h * scale), round(w * scale)`` (at least 1 pixel)."""
    scale = compute_scale(h, w, min_size, max_size)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> ``(h, w, 3)`` uint8 RGB."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img)
    if mode in _WIDE_INT_MODES:
        arr = np.asarray(img).astype(np.float64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # the palette's transparency is dropped below, like the alpha channel
    # L, LA, P, PA, RGBA, RGBX, CMYK, YCbCr, LAB, HSV, 1: PIL's own conversion (alpha dropped, as cv2.imread does)
    return np.asarray(img.convert("RGB"))


def decode_image(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Decode a file to ``(h, w, 3)`` uint8 BGR after EXIF orientation.

    Raises:
        ImageError: the file is missing, unreadable, empty, not an image, truncated or corrupt, or larger than
            PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) or ``max_pixels``.
    """
    path = str(path)
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; treat it as the error it is here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w <= 0 or h <= 0:
                    raise ImageError(path, f"image has an empty size {w}x{h}")
                if max_pixels is not None and w * h > max_pixels:
                    raise ImageError(
                        path, f"image is {w}x{h} = {w * h} pixels, over --max-pixels {max_pixels}; skipped"
                    )
                img.load()
                img = ImageOps.exif_transpose(img)
                rgb = _to_rgb(img)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except PermissionError as e:
        raise ImageError(path, f"cannot read the file (permission denied: {e.strerror})") from None
    except IsADirectoryError:
        raise ImageError(path, "is a directory, not an image file") from None
    except UnidentifiedImageError:
        size = _file_size(path)
        what = (
            "empty file (0 bytes)"
            if size == 0
            else f"not a recognised image (unknown format or corrupt header, {size} bytes)"
        )
        raise ImageError(path, what) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(path, f"image too large (decompression-bomb limit): {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, struct.error) as e:
        raise ImageError(path, f"corrupt or truncated image ({type(e).__name__}: {e})") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageError(path, f"decoded to an unusable array of shape {rgb.shape}")
    return np.ascontiguousarray(rgb[:, :, ::-1])


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def resize_bgr(bgr: np.ndarray, min_size: int = 600, max_size: int = 1000) -> tuple[np.ndarray, float]:
    """Resize ``(h, w, 3)`` BGR (any dtype) the Caffe way; returns ``((H, W, 3) float32, scale)``.

    The image is converted to float32 first and resized with ``cv2.INTER_LINEAR`` using ``fx = fy = scale``
    (the output size is ``round(h * scale) x round(w * scale)``), as the Caffe extractor does.
    """
    h, w = bgr.shape[:2]
    scale = compute_scale(h, w, min_size, max_size)
    image = bgr.astype(np.float32)
    out_h, out_w = resized_shape(h, w, min_size, max_size)
    if (out_h, out_w) != (h, w) or scale != 1.0:
        out = cv2.resize(image, None, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        if out.shape[:2] != (out_h, out_w):  # cv2 rounds the same way; guard against a 0-pixel side
            out = cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
        image = out
    if image.ndim == 2:  # cv2 drops a singleton channel axis; never the case for 3 channels, kept for safety
        image = image[:, :, None]
    return image, scale


def load_image(
    path: str | os.PathLike,
    min_size: int = 600,
    max_size: int = 1000,
    max_pixels: int | None = None,
) -> LoadedImage:
    """Decode, orient, convert and resize one image file for the detector.

    Args:
        path: image file (any format PIL reads).
        min_size: target length of the shortest side in pixels (default 600, as LXMERT's features).
        max_size: cap on the longest side in pixels (default 1000).
        max_pixels: refuse images with more than this many pixels (``w * h`` of the file), besides PIL's own
            decompression-bomb limit.

    Returns:
        :class:`LoadedImage` with ``image`` ``(3, H, W)`` float32 BGR 0..255 and ``orig_size`` ``(h, w)``.

    Raises:
        ImageError: with the file and a reason, for any file that cannot be used.
    """
    bgr = decode_image(path, max_pixels=max_pixels)
    orig_h, orig_w = bgr.shape[:2]
    try:
        resized, scale = resize_bgr(bgr, min_size, max_size)
    except (cv2.error, ValueError, MemoryError) as e:
        raise ImageError(path, f"cannot resize the {orig_w}x{orig_h} image: {e}") from None
    image = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
    return LoadedImage(image=image, orig_size=(int(orig_h), int(orig_w)), scale=float(scale), path=str(path))
