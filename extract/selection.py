"""Which detector regions become an image's stored regions.

Two rules are implemented, both on one image's detector outputs:

``"caffe"`` (default): the rule that produced LXMERT's released features (Caffe bottom-up-attention's
``generate_tsv.py``). For every foreground class, greedy NMS at IoU ``nms_thresh`` over the *proposal*
boxes ranked by that class's score; each proposal keeps its highest foreground score among the classes in
which it survived. Proposals with that score ``>= conf_thresh`` are kept; if fewer than ``min_boxes`` pass,
the top ``min_boxes`` by score are taken instead; at most ``max_boxes`` are kept. The stored boxes are the
(unregressed) proposal boxes.

``"maxnms"``: py-bottom-up-attention's "maxnms" script and the Hugging Face demo. Each proposal takes its
maximum foreground score and the box regressed for that class (:func:`class_deltas`: foreground class c's
deltas are columns 4c..4c+3); class-agnostic greedy NMS starting at IoU
``nms_thresh``, raised by 0.1 until at least ``min_boxes`` survive (the last threshold tried is the largest
below 1.0, 0.9 from 0.3, as in that script);
the top ``max_boxes`` by score are kept. The stored boxes are the regressed boxes. ``conf_thresh`` is not
used by this rule.

All sorting is stable: on equal scores the proposal with the lower index (the RPN's higher objectness)
comes first, so the selection never depends on the sort implementation or the device.
Boxes are x1, y1, x2, y2 in pixels; IoU follows torchvision's convention (no +1 on widths).
"""

from __future__ import annotations

import re
import typing
from dataclasses import asdict, dataclass
from typing import ClassVar, Literal

import torch
from torchvision.ops import box_iou

from common.config import check_ranges

#: ``--selection`` choices: the box selection rules (see the module docstring).
SelectionRule = Literal["caffe", "maxnms"]
RULES: tuple[str, ...] = typing.get_args(SelectionRule)


@dataclass(frozen=True)
class BoxSelection:
    """How many regions to keep per image and by which rule (see the module docstring).

    ``min_boxes == max_boxes == 36`` reproduces LXMERT's fixed 36 regions.
    """

    rule: SelectionRule = "caffe"
    min_boxes: int = 36
    max_boxes: int = 36
    conf_thresh: float = 0.2
    nms_thresh: float = 0.3

    RANGES: ClassVar[dict[str, str]] = {
        "min_boxes": "[1, inf)",
        "max_boxes": "[1, inf)",
        "conf_thresh": "[0, 1]",
        "nms_thresh": "(0, 1]",
    }

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown box selection rule {self.rule!r}; choose one of {', '.join(RULES)}")
        check_ranges(self)
        if self.min_boxes > self.max_boxes:
            raise ValueError(
                f"box counts must satisfy 1 <= min_boxes <= max_boxes, got min_boxes={self.min_boxes}, "
                f"max_boxes={self.max_boxes} (e.g. --boxes 36 or --boxes 10-100)"
            )

    def to_dict(self) -> dict:
        """Plain JSON-able dict (stored in a feature store's metadata)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BoxSelection:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown BoxSelection field(s) {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_spec(cls, boxes: str | int, rule: SelectionRule = "caffe", **kwargs: float) -> BoxSelection:
        """Parse a ``--boxes`` value: ``"36"`` (min = max = 36) or ``"10-100"`` (min 10, max 100)."""
        text = str(boxes).strip()
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", text)
        if match is None:
            raise ValueError(f"cannot parse boxes {boxes!r}: expected N (e.g. 36) or MIN-MAX (e.g. 10-100)")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        return cls(rule=rule, min_boxes=lo, max_boxes=hi, **kwargs)


@dataclass
class Selected:
    """One image's selected regions, in the order they are stored (score descending, stable).

    ``keep`` (n,) int64 indices into the proposals; ``boxes`` (n, 4) float32 x1,y1,x2,y2 in the
    detector's input-image pixels; ``scores`` (n,) the score the rule ranked by.
    """

    keep: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(R, K) bool -> (R, ceil(K / 64)) int64, bit j of word w = mask[:, 64 * w + j]."""
    rows, cols = mask.shape
    words = max(1, (cols + 63) // 64)
    padded = torch.zeros((rows, words * 64), dtype=torch.int64, device=mask.device)
    padded[:, :cols] = mask
    bits = torch.ones(64, dtype=torch.int64, device=mask.device) << torch.arange(64, device=mask.device)
    return (padded.view(rows, words, 64) * bits).sum(-1)  # distinct bits: the sum is their OR


def greedy_nms_per_class_batched(
    boxes: list[torch.Tensor], scores: list[torch.Tensor], iou_thresh: float
) -> list[torch.Tensor]:
    """Greedy NMS for every class of every image, all at once.

    Args:
        boxes: per image (R_i, 4) x1,y1,x2,y2, shared by that image's classes.
        scores: per image (R_i, C) one score column per class (C the same for all images).
        iou_thresh: a box is suppressed by a higher-ranked kept box of the same class when IoU > thresh.

    Returns:
        per image (R_i, C) bool, True where proposal r survives NMS in class c. Ranking is a stable
        descending sort, so equal scores keep the lower proposal index first. Images do not interact:
        each result is exactly what that image alone gives.

    Each image's IoU matrix is computed once and every (image, class) keeps its "suppressed" set as a
    bitset, so each of the max(R_i) greedy steps is a handful of tensor ops over all images and classes.
    """
    if not scores:
        return []
    device = scores[0].device
    num_classes = scores[0].shape[1]
    counts = [int(s.shape[0]) for s in scores]
    num, batch = max(counts), len(scores)
    if num == 0 or num_classes == 0:
        return [torch.zeros((n, num_classes), dtype=torch.bool, device=device) for n in counts]
    # pad every image to `num` proposals; padding scores -1 sorts after every real score (>= 0)
    padded = torch.full((batch, num, num_classes), -1.0, device=device)
    overlap = torch.zeros((batch, num, num), dtype=torch.bool, device=device)
    for b, (bx, sc) in enumerate(zip(boxes, scores)):
        if counts[b]:
            padded[b, : counts[b]] = sc.float()
            overlap[b, : counts[b], : counts[b]] = box_iou(bx.float(), bx.float()) > iou_thresh
    packed = _pack_bits(overlap.view(batch * num, num))  # (B*R, W) int64, row = b * R + r
    order = torch.sort(padded, dim=1, descending=True, stable=True).indices  # (B, R, C) local rows
    order = (order + (torch.arange(batch, device=device) * num)[:, None, None]).permute(1, 0, 2)
    order = order.reshape(num, batch * num_classes)  # (R, B*C) global rows, column = b * C + c
    suppressed = torch.zeros((batch * num_classes, packed.shape[1]), dtype=torch.int64, device=device)
    keep = torch.zeros((batch * num_classes, num), dtype=torch.bool, device=device)
    col = torch.arange(batch * num_classes, device=device)
    for rank in range(num):
        idx = order[rank]  # (B*C,) the rank-th proposal of every (image, class)
        local = idx % num
        word = suppressed.gather(1, (local >> 6)[:, None]).squeeze(1)
        alive = ((word >> (local & 63)) & 1) == 0
        keep[col, local] = alive
        suppressed |= packed.index_select(0, idx) * alive[:, None]  # (plain indexing is slow on CPU)
    keep = keep.view(batch, num_classes, num)
    return [keep[b, :, : counts[b]].T for b in range(batch)]


def greedy_nms_per_class(boxes: torch.Tensor, scores: torch.Tensor, iou_thresh: float) -> torch.Tensor:
    """One image of :func:`greedy_nms_per_class_batched`: boxes (R, 4), scores (R, C) -> (R, C) bool."""
    return greedy_nms_per_class_batched([boxes], [scores], iou_thresh)[0]


def _top_stable(scores: torch.Tensor, candidates: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` best of ``candidates`` (indices) by ``scores``, descending, ties by lower index."""
    cand = candidates.sort().values
    order = torch.sort(scores[cand], descending=True, stable=True).indices
    return cand[order[:count]]


def caffe_max_scores_batched(
    proposal_boxes: list[torch.Tensor], fg_scores: list[torch.Tensor], nms_thresh: float
) -> list[torch.Tensor]:
    """Per image (R_i,): each proposal's highest foreground score among the classes where it survives
    per-class NMS; 0 when it survives in none.

    ``fg_scores`` per image (R_i, C_fg) are probabilities (softmax over all classes, background dropped).
    """
    survive = greedy_nms_per_class_batched(proposal_boxes, fg_scores, nms_thresh)
    out = []
    for keep, sc in zip(survive, fg_scores):
        if sc.numel() == 0:
            out.append(torch.zeros(sc.shape[0], device=sc.device))
        else:
            out.append(torch.where(keep, sc.float(), torch.zeros((), device=sc.device)).amax(1))
    return out


def caffe_max_scores(
    proposal_boxes: torch.Tensor, fg_scores: torch.Tensor, nms_thresh: float
) -> torch.Tensor:
    """One image of :func:`caffe_max_scores_batched`: (R, 4), (R, C_fg) -> (R,)."""
    return caffe_max_scores_batched([proposal_boxes], [fg_scores], nms_thresh)[0]


def select_caffe(
    proposal_boxes: torch.Tensor,
    fg_scores: torch.Tensor,
    selection: BoxSelection,
    max_conf: torch.Tensor | None = None,
) -> Selected:
    """The ``"caffe"`` rule on one image. ``proposal_boxes`` (R, 4); ``fg_scores`` (R, C_fg) probabilities;
    ``max_conf`` (R,) precomputed :func:`caffe_max_scores` (e.g. batched over images), else computed here."""
    if max_conf is None:
        max_conf = caffe_max_scores(proposal_boxes, fg_scores, selection.nms_thresh)
    all_idx = torch.arange(max_conf.shape[0], device=max_conf.device)
    passing = all_idx[max_conf >= selection.conf_thresh]
    if passing.numel() < selection.min_boxes:
        keep = _top_stable(max_conf, all_idx, selection.min_boxes)
    else:
        keep = _top_stable(max_conf, passing, selection.max_boxes)
    return Selected(keep=keep, boxes=proposal_boxes[keep].float(), scores=max_conf[keep])


def class_deltas(deltas: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Each region's box deltas for one foreground class.

    Args:
        deltas: (R, K*4) the box predictor's class-specific deltas, Detectron2's layout: foreground class c
            (0..K-1) in columns 4c..4c+3 (dx, dy, dw, dh); no columns for background.
        classes: (R,) int64 foreground class per region, in 0..K-1.

    Returns:
        (R, 4) the deltas of ``classes[r]`` for each region r.
    """
    if deltas.dim() != 2 or deltas.shape[1] % 4:
        raise ValueError(f"box deltas of shape {tuple(deltas.shape)}; expected (R, K*4)")
    per_class = deltas.view(deltas.shape[0], deltas.shape[1] // 4, 4)
    return per_class[torch.arange(deltas.shape[0], device=deltas.device), classes]


def select_maxnms(class_boxes: torch.Tensor, max_scores: torch.Tensor, selection: BoxSelection) -> Selected:
    """The ``"maxnms"`` rule on one image.

    Args:
        class_boxes: (R, 4) each proposal's box regressed for its highest-scoring foreground class.
        max_scores: (R,) that class's probability.
    """
    num = max_scores.shape[0]
    all_idx = torch.arange(num, device=max_scores.device)
    thresh = selection.nms_thresh
    while True:
        survive = greedy_nms_per_class(class_boxes, max_scores[:, None], thresh)[:, 0]
        nxt = round(thresh + 0.1, 6)
        if survive.sum() >= min(selection.min_boxes, num) or nxt >= 1.0:
            break
        thresh = nxt
    keep = _top_stable(max_scores.float(), all_idx[survive], selection.max_boxes)
    return Selected(keep=keep, boxes=class_boxes[keep].float(), scores=max_scores[keep].float())
