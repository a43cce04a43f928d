"""The model folder: what ``lxmert-train`` writes for every model (``final/``, ``best/``, each checkpoint) and
what ``--eval-only``, fine-tuning from a run and ``lxmert-answer`` read back. Written and read only here.

::

    model.safetensors, config.json   model.save_pretrained(): what transformers' from_pretrained loads
    label2ans.json                   the answer strings in label order (QA heads)
    extractor.json                   the extractor settings of the training feature stores (a list, one entry
                                     per distinct setting: weights file and sha256, box rule, image sizes, ...)
    features.json                    the stores, the feature size and the standardisation mean / std when used

A Hugging Face Hub model carries none of the JSON files; each reader returns None where a file is absent.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from torch import nn

from model.checkpoint import WEIGHTS_NAME
from tasks.data.answer_table import load_answer_table
from tasks.data.jsonio import DataFormatError, read_json
from tasks.data.regions import FeatureStats, RegionFeatures

__all__ = [
    "EXTRACTOR_FILE",
    "ModelLoadError",
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
    except (OSError, ValueError, TypeError, KeyError, SafetensorError) as e:
        if str(source) in str(e):  # the reader named the file and what to do
            raise ModelLoadError(f"cannot load the model {source}: {e}") from e
        raise ModelLoadError(
            f"cannot load the model {source}: {type(e).__name__}: {e}; the checkpoint is damaged or not an LXMERT "
            "model (copy it again, or give another)"
        ) from e


def write_model_files(directory: Path, model: nn.Module, extras: dict[str, Any]) -> None:
    """The model (``save_pretrained``) and each extra file (name -> JSON content) into ``directory``."""
    model.save_pretrained(directory)
    for name, content in extras.items():
        (directory / name).write_text(json.dumps(content, indent=1), encoding="utf-8")


def feature_extras(features: RegionFeatures) -> dict[str, Any]:
    """``extractor.json`` and ``features.json`` for a model trained on ``features`` (see the module doc)."""
    return {EXTRACTOR_FILE: features.extractor_settings(), FEATURES_FILE: features.describe()}


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
