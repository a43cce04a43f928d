"""Loading the VG detector's weights, safely, from any published conversion of the Caffe model.

``--weights`` takes a file, a folder holding one, or a Hugging Face Hub id (``unc-nlp/frcnn-vg-finetuned``:
the local Hub cache first, ``HF_HUB_OFFLINE`` honoured; see :func:`resolve_weights`). Files are read by
:mod:`common.state_dict` (``.pkl`` through a restricted unpickler, ``.bin`` / ``.pth`` / ``.pt`` with
``torch.load(weights_only=True)``, ``.safetensors``); nothing in a file can run code.

The file's layout (py-bottom-up-attention's pickle, the Hugging Face demo's ``.bin``, MILVLG's ``.pth``...)
is detected from its names and shapes (:mod:`extract.weight_layouts`) and reported: ``LoadReport.layout``,
next to ``LoadReport.sha256``, both recorded in the feature store's metadata.

Every detector tensor must be loaded (frozen-BN ``running_mean`` / ``running_var`` may be absent when the
same layer's ``weight`` and ``bias`` are present: Caffe folds BN into those, and the identity statistics
are then correct). A tensor of another shape is always an error; all of them are listed, in the file's own
names, expected vs found. Nothing is copied into the model unless the whole file is acceptable.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from torch import nn

from common.hub import hub_snapshot, is_hub_id
from common.state_dict import (
    SUFFIXES,
    LoadReport,
    StateDictError,
    UnsafePickleError,
    file_sha256,
    read_weights,
    to_tensor,
    unwrap_state_dict,
)
from extract import weight_layouts as layouts

__all__ = [
    "LoadReport",
    "UnsafePickleError",
    "WeightsError",
    "file_sha256",
    "load_detector_weights",
    "read_state_dict",
    "resolve_weights",
]

logger = logging.getLogger(__name__)

#: A weight file that is missing, unreadable, unsafe, corrupt, or does not fit the detector (the same class
#: as :class:`common.state_dict.StateDictError`, so every reading error is one).
WeightsError = StateDictError

_OPTIONAL_BN_STATS = (".norm.running_mean", ".norm.running_var")
#: The attribute head, in every layout's names (a file without it is the detector without attributes).
_ATTRIBUTE_HEAD = tuple(
    f"roi_heads.box_predictor.{layer}."
    for layer in ("cls_embedding", "fc_attr", "attr_score", "cls_embed", "attr_linear1", "attr_linear2")
)
#: Files of a Hub snapshot or a folder that can hold the detector's weights, in order of preference.
WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors", "*.pkl", "*.pth", "*.pt", "*.safetensors")
_GET_WEIGHTS = (
    "use one of the published files with --config vg_r101_c4: faster_rcnn_from_caffe_attr.pkl "
    "(py-bottom-up-attention), unc-nlp/frcnn-vg-finetuned (Hugging Face) or "
    "bua-caffe-frcn-r101_with_attributes.pth (MILVLG); see the README, 'Detector weights'"
)


# --------------------------------------------------------------------------------------------- locating
def resolve_weights(path_or_hub_id: str | os.PathLike) -> Path:
    """The local weight file for ``--weights``: a file as given; the weight file inside a folder; for a Hub
    id with no such local path (``unc-nlp/frcnn-vg-finetuned``) the file inside its snapshot (cache first).

    Raises:
        WeightsError: nothing there, or a folder / snapshot with no weight file (the message says what to do).
    """
    given = str(path_or_hub_id)
    if is_hub_id(given):
        try:
            path = hub_snapshot(given, list(WEIGHT_FILES) + ["config.yaml"], what="weights file")
        except FileNotFoundError as e:
            raise WeightsError(str(e)) from None
    else:
        path = Path(given)
    if path.is_file():
        return path
    if path.is_dir():
        for pattern in WEIGHT_FILES:
            found = sorted(path.glob(pattern))
            if found:
                return found[0]
        raise WeightsError(
            f"{path} holds no weight file ({', '.join(WEIGHT_FILES)}); pass the weight file itself"
        )
    raise WeightsError(
        f"weight file {path} does not exist: fix the path ({_GET_WEIGHTS}), or pass --random-weights to run "
        "without weights"
    )


# --------------------------------------------------------------------------------------------- reading
def read_state_dict(
    path: str | os.PathLike, model: nn.Module | None = None
) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Read a weight file: ``(tensors in the file's own names, layout, non-weight entries dropped)``.

    A Caffe2-named pickle is renamed with Detectron2's ``align_and_update_state_dicts`` against ``model``'s
    state dict (so ``model`` is needed for that layout only).

    Raises:
        WeightsError: unreadable, unsafe (:class:`UnsafePickleError`) or not a state dict.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise WeightsError(f"{path}: unknown weight format {suffix!r}; use one of {', '.join(SUFFIXES)}")
    data = read_weights(path)
    heuristics = c2_names = False
    if suffix == ".pkl":
        if not isinstance(data, dict):
            raise WeightsError(f"{path}: expected a dict of weights, found {type(data).__name__}")
        if isinstance(data.get("model"), dict):
            state = data["model"]
            heuristics = bool(data.get("matching_heuristics", False))
            c2_names = data.get("__author__") == "Caffe2"
        else:
            state = data["blobs"] if isinstance(data.get("blobs"), dict) else data
            heuristics = c2_names = True
        state = {str(k): v for k, v in state.items() if not str(k).endswith("_momentum")}
    else:
        state = unwrap_state_dict(data, path, "the VG detector's weights")
    tensors = {str(k): to_tensor(v, str(k), path) for k, v in state.items()}
    layout = layouts.detect_layout(
        {k: tuple(v.shape) for k, v in tensors.items()}, suffix, caffe2_pickle=heuristics or c2_names
    )
    if layout == layouts.CAFFE2_PKL:
        if model is None:
            raise WeightsError(f"{path} uses Caffe2-style names; a model is needed to match them")
        tensors = align_and_update_state_dicts(model.state_dict(), tensors, c2_conversion=c2_names)
    dropped = sorted(k for k in tensors if layouts.is_non_weight(k))
    return {k: v for k, v in tensors.items() if k not in dropped}, layout, dropped


# --------------------------------------------------------------------------------------------- loading
def _anchor_grid(model: nn.Module) -> tuple[int, int]:
    """(anchor sizes, aspect ratios) per position of the detector's RPN (one feature level)."""
    anchors = model.cfg.MODEL.ANCHOR_GENERATOR
    return len(anchors.SIZES[0]), len(anchors.ASPECT_RATIOS[0])


def _refuse_unknown(path: Path, state: dict[str, torch.Tensor]) -> WeightsError:
    keys = sorted(state)
    return WeightsError(
        f"{path}: refused, detected layout {layouts.UNKNOWN}: none of its {len(keys)} entries has a detector "
        f"name ({', '.join(layouts.MODULE_PREFIXES)}...; it has e.g. {', '.join(keys[:4])}): it is not the "
        f"Visual Genome detector's weights (another model?). {_GET_WEIGHTS}"
    )


def load_detector_weights(
    model: nn.Module, path_or_hub_id: str | os.PathLike, strict: bool = True
) -> LoadReport:
    """Load a weight file, a folder holding one, or a Hub id into ``model`` (an
    :class:`extract.detector.VGDetector`), whatever its published layout.

    Returns:
        The :class:`LoadReport`: ``path`` (the local file read), ``sha256`` (its digest: hash it once),
        ``layout`` (see :mod:`extract.weight_layouts`), ``loaded``, ``missing``, ``unexpected``,
        ``defaulted``.

    Raises:
        WeightsError: the file is missing / unreadable / corrupt / of unknown layout, a tensor's shape
            differs from what the layout needs (all of them listed, expected vs found), or (when ``strict``)
            any backbone, RPN or head tensor is missing; in those cases the model is left untouched.
        UnsafePickleError: the file would run code.

    With ``strict=False`` an incomplete file is loaded as far as it goes and the report says what is
    missing (``report.complete`` is False); the detector then refuses to extract.
    """
    path = resolve_weights(path_or_hub_id)
    try:
        state, layout, dropped = read_state_dict(path, model)
    except UnsafePickleError:
        raise
    except StateDictError as e:
        raise WeightsError(f"{e} (no layout can be detected in an unreadable file)") from e
    if layout == layouts.UNKNOWN:
        raise _refuse_unknown(path, state)
    own = model.state_dict()
    expected = layouts.expected_file_shapes(layout, {k: tuple(v.shape) for k, v in own.items()})
    described = f"{path} (detected layout {layout}: {layouts.LAYOUTS[layout]})"
    mismatched = [
        (k, tuple(v.shape), expected[k])
        for k, v in state.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    if mismatched:
        shown = "; ".join(f"{k}: expected {e}, found {f}" for k, f, e in mismatched[:10])
        raise WeightsError(
            f"{described}: {len(mismatched)} tensor(s) do not fit this detector config: {shown}"
            + (f" (+{len(mismatched) - 10} more)" if len(mismatched) > 10 else "")
            + f". Wrong file (another model?) or wrong --config: {_GET_WEIGHTS}"
        )
    report = LoadReport(source=str(path_or_hub_id), layout=layout, path=str(path), sha256=file_sha256(path))
    report.unexpected = sorted(k for k in state if k not in expected)
    for key in expected:
        if key in state:
            continue
        if key.endswith(_OPTIONAL_BN_STATS):
            base = key.rsplit(".", 1)[0]
            if f"{base}.weight" in state and f"{base}.bias" in state:
                report.defaulted.append(key)
                continue
        report.missing.append(key)
    if strict and not report.complete:
        groups = ", ".join(f"{m}: {len(v)}" for m, v in report.missing_by_module().items())
        shown = "; ".join(f"{k} expected {expected[k]}" for k in report.missing[:6])
        shown += f" (+{len(report.missing) - 6} more)" if len(report.missing) > 6 else ""
        attributes_only = all(k.startswith(_ATTRIBUTE_HEAD) for k in report.missing)
        hint = (
            "The file has no attribute head: it is the detector without attributes (e.g. "
            "faster_rcnn_from_caffe.pkl); use the one with attributes"
            if attributes_only
            else "The file is incomplete (an interrupted download?) or of another model: download it again"
        )
        raise WeightsError(
            f"weights that do not cover the whole detector: {described}: MISSING "
            f"{len(report.missing)} [{groups}]: {shown}, found nothing. {hint} ({_GET_WEIGHTS}), or pass --random-weights to run "
            "without weights."
        )
    converted = layouts.to_detector(
        layout, {k: v for k, v in state.items() if k in expected}, anchor_grid=_anchor_grid(model)
    )
    with torch.no_grad():
        for key, tensor in own.items():
            if key in converted:
                tensor.copy_(converted[key].to(dtype=tensor.dtype))
                report.loaded += 1
    if hasattr(model, "weights_source"):
        model.weights_source = f"{path.name} sha256:{report.sha256}" if report.complete else "incomplete"
    if dropped:
        logger.info("%s: %d non-weight entries ignored (%s ...)", path, len(dropped), dropped[:2])
    if report.unexpected:
        logger.warning(
            "%s: %d unexpected entries ignored (%s ...)", path, len(report.unexpected), report.unexpected[:3]
        )
    logger.info(report.summary())
    return report
