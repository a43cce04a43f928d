"""extract.images: decoding (modes, EXIF, bad files) and Caffe-style resizing."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from extract.images import (
    ImageError,
    compute_scale,
    decode_image,
    is_image_file,
    load_image,
    resize_bgr,
    resized_shape,
)


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_with_size(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (valid CRC) over a tiny 1x1 payload."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------------ resizing
@pytest.mark.parametrize(
    ("h", "w", "expected"),
    [
        (480, 640, (600, 800)),  # shortest side -> 600
        (640, 480, (800, 600)),
        (427, 640, (600, 899)),  # 640 * 600 / 427 = 899.3
        (300, 1000, (300, 1000)),  # longest side caps the scale at 1
        (200, 2000, (100, 1000)),  # downscale by the long side
        (1, 1, (600, 600)),
        (1, 3000, (1, 1000)),  # never 0 pixels
    ],
)
def test_resized_shape_follows_caffe_rule(h: int, w: int, expected: tuple[int, int]) -> None:
    assert resized_shape(h, w) == expected
    scale = compute_scale(h, w)
    assert scale == pytest.approx(min(600 / min(h, w), 1000 / max(h, w)))


def test_resize_is_bilinear_with_half_pixel_centres() -> None:
    """x2 upscale of a horizontal ramp: output pixel X samples source x = (X + 0.5) / 2 - 0.5 (cv2/Caffe)."""
    ramp = np.tile(np.arange(8, dtype=np.float32) * 10, (4, 1))
    bgr = np.stack([ramp, ramp + 1, ramp + 2], axis=2)
    out, scale = resize_bgr(bgr, min_size=8, max_size=100)
    assert scale == 2.0 and out.shape == (8, 16, 3) and out.dtype == np.float32
    xs = (np.arange(16) + 0.5) / 2 - 0.5
    interior = slice(1, 15)  # the two borders clamp to the edge pixel
    np.testing.assert_allclose(out[3, interior, 0], 10 * xs[interior], atol=1e-3)
    np.testing.assert_allclose(out[3, interior, 2], 10 * xs[interior] + 2, atol=1e-3)
    assert out[0, 0, 0] == 0.0 and out[0, -1, 0] == 70.0


def test_load_image_gives_bgr_float_chw_resized_like_cv2(tmp_path: Path) -> None:
    rgb = _rgb(37, 53)
    path = tmp_path / "a.png"
    Image.fromarray(rgb).save(path)
    loaded = load_image(path, min_size=60, max_size=100)
    scale = 60 / 37
    assert loaded.orig_size == (37, 53)
    assert loaded.scale == pytest.approx(scale)
    assert loaded.image.dtype == torch.float32
    assert loaded.size == (60, round(53 * scale))
    ref = cv2.resize(
        rgb[:, :, ::-1].astype(np.float32), None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR
    )
    np.testing.assert_array_equal(loaded.image.numpy(), ref.transpose(2, 0, 1))
    # channel 0 is blue: without resizing, the values are exactly the file's B channel
    same = load_image(path, min_size=37, max_size=1000)
    assert same.size == (37, 53)
    np.testing.assert_array_equal(same.image[0].numpy(), rgb[:, :, 2].astype(np.float32))
    np.testing.assert_array_equal(same.image[2].numpy(), rgb[:, :, 0].astype(np.float32))


# ------------------------------------------------------------------------------------------------ modes
def _write_mode(path: Path, mode: str) -> np.ndarray:
    """Save a 20x30 image in ``mode``; returns the RGB the decoder should produce."""
    rgb = _rgb(20, 30, seed=1)
    img = Image.fromarray(rgb)
    if mode == "I;16":
        gray16 = (np.arange(20 * 30).reshape(20, 30) * 100).astype(np.uint16)
        Image.fromarray(gray16).save(path)
        expect = np.clip(np.rint(gray16 / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(expect[:, :, None], 3, axis=2)
    if mode == "P-transparent":
        pal = img.convert("P")
        pal.info["transparency"] = 0
        pal.save(path, transparency=0)
        return np.asarray(Image.open(path).convert("RGBA").convert("RGB"))
    converted = img.convert(mode)
    converted.save(path)
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [
        ("L", ".png"),
        ("LA", ".png"),
        ("P", ".png"),
        ("P-transparent", ".png"),
        ("RGBA", ".png"),
        ("RGBA", ".webp"),
        ("CMYK", ".jpg"),
        ("I;16", ".png"),
        ("RGB", ".bmp"),
    ],
)
def test_every_mode_becomes_8bit_bgr(tmp_path: Path, mode: str, suffix: str) -> None:
    path = tmp_path / f"img{suffix}"
    expect_rgb = _write_mode(path, mode)
    bgr = decode_image(path)
    assert bgr.dtype == np.uint8 and bgr.shape == (20, 30, 3)
    if suffix != ".webp":  # lossy/alpha handling of webp varies; shape and dtype are what matter there
        np.testing.assert_array_equal(bgr, expect_rgb[:, :, ::-1])


def test_sixteen_bit_keeps_its_range(tmp_path: Path) -> None:
    """65535 -> 255 (not clipped to 255 as PIL's own I;16 -> RGB conversion does)."""
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    bgr = decode_image(tmp_path / "g16.png")
    assert bgr[0, :, 0].tolist() == [0, 1, 128, 255]


def test_exif_orientation_is_applied_and_sizes_are_after_it(tmp_path: Path) -> None:
    rgb = _rgb(40, 60, seed=2)
    img = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rot.png", exif=exif.tobytes())
    bgr = decode_image(tmp_path / "rot.png")
    assert bgr.shape == (60, 40, 3)
    np.testing.assert_array_equal(bgr[:, :, ::-1], np.rot90(rgb, k=-1))
    loaded = load_image(tmp_path / "rot.png", min_size=40, max_size=100)
    assert loaded.orig_size == (60, 40)
    assert loaded.size == (60, 40)


def test_one_pixel_image_is_upscaled(tmp_path: Path) -> None:
    Image.new("RGB", (1, 1), (10, 20, 30)).save(tmp_path / "dot.png")
    loaded = load_image(tmp_path / "dot.png")
    assert loaded.orig_size == (1, 1) and loaded.size == (600, 600)
    assert torch.all(loaded.image[:, 300, 300] == torch.tensor([30.0, 20.0, 10.0]))


# ------------------------------------------------------------------------------------------------ bad files
def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.jpg", b"", "empty file"),
        ("text.png", b"this is not an image at all\n" * 5, "not a recognised image"),
        ("header.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt header"),
        ("truncated.jpg", None, "truncated"),
    ],
)
def test_unusable_files_raise_image_error_naming_file(
    tmp_path: Path, name: str, content, reason: str
) -> None:
    path = tmp_path / name
    if content is None:
        content = _jpeg_bytes()[:400]
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason) as info:
        load_image(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path / "dir.jpg")


def test_decompression_bomb_is_refused_without_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    _png_with_size(path, 30000, 30000)  # 900 Mpx, over twice PIL's limit: an error
    with pytest.raises(ImageError, match="too large"):
        load_image(path)
    between = tmp_path / "warn.png"
    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)  # between the limit and twice it: PIL only warns
    _png_with_size(between, side, side)
    with pytest.raises(ImageError, match="too large"):
        load_image(between)


def test_max_pixels(tmp_path: Path) -> None:
    Image.fromarray(_rgb(30, 40)).save(tmp_path / "a.png")
    with pytest.raises(ImageError, match="over --max-pixels 1000"):
        load_image(tmp_path / "a.png", max_pixels=1000)
    assert load_image(tmp_path / "a.png", max_pixels=1200).orig_size == (30, 40)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_permissions(tmp_path: Path) -> None:
    path = tmp_path / "secret.png"
    Image.fromarray(_rgb(8, 8)).save(path)
    path.chmod(0)
    try:
        with pytest.raises(ImageError, match="permission denied"):
            load_image(path)
    finally:
        path.chmod(0o644)


def test_extensions_any_case() -> None:
    for name in ("a.jpg", "a.JPG", "a.jpeg", "a.JPEG", "a.png", "a.PnG", "a.bmp", "a.webp", "a.WEBP"):
        assert is_image_file(name), name
    for name in ("a.gif", "a.txt", "a", "jpg", "a.jpg.txt"):
        assert not is_image_file(name), name
