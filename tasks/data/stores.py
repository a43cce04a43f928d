"""The feature stores of a fine-tuning run: which stores, the standardisation, the items whose images exist."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from tasks.config import TrainConfig
from tasks.data.jsonio import DataFormatError
from tasks.data.model_folder import read_feature_record
from tasks.data.regions import FeatureStats, RegionFeatures

logger = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["keep_found_images", "open_features"]


def open_features(
    config: TrainConfig, model_folder: str | None, train_img_ids: Callable[[], list[str]]
) -> RegionFeatures:
    """The feature stores of ``data.features`` (else the stores named in the model folder's ``features.json``).

    Standardisation: when the model folder (``--load``) records statistics, they are used whatever
    ``data.standardize_features`` says (a fine-tuned model evaluates, and a pretrained one is fine-tuned, on the
    features it was trained on); otherwise ``data.standardize_features`` computes them over the training images.
    """
    record = read_feature_record(model_folder)
    paths = list(config.data.features)
    if not paths and record is not None:
        paths = [s["path"] for s in record.get("stores", [])]
        logger.info("data.features not set: using the stores the model was trained on: %s", paths)
    if not paths:
        raise DataFormatError(
            f"{config.task}: no feature store; set data.features=[STORE.lmdb, ...] (the stores holding the images)"
        )
    features = RegionFeatures(paths, zero_visual=config.data.zero_visual)
    saved = (record or {}).get("standardize")
    if saved:
        features.stats = FeatureStats.from_dict(saved)
        if not (config.data.standardize_features or config.data.whiten_features):
            logger.warning(
                "%s was trained on standardised features: they are standardised with its statistics "
                "(features.json) although data.standardize_features is false",
                model_folder,
            )
    elif config.data.standardize_features or config.data.whiten_features:
        ids = sorted(set(train_img_ids()))
        missing = set(features.locate(ids))
        whiten = config.data.whiten_features
        features.stats = features.compute_stats([i for i in ids if i not in missing], whiten=whiten)
        logger.info(
            "feature standardisation: mean / std%s over %d regions",
            " and whitening" if whiten else "",
            features.stats.num_regions,
        )
    return features


def keep_found_images(
    features: RegionFeatures,
    config: TrainConfig,
    items: list[T],
    img_ids: Callable[[T], tuple[str, ...]],
    split: str,
    paths: Sequence[str | Path],
    dropped: dict[str, int] | None = None,
) -> list[T]:
    """``items`` whose images are all in the stores: :class:`tasks.data.regions.MissingImagesError` naming the
    missing ones, or (``data.allow_missing_images``) the others dropped, logged and counted in ``dropped[split]``."""
    counts: dict[str, int] = {}
    for item in items:
        for img_id in img_ids(item):
            counts[img_id] = counts.get(img_id, 0) + 1
    missing = features.check(
        counts,
        allow_missing=config.data.allow_missing_images,
        what=f"{config.task} {split} items",
        source=", ".join(map(str, paths)),
        counts=counts,
    )
    if not missing:
        return items
    kept = [it for it in items if not any(i in missing for i in img_ids(it))]
    if dropped is not None:
        dropped[split] = len(items) - len(kept)
    return kept
