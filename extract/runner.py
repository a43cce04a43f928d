"""The batched, sharded, resumable extraction runner behind ``extract-features``.

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
- Settings that change the features (weights sha256, box selection, image sizes, ...) are recorded in the
  store's metadata; an existing store written with other settings is refused (:class:`SetupError`).
"""

from __future__ import annotations

import json
import os
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from common.cpu import cpu_autocast_warning, tune_cpu_allocator
from common.distributed import DeviceError, DistContext, resolve_device
from extract.images import ImageError, is_image_file, load_image
from extract.selection import BoxSelection

__all__ = [
    "AMP_DTYPES",
    "AspectRatioGrouper",
    "DistContext",
    "DuplicateIdError",
    "ExtractConfig",
    "ExtractSummary",
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
    "read_image_list",
    "run_extraction",
    "write_failures",
]

#: ``--amp`` choices -> autocast dtype (None: full float32).
AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}

ID_MODES = ("stem", "relpath")


class SetupError(Exception):
    """The run is refused before any work (bad weights, not a store, mismatched settings, ...)."""


class DuplicateIdError(SetupError):
    """Two or more files map to one image id."""


@dataclass(frozen=True)
class ImageItem:
    """One image to extract: its store key and its file."""

    img_id: str
    path: str


@dataclass(frozen=True)
class Failure:
    """An image that produced no record, and why."""

    path: str
    img_id: str
    reason: str

    def to_json(self) -> str:
        return json.dumps({"path": self.path, "id": self.img_id, "reason": self.reason}, ensure_ascii=False)


# --------------------------------------------------------------------------------------------- image lists
def find_images(root: str | os.PathLike) -> list[Path]:
    """All image files under ``root`` (recursive; jpg/jpeg/png/bmp/webp in any case), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise SetupError(f"images folder {root} does not exist or is not a folder")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if is_image_file(name):
                found.append(Path(dirpath) / name)
    return sorted(found)


def read_image_list(list_file: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> list[Path]:
    """Image paths from a text file, one per line (blank lines and lines starting with ``#`` ignored).

    Relative entries are resolved against ``base_dir`` (default: the list file's folder). Entries are kept
    whatever their extension; a missing file becomes a failure of the run, not an error here.
    """
    list_file = Path(list_file)
    try:
        text = list_file.read_text(encoding="utf-8")
    except OSError as e:
        raise SetupError(f"cannot read the image list {list_file}: {e}") from None
    base = Path(base_dir) if base_dir is not None else list_file.parent
    paths = []
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        p = Path(entry)
        paths.append(p if p.is_absolute() else base / p)
    return paths


def _image_id(path: Path, root: Path | None, id_from: str) -> str:
    if id_from == "stem":
        return path.stem
    if id_from == "relpath":
        if root is None:
            raise SetupError("--id-from relpath needs a base folder (IMAGES_DIR)")
        try:
            rel = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root)))
        except ValueError:  # different drives on Windows
            rel = Path("..")
        if rel.parts and rel.parts[0] == "..":
            raise SetupError(
                f"{path} is outside {root}; --id-from relpath needs every image inside that folder"
            )
        return rel.with_suffix("").as_posix()
    raise SetupError(f"unknown --id-from {id_from!r}; choose one of {', '.join(ID_MODES)}")


def assign_ids(
    paths: Iterable[str | os.PathLike], root: str | os.PathLike | None, id_from: str = "stem"
) -> list[ImageItem]:
    """Give every path its image id; refuse duplicates.

    Args:
        paths: image files.
        root: the folder relative paths are taken from (``id_from="relpath"``).
        id_from: ``"stem"``: the file name without extension (``COCO_train2014_000000458752``,
            ``train-10171-0-img0``, ``2375429``); ``"relpath"``: the path relative to ``root`` without
            extension, with ``/`` separators (``val2014/COCO_val2014_000000000042``).

    Returns:
        items sorted by id.

    Raises:
        DuplicateIdError: naming the id and every file that maps to it (up to 10 ids shown).
    """
    root_path = Path(root) if root is not None else None
    by_id: dict[str, list[str]] = {}
    for p in paths:
        p = Path(p)
        by_id.setdefault(_image_id(p, root_path, id_from), []).append(str(p))
    dups = {k: v for k, v in by_id.items() if len(v) > 1}
    if dups:
        lines = [f"  {k!r}: {', '.join(v)}" for k, v in sorted(dups.items())[:10]]
        more = f"\n  ... and {len(dups) - 10} more" if len(dups) > 10 else ""
        hint = " (try --id-from relpath)" if id_from == "stem" else ""
        raise DuplicateIdError(
            f"{len(dups)} image id(s) map to more than one file; rename them or choose other ids{hint}:\n"
            + "\n".join(lines)
            + more
        )
    return [ImageItem(k, v[0]) for k, v in sorted(by_id.items())]


def collect_images(
    images_dir: str | os.PathLike | None,
    list_file: str | os.PathLike | None = None,
    id_from: str = "stem",
) -> list[ImageItem]:
    """The run's images: ``images_dir`` walked recursively, or the files named in ``list_file`` (relative
    entries against ``images_dir`` when given, else against the list's folder). Sorted by id."""
    if list_file is not None:
        paths = read_image_list(list_file, images_dir)
        root = Path(images_dir) if images_dir is not None else Path(list_file).parent
    elif images_dir is not None:
        paths = find_images(images_dir)
        root = Path(images_dir)
    else:
        raise SetupError("give an images folder or --list FILE")
    return assign_ids(paths, root, id_from)


# ------------------------------------------------------------------------------------------------ config
@dataclass
class ExtractConfig:
    """Everything one ``extract-features`` run needs (built by the CLI, or by hand).

    Sizes are in pixels. ``device`` None means CUDA when available; under torchrun with CUDA every rank uses
    ``cuda:LOCAL_RANK``.
    """

    out: str
    weights: str | None = None
    random_weights: bool = False
    seed: int = 0
    config: str = "vg_r101_c4"
    opts: list[str] = field(default_factory=list)
    selection: BoxSelection = field(default_factory=BoxSelection)
    min_size: int = 600
    max_size: int = 1000
    max_pixels: int | None = None
    workers: int = 2
    batch_size: int = 4
    device: str | None = None
    amp: str = "none"
    features_dtype: str = "float32"
    overwrite: bool = False
    strict: bool = False
    progress: bool = True
    writer_queue: int = 64

    def __post_init__(self) -> None:
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"--amp must be one of {', '.join(AMP_DTYPES)}, got {self.amp!r}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        if self.min_size < 1 or self.max_size < 1:
            raise ValueError(f"--min-size/--max-size must be >= 1, got {self.min_size}/{self.max_size}")
        if self.features_dtype not in ("float32", "float16"):
            raise ValueError(f"--features-dtype must be float32 or float16, got {self.features_dtype!r}")
        if len(self.opts) % 2:
            raise ValueError(f"--opts takes KEY VALUE pairs, got an odd number of items: {self.opts}")
        self.out = str(self.out).rstrip("/\\") or str(self.out)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES[self.amp]


def failures_path(out: str | os.PathLike) -> Path:
    """``OUT.lmdb.failures.jsonl``: beside the store, named after it."""
    return Path(str(out).rstrip("/\\") + ".failures.jsonl")


def _config_name(config: str) -> str:
    return Path(config).name if (os.sep in config or config.endswith((".yaml", ".yml"))) else config


def extractor_settings(config: ExtractConfig, weights_sha256: str | None) -> dict[str, Any]:
    """The settings that determine the features, stored in (and checked against) the store's metadata.

    Batch size, workers, device and progress do not change a record and are left out; ``MODEL.DEVICE`` and
    ``MODEL.WEIGHTS`` overrides likewise.
    """
    opts = [
        (k, v)
        for k, v in zip(config.opts[0::2], config.opts[1::2])
        if k not in ("MODEL.DEVICE", "MODEL.WEIGHTS")
    ]
    return {
        "weights": None if config.random_weights else Path(config.weights or "").name,
        "weights_sha256": None if config.random_weights else weights_sha256,
        "random_weights": bool(config.random_weights),
        "seed": int(config.seed) if config.random_weights else None,
        "config": _config_name(config.config),
        "opts": [str(x) for kv in opts for x in kv],
        "selection": config.selection.rule,
        "min_boxes": config.selection.min_boxes,
        "max_boxes": config.selection.max_boxes,
        "conf_thresh": config.selection.conf_thresh,
        "nms_thresh": config.selection.nms_thresh,
        "min_size": config.min_size,
        "max_size": config.max_size,
        "amp": config.amp,
    }


# ------------------------------------------------------------------------------------------ data loading
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


def _worker_init(_: int) -> None:
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


# ------------------------------------------------------------------------------------------------ writing
_STOP = object()


class _StoreWriterThread(threading.Thread):
    """Puts records into the FeatureWriter off the main thread, through a bounded queue.

    Commits whenever the queue runs empty (the device is busy with the next batch), so committed records trail
    the device by about one batch; a record the store refuses becomes a failure.
    """

    def __init__(self, writer: Any, max_queue: int) -> None:
        super().__init__(name="feature-store-writer", daemon=True)
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, max_queue))
        self.error: BaseException | None = None
        self.written = 0
        self.present = 0
        self.failures: list[Failure] = []

    def run(self) -> None:
        from extract.store import StoreError, StoreSettingsMismatch

        try:
            while True:
                item = self.queue.get()
                if item is _STOP:
                    break
                img_id, path, record = item
                try:
                    stored = self.writer.put(img_id, record)
                except StoreSettingsMismatch:
                    raise
                except StoreError as e:
                    self.failures.append(Failure(path, img_id, f"the store refused the record: {e}"))
                    continue
                if stored:
                    self.written += 1
                else:
                    self.present += 1
                if self.queue.empty():
                    self.writer.flush()
            self.writer.flush()
        except BaseException as e:  # reported to the main thread by submit()/finish()
            self.error = e

    def submit(self, item: Any) -> None:
        if not self.is_alive() and self.ident is None:  # started lazily: after DataLoader workers are forked
            self.start()
        while True:
            self._check()
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        if self.ident is None:  # never started: nothing was submitted
            return
        if self.is_alive():
            self.submit(_STOP)
            self.join()
        self._check()

    def _check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"writing to the feature store failed: {self.error}") from self.error


def write_failures(path: str | os.PathLike, failures: Sequence[Failure]) -> None:
    """Write ``failures`` as JSON lines (path, id, reason), sorted by id, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for fail in sorted(failures, key=lambda x: (x.img_id, x.path)):
                f.write(fail.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------------------------ summary
@dataclass
class ExtractSummary:
    """Counts over all ranks. ``done``: records written; ``skipped``: already in the store."""

    total: int = 0
    done: int = 0
    skipped: int = 0
    failures: list[Failure] = field(default_factory=list)
    elapsed_s: float = 0.0
    world_size: int = 1
    device: str = "cpu"
    random_weights: bool = False
    interrupted: bool = False
    out: str = ""

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def images_per_s(self) -> float:
        return (self.done + self.failed) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def format(self, bold: bool = True) -> str:
        """Human-readable summary (several lines)."""
        head = "extract-features: INTERRUPTED" if self.interrupted else "extract-features: finished"
        lines = [
            f"{head}: {self.total} images: {self.done} done, {self.skipped} skipped as already present, "
            f"{self.failed} failed",
            f"  {self.elapsed_s:.1f} s, {self.images_per_s:.2f} images/s, {self.world_size} process(es), "
            f"device {self.device}, store {self.out}",
        ]
        if self.failures:
            lines.append(f"  failures listed in {failures_path(self.out)}:")
            for fail in sorted(self.failures, key=lambda x: x.img_id)[:10]:
                lines.append(f"    {fail.img_id} ({fail.path}): {fail.reason}")
            if self.failed > 10:
                lines.append(f"    ... and {self.failed - 10} more")
        if self.interrupted:
            lines.append("  committed records are kept; run the same command again to resume")
        if self.random_weights:
            msg = "RANDOM WEIGHTS: these features come from an untrained detector (--random-weights)"
            lines.append(f"\033[1m{msg}\033[0m" if bold else msg)
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ detector
def _weights_sha256(config: ExtractConfig) -> str | None:
    """Check the weights file exists and is readable, and hash it (None with --random-weights)."""
    if config.random_weights:
        return None
    if not config.weights:
        raise SetupError(
            "no detector weights given: pass --weights faster_rcnn_from_caffe_attr.pkl (or --random-weights)"
        )
    path = Path(config.weights)
    if not path.is_file():
        raise SetupError(
            f"weights file {path} not found (download faster_rcnn_from_caffe_attr.pkl or fix the path)"
        )
    if not os.access(path, os.R_OK):
        raise SetupError(f"weights file {path} is not readable (check its permissions)")
    from extract.weights import WeightsError, file_sha256

    try:
        return file_sha256(path)
    except (OSError, WeightsError) as e:
        raise SetupError(f"cannot read the weights file {path}: {e}") from None


def build_detector(config: ExtractConfig, device: torch.device | str = "cpu") -> Any:
    """The VG detector for ``config``: built from ``config.config`` + ``config.opts``, weights loaded from
    ``config.weights`` unless ``config.random_weights`` (then a deterministic init from ``config.seed``).

    Raises:
        SetupError: unknown config, or weights that are missing, corrupt or incomplete.
    """
    from extract.detector import build_vg_detector, get_detector_cfg
    from extract.weights import WeightsError, load_detector_weights

    try:
        cfg = get_detector_cfg(config.config, list(config.opts))
    except Exception as e:
        raise SetupError(
            f"cannot build the detector config {config.config!r} with --opts {config.opts}: {e}"
        ) from None
    detector = build_vg_detector(cfg, device=device, seed=config.seed)
    if not config.random_weights:
        try:
            load_detector_weights(detector, config.weights)
        except WeightsError as e:
            raise SetupError(str(e)) from None
        except Exception as e:
            raise SetupError(f"cannot load weights from {config.weights}: {type(e).__name__}: {e}") from None
    return detector


def _precheck_store(config: ExtractConfig, settings: dict) -> None:
    """Refuse an existing ``config.out`` that is not a store or holds features made with other settings."""
    from extract.store import StoreError, open_metadata

    out = Path(config.out)
    if not out.exists():
        return
    if out.is_dir() and not (out / "data.mdb").exists():
        if any(out.iterdir()):
            raise SetupError(
                f"{out} exists and is not a feature store (no data.mdb); give a new or empty folder"
            )
        return
    try:
        meta = open_metadata(out)
    except StoreError as e:
        raise SetupError(f"{out} is not a usable feature store: {e}") from None
    stored = meta.get("extractor")
    given = json.loads(json.dumps(settings))
    if stored is not None and stored != given:
        keys = sorted(
            k for k in set(stored) | set(given) if stored.get(k, "<absent>") != given.get(k, "<absent>")
        )
        details = ", ".join(
            f"{k}: stored {stored.get(k, '<absent>')!r}, now {given.get(k, '<absent>')!r}" for k in keys
        )
        raise SetupError(
            f"{out} was written with different extraction settings ({details}); "
            "use the same settings to resume, or write to a new store"
        )
    if meta.get("features_dtype") not in (None, config.features_dtype):
        raise SetupError(
            f"{out} holds {meta.get('features_dtype')} features but --features-dtype {config.features_dtype} was "
            "asked for; use the same dtype to resume, or write to a new store"
        )


def _open_writer(config: ExtractConfig, settings: dict, dist_ctx: DistContext) -> Any:
    """Open (create or resume) the store; rank 0 first, so the ranks agree on one validated store."""
    from extract.store import FeatureWriter, StoreError

    writer = None
    error = None

    def attempt() -> None:
        nonlocal writer, error
        try:
            writer = FeatureWriter(
                config.out,
                extractor=settings,
                features_dtype=config.features_dtype,
                overwrite=config.overwrite,
            )
        except StoreError as e:
            error = f"cannot write to {config.out}: {e}"
        except OSError as e:
            error = f"cannot open the store {config.out}: {e}"

    if dist_ctx.is_main:
        attempt()
    errors = dist_ctx.all_gather(error)
    if errors[0] is None and not dist_ctx.is_main:
        attempt()
    errors = [e for e in dist_ctx.all_gather(error) if e is not None]
    if errors:
        if writer is not None:
            writer.close()
        raise SetupError(errors[0])
    return writer


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

    Raises:
        SetupError: refused before any work (weights, store, settings). KeyboardInterrupt propagates after
        the committed records are flushed and the store closed.
    """
    by_id: dict[str, list[str]] = {}
    for it in items:
        by_id.setdefault(it.img_id, []).append(it.path)
    dups = {k: v for k, v in by_id.items() if len(v) > 1}
    if dups:
        shown = "; ".join(f"{k!r}: {', '.join(v)}" for k, v in sorted(dups.items())[:10])
        raise DuplicateIdError(f"{len(dups)} image id(s) given for more than one file: {shown}")

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
        weights_sha = _weights_sha256(config)
        settings = extractor_settings(config, weights_sha)
        _precheck_store(config, settings)  # refuse a wrong store before the (slow) detector build
        if detector is None:
            detector = build_detector(config, device)
        dist_ctx.barrier()  # every rank has checked the store before rank 0 may create it
        writer = _open_writer(config, settings, dist_ctx)
        return _run(config, items, detector, writer, device, dist_ctx)
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
        print(
            f"extract-features: {len(items)} images -> {config.out}; {dist_ctx.world_size} process(es), "
            f"device {device}, batch size {config.batch_size}, {config.workers} loader worker(s)",
            file=sys.stderr,
            flush=True,
        )

        slow = cpu_autocast_warning(config.amp_dtype) if device.type == "cpu" else None
        if slow is not None:
            print(f"extract-features: warning: --amp {config.amp}: {slow}", file=sys.stderr, flush=True)

    failures: list[Failure] = []
    writer_thread = _StoreWriterThread(writer, config.writer_queue)  # starts with the first record
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
        summary = _summarise([local], config, device, dist_ctx, start)
        if dist_ctx.is_main:
            print(summary.format(), flush=True)
        raise KeyboardInterrupt

    gathered = dist_ctx.all_gather(local)
    # the last to close writes the final count: everyone else first
    if not dist_ctx.is_main:
        writer.close()
    dist_ctx.barrier()
    if dist_ctx.is_main:
        writer.close()
    summary = _summarise(gathered, config, device, dist_ctx, start)
    if dist_ctx.is_main:
        write_failures(failures_path(config.out), summary.failures)
    dist_ctx.barrier()
    return summary


def _summarise(
    parts: list[dict], config: ExtractConfig, device: torch.device, dist_ctx: DistContext, start: float
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
    )


def _extract_pending(
    config: ExtractConfig,
    pending: Sequence[ImageItem],
    detector: Any,
    device: torch.device,
    writer_thread: _StoreWriterThread,
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
        worker_init_fn=_worker_init if workers > 0 else None,
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
