"""Region features for the training tasks: image id -> regions, read lazily from one or more feature stores.

COCO and Visual Genome images usually live in different stores (``data.features: [coco.lmdb, vg.lmdb]``);
an image id is looked up in each store in turn, once, when the dataset is built (:meth:`RegionFeatures.locate`),
through the stores' id index (no record is read). Records are read one at a time in the DataLoader workers:
each worker opens the LMDB environments itself (:class:`extract.store.FeatureStore` re-opens per process), so
memory stays flat in the number of images.

Every record read is checked (its CRC32, finite features / boxes / confidences): a damaged or non-finite one
raises :class:`BadRecordError` naming the image and the store, with the ``lxmert-features verify`` advice.

What a task gets per image (:class:`Regions`): ``features`` ``(n, D)`` float32 (optionally standardised per
dimension with the train images' mean / std, and whitened, :class:`FeatureStats`), ``boxes`` ``(n, 4)`` x1, y1, x2, y2 divided
by img_w / img_h (so in [0, 1]), the detector's object / attribute ids and confidences. ``n`` is usually 36 but
may be smaller; :func:`collate_regions` pads a batch and gives the visual attention mask.

The stores' extractor settings (:attr:`RegionFeatures.extractors`) are saved beside every model
(:meth:`RegionFeatures.describe`), so a model records which features it expects; stores written by a detector
with random weights (``extract-features --random-weights``) are flagged (:attr:`RegionFeatures.random_weight_stores`):
their object / attribute labels carry no information.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.store import FeatureStore, StoreError, settings_diff

log = logging.getLogger(__name__)

__all__ = [
    "BadRecordError",
    "FeatureStats",
    "MissingImagesError",
    "PER_STORE_KEYS",
    "RegionFeatures",
    "Regions",
    "collate_regions",
    "is_random_weights",
]

#: Extractor-settings keys that may differ between stores of one extraction (e.g. the TSV file each came from).
PER_STORE_KEYS = ("file",)


class MissingImagesError(ValueError):
    """Items refer to images that are in none of the feature stores."""


class BadRecordError(ValueError):
    """A record that cannot be used (damaged LMDB pages, a CRC mismatch, NaN or infinite values): one line naming
    the image, the store and what to do. Raised in a DataLoader worker, it reaches the main process re-created
    by torch with the worker's traceback as its text; that text is cut back to the original line here."""

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "Original Traceback" in message:
            last = message.rstrip().rsplit("\n", 1)[-1]  # "tasks.data.regions.BadRecordError: <message>"
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


@dataclass
class Regions:
    """One image's regions.

    - ``features`` ``(n, D)`` float32 (standardised when the reader has :class:`FeatureStats`);
    - ``boxes`` ``(n, 4)`` float32, x1, y1, x2, y2 divided by img_w, img_h, clipped to [0, 1];
    - ``obj_ids`` ``(n,)`` int64 Visual Genome object ids (0..1599), ``obj_conf`` ``(n,)`` float32;
    - ``attr_ids`` ``(n,)`` int64 attribute ids (0..399), ``attr_conf`` ``(n,)`` float32.
    """

    features: np.ndarray
    boxes: np.ndarray
    obj_ids: np.ndarray
    obj_conf: np.ndarray
    attr_ids: np.ndarray
    attr_conf: np.ndarray

    @property
    def num_boxes(self) -> int:
        return int(self.features.shape[0])


#: ``data.whiten_features``: the largest feature dimension whitening is for (its D x D matrix is saved as JSON).
MAX_WHITEN_DIM = 512
#: Whitening floors the eigenvalues of the features' covariance at this fraction of the largest.
WHITEN_EIGEN_FLOOR = 1e-3


@dataclass
class FeatureStats:
    """Per-dimension mean and std ``(D,)`` float32 of region features (train images), for standardisation; with
    ``whiten`` ``(D, D)`` also the decorrelation (``data.whiten_features``): the standardised features times
    ``whiten`` are the raw features' ZCA whitening."""

    mean: np.ndarray
    std: np.ndarray
    num_regions: int = 0
    whiten: np.ndarray | None = None

    def apply(self, features: np.ndarray) -> np.ndarray:
        """``(n, D)`` -> ``(features - mean) / std`` (then ``@ whiten``), float32."""
        out = ((features - self.mean) / self.std).astype(np.float32, copy=False)
        if self.whiten is None:
            return out
        # einsum, not `@`: no BLAS thread pool, whose threads would spin in every DataLoader worker and take the
        # cores from the training process (measured: pretraining steps at half speed on 2 cores)
        return np.einsum("nd,de->ne", out, self.whiten).astype(np.float32, copy=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mean": self.mean.tolist(), "std": self.std.tolist(), "num_regions": self.num_regions}
        if self.whiten is not None:
            out["whiten"] = self.whiten.tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureStats:
        whiten = data.get("whiten")
        mean = np.asarray(data["mean"], dtype=np.float32)
        if whiten is not None:
            whiten = np.asarray(whiten, dtype=np.float32)
            if whiten.shape != (len(mean), len(mean)):
                raise ValueError(f"'whiten' is {whiten.shape}, not ({len(mean)}, {len(mean)})")
        return cls(
            mean=mean,
            std=np.asarray(data["std"], dtype=np.float32),
            num_regions=int(data.get("num_regions", 0)),
            whiten=whiten,
        )


def whitening_matrix(covariance: np.ndarray) -> np.ndarray:
    """ZCA: ``V diag(1 / sqrt(max(w, floor))) V^T`` of ``covariance`` = ``V diag(w) V^T``, the eigenvalues floored
    at :data:`WHITEN_EIGEN_FLOOR` x the largest (directions of near-zero variance are not blown up to noise)."""
    w, v = np.linalg.eigh(covariance)
    w = np.maximum(w, WHITEN_EIGEN_FLOOR * max(float(w.max()), 1e-12))
    return ((v / np.sqrt(w)) @ v.T).astype(np.float32)


def is_random_weights(extractor: dict | None) -> bool:
    """Whether a store's extractor settings say its detector had random (untrained) weights.

    ``extract-features --random-weights`` records ``random_weights: true`` and ``weights: null``; a detector's
    ``weights_source`` reads ``"random(seed=S)"``. TSV imports (``{"source": "tsv"}``) and unknown settings
    (``None``) count as trained.
    """
    if not extractor:
        return False
    if extractor.get("random_weights"):
        return True
    weights = extractor.get("weights", "")
    if isinstance(weights, str) and weights.lower().startswith("random"):
        return True
    # An extractor run (it records the box-selection rule) without a weights file had random weights.
    return "weights" in extractor and weights is None and "selection" in extractor


class RegionFeatures:
    """Image id -> :class:`Regions`, from one or more feature stores (an id is looked up in each, in order).

    ``paths``: the stores (``data.features``). ``stats``: standardise features with these (see
    :meth:`compute_stats`). The stores are opened read-only in each process on first use; pickling (to
    DataLoader workers) carries paths and the id -> store table only.

    Raises ``ValueError`` naming the store when a path is not a feature store, or when the stores disagree on
    the feature dimension.
    """

    def __init__(
        self, paths: Sequence[str | Path], stats: FeatureStats | None = None, zero_visual: bool = False
    ) -> None:
        if not paths:
            raise ValueError("no feature store given: set data.features to one or more stores (.lmdb)")
        self.paths = [Path(p) for p in paths]
        self.stats = stats
        # the question-only baseline (data.zero_visual): every region feature and box reads as zeros
        self.zero_visual = zero_visual
        self._stores: list[FeatureStore] = []
        for path in self.paths:
            try:  # check=True: every record read is checked (CRC32, finite values) and named when bad
                self._stores.append(FeatureStore(path, normalize_boxes=True, check=True))
            except (StoreError, OSError) as err:
                raise ValueError(f"data.features: {path} cannot be opened as a feature store: {err}") from err
        try:
            self.extractors = [self._describe_store(store) for store in self._stores]
        except StoreError as err:  # damaged metadata
            raise ValueError(f"data.features: {err}") from err
        dims = {e["path"]: e["feature_dim"] for e in self.extractors if e["feature_dim"] is not None}
        if len(set(dims.values())) > 1:
            raise ValueError(
                f"feature stores disagree on the feature dimension ({dims}); use stores from one extractor"
            )
        self.feature_dim: int | None = next(iter(dims.values()), None)
        first = self.extractors[0]
        differences = []
        for other in self.extractors[
            1:
        ]:  # the stores' own settings check (weights name / layout not compared)
            a, b = first["extractor"] or {}, other["extractor"] or {}
            keys = settings_diff(a, b, ignore=PER_STORE_KEYS)
            if keys:
                shown = ", ".join(f"{k}: {a.get(k, '<absent>')!r} vs {b.get(k, '<absent>')!r}" for k in keys)
                differences.append(f"{other['path']} differs from {first['path']} in {shown}")
        if differences:
            log.warning(
                "the feature stores were written with different extractor settings (%s); features from different "
                "extractors differ and mixing them can cost accuracy",
                "; ".join(differences),
            )
        self._where: dict[str, int] = {}
        if stats is not None and self.feature_dim is not None and stats.mean.shape != (self.feature_dim,):
            raise ValueError(
                f"feature statistics have {stats.mean.shape[0]} dimensions, the stores {self.feature_dim}"
            )

    # -- metadata -----------------------------------------------------------------------------------
    @staticmethod
    def _describe_store(store: FeatureStore) -> dict[str, Any]:
        meta = store.metadata
        return {
            "path": str(store.path),
            "extractor": meta.get("extractor"),
            "feature_dim": meta.get("feature_dim"),
            "features_dtype": meta.get("features_dtype"),
            "count": meta.get("count"),
            "random_weights": is_random_weights(meta.get("extractor")),
        }

    @property
    def random_weight_stores(self) -> list[str]:
        """Paths of the stores whose detector had random weights (their obj / attr labels are noise)."""
        return [e["path"] for e in self.extractors if e["random_weights"]]

    def extractor_settings(self) -> list[Any]:
        """The distinct extractor settings of the stores, in store order (saved as ``extractor.json``: what
        ``lxmert-answer`` compares with its own extractor)."""
        settings: list[Any] = []
        for store in self.extractors:
            if store["extractor"] not in settings:
                settings.append(store["extractor"])
        return settings

    def describe(self) -> dict[str, Any]:
        """What a model trained on these features expects: per store its extractor settings and feature size,
        and the standardisation statistics when used (JSON-serialisable; saved as ``features.json``)."""
        return {
            "feature_dim": self.feature_dim,
            "stores": self.extractors,
            "standardize": self.stats.to_dict() if self.stats is not None else None,
        }

    # -- lookup -------------------------------------------------------------------------------------
    def locate(self, img_ids: Iterable[str]) -> list[str]:
        """Find each id's store (first store holding it); returns the ids found in none (sorted).

        Only the stores' id indexes are read. Ids already located are not looked up again.
        """
        missing = []
        for img_id in img_ids:
            if img_id in self._where:
                continue
            for i, store in enumerate(self._stores):
                if img_id in store:
                    self._where[img_id] = i
                    break
            else:
                missing.append(img_id)
        return sorted(set(missing))

    def check(
        self,
        img_ids: Iterable[str],
        *,
        allow_missing: bool,
        what: str = "items",
        source: str = "",
        counts: dict[str, int] | None = None,
    ) -> set[str]:
        """Locate ``img_ids`` and report (once) those found in no store; returns the set of missing ids.

        ``counts``: items per image id, to say how many items are lost. Raises :class:`MissingImagesError`
        (naming a few ids, the stores and ``source``) unless ``allow_missing``; then logs a warning instead.
        """
        ids = list(dict.fromkeys(img_ids))
        missing = self.locate(ids)
        if not missing:
            return set()
        lost = sum(counts.get(i, 1) for i in missing) if counts is not None else len(missing)
        stores = ", ".join(str(p) for p in self.paths)
        example = ", ".join(repr(i) for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
        where = f" of {source}" if source else ""
        message = (
            f"{len(missing)} of {len(ids)} images{where} ({lost} {what}) are in none of the feature stores "
            f"[{stores}]: e.g. {example}"
        )
        if not allow_missing:
            raise MissingImagesError(
                f"{message}. Extract their features into a store listed in data.features, or set "
                "data.allow_missing_images: true to drop those items"
            )
        log.warning("%s; dropped (data.allow_missing_images: true)", message)
        return set(missing)

    def __contains__(self, img_id: str) -> bool:
        return img_id in self._where or not self.locate([img_id])

    def __getitem__(self, img_id: str) -> Regions:
        """The regions of ``img_id`` (KeyError naming the stores when it is in none)."""
        index = self._where.get(img_id)
        if index is None:
            if self.locate([img_id]):
                raise KeyError(
                    f"image id {img_id!r} is in none of the feature stores {[str(p) for p in self.paths]}"
                )
            index = self._where[img_id]
        try:
            record = self._stores[index][img_id]
        except (StoreError, KeyError) as err:  # damaged pages or record: name it, once, in one line
            text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise BadRecordError(f"image {img_id!r} cannot be used: {text}") from None
        features = record["features"].astype(np.float32, copy=False)
        boxes = record["boxes"].astype(np.float32, copy=False)
        if self.stats is not None:
            features = self.stats.apply(features)
        if self.zero_visual:
            features, boxes = np.zeros_like(features), np.zeros_like(boxes)
        return Regions(
            features=features,
            boxes=boxes,
            obj_ids=record["obj_ids"].astype(np.int64, copy=False),
            obj_conf=record["obj_conf"].astype(np.float32, copy=False),
            attr_ids=record["attr_ids"].astype(np.int64, copy=False),
            attr_conf=record["attr_conf"].astype(np.float32, copy=False),
        )

    # -- standardisation ----------------------------------------------------------------------------
    def compute_stats(self, img_ids: Sequence[str], max_images: int = 2000, whiten: bool = False) -> FeatureStats:
        """Per-dimension mean / std of the regions of ``img_ids`` (evenly spaced ``max_images`` of them when more;
        sorted first, so the result depends only on the set of ids), accumulated in float64; with ``whiten`` also
        the whitening (:func:`whitening_matrix` of the raw features' covariance, applied after standardising).

        A dimension with std below 1e-6 gets std 1 (left unscaled).
        """
        ids = sorted(set(img_ids))
        if not ids:
            raise ValueError("cannot compute feature statistics: no image ids")
        if len(ids) > max_images:
            picks = np.linspace(0, len(ids) - 1, max_images).round().astype(np.int64)
            ids = [ids[i] for i in sorted(set(picks.tolist()))]
        saved, self.stats = self.stats, None
        try:
            total = sq = cross = None
            count = 0
            for img_id in ids:
                feats = self[img_id].features.astype(np.float64)
                if total is None:
                    dim = feats.shape[1]
                    if whiten and dim > MAX_WHITEN_DIM:
                        raise ValueError(
                            f"data.whiten_features: the features are {dim}-d; whitening is for features of at most "
                            f"{MAX_WHITEN_DIM} dimensions (the demo's random-detector features); set it to false"
                        )
                    total, sq = np.zeros(dim), np.zeros(dim)
                    cross = np.zeros((dim, dim)) if whiten else None
                total += feats.sum(0)
                sq += (feats**2).sum(0)
                if cross is not None:
                    cross += feats.T @ feats
                count += feats.shape[0]
        finally:
            self.stats = saved
        if count == 0 or total is None or sq is None:
            raise ValueError(
                f"cannot compute feature statistics: the {len(ids)} images sampled have no regions"
            )
        mean = total / count
        std = np.sqrt(np.maximum(sq / count - mean**2, 0.0))
        std = np.where(std < 1e-6, 1.0, std)
        matrix = None
        if cross is not None:
            # ZCA of the raw (centred) features, expressed on the standardised ones (apply() divides by std
            # first): the eigenvalue floor then keeps near-constant dimensions suppressed, where whitening the
            # standardised features would first scale them up to unit-variance noise (measured on the demo:
            # colour 68 instead of 86)
            matrix = std[:, None] * whitening_matrix(cross / count - np.outer(mean, mean))
        return FeatureStats(mean.astype(np.float32), std.astype(np.float32), num_regions=count, whiten=matrix)

    def close(self) -> None:
        for store in self._stores:
            store.close()

    def __repr__(self) -> str:
        return f"RegionFeatures({[str(p) for p in self.paths]}, standardize={self.stats is not None})"


def collate_regions(regions: Sequence[Regions]) -> dict[str, torch.Tensor]:
    """Pad a batch of :class:`Regions` to its largest ``n`` (at least 1) with zeros.

    Returns ``visual_feats`` ``(B, V, D)`` float32, ``visual_pos`` ``(B, V, 4)`` float32 and
    ``visual_attention_mask`` ``(B, V)`` float32 (1 = a real region), or no mask key when every image has ``V``
    regions (LXMERT's usual 36: the model's faster unmasked path).
    """
    if not regions:
        raise ValueError("collate_regions: empty batch")
    counts = [r.num_boxes for r in regions]
    num = max(1, max(counts))
    if min(counts) == num:  # the usual case (36 each): one copy, no zero fill
        feats = np.stack([r.features for r in regions]).astype(np.float32, copy=False)
        boxes = np.stack([r.boxes for r in regions]).astype(np.float32, copy=False)
        return {"visual_feats": torch.from_numpy(feats), "visual_pos": torch.from_numpy(boxes)}
    dim = regions[0].features.shape[1]
    feats = np.zeros((len(regions), num, dim), dtype=np.float32)
    boxes = np.zeros((len(regions), num, 4), dtype=np.float32)
    for i, r in enumerate(regions):
        feats[i, : counts[i]] = r.features
        boxes[i, : counts[i]] = r.boxes
    out = {"visual_feats": torch.from_numpy(feats), "visual_pos": torch.from_numpy(boxes)}
    if min(counts) < num:
        mask = np.zeros((len(regions), num), dtype=np.float32)
        for i, n in enumerate(counts):
            mask[i, :n] = 1.0
        out["visual_attention_mask"] = torch.from_numpy(mask)
    return out
