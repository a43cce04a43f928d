"""The model folder: what ``lxmert-train`` writes for every model (``final/``, ``best/``, each checkpoint) and
what ``--eval-only``, fine-tuning from a run and ``lxmert-answer`` read back. Written and read only here.

::

    model.safetensors, config.json   model.save_pretrained(): what transformers' from_pretrained loads
    label2ans.json                   the answer strings in label order (QA heads)
    extractor.json                   the extractor settings of the training feature stores (a list, one entry
                                     per distinct setting: weights file and sha256, box rule, image sizes, ...),
                                     then the model's history: the entries of the --load model that differ, each
                                     with "from_load": the model it came from
    features.json                    the stores, the feature size and the standardisation mean / std when used

A Hugging Face Hub model carries none of the JSON files; each reader returns None where a file is absent.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from torch import nn

from common.config import ConfigError
from extract.store import settings_diff
from model.checkpoint import WEIGHTS_NAME
from tasks.data.answer_table import load_answer_table
from tasks.data.jsonio import DataFormatError, read_json
from tasks.data.regions import PER_STORE_KEYS, FeatureStats, RegionFeatures

__all__ = [
    "EXTRACTOR_FILE",
    "FROM_LOAD",
    "ModelLoadError",
    "check_resume_extractor",
    "extractor_changes",
    "extractor_record",
    "loaded_extractor_record",
    "FEATURES_FILE",
    "LABEL2ANS_FILE",
    "WEIGHTS_NAME",
    "feature_extras",
    "read_answers",
    "read_extractor_record",
    "read_feature_record",
    "read_feature_stats",
    "reading_model",
    "write_model_files",
]

LABEL2ANS_FILE = "label2ans.json"
EXTRACTOR_FILE = "extractor.json"
FEATURES_FILE = "features.json"
#: Key marking an ``extractor.json`` entry inherited from the ``--load`` model (the model's history).
FROM_LOAD = "from_load"

logger = logging.getLogger(__name__)


class ModelLoadError(DataFormatError):
    """A model (folder or file) that cannot be loaded: damaged, truncated or not an LXMERT checkpoint."""


@contextlib.contextmanager
def reading_model(source: Any) -> Iterator[None]:
    """Around the loading of the model ``source``: whatever a damaged or foreign checkpoint makes the readers raise
    (a truncated or empty safetensors file, a ``config.json`` that is not JSON or holds values of the wrong type,
    missing files) becomes one :class:`ModelLoadError` naming ``source``."""
    try:
        yield
    except DataFormatError:
        raise
    except (OSError, ValueError, TypeError, KeyError, SafetensorError, StrictDataclassError) as e:
        detail = " ".join(str(e).split())  # one line: some readers (strict config fields) span several
        if str(source) in detail:  # the reader named the file and what to do
            raise ModelLoadError(f"cannot load the model {source}: {detail}") from e
        raise ModelLoadError(
            f"cannot load the model {source}: {type(e).__name__}: {detail}; the checkpoint is damaged or not an LXMERT "
            "model (copy it again, or give another)"
        ) from e


def write_model_files(directory: Path, model: nn.Module, extras: dict[str, Any]) -> None:
    """The model (``save_pretrained``) and each extra file (name -> JSON content) into ``directory``."""
    model.save_pretrained(directory)
    for name, content in extras.items():
        (directory / name).write_text(json.dumps(content, indent=1), encoding="utf-8")


def feature_extras(features: RegionFeatures, loaded: Any = None, load: str | None = None) -> dict[str, Any]:
    """``extractor.json`` (with the history of the ``load`` model whose record is ``loaded``: see
    :func:`extractor_record`) and ``features.json`` for a model trained on ``features``."""
    return {EXTRACTOR_FILE: extractor_record(features, loaded, load), FEATURES_FILE: features.describe()}


# ------------------------------------------------------------------------------------ extractor.json history
def _current_entries(record: Any) -> list[dict[str, Any]]:
    """The entries of an ``extractor.json`` for the features a model was last trained on (not its history)."""
    entries = record if isinstance(record, list) else [record]
    return [e for e in entries if isinstance(e, dict) and FROM_LOAD not in e]


def extractor_changes(record: Any, features: RegionFeatures) -> list[str]:
    """One line per store of ``features`` whose extractor settings match no current entry of ``record`` (an
    ``extractor.json``): the store and the differing settings, recorded -> now. Empty when all match, or when
    ``record`` holds nothing to compare."""
    current = _current_entries(record)
    if not current:
        return []
    lines = []
    for store in features.extractors:
        settings = store["extractor"] or {}
        diffs = [settings_diff(entry, settings, ignore=PER_STORE_KEYS) for entry in current]
        if any(not keys for keys in diffs):
            continue
        keys = min(diffs, key=len)
        entry = current[diffs.index(keys)]
        shown = ", ".join(
            f"{k}: {entry.get(k, '<absent>')!r} -> {settings.get(k, '<absent>')!r}" for k in keys
        )
        lines.append(f"{store['path']} ({shown})")
    return lines


def loaded_extractor_record(load: str | None, features: RegionFeatures) -> Any:
    """The ``extractor.json`` of the ``--load`` model (None when it has none: a file, a Hub id); a warning names
    each store of ``features`` made by another extractor (training goes on: the new model's record keeps both)."""
    record = read_extractor_record(load)
    changes = extractor_changes(record, features)
    if changes:
        logger.warning(
            "%s was trained on features of another extractor than %s: its features differ from these (expect a "
            "drop until the model adapts); the new model's %s lists both",
            load,
            "; ".join(changes),
            EXTRACTOR_FILE,
        )
    return record


def extractor_record(features: RegionFeatures, loaded: Any = None, load: str | None = None) -> list[Any]:
    """What ``extractor.json`` holds for a model trained on ``features`` from the ``load`` model whose record is
    ``loaded``: the stores' distinct settings, then the loaded model's entries that differ from them, each marked
    ``from_load: load`` (entries already marked keep theirs): the model's history."""
    out = list(features.extractor_settings())
    current = [c for c in out if isinstance(c, dict)]
    inherited = loaded if isinstance(loaded, list) else [loaded] if loaded is not None else []
    for entry in inherited:
        if not isinstance(entry, dict):
            continue
        if FROM_LOAD not in entry:
            if any(not settings_diff(entry, c, ignore=PER_STORE_KEYS) for c in current):
                continue
            entry = {**entry, FROM_LOAD: str(load)}
        if entry not in out:
            out.append(entry)
    return out


def check_resume_extractor(checkpoint: Path, features: RegionFeatures) -> None:
    """Refuse ``--resume`` on stores made by another extractor than the run's (its checkpoint's
    ``extractor.json``): :class:`ConfigError` naming the stores and the settings that differ."""
    changes = extractor_changes(read_extractor_record(checkpoint), features)
    if changes:
        raise ConfigError(
            f"{Path(checkpoint) / EXTRACTOR_FILE}: the run was trained on features of another extractor than "
            f"{'; '.join(changes)}; --resume would mix two extractors' features in one run: resume with the run's "
            f"stores (data.features), or start a new run (another --output) with --load {checkpoint}"
        )


def _folder_file(folder: str | Path | None, name: str) -> Path | None:
    if not folder:
        return None
    path = Path(folder) / name
    return path if path.is_file() else None


def read_answers(folder: str | Path | None) -> list[str] | None:
    """``label2ans.json`` of a model folder, or None."""
    path = _folder_file(folder, LABEL2ANS_FILE)
    return load_answer_table(path) if path else None


def read_feature_record(folder: str | Path | None) -> dict[str, Any] | None:
    """``features.json`` of a model folder (stores, feature size, standardisation), or None."""
    path = _folder_file(folder, FEATURES_FILE)
    return read_json(path, "the model's feature record") if path else None


def read_extractor_record(folder: str | Path | None) -> Any:
    """``extractor.json`` of a model folder (a list of extractor settings), or None."""
    path = _folder_file(folder, EXTRACTOR_FILE)
    return read_json(path, "the model's extractor record") if path else None


def read_feature_stats(folder: str | Path | None) -> FeatureStats | None:
    """The standardisation (per-dimension mean / std) the model was trained with, or None."""
    record = read_feature_record(folder)
    saved = (record or {}).get("standardize")
    if not saved:
        return None
    try:
        return FeatureStats.from_dict(saved)
    except (KeyError, TypeError, ValueError) as e:
        raise DataFormatError(f"{Path(folder) / FEATURES_FILE}: unusable 'standardize' entry ({e})") from None
