"""The settings of one ``extract-features`` run: :class:`ExtractConfig`, the one place their defaults live.

``extract/cli.py`` derives its flags' choices and defaults from this dataclass (``common.config.field_choices``
/ ``field_default``); :func:`extractor_settings` picks the settings that change a record, which the store
records and checks.
"""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from common.config import check_choices, check_ranges
from common.hub import is_hub_id
from extract.image_list import IdFrom
from extract.records import FeaturesDtype
from extract.selection import BoxSelection

__all__ = [
    "AMP_DTYPES",
    "AmpName",
    "ExtractConfig",
    "default_batch_size",
    "default_workers",
    "extractor_settings",
]

#: ``--amp`` choices: the autocast dtype of the detector's forward ("none": full float32).
AmpName = Literal["none", "fp16", "bf16"]
AMP_DTYPES: dict[str, torch.dtype | None] = dict(
    zip(typing.get_args(AmpName), (None, torch.float16, torch.bfloat16), strict=True)
)


def default_workers() -> int:
    """DataLoader workers when none are asked for: one per CPU core, at most 4 (decoding keeps up then)."""
    return min(4, os.cpu_count() or 1)


def default_batch_size(device: str | None) -> int:
    """Images per forward when none is asked for: 4 on CUDA; 1 on CPU (no faster batched there, and
    cheaper in memory). ``device`` None means CUDA when available."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return 1 if device.split(":")[0] == "cpu" else 4


@dataclass
class ExtractConfig:
    """Everything one ``extract-features`` run needs (built by the CLI, or by hand).

    Sizes are in pixels. ``device`` None means CUDA when available; under torchrun with CUDA every rank uses
    ``cuda:LOCAL_RANK``. ``batch_size`` None: :func:`default_batch_size` of the device; ``workers``:
    :func:`default_workers` unless given.
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
    id_from: IdFrom = "stem"
    workers: int = field(default_factory=default_workers)
    batch_size: int | None = None
    device: str | None = None
    amp: AmpName = "none"
    features_dtype: FeaturesDtype = "float32"
    overwrite: bool = False
    strict: bool = False
    progress: bool = True
    writer_queue: int = 64

    #: The interval of each numeric setting (checked with the flag's name; the box selection checks its own).
    RANGES: ClassVar[dict[str, str]] = {
        "seed": "[0, inf)",
        "min_size": "[1, inf)",
        "max_size": "[1, inf)",
        "max_pixels": "[1, inf)",
        "workers": "[0, inf)",
        "batch_size": "[1, inf)",
        "writer_queue": "[1, inf)",
    }

    def __post_init__(self) -> None:
        check_choices(self)  # amp, features_dtype, id_from
        if self.batch_size is None:
            self.batch_size = default_batch_size(self.device)
        check_ranges(self, key_name=lambda name: "--" + name.replace("_", "-"), recurse=False)
        if len(self.opts) % 2:
            raise ValueError(f"--opts takes KEY VALUE pairs, got an odd number of items: {self.opts}")
        self.out = str(self.out).rstrip("/\\") or str(self.out)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES[self.amp]


def _weights_name(weights: str) -> str:
    """The weights file's name, or a Hub id whole (its last part alone would hide the owner)."""
    return weights if is_hub_id(weights) else Path(weights).name


def _config_name(config: str) -> str:
    return Path(config).name if (os.sep in config or config.endswith((".yaml", ".yml"))) else config


def extractor_settings(
    config: ExtractConfig, weights_sha256: str | None, weights_layout: str | None = None
) -> dict[str, Any]:
    """The settings that determine the features, stored in (and checked against) the store's metadata.

    ``weights_sha256`` / ``weights_layout``: of the weights file, as loaded (None with random weights).
    ``weights`` is the file's name, or the Hub id as given (``unc-nlp/frcnn-vg-finetuned``).
    Batch size, workers, device, ids and progress do not change a record and are left out; ``MODEL.DEVICE``
    and ``MODEL.WEIGHTS`` overrides likewise. ``weights`` and ``weights_layout`` are recorded but never
    compared (the sha256 is the weights' identity: see :data:`extract.store.meta.DERIVED_SETTINGS`).
    """
    opts = [
        (k, v)
        for k, v in zip(config.opts[0::2], config.opts[1::2])
        if k not in ("MODEL.DEVICE", "MODEL.WEIGHTS")
    ]
    return {
        "weights": None if config.random_weights else _weights_name(config.weights or ""),
        "weights_sha256": None if config.random_weights else weights_sha256,
        "weights_layout": None if config.random_weights else weights_layout,
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
