"""``lxmert-answer``'s detector settings when no detector flag is given: the model folder's recorded extractor.

A fine-tuned model folder carries ``extractor.json``: the settings of the ``extract-features`` run that made
its training features (detector config, ``--opts``, box selection, image sizes, weights file name and sha256,
or random weights and their seed). Each setting the command line leaves out is taken from that record; a flag
that is given wins (and the answerer's check names every difference from the record, as before). Without a
usable record (a Hub model, TSV-imported features) the flags' own defaults apply, as for ``extract-features``.

The weights are found by the file name recorded (the sha256 is checked once they are read): in the current
folder, its ``weights/`` folder (where the README puts them), or the model folder; a recorded Hub id is used as
it is (the local cache first).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from common.hub import is_hub_id
from tasks.answer.results import AnswerSetupError
from tasks.data.jsonio import DataFormatError
from tasks.data.model_folder import EXTRACTOR_FILE, read_extractor_record

__all__ = ["RECORDED_FLAGS", "flags_from_record", "recorded_extractor", "weights_candidates"]

#: The argparse ``dest`` of every detector / image flag an extractor record can fill.
RECORDED_FLAGS = (
    "weights",
    "random_weights",
    "config",
    "opts",
    "selection",
    "boxes",
    "conf_thresh",
    "nms_thresh",
    "min_size",
    "max_size",
)


def recorded_extractor(model: str | os.PathLike) -> dict[str, Any] | None:
    """The first usable entry of ``model``'s ``extractor.json`` (a model folder), or None: no folder, no
    record, or only entries without settings (features imported from TSV files).

    Raises:
        AnswerSetupError: the record exists but cannot be read (naming the file).
    """
    folder = Path(model)
    if not folder.is_dir():
        return None
    try:
        record = read_extractor_record(folder)
    except DataFormatError as e:
        raise AnswerSetupError(f"{e}; restore the file or remove it") from None
    entries = record if isinstance(record, list) else [record]
    for entry in entries:
        if isinstance(entry, dict) and entry.get("source") != "tsv" and "selection" in entry:
            return entry
    return None


def weights_candidates(name: str, model: str | os.PathLike) -> list[Path]:
    """Where a recorded weights file name is looked for, in order."""
    here = Path.cwd()
    return [here / name, here / "weights" / name, Path(model) / name]


def flags_from_record(
    entry: dict[str, Any], model: str | os.PathLike, weights: bool = True
) -> dict[str, Any]:
    """The flag values (argparse ``dest`` -> value, as the parser would give them) that reproduce the recorded
    extractor ``entry``, plus ``seed`` (the random detector's seed, an :class:`ExtractConfig` field).
    ``weights=False``: the weights are given on the command line; the recorded file is not looked for.

    Raises:
        AnswerSetupError: the recorded weights file is in none of :func:`weights_candidates`' places, or the
            record lacks a setting (naming the file and what to pass instead).
    """
    source = Path(model) / EXTRACTOR_FILE
    try:
        lo, hi = int(entry["min_boxes"]), int(entry["max_boxes"])
        flags: dict[str, Any] = {
            "random_weights": bool(entry.get("random_weights")),
            "weights": None,
            "config": str(entry["config"]),
            "opts": [str(v) for v in entry.get("opts") or []],
            "selection": str(entry["selection"]),
            "boxes": str(lo) if lo == hi else f"{lo}-{hi}",
            "conf_thresh": float(entry["conf_thresh"]),
            "nms_thresh": float(entry["nms_thresh"]),
            "min_size": int(entry["min_size"]),
            "max_size": int(entry["max_size"]),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise AnswerSetupError(
            f"{source}: the extractor record lacks a usable setting ({type(e).__name__}: {e}); give the detector "
            "flags (--weights or --random-weights, --config, --min-size, --max-size, ...)"
        ) from None
    if flags["random_weights"]:
        if entry.get("seed") is not None:
            flags["seed"] = int(entry["seed"])
        return flags
    if not weights:
        return flags
    name = entry.get("weights")
    if not name:
        raise AnswerSetupError(
            f"{source} names no detector weights; give --weights FILE (or --random-weights)"
        )
    if is_hub_id(name):
        flags["weights"] = str(name)
        return flags
    places = weights_candidates(str(name), model)
    found = next((p for p in places if p.exists()), None)
    if found is None:
        sha = entry.get("weights_sha256") or "?"
        raise AnswerSetupError(
            f"the model {model} was trained on features of the detector weights {name} (sha256 {sha[:16]}...), "
            f"found in none of {', '.join(str(p.parent) for p in places)}; give --weights PATH"
        )
    flags["weights"] = str(found)
    return flags
