"""``lxmert-answer --draw``: the image with its regions shaded by the model's attention, labels and answers."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from extract.images import decode_image
from tasks.answer.answerer import AnswerInputError, AnswerResult

__all__ = ["MIN_LONG_SIDE", "draw_result"]


#: A picture whose long side is shorter is enlarged (by a whole factor) so that its labels stay legible.
MIN_LONG_SIDE = 512


def draw_result(
    result: AnswerResult,
    out: str | os.PathLike,
    *,
    labelled: int = 6,
    max_pixels: int | None = None,
    min_long_side: int = MIN_LONG_SIDE,
) -> Path:
    """Write the image with its regions shaded by attention and the most attended ones labelled.

    Every pixel is darkened unless regions cover it: brightness ``0.25 + 0.75 * a / max(a)`` where ``a`` is the
    summed attention of the regions covering the pixel. The ``labelled`` most attended regions get a frame and
    ``"attribute object attention"`` (a label that would cover another is left out); the question and the top answers are written in a band at the bottom.
    The output has the image's size (after EXIF orientation, as the boxes), enlarged ``k`` times (nearest
    pixel, ``k`` the smallest whole number that brings the long side to ``min_long_side``) when it is smaller:
    a 64x64 image is drawn at 512x512; its format follows the suffix.
    """
    bgr = decode_image(result.image, max_pixels=max_pixels)
    k = max(1, math.ceil(min_long_side / max(bgr.shape[:2])))
    if k > 1:
        bgr = bgr.repeat(k, axis=0).repeat(k, axis=1)
    rgb = bgr[:, :, ::-1].astype(np.float32)
    h, w = rgb.shape[:2]
    boxes = [[v * k for v in region.box] for region in result.regions]
    heat = np.zeros((h, w), dtype=np.float32)
    for region, box in zip(result.regions, boxes):
        x1, y1, x2, y2 = _pixel_box(box, w, h)
        heat[y1:y2, x1:x2] += region.attention
    peak = float(heat.max())
    shade = 0.25 + 0.75 * (heat / peak if peak > 0 else np.ones_like(heat))
    img = Image.fromarray(np.clip(rgb * shade[:, :, None], 0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(img, "RGBA")
    size = max(10, round(min(w, h) / 32))
    font = _font(size)
    line = max(1, round(min(w, h) / 250))
    ranked = sorted(zip(result.regions, boxes), key=lambda rb: -rb[0].attention)[: max(0, labelled)]
    for _, box in ranked:
        x1, y1, x2, y2 = _pixel_box(box, w, h)
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=(255, 215, 0, 255), width=line)
    placed: list[tuple[int, int, int, int]] = []
    for region, box in ranked:  # labels of the most attended first; one that would cover another is left out
        x1, y1, x2, y2 = _pixel_box(box, w, h)
        text = f"{region.attribute} {region.object} {region.attention:.2f}"
        for tx, ty in (
            (x1 + line, y1 - size - 2 * line),
            (x1 + line, y1 + line),
            (x1 + line, y2 - size - 2 * line),
        ):
            left, top, right, bottom = draw.textbbox((tx, ty), text, font=font)
            rect = (left - line, top - line, right + line, bottom + line)
            if rect[1] >= 0 and not any(_overlap(rect, other) for other in placed):
                placed.append(rect)
                draw.rectangle(rect, fill=(0, 0, 0, 170))
                draw.text((tx, ty), text, fill=(255, 255, 255, 255), font=font)
                break

    lines = [f"Q: {result.question}", "A: " + ", ".join(f"{a.answer} ({a.prob:.2f})" for a in result.answers)]
    lines = [_fit(draw, text, font, w - 2 * size) for text in lines]
    band = len(lines) * (size + size // 2) + size // 2
    draw.rectangle([0, max(0, h - band), w, h], fill=(0, 0, 0, 190))
    for i, text in enumerate(lines):
        draw.text(
            (size // 2, h - band + size // 4 + i * (size + size // 2)), text, fill=(255, 255, 255), font=font
        )

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        img.save(out)
    except (OSError, ValueError, KeyError) as e:
        raise AnswerInputError(f"cannot write the picture {out}: {e} (use a .png or .jpg name)") from None
    return out


def _pixel_box(box: list[float], w: int, h: int) -> tuple[int, int, int, int]:
    x1 = min(max(int(math.floor(box[0])), 0), w)
    y1 = min(max(int(math.floor(box[1])), 0), h)
    x2 = min(max(int(math.ceil(box[2])), x1), w)
    y2 = min(max(int(math.ceil(box[3])), y1), h)
    return x1, y1, x2, y2


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """``text``, cut with "..." to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
