"""The store metadata (JSON under :data:`~extract.store.env.METADATA_KEY`) and the one settings check.

The metadata records the schema version, features dtype, feature dimension, record count, created/updated
timestamps and the extractor's settings (weights file name and sha256, box-selection rule, image sizes, ...
or ``{"source": "tsv", ...}``), so that features produced by different extractors are never mixed silently:
:func:`check_compatible` is the single place that decides whether settings fit a store, used by the writer,
by ``merge`` and by ``extract-features`` before it builds its detector.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

from extract.records import FIELDS, SCHEMA_VERSION, StoreError, StoreSettingsMismatch
from extract.store.env import IDS_DB_NAME, METADATA_KEY

__all__ = ["DERIVED_SETTINGS", "check_compatible", "normalise_settings", "parse_metadata", "settings_diff"]

#: Extractor settings that are recorded but never compared: they follow from others (the weights file's name
#: and layout from its sha256: a renamed or re-downloaded copy of the same file resumes a store), and stores
#: written before they were recorded lack them.
DERIVED_SETTINGS: tuple[str, ...] = ("weights", "weights_layout")
#: Metadata keys owned by the writer (not settable through ``FeatureWriter.set_metadata``).
MANAGED_KEYS = frozenset(
    {"schema_version", "features_dtype", "feature_dim", "count", "extractor", "created", "ids_index"}
)
_ABSENT = "<absent>"


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_metadata(features_dtype: str, extractor: dict | None) -> dict[str, Any]:
    """The metadata of a newly created, empty store."""
    stamp = now()
    return {
        "format": "lxmert-feature-store",
        "schema_version": SCHEMA_VERSION,
        "features_dtype": features_dtype,
        "feature_dim": None,
        "count": 0,
        "extractor": extractor,
        "fields": list(FIELDS),
        "boxes": "x1,y1,x2,y2 in original image pixels",
        "ids_index": IDS_DB_NAME,
        "created": stamp,
        "updated": stamp,
    }


def parse_metadata(raw: bytes | None, path: Path) -> dict:
    """The metadata dict from its stored JSON; :class:`StoreError` naming ``path`` when absent or unusable."""
    if raw is None:
        raise StoreError(f"{path}: LMDB environment has no {METADATA_KEY!r} key; it is not a feature store")
    try:
        meta = json.loads(bytes(raw))
    except ValueError as exc:
        raise StoreError(f"{path}: store metadata is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise StoreError(f"{path}: store metadata is not a JSON object")
    version = meta.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: store schema version {version!r} is not supported (this code reads <= {SCHEMA_VERSION}); "
            "upgrade the package"
        )
    return meta


def normalise_settings(settings: dict | None) -> dict | None:
    """JSON round trip so tuples/lists and int/float compare as they will once stored."""
    if settings is None:
        return None
    try:
        return json.loads(json.dumps(settings, sort_keys=True))
    except TypeError as exc:
        raise StoreError(f"extractor settings must be JSON-serialisable: {exc}") from exc


def settings_diff(stored: dict | None, given: dict | None, ignore: Collection[str] = ()) -> list[str]:
    """The sorted keys whose values differ (a key absent on one side differs), minus ``ignore`` and
    :data:`DERIVED_SETTINGS`."""
    stored, given = stored or {}, given or {}
    skip = set(ignore) | set(DERIVED_SETTINGS)
    return sorted(
        k
        for k in set(stored) | set(given)
        if k not in skip and stored.get(k, _ABSENT) != given.get(k, _ABSENT)
    )


def check_compatible(
    meta: dict,
    *,
    extractor: dict | None,
    features_dtype: str | None,
    where: str,
    fix: str,
    ignore: Collection[str] = (),
) -> None:
    """Refuse settings that do not fit a store whose metadata is ``meta``.

    Args:
        meta: the store's metadata (its ``features_dtype`` and ``extractor``).
        extractor: the settings about to be written; None (or a store that recorded none) is not compared.
        features_dtype: the dtype about to be written; None is not compared.
        where: what the message starts with (the store path, or the stores being merged).
        fix: what the user should do, ending the message.
        ignore: settings not known yet (compared later).

    Raises:
        StoreSettingsMismatch: naming every differing key with its stored and new value.
    """
    stored = meta.get("extractor")
    if extractor is not None and stored is not None:
        given = normalise_settings(extractor) or {}
        keys = settings_diff(stored, given, ignore)
        if keys:
            details = ", ".join(
                f"{k}: stored {stored.get(k, _ABSENT)!r}, now {given.get(k, _ABSENT)!r}" for k in keys
            )
            raise StoreSettingsMismatch(f"{where}: extractor settings differ in {keys} ({details}); {fix}")
    stored_dtype = meta.get("features_dtype")
    if features_dtype is not None and stored_dtype not in (None, features_dtype):
        raise StoreSettingsMismatch(
            f"{where}: {stored_dtype} features stored, {features_dtype} features asked for; {fix}"
        )
