"""Box selection rules on hand-made scores and boxes."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import nms

from extract.selection import (
    BoxSelection,
    caffe_max_scores,
    caffe_max_scores_batched,
    class_deltas,
    greedy_nms_per_class,
    select_caffe,
    select_maxnms,
)


def _random_boxes(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 80
    wh = 10 + torch.rand(n, 2, generator=g) * 40
    return torch.cat([xy, xy + wh], dim=1)


def test_vectorised_nms_matches_torchvision_per_class() -> None:
    boxes = _random_boxes(120)
    scores = torch.rand(120, 7, generator=torch.Generator().manual_seed(1))
    keep = greedy_nms_per_class(boxes, scores, 0.3)
    assert keep.shape == (120, 7)
    for c in range(7):
        expected = set(nms(boxes, scores[:, c], 0.3).tolist())
        assert set(torch.nonzero(keep[:, c]).flatten().tolist()) == expected


def test_per_class_nms_suppresses_only_within_a_class() -> None:
    # boxes 0 and 1 overlap (IoU 0.8); box 2 is far away
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 8], [50, 50, 60, 60]])
    scores = torch.tensor(
        [
            [0.60, 0.05],  # box 0: class 0 best
            [0.50, 0.30],  # box 1: suppressed in class 0 by box 0, but the best of class 1
            [0.10, 0.02],
        ]
    )
    max_conf = caffe_max_scores(boxes, scores, 0.3)
    # box 1 keeps its class-1 score (0.30), not its higher but suppressed class-0 score (0.50)
    assert torch.allclose(max_conf, torch.tensor([0.60, 0.30, 0.10]))
    # class-agnostic NMS would have removed box 1 altogether
    assert 1 not in nms(boxes, scores.max(1).values, 0.3).tolist()


def test_caffe_rule_threshold_and_cap() -> None:
    boxes = torch.tensor([[i * 20.0, 0, i * 20 + 10, 10] for i in range(6)])  # disjoint
    scores = torch.tensor([[0.1], [0.5], [0.3], [0.9], [0.25], [0.15]])
    sel = BoxSelection(min_boxes=2, max_boxes=3, conf_thresh=0.2)
    out = select_caffe(boxes, scores, sel)
    assert out.keep.tolist() == [3, 1, 2]  # 4 pass (0.9, 0.5, 0.3, 0.25), capped at 3, score order
    assert torch.equal(out.boxes, boxes[[3, 1, 2]])
    assert torch.allclose(out.scores, torch.tensor([0.9, 0.5, 0.3]))

    out = select_caffe(boxes, scores, BoxSelection(min_boxes=1, max_boxes=6, conf_thresh=0.2))
    assert out.keep.tolist() == [3, 1, 2, 4]  # between min and max: all that pass


def test_caffe_rule_all_below_threshold_takes_top_min() -> None:
    boxes = torch.tensor([[i * 20.0, 0, i * 20 + 10, 10] for i in range(5)])
    scores = torch.tensor([[0.01], [0.05], [0.03], [0.04], [0.02]])
    out = select_caffe(boxes, scores, BoxSelection(min_boxes=3, max_boxes=3))
    assert out.keep.tolist() == [1, 3, 2]


def test_fewer_proposals_than_wanted_gives_all_of_them() -> None:
    boxes = _random_boxes(10)
    scores = torch.rand(10, 4, generator=torch.Generator().manual_seed(3))
    out = select_caffe(boxes, scores, BoxSelection())
    assert len(out.keep) == 10 and sorted(out.keep.tolist()) == list(range(10))
    assert torch.all(out.scores[:-1] >= out.scores[1:])
    out = select_maxnms(boxes, scores.max(1).values, BoxSelection(rule="maxnms"))
    assert sorted(out.keep.tolist()) == list(range(10))


def test_empty_inputs() -> None:
    out = select_caffe(torch.zeros(0, 4), torch.zeros(0, 1600), BoxSelection())
    assert out.keep.shape == (0,) and out.boxes.shape == (0, 4)
    out = select_maxnms(torch.zeros(0, 4), torch.zeros(0), BoxSelection(rule="maxnms"))
    assert out.keep.shape == (0,)


def test_ties_are_broken_by_proposal_index() -> None:
    boxes = torch.tensor([[i * 20.0, 0, i * 20 + 10, 10] for i in range(8)])
    scores = torch.full((8, 3), 0.1)
    scores[5, 1] = 0.5
    out = select_caffe(boxes, scores, BoxSelection(min_boxes=4, max_boxes=4))
    assert out.keep.tolist() == [5, 0, 1, 2]
    # identical boxes with identical scores: the lower index survives NMS
    same = torch.tensor([[0.0, 0, 10, 10]] * 4)
    keep = greedy_nms_per_class(same, torch.full((4, 2), 0.3), 0.3)
    assert keep[:, 0].tolist() == [True, False, False, False]
    assert keep[:, 1].tolist() == [True, False, False, False]


def test_maxnms_raises_threshold_until_min_boxes() -> None:
    # a row of boxes each shifted by 4 px: neighbours overlap with IoU 6/14 = 0.43,
    # second neighbours with IoU 2/18 = 0.11
    boxes = torch.tensor([[i * 4.0, 0, i * 4 + 10, 10] for i in range(6)])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    at_03 = select_maxnms(boxes, scores, BoxSelection(rule="maxnms", min_boxes=1, max_boxes=6))
    assert at_03.keep.tolist() == [0, 2, 4]  # 0.43 > 0.3 suppresses neighbours
    raised = select_maxnms(boxes, scores, BoxSelection(rule="maxnms", min_boxes=5, max_boxes=6))
    assert raised.keep.tolist() == [0, 1, 2, 3, 4, 5]  # 0.3 and 0.4 give 3; 0.5 keeps all six
    # the last threshold tried is 0.9 (as in py-bottom-up-attention's script): duplicates stay suppressed
    dup = torch.tensor([[0.0, 0, 10, 10]] * 4 + [[0.0, 0, 10, 10.5]])
    out = select_maxnms(
        dup, torch.tensor([0.5, 0.9, 0.7, 0.9, 0.6]), BoxSelection(rule="maxnms", min_boxes=3)
    )
    assert out.keep.tolist() == [1]
    capped = select_maxnms(boxes, scores, BoxSelection(rule="maxnms", min_boxes=4, max_boxes=4))
    assert capped.keep.tolist() == [0, 1, 2, 3]
    assert torch.equal(capped.boxes, boxes[:4])


@pytest.mark.parametrize(
    ("spec", "lo", "hi"),
    [("36", 36, 36), ("10-100", 10, 100), (" 5 - 7 ", 5, 7), (20, 20, 20)],
)
def test_box_selection_from_spec(spec: str | int, lo: int, hi: int) -> None:
    sel = BoxSelection.from_spec(spec, rule="maxnms")
    assert (sel.min_boxes, sel.max_boxes, sel.rule) == (lo, hi, "maxnms")
    assert BoxSelection.from_dict(sel.to_dict()) == sel


def test_box_selection_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="10-100"):
        BoxSelection.from_spec("100-10")
    with pytest.raises(ValueError, match="MIN-MAX"):
        BoxSelection.from_spec("ten")
    with pytest.raises(ValueError, match="caffe"):
        BoxSelection(rule="topk")
    with pytest.raises(ValueError, match="unknown BoxSelection"):
        BoxSelection.from_dict({"rule": "caffe", "boxes": 3})
    assert BoxSelection().to_dict() == {
        "rule": "caffe",
        "min_boxes": 36,
        "max_boxes": 36,
        "conf_thresh": 0.2,
        "nms_thresh": 0.3,
    }


def test_batched_per_class_nms_equals_one_image_at_a_time() -> None:
    g = torch.Generator().manual_seed(5)
    counts = [40, 0, 17, 40, 3]
    boxes = [_random_boxes(n, seed=i) for i, n in enumerate(counts)]
    scores = [torch.rand(n, 30, generator=g) for n in counts]
    scores[3][:5] = 0.5  # ties
    batched = caffe_max_scores_batched(boxes, scores, 0.3)
    for b, s, out in zip(boxes, scores, batched):
        assert out.shape == (len(b),)
        assert torch.equal(out, caffe_max_scores(b, s, 0.3))
        assert torch.equal(out, caffe_max_scores_batched([b], [s], 0.3)[0])


def test_class_deltas_reads_columns_4c_to_4c_plus_3() -> None:
    """Detectron2's layout (as in every published weight file): foreground class c's deltas are columns
    4c..4c+3 of the (R, K*4) predictor output, with no background columns."""
    num_classes = 1600
    deltas = torch.arange(3 * num_classes * 4, dtype=torch.float32).view(3, num_classes * 4)
    classes = torch.tensor([0, 1599, 7])
    expected = torch.stack([deltas[r, 4 * c : 4 * c + 4] for r, c in enumerate(classes.tolist())])
    assert torch.equal(class_deltas(deltas, classes), expected)
    assert class_deltas(deltas, classes)[1].tolist() == [6400 + 4 * 1599 + i for i in range(4)]
    with pytest.raises(ValueError, match=r"box deltas of shape \(3, 6402\)"):
        class_deltas(torch.zeros(3, 6402), classes)
