"""The batched, sharded, resumable extraction run behind ``extract-features``.

Data flow for one process (one torchrun rank)::

    image files --(DataLoader workers: decode, EXIF, ->BGR, Caffe resize)--> samples
      --(AspectRatioGrouper: batches of same-size / same-orientation images)--> device
      --(VGDetector.extract)--> records --(bounded queue)--> writer thread --> FeatureWriter (LMDB)

- Images are identified by an id (file stem by default, or the relative path); two files with one id are
  refused before any work (:class:`DuplicateIdError`).
- Sharding: the id-sorted image list is split round-robin over the ``WORLD_SIZE`` ranks (``items[rank::world]``)
  BEFORE looking at the store, so the shards never overlap however the ranks progress. Every rank writes into
  the same LMDB store (LMDB serialises writers); rank 0 creates / validates the store first.
- Resume: ids already in the store are skipped (unless ``overwrite``); a record is committed whole or not at all,
  so a run killed at any point is finished by running the same command again.
- Bad input never stops the run: an image that cannot be decoded, or that makes the detector fail, is listed
  in ``OUT.failures.jsonl`` (path, id, reason; rewritten atomically at the end of every complete run).
- A full disk stops it with :class:`common.diskspace.DiskFullError` (the store and the free space); the records
  committed before are kept, so the same command resumes once there is room.
- Settings that change the features (weights sha256, box selection, image sizes, ...) are recorded in the
  store's metadata; an existing store written with other settings is refused (:class:`SetupError`): the
  settings known before the detector is built are checked first, the weights' sha256 (hashed once, while
  loading them) when the store is opened.

This module holds the run itself; the parts live beside it, one job each, and are re-exported here:
:mod:`extract.image_list` (images and ids), :mod:`extract.config` (:class:`ExtractConfig`),
:mod:`extract.loading` (dataset, batching), :mod:`extract.store_setup` (the store checked, then opened),
:mod:`extract.store_thread` (writer thread),
:mod:`extract.outcome` (failures, summary). The run logs (``logging``); the CLI prints.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from common.cpu import cpu_autocast_warning, tune_cpu_allocator
from common.diskspace import as_disk_full
from common.distributed import DeviceError, DistContext, resolve_device
from extract.config import AMP_DTYPES, ExtractConfig, extractor_settings
from extract.detector import build_vg_detector, get_detector_cfg
from extract.image_list import (
    DuplicateIdError,
    ImageItem,
    SetupError,
    assign_ids,
    check_unique_ids,
    collect_images,
    find_images,
    read_image_list,
)
from extract.loading import AspectRatioGrouper, ImageDataset, worker_init
from extract.outcome import ExtractSummary, Failure, failures_path, write_failures
from extract.store_setup import open_writer, precheck_store
from extract.store_thread import StoreWriterThread
from extract.weights import LoadReport, WeightsError, file_sha256, load_detector_weights, resolve_weights

__all__ = [
    "AMP_DTYPES",
    "AspectRatioGrouper",
    "DistContext",
    "DuplicateIdError",
    "ExtractConfig",
    "ExtractSummary",
    "ExtractionInterrupted",
    "Failure",
    "ImageDataset",
    "ImageItem",
    "SetupError",
    "assign_ids",
    "build_detector",
    "collect_images",
    "extractor_settings",
    "failures_path",
    "find_images",
    "load_detector",
    "read_image_list",
    "run_extraction",
    "write_failures",
]

log = logging.getLogger(__name__)

#: Settings known only once the weights are loaded (checked against the store when it is opened).
_WEIGHTS_SETTINGS = ("weights_sha256", "weights_layout")


class ExtractionInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, after the committed records were flushed; ``summary`` says what was done."""

    def __init__(self, summary: ExtractSummary) -> None:
        super().__init__("interrupted")
        self.summary = summary


# ------------------------------------------------------------------------------------------------ detector
def _weights_file(config: ExtractConfig) -> Path | None:
    """The local weights file of ``--weights`` (a file, a folder holding one, or a Hub id: see
    :func:`extract.weights.resolve_weights`), checked readable before anything slow; None with
    ``--random-weights``."""
    if config.random_weights:
        return None
    if not config.weights:
        raise SetupError(
            "no detector weights given: pass --weights faster_rcnn_from_caffe_attr.pkl (or --random-weights)"
        )
    try:
        path = resolve_weights(config.weights)
    except WeightsError as e:
        raise SetupError(str(e)) from None
    if not os.access(path, os.R_OK):
        raise SetupError(f"weights file {path} is not readable (check its permissions)")
    return path


def load_detector(config: ExtractConfig, device: torch.device | str = "cpu") -> tuple[Any, LoadReport | None]:
    """The VG detector for ``config`` and the report of its weights (None with ``config.random_weights``).

    Built from ``config.config`` + ``config.opts``; weights loaded (and hashed, once) from ``config.weights``
    unless ``config.random_weights`` (then a deterministic init from ``config.seed``).

    Raises:
        SetupError: unknown config, or weights that are missing, corrupt or incomplete.
    """
    _weights_file(config)
    try:
        cfg = get_detector_cfg(config.config, list(config.opts))
    except Exception as e:
        raise SetupError(
            f"cannot build the detector config {config.config!r} with --opts {config.opts}: {e}"
        ) from None
    detector = build_vg_detector(cfg, device=device, seed=config.seed)
    if config.random_weights:
        return detector, None
    try:
        report = load_detector_weights(detector, config.weights)
    except WeightsError as e:
        raise SetupError(str(e)) from None
    except Exception as e:
        raise SetupError(f"cannot load weights from {config.weights}: {type(e).__name__}: {e}") from None
    return detector, report


def build_detector(config: ExtractConfig, device: torch.device | str = "cpu") -> Any:
    """The VG detector for ``config`` (see :func:`load_detector`, which also returns the weights' report)."""
    return load_detector(config, device)[0]


def _weights_identity(config: ExtractConfig, report: LoadReport | None) -> tuple[str | None, str | None]:
    """``(sha256, layout)`` of the weights: from the load report, or (for a detector built by the caller,
    whose weights file this run did not read) the file hashed here; ``(None, None)`` with random weights."""
    if config.random_weights:
        return None, None
    if report is not None:
        return report.sha256, report.layout
    path = _weights_file(config)
    try:
        return file_sha256(path), None
    except (OSError, WeightsError) as e:
        raise SetupError(f"cannot read the weights file {path}: {e}") from None


# ------------------------------------------------------------------------------------------------ the run
def run_extraction(
    config: ExtractConfig,
    items: Sequence[ImageItem],
    *,
    detector: Any = None,
    dist_ctx: DistContext | None = None,
) -> ExtractSummary:
    """Extract every image in ``items`` not yet in the store ``config.out`` (all of them with ``overwrite``).

    Args:
        config: the run's settings.
        items: the images (ids must be unique: see :func:`assign_ids`); each rank passes the same list.
        detector: a ready ``VGDetector`` (or anything with its ``extract``/``device``); built from ``config``
            when None. An injected detector must match ``config`` (its settings are what the store records).
        dist_ctx: rank/world; by default read from torchrun's environment (process group initialised when
            WORLD_SIZE > 1).

    Returns:
        the summary aggregated over all ranks (identical on every rank). Rank 0 writes the failures file.
        Nothing is printed: progress goes to a tqdm bar, the rest to the ``extract.runner`` logger.

    Raises:
        SetupError: refused before any work (weights, store, settings).
        DiskFullError: the disk holding the store is full (what was committed is kept: run again to resume).
        ExtractionInterrupted: (a KeyboardInterrupt) after the committed records are flushed and the store
            closed; its ``summary`` counts what was done.
    """
    check_unique_ids(items)

    own_dist = dist_ctx is None
    device = torch.device(config.device) if config.device else None
    if dist_ctx is None:
        want = device.type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        dist_ctx = DistContext.from_env(want)
    try:
        if detector is None:
            try:
                device = resolve_device(config.device, dist_ctx)
            except DeviceError as e:
                raise SetupError(str(e)) from None
        else:
            device = torch.device(getattr(detector, "device", device or "cpu"))
        _weights_file(config)
        # refuse a wrong store before the (slow) detector build; the weights' identity is checked on open
        precheck_store(config, extractor_settings(config, None), ignore=_WEIGHTS_SETTINGS)
        report = None
        if detector is None:
            detector, report = load_detector(config, device)
        settings = extractor_settings(config, *_weights_identity(config, report))
        dist_ctx.barrier()  # every rank has checked the store before rank 0 may create it
        writer = open_writer(config, settings, dist_ctx)
        try:
            return _run(config, items, detector, writer, device, dist_ctx, settings)
        except (OSError, RuntimeError) as exc:  # the store, or the failures file beside it: a full disk?
            full = as_disk_full(exc, config.out, guess=False)
            if full is None:
                raise
            raise full from exc
    finally:
        if own_dist:
            dist_ctx.close()


def _run(
    config: ExtractConfig,
    items: Sequence[ImageItem],
    detector: Any,
    writer: Any,
    device: torch.device,
    dist_ctx: DistContext,
    settings: dict[str, Any],
) -> ExtractSummary:
    start = time.perf_counter()
    shard = sorted(items, key=lambda it: it.img_id)[dist_ctx.rank :: dist_ctx.world_size]
    if config.overwrite:
        pending, skipped = list(shard), 0
    else:
        existing = writer.existing_ids()
        pending = [it for it in shard if it.img_id not in existing]
        skipped = len(shard) - len(pending)

    if dist_ctx.is_main:
        log.info(
            "%d images -> %s; %d process(es), device %s, batch size %d, %d loader worker(s)",
            len(items),
            config.out,
            dist_ctx.world_size,
            device,
            config.batch_size,
            config.workers,
        )
        slow = cpu_autocast_warning(config.amp_dtype) if device.type == "cpu" else None
        if slow is not None:
            log.warning("--amp %s: %s", config.amp, slow)

    failures: list[Failure] = []
    writer_thread = StoreWriterThread(writer, config.writer_queue)  # starts with the first record
    interrupted = False
    bar = tqdm(
        total=len(pending),
        unit="img",
        desc=f"extract (rank 0 of {dist_ctx.world_size})" if dist_ctx.world_size > 1 else "extract",
        disable=not (config.progress and dist_ctx.is_main),
        dynamic_ncols=True,
        smoothing=0.1,
    )
    try:
        _extract_pending(config, pending, detector, device, writer_thread, failures, bar)
    except KeyboardInterrupt:
        interrupted = True
    except BaseException:
        bar.close()
        try:
            writer_thread.finish()
        finally:
            writer.close()
        raise
    bar.close()
    writer_thread.finish()  # commits what the device already produced, also on Ctrl-C
    failures.extend(writer_thread.failures)
    local = {
        "total": len(shard),
        "done": writer_thread.written,
        "skipped": skipped + writer_thread.present,
        "failures": failures,
        "interrupted": interrupted,
    }
    if interrupted:  # no collectives: the other ranks may be gone already
        writer.close()
        raise ExtractionInterrupted(_summarise([local], config, device, dist_ctx, start, settings))

    gathered = dist_ctx.all_gather(local)
    # the last to close writes the final count: everyone else first
    if not dist_ctx.is_main:
        writer.close()
    dist_ctx.barrier()
    if dist_ctx.is_main:
        writer.close()
    summary = _summarise(gathered, config, device, dist_ctx, start, settings)
    if dist_ctx.is_main:
        write_failures(failures_path(config.out), summary.failures)
    dist_ctx.barrier()
    return summary


def _summarise(
    parts: list[dict],
    config: ExtractConfig,
    device: torch.device,
    dist_ctx: DistContext,
    start: float,
    settings: dict[str, Any],
) -> ExtractSummary:
    return ExtractSummary(
        total=sum(p["total"] for p in parts),
        done=sum(p["done"] for p in parts),
        skipped=sum(p["skipped"] for p in parts),
        failures=sorted((f for p in parts for f in p["failures"]), key=lambda f: f.img_id),
        elapsed_s=time.perf_counter() - start,
        world_size=dist_ctx.world_size,
        device=str(device),
        random_weights=config.random_weights,
        interrupted=any(p["interrupted"] for p in parts),
        out=config.out,
        weights=settings["weights"],
        weights_sha256=settings["weights_sha256"],
        weights_layout=settings["weights_layout"],
    )


def _extract_pending(
    config: ExtractConfig,
    pending: Sequence[ImageItem],
    detector: Any,
    device: torch.device,
    writer_thread: StoreWriterThread,
    failures: list[Failure],
    bar: tqdm,
) -> None:
    if not pending:
        return
    dataset = ImageDataset(pending, config.min_size, config.max_size, config.max_pixels)
    workers = min(config.workers, len(pending))
    loader = DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=worker_init if workers > 0 else None,
        prefetch_factor=max(2, 2 * config.batch_size // max(1, workers)) if workers > 0 else None,
    )
    grouper = AspectRatioGrouper(config.batch_size)

    def fail(sample: dict, reason: str) -> None:
        failures.append(Failure(sample["path"], sample["img_id"], reason))
        bar.update(1)
        bar.set_postfix(failed=len(failures), refresh=False)

    def run_batch(batch: list[dict]) -> None:
        for sample, record in _detect(detector, batch, config, device):
            if isinstance(record, str):
                fail(sample, record)
                continue
            record["img_h"], record["img_w"] = (int(v) for v in sample["orig_size"])
            writer_thread.submit((sample["img_id"], sample["path"], record))
            bar.update(1)

    samples = iter(loader)  # forks the DataLoader workers
    if device.type == "cpu":
        # A forward allocates ~6 GB of temporaries per image; keeping freed memory saves faulting them in
        # again (~1.5x on CPU). The res5 head runs one image's proposals per chunk on CPU, so the sizes
        # repeat whatever the batch. After the fork: the heap kept from now on is the parent's own (no
        # copy-on-write with the workers).

        tune_cpu_allocator()
    for sample in samples:
        if sample["error"] is not None:
            fail(sample, sample["error"])
            continue
        for batch in grouper.add(sample, tuple(sample["image"].shape[-2:])):
            run_batch(batch)
    for batch in grouper.flush():
        run_batch(batch)


def _detect(
    detector: Any, batch: list[dict], config: ExtractConfig, device: torch.device
) -> list[tuple[dict, dict | str]]:
    """Run the detector on a batch; when it fails, retry image by image so only the culprit fails.

    Returns (sample, record) pairs; the record is a string (the reason) for an image that failed.
    """
    images = [s["image"].to(device, non_blocking=True) for s in batch]
    sizes = [tuple(int(v) for v in s["orig_size"]) for s in batch]
    try:
        records = detector.extract(images, sizes, config.selection, amp_dtype=config.amp_dtype)
        if len(records) != len(batch):
            raise RuntimeError(f"the detector returned {len(records)} records for {len(batch)} images")
        return list(zip(batch, records))
    except Exception as e:
        del images
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if len(batch) > 1:
            out: list[tuple[dict, dict | str]] = []
            for sample in batch:
                out.extend(_detect(detector, [sample], config, device))
            return out
        h, w = batch[0]["image"].shape[-2:]
        return [(batch[0], f"detector failed on the {w}x{h} resized image ({type(e).__name__}: {e})")]
