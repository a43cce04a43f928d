"""The published layouts of the Visual Genome detector's weights, and how each maps onto this detector.

All public files are conversions of the same Caffe model (bottom-up-attention, ResNet-101 C4, 1600 objects,
400 attributes). This detector uses Detectron2's names and layout (:mod:`extract.detector`): ``cls_score``
1601 rows with background LAST, ``bbox_pred`` 1600*4 rows (foreground class c in rows 4c..4c+3, none for
background), ``cls_embedding`` indexed by that 1601-way class, ``attr_score`` 401 rows with "no attribute"
LAST, RPN ``objectness_logits`` one sigmoid logit per anchor.

Layouts (:data:`LAYOUTS`), detected from the file's names and shapes by :func:`detect_layout`:

- ``detectron2-pkl``: py-bottom-up-attention's ``faster_rcnn_from_caffe_attr.pkl`` (a pickled
  ``{"model": {name: ndarray}}``): this detector's own names and layout.
- ``hf-frcnn``: the Hugging Face demo's ``unc-nlp/frcnn-vg-finetuned`` ``pytorch_model.bin``: the same names
  and layout, plus entries that are not weights (``*.num_batches_tracked``,
  ``proposal_generator.anchor_generator.cell_anchors.0``), which are ignored.
- ``bua-caffe``: MILVLG bottom-up-attention.pytorch's ``bua-caffe-frcn-r101_with_attributes.pth``: Caffe's
  conventions under Detectron2 module names. Background is the FIRST of 1601 classes (``cls_score``,
  ``cls_embed``), ``bbox_pred`` has 1601*4 rows (background's first), "no attribute" is the FIRST of 401
  (``attr_linear2``), the attribute layers are named ``cls_embed`` / ``attr_linear1`` / ``attr_linear2``, and
  the RPN scores each anchor with a 2-way softmax (``objectness_logits`` 2A rows: A background rows, then A
  object rows). Mapped exactly: rows rotated so background / "no attribute" come last, background's box rows
  dropped, and objectness = object logit - background logit (``sigmoid(o - b)`` is the softmax's object
  probability). MILVLG reproduces Caffe's RPN (anchor scales 4, 8, 16, 32 times the stride 16, as in Caffe's
  ``generate_anchors``), whose anchors run aspect ratio outer, scale inner; Detectron2 (and this detector)
  run size outer, aspect ratio inner, so the RPN's per-anchor channels are reordered
  (:func:`caffe_to_detectron2_anchor_order`). This ordering is MILVLG's Caffe emulation as read from its
  config; a real file whose proposals look wrong would point here first.
- ``detectron2``: this detector's names and layout in a ``.safetensors`` / ``.pth`` state dict (e.g. saved
  from :class:`extract.detector.VGDetector`).
- ``caffe2-pkl``: a Detectron1 / Caffe2 pickle (``{"blobs": ...}`` or Caffe2 names), renamed by Detectron2's
  own ``align_and_update_state_dicts``.

Every layout is checked in the file's own names and shapes (:func:`expected_file_shapes`), so a refusal
names the tensors as the user's file spells them; :func:`to_detector` then converts a checked state dict.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

DETECTRON2_PKL = "detectron2-pkl"
HF_FRCNN = "hf-frcnn"
BUA_CAFFE = "bua-caffe"
DETECTRON2 = "detectron2"
CAFFE2_PKL = "caffe2-pkl"
UNKNOWN = "unknown"

#: layout -> what such a file is and where users get it (for reports and refusals).
LAYOUTS: dict[str, str] = {
    DETECTRON2_PKL: "py-bottom-up-attention's faster_rcnn_from_caffe_attr.pkl layout (Detectron2 names, "
    "background and 'no attribute' last)",
    HF_FRCNN: "the Hugging Face unc-nlp/frcnn-vg-finetuned layout (Detectron2 names, non-weight buffers ignored)",
    BUA_CAFFE: "MILVLG bottom-up-attention.pytorch's bua-caffe-frcn-r101_with_attributes.pth layout (Caffe "
    "order: background and 'no attribute' first, 2-way RPN objectness)",
    DETECTRON2: "this detector's own names and layout (a state dict saved from it)",
    CAFFE2_PKL: "a Detectron1 / Caffe2 pickle (renamed by Detectron2's heuristics)",
    UNKNOWN: "no known layout",
}

#: where each detector module's names start (Detectron2 names, used by every layout but caffe2-pkl).
MODULE_PREFIXES = ("backbone.", "proposal_generator.", "roi_heads.")

_PRED = "roi_heads.box_predictor."
_OBJECTNESS = "proposal_generator.rpn_head.objectness_logits."
_RPN_DELTAS = "proposal_generator.rpn_head.anchor_deltas."
_ANCHOR_DELTAS = _RPN_DELTAS + "weight"

#: MILVLG's attribute-head names -> this detector's.
BUA_NAMES: dict[str, str] = {
    f"{_PRED}cls_embed.weight": f"{_PRED}cls_embedding.weight",
    f"{_PRED}attr_linear1.weight": f"{_PRED}fc_attr.weight",
    f"{_PRED}attr_linear1.bias": f"{_PRED}fc_attr.bias",
    f"{_PRED}attr_linear2.weight": f"{_PRED}attr_score.weight",
    f"{_PRED}attr_linear2.bias": f"{_PRED}attr_score.bias",
}
_FROM_BUA_NAMES = {ours: theirs for theirs, ours in BUA_NAMES.items()}
#: rows whose first entry (background / "no attribute") moves to the end in a bua-caffe file.
_FIRST_TO_LAST = (
    f"{_PRED}cls_score.weight",
    f"{_PRED}cls_score.bias",
    f"{_PRED}cls_embedding.weight",
    f"{_PRED}attr_score.weight",
    f"{_PRED}attr_score.bias",
)
_BBOX = (f"{_PRED}bbox_pred.weight", f"{_PRED}bbox_pred.bias")


def is_non_weight(key: str) -> bool:
    """Entries some files carry that are not weights of the detector (ignored on load): BatchNorm's
    ``num_batches_tracked`` counters and the anchor generator's precomputed ``cell_anchors``."""
    return key.endswith(".num_batches_tracked") or key.startswith("proposal_generator.anchor_generator.")


def detect_layout(shapes: Mapping[str, tuple[int, ...]], suffix: str, caffe2_pickle: bool = False) -> str:
    """The layout of a weight file from its entries' names and shapes and its suffix.

    Args:
        shapes: file entry name -> shape (all entries, non-weights included).
        suffix: the file's suffix, lower case (``".pkl"``, ``".bin"``...).
        caffe2_pickle: the pickle says it is Caffe2's (``{"blobs": ...}`` / ``__author__ == "Caffe2"``).
    """
    names = set(shapes)
    if caffe2_pickle and suffix == ".pkl":
        return CAFFE2_PKL
    if not any(k.startswith(MODULE_PREFIXES) for k in names):
        return CAFFE2_PKL if suffix == ".pkl" else UNKNOWN
    objectness = shapes.get(_OBJECTNESS + "weight")
    deltas = shapes.get(_ANCHOR_DELTAS)
    two_way_rpn = bool(objectness and deltas and 2 * objectness[0] == deltas[0])  # 2A vs 4A rows
    if names & set(BUA_NAMES) or two_way_rpn:
        return BUA_CAFFE
    if suffix == ".pkl":
        return DETECTRON2_PKL
    if any(is_non_weight(k) for k in names):
        return HF_FRCNN
    return DETECTRON2


def expected_file_shapes(
    layout: str, model_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """What a file of ``layout`` must hold for a detector whose state dict has ``model_shapes``, in the
    file's own names: name -> shape."""
    if layout != BUA_CAFFE:
        return dict(model_shapes)
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in model_shapes.items():
        if key in _BBOX:  # one more block of 4 rows: background's
            shape = (shape[0] + 4, *shape[1:])
        elif key.startswith(_OBJECTNESS):  # background and object logit per anchor
            shape = (2 * shape[0], *shape[1:])
        out[_FROM_BUA_NAMES.get(key, key)] = tuple(shape)
    return out


def _first_to_last(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t[1:], t[:1]])


def caffe_to_detectron2_anchor_order(num_sizes: int, num_ratios: int) -> torch.Tensor:
    """``order[j]`` = the Caffe anchor index of Detectron2 anchor j.

    Detectron2's ``DefaultAnchorGenerator`` enumerates sizes outer, aspect ratios inner (j = s * R + r);
    Caffe's ``generate_anchors`` aspect ratios outer, scales inner (i = r * S + s).
    """
    sizes = torch.arange(num_sizes).repeat_interleave(num_ratios)
    ratios = torch.arange(num_ratios).repeat(num_sizes)
    return ratios * num_sizes + sizes


def to_detector(
    layout: str, state: Mapping[str, torch.Tensor], anchor_grid: tuple[int, int] = (4, 3)
) -> dict[str, torch.Tensor]:
    """A checked state dict of ``layout`` (shapes as :func:`expected_file_shapes`, non-weights dropped) in
    this detector's names and layout. Exact: renaming, row moves and (bua-caffe RPN) one subtraction.

    ``anchor_grid``: (anchor sizes, aspect ratios) of the detector's RPN (``MODEL.ANCHOR_GENERATOR``), to
    reorder a Caffe-ordered RPN's anchors.
    """
    if layout != BUA_CAFFE:
        return dict(state)
    order = caffe_to_detectron2_anchor_order(*anchor_grid)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = BUA_NAMES.get(key, key)
        if key in _FIRST_TO_LAST:
            value = _first_to_last(value)
        elif key in _BBOX:
            value = value[4:]
        elif key.startswith(_OBJECTNESS):  # (background A, object A) -> object - background, Caffe order
            anchors = value.shape[0] // 2
            value = (value[anchors:] - value[:anchors])[order]
        elif key.startswith(_RPN_DELTAS):  # (A * 4) anchor-major deltas, Caffe order
            value = value.view(len(order), 4, *value.shape[1:])[order].flatten(0, 1)
        out[key] = value.contiguous()
    return out
