"""Feeding the detector: images decoded and resized in DataLoader workers, grouped into same-shape batches.

A sample is a dict: ``img_id``, ``path``, ``image`` ((3, H, W) float32 BGR 0..255 after the Caffe-style
resize, or None on failure), ``orig_size`` ((h, w) in original pixels, or None), ``error`` (None, or the
reason the image is unusable).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from extract.image_list import ImageItem
from extract.images import ImageError, load_image

__all__ = ["AspectRatioGrouper", "ImageDataset", "worker_init"]


class ImageDataset(Dataset):
    """Decodes and resizes one image per index (runs in DataLoader workers).

    A sample is a dict: ``img_id``, ``path``, ``image`` ((3, H, W) float32 BGR 0..255, or None on failure),
    ``orig_size`` ((h, w) or None), ``error`` (None, or the reason the image is unusable).
    """

    def __init__(
        self, items: Sequence[ImageItem], min_size: int, max_size: int, max_pixels: int | None
    ) -> None:
        self.items = list(items)
        self.min_size, self.max_size, self.max_pixels = min_size, max_size, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        sample: dict[str, Any] = {"img_id": item.img_id, "path": item.path, "image": None, "orig_size": None}
        try:
            loaded = load_image(item.path, self.min_size, self.max_size, self.max_pixels)
        except ImageError as e:
            sample["error"] = e.reason
        except Exception as e:  # never let one file kill a worker
            sample["error"] = f"unexpected error while loading ({type(e).__name__}: {e})"
        else:
            sample.update(image=loaded.image, orig_size=loaded.orig_size, error=None)
        return sample


def worker_init(_: int) -> None:
    """One torch thread per DataLoader worker: the workers are the parallelism.

    (``cv2.setNumThreads`` is NOT called here: in a forked child whose parent already used OpenCV's thread
    pool it deadlocks; ``cv2.resize`` itself is fork-safe.)
    """
    torch.set_num_threads(1)


class AspectRatioGrouper:
    """Forms batches of samples with the same resized size, or at least the same orientation.

    A batch is emitted as soon as one size bucket holds ``batch_size`` samples. When more than ``max_buffer``
    samples wait, the orientation (landscape ``H <= W`` / portrait) holding the most samples gives a batch,
    largest buckets first. :meth:`flush` empties the buffer the same way at the end. Deterministic given the
    order of the samples.
    """

    def __init__(self, batch_size: int, max_buffer: int | None = None) -> None:
        self.batch_size = batch_size
        self.max_buffer = max(max_buffer or 4 * batch_size, batch_size)
        self.buckets: dict[tuple[int, int], list[Any]] = {}
        self.pending = 0

    def add(self, sample: Any, shape: tuple[int, int]) -> list[list[Any]]:
        """Buffer ``sample`` whose resized ``(H, W)`` is ``shape``; returns the batches now complete."""
        bucket = self.buckets.setdefault(tuple(shape), [])
        bucket.append(sample)
        self.pending += 1
        if len(bucket) >= self.batch_size:
            return [self._take([tuple(shape)])]
        if self.pending >= self.max_buffer:
            return [self._take_mixed()]
        return []

    def flush(self) -> Iterator[list[Any]]:
        """Every buffered sample, in batches."""
        while self.pending:
            yield self._take_mixed()

    def _take(self, shapes: list[tuple[int, int]]) -> list[Any]:
        batch: list[Any] = []
        for shape in shapes:
            bucket = self.buckets[shape]
            n = min(self.batch_size - len(batch), len(bucket))
            batch.extend(bucket[:n])
            del bucket[:n]
            if not bucket:
                del self.buckets[shape]
            if len(batch) == self.batch_size:
                break
        self.pending -= len(batch)
        return batch

    def _take_mixed(self) -> list[Any]:
        def landscape(s: tuple[int, int]) -> bool:
            return s[0] <= s[1]

        counts = {True: 0, False: 0}
        for shape, bucket in self.buckets.items():
            counts[landscape(shape)] += len(bucket)
        orient = counts[True] >= counts[False]
        shapes = sorted(
            (s for s in self.buckets if landscape(s) == orient), key=lambda s: -len(self.buckets[s])
        )
        return self._take(shapes)
